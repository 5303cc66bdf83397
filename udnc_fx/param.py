"""``DitheredLatticeParam``: a weight served from lattice codeword indices, a codebook and a dither key."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .lattice import get_lattice
from .record import CompressedWeight, check_affine, index_dtype, lattice_factor, on_lattice, scaled_dither_rows

__all__ = ["DitheredLatticeParam", "compute_dither", "index_dtype_for"]

_TORCH_INDEX_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32}


def index_dtype_for(num_codewords: int) -> torch.dtype:
    """The smallest signed-safe integer dtype torch can gather with that holds ``num_codewords - 1``
    (:func:`udnc_fx.record.index_dtype` as a torch dtype)."""
    return _TORCH_INDEX_DTYPES[index_dtype(num_codewords)]


def compute_dither(key: int, num_vectors: int, lattice: str, n: int, step: float) -> np.ndarray:
    """The dither ``Δ·u`` (float32, ``num_vectors × n``) exactly as every decoder computes it.

    ``r`` from the hash stream, ``u_raw = lattice.dither_raw(r)`` in float64 (exact), scaled by the float64
    product ``lattice.scale * step`` and rounded once to float32 (:mod:`udnc_fx.record`'s rules, which
    :meth:`CompressedWeight.dither` applies too). ``step == 0`` is never stored.
    """
    lat = get_lattice(lattice, n)
    return scaled_dither_rows(key, num_vectors, lat, lattice_factor(lat, step))


class DitheredLatticeParam(nn.Module):
    """A weight tensor decoded as ``(C[k] − Δ·U).flatten()[:numel].view(shape)``.

    Holds the codeword ``indices`` (persistent buffer, the smallest integer dtype that fits), the ``codebook``
    (an ``nn.Parameter`` of shape K × n, trainable) and the dither ``key``; the dither ``Δ·U`` is regenerated from
    the key on first use and cached in a non-persistent buffer (it never enters the ``state_dict``).

    If ``zero_index`` is set, vectors coded with that index decode to exactly 0 (no dither): pruned weights.

    Args:
        indices: integer tensor ``(ceil(numel / n),)`` with values in ``[0, K)``.
        codebook: float32 ``(K, n)``.
        shape: the decoded weight's shape.
        lattice, n, step: the quantizer (``step`` is Δ; codewords start as Δ·lattice points).
        key: the uint64 dither key (see :func:`udnc_fx.dither.tensor_key`); ``None`` means no dither.
        zero_index: optional index that decodes to exact zeros.
        fqn, aliases: the parameter it serves and the other names tied to it.
        codebook_int: the codewords' integer lattice coordinates (while the codebook is not fine-tuned, or is
            those points under ``affine``).
        sqnr_db: SQNR of the decoded weight against the original, when known.
        affine: ``(a, b)`` when the codebook is the points ``codebook_int`` under the affine correction
            (:func:`udnc_fx.record.codebook_from_int`): set by fine-tuning's per-layer choice, kept by save/load.
    """

    def __init__(
        self,
        indices: torch.Tensor,
        codebook: torch.Tensor,
        *,
        shape: tuple[int, ...],
        lattice: str,
        n: int,
        step: float,
        key: int | None,
        zero_index: int | None = None,
        fqn: str | None = None,
        aliases: tuple[str, ...] = (),
        codebook_int: np.ndarray | None = None,
        sqnr_db: float | None = None,
        affine: tuple[float, float] | None = None,
    ):
        super().__init__()
        get_lattice(lattice, n)
        numel = math.prod(shape)
        if codebook.ndim != 2 or codebook.shape[1] != n:
            raise ConfigError(f"codebook must be K x {n}, got {tuple(codebook.shape)}")
        if indices.ndim != 1 or indices.numel() != -(-numel // n):
            raise ConfigError(f"indices must be a vector of ceil({numel}/{n}) entries, got {tuple(indices.shape)}")
        if zero_index is not None and not 0 <= zero_index < codebook.shape[0]:
            raise ConfigError(f"zero_index {zero_index} outside the codebook of {codebook.shape[0]} codewords")
        self.shape = tuple(int(s) for s in shape)
        self.lattice = lattice
        self.n = int(n)
        self.step = float(step)
        self.key = None if key is None else int(key)
        self.zero_index = None if zero_index is None else int(zero_index)
        self.register_buffer("indices", indices.to(index_dtype_for(codebook.shape[0])))
        self.codebook = nn.Parameter(codebook.detach().to(torch.float32).clone())
        self.register_buffer("_dither_cache", None, persistent=False)
        # Bookkeeping for save/inspect/export: the parameter fqn it serves (and its tied aliases), the codewords'
        # integer lattice coordinates while the codebook is untouched, and the SQNR measured at quantization time.
        self.fqn = fqn
        self.aliases = tuple(aliases)
        self.codebook_int = None if codebook_int is None else np.asarray(codebook_int, dtype=np.int64)
        self.sqnr_db = sqnr_db
        self.affine = check_affine(affine)
        #: What fine-tuning chose for this layer's codebook (``"table"``, ``"affine"``, with the bytes and the
        #: fit it measured), or ``None`` when it was not fine-tuned: shown by ``inspect``.
        self.codebook_choice: dict | None = None

    @classmethod
    def from_record(
        cls,
        record: CompressedWeight,
        *,
        fqn: str | None = None,
        aliases: tuple[str, ...] = (),
        sqnr_db: float | None = None,
    ) -> DitheredLatticeParam:
        """The parameter serving ``record`` (its codebook copied into a trainable ``nn.Parameter``; uint8 indices
        shared with the record, wider ones widened to the dtype the parameter keeps).

        Args:
            record: the compressed weight.
            fqn, aliases, sqnr_db: bookkeeping, see the class docstring.
        """
        idx = record.indices
        # the dtypes the parameter keeps (uint8, int16, int32: the quantizer's) and int64 are shared, no copy;
        # others (the reader's uint16, uint32: torch lacks most unsigned wider dtypes) become the one it keeps
        # (the record's indices are in [0, K): they fit)
        if idx.dtype not in (*_TORCH_INDEX_DTYPES, np.dtype(np.int64)):
            idx = idx.astype(index_dtype(record.num_codewords))
        codebook = record.codebook if record.codebook.flags.writeable else record.codebook.copy()
        return cls(
            torch.from_numpy(idx),
            torch.from_numpy(codebook),
            shape=record.shape,
            lattice=record.lattice,
            n=record.n,
            step=record.step,
            key=record.key,
            zero_index=record.zero_index,
            fqn=fqn,
            aliases=aliases,
            codebook_int=record.codebook_int,
            sqnr_db=sqnr_db,
            affine=record.affine,
        )

    def record(self) -> CompressedWeight:
        """The :class:`~udnc_fx.record.CompressedWeight` of the current state: a copy of the codebook (fine-tuned
        or not) and, while it is still exactly the quantizer's lattice points (:func:`udnc_fx.record.on_lattice`),
        their integer coordinates. The indices are shared with the buffer (no copy) when it lives on the CPU."""
        codebook = self.codebook.detach().cpu().to(torch.float32).numpy().copy()
        affine = self.affine
        exact = affine is not None and on_lattice(codebook, self.codebook_int, self.lattice, self.n, self.step, affine)
        if not exact:  # no correction, or the codebook moved on since it was set
            affine = None
            exact = on_lattice(codebook, self.codebook_int, self.lattice, self.n, self.step)
        return CompressedWeight(
            indices=self.indices.detach().cpu().numpy(),
            codebook=codebook,
            shape=self.shape,
            lattice=self.lattice,
            n=self.n,
            step=self.step,
            key=self.key,
            zero_index=self.zero_index,
            codebook_int=self.codebook_int if exact else None,
            affine=affine if exact else None,
        )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_codewords(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def dithered(self) -> bool:
        return self.key is not None

    def dither(self) -> torch.Tensor:
        """``Δ·U`` as float32 ``(num_vectors × n)`` on the codebook's device, computed once and cached."""
        cache = self._dither_cache
        device = self.codebook.device
        if cache is None or cache.device != device:
            if self.key is None:
                cache = torch.zeros(self.indices.numel(), self.n, dtype=torch.float32, device=device)
            else:
                arr = compute_dither(self.key, self.indices.numel(), self.lattice, self.n, self.step)
                cache = torch.from_numpy(arr).to(device)
            self._dither_cache = cache
        return cache

    def forward(self) -> torch.Tensor:
        idx = self.indices.long()
        vectors = self.codebook[idx] - self.dither()
        if self.zero_index is not None:
            vectors = torch.where((idx == self.zero_index).unsqueeze(1), torch.zeros_like(vectors), vectors)
        return vectors.reshape(-1)[: self.numel].view(self.shape)

    @torch.no_grad()
    def materialize(self) -> torch.Tensor:
        """The decoded weight as a plain float tensor (detached), equal to ``forward()`` bit for bit.

        A float32 parameter on the CPU whose dither is not cached yet is decoded in chunks of rows by
        :meth:`CompressedWeight.decode` (the same float32 arithmetic), without building or caching the dither of
        the whole tensor: materializing a model then adds one decoded weight at a time, not a dither per weight.
        """
        if (
            self._dither_cache is None
            and self.codebook.device.type == "cpu"
            and self.codebook.dtype == torch.float32
            and self.indices.device.type == "cpu"
        ):
            return torch.from_numpy(np.ascontiguousarray(self.record().decode()))
        return self.forward().detach().clone()

    def codeword_counts(self) -> torch.Tensor:
        """How many vectors use each codeword (int64, length K)."""
        idx = self.indices
        # torch counts uint8/int16/int32 directly (7x faster on 2e7 uint8 than widening to int64 first)
        return torch.bincount(idx if idx.dtype in (torch.uint8, torch.int16, torch.int32) else idx.long(),
                              minlength=self.num_codewords)

    def entropy_bits(self) -> float:
        """Empirical order-0 entropy of the index stream in bits per weight (per scalar, not per vector)."""
        counts = self.codeword_counts().double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log2()).sum()) / self.n if p.numel() else 0.0

    def rate_bits(self) -> float:
        """Estimated coded rate in bits per weight (:func:`udnc_fx.quantizer.rate_bits_of_points`: for vector
        lattices what the default coder writes for the smaller of indices plus a table of points and codebook-free
        ``lattice-coords``), what ``target_bits`` solves for.
        Equals :meth:`entropy_bits` for ``Z¹``; a fine-tuned codebook (no integer points) gives :meth:`entropy_bits`."""
        if self.codebook_int is None:
            return self.entropy_bits()
        from .quantizer import rate_bits_of_points

        points = self.codebook_int[self.indices.cpu().numpy().astype(np.int64)]
        return rate_bits_of_points(
            points, self.lattice, key=self.key, shape=tuple(self.shape), exact_zero=self.zero_index is not None
        )

    def extra_repr(self) -> str:
        key = "none" if self.key is None else f"0x{self.key:016x}"
        return (
            f"shape={self.shape}, lattice={self.lattice}{'' if self.lattice != 'Z' else self.n}, n={self.n}, "
            f"step={self.step:.4g}, K={self.num_codewords}, indices={str(self.indices.dtype).replace('torch.', '')}, "
            f"key={key}" + ("" if self.zero_index is None else f", zero_index={self.zero_index}")
        )

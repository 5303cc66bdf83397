"""The compressed weight: one frozen, NumPy-only record and the rules every consumer of it shares.

A weight ``W`` with ``N`` elements, quantized on the lattice ``Λ`` (dimension ``n``) with step ``Δ``, is flattened
in row-major order, zero-padded to ``m = ceil(N/n)`` vectors and described by:

* ``indices`` ``k`` (``m``), ``codebook`` ``C`` (float32 ``K × n``) and, while the codebook is still the quantizer's
  lattice points (not fine-tuned), their integer lattice coordinates ``codebook_int``;
* ``lattice``, ``n``, ``step`` (Δ), ``shape``, the dither ``key`` (a uint64, or ``None``: the one "no dither"), and
  ``zero_index`` (vectors with that index decode to exact zeros: pruned weights).

The rules, each written once here and used by the quantizer, ``DitheredLatticeParam``, save/load, the ONNX spec,
sidecar and ``load_onnx``:

* the per-tensor key: :func:`weight_key` (``udnc_fx.dither.tensor_key`` of the seed and the fqn, or ``None``);
* the scale from raw lattice coordinates to weights: :func:`lattice_factor`, ``factor = lattice.scale · Δ`` as one
  float64 product;
* the dither: :func:`raw_dither` (``lattice.dither_raw`` of the hash stream, float64, exact) and
  :func:`scaled_dither` (``float32(raw · factor)``, rounded once);
* the codebook on the lattice: :func:`codebook_from_int` (``float32(from_int(c) · factor)``) and
  :func:`on_lattice` (bit-exact float32 equality with it: the rule that decides whether a file may store the
  integers, so that loading gives back the same bits);
* the affine correction of fine-tuned codewords (format 1.3, optional): with ``affine = (a, b)`` (two float32
  numbers, ``a`` finite and non-zero, ``b`` finite) the codebook is ``float32(float32(a · p) + b)`` where ``p`` is
  the float32 on-lattice codeword above; the product and the sum are each one IEEE float32 operation, in that order
  (:func:`codebook_from_int`, :func:`check_affine`). It lets a fine-tuned layer keep its integer points instead of
  a float table;
* the decode: ``Ŵ = (C[k] − float32(raw · factor)).flatten()[:N].reshape(shape)``, with vectors coded
  ``zero_index`` set to exactly 0 (:meth:`CompressedWeight.decode`).

The dither is never stored in the record: callers that decode repeatedly (``DitheredLatticeParam``, the
allocation probes) keep their own cache and hand it to :meth:`CompressedWeight.decode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from . import dither as _dither
from .errors import ConfigError
from .lattice import Lattice, get_lattice

__all__ = [
    "CompressedWeight",
    "weight_key",
    "lattice_factor",
    "raw_dither",
    "scaled_dither",
    "scaled_dither_rows",
    "codebook_from_int",
    "on_lattice",
    "check_affine",
    "apply_affine",
    "float32_json",
    "entropy_from_counts",
    "index_dtype",
    "DECODE_CHUNK_ELEMENTS",
    "DITHER_CHUNK_ELEMENTS",
]

#: Weights decoded per work item by :meth:`CompressedWeight.decode`: small enough that the float64 temporaries stay
#: in cache, large enough that NumPy's per-call overhead does not show.
DECODE_CHUNK_ELEMENTS = 1 << 18


def index_dtype(num_codewords: int) -> np.dtype:
    """The smallest integer dtype every decoder can gather with that holds ``num_codewords - 1``: uint8 up to 256
    codewords, then int16 and int32 (torch and ONNX lack most wider unsigned types).

    Raises:
        ConfigError: more than ``2**31`` codewords.
    """
    if num_codewords <= 256:
        return np.dtype(np.uint8)
    if num_codewords <= 2**15:
        return np.dtype(np.int16)
    if num_codewords <= 2**31:
        return np.dtype(np.int32)
    raise ConfigError(f"{num_codewords} codewords do not fit an int32 index")


def weight_key(seed: int, fqn: str, dithered: bool = True) -> int | None:
    """The dither key of the weight ``fqn`` under ``seed``: :func:`udnc_fx.dither.tensor_key`, or ``None`` (no
    dither) when ``dithered`` is false. Every pass that quantizes and the container's default key use this.

    Raises:
        ConfigError: ``seed`` is not an integer in ``[0, 2**64)``.
    """
    return _dither.tensor_key(seed, fqn) if dithered else None


def lattice_factor(lat: Lattice, step: float) -> float:
    """``lat.scale · Δ`` as one float64 product: raw lattice coordinates → weight units. A format rule: the
    dither, the codebook and the ONNX graph all multiply by exactly this number."""
    return float(lat.scale) * float(step)


def raw_dither(key: int | None, num_vectors: int, lat: Lattice, start: int = 0) -> np.ndarray:
    """The Voronoi dither of vectors ``start .. start + num_vectors`` in raw lattice coordinates (float64, exact):
    ``lat.dither_raw`` of the hash stream elements ``start·n .. (start + num_vectors)·n``; zeros when ``key`` is
    ``None``. The hash is counter-based, so any slice of rows is regenerated on its own."""
    if key is None:
        return np.zeros((num_vectors, lat.dim))
    r = _dither.uniform_np(key, num_vectors * lat.dim, start=start * lat.dim).reshape(num_vectors, lat.dim)
    return lat.dither_raw(r)


def scaled_dither(raw: np.ndarray, factor: float) -> np.ndarray:
    """``float32(raw · factor)``: the dither ``Δ·u`` every decoder subtracts (the float64 product rounded once)."""
    return (raw * factor).astype(np.float32)


#: Dither elements per work item of :func:`scaled_dither_rows`: the float64 raw dither exists one chunk at a time.
DITHER_CHUNK_ELEMENTS = 1 << 18


def scaled_dither_rows(key: int | None, num_vectors: int, lat: Lattice, factor: float, start: int = 0) -> np.ndarray:
    """``scaled_dither(raw_dither(key, num_vectors, lat, start), factor)`` (float32 ``num_vectors × n``), computed in
    chunks of rows so the float64 raw dither (and its temporaries) never exists for the whole tensor. Every element
    is computed by the same operations, so the result is the same bit for bit."""
    out = np.empty((num_vectors, lat.dim), dtype=np.float32)
    if key is None:
        out[:] = 0.0
        return out
    chunk = max(1, DITHER_CHUNK_ELEMENTS // lat.dim)
    for v0 in range(0, num_vectors, chunk):
        v1 = min(v0 + chunk, num_vectors)
        out[v0:v1] = scaled_dither(raw_dither(key, v1 - v0, lat, start + v0), factor)
    return out


def check_affine(affine) -> tuple[float, float] | None:
    """The affine correction ``(a, b)`` as two Python floats that are exactly float32 numbers, or ``None``.

    Raises:
        ConfigError: not a pair of numbers; ``a`` or ``b`` not finite or not exactly a float32 number; ``a == 0``.
    """
    if affine is None:
        return None
    try:
        a, b = affine
    except (TypeError, ValueError):
        raise ConfigError(f"affine must be a pair (a, b) of float32 numbers, got {affine!r}") from None
    out = []
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise ConfigError(f"affine {name} must be a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise ConfigError(f"affine {name} must be finite, got {v!r}")
        if float(np.float32(v)) != v:
            raise ConfigError(f"affine {name} = {v!r} is not exactly a float32 number")
        out.append(v)
    if out[0] == 0.0:
        raise ConfigError("affine a must be non-zero")
    return out[0], out[1]


def float32_json(value: float) -> float:
    """The float with the shortest decimal form that rounds (float64, then to float32, nearest even) to the float32
    number ``value``: what a header stores for it. Readers take ``float32(x)`` of what they read."""
    v32 = np.float32(value)
    short = float(str(v32))
    return short if np.float32(short) == v32 else float(v32)


def apply_affine(codebook: np.ndarray, affine: tuple[float, float] | None) -> np.ndarray:
    """``float32(float32(a · C) + b)`` on a float32 codebook (each step one IEEE float32 operation), or ``C`` itself
    without a correction. Overflow gives ``inf`` (callers check)."""
    if affine is None:
        return codebook
    a, b = np.float32(affine[0]), np.float32(affine[1])
    with np.errstate(over="ignore", invalid="ignore"):
        return np.add(np.multiply(codebook, a, dtype=np.float32), b, dtype=np.float32)


def codebook_from_int(
    codebook_int: np.ndarray, lattice: str, n: int, step: float, affine: tuple[float, float] | None = None
) -> np.ndarray:
    """Float32 codewords from integer lattice coordinates, exactly as the quantizer makes them (a format rule:
    ``float32(from_int(c) · (scale·Δ))``, the product taken in float64 and rounded once), then, with ``affine =
    (a, b)``, ``float32(float32(a · p) + b)`` (:func:`apply_affine`).

    Raises:
        ValueError: the integers are no points of the lattice (``Lattice.from_int``).
    """
    lat = get_lattice(lattice, n)
    return apply_affine((lat.from_int(np.asarray(codebook_int)) * lattice_factor(lat, step)).astype(np.float32), affine)


def on_lattice(
    codebook: np.ndarray,
    codebook_int: np.ndarray | None,
    lattice: str,
    n: int,
    step: float,
    affine: tuple[float, float] | None = None,
) -> bool:
    """Whether ``codebook`` is still exactly the lattice points ``codebook_int`` (not fine-tuned), or with
    ``affine``, exactly those points under that correction.

    The rule is bit-exact equality of the float32 words with :func:`codebook_from_int`: a file that stores the
    integers instead of the floats then loads the same bits. (Value equality would call ``-0.0`` equal to ``0.0``,
    and a weight decoded from the integers could then differ from the saved one in the sign of a zero.)
    """
    if codebook_int is None:
        return False
    ci = np.asarray(codebook_int)
    cb = np.asarray(codebook)
    if ci.dtype.kind not in "iu" or cb.dtype != np.float32 or ci.shape != cb.shape:
        return False
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            rebuilt = codebook_from_int(ci, lattice, n, step, affine)
    except ValueError:  # not lattice points
        return False
    return bool(np.array_equal(rebuilt.view(np.uint32), np.ascontiguousarray(cb).view(np.uint32)))


def entropy_from_counts(counts: np.ndarray) -> float:
    """Order-0 entropy in bits of a histogram (zero counts ignored; 0 for an empty one)."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__ would compare arrays element-wise and raise
class CompressedWeight:
    """One compressed weight (see the module docstring for the decode it defines).

    Build it with the codebook, or with ``codebook=None`` and ``codebook_int`` (the codebook is then computed by
    :func:`codebook_from_int`). When both are given, ``codebook_int`` must rebuild ``codebook`` bit for bit
    (:func:`on_lattice`): a record holds the integers only while they describe its codebook.

    Attributes:
        indices: integer ``(num_vectors,)``, values in ``[0, K)`` (any integer dtype; kept as given).
        codebook: float32 ``(K, n)``.
        shape: the decoded weight's shape.
        lattice, n: the lattice (normalised: ``"Z"``, ``"A2"``, ``"D4"``, ``"E8"`` and its dimension).
        step: Δ, finite and > 0.
        key: the uint64 dither key (:func:`weight_key`), or ``None``: no dither.
        zero_index: the index whose vectors decode to exactly 0 (pruned weights), or ``None``.
        codebook_int: int64 ``(K, n)`` integer lattice coordinates of the codebook, or ``None`` once it is not on
            the lattice.
        affine: ``(a, b)``, float32 numbers: the codebook is the points ``codebook_int`` under the affine correction
            ``float32(float32(a · p) + b)`` (:func:`codebook_from_int`); needs ``codebook_int``. ``None``: none.

    Raises:
        ConfigError: on any inconsistent field (shapes, dtypes, ranges, an unknown lattice, a step that is not
            finite and positive, integers that are no lattice points or overflow float32 once scaled).
    """

    indices: np.ndarray
    codebook: np.ndarray | None
    shape: tuple[int, ...]
    lattice: str
    n: int
    step: float
    key: int | None
    zero_index: int | None = None
    codebook_int: np.ndarray | None = field(default=None)
    affine: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        def set_(name, value):  # frozen: normalised values go in through object.__setattr__
            object.__setattr__(self, name, value)

        lat = get_lattice(self.lattice, self.n)
        set_("lattice", lat.name)
        set_("n", lat.dim)
        shape = tuple(self.shape)
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ConfigError(f"shape must be non-negative integers, got {shape}")
        set_("shape", tuple(int(d) for d in shape))
        step = self.step
        if isinstance(step, bool) or not isinstance(step, (int, float, np.floating, np.integer)):
            raise ConfigError(f"step must be a number, got {step!r}")
        if not (math.isfinite(float(step)) and float(step) > 0):
            raise ConfigError(f"step must be finite and > 0, got {step!r}")
        set_("step", float(step))
        if self.key is not None:
            if isinstance(self.key, bool) or not isinstance(self.key, (int, np.integer)) or not 0 <= self.key < 2**64:
                raise ConfigError(f"the dither key must be a uint64 or None, got {self.key!r}")
            set_("key", int(self.key))
        if self.codebook_int is not None:
            ci = np.asarray(self.codebook_int)
            if ci.dtype.kind not in "iu" or ci.ndim != 2 or ci.shape[1] != lat.dim:
                raise ConfigError(f"codebook_int must be an integer (K, {lat.dim}) array, got {ci.dtype} {ci.shape}")
            set_("codebook_int", ci.astype(np.int64, copy=False))
        set_("affine", check_affine(self.affine))
        if self.affine is not None and self.codebook_int is None:
            raise ConfigError("an affine correction needs the integer lattice points (codebook_int)")
        if self.codebook is None:
            if self.codebook_int is None:
                raise ConfigError("a compressed weight needs its codebook or its integer lattice coordinates")
            try:
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
                    codebook = codebook_from_int(self.codebook_int, lat.name, lat.dim, self.step, self.affine)
            except ValueError as exc:
                raise ConfigError(f"codebook_int: {exc}") from None
            if not np.isfinite(codebook).all():  # huge coordinates times a huge step (or a): no float32 weight
                raise ConfigError("the integer codebook times the step (and the affine correction) overflows float32")
            set_("codebook", codebook)
        else:
            cb = np.asarray(self.codebook)
            if cb.dtype.kind != "f" or cb.ndim != 2 or cb.shape[1] != lat.dim:
                raise ConfigError(f"codebook must be a float (K, {lat.dim}) array, got {cb.dtype} {cb.shape}")
            set_("codebook", cb.astype(np.float32, copy=False))
            if self.codebook_int is not None and not on_lattice(
                self.codebook, self.codebook_int, lat.name, lat.dim, self.step, self.affine
            ):
                raise ConfigError("codebook_int does not rebuild the codebook bit for bit (drop it once fine-tuned)")
        k = self.codebook.shape[0]
        indices = np.asarray(self.indices)
        if indices.dtype.kind not in "iu" or indices.ndim != 1:
            raise ConfigError(f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
        if indices.shape[0] != self.num_vectors:
            raise ConfigError(
                f"indices must be a vector of ceil({self.numel}/{lat.dim}) = {self.num_vectors} entries, "
                f"got {indices.shape[0]}"
            )
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise ConfigError(f"indices outside [0, {k})")
        set_("indices", indices)
        if self.zero_index is not None:
            z = self.zero_index
            if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or not 0 <= z < k:
                raise ConfigError(f"zero_index {z!r} outside the codebook of {k} codewords")
            set_("zero_index", int(z))

    # -- derived facts -------------------------------------------------------------------------------------------

    @property
    def lat(self) -> Lattice:
        """The :class:`~udnc_fx.lattice.Lattice` object."""
        return get_lattice(self.lattice, self.n)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_vectors(self) -> int:
        """``ceil(numel / n)``: the number of indices."""
        return -(-self.numel // self.n)

    @property
    def num_codewords(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def dithered(self) -> bool:
        return self.key is not None

    @property
    def factor(self) -> float:
        """``lattice.scale · Δ`` (float64, :func:`lattice_factor`)."""
        return lattice_factor(self.lat, self.step)

    @property
    def on_lattice(self) -> bool:
        """Whether the codebook is still the quantizer's lattice points (``codebook_int`` is kept only then)."""
        return self.codebook_int is not None

    @cached_property
    def counts(self) -> np.ndarray:
        """How many vectors use each codeword (int64, length K)."""
        return np.bincount(np.asarray(self.indices, dtype=np.intp), minlength=self.num_codewords).astype(np.int64)

    def entropy_bits(self) -> float:
        """Empirical order-0 entropy of the indices in bits per weight (per scalar, not per vector)."""
        return entropy_from_counts(self.counts) / self.n

    # -- the dither and the decode ----------------------------------------------------------------------------------

    def raw_dither(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The raw dither (float64) of vectors ``start .. stop`` (default: all): :func:`raw_dither`."""
        stop = self.num_vectors if stop is None else stop
        return raw_dither(self.key, stop - start, self.lat, start)

    def dither(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``Δ·u`` (float32, ``(stop − start) × n``) exactly as every decoder subtracts it (zeros without a key)."""
        stop = self.num_vectors if stop is None else stop
        return scaled_dither_rows(self.key, stop - start, self.lat, self.factor, start)

    def decode_rows(self, start: int, stop: int, raw: np.ndarray | None = None) -> np.ndarray:
        """Decoded vectors ``start .. stop`` (float32 ``(stop − start) × n``): ``C[k] − Δ·u``, zero index → 0.

        Args:
            raw: the caller's cached raw dither of these rows (:meth:`raw_dither`), or ``None`` to compute it.
        """
        rows = np.asarray(self.indices[start:stop]).astype(np.intp, copy=False)
        vectors = self.codebook[rows]
        if self.key is not None:
            if raw is None:
                raw = self.raw_dither(start, stop)
            vectors -= scaled_dither(raw, self.factor)
        if self.zero_index is not None:
            vectors[rows == self.zero_index] = 0.0
        return vectors

    def decode(self, *, raw_dither: np.ndarray | None = None, executor=None) -> np.ndarray:
        """The decoded weight, float32 of ``shape``: ``(C[k] − float32(raw·factor)).flatten()[:numel]``.

        Bit-exact with ``DitheredLatticeParam.forward``, the ONNX dequantize subgraph and every earlier decoder.

        Args:
            raw_dither: the caller's cached raw dither of all vectors (``num_vectors × n`` float64), or ``None``.
            executor: an optional ``concurrent.futures`` executor: the rows are then decoded in chunks on it (the
                hash is counter-based, so chunks are independent; NumPy releases the GIL in its loops).
        """
        m, n = self.num_vectors, self.n
        out = np.empty((m, n), dtype=np.float32)
        chunk = max(1, DECODE_CHUNK_ELEMENTS // n)
        bounds = [(v0, min(v0 + chunk, m)) for v0 in range(0, m, chunk)]

        def run(v0: int, v1: int) -> None:
            out[v0:v1] = self.decode_rows(v0, v1, None if raw_dither is None else raw_dither[v0:v1])

        if executor is None or len(bounds) <= 1:
            for v0, v1 in bounds:
                run(v0, v1)
        else:
            for f in [executor.submit(run, v0, v1) for v0, v1 in bounds]:
                f.result()
        return out.reshape(-1)[: self.numel].reshape(self.shape)

"""The tensor table of an exported ONNX file (``udnc.tensors``): one :class:`TensorSpec` per compressed weight,
written by :func:`udnc_fx.export.to_onnx` and validated on reading as strictly as the ``.udnc`` container's header."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dither import DITHER_ID
from ..errors import ConfigError, FormatError
from ..lattice import get_lattice
from ..record import CompressedWeight, check_affine, index_dtype, lattice_factor

__all__ = ["TensorSpec", "tensors_json", "NAME_PREFIX", "MAX_ELEMENTS"]

#: Names of everything the exporter adds start with this; each weight's subgraph with ``udnc/<fqn>/``.
NAME_PREFIX = "udnc/"
#: Bounds of one tensor table entry: ``to_onnx`` refuses a weight of 2**31 elements or more (one ONNX subgraph).
MAX_ELEMENTS = 2**31
_INDEX_CAPACITY = {"uint8": 2**8, "int16": 2**15, "int32": 2**31 - 1}
_HEX = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class TensorSpec:
    """One compressed weight as the ONNX file records it (an entry of ``udnc.tensors``).

    Attributes:
        fqn: the parameter's qualified name (``"conv1.weight"``).
        aliases: other names of the same (tied) parameter.
        output: the graph value the dequantize subgraph produces (the weight's initializer name before lowering).
        shape: the weight's shape.
        lattice, n, step: the quantizer.
        key: the uint64 dither key, or ``None`` (no dither).
        num_vectors: ``ceil(numel / n)``, the number of indices.
        num_codewords: ``K``.
        index_dtype: ``"uint8"``, ``"int16"`` or ``"int32"``.
        zero_index: the index that decodes to exact 0, or ``None``.
        indices, codebook: graph names of the index and float32 codebook tensors (initializers, or graph inputs
            filled from the sidecar; the codebook is computed by the graph when ``codebook_int`` is set).
        prefix: the name prefix of this weight's nodes and private initializers.
        codebook_int: in a self-contained file, the initializer of the codewords' integer lattice coordinates
            (int8/int16/int32, ``K × n``) the graph rebuilds ``codebook`` from, exactly as the quantizer made it;
            ``None`` when the codebook is stored as float32 (fine-tuned codewords) or comes from the sidecar.
        affine: ``(a, b)`` when the codebook is the integer points under the per-layer affine correction
            (:func:`udnc_fx.record.codebook_from_int`: the graph adds a ``Mul`` by ``a`` and an ``Add`` of ``b``),
            else ``None``. In the JSON it is ``"affine": {"a", "b", "codebook_int"}`` with the top-level
            ``codebook_int`` null, so a reader that does not know the correction finds no integer codebook to
            rebuild wrongly (and a sidecar that holds the correction is a format 1.3 file older readers refuse).
    """

    fqn: str
    aliases: tuple[str, ...]
    output: str
    shape: tuple[int, ...]
    lattice: str
    n: int
    step: float
    key: int | None
    num_vectors: int
    num_codewords: int
    index_dtype: str
    zero_index: int | None
    indices: str
    codebook: str
    prefix: str
    codebook_int: str | None = None
    affine: tuple[float, float] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def factor(self) -> float:
        """``lattice.scale * step`` (float64): raw dither → weight units (:func:`udnc_fx.record.lattice_factor`)."""
        return lattice_factor(get_lattice(self.lattice, self.n), self.step)

    @classmethod
    def from_record(
        cls, record: CompressedWeight, *, fqn: str, aliases: tuple[str, ...] = (), output: str, prefix: str
    ) -> TensorSpec:
        """The entry of ``record`` whose dequantize subgraph (names under ``prefix``) produces ``output``; its
        indices take the narrowest dtype for the codebook (:func:`udnc_fx.record.index_dtype`), its index and
        codebook tensors are named ``<prefix>indices`` and ``<prefix>codebook``."""
        return cls(
            fqn=fqn,
            aliases=tuple(aliases),
            output=output,
            shape=record.shape,
            lattice=record.lattice,
            n=record.n,
            step=record.step,
            key=record.key,
            num_vectors=record.num_vectors,
            num_codewords=record.num_codewords,
            index_dtype=index_dtype(record.num_codewords).name,
            zero_index=record.zero_index,
            indices=prefix + "indices",
            codebook=prefix + "codebook",
            prefix=prefix,
            affine=record.affine,
        )

    def record(
        self, indices: np.ndarray, codebook: np.ndarray | None, codebook_int: np.ndarray | None = None
    ) -> CompressedWeight:
        """The compressed weight this entry describes, with its ``indices`` and float32 ``codebook`` (or, with
        ``codebook=None``, the integer lattice coordinates ``codebook_int`` it is rebuilt from).

        Raises:
            ConfigError: arrays that do not fit the entry (shapes, dtypes, index range, no lattice points).
        """
        return CompressedWeight(
            indices=np.asarray(indices), codebook=codebook, codebook_int=codebook_int, shape=self.shape,
            lattice=self.lattice, n=self.n, step=self.step, key=self.key, zero_index=self.zero_index,
            affine=self.affine if codebook_int is not None else None,  # a float codebook is already corrected
        )

    def to_json(self) -> dict:
        out = self._plain_json()
        if self.affine is not None:
            out["affine"] = {"a": self.affine[0], "b": self.affine[1], "codebook_int": out["codebook_int"]}
            out["codebook_int"] = None
        return out

    def _plain_json(self) -> dict:
        return {
            "fqn": self.fqn,
            "aliases": list(self.aliases),
            "output": self.output,
            "shape": list(self.shape),
            "lattice": self.lattice,
            "n": self.n,
            "step": self.step,
            "key": None if self.key is None else f"{self.key:016x}",
            "dither": DITHER_ID,
            "num_vectors": self.num_vectors,
            "num_codewords": self.num_codewords,
            "index_dtype": self.index_dtype,
            "zero_index": self.zero_index,
            "indices": self.indices,
            "codebook": self.codebook,
            "prefix": self.prefix,
            "codebook_int": self.codebook_int,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> TensorSpec:
        """Parse and validate one ``udnc.tensors`` entry, as strictly as the container's header.

        Raises:
            FormatError: ``unsupported_version`` (an unknown dither generator) or ``bad_header`` (a missing or
                mistyped field, a non-finite or non-positive step, an unknown lattice, a bad shape, sizes that
                disagree or exceed :data:`MAX_ELEMENTS`).
        """

        def bad(message: str) -> FormatError:
            return FormatError("bad_header", f"{where}: {message}")

        if not isinstance(obj, dict):
            raise bad(f"a tensor entry must be an object, got {type(obj).__name__}")

        def get(key: str, types, nullable: bool = False):
            if key not in obj:
                raise bad(f"missing {key!r}")
            value = obj[key]
            if value is None and nullable:
                return None
            if isinstance(value, bool) or not isinstance(value, types):
                raise bad(f"{key!r} has the wrong type ({type(value).__name__})")
            return value

        dither = obj.get("dither", DITHER_ID)
        if dither != DITHER_ID:
            raise FormatError("unsupported_version", f"{where}: unknown dither generator {str(dither)[:40]!r}")
        names = {k: get(k, str) for k in ("fqn", "output", "lattice", "index_dtype", "indices", "codebook", "prefix")}
        aliases = get("aliases", list)
        if not all(isinstance(a, str) for a in aliases):
            raise bad("'aliases' must be a list of strings")
        shape = get("shape", list)
        if len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad(f"bad shape {str(shape)[:60]}")
        n, num_vectors, num_codewords = get("n", int), get("num_vectors", int), get("num_codewords", int)
        step = get("step", (int, float))
        try:
            step = float(step)
        except OverflowError:  # an integer beyond float range
            step = math.inf
        if not math.isfinite(step) or step <= 0:
            raise bad(f"step must be finite and positive, got {step!r}")
        key = get("key", str, nullable=True)
        if key is not None and not _HEX.fullmatch(key):
            raise bad(f"key must be 16 lower-case hex digits, got {key[:20]!r}")
        zero_index = get("zero_index", int, nullable=True)
        codebook_int = obj.get("codebook_int")
        if codebook_int is not None and not isinstance(codebook_int, str):
            raise bad("'codebook_int' must be a string or null")
        affine = obj.get("affine")
        if affine is not None:
            if not isinstance(affine, dict) or codebook_int is not None:
                raise bad("'affine' must be an object {a, b, codebook_int} (and the top-level codebook_int null)")
            codebook_int = affine.get("codebook_int")
            if codebook_int is not None and not isinstance(codebook_int, str):
                raise bad("'affine' 'codebook_int' must be a string or null")
            try:
                affine = check_affine((affine.get("a"), affine.get("b")))
            except (ConfigError, OverflowError) as exc:
                raise bad(f"affine: {exc}") from None
        try:
            lat = get_lattice(names["lattice"], n)
        except (ConfigError, ValueError, TypeError) as exc:
            raise bad(f"lattice {names['lattice'][:20]!r}, n={n}: {exc}") from None
        if lat.name != names["lattice"] or lat.dim != n:
            raise bad(f"lattice {names['lattice'][:20]!r} with n={n} is not a lattice this version knows")
        numel = 1
        for d in shape:
            numel *= d
            if numel > MAX_ELEMENTS:
                raise bad(f"shape {shape} has more than {MAX_ELEMENTS} elements")
        if num_vectors != -(-numel // n) or num_vectors * n > MAX_ELEMENTS:
            raise bad(f"num_vectors {num_vectors} does not match shape {shape} and n={n}")
        dtype = names["index_dtype"]
        if dtype not in _INDEX_CAPACITY:
            raise bad(f"index dtype {dtype[:20]!r}")
        if not 1 <= num_codewords <= _INDEX_CAPACITY[dtype] or num_codewords * n > MAX_ELEMENTS:
            raise bad(f"num_codewords {num_codewords} is out of range for {dtype} indices")
        if zero_index is not None and not 0 <= zero_index < num_codewords:
            raise bad(f"zero_index {zero_index} outside [0, {num_codewords})")
        if not names["prefix"].startswith(NAME_PREFIX):
            raise bad(f"prefix {names['prefix'][:40]!r} does not start with {NAME_PREFIX!r}")
        return cls(
            fqn=names["fqn"], aliases=tuple(aliases), output=names["output"], shape=tuple(shape),
            lattice=names["lattice"], n=n, step=float(step), key=None if key is None else int(key, 16),
            num_vectors=num_vectors, num_codewords=num_codewords, index_dtype=dtype, zero_index=zero_index,
            indices=names["indices"], codebook=names["codebook"], prefix=names["prefix"], codebook_int=codebook_int,
            affine=affine,
        )


def tensors_json(specs: list[TensorSpec]) -> str:
    return json.dumps([s.to_json() for s in specs], sort_keys=True, separators=(",", ":"))



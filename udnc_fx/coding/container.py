"""The ``.udnc`` container: compressed tensors, raw tensors and the config in one checksummed file.

NumPy only (no torch), so a deployment can decode a model without PyTorch. The byte-level specification is
``docs/FORMAT.md``; this module is its reference implementation. In short::

    magic(8) | major u16 | minor u16 | header length u32 | payload length u64 | payload SHA-256 (32)
    | header SHA-256 (32) | compact JSON header | payload (index streams, codebooks, raw tensors, back to back)

The header is kept small because on small models it is a visible part of the file: writers omit every key that
holds its default, section offsets are never stored (sections are contiguous, in entry order) and lengths only
where they cannot be derived (coded streams). :func:`read_header` gives the header back *resolved*: defaults,
offsets and lengths filled in, so callers never need to know the defaults.

Reading never unpickles and never trusts a number from the file before checking it: every failure raises
:class:`~udnc_fx.errors.FormatError` with a ``kind`` (``bad_magic``, ``unsupported_version``, ``truncated``,
``bad_header``, ``bad_offsets``, ``checksum_mismatch``, ``bad_value``, ``unknown_codec``), and nothing else.

Example:
    >>> c = Container(quantized=[QuantizedTensor(...)], raw=[RawTensor("fc.bias", bias)], config={}, metadata={})
    >>> write_container("model.udnc", c)          # atomic, deterministic
    >>> read_container("model.udnc").quantized[0].indices
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from udnc_fx.coding.limits import (
    DEFAULT_MAX_HEADER_LENGTH,
    MAX_HEADER_LENGTH,
    max_codebook_alphabet,
    max_index_alphabet,
)
from udnc_fx.coding.tempfiles import fsync_dir, remove_stale_temps, write_temp
from udnc_fx.coding import lattice_coords as _lc
from udnc_fx.coding.coders import decode_stream, encode_stream
from udnc_fx.errors import FormatError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "PREAMBLE_SIZE",
    "MAX_HEADER_LENGTH",
    "DEFAULT_MAX_HEADER_LENGTH",
    "DEFAULT_MAX_ELEMENTS",
    "LATTICE_DIMENSIONS",
    "DEFAULT_CODER",
    "FORMAT_DEFAULT_CODER",
    "FORMAT_DEFAULT_CODEBOOK_CODER",
    "FORMAT_DEFAULT_DITHER",
    "derived_key",
    "QuantizedTensor",
    "RawTensor",
    "Container",
    "encode_container",
    "write_container",
    "decode_container",
    "read_container",
    "read_header",
    "section_sizes",
]

MAGIC = b"\x89UDNC\r\n\x1a"
FORMAT_VERSION = (1, 2)  # (major, minor): the newest this module writes and reads
#: Coders that need minor version 1 (dither-conditioned streams). A file using none of them is written as 1.0, the
#: lowest version that reads it, so 1.0 readers keep reading what they can.
_CODERS_SINCE_MINOR_1 = frozenset({"ans-dither-v1"})
#: Codebook encodings that need minor version 2 (a file using one is written as 1.2; otherwise as above).
_ENCODINGS_SINCE_MINOR_2 = frozenset({_lc.ENCODING})
# magic, major, minor, header length H, payload length P, payload SHA-256, header SHA-256
_DIGESTED = struct.Struct("<8sHHIQ32s")  # everything before the header digest, which covers it
_PREAMBLE = struct.Struct("<8sHHIQ32s32s")
PREAMBLE_SIZE = _PREAMBLE.size  # 88
_DIGESTED_PREAMBLE = _DIGESTED.size  # 56
#: Default cap on the elements a container may decode to (all tensors and codebooks together). An entropy-coded
#: stream can be far smaller than what it decodes to, so the file's length alone cannot bound the allocation.
DEFAULT_MAX_ELEMENTS = 1 << 32
_MAX_NDIM = 32

#: Lattice name -> the dimensions it exists in (the first is the default of an omitted ``n``).
LATTICE_DIMENSIONS: dict[str, tuple[int, ...]] = {"Z": tuple(range(1, 9)), "A2": (2,), "D4": (4,), "E8": (8,)}

#: What an omitted ``coder`` means for index streams. Part of the format: it never changes within major version 1,
#: whatever the registry's default becomes.
FORMAT_DEFAULT_CODER = "range-context-v1"
#: What an omitted ``coder`` means for ``lattice-int-coded`` codebooks (short streams without row structure).
FORMAT_DEFAULT_CODEBOOK_CODER = "range-adaptive-v1"
#: What an omitted ``dither`` means.
FORMAT_DEFAULT_DITHER = "udnc-hash32-v1"
_NO_DITHER = "none"
_MAX_SEED = 1 << 64

_RAW_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in [
        ("float16", "<f2"), ("float32", "<f4"), ("float64", "<f8"),
        ("int8", "i1"), ("int16", "<i2"), ("int32", "<i4"), ("int64", "<i8"),
        ("uint8", "u1"), ("uint16", "<u2"), ("uint32", "<u4"), ("uint64", "<u8"),
        ("bool", "?"),
    ]
}
_DEFAULT_RAW_DTYPE = "float32"
_DEFAULT_LATTICE = "Z"
_DEFAULT_CODEBOOK_ENCODING = "f32"
_CODEBOOK_FLOAT_ENCODINGS = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2")}
_LATTICE_INT = "lattice-int"
_LATTICE_INT_CODED = "lattice-int-coded"
_INT_WIDTHS = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_MAX_CODED_ALPHABET = 1 << 32  # coded codebook symbols; keeps their inverse transform inside int64
_HEX = frozenset("0123456789abcdef")

try:  # the coder registry is written alongside; fall back to its announced default until it lands
    from udnc_fx.coding.coders import DEFAULT_CODER  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - only while coders.py does not exist
    DEFAULT_CODER = "range-adaptive-v1"


# ---------------------------------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)  # eq=False: a generated __eq__ would compare arrays element-wise and raise
class QuantizedTensor:
    """One compressed weight: lattice-quantizer parameters, codeword indices and codebook.

    Attributes:
        fqn: the parameter's qualified name, e.g. ``"conv1.weight"``.
        shape: the weight's shape.
        lattice: ``"Z"``, ``"A2"``, ``"D4"`` or ``"E8"``.
        n: the lattice dimension (the vector length).
        step: the quantizer step Δ (float64, stored bit-exact).
        key: the per-tensor dither key, an unsigned 64-bit integer.
        dither: the dither generator's id, e.g. ``"udnc-hash32-v1"``.
        indices: ``ceil(numel / n)`` integers in ``[0, K)``. Read back as the narrowest unsigned dtype holding K.
        codebook: float32 ``(K, n)``; ``None`` when read from a ``lattice-int`` codebook.
        codebook_int: optional int64 ``(K, n)`` integer lattice coordinates (``docs/FORMAT.md``, *Lattices*: D4
            rows have an even sum, E8 rows are twice a point: one parity, sum divisible by 4). When given, the
            writer stores these (entropy-coded when that is smaller) instead of ``codebook`` and the reader returns
            them with ``codebook=None``; the caller rebuilds the floats. The writer checks that every row is a
            lattice point but cannot check that ``codebook`` still equals them (it does not know the lattice's
            generator), so pass them only for codebooks that were not fine-tuned.
        coder: the index coder's registered name.
        zero_index: the index that decodes to exactly 0 whatever the dither (pruned weights), or ``None``.
        meta: JSON-able per-tensor facts (e.g. ``sqnr_db``), stored in the header.
    """

    fqn: str
    shape: tuple[int, ...]
    lattice: str
    n: int
    step: float
    key: int
    dither: str
    indices: np.ndarray
    codebook: np.ndarray | None
    codebook_int: np.ndarray | None = None
    coder: str = DEFAULT_CODER
    zero_index: int | None = None
    meta: dict = field(default_factory=dict)


@dataclass(eq=False)
class RawTensor:
    """A tensor stored uncompressed (biases, normalisation parameters, buffers)."""

    name: str
    array: np.ndarray


@dataclass(eq=False)
class Container:
    """Everything a ``.udnc`` file holds. ``config`` and ``metadata`` are JSON objects (tuples come back as lists)."""

    quantized: list[QuantizedTensor] = field(default_factory=list)
    raw: list[RawTensor] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    #: The seed the dither keys were derived from (``derived_key``); entries whose key is the derived one do not
    #: store it. Any other key is stored, so this only shortens the header: a wrong seed costs bytes, never data.
    seed: int = 0



# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _get_coder(name: str):
    """Looks a coder up in the registry; any failure (unknown name, registry missing) is ``unknown_codec``."""
    try:
        from udnc_fx.coding.coders import get_coder
    except ImportError as exc:
        raise FormatError("unknown_codec", f"coder {name!r}: the coder registry is unavailable ({exc})") from exc
    try:
        coder = get_coder(name)
    except FormatError as exc:
        if exc.kind == "unknown_codec":
            raise
        raise FormatError("unknown_codec", f"unknown coder {name!r}") from exc
    except Exception as exc:  # the registry's own error type is its business: to us the codec is unknown
        raise FormatError("unknown_codec", f"unknown coder {name!r}") from exc
    if coder is None:
        raise FormatError("unknown_codec", f"unknown coder {name!r}")
    return coder


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(entries: list, desc: str, progress: bool | None):
    """A terminal-only bar over the weights of ``entries`` (tqdm is imported only when one is drawn)."""
    from udnc_fx.progress import progress_enabled

    if not entries or not progress_enabled(progress):
        return _NoBar()
    from udnc_fx.progress import progress_bar

    total = 0
    for e in entries:
        count = getattr(e, "count", None)
        total += int(np.size(getattr(e, "indices", ())) if count is None else count) * int(getattr(e, "n", 1) or 1)
    return progress_bar(total=total or None, desc=desc, unit="w", unit_scale=True, progress=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def derived_key(seed: int, fqn: str) -> int:
    """The dither key of tensor ``fqn`` under ``seed`` (docs/FORMAT.md, *Per-tensor key*; the same as
    ``udnc_fx.dither.tensor_key``): ``blake2b(b"udnc-key-v1\\0" || u64le(seed) || utf8(fqn), digest_size=8)`` as a
    little-endian u64. What an omitted ``key`` means for a dithered tensor."""
    digest = hashlib.blake2b(
        b"udnc-key-v1\0" + int(seed).to_bytes(8, "little") + fqn.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


def _default_key(seed: int, fqn: str, dither: str) -> int:
    return 0 if dither == _NO_DITHER else derived_key(seed, fqn)


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    ).encode("utf-8")


def _check_json_object(value: Any, what: str) -> None:
    """Writer-side: ``value`` must be a JSON object with string keys everywhere, and serialisable."""
    if not isinstance(value, dict):
        raise FormatError("bad_value", f"{what} must be a dict, got {type(value).__name__}")
    try:  # first, so that a circular structure is refused before the walk below
        _canonical_json(value)
    except Exception as exc:  # TypeError, ValueError (NaN, circular), RecursionError
        raise FormatError("bad_value", f"{what} is not JSON-serialisable: {exc}") from exc
    # json.dumps turns int keys into strings, which would not round-trip: refuse them.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    raise FormatError("bad_value", f"{what}: JSON object keys must be strings, got {k!r}")
                stack.append(v)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _prod(dims: list[int] | tuple[int, ...], limit: int) -> int:
    """Product of ``dims``, stopping (returning ``limit + 1``) as soon as it exceeds ``limit``."""
    total = 1
    for d in dims:
        total *= d
        if total > limit:
            return limit + 1 if all(x != 0 for x in dims) else 0
    return total


def _narrow_index_dtype(alphabet_size: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if alphabet_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _default_n(lattice: str) -> int:
    return LATTICE_DIMENSIONS[lattice][0]


# ---------------------------------------------------------------------------------------------------------------
# Integer codebooks: lattice membership and the symbol stream of "lattice-int-coded"
# ---------------------------------------------------------------------------------------------------------------

#: Symbols per codebook row in "lattice-int-coded" (E8 adds the row's parity).
_CODED_ROW_SYMBOLS = {"Z": None, "A2": 2, "D4": 4, "E8": 9}


def _non_members(lattice: str, c: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of int64 ``c`` that are not integer coordinates of a ``lattice`` point.

    Works on residues (``& 1``, ``& 3``), so it cannot overflow whatever the values.
    """
    if lattice == "D4":
        return (np.sum(c & 1, axis=1) & 1) != 0
    if lattice == "E8":  # twice a point: every coordinate of one parity, sum divisible by 4
        parity = c & 1
        return np.any(parity != parity[:, :1], axis=1) | ((np.sum(c & 3, axis=1) & 3) != 0)
    return np.zeros(c.shape[0], dtype=bool)


# The symbol rows are those of lattice-coords (one row per distinct point here, one per vector there).
_codebook_symbols = _lc.point_symbols
_codebook_from_symbols = _lc.points_from_symbols


def _coded_row_symbols(lattice: str, n: int) -> int:
    return _CODED_ROW_SYMBOLS[lattice] or n


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise FormatError("bad_value", f"{what} must be an integer, got {value!r}")
    return int(value)


def _stream_context(coder: Any, key: int, dither: str, count: int, n: int) -> dict:
    """``{"context": dither codes}`` for coders that condition on the dither (docs/FORMAT.md, *Dither context*);
    ``{}`` for other coders and for tensors without the hash dither."""
    if not getattr(coder, "accepts_context", False) or dither != FORMAT_DEFAULT_DITHER:
        return {}
    from udnc_fx.coding.ans import dither_codes

    # A function, not the codes: a decoder hashes the dither only for streams that use it.
    return {"context": lambda: dither_codes(key, count, n)}


def _encode_stream(
    coder_name: str, symbols: np.ndarray, alphabet_size: int, what: str, row_length: int | None = None,
    dither: tuple[int, str, int] | None = None,
) -> bytes:
    """Code a stream; ``row_length`` (symbols per row of the weight) is handed to coders that model rows, the
    dither ``(key, generator id, n)`` to coders that condition on it."""
    coder = _get_coder(coder_name)
    hint = {"row_length": row_length} if row_length and getattr(coder, "accepts_row_length", False) else {}
    if dither is not None:
        hint.update(_stream_context(coder, dither[0], dither[1], len(symbols), dither[2]))
    return encode_stream(coder, symbols, alphabet_size, what, **hint)


def _row_length(shape: list[int], n: int, count: int) -> int | None:
    """Index symbols per row of the weight (elements per output unit over ``n``): the hint for row-modelling coders."""
    if len(shape) < 2 or shape[0] < 2 or count < 2:
        return None
    per_row = max(1, count // shape[0])
    return per_row if per_row < count else None


def _encode_int_codebook(q: QuantizedTensor, n: int, where: str) -> tuple[int, dict, bytes]:
    """``lattice-int`` (fixed width) or ``lattice-int-coded``, whichever makes the smaller file."""
    cb_int = np.asarray(q.codebook_int)
    if cb_int.dtype.kind not in "iu" or cb_int.ndim != 2 or cb_int.shape[1] != n:
        raise FormatError("bad_value", f"{where}: codebook_int must be an integer (K, {n}) array")
    if cb_int.dtype.kind == "u" and cb_int.size and int(cb_int.max()) > np.iinfo(np.int64).max:
        raise FormatError("bad_value", f"{where}: codebook_int values must fit in int64")
    c = cb_int.astype(np.int64)
    bad = _non_members(q.lattice, c)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise FormatError("bad_value", f"{where}: codebook_int row {row} {c[row].tolist()} is not a {q.lattice} point")
    alphabet_size = c.shape[0]
    z = _lc.zigzag_encode(c)
    zmax = int(z.max()) if z.size else 0
    width = next(w for w in (1, 2, 4, 8) if zmax < 1 << (8 * w))
    best = ({"encoding": _LATTICE_INT, "width": width}, z.astype(_INT_WIDTHS[width]).tobytes())
    if c.size and -(1 << 40) < int(c.min()) and int(c.max()) < 1 << 40:
        symbols = _codebook_symbols(q.lattice, c)
        symbol_alphabet = int(symbols.max()) + 1
        # An adaptive coder's model grows with its alphabet: past 2^16 symbols, and more than the stream holds,
        # coding costs memory and time for next to no gain over the fixed width (its symbols are all but unique).
        limit = min(
            _MAX_CODED_ALPHABET,
            getattr(_get_coder(FORMAT_DEFAULT_CODEBOOK_CODER), "max_alphabet_size", 0),
            max(1 << 16, symbols.size),
        )
        if symbol_alphabet <= limit:
            data = _encode_stream(FORMAT_DEFAULT_CODEBOOK_CODER, symbols.ravel(), symbol_alphabet, f"{where} codebook")
            coded = {"encoding": _LATTICE_INT_CODED, "alphabet_size": symbol_alphabet, "length": len(data)}

            def cost(candidate: tuple[dict, bytes]) -> int:
                return len(candidate[1]) + len(_canonical_json(_compact_codebook(candidate[0])))

            if cost((coded, data)) < cost(best):  # ties keep the fixed width: no coder needed to read it
                best = (coded, data)
    return alphabet_size, dict(best[0]), best[1]


def _encode_quantized(q: QuantizedTensor, codebook_float_dtype: str, max_elements: int) -> tuple[dict, bytes, bytes]:
    """Checks ``q``; returns its header entry in resolved form (every key present) and its two sections."""
    where = f"quantized tensor {getattr(q, 'fqn', '?')!r}"
    if not isinstance(q, QuantizedTensor):
        raise FormatError("bad_value", f"expected QuantizedTensor, got {type(q).__name__}")
    if not isinstance(q.fqn, str) or not q.fqn:
        raise FormatError("bad_value", f"{where}: fqn must be a non-empty string")
    shape = [_as_int(d, f"{where}: shape entry") for d in q.shape]
    if any(d < 0 for d in shape) or len(shape) > _MAX_NDIM:
        raise FormatError("bad_value", f"{where}: bad shape {tuple(q.shape)}")
    if q.lattice not in LATTICE_DIMENSIONS:
        raise FormatError("bad_value", f"{where}: unknown lattice {q.lattice!r}")
    n = _as_int(q.n, f"{where}: n")
    if n not in LATTICE_DIMENSIONS[q.lattice]:
        raise FormatError("bad_value", f"{where}: lattice {q.lattice} has no dimension {n}")
    try:
        step = float(q.step)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FormatError("bad_value", f"{where}: step must be a float, got {q.step!r}") from exc
    if not (math.isfinite(step) and step > 0):
        raise FormatError("bad_value", f"{where}: step must be finite and > 0, got {step!r}")
    key = _as_int(q.key, f"{where}: key")
    if not 0 <= key < 1 << 64:
        raise FormatError("bad_value", f"{where}: key must fit in 64 unsigned bits, got {key}")
    if not isinstance(q.dither, str) or not q.dither:
        raise FormatError("bad_value", f"{where}: dither must be a non-empty string")
    if not isinstance(q.coder, str) or not q.coder:
        raise FormatError("unknown_codec", f"{where}: coder must be a non-empty string")

    numel = _prod(shape, max_elements)
    if numel > max_elements:
        raise FormatError("bad_value", f"{where}: {tuple(shape)} has more than {max_elements} elements")
    count = -(-numel // n)

    # Codebook.
    if q.codebook_int is not None:
        alphabet_size, codebook_entry, codebook_bytes = _encode_int_codebook(q, n, where)
    else:
        if q.codebook is None:
            raise FormatError("bad_value", f"{where}: needs a codebook or codebook_int")
        cb = np.asarray(q.codebook)
        if cb.dtype.kind != "f" or cb.ndim != 2 or cb.shape[1] != n:
            raise FormatError(
                "bad_value", f"{where}: codebook must be a float (K, {n}) array, got {cb.dtype} {cb.shape}"
            )
        cb32 = cb.astype(np.float32)
        if cb.dtype != np.float32 and not np.array_equal(cb32.astype(cb.dtype), cb, equal_nan=True):
            raise FormatError("bad_value", f"{where}: {cb.dtype} codebook is not exactly representable in float32")
        alphabet_size = cb.shape[0]
        encoding = "f16" if codebook_float_dtype == "float16" else "f32"
        with np.errstate(over="ignore"):  # overflow is detected just below, with a better message
            stored = cb32.astype(_CODEBOOK_FLOAT_ENCODINGS[encoding])
        if encoding == "f16" and not np.array_equal(np.isfinite(stored), np.isfinite(cb32)):
            raise FormatError("bad_value", f"{where}: codebook overflows float16")
        codebook_bytes = stored.tobytes()
        codebook_entry = {"encoding": encoding, "length": len(codebook_bytes)}
    if alphabet_size < 1:
        raise FormatError("bad_value", f"{where}: the codebook is empty (K = 0)")
    if alphabet_size > max_index_alphabet(count):
        raise FormatError(
            "bad_value", f"{where}: {alphabet_size} codewords for {count} indices (at most {max_index_alphabet(count)})"
        )
    if numel + alphabet_size * n > max_elements:
        raise FormatError("bad_value", f"{where}: the tensor and its codebook hold more than {max_elements} elements")

    # Indices.
    indices = np.asarray(q.indices)
    if indices.dtype.kind not in "iu" or indices.ndim != 1:
        raise FormatError(
            "bad_value", f"{where}: indices must be a 1-D integer array, got {indices.dtype} {indices.shape}"
        )
    if indices.shape[0] != count:
        raise FormatError(
            "bad_value", f"{where}: {indices.shape[0]} indices for shape {tuple(shape)} and n={n} (need {count})"
        )
    if count and (int(indices.min()) < 0 or int(indices.max()) >= alphabet_size):
        raise FormatError("bad_value", f"{where}: indices outside [0, {alphabet_size})")
    zero_index = None
    if q.zero_index is not None:
        zero_index = _as_int(q.zero_index, f"{where}: zero_index")
        if not 0 <= zero_index < alphabet_size:
            raise FormatError("bad_value", f"{where}: zero_index {zero_index} outside [0, {alphabet_size})")
    _check_json_object(q.meta, f"{where}: meta")
    indices_bytes = _encode_stream(
        q.coder, indices, alphabet_size, where, _row_length(shape, n, count), (key, q.dither, n)
    )

    entry: dict[str, Any] = {
        "fqn": q.fqn,
        "shape": shape,
        "lattice": q.lattice,
        "n": n,
        "step": step,
        "key": f"{key:016x}",
        "dither": q.dither,
        "zero_index": zero_index,
        "meta": q.meta,
        "indices": {"coder": q.coder, "alphabet_size": alphabet_size, "count": count, "length": len(indices_bytes)},
        "codebook": codebook_entry,
    }
    if q.codebook_int is not None:
        coords = _encode_coords(q, indices, zero_index, key, n, where)
        if coords is not None:
            symbol_alphabet, coords_entry, coords_bytes = coords

            def cost(cb: dict, payload: int) -> int:
                return payload + len(_canonical_json(_compact_codebook(cb)))

            # Measured, not guessed: the table of points is dropped only where that makes the file smaller.
            if cost(coords_entry, len(coords_bytes)) < cost(codebook_entry, len(indices_bytes) + len(codebook_bytes)):
                entry["zero_index"] = None
                entry["indices"] = {
                    "coder": q.coder, "alphabet_size": symbol_alphabet, "count": count, "length": len(coords_bytes)
                }
                entry["codebook"] = coords_entry
                return entry, coords_bytes, b""
    return entry, indices_bytes, codebook_bytes


def _encode_coords(
    q: QuantizedTensor, indices: np.ndarray, zero_index: int | None, key: int, n: int, where: str
) -> tuple[int, dict, bytes] | None:
    """The ``lattice-coords`` form of a tensor whose (already validated) ``codebook_int`` holds lattice points:
    ``(symbol alphabet, codebook entry, payload)``, or ``None`` where it cannot represent the tensor (a
    ``zero_index`` that is not the point 0, symbols past the coder's alphabet)."""
    cb_int = np.asarray(q.codebook_int).astype(np.int64)
    exact_zero = zero_index is not None
    if exact_zero:
        if cb_int[zero_index].any():
            return None
        # Only the point 0 may decode to exact zeros, and the reader makes every vector at 0 do so: equal only if
        # no other row is 0 (rows are distinct in a quantizer's codebook, but a caller's need not be).
        if int((~cb_int.any(axis=1)).sum()) != 1:
            return None
    if cb_int.size and (int(cb_int.min()) <= -_lc.MAX_COORDINATE or int(cb_int.max()) >= _lc.MAX_COORDINATE):
        return None  # far outside any quantizer's range; the symbol transforms would overflow
    points = cb_int[np.asarray(indices, dtype=np.intp)]
    # The reader rebuilds indices and codebook in the quantizer's order; use lattice-coords only where that gives
    # back exactly these (a codebook with unused or reordered rows would come back different).
    rebuilt_indices, rebuilt_points, _ = _lc.index_points(points)
    if not (np.array_equal(rebuilt_points, cb_int) and np.array_equal(rebuilt_indices, indices)):
        return None
    coded = _lc.encode_points(
        _get_coder(q.coder), points, q.lattice, n, key, q.dither == FORMAT_DEFAULT_DITHER, f"{where} coordinates"
    )
    if coded is None:
        return None
    alphabet, layout, payload = coded
    cb_entry: dict[str, Any] = {"encoding": _lc.ENCODING, "layout": layout, "exact_zero": exact_zero, "length": 0}
    return alphabet, cb_entry, payload


def _points_bound(entry: dict) -> int:
    """At most how many codebook rows an entry decodes to: K, or for ``lattice-coords`` one per vector."""
    if entry["codebook"]["encoding"] == _lc.ENCODING:
        return entry["indices"]["count"]
    return entry["indices"]["alphabet_size"]


def _encode_raw(r: RawTensor, raw_float_dtype: str) -> tuple[dict, bytes]:
    if not isinstance(r, RawTensor):
        raise FormatError("bad_value", f"expected RawTensor, got {type(r).__name__}")
    where = f"raw tensor {r.name!r}"
    if not isinstance(r.name, str) or not r.name:
        raise FormatError("bad_value", f"{where}: name must be a non-empty string")
    array = np.asarray(r.array)
    if array.ndim > _MAX_NDIM:
        raise FormatError("bad_value", f"{where}: more than {_MAX_NDIM} dimensions")
    name = array.dtype.name if array.dtype.name in _RAW_DTYPES else None
    if name is None or array.dtype.kind not in "fiub":
        raise FormatError("unknown_codec", f"{where}: dtype {array.dtype} cannot be stored")
    entry: dict[str, Any] = {"name": r.name, "shape": list(array.shape)}
    if name == "float32" and raw_float_dtype == "float16":  # flagged once for the file: top-level raw_float16
        with np.errstate(over="ignore"):
            stored = array.astype(_RAW_DTYPES["float16"])
        if not np.array_equal(np.isfinite(stored), np.isfinite(array)):
            raise FormatError("bad_value", f"{where}: values overflow float16 (store it as float32)")
        entry["dtype"] = "float16"
        entry["source_dtype"] = "float32"
    else:
        stored = array.astype(_RAW_DTYPES[name])
        entry["dtype"] = name
    data = np.ascontiguousarray(stored).tobytes()
    entry["data"] = {"length": len(data)}
    return entry, data


# The compact (stored) form: a resolved header minus every key that holds its default or that a reader derives.
# The writer stores exactly _compact_header(resolved); section_sizes measures the same form, so its per-entry
# shares are exact for files this module wrote.


def _compact_codebook(cb: dict) -> dict:
    out = dict(cb)
    out.pop("offset", None)
    encoding = out.get("encoding")
    if encoding in _CODEBOOK_FLOAT_ENCODINGS or encoding == _LATTICE_INT or encoding == _lc.ENCODING:
        out.pop("length", None)
    if encoding == _lc.ENCODING and out.get("exact_zero") is False:
        del out["exact_zero"]
    if encoding == _LATTICE_INT and out.get("width") == 1:
        del out["width"]
    if encoding == _LATTICE_INT_CODED and out.get("coder") == FORMAT_DEFAULT_CODEBOOK_CODER:
        del out["coder"]
    return out


def _compact_quantized(
    entry: dict, file_coder: str, seed: int, file_codebook: str = _DEFAULT_CODEBOOK_ENCODING
) -> dict:
    out = dict(entry)
    lattice = out.get("lattice")
    if lattice in LATTICE_DIMENSIONS and out.get("n") == _default_n(lattice):
        del out["n"]
    if lattice == _DEFAULT_LATTICE:
        del out["lattice"]
    dither = out.get("dither", FORMAT_DEFAULT_DITHER)
    if isinstance(out.get("fqn"), str) and isinstance(dither, str) and isinstance(seed, int) and 0 <= seed < _MAX_SEED:
        if out.get("key") == f"{_default_key(seed, out['fqn'], dither):016x}":
            del out["key"]
    for key, default in (("dither", FORMAT_DEFAULT_DITHER), ("zero_index", None), ("meta", {})):
        if key in out and out[key] == default and type(out[key]) is type(default):
            del out[key]
    indices = dict(out["indices"])
    for key in ("offset", "count"):
        indices.pop(key, None)
    if indices.get("coder") == file_coder:
        del indices["coder"]
    out["indices"] = indices
    codebook = _compact_codebook(out["codebook"])
    if codebook == {"encoding": file_codebook}:
        del out["codebook"]
    else:
        out["codebook"] = codebook
    return out


def _compact_raw(entry: dict) -> list:
    """A raw entry's stored form: ``[name, shape]``, or ``[name, shape, dtype]`` when it is not float32."""
    dtype = entry.get("dtype", _DEFAULT_RAW_DTYPE)
    if entry.get("source_dtype") == _DEFAULT_RAW_DTYPE:  # narrowed to float16 under the file's raw_float16
        dtype = _DEFAULT_RAW_DTYPE
    out = [entry["name"], list(entry["shape"])]
    return out if dtype == _DEFAULT_RAW_DTYPE else out + [dtype]


def _compact_header(header: dict) -> dict:
    out = dict(header)
    for key in _RESOLVED_ONLY:
        out.pop(key, None)
    file_coder = out.get("coder", FORMAT_DEFAULT_CODER)
    if file_coder == FORMAT_DEFAULT_CODER:
        out.pop("coder", None)
    seed = out.get("seed", 0)
    file_codebook = out.get("codebook_encoding", _DEFAULT_CODEBOOK_ENCODING)
    out["quantized"] = [_compact_quantized(q, file_coder, seed, file_codebook) for q in out.get("quantized", [])]
    out["raw"] = [_compact_raw(r) for r in out.get("raw", [])]
    for key, empty in (("quantized", []), ("raw", []), ("config", {}), ("metadata", {})):
        if key in out and out[key] == empty:
            del out[key]
    for key, default in (("seed", 0), ("raw_float16", False), ("codebook_encoding", _DEFAULT_CODEBOOK_ENCODING)):
        if key in out and out[key] == default and type(out[key]) is type(default):
            del out[key]
    return out


#: Top-level keys that read_header adds from the preamble and the file's layout; never stored in the JSON.
_RESOLVED_ONLY = ("header_length", "payload_length", "payload_sha256")


def _file_codebook(codebooks: list[dict]) -> str:
    """The header's default codebook encoding: the most used one among codebooks that need no other key (``f32``
    when it is among the most used, else the smallest name)."""
    counts = Counter(c["encoding"] for c in map(_compact_codebook, codebooks) if set(c) == {"encoding"})
    if not counts:
        return _DEFAULT_CODEBOOK_ENCODING
    top = max(counts.values())
    best = sorted(name for name, c in counts.items() if c == top)
    return _DEFAULT_CODEBOOK_ENCODING if _DEFAULT_CODEBOOK_ENCODING in best else best[0]


def _file_coder(coders: list[str]) -> str:
    """The header's default index coder: the most used one (the format's default when it is among them)."""
    counts = Counter(coders)
    if not counts:
        return FORMAT_DEFAULT_CODER
    top = max(counts.values())
    best = sorted(name for name, c in counts.items() if c == top)
    return FORMAT_DEFAULT_CODER if FORMAT_DEFAULT_CODER in best else best[0]


def encode_container(
    container: Container,
    *,
    raw_float_dtype: str = "float32",
    codebook_float_dtype: str = "float32",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    progress: bool | None = None,
) -> bytes:
    """Serialises ``container`` to the ``.udnc`` bytes (see ``docs/FORMAT.md``). Identical inputs give identical bytes.

    Integer codebooks (``codebook_int``) are stored in fixed-width bytes or entropy-coded, whichever is smaller.

    Args:
        container: what to store.
        raw_float_dtype: ``"float32"`` keeps every raw tensor's dtype; ``"float16"`` stores float32 raw tensors as
            float16 (recorded; the reader returns them as float32 holding the float16 values). Other dtypes are
            always stored as they are.
        codebook_float_dtype: ``"float32"`` or ``"float16"`` for float codebooks (``codebook_int`` overrides it).
        max_elements: refuse to write what a default reader would refuse to read.
        progress: a bar over the coded weights (``udnc_fx.progress``: ``None`` draws it on a terminal only).

    Returns:
        The file's bytes.

    Raises:
        FormatError: ``bad_value`` for an inconsistent or out-of-range field, ``unknown_codec`` for an unknown
            coder or a dtype the format cannot hold.
    """
    if raw_float_dtype not in ("float32", "float16"):
        raise FormatError("bad_value", f"raw_float_dtype must be 'float32' or 'float16', got {raw_float_dtype!r}")
    if codebook_float_dtype not in ("float32", "float16"):
        raise FormatError(
            "bad_value", f"codebook_float_dtype must be 'float32' or 'float16', got {codebook_float_dtype!r}"
        )
    if not isinstance(container, Container):
        raise FormatError("bad_value", f"expected a Container, got {type(container).__name__}")
    _check_json_object(container.config, "config")
    _check_json_object(container.metadata, "metadata")
    seed = _as_int(container.seed, "seed")
    if not 0 <= seed < _MAX_SEED:
        raise FormatError("bad_value", f"seed must be in [0, 2^64), got {seed}")

    names: set[str] = set()
    parts: list[bytes] = []
    total_elements = 0
    quantized_entries = []
    bar = _bar(container.quantized, "coding", progress)
    for q in container.quantized:
        entry, indices_bytes, codebook_bytes = _encode_quantized(q, codebook_float_dtype, max_elements)
        bar.update(entry["indices"]["count"] * entry["n"])
        total_elements += _prod(entry["shape"], max_elements) + _points_bound(entry) * entry["n"]
        if entry["fqn"] in names:
            raise FormatError("bad_value", f"duplicate tensor name {entry['fqn']!r}")
        names.add(entry["fqn"])
        parts += [indices_bytes, codebook_bytes]
        quantized_entries.append(entry)
    raw_entries = []
    for r in container.raw:
        entry, data = _encode_raw(r, raw_float_dtype)
        total_elements += _prod(entry["shape"], max_elements)
        if entry["name"] in names:
            raise FormatError("bad_value", f"duplicate tensor name {entry['name']!r}")
        names.add(entry["name"])
        parts.append(data)
        raw_entries.append(entry)
    bar.close()
    if total_elements > max_elements:
        raise FormatError("bad_value", f"the container holds more than {max_elements} elements")

    payload = b"".join(parts)
    header = {
        "coder": _file_coder([e["indices"]["coder"] for e in quantized_entries]),
        "codebook_encoding": _file_codebook([e["codebook"] for e in quantized_entries]),
        "seed": seed,
        "raw_float16": any(e.get("source_dtype") == _DEFAULT_RAW_DTYPE for e in raw_entries),
        "quantized": quantized_entries,
        "raw": raw_entries,
        "config": container.config,
        "metadata": container.metadata,
    }
    header_bytes = _canonical_json(_compact_header(header))
    if len(header_bytes) > MAX_HEADER_LENGTH:
        raise FormatError("bad_header", f"the header would be {len(header_bytes)} bytes (limit {MAX_HEADER_LENGTH})")
    if any(e["codebook"]["encoding"] in _ENCODINGS_SINCE_MINOR_2 for e in quantized_entries):
        minor = 2
    else:
        minor = 1 if any(e["indices"]["coder"] in _CODERS_SINCE_MINOR_1 for e in quantized_entries) else 0
    head = _DIGESTED.pack(
        MAGIC, FORMAT_VERSION[0], minor, len(header_bytes), len(payload), hashlib.sha256(payload).digest()
    )
    digest = hashlib.sha256(head + header_bytes).digest()
    return head + digest + header_bytes + payload


def write_container(
    path_or_file: Any,
    container: Container,
    *,
    raw_float_dtype: str = "float32",
    codebook_float_dtype: str = "float32",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    progress: bool | None = None,
) -> int:
    """Writes ``container`` to a path (atomically) or to a binary file object.

    A path is written through a temporary file in the same directory, flushed to disk and then renamed over the
    target (``os.replace``), so readers see the old file or the new one, never a partial one; on failure the
    temporary file is removed. A file object is written as is. Options are those of :func:`encode_container`.

    Returns:
        The number of bytes written.
    """
    data = encode_container(
        container,
        raw_float_dtype=raw_float_dtype,
        codebook_float_dtype=codebook_float_dtype,
        max_elements=max_elements,
        progress=progress,
    )
    if hasattr(path_or_file, "write") and not isinstance(path_or_file, (str, bytes, os.PathLike)):
        path_or_file.write(data)
        return len(data)
    path = os.fspath(path_or_file)
    directory, base = os.path.split(os.path.abspath(path))
    remove_stale_temps(directory, base)  # full-size leftovers of a save that was killed before its rename
    tmp = write_temp(directory, base, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)  # make the rename itself durable
    return len(data)


# ---------------------------------------------------------------------------------------------------------------
# Reading: header validation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Section:
    where: str
    length: int
    offset: int = -1  # set once every length is known


@dataclass
class _QEntry:
    raw: dict
    fqn: str
    shape: tuple[int, ...]
    lattice: str
    n: int | None  # None: omitted (the lattice's default, once the lattice is known to be valid)
    step: float | None  # None: out of float64's range (a bad_value once the entry's values are checked)
    key: int | None  # None: omitted (derived from the file's seed once that is known to be valid)
    dither: str
    zero_index: int | None
    meta: dict
    coder: str
    alphabet_size: int
    encoding: str
    width: int | None
    codebook_alphabet_size: int | None
    codebook_coder: str | None
    indices: _Section
    codebook: _Section
    count: int = 0
    layout: str | None = None  # lattice-coords only
    exact_zero: bool = False  # lattice-coords only

    def resolved(self) -> dict:
        out = dict(self.raw)
        out.update(fqn=self.fqn, lattice=self.lattice, n=self.n, dither=self.dither, zero_index=self.zero_index)
        out["key"] = f"{self.key:016x}"
        out.setdefault("meta", {})
        indices = dict(self.raw["indices"])
        indices.update(coder=self.coder, count=self.count, offset=self.indices.offset, length=self.indices.length)
        codebook = dict(self.raw.get("codebook", {"encoding": self.encoding}))
        codebook.update(offset=self.codebook.offset, length=self.codebook.length)
        if self.encoding == _LATTICE_INT:
            codebook["width"] = self.width
        elif self.encoding == _LATTICE_INT_CODED:
            codebook["coder"] = self.codebook_coder
        elif self.encoding == _lc.ENCODING:
            codebook.update(layout=self.layout, exact_zero=self.exact_zero)
        out["indices"], out["codebook"] = indices, codebook
        return out


@dataclass
class _REntry:
    name: str
    dtype: str  # as stored
    shape: tuple[int, ...]
    source_dtype: str | None  # "float32" when stored as float16 under the file's raw_float16
    data: _Section

    def resolved(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.source_dtype is not None:
            out["source_dtype"] = self.source_dtype
        out["data"] = {"offset": self.data.offset, "length": self.data.length}
        return out


@dataclass
class _Header:
    raw: dict
    coder: str
    codebook_encoding: str
    seed: int
    raw_float16: bool
    quantized: list[_QEntry]
    raws: list[_REntry]
    config: dict
    metadata: dict
    payload_length: int = 0

    def sections(self) -> list[_Section]:
        out = []
        for q in self.quantized:
            out += [q.indices, q.codebook]
        out += [r.data for r in self.raws]
        return out

    def resolved(self) -> dict:
        out = dict(self.raw)
        out.update(
            coder=self.coder,
            codebook_encoding=self.codebook_encoding,
            seed=self.seed,
            raw_float16=self.raw_float16,
            quantized=[q.resolved() for q in self.quantized],
            raw=[r.resolved() for r in self.raws],
            config=self.config,
            metadata=self.metadata,
        )
        return out


def _bad(message: str) -> FormatError:
    return FormatError("bad_header", message)


def _get(obj: dict, key: str, types: type | tuple[type, ...], where: str, default: Any = ..., nullable: bool = False):
    if key not in obj:
        if default is ...:
            raise _bad(f"{where}: missing key {key!r}")
        return default
    value = obj[key]
    if value is None and nullable:
        return None
    # JSON true/false are Python bools, which are ints too: never accept them as numbers.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _bad(f"{where}: {key!r} must be {_type_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise _bad(f"{where}: {key!r} must be {_type_names(types)}, got {type(value).__name__}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types)




def _parse_shape(obj: dict, where: str) -> tuple[int, ...]:
    shape = _get(obj, "shape", list, where)
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            raise _bad(f"{where}: shape entries must be integers, got {d!r}")
    return tuple(shape)


def _parse_quantized(obj: Any, i: int, file_coder: str, file_codebook: str) -> _QEntry:
    """Types only (``bad_header``); values are checked later."""
    where = f"quantized[{i}]"
    if not isinstance(obj, dict):
        raise _bad(f"{where} must be an object")
    fqn = _get(obj, "fqn", str, where)
    where = f"quantized tensor {fqn!r}"
    shape = _parse_shape(obj, where)
    lattice = _get(obj, "lattice", str, where, default=_DEFAULT_LATTICE)
    n = _get(obj, "n", int, where, default=None)
    step_value = _get(obj, "step", (int, float), where)
    try:
        step: float | None = float(step_value)
    except OverflowError:
        step = None
    key_text = _get(obj, "key", str, where, default=None)
    if key_text is not None and (len(key_text) != 16 or not set(key_text) <= _HEX):
        raise _bad(f"{where}: key must be 16 lowercase hex digits, got {key_text[:40]!r}")
    dither = _get(obj, "dither", str, where, default=FORMAT_DEFAULT_DITHER)
    zero_index = _get(obj, "zero_index", int, where, default=None, nullable=True)
    meta = _get(obj, "meta", dict, where, default={})
    ind = _get(obj, "indices", dict, where)
    cb = _get(obj, "codebook", dict, where, default={"encoding": file_codebook})
    coder = _get(ind, "coder", str, f"{where} indices", default=file_coder)
    alphabet_size = _get(ind, "alphabet_size", int, f"{where} indices")
    indices = _Section(f"{where} indices", _get(ind, "length", int, f"{where} indices"))
    encoding = _get(cb, "encoding", str, f"{where} codebook")
    width = cb_alphabet = cb_coder = layout = None
    exact_zero = False
    codebook = _Section(f"{where} codebook", 0)  # a derived length, set with the values
    if encoding == _LATTICE_INT:
        width = _get(cb, "width", int, f"{where} codebook", default=1)
    elif encoding == _LATTICE_INT_CODED:
        cb_alphabet = _get(cb, "alphabet_size", int, f"{where} codebook")
        cb_coder = _get(cb, "coder", str, f"{where} codebook", default=FORMAT_DEFAULT_CODEBOOK_CODER)
        codebook.length = _get(cb, "length", int, f"{where} codebook")
    elif encoding == _lc.ENCODING:
        layout = _get(cb, "layout", str, f"{where} codebook")
        exact_zero = _get(cb, "exact_zero", bool, f"{where} codebook", default=False)
    return _QEntry(
        raw=obj, fqn=fqn, shape=shape, lattice=lattice, n=n, step=step,
        key=None if key_text is None else int(key_text, 16), dither=dither,
        zero_index=zero_index, meta=meta, coder=coder, alphabet_size=alphabet_size, encoding=encoding,
        width=width, codebook_alphabet_size=cb_alphabet, codebook_coder=cb_coder, indices=indices, codebook=codebook,
        layout=layout, exact_zero=exact_zero,
    )


def _parse_raw(obj: Any, i: int, raw_float16: bool) -> _REntry:
    """``[name, shape]`` or ``[name, shape, dtype]``."""
    where = f"raw[{i}]"
    if not isinstance(obj, list) or len(obj) not in (2, 3):
        raise _bad(f"{where} must be an array [name, shape] or [name, shape, dtype]")
    name = obj[0]
    if not isinstance(name, str):
        raise _bad(f"{where}: the name must be a string, got {type(name).__name__}")
    where = f"raw tensor {name!r}"
    shape = _parse_shape({"shape": obj[1]}, where)
    dtype = obj[2] if len(obj) == 3 else _DEFAULT_RAW_DTYPE
    if not isinstance(dtype, str):
        raise _bad(f"{where}: the dtype must be a string, got {type(dtype).__name__}")
    source = None
    if raw_float16 and dtype == _DEFAULT_RAW_DTYPE:
        dtype, source = "float16", _DEFAULT_RAW_DTYPE
    return _REntry(name=name, dtype=dtype, shape=shape, source_dtype=source, data=_Section(f"{where} data", 0))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON syntax but no float64: Python reads it as inf, which nothing downstream can print back
    # as JSON (``udnc inspect --json`` wrote ``Infinity``). The writer never produces one (allow_nan=False).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is outside float64's range")
    return value


def _parse_header_json(header_bytes: bytes) -> dict:
    try:
        text = header_bytes.decode("utf-8")
        obj = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except Exception as exc:  # UnicodeDecodeError, JSONDecodeError, ValueError, RecursionError
        raise _bad(f"the header is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise _bad(f"the header must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_shape(shape: tuple[int, ...], where: str) -> None:
    if len(shape) > _MAX_NDIM:
        raise FormatError("bad_value", f"{where}: {len(shape)} dimensions (at most {_MAX_NDIM})")
    if any(d < 0 for d in shape):
        raise FormatError("bad_value", f"{where}: negative dimension in shape {list(shape)}")


def _check_quantized_values(q: _QEntry, max_elements: int) -> int:
    """Value checks (``bad_value``) and codec checks (``unknown_codec``) of one entry; sets its derived fields.

    Returns the elements it decodes to (tensor and codebook)."""
    where = f"quantized tensor {q.fqn!r}"
    _check_shape(q.shape, where)
    if q.lattice not in LATTICE_DIMENSIONS:
        raise FormatError("bad_value", f"{where}: unknown lattice {q.lattice[:40]!r}")
    if q.n is None:
        q.n = _default_n(q.lattice)
    if q.n not in LATTICE_DIMENSIONS[q.lattice]:
        raise FormatError("bad_value", f"{where}: lattice {q.lattice} has no dimension n={q.n}")
    if q.step is None or not (math.isfinite(q.step) and q.step > 0):
        raise FormatError("bad_value", f"{where}: step {q.step!r} is not finite and > 0")
    numel = _prod(q.shape, max_elements)
    q.count = -(-numel // q.n)
    k = q.alphabet_size
    if k < 1:
        raise FormatError("bad_value", f"{where}: alphabet_size {k} (K must be >= 1)")
    # an adaptive model's work grows with its alphabet whatever the stream holds; lattice-coords streams hold w
    # symbols per vector
    symbols = q.count * _coded_row_symbols(q.lattice, q.n) if q.encoding == _lc.ENCODING else q.count
    if k > max_index_alphabet(symbols):
        raise FormatError(
            "bad_value",
            f"{where}: alphabet_size {k} is more than the {max_index_alphabet(symbols)} allowed for {symbols} symbols",
        )
    if q.zero_index is not None and not 0 <= q.zero_index < k:
        raise FormatError("bad_value", f"{where}: zero_index {q.zero_index} outside [0, {k})")
    if q.encoding == _lc.ENCODING:
        # K is not stored: the reader rebuilds the distinct points, at most one per vector.
        if q.zero_index is not None:
            raise FormatError("bad_value", f"{where}: lattice-coords stores exact zeros as exact_zero, not zero_index")
        _lc.check_layout(q.layout, where)
        k = q.count
    elements = numel + k * q.n  # K·n can be far more than a coded codebook's bytes
    if elements > max_elements:
        raise FormatError("bad_value", f"{where}: decodes to more than {max_elements} elements")
    if q.encoding in _CODEBOOK_FLOAT_ENCODINGS:
        q.codebook.length = k * q.n * _CODEBOOK_FLOAT_ENCODINGS[q.encoding].itemsize
    elif q.encoding == _LATTICE_INT:
        if q.width not in _INT_WIDTHS:
            raise FormatError("bad_value", f"{where}: codebook width {q.width} not in (1, 2, 4, 8)")
        q.codebook.length = k * q.n * q.width
    elif q.encoding == _LATTICE_INT_CODED:
        if not 1 <= q.codebook_alphabet_size <= _MAX_CODED_ALPHABET:
            raise FormatError(
                "bad_value", f"{where}: codebook alphabet_size {q.codebook_alphabet_size} outside [1, 2^32]"
            )
        symbols = k * _coded_row_symbols(q.lattice, q.n)
        if q.codebook_alphabet_size > max_codebook_alphabet(symbols):  # the writer's own limit
            raise FormatError(
                "bad_value",
                f"{where}: codebook alphabet_size {q.codebook_alphabet_size} is more than the "
                f"{max_codebook_alphabet(symbols)} allowed for {symbols} symbols",
            )
        _get_coder(q.codebook_coder)
    elif q.encoding == _lc.ENCODING:
        q.codebook.length = 0
    else:
        raise FormatError("unknown_codec", f"{where}: unknown codebook encoding {q.encoding[:40]!r}")
    _get_coder(q.coder)
    return elements


def _validate_header(obj: dict, max_elements: int, payload_length: int | None = None) -> _Header:
    """Checks types (``bad_header``), values (``bad_value``/``unknown_codec``) and the layout (``bad_offsets``).

    ``payload_length`` is the preamble's P (``None``: not checked); the sections' lengths must add up to it.
    """
    file_coder = _get(obj, "coder", str, "header", default=FORMAT_DEFAULT_CODER)
    seed = _get(obj, "seed", int, "header", default=0)
    raw_float16 = _get(obj, "raw_float16", bool, "header", default=False)
    file_codebook = _get(obj, "codebook_encoding", str, "header", default=_DEFAULT_CODEBOOK_ENCODING)
    entries = _get(obj, "quantized", list, "header", [])
    quantized = [_parse_quantized(q, i, file_coder, file_codebook) for i, q in enumerate(entries)]
    raws = [_parse_raw(r, i, raw_float16) for i, r in enumerate(_get(obj, "raw", list, "header", []))]
    header = _Header(
        raw=obj, coder=file_coder, codebook_encoding=file_codebook, seed=seed, raw_float16=raw_float16,
        quantized=quantized, raws=raws,
        config=_get(obj, "config", dict, "header", {}), metadata=_get(obj, "metadata", dict, "header", {}),
    )

    for s in header.sections():  # only the stored lengths are set yet; the derived ones are 0
        if s.length < 0:
            raise FormatError("bad_offsets", f"{s.where}: negative length {s.length}")

    if not 0 <= seed < _MAX_SEED:
        raise FormatError("bad_value", f"seed {seed} outside [0, 2^64)")
    names: set[str] = set()
    total = 0
    for q in quantized:
        if q.key is None:
            q.key = _default_key(seed, q.fqn, q.dither)
        if not q.fqn or q.fqn in names:
            raise FormatError("bad_value", f"quantized tensor {q.fqn!r}: empty or duplicate name")
        names.add(q.fqn)
        total += _check_quantized_values(q, max_elements)
        if total > max_elements:
            raise FormatError("bad_value", f"the tensors decode to more than {max_elements} elements")
    for r in raws:
        where = f"raw tensor {r.name!r}"
        if not r.name or r.name in names:
            raise FormatError("bad_value", f"{where}: empty or duplicate name")
        names.add(r.name)
        _check_shape(r.shape, where)
        if r.dtype not in _RAW_DTYPES:
            raise FormatError("unknown_codec", f"{where}: unknown dtype {r.dtype[:40]!r}")
        if r.source_dtype is not None and (r.source_dtype, r.dtype) != ("float32", "float16"):
            raise FormatError("unknown_codec", f"{where}: cannot widen {r.dtype} to {r.source_dtype[:40]!r}")
        numel = _prod(r.shape, max_elements)
        total += numel
        if total > max_elements:
            raise FormatError("bad_value", f"the tensors decode to more than {max_elements} elements")
        r.data.length = numel * _RAW_DTYPES[r.dtype].itemsize

    # Layout: the sections follow each other in entry order and fill the payload exactly.
    position = 0
    for s in header.sections():
        s.offset = position
        position += s.length
    header.payload_length = position
    if payload_length is not None and position != payload_length:
        raise FormatError(
            "bad_offsets", f"the sections add up to {position} bytes, the preamble says the payload is {payload_length}"
        )
    return header


@dataclass
class _Preamble:
    header_length: int
    payload_length: int
    payload_sha256: bytes


def _parse_preamble(prefix: bytes, file_size: int, max_header_length: int = DEFAULT_MAX_HEADER_LENGTH) -> _Preamble:
    """Checks the preamble up to the header's presence in the file (the header digest comes next)."""
    if prefix[: len(MAGIC)] != MAGIC[: len(prefix)]:
        raise FormatError("bad_magic", "not a .udnc file (bad magic bytes)")
    if len(prefix) < PREAMBLE_SIZE:
        raise FormatError("truncated", f"the file is {file_size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
    _, major, minor, header_length, payload_length, payload_sha256, _ = _PREAMBLE.unpack(prefix[:PREAMBLE_SIZE])
    if major != FORMAT_VERSION[0]:
        raise FormatError(
            "unsupported_version",
            f"format version {major}.{minor}; this reader reads major version {FORMAT_VERSION[0]}",
        )
    if not 1 <= header_length <= MAX_HEADER_LENGTH:
        raise _bad(f"header length {header_length} outside [1, {MAX_HEADER_LENGTH}]")
    if header_length > max_header_length:
        raise FormatError(
            "bad_value",
            f"the header is {header_length} bytes, more than this reader's limit of {max_header_length} "
            "(max_header_length)",
        )
    if PREAMBLE_SIZE + header_length > file_size:
        raise FormatError(
            "truncated", f"the file is {file_size} bytes; its header needs {PREAMBLE_SIZE + header_length}"
        )
    return _Preamble(header_length, payload_length, payload_sha256)


def _read_header_from(
    prefix: bytes, header_bytes: bytes, file_size: int, max_elements: int, max_header_length: int = MAX_HEADER_LENGTH
) -> tuple[_Preamble, _Header]:
    preamble = _parse_preamble(prefix, file_size, max_header_length)
    if hashlib.sha256(prefix[:_DIGESTED_PREAMBLE] + header_bytes).digest() != prefix[_DIGESTED_PREAMBLE:PREAMBLE_SIZE]:
        raise FormatError("checksum_mismatch", "the header digest does not match (header or preamble damaged)")
    available = file_size - PREAMBLE_SIZE - len(header_bytes)
    if available < preamble.payload_length:
        raise FormatError("truncated", f"the payload is {preamble.payload_length} bytes, the file holds {available}")
    if available > preamble.payload_length:
        raise FormatError("bad_offsets", f"{available - preamble.payload_length} trailing bytes after the payload")
    header = _validate_header(_parse_header_json(header_bytes), max_elements, preamble.payload_length)
    return preamble, header


def _resolved(preamble: _Preamble, header: _Header) -> dict:
    out = header.resolved()
    out["header_length"] = preamble.header_length
    out["payload_length"] = preamble.payload_length
    out["payload_sha256"] = preamble.payload_sha256.hex()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reading: payload
# ---------------------------------------------------------------------------------------------------------------


def _decode_stream(
    coder_name: str, data: bytes, count: int, alphabet_size: int, where: str, context: dict | None = None,
    dtype: Any = None,
) -> np.ndarray:
    return decode_stream(_get_coder(coder_name), data, count, alphabet_size, where, dtype=dtype, **(context or {}))


def _decode_codebook(q: _QEntry, data: bytes) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Returns ``(codebook, codebook_int)``, one of them ``None``."""
    where = f"quantized tensor {q.fqn!r} codebook"
    k, n = q.alphabet_size, q.n
    if q.encoding in _CODEBOOK_FLOAT_ENCODINGS:
        codebook = np.frombuffer(data, dtype=_CODEBOOK_FLOAT_ENCODINGS[q.encoding]).astype(np.float32)
        return codebook.reshape(k, n), None
    if q.encoding == _LATTICE_INT:
        c = _lc.zigzag_decode(np.frombuffer(data, dtype=_INT_WIDTHS[q.width])).reshape(k, n)
    else:
        w = _coded_row_symbols(q.lattice, n)
        symbols = _decode_stream(q.codebook_coder, data, k * w, q.codebook_alphabet_size, where)
        c = _codebook_from_symbols(q.lattice, symbols.astype(np.uint64).reshape(k, w), where)
    bad = _non_members(q.lattice, c)
    if bad.any():  # lattice-int rows come from the file as they are; coded ones are lattice points by construction
        raise FormatError("bad_value", f"{where}: row {int(np.flatnonzero(bad)[0])} is not a {q.lattice} point")
    return None, c


def _decode_coords(q: _QEntry, data: bytes) -> QuantizedTensor:
    """A ``lattice-coords`` tensor: decode every vector's point, then rebuild indices and ``codebook_int`` in the
    quantizer's order (``lattice_coords.index_points``)."""
    points = _lc.decode_points(
        _get_coder(q.coder), data, q.count, q.alphabet_size, q.layout, q.lattice, q.n, q.key,
        q.dither == FORMAT_DEFAULT_DITHER, f"quantized tensor {q.fqn!r} coordinates",
    )
    if q.count == 0:
        indices, codebook_int = np.zeros(0, np.int64), np.zeros((1, q.n), np.int64)
    else:
        indices, codebook_int, _ = _lc.index_points(points)
    zero_index = None
    if q.exact_zero:
        hits = np.flatnonzero(~codebook_int.any(axis=1))
        zero_index = int(hits[0]) if hits.size else None
    k = codebook_int.shape[0]
    return QuantizedTensor(
        fqn=q.fqn, shape=q.shape, lattice=q.lattice, n=q.n, step=q.step, key=q.key, dither=q.dither,
        indices=indices.astype(_narrow_index_dtype(k)), codebook=None, codebook_int=codebook_int, coder=q.coder,
        zero_index=zero_index, meta=q.meta,
    )


def _decode_payload(
    preamble: _Preamble, header: _Header, payload: memoryview, progress: bool | None = None
) -> Container:
    if hashlib.sha256(payload).digest() != preamble.payload_sha256:
        raise FormatError("checksum_mismatch", "the payload digest does not match (payload damaged)")

    def section_bytes(s: _Section) -> bytes:
        return bytes(payload[s.offset : s.offset + s.length])

    quantized = []
    bar = _bar(header.quantized, "decoding", progress)
    for q in header.quantized:
        bar.update(q.count * q.n)
        if q.encoding == _lc.ENCODING:
            quantized.append(_decode_coords(q, section_bytes(q.indices)))
            continue
        context = _stream_context(_get_coder(q.coder), q.key, q.dither, q.count, q.n)
        index_dtype = _narrow_index_dtype(q.alphabet_size)
        indices = _decode_stream(
            q.coder, section_bytes(q.indices), q.count, q.alphabet_size, f"{q.fqn!r} indices", context, index_dtype
        )
        codebook, codebook_int = _decode_codebook(q, section_bytes(q.codebook))
        quantized.append(
            QuantizedTensor(
                fqn=q.fqn, shape=q.shape, lattice=q.lattice, n=q.n, step=q.step, key=q.key, dither=q.dither,
                indices=indices.astype(index_dtype, copy=False), codebook=codebook,
                codebook_int=codebook_int, coder=q.coder, zero_index=q.zero_index, meta=q.meta,
            )
        )
    bar.close()
    raws = []
    for r in header.raws:
        stored = np.frombuffer(section_bytes(r.data), dtype=_RAW_DTYPES[r.dtype])
        if r.dtype == "bool" and stored.size and int(stored.view(np.uint8).max()) > 1:
            raise FormatError("bad_value", f"raw tensor {r.name!r}: bool bytes other than 0 and 1")
        target = np.dtype(r.source_dtype or r.dtype).newbyteorder("=")
        raws.append(RawTensor(name=r.name, array=stored.astype(target).reshape(r.shape)))
    return Container(quantized=quantized, raw=raws, config=header.config, metadata=header.metadata, seed=header.seed)


def _guarded(fn, *args):
    """Runs a parsing step; any exception that is not a FormatError is a bug, reported as one."""
    try:
        return fn(*args)
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError("bad_value", f"unexpected {type(exc).__name__} while reading: {exc}") from exc


def _read(
    source: Any, max_elements: int, max_header_length: int, check_header: Any, progress: bool | None = None
) -> Container:
    """Preamble and header first (bounded by ``max_header_length``), then ``check_header`` on the resolved header,
    and only then the payload: a caller that knows what the file must hold refuses it before anything is decoded
    (or, for a path, before the payload is even read)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        size = len(view)
        prefix = bytes(view[:PREAMBLE_SIZE])
        preamble = _guarded(_parse_preamble, prefix, size, max_header_length)
        header_bytes = bytes(view[PREAMBLE_SIZE : PREAMBLE_SIZE + preamble.header_length])
        read_payload = lambda: view[PREAMBLE_SIZE + preamble.header_length :]  # noqa: E731
        handle = None
    else:
        handle = _open_regular(source) if isinstance(source, (str, os.PathLike)) else source
        if not hasattr(handle, "read"):
            raise TypeError(f"read_container needs a path, bytes or a binary file, got {type(source).__name__}")
        try:
            size = os.fstat(handle.fileno()).st_size - handle.tell()
        except (AttributeError, OSError, ValueError):  # a file object without a descriptor: read it whole
            data = handle.read()
            return _read(data, max_elements, max_header_length, check_header, progress)
        prefix = handle.read(PREAMBLE_SIZE)
        preamble = _guarded(_parse_preamble, prefix, size, max_header_length)
        header_bytes = handle.read(preamble.header_length)
        read_payload = lambda: memoryview(handle.read(size - PREAMBLE_SIZE - preamble.header_length))  # noqa: E731
    try:
        _, header = _guarded(_read_header_from, prefix, header_bytes, size, max_elements, max_header_length)
        if check_header is not None:  # outside _guarded: the caller's own errors (model_mismatch...) pass as they are
            check_header(_guarded(_resolved, preamble, header))
        payload = read_payload()
        if len(payload) != preamble.payload_length:
            raise FormatError("truncated", f"the payload is {preamble.payload_length} bytes, read {len(payload)}")
        return _guarded(_decode_payload, preamble, header, payload, progress)
    finally:
        if handle is not None and handle is not source:
            handle.close()


def decode_container(
    data: bytes | bytearray | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_header_length: int = DEFAULT_MAX_HEADER_LENGTH,
    check_header: Any = None,
    progress: bool | None = None,
) -> Container:
    """Decodes ``.udnc`` bytes, with every check of ``docs/FORMAT.md``. Arguments as :func:`read_container`.

    Raises:
        FormatError: and no other exception, whatever the bytes.
    """
    return _read(data, max_elements, max_header_length, check_header, progress)


def read_container(
    path_or_bytes: Any,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_header_length: int = DEFAULT_MAX_HEADER_LENGTH,
    check_header: Any = None,
    progress: bool | None = None,
) -> Container:
    """Reads a ``.udnc`` file (a path, bytes, or a binary file object) and decodes everything.

    Quantized tensors come back with ``indices`` in the narrowest unsigned dtype that holds K; float codebooks as
    float32 (``f16`` widened exactly); integer codebooks (``lattice-int``, ``lattice-int-coded``) as
    ``codebook_int`` (int64) with ``codebook=None``. Raw tensors come back in their stored dtype, except float32
    tensors stored as float16, which come back as float32. Arrays are writable copies.

    An entropy-coded stream can legitimately be far smaller than what it decodes to (a constant stream costs a few
    bytes), so the file's size cannot bound the work; a caller that knows what the file must hold (a model) passes
    ``check_header`` and tight limits, and the payload is neither read nor decoded unless the header passes.

    Args:
        path_or_bytes: a path (str or ``os.PathLike``), ``bytes``/``bytearray``/``memoryview``, or a binary file.
        max_elements: refuse a file whose tensors and codebooks decode to more elements than this, in all
            (``bad_value``).
        max_header_length: refuse a header longer than this many bytes (``bad_value``); the format allows up to
            ``MAX_HEADER_LENGTH``.
        check_header: called with the resolved header (as :func:`read_header` returns it) after every header check
            and before the payload is read; it raises to refuse the file. Its exceptions propagate unchanged.
        progress: a bar over the decoded weights (``udnc_fx.progress``: ``None`` draws it on a terminal only).

    Raises:
        FormatError: for any defect of the content (never another exception type for bad bytes). ``OSError``
            for a file that cannot be opened.
    """
    return _read(path_or_bytes, max_elements, max_header_length, check_header, progress)


def read_header(
    path_or_bytes: Any, *, max_elements: int = DEFAULT_MAX_ELEMENTS, max_header_length: int = DEFAULT_MAX_HEADER_LENGTH
) -> dict:
    """Reads and checks the preamble and the header only; the payload is neither read nor decoded.

    Every header-level check of ``docs/FORMAT.md`` is made (digest, types, values, layout, that the file is as
    long as the preamble says); the payload digest and the decoding of streams are not. The work is linear in the
    header's length, which ``max_header_length`` caps (default 4 MiB; ``bad_value`` beyond).

    Returns:
        The header *resolved*: the stored JSON (unknown keys kept) with every omitted key filled with its default
        (``coder``, ``n``, ``key``, ``dither``, ``zero_index``, ``meta``, raw ``dtype``, ...), each section's
        ``offset`` and ``length`` (``indices``, ``codebook``, a raw entry's ``data``), each index stream's
        ``count``, and three keys from the preamble: ``header_length``, ``payload_length`` and ``payload_sha256``
        (hex). :func:`section_sizes` takes it as it is.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        view = memoryview(path_or_bytes).cast("B")
        return _guarded(_header_from_buffer, view, max_elements, max_header_length)
    with _open_regular(path_or_bytes) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(PREAMBLE_SIZE)
        preamble = _guarded(_parse_preamble, prefix, size, max_header_length)
        header_bytes = f.read(preamble.header_length)
    return _guarded(lambda: _resolved(*_read_header_from(prefix, header_bytes, size, max_elements, max_header_length)))


def _open_regular(path: Any):
    """Opens ``path`` for reading only if it is a regular file: a FIFO would block the reader forever and a device
    (``/dev/zero``) never ends. Opened non-blocking, checked, then switched back to blocking reads."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError("bad_value", f"{os.fspath(path)!s}: not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _header_from_buffer(view: memoryview, max_elements: int, max_header_length: int) -> dict:
    prefix = bytes(view[:PREAMBLE_SIZE])
    preamble = _parse_preamble(prefix, len(view), max_header_length)
    header_bytes = bytes(view[PREAMBLE_SIZE : PREAMBLE_SIZE + preamble.header_length])
    return _resolved(*_read_header_from(prefix, header_bytes, len(view), max_elements, max_header_length))


def _unresolve_raw(header: dict) -> dict:
    """``header`` with resolved raw entries (objects, from :func:`read_header`) back in their stored array form."""
    raws = header.get("raw")
    if not isinstance(raws, list) or not any(isinstance(r, dict) for r in raws):
        return header
    out = dict(header)
    out["raw"] = [
        _compact_raw(r) if isinstance(r, dict) and "name" in r and "shape" in r else r for r in raws
    ]
    return out


def section_sizes(header: dict) -> dict:
    """Attributes every byte of a file to a tensor or to the shared overhead, for honest compression ratios.

    Each tensor's header share is the compact JSON of its entry (as the writer stores it) plus the comma that
    separates it from the previous one; a quantized tensor also owns its index and codebook sections, a raw tensor
    its data. The shared overhead is the preamble plus the rest of the header (config, metadata, top-level keys).
    ``shared.total + sum(t.total) == file`` always; for a file this module wrote, every share is exact.

    Args:
        header: a header as returned by :func:`read_header` (a stored, unresolved header works too).

    Returns:
        ``{"tensors": {name: {"kind": "quantized", "indices": b, "codebook": b, "header": b, "total": b} or
        {"kind": "raw", "data": b, "header": b, "total": b}}, "shared": {"preamble": 88, "header": b, "total": b},
        "file": b}``.
    """
    if not isinstance(header, dict):
        raise _bad("section_sizes needs a header dict")
    return _guarded(_section_sizes, header)


def _section_sizes(header: dict) -> dict:
    parsed = _validate_header(_unresolve_raw(header), DEFAULT_MAX_ELEMENTS)
    stored = _compact_header(parsed.resolved())
    header_length = header.get("header_length")
    if isinstance(header_length, bool) or not isinstance(header_length, int):
        header_length = len(_canonical_json(stored))
    tensors: dict[str, dict[str, Any]] = {}
    attributed = 0
    for entries, compact in ((parsed.quantized, stored.get("quantized", [])), (parsed.raws, stored.get("raw", []))):
        for i, (e, c) in enumerate(zip(entries, compact)):
            share = len(_canonical_json(c)) + (1 if i else 0)
            attributed += share
            if isinstance(e, _QEntry):
                sizes: dict[str, Any] = {"kind": "quantized", "indices": e.indices.length}
                sizes["codebook"] = e.codebook.length
                name = e.fqn
            else:
                sizes = {"kind": "raw", "data": e.data.length}
                name = e.name
            sizes["header"] = share
            sizes["total"] = sum(v for k, v in sizes.items() if k != "kind")
            tensors[name] = sizes
    shared_header = header_length - attributed
    return {
        "tensors": tensors,
        "shared": {"preamble": PREAMBLE_SIZE, "header": shared_header, "total": PREAMBLE_SIZE + shared_header},
        "file": PREAMBLE_SIZE + header_length + parsed.payload_length,
    }

"""The ``.udnc`` format's constants and the small rules every part of the container shares (NumPy only).

What is fixed by ``docs/FORMAT.md`` lives here, once: the magic and versions, the preamble's layout, the defaults
an omitted key stands for, the limits a reader enforces, the lattices and their integer-codebook membership rules,
the per-tensor key derivation and the canonical JSON the header is written in. :mod:`~udnc_fx.coding.header`
(header entries, compaction, parsing and validation), :mod:`~udnc_fx.coding.payload` (tensor sections) and
:mod:`~udnc_fx.coding.container` (file I/O and the public entry points) build on it.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from udnc_fx.coding import lattice_coords as _lc
from udnc_fx.dither import tensor_key
from udnc_fx.errors import FormatError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "CODERS_SINCE_MINOR_1",
    "CODERS_SINCE_MINOR_4",
    "ENCODINGS_SINCE_MINOR_2",
    "COMPRESSED_HEADER_MINOR",
    "AFFINE",
    "DIGESTED",
    "PREAMBLE",
    "PREAMBLE_SIZE",
    "DIGESTED_PREAMBLE",
    "DEFAULT_MAX_ELEMENTS",
    "MAX_NDIM",
    "LATTICE_DIMENSIONS",
    "FORMAT_DEFAULT_CODER",
    "FORMAT_DEFAULT_CODEBOOK_CODER",
    "FORMAT_DEFAULT_DITHER",
    "NO_DITHER",
    "MAX_SEED",
    "RAW_DTYPES",
    "DEFAULT_RAW_DTYPE",
    "DEFAULT_LATTICE",
    "DEFAULT_CODEBOOK_ENCODING",
    "CODEBOOK_FLOAT_ENCODINGS",
    "LATTICE_INT",
    "LATTICE_INT_CODED",
    "INT_WIDTHS",
    "MAX_CODED_ALPHABET",
    "HEX_DIGITS",
    "lookup_coder",
    "derived_key",
    "default_key",
    "canonical_json",
    "check_json_object",
    "prod",
    "narrow_index_dtype",
    "default_n",
    "non_members",
    "coded_row_symbols",
    "as_int",
]

MAGIC = b"\x89UDNC\r\n\x1a"
FORMAT_VERSION = (1, 5)  # (major, minor): the newest this module writes and reads
#: Coders that need minor version 1 (dither-conditioned streams). A file using none of them is written as 1.0, the
#: lowest version that reads it, so 1.0 readers keep reading what they can.
CODERS_SINCE_MINOR_1 = frozenset({"ans-dither-v1"})
#: Coders that need minor version 4 (``ans-dither-v2``: interleaved rANS compiled by numba). A file using one is
#: written as 1.4, and a reader older than 1.4 refuses its streams with ``unknown_codec``.
CODERS_SINCE_MINOR_4 = frozenset({"ans-dither-v2"})
#: Codebook encodings that need minor version 2 (a file using one is written as 1.2; otherwise as above).
ENCODINGS_SINCE_MINOR_2 = frozenset({_lc.ENCODING})
#: The codebook encoding that wraps integer points with a per-layer affine correction ``(a, b)`` (format 1.3): a
#: file using it is written as 1.3, and readers older than 1.3 refuse it (``unknown_codec``) instead of ignoring it.
AFFINE = "affine"
#: Minor version 4: ``lattice-coords`` layouts whose contexts are bins of each coordinate's own dither
#: (``lattice_coords.OWN_DITHER_LAYOUTS``), with an affine correction stored flat in the entry (``"affine": [a, b]``).
#: Readers older than 1.4 refuse the layout names (``unknown_codec``).
#: Minor version 5: the header may be stored compressed (``udnc-hcm-v1``, :mod:`udnc_fx.coding.header_codec`); a file
#: whose header is stored compressed is written as 1.5, one whose header is plain JSON keeps the rules above.
COMPRESSED_HEADER_MINOR = 5

# magic, major, minor, header length H, payload length P, payload SHA-256, header SHA-256
DIGESTED = struct.Struct("<8sHHIQ32s")  # everything before the header digest, which covers it
PREAMBLE = struct.Struct("<8sHHIQ32s32s")
PREAMBLE_SIZE = PREAMBLE.size  # 88
DIGESTED_PREAMBLE = DIGESTED.size  # 56
#: Default cap on the elements a container may decode to (all tensors and codebooks together). An entropy-coded
#: stream can be far smaller than what it decodes to, so the file's length alone cannot bound the allocation.
DEFAULT_MAX_ELEMENTS = 1 << 32
MAX_NDIM = 32

#: Lattice name -> the dimensions it exists in (the first is the default of an omitted ``n``).
LATTICE_DIMENSIONS: dict[str, tuple[int, ...]] = {"Z": tuple(range(1, 9)), "A2": (2,), "D4": (4,), "E8": (8,)}

#: What an omitted ``coder`` means for index streams. Part of the format: it never changes within major version 1,
#: whatever the registry's default becomes.
FORMAT_DEFAULT_CODER = "range-context-v1"
#: What an omitted ``coder`` means for ``lattice-int-coded`` codebooks (short streams without row structure).
FORMAT_DEFAULT_CODEBOOK_CODER = "range-adaptive-v1"
#: What an omitted ``dither`` means.
FORMAT_DEFAULT_DITHER = "udnc-hash32-v1"
NO_DITHER = "none"
MAX_SEED = 1 << 64

RAW_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in [
        ("float16", "<f2"), ("float32", "<f4"), ("float64", "<f8"),
        ("int8", "i1"), ("int16", "<i2"), ("int32", "<i4"), ("int64", "<i8"),
        ("uint8", "u1"), ("uint16", "<u2"), ("uint32", "<u4"), ("uint64", "<u8"),
        ("bool", "?"),
    ]
}
DEFAULT_RAW_DTYPE = "float32"
DEFAULT_LATTICE = "Z"
DEFAULT_CODEBOOK_ENCODING = "f32"
CODEBOOK_FLOAT_ENCODINGS = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2")}
LATTICE_INT = "lattice-int"
LATTICE_INT_CODED = "lattice-int-coded"
INT_WIDTHS = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
MAX_CODED_ALPHABET = 1 << 32  # coded codebook symbols; keeps their inverse transform inside int64
HEX_DIGITS = frozenset("0123456789abcdef")


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def lookup_coder(name: str):
    """Looks a coder up in the registry; any failure (unknown name, registry missing) is ``unknown_codec``."""
    try:  # asked at call time: the one place every part of the container gets a coder from (tests stand one in)
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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def derived_key(seed: int, fqn: str) -> int:
    """The dither key of tensor ``fqn`` under ``seed`` (docs/FORMAT.md, *Per-tensor key*): the one definition,
    :func:`udnc_fx.dither.tensor_key` (``blake2b(b"udnc-key-v1\\0" || u64le(seed) || utf8(fqn), digest_size=8)``
    as a little-endian u64). What an omitted ``key`` means for a dithered tensor; callers pass a validated seed."""
    return tensor_key(seed, fqn)


def default_key(seed: int, fqn: str, dither: str) -> int:
    """What an omitted ``key`` means: the derived key, or 0 for a tensor without dither."""
    return 0 if dither == NO_DITHER else derived_key(seed, fqn)


def canonical_json(obj: Any) -> bytes:
    """The header's JSON bytes: sorted keys, no spaces, UTF-8, no NaN (the same object always gives the same bytes)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    ).encode("utf-8")


def check_json_object(value: Any, what: str) -> None:
    """Writer-side: ``value`` must be a JSON object with string keys everywhere, and serialisable."""
    if not isinstance(value, dict):
        raise FormatError("bad_value", f"{what} must be a dict, got {type(value).__name__}")
    try:  # first, so that a circular structure is refused before the walk below
        canonical_json(value)
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


def prod(dims: list[int] | tuple[int, ...], limit: int) -> int:
    """Product of ``dims``, stopping (returning ``limit + 1``) as soon as it exceeds ``limit``."""
    total = 1
    for d in dims:
        total *= d
        if total > limit:
            return limit + 1 if all(x != 0 for x in dims) else 0
    return total


def narrow_index_dtype(alphabet_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every index below ``alphabet_size`` (what the reader returns)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if alphabet_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def default_n(lattice: str) -> int:
    """What an omitted ``n`` means for ``lattice``."""
    return LATTICE_DIMENSIONS[lattice][0]


# ---------------------------------------------------------------------------------------------------------------
# Integer codebooks: lattice membership and the symbol stream of "lattice-int-coded"
# ---------------------------------------------------------------------------------------------------------------

#: Symbols per codebook row in "lattice-int-coded" (E8 adds the row's parity).
_CODED_ROW_SYMBOLS = {"Z": None, "A2": 2, "D4": 4, "E8": 9}


def non_members(lattice: str, c: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of int64 ``c`` that are not integer coordinates of a ``lattice`` point.

    Works on residues (``& 1``, ``& 3``), so it cannot overflow whatever the values.
    """
    if lattice == "D4":
        return (np.sum(c & 1, axis=1) & 1) != 0
    if lattice == "E8":  # twice a point: every coordinate of one parity, sum divisible by 4
        parity = c & 1
        return np.any(parity != parity[:, :1], axis=1) | ((np.sum(c & 3, axis=1) & 3) != 0)
    return np.zeros(c.shape[0], dtype=bool)


def coded_row_symbols(lattice: str, n: int) -> int:
    """Symbols per codebook row in ``lattice-int-coded`` (and per vector in ``lattice-coords``)."""
    return _CODED_ROW_SYMBOLS[lattice] or n


def as_int(value: Any, what: str) -> int:
    """Writer-side: ``value`` as an ``int`` (NumPy integers accepted, bools refused), else ``bad_value``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise FormatError("bad_value", f"{what} must be an integer, got {value!r}")
    return int(value)

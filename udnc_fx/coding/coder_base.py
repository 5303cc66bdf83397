"""The coder interface and registry shared by every coder family (NumPy only: decoding never needs torch).

An index stream is a 1-D array of integers in ``[0, K)`` (``K`` = ``alphabet_size``, the codebook size). A
:class:`Coder` turns it into bytes and back; coders are registered under versioned names (``"bz2-v1"``,
``"range-adaptive-v1"``) so a container names the exact algorithm and byte layout it used. The symbol count and
the alphabet size are *not* stored by the coders: the caller (the container header) supplies both to ``decode``.

Every coder is deterministic (same input, same bytes) and every ``decode`` either returns exactly ``count`` symbols,
each in ``[0, K)``, or raises :class:`~udnc_fx.errors.FormatError` (kinds ``truncated``, ``corrupt_payload``,
``bad_value``): corrupt or hostile payloads never escape as another exception type, never hang (decoding time is
linear in ``len(data)``, ``count`` and, for the range coder, ``alphabet_size`` per block), and never make the decoder
allocate more than a small multiple of ``len(data)``, ``count`` and ``alphabet_size``. Bounding ``count`` is the
caller's job: a valid payload may expand to far more symbols than it has bytes (a constant stream costs nothing).

Varints below are unsigned LEB128: 7 bits per byte, least significant group first, high bit set on every byte but
the last; at most 10 bytes, and a multi-byte varint may not end in a zero byte (no redundant encodings).

The families live in their own modules (``bytecoders``, ``range_coders``, ``huffman``, ``ans``) and register
themselves on import; ``udnc_fx.coding.coders`` is the public face that imports them all.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np

from udnc_fx.errors import ConfigError, FormatError

__all__ = [
    "Coder",
    "DEFAULT_CODER",
    "MAX_ALPHABET",
    "available_coders",
    "decode_stream",
    "empirical_entropy_bits",
    "encode_stream",
    "get_coder",
    "register",
    "check_decode_args",
    "check_symbols",
    "histogram",
    "symbol_width",
    "varint",
    "read_varint",
    "varints",
    "read_varints",
    "as_format_error",
]

#: The index coder new files use (save, QuantizedTensor, the ONNX sidecar): static interleaved rANS conditioned on the
#: dither, compiled by numba, defined in ``udnc_fx.coding.ans_native`` (registered when ``udnc_fx.coding`` is
#: imported; alphabets over 2^16 fall back to ``ans-dither-v1``, ``ans_native.coder_for_alphabet``).
DEFAULT_CODER = "ans-dither-v2"

# The byte-oriented coders pack symbols in at most 4 bytes.
MAX_ALPHABET = 1 << 32


# --------------------------------------------------------------------------------------------------------------
# Argument checking shared by every coder
# --------------------------------------------------------------------------------------------------------------


def check_alphabet(alphabet_size: Any, limit: int) -> int:
    if isinstance(alphabet_size, (bool, np.bool_)) or not isinstance(alphabet_size, (int, np.integer)):
        raise ConfigError(f"alphabet_size must be an integer, got {type(alphabet_size).__name__}")
    k = int(alphabet_size)
    if k < 1 or k > limit:
        raise ConfigError(f"alphabet_size must be in [1, {limit}], got {k}")
    return k


def check_symbols(
    symbols: Any, alphabet_size: Any, limit: int = MAX_ALPHABET, *, widen: bool = True
) -> tuple[np.ndarray, int]:
    """Validate an index stream; returns it as a 1-D int64 array (``widen=False``: in its own integer dtype) and
    ``K`` as an int."""
    k = check_alphabet(alphabet_size, limit)
    if isinstance(symbols, np.ndarray):
        arr = symbols
    else:
        arr = np.asarray(symbols)
        if arr.size == 0:  # np.asarray([]) is float64: an empty sequence is an empty stream.
            arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise ConfigError(f"symbols must be a 1-D array, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"symbols must have an integer dtype, got {arr.dtype}")
    if arr.size:
        # Compare in the array's own dtype first: uint64 values >= 2**63 would wrap when cast to int64.
        lo, hi = arr.min(), arr.max()
        if int(lo) < 0:
            raise ConfigError(f"symbols must be non-negative, found {int(lo)}")
        if int(hi) >= k:
            raise ConfigError(f"symbols must be < alphabet_size={k}, found {int(hi)}")
    return (arr.astype(np.int64, copy=False) if widen else arr), k


def check_decode_args(data: Any, count: Any, alphabet_size: Any, limit: int) -> tuple[memoryview, int, int]:
    """Validate decode's arguments. ``count`` and ``alphabet_size`` usually come from a file header, so values that
    are out of range raise FormatError(bad_value); values of the wrong type are a programming error (ConfigError)."""
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise ConfigError(f"data must be bytes-like, got {type(data).__name__}") from exc
    for name, value in (("count", count), ("alphabet_size", alphabet_size)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an integer, got {type(value).__name__}")
    n, k = int(count), int(alphabet_size)
    if n < 0:
        raise FormatError("bad_value", f"symbol count must be >= 0, got {n}")
    if k < 1 or k > limit:
        raise FormatError("bad_value", f"alphabet_size must be in [1, {limit}] for this coder, got {k}")
    return view, n, k


def histogram(arr: np.ndarray, k: int, with_rank: bool = False) -> tuple[np.ndarray, ...]:
    """Distinct symbols (ascending) and their counts, plus, if asked, each element's index among them.

    A dense bincount when the alphabet is not much larger than the stream, a sort otherwise, so a huge declared
    alphabet never costs a K-sized array.
    """
    if k <= 4 * arr.size + (1 << 16):
        dense = np.bincount(arr, minlength=k)
        used = np.flatnonzero(dense)
        counts = dense[used]
        if not with_rank:
            return used, counts
        rank_of = np.zeros(k, np.int64)
        rank_of[used] = np.arange(used.size)
        return used, counts, rank_of[arr]
    if not with_rank:
        used, counts = np.unique(arr, return_counts=True)
        return used, counts
    used, rank, counts = np.unique(arr, return_inverse=True, return_counts=True)
    return used, counts, rank.reshape(-1)


def symbol_width(alphabet_size: int) -> int:
    """Bytes per symbol: the narrowest of 1, 2, 4 that holds the largest symbol, ``alphabet_size - 1``."""
    top = alphabet_size - 1
    return 1 if top < (1 << 8) else 2 if top < (1 << 16) else 4


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(10):
        if pos + i >= len(view):
            raise FormatError("truncated", "payload ends inside a varint")
        byte = view[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise FormatError("corrupt_payload", "non-canonical varint")
            return value, pos + i + 1
    raise FormatError("corrupt_payload", "varint longer than 10 bytes")


def varints(values: np.ndarray) -> bytes:
    """LEB128-encode a 1-D array of non-negative integers (< 2**63), vectorised."""
    v = values.astype(np.uint64)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.size, np.int64)
    for j in range(1, 10):
        nbytes += v >= np.uint64(1 << (7 * j))
    total = int(nbytes.sum())
    start = np.cumsum(nbytes) - nbytes
    owner = np.repeat(np.arange(v.size), nbytes)
    j = np.arange(total) - start[owner]
    out = ((v[owner] >> (7 * j).astype(np.uint64)) & np.uint64(0x7F)).astype(np.uint8)
    out[j < nbytes[owner] - 1] |= 0x80
    return out.tobytes()


def read_varints(view: memoryview, pos: int, n: int) -> tuple[np.ndarray, int]:
    """Read ``n`` LEB128 varints (each < 2**63) starting at ``pos``, vectorised; returns (int64 values, new pos)."""
    if n == 0:
        return np.zeros(0, np.int64), pos
    # n varints take between n and 9n bytes (values < 2**63).
    window = np.frombuffer(view[pos : pos + 9 * n], np.uint8)
    ends = np.flatnonzero(window < 0x80)
    if ends.size < n:
        raise FormatError("truncated", "payload ends inside the varint table")
    ends = ends[:n]
    starts = np.empty(n, np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > 9:
        raise FormatError("corrupt_payload", "varint too long")
    if np.any((lengths > 1) & (window[ends] == 0)):
        raise FormatError("corrupt_payload", "non-canonical varint")
    used = window[: int(ends[-1]) + 1]
    owner = np.repeat(np.arange(n), lengths)
    shift = (7 * (np.arange(used.size) - starts[owner])).astype(np.uint64)
    parts = (used & 0x7F).astype(np.uint64) << shift
    # The 7-bit groups of one varint do not overlap, so their sum is the value.
    values = np.add.reduceat(parts, starts)
    return values.astype(np.int64), pos + int(ends[-1]) + 1


def as_format_error(exc: BaseException, what: str) -> BaseException:
    """The exception to raise for ``exc`` escaping a native decoder.

    Native decoders raise assorted types (zlib.error, OSError, EOFError, LZMAError, ZstdError, constriction's
    AssertionError, pyo3's PanicException which derives from BaseException): callers catch one type, FormatError.
    Interpreter-control exceptions pass through unchanged.
    """
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, FormatError)):
        return exc
    error = FormatError("corrupt_payload", f"{what}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


# --------------------------------------------------------------------------------------------------------------
# Interface and registry
# --------------------------------------------------------------------------------------------------------------


class Coder(abc.ABC):
    """A lossless coder of index streams, registered under a versioned ``name``.

    ``decode(encode(s, K), len(s), K)`` returns ``s`` as int64. The name's version suffix changes whenever the byte
    layout or the algorithm changes, so a stored name always identifies how to read the payload.
    """

    name: str = ""
    #: Largest alphabet size this coder accepts.
    max_alphabet_size: int = MAX_ALPHABET

    @abc.abstractmethod
    def encode(self, symbols: np.ndarray, alphabet_size: int) -> bytes:
        """Code a 1-D integer array with values in ``[0, alphabet_size)``.

        Raises:
            ConfigError: (a ``ValueError``) for a non-integer dtype, a value outside ``[0, alphabet_size)``, a
                stream that is not 1-D, or an alphabet this coder cannot handle.
        """

    def cost_bits(self, symbols: np.ndarray, alphabet_size: int, **hints: Any) -> float:
        """The size in bits :meth:`encode` gives ``symbols`` with the same keyword ``hints`` (a rate estimate).

        The default codes the stream and counts its bytes (exact); a coder that can count its output without coding
        it (:class:`~udnc_fx.coding.ans.AnsDitherCoder`) overrides this with a cheaper estimate.
        """
        return 8.0 * len(self.encode(np.ascontiguousarray(symbols, dtype=np.int64), alphabet_size, **hints))

    def decode(self, data: bytes, count: int, alphabet_size: int) -> np.ndarray:
        """Decode ``count`` symbols; returns an int64 array of length ``count``.

        ``count`` and ``alphabet_size`` come from the caller (the container header), which must bound them: a
        valid payload may legitimately expand to far more symbols than it has bytes.

        Raises:
            FormatError: ``truncated``, ``corrupt_payload`` or ``bad_value`` when ``data`` is not a valid payload
                for ``count`` symbols over ``alphabet_size`` (including when ``count`` symbols cannot be allocated).
            ConfigError: for arguments of the wrong type (not bytes-like, not integers).
        """
        view, n, k = check_decode_args(data, count, alphabet_size, self.max_alphabet_size)
        try:
            out = self._decode(view, n, k)
        except MemoryError as exc:
            raise FormatError("bad_value", f"{self.name}: cannot allocate {n} symbols") from exc
        except BaseException as exc:  # noqa: BLE001 -- see as_format_error
            raise as_format_error(exc, self.name)
        # Every coder already checks this; re-checked here so no coder can break the contract.
        if out.shape != (n,) or (n and (int(out.min()) < 0 or int(out.max()) >= k)):
            raise FormatError("corrupt_payload", f"{self.name}: decoded symbols outside [0, {k})")
        return out

    @abc.abstractmethod
    def _decode(self, view: memoryview, n: int, k: int) -> np.ndarray:
        """Decode ``n`` symbols over ``k`` from validated arguments; any exception becomes a FormatError."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


_REGISTRY: dict[str, Coder] = {}


def register(coder: Coder) -> Coder:
    if coder.name in _REGISTRY:
        raise ValueError(f"coder {coder.name!r} registered twice")
    _REGISTRY[coder.name] = coder
    return coder


#: Integer dtypes :func:`encode_stream` hands as they are to a coder with ``accepts_narrow``.
_NARROW_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64))


def encode_stream(coder: Coder, symbols: np.ndarray, alphabet_size: int, what: str, **hints: Any) -> bytes:
    """``coder.encode`` of int64 ``symbols`` with its keyword ``hints`` (context, row length); any failure other than
    a ``FormatError`` becomes ``FormatError("bad_value")`` naming ``what`` (a writer meeting input it cannot code)."""
    arr = np.asarray(symbols)
    # Coders that take narrow integer streams (``accepts_narrow``) get them as they are: no int64 copy of a tensor's
    # indices (8 bytes per symbol) while it is coded.
    narrow = getattr(coder, "accepts_narrow", False) and arr.dtype in _NARROW_DTYPES
    try:
        return bytes(coder.encode(np.ascontiguousarray(arr, dtype=None if narrow else np.int64), alphabet_size, **hints))
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError("bad_value", f"{what}: coder {coder.name!r} failed to encode: {exc}") from exc


def decode_stream(
    coder: Coder, data: bytes, count: int, alphabet_size: int, what: str, *, context: Any = None, dtype: Any = None
) -> np.ndarray:
    """The twin of :func:`encode_stream`: ``coder.decode`` of ``count`` symbols, checked for the caller.

    ``context`` (the dither codes, or a function giving them) is handed to the coder when given; ``dtype`` only to
    coders that accept one (decoded straight into the dtype kept: no int64 copy of the stream).

    Raises:
        FormatError: ``bad_value`` naming ``what`` for a stream that does not decode, a coder that returns the wrong
            number or type of symbols, or symbols outside ``[0, alphabet_size)``, and no other exception.
    """
    kwargs: dict[str, Any] = {} if context is None else {"context": context}
    if dtype is not None and getattr(coder, "accepts_dtype", False):
        kwargs["dtype"] = dtype
    try:
        out = coder.decode(data, count, alphabet_size, **kwargs)
    except FormatError as exc:
        raise FormatError("bad_value", f"{what}: stream does not decode: {exc.message}") from exc
    except Exception as exc:  # a coder meeting bytes it did not write may fail in any way
        raise FormatError("bad_value", f"{what}: stream does not decode: {type(exc).__name__}: {exc}") from exc
    try:
        out = np.asarray(out)
        ok = out.dtype.kind in "iu" and out.shape == (count,)
    except Exception:
        ok = False
    if not ok:
        raise FormatError("bad_value", f"{what}: the coder returned the wrong number or type of symbols")
    if count and (int(out.min()) < 0 or int(out.max()) >= alphabet_size):
        raise FormatError("bad_value", f"{what}: decoded symbols outside [0, {alphabet_size})")
    return out


def get_coder(name: str) -> Coder:
    """Return the coder registered under ``name`` (e.g. ``"range-adaptive-v1"``).

    Raises:
        FormatError: kind ``unknown_codec`` if no coder has that name (a container from a newer version, or a typo).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise FormatError(
            "unknown_codec", f"unknown coder {name!r}; available: {', '.join(available_coders())}"
        ) from None


def available_coders() -> list[str]:
    """Names of all registered coders, sorted."""
    return sorted(_REGISTRY)


def empirical_entropy_bits(symbols: np.ndarray, alphabet_size: int) -> float:
    """Order-0 empirical entropy of the whole stream in bits (``count * H(histogram)``, not per symbol).

    This is the size an ideal static code with a free, perfectly matched table would reach; the figure of merit for
    the coders.
    """
    arr, k = check_symbols(symbols, alphabet_size)
    n = arr.size
    if n == 0:
        return 0.0
    counts = histogram(arr, k)[1].astype(np.float64)
    return float(n * math.log2(n) - np.sum(counts * np.log2(counts)))

"""Lossless coders for codeword-index streams (NumPy only: decoding never needs torch).

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
"""

from __future__ import annotations

import abc
import bz2
import lzma
import math
import zlib
from typing import Any

import numpy as np

from udnc_fx.errors import ConfigError, FormatError

__all__ = [
    "Coder",
    "ByteCompressorCoder",
    "Bz2Coder",
    "LzmaCoder",
    "ZlibCoder",
    "ZstdCoder",
    "RangeAdaptiveCoder",
    "RangeContextCoder",
    "HuffmanStaticCoder",
    "DEFAULT_CODER",
    "get_coder",
    "available_coders",
    "empirical_entropy_bits",
]

#: The index coder new files use (save, QuantizedTensor, the ONNX sidecar): static ANS conditioned on the dither,
#: defined in ``udnc_fx.coding.ans`` (registered when ``udnc_fx.coding`` is imported).
DEFAULT_CODER = "ans-dither-v1"

# The byte-oriented coders pack symbols in at most 4 bytes.
_MAX_ALPHABET = 1 << 32


# --------------------------------------------------------------------------------------------------------------
# Argument checking shared by every coder
# --------------------------------------------------------------------------------------------------------------


def _check_alphabet(alphabet_size: Any, limit: int) -> int:
    if isinstance(alphabet_size, (bool, np.bool_)) or not isinstance(alphabet_size, (int, np.integer)):
        raise ConfigError(f"alphabet_size must be an integer, got {type(alphabet_size).__name__}")
    k = int(alphabet_size)
    if k < 1 or k > limit:
        raise ConfigError(f"alphabet_size must be in [1, {limit}], got {k}")
    return k


def _check_symbols(symbols: Any, alphabet_size: Any, limit: int = _MAX_ALPHABET) -> tuple[np.ndarray, int]:
    """Validate an index stream; returns it as a 1-D int64 array and ``K`` as an int."""
    k = _check_alphabet(alphabet_size, limit)
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
    return arr.astype(np.int64, copy=False), k


def _check_decode_args(data: Any, count: Any, alphabet_size: Any, limit: int) -> tuple[memoryview, int, int]:
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


def _histogram(arr: np.ndarray, k: int, with_rank: bool = False) -> tuple[np.ndarray, ...]:
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


def _symbol_width(alphabet_size: int) -> int:
    """Bytes per symbol: the narrowest of 1, 2, 4 that holds the largest symbol, ``alphabet_size - 1``."""
    top = alphabet_size - 1
    return 1 if top < (1 << 8) else 2 if top < (1 << 16) else 4


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
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


def _varints(values: np.ndarray) -> bytes:
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


def _read_varints(view: memoryview, pos: int, n: int) -> tuple[np.ndarray, int]:
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


def _as_format_error(exc: BaseException, what: str) -> BaseException:
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
    max_alphabet_size: int = _MAX_ALPHABET

    @abc.abstractmethod
    def encode(self, symbols: np.ndarray, alphabet_size: int) -> bytes:
        """Code a 1-D integer array with values in ``[0, alphabet_size)``.

        Raises:
            ConfigError: (a ``ValueError``) for a non-integer dtype, a value outside ``[0, alphabet_size)``, a
                stream that is not 1-D, or an alphabet this coder cannot handle.
        """

    def decode(self, data: bytes, count: int, alphabet_size: int) -> np.ndarray:
        """Decode ``count`` symbols; returns an int64 array of length ``count``.

        ``count`` and ``alphabet_size`` come from the caller (the container header), which must bound them: a
        valid payload may legitimately expand to far more symbols than it has bytes.

        Raises:
            FormatError: ``truncated``, ``corrupt_payload`` or ``bad_value`` when ``data`` is not a valid payload
                for ``count`` symbols over ``alphabet_size`` (including when ``count`` symbols cannot be allocated).
            ConfigError: for arguments of the wrong type (not bytes-like, not integers).
        """
        view, n, k = _check_decode_args(data, count, alphabet_size, self.max_alphabet_size)
        try:
            out = self._decode(view, n, k)
        except MemoryError as exc:
            raise FormatError("bad_value", f"{self.name}: cannot allocate {n} symbols") from exc
        except BaseException as exc:  # noqa: BLE001 -- see _as_format_error
            raise _as_format_error(exc, self.name)
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


def _register(coder: Coder) -> Coder:
    if coder.name in _REGISTRY:
        raise ValueError(f"coder {coder.name!r} registered twice")
    _REGISTRY[coder.name] = coder
    return coder


def encode_stream(coder: Coder, symbols: np.ndarray, alphabet_size: int, what: str, **hints: Any) -> bytes:
    """``coder.encode`` of int64 ``symbols`` with its keyword ``hints`` (context, row length); any failure other than
    a ``FormatError`` becomes ``FormatError("bad_value")`` naming ``what`` (a writer meeting input it cannot code)."""
    try:
        return bytes(coder.encode(np.ascontiguousarray(symbols, dtype=np.int64), alphabet_size, **hints))
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError("bad_value", f"{what}: coder {coder.name!r} failed to encode: {exc}") from exc


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
    arr, k = _check_symbols(symbols, alphabet_size)
    n = arr.size
    if n == 0:
        return 0.0
    counts = _histogram(arr, k)[1].astype(np.float64)
    return float(n * math.log2(n) - np.sum(counts * np.log2(counts)))


# --------------------------------------------------------------------------------------------------------------
# General-purpose (universal, dictionary/BWT based) compressors over packed symbols
# --------------------------------------------------------------------------------------------------------------


class ByteCompressorCoder(Coder):
    """Symbols packed little-endian in the narrowest width of 1, 2 or 4 bytes, then a byte compressor.

    Payload: ``width`` (1 byte: 1, 2 or 4, equal to the narrowest width that holds ``alphabet_size - 1``) followed by
    the compressor's own self-delimiting stream of exactly ``count * width`` bytes (subclasses say which stream).
    Trailing bytes after the compressed stream are an error.
    """

    def encode(self, symbols: np.ndarray, alphabet_size: int) -> bytes:
        arr, k = _check_symbols(symbols, alphabet_size, self.max_alphabet_size)
        width = _symbol_width(k)
        raw = arr.astype(f"<u{width}").tobytes()
        return bytes([width]) + self._compress(raw)

    def _decode(self, view: memoryview, n: int, k: int) -> np.ndarray:
        width = _symbol_width(k)
        if len(view) < 1:
            raise FormatError("truncated", f"{self.name}: empty payload")
        if view[0] != width:
            raise FormatError("corrupt_payload", f"{self.name}: symbol width {view[0]}, expected {width}")
        expected = n * width
        raw = self._decompress(view[1:], expected)
        if len(raw) != expected:
            raise FormatError("corrupt_payload", f"{self.name}: {len(raw)} bytes decoded, expected {expected}")
        out = np.frombuffer(raw, f"<u{width}").astype(np.int64)
        if n and int(out.max()) >= k:
            raise FormatError("corrupt_payload", f"{self.name}: symbol {int(out.max())} >= alphabet_size {k}")
        return out

    @abc.abstractmethod
    def _compress(self, raw: bytes) -> bytes: ...

    @abc.abstractmethod
    def _decompress(self, body: memoryview, expected: int) -> bytes:
        """Return the decompressed bytes, reading at most ``expected + 1`` of them; raise on trailing input."""

    def _drain(self, decompressor: Any, body: memoryview, expected: int) -> bytes:
        # bz2/lzma/zlib decompressor objects: cap the output (a hostile stream may expand enormously), then insist
        # on a clean end of stream and no trailing input.
        raw = decompressor.decompress(body, expected + 1)
        if len(raw) > expected:
            raise FormatError("corrupt_payload", f"{self.name}: stream holds more than {expected} bytes")
        if not decompressor.eof:
            raise FormatError("truncated", f"{self.name}: compressed stream ends early")
        if decompressor.unused_data:
            raise FormatError("corrupt_payload", f"{self.name}: {len(decompressor.unused_data)} trailing bytes")
        return raw


class Bz2Coder(ByteCompressorCoder):
    """bzip2 (BWT) at level 9 over packed symbols.

    Payload: ``width`` (u8) + one bzip2 stream (``BZh9``...), as written by ``bz2.compress(raw, 9)``.
    """

    name = "bz2-v1"

    def _compress(self, raw: bytes) -> bytes:
        return bz2.compress(raw, 9)

    def _decompress(self, body: memoryview, expected: int) -> bytes:
        return self._drain(bz2.BZ2Decompressor(), body, expected)


class ZlibCoder(ByteCompressorCoder):
    """DEFLATE at level 9 over packed symbols.

    Payload: ``width`` (u8) + one zlib stream (RFC 1950: 2-byte header, DEFLATE data, Adler-32), as written by
    ``zlib.compress(raw, 9)`` (window 2**15).
    """

    name = "zlib-v1"

    def _compress(self, raw: bytes) -> bytes:
        return zlib.compress(raw, 9)

    def _decompress(self, body: memoryview, expected: int) -> bytes:
        return self._drain(zlib.decompressobj(), body, expected)


class LzmaCoder(ByteCompressorCoder):
    """LZMA (preset 9 | extreme) over packed symbols, in the legacy ``.lzma`` ("LZMA_Alone") container.

    Payload: ``width`` (u8) + an LZMA_Alone stream: 13-byte header (properties byte ``lc/lp/pb``, u32 LE dictionary
    size, u64 LE uncompressed size = ``0xFFFF_FFFF_FFFF_FFFF`` "unknown") then LZMA1 data ended by an end marker.
    The dictionary size is the smallest power of two >= the packed input (at least 4 KiB, at most 64 MiB, the
    preset-9 size): it compresses exactly as well as preset 9's 64 MiB dictionary (a dictionary larger than the
    input finds no more matches) without allocating hundreds of MiB for every small stream. Decoding refuses
    streams that would need more than 256 MiB of memory.
    """

    name = "lzma-v1"
    _MEMLIMIT = 1 << 28

    def _compress(self, raw: bytes) -> bytes:
        dict_size = min(max(1 << 12, 1 << max(0, len(raw) - 1).bit_length()), 1 << 26)
        filters = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}]
        return lzma.compress(raw, format=lzma.FORMAT_ALONE, filters=filters)

    def _decompress(self, body: memoryview, expected: int) -> bytes:
        return self._drain(lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=self._MEMLIMIT), body, expected)


class ZstdCoder(ByteCompressorCoder):
    """Zstandard level 19 over packed symbols (python-zstandard, single-threaded, so deterministic).

    Payload: ``width`` (u8) + one zstd frame (RFC 8878) with no checksum, whose header must declare the content
    size (``count * width``); the empty stream is exactly the frame ``28 b5 2f fd 20 00 01 00 00``. Level 19 is used
    rather than 22: on 1-8 M-symbol Laplacian streams both gave identical sizes and 22 encoded up to 1.5x slower.
    Decoding refuses windows above 128 MiB.
    """

    name = "zstd-v1"
    _LEVEL = 19
    _MAX_WINDOW = 1 << 27

    def _compress(self, raw: bytes) -> bytes:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=self._LEVEL, write_checksum=False, write_content_size=True)
        return cctx.compress(raw)

    def _decompress(self, body: memoryview, expected: int) -> bytes:
        import zstandard

        body_bytes = bytes(body)
        if expected == 0:
            # python-zstandard returns b"" for a zero-size frame without reading past its header: compare with the
            # one frame our encoder writes for empty input instead.
            if body_bytes != self._compress(b""):
                raise FormatError("corrupt_payload", f"{self.name}: not the empty-stream frame")
            return b""
        # decompress() allocates whatever size the frame header declares: check it is what we expect first.
        declared = zstandard.frame_content_size(body_bytes)
        if declared != expected:
            raise FormatError("corrupt_payload", f"{self.name}: frame declares {declared} bytes, expected {expected}")
        dctx = zstandard.ZstdDecompressor(max_window_size=self._MAX_WINDOW)
        return dctx.decompress(body_bytes, allow_extra_data=False)


def _check_consumed(mirror, words: np.ndarray, name: str) -> None:
    """Insist that the decoded symbols are exactly what ``words`` encode: re-encoding them (``mirror`` was fed every
    block with the model it was decoded with) must give the same words back.

    A range decoder reading past its input pretends the missing words are zeros, and one that stops early leaves
    words unread: without this check a payload decoded for more or fewer symbols than it holds, or with its last
    word dropped, "succeeds" with wrong symbols. Re-encoding costs one native call per block, next to nothing
    beside the model updates.
    """
    again = mirror.get_compressed()
    if again.shape != words.shape or not np.array_equal(again.astype(np.uint32, copy=False), words):
        raise FormatError(
            "corrupt_payload", f"{name}: the stream does not hold exactly the declared symbols (not consumed exactly)"
        )


# --------------------------------------------------------------------------------------------------------------
# Backward-adaptive range coder (the default)
# --------------------------------------------------------------------------------------------------------------


def _cost_fixed_point(weights: np.ndarray) -> np.ndarray:
    """Approximate code length, in bits * 2**16, of symbols with integer weights in [1, 2**24] out of 2**24.

    Integer only: ``24 - log2(w)`` with log2 by Mitchell's approximation ``e + (w - 2**e) / 2**e``, ``e`` =
    floor(log2 w); i.e. ``((25 - e) << 16) - ((w << 16) >> e)``. (``e`` comes from ``frexp``, which is exact for
    integers below 2**53.) Within 0.09 bit of the exact length, and bit-identical everywhere: the model choice it
    drives must be.
    """
    e = np.frexp(weights)[1] - 1
    return ((25 - e).astype(np.int64) << 16) - ((weights << 16) >> e)


class _AdaptiveModel:
    """The block-adaptive frequency model shared, code path for code path, by the range encoder and decoder.

    Two count sets over the same stream -- a slow one that remembers everything and a fast one that forgets (halved
    whenever it holds more than FAST_LIMIT symbols) -- and, for each block, the one that would have coded the recent
    blocks more cheaply. Integer arithmetic only (int64 NumPy), so the encoder and any decoder rebuild bit-identical
    weights and make the same choices. Row 0 of the arrays is the slow model, row 1 the fast one.
    """

    PRECISION = 24  # constriction's default range coder: probabilities are integers out of 2**24
    INCREMENT = 1024  # weight of one observed symbol
    PRIOR_MASS = 32 * 1024  # total prior weight spread over the alphabet (32 pseudo-observations) ...
    PRIOR_MAX = 512  # ... but at most half an observation per symbol (Krichevsky-Trofimov) for small alphabets
    FIRST_BLOCK = 16
    MAX_BLOCK = 256
    SLOW_LIMIT = 1 << 28  # keeps weight * free below 2**63
    FAST_LIMIT = 1 << 11

    def __init__(self, alphabet_size: int):
        k = alphabet_size
        self.k = k
        self.free = (1 << self.PRECISION) - k
        self.prior = min(self.PRIOR_MAX, max(1, self.PRIOR_MASS // k))
        self.limits = (self.SLOW_LIMIT, self.FAST_LIMIT)
        self.counts = np.zeros((2, k), np.int64)
        self.totals = [0, 0]
        # weights = prior + INCREMENT * counts and masses = their row sums, kept up to date incrementally
        self.weights = np.full((2, k), self.prior, np.int64)
        self.masses = np.full((2, 1), self.prior * k, np.int64)
        self.scores = [0, 0]  # decayed cost (bits * 2**16) each model would have spent on the recent blocks
        self.max_block = max(self.MAX_BLOCK, k)
        self.block = self.FIRST_BLOCK
        self._free = np.zeros((2, k), np.int64)
        self._rows = np.arange(2)

    def next_block_length(self) -> int:
        length = self.block
        self.block = min(2 * self.block, self.max_block)
        return length

    def probabilities(self) -> np.ndarray:
        """The next block's free weights f_i (sum exactly 2**24 - K) as float64; symbol i gets f_i + 1."""
        free = self.weights * self.free
        free //= self.masses
        free[self._rows, np.argmax(self.weights, axis=1)] += self.free - free.sum(axis=1)
        self._free = free
        return free[1 if self.scores[1] < self.scores[0] else 0].astype(np.float64)

    def update(self, block: np.ndarray) -> None:
        """Account for the block just coded with the weights ``probabilities`` returned."""
        histogram = np.bincount(block, minlength=self.k)
        costs = (_cost_fixed_point(self._free + 1) @ histogram).tolist()
        size = int(block.size)
        self.counts += histogram
        self.weights += self.INCREMENT * histogram
        self.masses += self.INCREMENT * size
        for row in (0, 1):
            self.scores[row] = self.scores[row] - (self.scores[row] >> 1) + costs[row]
            self.totals[row] += size
            if self.totals[row] > self.limits[row]:
                counts = self.counts[row]
                while self.totals[row] > self.limits[row]:
                    counts >>= 1
                    self.totals[row] = int(counts.sum())
                self.weights[row] = self.prior + self.INCREMENT * counts
                self.masses[row] = self.prior * self.k + self.INCREMENT * self.totals[row]


class RangeAdaptiveCoder(Coder):
    """Range coding with a backward-adaptive model: universal (no table stored), within a fraction of a percent of
    the empirical order-0 entropy on long stationary streams, and below it on streams whose statistics drift.

    Payload (``count == 0`` or ``alphabet_size == 1``: zero bytes): ``W`` (varint) then ``W`` 32-bit words,
    little-endian, as produced by constriction's ``stream.queue.RangeEncoder`` (``DefaultRangeEncoder``: 32-bit
    words, 64-bit state, 24-bit probability precision) coding every symbol in order with the model below. The
    payload length must be exactly ``len(varint(W)) + 4 W``.

    The model (integer arithmetic throughout; ``K`` = alphabet size, ``F = 2**24 - K``,
    ``a = min(512, max(1, 32768 // K))`` the prior weight of every symbol):

    - Two count vectors, *slow* ``s`` and *fast* ``q`` (all zero at the start, totals ``S`` and ``Q``), and two
      scores ``σ_s = σ_q = 0``.
    - The stream is cut into blocks of 16, 32, 64, ... symbols, doubling up to ``max(256, K)`` and constant from
      then on (the last block may be shorter).
    - Before each block, each count vector ``c`` (total ``C``) gives weights ``m_i = a + 1024 c_i``,
      ``M = a K + 1024 C`` and free weights ``f_i = floor(m_i F / M)``, then ``F - sum f_i`` added to ``f_j`` for
      the first ``j`` with the largest ``m_j``. The block is coded with the fast model's weights if ``σ_q < σ_s``,
      else the slow model's: symbol ``i`` has probability ``(f_i + 1) / 2**24`` (cdf
      ``cum_i = i + sum_{j<i} f_j``). (constriction's ``Categorical(f, perfect=False)`` is handed the ``f_i`` as
      float64; as they are integers summing to ``F``, its fixed-point conversion yields exactly these weights.)
    - After the block, with ``h_i`` its histogram: each model's score becomes ``σ - (σ >> 1) + sum_i h_i L(f_i + 1)``
      with that model's ``f`` for the block, where ``L(w) = ((25 - e) << 16) - ((w << 16) >> e)``,
      ``e = floor(log2 w)`` (Mitchell's approximation of ``2**16 (24 - log2 w)``, the symbol's cost in bits).
      Then ``s += h``, ``q += h``; while ``S > 2**28``: ``s_i >>= 1`` for all ``i``; while ``Q > 2048``:
      ``q_i >>= 1`` for all ``i`` (totals recomputed after each halving).

    The fast model remembers about the last 2048 symbols, so it follows runs such as the rows of dead units or
    pruned channels (8-10 % below the order-0 entropy on such a layer), while the choice by recent cost keeps
    stationary streams on the slow model (within 0.1 % of the entropy from 10**5 symbols). Small first blocks let
    the model learn quickly; blocks of at most 256 symbols (or ``K``) react to drift, and at least ``K`` symbols
    keep the O(K) rebuild of the model per block at O(1) per symbol. Supports ``2 <= K <= 2**24 - 2``
    (``K = 1`` costs nothing).
    """

    name = "range-adaptive-v1"
    max_alphabet_size = (1 << _AdaptiveModel.PRECISION) - 2

    def encode(self, symbols: np.ndarray, alphabet_size: int) -> bytes:
        arr, k = _check_symbols(symbols, alphabet_size, self.max_alphabet_size)
        n = arr.size
        if n == 0 or k == 1:
            return b""
        import constriction

        categorical = constriction.stream.model.Categorical
        encoder = constriction.stream.queue.RangeEncoder()
        model = _AdaptiveModel(k)
        sym32 = arr.astype(np.int32)
        pos = 0
        while pos < n:
            end = min(n, pos + model.next_block_length())
            encoder.encode(sym32[pos:end], categorical(model.probabilities(), perfect=False))
            model.update(arr[pos:end])
            pos = end
        words = encoder.get_compressed().astype("<u4", copy=False)
        return _varint(int(words.size)) + words.tobytes()

    def _decode(self, view: memoryview, n: int, k: int) -> np.ndarray:
        if n == 0 or k == 1:
            if len(view):
                raise FormatError("corrupt_payload", f"{self.name}: expected an empty payload, got {len(view)} bytes")
            return np.zeros(n, np.int64)
        nwords, pos = _read_varint(view, 0)
        if len(view) - pos != 4 * nwords:
            kind = "truncated" if len(view) - pos < 4 * nwords else "corrupt_payload"
            raise FormatError(kind, f"{self.name}: {len(view) - pos} payload bytes, header says {4 * nwords}")
        import constriction

        categorical = constriction.stream.model.Categorical
        out = np.empty(n, np.int64)
        model = _AdaptiveModel(k)
        words = np.frombuffer(view[pos:], "<u4").astype(np.uint32)
        decoder = constriction.stream.queue.RangeDecoder(words)
        mirror = constriction.stream.queue.RangeEncoder()
        start = 0
        while start < n:
            end = min(n, start + model.next_block_length())
            probabilities = categorical(model.probabilities(), perfect=False)
            block = decoder.decode(probabilities, end - start)
            block = np.asarray(block, np.int64)
            if block.shape != (end - start,) or (block.size and (block.min() < 0 or block.max() >= k)):
                raise FormatError("corrupt_payload", f"{self.name}: decoder returned invalid symbols")
            mirror.encode(block.astype(np.int32), probabilities)
            out[start:end] = block
            model.update(block)
            start = end
        _check_consumed(mirror, words, self.name)
        return out


# --------------------------------------------------------------------------------------------------------------
# Range coding with a per-row density context (pruned weights)
# --------------------------------------------------------------------------------------------------------------


def _bit_lengths(values: np.ndarray) -> np.ndarray:
    """``int.bit_length`` of non-negative int64 values below 2**53, vectorised (0 -> 0)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


class RangeContextCoder(Coder):
    """Range coding of pruned streams with a per-row context: the density of non-zero symbols in each row.

    Magnitude pruning leaves some output units nearly dead and others dense (on the demo CNN's ``fc1`` at 80 %
    sparsity, half the rows keep under 6 % of their weights, the rest about 33 %); an order-0 model pays the
    average density's price on every row. This coder sends each row's count of non-zero symbols, then the zero /
    non-zero mask of the row with that row's density as its probability, then the non-zero symbols with the
    backward-adaptive model of ``range-adaptive-v1``. Every part is coded in whole arrays (no per-symbol Python
    loop), so it scales like ``range-adaptive-v1``. When the row model does not pay (no row structure, a flat
    stream, short rows), the payload is ``range-adaptive-v1``'s behind one mode byte.

    ``encode(symbols, K, row_length=L)`` takes the row length as a hint (``udnc_fx``'s container passes the
    weight's elements per output unit, over ``n``); without it only the flat mode is tried.

    Payload (``count == 0`` or ``alphabet_size == 1``: zero bytes), a mode byte then:

    - mode ``0``: a ``range-adaptive-v1`` payload of the same symbols.
    - mode ``1``: ``L`` (varint, ``1 <= L < 2**24``: the row length; rows are ``L`` symbols, the last one
      possibly shorter), ``z`` (varint, ``< K``: the *zero* symbol, the writer's most frequent one), ``W``
      (varint) and ``W`` 32-bit little-endian words of one constriction ``stream.queue.RangeEncoder`` stream
      holding, in order (probabilities are integer weights out of ``2**24`` as in ``range-adaptive-v1``):

      a. for each row, ``b = bit_length(k)`` where ``k`` is the row's count of symbols ``!= z``, with the
         ``range-adaptive-v1`` model (blocks and all) over the alphabet ``bit_length(L) + 1``;
      b. for each row with ``b >= 2``, the ``b - 1`` low bits of ``k``, most significant first, each with
         probability 1/2 (``k = 2**(b-1) + those bits``; ``b`` in {0, 1} means ``k = b``); a ``k`` larger than
         the row is invalid;
      c. for each row with ``0 < k < len`` (``len`` the row's length), its mask, one symbol per position (``1``
         where the symbol is ``!= z``) with weights ``w1 = 1 + floor(k (2**24 - 2) / len)`` for ``1`` and
         ``2**24 - w1`` for ``0``; rows with ``k = 0`` or ``k = len`` have no mask. The decoded mask of a row must
         hold exactly ``k`` ones;
      d. the symbols ``!= z`` in stream order, each ``s`` mapped to ``s - (s > z)``, with the
         ``range-adaptive-v1`` model over the alphabet ``K - 1`` (nothing when ``K = 2``).

    The writer picks mode 1 only when it is smaller (a tie keeps mode 0). Supports ``2 <= K <= 2**24 - 2``.
    """

    name = "range-context-v1"
    max_alphabet_size = (1 << _AdaptiveModel.PRECISION) - 2
    #: ``encode`` takes ``row_length=``; the container hands it the weight's row length.
    accepts_row_length = True
    _MAX_ROW = (1 << 24) - 1
    _CHUNK = 1 << 18  # mask symbols per constriction call (bounds the per-symbol weight arrays)
    _HALF = np.array([(1 << 23) - 1, (1 << 23) - 1], np.float64)
    _FLAT, _ROWS = 0, 1

    def encode(self, symbols: np.ndarray, alphabet_size: int, *, row_length: int | None = None) -> bytes:
        arr, k = _check_symbols(symbols, alphabet_size, self.max_alphabet_size)
        n = arr.size
        if n == 0 or k == 1:
            return b""
        flat = bytes([self._FLAT]) + _REGISTRY["range-adaptive-v1"].encode(arr, k)
        if row_length is None:
            return flat
        if isinstance(row_length, (bool, np.bool_)) or not isinstance(row_length, (int, np.integer)):
            raise ConfigError(f"row_length must be an integer, got {type(row_length).__name__}")
        length = int(row_length)
        if not 1 <= length <= self._MAX_ROW:
            raise ConfigError(f"row_length must be in [1, {self._MAX_ROW}], got {length}")
        rows = self._encode_rows(arr, k, min(length, n))
        return rows if len(rows) < len(flat) else flat

    # -- mode 1 --

    @staticmethod
    def _row_layout(n: int, length: int) -> tuple[int, np.ndarray]:
        rows = -(-n // length)
        lens = np.full(rows, length, np.int64)
        lens[-1] = n - length * (rows - 1)
        return rows, lens

    @staticmethod
    def _code_adaptive(encoder, symbols: np.ndarray, k: int) -> None:
        import constriction

        categorical = constriction.stream.model.Categorical
        model = _AdaptiveModel(k)
        sym32 = symbols.astype(np.int32)
        pos = 0
        while pos < symbols.size:
            end = min(symbols.size, pos + model.next_block_length())
            encoder.encode(sym32[pos:end], categorical(model.probabilities(), perfect=False))
            model.update(symbols[pos:end])
            pos = end

    @staticmethod
    def _decode_adaptive(decoder, n: int, k: int, what: str, mirror) -> np.ndarray:
        """Decode ``n`` symbols with the adaptive model, re-encoding each block into ``mirror`` (exactness check)."""
        import constriction

        categorical = constriction.stream.model.Categorical
        out = np.empty(n, np.int64)
        model = _AdaptiveModel(k)
        start = 0
        while start < n:
            end = min(n, start + model.next_block_length())
            probabilities = categorical(model.probabilities(), perfect=False)
            block = np.asarray(decoder.decode(probabilities, end - start), np.int64)
            if block.shape != (end - start,) or (block.size and (block.min() < 0 or block.max() >= k)):
                raise FormatError("corrupt_payload", f"range-context-v1: {what}: invalid symbols")
            mirror.encode(block.astype(np.int32), probabilities)
            out[start:end] = block
            model.update(block)
            start = end
        return out

    @classmethod
    def _mask_weights(cls, counts: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """Free weights ``(f0, f1)`` per masked row (they sum to 2**24 - 2; symbol i has weight f_i + 1)."""
        w1 = 1 + (counts * ((1 << 24) - 2)) // lens
        return np.stack([(1 << 24) - w1 - 1, w1 - 1], axis=1).astype(np.float64)

    @classmethod
    def _mask_chunks(cls, weights: np.ndarray, lens: np.ndarray):
        """Per-symbol weight arrays of the masked rows, in chunks of at most about _CHUNK symbols."""
        start = 0
        while start < lens.size:
            stop, total = start, 0
            while stop < lens.size and (total == 0 or total + int(lens[stop]) <= cls._CHUNK):
                total += int(lens[stop])
                stop += 1
            yield total, np.repeat(weights[start:stop], lens[start:stop], axis=0)
            start = stop

    def _encode_rows(self, arr: np.ndarray, k: int, length: int) -> bytes:
        import constriction

        categorical = constriction.stream.model.Categorical
        n = arr.size
        zero = int(np.argmax(np.bincount(arr, minlength=k)))  # the most frequent symbol, smallest on a tie
        rows, lens = self._row_layout(n, length)
        nonzero = arr != zero
        padded = np.zeros(rows * length, bool)
        padded[:n] = nonzero
        counts = padded.reshape(rows, length).sum(axis=1).astype(np.int64)
        encoder = constriction.stream.queue.RangeEncoder()
        # a. bit lengths of the counts
        bits = _bit_lengths(counts)
        self._code_adaptive(encoder, bits, length.bit_length() + 1)
        # b. the counts' low bits
        nlow = np.maximum(bits - 1, 0)
        if int(nlow.sum()):
            owner = np.repeat(np.arange(rows), nlow)
            j = np.arange(owner.size) - np.repeat(np.cumsum(nlow) - nlow, nlow)
            low = (counts[owner] >> (nlow[owner] - 1 - j)) & 1
            encoder.encode(low.astype(np.int32), categorical(self._HALF, perfect=False))
        # c. masks of the mixed rows
        mixed = (counts > 0) & (counts < lens)
        if mixed.any():
            weights = self._mask_weights(counts[mixed], lens[mixed])
            in_mixed = np.repeat(mixed, lens)
            mask = nonzero[in_mixed].astype(np.int32)
            family = categorical(perfect=False)
            pos = 0
            for total, probs in self._mask_chunks(weights, lens[mixed]):
                encoder.encode(mask[pos : pos + total], family, probs)
                pos += total
        # d. the non-zero symbols
        if k > 2:
            rest = arr[nonzero]
            self._code_adaptive(encoder, rest - (rest > zero), k - 1)
        words = encoder.get_compressed().astype("<u4", copy=False)
        head = bytes([self._ROWS]) + _varint(length) + _varint(zero)
        return head + _varint(int(words.size)) + words.tobytes()

    def _decode(self, view: memoryview, n: int, k: int) -> np.ndarray:
        if n == 0 or k == 1:
            if len(view):
                raise FormatError("corrupt_payload", f"{self.name}: expected an empty payload, got {len(view)} bytes")
            return np.zeros(n, np.int64)
        if len(view) < 1:
            raise FormatError("truncated", f"{self.name}: empty payload")
        mode = view[0]
        if mode == self._FLAT:
            return _REGISTRY["range-adaptive-v1"]._decode(view[1:], n, k)
        if mode != self._ROWS:
            raise FormatError("corrupt_payload", f"{self.name}: unknown mode {mode}")
        length, pos = _read_varint(view, 1)
        zero, pos = _read_varint(view, pos)
        if not 1 <= length <= self._MAX_ROW:
            raise FormatError("corrupt_payload", f"{self.name}: row length {length} outside [1, {self._MAX_ROW}]")
        if zero >= k:
            raise FormatError("corrupt_payload", f"{self.name}: zero symbol {zero} >= alphabet_size {k}")
        nwords, pos = _read_varint(view, pos)
        if len(view) - pos != 4 * nwords:
            kind = "truncated" if len(view) - pos < 4 * nwords else "corrupt_payload"
            raise FormatError(kind, f"{self.name}: {len(view) - pos} payload bytes, header says {4 * nwords}")
        import constriction

        categorical = constriction.stream.model.Categorical
        rows, lens = self._row_layout(n, min(length, n))
        words = np.frombuffer(view[pos:], "<u4").astype(np.uint32)
        decoder = constriction.stream.queue.RangeDecoder(words)
        mirror = constriction.stream.queue.RangeEncoder()
        bits = self._decode_adaptive(decoder, rows, length.bit_length() + 1, "row counts", mirror)
        nlow = np.maximum(bits - 1, 0)
        counts = np.where(bits > 0, np.left_shift(1, np.maximum(bits - 1, 0)), 0).astype(np.int64)
        total_low = int(nlow.sum())
        if total_low:
            half = categorical(self._HALF, perfect=False)
            low = np.asarray(decoder.decode(half, total_low), np.int64)
            if low.shape != (total_low,) or int(low.min()) < 0 or int(low.max()) > 1:
                raise FormatError("corrupt_payload", f"{self.name}: invalid count bits")
            mirror.encode(low.astype(np.int32), half)
            owner = np.repeat(np.arange(rows), nlow)
            j = np.arange(total_low) - np.repeat(np.cumsum(nlow) - nlow, nlow)
            counts += np.bincount(owner, weights=low << (nlow[owner] - 1 - j), minlength=rows).astype(np.int64)
        if np.any(counts > lens):
            raise FormatError("corrupt_payload", f"{self.name}: a row count exceeds the row length")
        nonzero = np.zeros(n, bool)
        full = np.repeat(counts == lens, lens)
        nonzero[full] = True
        mixed = (counts > 0) & (counts < lens)
        if mixed.any():
            weights = self._mask_weights(counts[mixed], lens[mixed])
            family = categorical(perfect=False)
            parts = []
            for total, probs in self._mask_chunks(weights, lens[mixed]):
                part = np.asarray(decoder.decode(family, probs), np.int64)
                if part.shape != (total,) or int(part.min()) < 0 or int(part.max()) > 1:
                    raise FormatError("corrupt_payload", f"{self.name}: invalid mask symbols")
                mirror.encode(part.astype(np.int32), family, probs)
                parts.append(part)
            mask = np.concatenate(parts)
            ones = np.add.reduceat(mask, np.cumsum(lens[mixed]) - lens[mixed])
            if not np.array_equal(ones, counts[mixed]):
                raise FormatError("corrupt_payload", f"{self.name}: a row mask disagrees with its count")
            nonzero[np.repeat(mixed, lens)] = mask.astype(bool)
        out = np.full(n, zero, np.int64)
        m = int(counts.sum())
        if m:
            if k == 2:
                out[nonzero] = 1 - zero
            else:
                rest = self._decode_adaptive(decoder, m, k - 1, "non-zero symbols", mirror)
                out[nonzero] = rest + (rest >= zero)
        _check_consumed(mirror, words, self.name)
        return out


# --------------------------------------------------------------------------------------------------------------
# Static canonical Huffman (the paper's non-universal baseline)
# --------------------------------------------------------------------------------------------------------------


def _huffman_code_lengths(weights: list[int]) -> list[int]:
    """Optimal prefix-code lengths for ``weights`` sorted ascending (len >= 2), in the same order.

    Moffat & Katajainen's in-place O(n) algorithm ("In-place calculation of minimum-redundancy codes", 1995).
    """
    a = list(weights)
    n = len(a)
    # Phase 1: combine, leaving parent pointers.
    leaf = 0
    root = 0
    for nxt in range(n - 1):
        # first child
        if leaf >= n or (root < nxt and a[root] < a[leaf]):
            a[nxt] = a[root]
            a[root] = nxt
            root += 1
        else:
            a[nxt] = a[leaf]
            leaf += 1
        # second child
        if leaf >= n or (root < nxt and a[root] < a[leaf]):
            a[nxt] += a[root]
            a[root] = nxt
            root += 1
        else:
            a[nxt] += a[leaf]
            leaf += 1
    # Phase 2: internal node depths.
    a[n - 2] = 0
    for nxt in range(n - 3, -1, -1):
        a[nxt] = a[a[nxt]] + 1
    # Phase 3: leaf depths.
    avail, used, depth = 1, 0, 0
    root = n - 2
    nxt = n - 1
    while avail > 0:
        while root >= 0 and a[root] == depth:
            used += 1
            root -= 1
        while avail > used:
            a[nxt] = depth
            nxt -= 1
            avail -= 1
        avail = 2 * used
        depth += 1
        used = 0
    return a


class HuffmanStaticCoder(Coder):
    """Static canonical Huffman code with its table stored: the paper's non-universal baseline.

    Payload::

        U                         varint: number of distinct symbols in the stream (0 iff count == 0)
        U entries                 varint each: (gap << 6) | length, symbols in increasing order;
                                  gap = symbol - previous symbol - 1 (previous = -1 before the first),
                                  length = code length in bits, 1..56 (0 when U == 1: the body is then empty)
        body                      the codes of the symbols in order, most significant bit first, packed MSB-first
                                  into bytes, the last byte padded with zero bits

    Codes are canonical (as in DEFLATE): sort the symbols by (length, symbol); the first gets code 0 and each next
    one the previous code plus one, shifted left by the increase in length. For U >= 2 the lengths must satisfy
    Kraft's equality exactly. The body must be exactly ``ceil(total bits / 8)`` bytes with zero padding.
    """

    name = "huffman-static-v1"
    _MAX_LENGTH = 56  # a code must fit the 57 bits a 64-bit window read at any bit offset provides
    _SEGMENT_BYTES = 1 << 13
    _HOPS = 4
    _ENCODE_CHUNK = 1 << 18

    # -- encoding --

    def encode(self, symbols: np.ndarray, alphabet_size: int) -> bytes:
        arr, k = _check_symbols(symbols, alphabet_size, self.max_alphabet_size)
        if arr.size == 0:
            return _varint(0)
        used, counts, rank = _histogram(arr, k, with_rank=True)
        if used.size == 1:
            return _varint(1) + _varint(int(used[0]) << 6)
        order = np.lexsort((used, counts))  # ascending count, ties by symbol
        lengths = np.zeros(used.size, np.int64)
        lengths[order] = _huffman_code_lengths(counts[order].tolist())
        if int(lengths.max()) > self._MAX_LENGTH:
            raise ConfigError(f"{self.name}: code length {int(lengths.max())} exceeds {self._MAX_LENGTH}")
        gaps = np.diff(used, prepend=-1) - 1
        table = _varint(int(used.size)) + _varints((gaps << 6) | lengths)
        codes = self._canonical_codes(used, lengths)
        return table + self._pack(codes[rank], lengths[rank])

    @staticmethod
    def _canonical_codes(used: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Canonical codes (uint64) for ``used`` symbols (ascending) with the given lengths, in the same order."""
        order = np.lexsort((used, lengths))
        ls = lengths[order]
        codes_sorted = np.zeros(ls.size, np.uint64)
        code = 0
        for i in range(1, ls.size):  # U iterations; U is the number of distinct symbols, small next to the stream
            code = (code + 1) << int(ls[i] - ls[i - 1])
            codes_sorted[i] = code
        codes = np.empty_like(codes_sorted)
        codes[order] = codes_sorted
        return codes

    def _pack(self, codes: np.ndarray, lengths: np.ndarray) -> bytes:
        pieces: list[bytes] = []
        carry = np.zeros(0, np.uint8)
        for lo in range(0, codes.size, self._ENCODE_CHUNK):
            c = codes[lo : lo + self._ENCODE_CHUNK]
            ln = lengths[lo : lo + self._ENCODE_CHUNK]
            owner = np.repeat(np.arange(c.size), ln)
            # bit j of a code (0 = most significant) is (code >> (len - 1 - j)) & 1
            ends = np.cumsum(ln)
            shift = (ends[owner] - 1 - np.arange(owner.size)).astype(np.uint64)
            bits = ((c[owner] >> shift) & np.uint64(1)).astype(np.uint8)
            bits = np.concatenate([carry, bits])
            whole = bits.size - bits.size % 8
            pieces.append(np.packbits(bits[:whole]).tobytes())
            carry = bits[whole:]
        pieces.append(np.packbits(carry).tobytes())
        return b"".join(pieces)

    # -- decoding --

    def _decode(self, view: memoryview, n: int, k: int) -> np.ndarray:
        n_used, pos = _read_varint(view, 0)
        if n == 0:
            if n_used != 0 or pos != len(view):
                raise FormatError("corrupt_payload", f"{self.name}: empty stream with a non-empty payload")
            return np.zeros(0, np.int64)
        if not 1 <= n_used <= min(n, k):
            raise FormatError("corrupt_payload", f"{self.name}: {n_used} distinct symbols for {n} of {k}")
        entries, pos = _read_varints(view, pos, n_used)
        lengths = entries & 0x3F
        gaps = entries >> 6
        if int(gaps.max()) >= k:  # also keeps the cumulative sum below 2**63: n_used <= len(data)
            raise FormatError("corrupt_payload", f"{self.name}: table names a symbol >= alphabet_size {k}")
        used = np.cumsum(gaps + 1) - 1
        if int(used[-1]) >= k:
            raise FormatError("corrupt_payload", f"{self.name}: table names a symbol >= alphabet_size {k}")
        body = view[pos:]
        if n_used == 1:
            if int(lengths[0]) != 0 or len(body):
                raise FormatError("corrupt_payload", f"{self.name}: a one-symbol table must have length 0, no body")
            return np.full(n, int(used[0]), np.int64)
        top = self._MAX_LENGTH
        if int(lengths.min()) < 1 or int(lengths.max()) > top:
            raise FormatError("corrupt_payload", f"{self.name}: code length outside [1, {top}]")
        per_length = np.bincount(lengths, minlength=top + 1)
        if sum(int(c) << (top - length) for length, c in enumerate(per_length)) != 1 << top:
            raise FormatError("corrupt_payload", f"{self.name}: code lengths violate Kraft's equality")
        nbits = 8 * len(body)
        if n > nbits:  # every code is at least one bit
            raise FormatError("truncated", f"{self.name}: {nbits} bits cannot hold {n} symbols")
        return self._decode_body(body, n, used, lengths)

    def _decode_body(self, body: memoryview, n: int, used: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        maxlen = int(lengths.max())
        order = np.lexsort((used, lengths))
        sorted_symbols = used[order]
        bl_count = np.bincount(lengths, minlength=maxlen + 1)
        # first[l]: canonical code of the first symbol of length l; offset[l]: its index in sorted_symbols.
        first = np.zeros(maxlen + 1, np.int64)
        offset = np.zeros(maxlen + 1, np.int64)
        code = 0
        for length in range(1, maxlen + 1):
            code = (code + int(bl_count[length - 1])) << 1
            first[length] = code
            offset[length] = offset[length - 1] + bl_count[length - 1]
        # limits[l-1]: left-aligned (to maxlen bits) end of the codes of length l: a window v starts a code of
        # length l for the smallest l with v < limits[l-1].
        limits = np.array(
            [(int(first[ln]) + int(bl_count[ln])) << (maxlen - ln) for ln in range(1, maxlen + 1)], np.uint64
        )
        nbits = 8 * len(body)
        padded = np.frombuffer(bytes(body) + bytes(8), np.uint8)
        # Big-endian 64-bit word starting at every byte: a code starting at bit p is in the top of
        # word[p >> 3] << (p & 7), which holds at least 57 valid bits.
        words = np.ndarray((len(body) + 1,), dtype=">u8", buffer=padded, strides=(1,)).astype(np.uint64)
        out = np.empty(n, np.int64)
        done = 0
        p = 0
        drop = np.uint64(64 - maxlen)
        bit_shifts = np.arange(8, dtype=np.uint64)
        while done < n:
            if p >= nbits:
                raise FormatError("truncated", f"{self.name}: bit stream ends after {done} of {n} symbols")
            # A segment: every bit position of whole bytes [base, base + nbytes); the next code starts at p.
            base = p >> 3
            nbytes = min(self._SEGMENT_BYTES, len(body) - base)
            width = 8 * nbytes
            window = ((words[base : base + nbytes, None] << bit_shifts) >> drop).ravel()
            code_len = np.searchsorted(limits, window, side="right").astype(np.int32) + 1
            # Where the code starting at each bit position ends. The codes of the stream form the orbit of p
            # under this map; find it with pointer jumping: jumps[h] skips 2**h codes (capped at a sink, width),
            # a short Python walk over the 2**HOPS-code jumps, then vectorised fill-in of the codes in between.
            ends = np.arange(width, dtype=np.int32) + code_len
            jump = np.append(np.minimum(ends, width), np.int32(width))
            jumps = [jump]
            for _ in range(self._HOPS):
                jump = jump[jump]
                jumps.append(jump)
            groups = -(-(n - done) // (1 << self._HOPS))
            heads: list[int] = []
            i = p & 7
            while i < width and len(heads) < groups:
                heads.append(i)
                i = int(jump[i])
            idx = np.asarray(heads, np.int32)
            for level in reversed(range(self._HOPS)):
                idx = np.stack([idx, jumps[level][idx]], axis=1).ravel()
            # Positions past the sink only follow the last code inside the segment: the valid ones are a prefix.
            idx = idx[: min(n - done, int(np.count_nonzero(idx < width)))]
            ln = code_len[idx]
            value = (window[idx] >> (maxlen - ln).astype(np.uint64)).astype(np.int64)
            out[done : done + idx.size] = sorted_symbols[value - first[ln] + offset[ln]]
            done += idx.size
            p = 8 * base + int(ends[idx[-1]])
        if p > nbits:
            raise FormatError("truncated", f"{self.name}: last code runs past the end of the payload")
        if nbits - p >= 8:
            raise FormatError("corrupt_payload", f"{self.name}: {(nbits - p) // 8} trailing bytes")
        if p < nbits and int(padded[len(body) - 1]) & ((1 << (nbits - p)) - 1):
            raise FormatError("corrupt_payload", f"{self.name}: non-zero padding bits")
        return out


for _coder in (
    Bz2Coder(), LzmaCoder(), ZlibCoder(), ZstdCoder(), RangeAdaptiveCoder(), RangeContextCoder(), HuffmanStaticCoder()
):
    _register(_coder)
del _coder

"""General-purpose byte compressors (bz2, zlib, lzma, zstd) over packed symbols, behind the one
:class:`~udnc_fx.coding.coder_base.Coder` interface; the universal, dictionary/BWT-based yardsticks."""

from __future__ import annotations

import abc
import bz2
import lzma
import zlib
from typing import Any

import numpy as np

from udnc_fx.coding.coder_base import Coder, check_symbols, register, symbol_width
from udnc_fx.errors import FormatError

__all__ = ["ByteCompressorCoder", "Bz2Coder", "LzmaCoder", "ZlibCoder", "ZstdCoder"]


class ByteCompressorCoder(Coder):
    """Symbols packed little-endian in the narrowest width of 1, 2 or 4 bytes, then a byte compressor.

    Payload: ``width`` (1 byte: 1, 2 or 4, equal to the narrowest width that holds ``alphabet_size - 1``) followed by
    the compressor's own self-delimiting stream of exactly ``count * width`` bytes (subclasses say which stream).
    Trailing bytes after the compressed stream are an error.
    """

    def encode(self, symbols: np.ndarray, alphabet_size: int) -> bytes:
        arr, k = check_symbols(symbols, alphabet_size, self.max_alphabet_size)
        width = symbol_width(k)
        raw = arr.astype(f"<u{width}").tobytes()
        return bytes([width]) + self._compress(raw)

    def _decode(self, view: memoryview, n: int, k: int) -> np.ndarray:
        width = symbol_width(k)
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


for _coder in (Bz2Coder(), LzmaCoder(), ZlibCoder(), ZstdCoder()):
    register(_coder)
del _coder

"""Lossless coders for codeword-index streams: the public face of the coder families (NumPy only).

An index stream is a 1-D array of integers in ``[0, K)`` (``K`` = ``alphabet_size``, the codebook size). A
:class:`Coder` turns it into bytes and back; coders are registered under versioned names (``"bz2-v1"``,
``"range-adaptive-v1"``) so a container names the exact algorithm and byte layout it used. The interface, the
registry and the checks every coder shares are in :mod:`udnc_fx.coding.coder_base`; each family lives in its own
module and registers itself when imported, which this module does for all of them:

- :mod:`~udnc_fx.coding.bytecoders`: ``bz2-v1``, ``zlib-v1``, ``lzma-v1``, ``zstd-v1`` over packed symbols;
- :mod:`~udnc_fx.coding.range_coders`: ``range-adaptive-v1``, ``range-context-v1`` (constriction);
- :mod:`~udnc_fx.coding.huffman`: ``huffman-static-v1``;
- :mod:`~udnc_fx.coding.ans`: ``ans-dither-v1``, static ANS conditioned on the dither (constriction);
- :mod:`~udnc_fx.coding.ans_native`: ``ans-dither-v2`` (the default), the same modelling with an interleaved rANS
  compiled by numba.
"""

from __future__ import annotations

from udnc_fx.coding.coder_base import (
    DEFAULT_CODER,
    Coder,
    available_coders,
    decode_stream,
    empirical_entropy_bits,
    encode_stream,
    get_coder,
)
from udnc_fx.coding.bytecoders import ByteCompressorCoder, Bz2Coder, LzmaCoder, ZlibCoder, ZstdCoder
from udnc_fx.coding.range_coders import RangeAdaptiveCoder, RangeContextCoder
from udnc_fx.coding.huffman import HuffmanStaticCoder
from udnc_fx.coding import ans as _ans  # noqa: F401 -- registers ans-dither-v1
from udnc_fx.coding import ans_native as _ans_native  # noqa: F401 -- registers ans-dither-v2

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
    "encode_stream",
    "decode_stream",
]

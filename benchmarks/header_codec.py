"""Where a small ``.udnc`` file's bytes go, and what the compressed header (format 1.5, ``udnc-hcm-v1``) saves.

For each file: preamble, header (stored, and its JSON), each tensor's sections and coder, raw tensors; the JSON header
compressed by ``udnc-hcm-v1`` beside general-purpose yardsticks (zlib and bz2 at level 9, raw LZMA2 extreme: their
output may differ between library builds, which is why the format does not use them); and each quantized tensor's
sections re-coded with ``ans-dither-v2`` and with ``range-context-v1`` (what ``save(coder="auto")`` chooses between).
Then the time to compress and decompress a synthetic 1000-entry header.

Run: ``OMP_NUM_THREADS=1 python benchmarks/header_codec.py FILE.udnc [FILE.udnc ...]``.
"""

from __future__ import annotations

import bz2
import dataclasses
import lzma
import sys
import time
import zlib

from udnc_fx.coding import container as C
from udnc_fx.coding import header_codec as hc
from udnc_fx.coding.format import canonical_json
from udnc_fx.coding.payload import encode_quantized


def _yardsticks(text: bytes) -> str:
    deflate = len(zlib.compress(text, 9)) - 6  # raw deflate: no zlib header and checksum
    xz = len(lzma.compress(text, format=lzma.FORMAT_RAW,
                           filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]))
    ours, bz = len(hc.compress_header(text)), len(bz2.compress(text, 9))
    return f"udnc-hcm-v1 {ours}, raw deflate-9 {deflate}, bz2-9 {bz}, raw lzma2 {xz}"


def breakdown(path: str) -> None:
    data = open(path, "rb").read()
    header = C.read_header(data, max_header_length=C.MAX_HEADER_LENGTH)
    stored, plain = header["header_length"], header["header_json_length"]
    json_bytes = hc.decompress_header(data[C.PREAMBLE_SIZE: C.PREAMBLE_SIZE + stored], C.MAX_HEADER_LENGTH)
    minor = int.from_bytes(data[10:12], "little")
    print(f"== {path}: {len(data)} bytes, format 1.{minor}; preamble {C.PREAMBLE_SIZE}, header {stored} stored "
          f"({100 * stored / len(data):.1f} %), {plain} of JSON")
    print(f"   the JSON compressed: {_yardsticks(json_bytes)}")
    for q in header["quantized"]:
        cb = q["codebook"]
        form = cb["encoding"] + (f"/{cb['layout']}" if "layout" in cb else "")
        print(f"   {q['fqn']:44s} {q['indices']['count']:8d} vectors: indices {q['indices']['length']:7d} "
              f"({q['indices']['coder']}), codebook {cb['length']:6d} ({form})")
    print(f"   raw tensors: {sum(r['data']['length'] for r in header['raw'])} bytes in {len(header['raw'])}")
    container = C.read_container(data, max_header_length=C.MAX_HEADER_LENGTH)
    cb_dtype = "float16" if any(q["codebook"]["encoding"] == "f16" for q in header["quantized"]) else "float32"
    for coder in ("ans-dither-v2", "range-context-v1"):
        sizes = []
        for q in container.quantized:
            _, indices, codebook = encode_quantized(dataclasses.replace(q, coder=coder), cb_dtype,
                                                    C.DEFAULT_MAX_ELEMENTS)
            sizes.append(len(indices) + len(codebook))
        more = " ..." if len(sizes) > 8 else ""
        print(f"   sections re-coded with {coder:17s}: {sum(sizes)} bytes {sizes[:8]}{more}")


def large_header_timing(entries: int = 1000) -> None:
    header = {"quantized": [{"fqn": f"model.layers.{i // 7}.mlp.{i % 7}.weight", "shape": [384, 1536],
                             "indices": {"alphabet_size": 20 + i % 50, "length": 10000 + 37 * i},
                             "step": 1 / (i + 3)} for i in range(entries)]}
    text = canonical_json(header)
    hc.compress_header(b"{}")  # compile or load the kernel first
    t0 = time.perf_counter()
    stored = hc.compress_header(text)
    t1 = time.perf_counter()
    assert hc.decompress_header(stored, len(text)) == text
    t2 = time.perf_counter()
    print(f"== {entries}-entry header: {len(text)} bytes of JSON -> {len(stored)}; compress {t1 - t0:.3f} s, "
          f"decompress {t2 - t1:.3f} s; {_yardsticks(text)}")


def main(argv: list[str]) -> int:
    for path in argv:
        breakdown(path)
    large_header_timing()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

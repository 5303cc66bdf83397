"""Per-core throughput of ans-dither-v1 on 1e7-symbol dithered Z¹ streams, against zlib level 1 on the same weights.

Indices of a subtractively dithered Z¹ quantizer on Laplacian weights at a coarse and a fine step; encode and decode
timed with the dither codes computed inside the timed call (as the container does: decode hashes the dither only
for conditioned streams), interleaved with zlib level 1 compressing / decompressing the weights' float32 bytes, best
of ``--repeats`` (the machine is shared). One thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ans_throughput.py [--n 10000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import zlib

import numpy as np

from udnc_fx.coding import get_coder
from udnc_fx.coding.ans import dither_codes
from udnc_fx.coding.coders import empirical_entropy_bits
from udnc_fx.dither import uniform_np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    n, key = args.n, 12345
    weights = np.random.default_rng(0).laplace(size=n)
    floats = weights.astype(np.float32).tobytes()
    r = uniform_np(key, n)
    coder = get_coder("ans-dither-v1")
    print("| step | H(K) b/w | coded/H | b | encode M/s | decode M/s | encode / zlib-1 c | decode / zlib-1 d |")
    print("|---|---|---|---|---|---|---|---|")
    for step in (2.0, 0.25):
        y = np.round(weights / step + (r - np.round(r))).astype(np.int64)
        k = y - y.min()
        size = int(k.max()) + 1
        best = {"enc": np.inf, "dec": np.inf, "zc": np.inf, "zd": np.inf}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            data = coder.encode(k, size, context=lambda: dither_codes(key, n, 1))
            t1 = time.perf_counter()
            out = coder.decode(data, n, size, context=lambda: dither_codes(key, n, 1))
            t2 = time.perf_counter()
            packed = zlib.compress(floats, 1)
            t3 = time.perf_counter()
            zlib.decompress(packed)
            t4 = time.perf_counter()
            assert np.array_equal(out, k)
            for name, dt in (("enc", t1 - t0), ("dec", t2 - t1), ("zc", t3 - t2), ("zd", t4 - t3)):
                best[name] = min(best[name], dt)
        h = empirical_entropy_bits(k, size)
        print(f"| {step} | {h / n:.3f} | {8 * len(data) / h:.4f} | {data[0] & 7} | {n / best['enc'] / 1e6:.1f} | "
              f"{n / best['dec'] / 1e6:.1f} | {best['enc'] / best['zc']:.3f} | {best['dec'] / best['zd']:.3f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

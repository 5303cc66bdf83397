"""Per-core throughput of ans-dither-v2 and -v1 on 1e7-symbol dithered Z¹ streams, against zlib level 1 (same weights).

Indices of a subtractively dithered Z¹ quantizer on Laplacian weights at a coarse and a fine step; encode and decode
timed with the dither codes computed inside the timed call (as the container does: decode hashes the dither only
for conditioned streams), each coder in turn, interleaved with zlib level 1 compressing / decompressing the weights'
float32 bytes, best of ``--repeats`` (the machine is shared). One thread. The last two columns divide by the
process's CPU time instead of the wall time (what one core does, whatever else the machine runs). The first call of
each coder (numba's compile or cache load for v2) is made before the timed ones.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ans_throughput.py [--n 10000000] [--repeats 3]
        [--coders ans-dither-v2,ans-dither-v1]
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--coders", default="ans-dither-v2,ans-dither-v1")
    args = parser.parse_args(argv)
    n, key = args.n, 12345
    weights = np.random.default_rng(0).laplace(size=n)
    floats = weights.astype(np.float32).tobytes()
    r = uniform_np(key, n)
    coders = [get_coder(name) for name in args.coders.split(",")]
    print("| step | H(K) b/w | coder | coded/H | b | encode M/s | decode M/s | encode / zlib-1 c | decode / zlib-1 d "
          "| encode M/s per CPU s | decode M/s per CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for step in (2.0, 0.25):
        y = np.round(weights / step + (r - np.round(r))).astype(np.int64)
        k = y - y.min()
        size = int(k.max()) + 1
        k = k.astype(np.uint8 if size <= 256 else np.uint16)  # the narrow dtype the container keeps
        for coder in coders:  # compile / load the kernels outside the timings
            coder.decode(coder.encode(k[:5000], size, context=dither_codes(key, 5000, 1)), 5000, size,
                         context=dither_codes(key, 5000, 1), dtype=k.dtype)
        best = {name: {"enc": np.inf, "dec": np.inf} for name in [c.name for c in coders] + ["zlib"]}
        sizes = {}
        for _ in range(args.repeats):
            for coder in coders:
                t0, c0 = time.perf_counter(), time.process_time()
                data = coder.encode(k, size, context=lambda: dither_codes(key, n, 1))
                t1, c1 = time.perf_counter(), time.process_time()
                out = coder.decode(data, n, size, context=lambda: dither_codes(key, n, 1), dtype=k.dtype)
                t2, c2 = time.perf_counter(), time.process_time()
                assert np.array_equal(out, k)
                sizes[coder.name] = data
                b = best[coder.name]
                b["enc"], b["dec"] = min(b["enc"], t1 - t0), min(b["dec"], t2 - t1)
                b["enc_cpu"], b["dec_cpu"] = min(b.get("enc_cpu", np.inf), c1 - c0), min(b.get("dec_cpu", np.inf), c2 - c1)
            t2 = time.perf_counter()
            packed = zlib.compress(floats, 1)
            t3 = time.perf_counter()
            zlib.decompress(packed)
            t4 = time.perf_counter()
            best["zlib"]["enc"] = min(best["zlib"]["enc"], t3 - t2)
            best["zlib"]["dec"] = min(best["zlib"]["dec"], t4 - t3)
        h = empirical_entropy_bits(k, size)
        zc, zd = best["zlib"]["enc"], best["zlib"]["dec"]
        for i, coder in enumerate(coders):
            data, b = sizes[coder.name], best[coder.name]
            lead = f"| {step} | {h / n:.3f} " if i == 0 else "| | "
            print(lead + f"| {coder.name} | {8 * len(data) / h:.4f} | {data[0] & 7} | {n / b['enc'] / 1e6:.1f} | "
                  f"{n / b['dec'] / 1e6:.1f} | {b['enc'] / zc:.3f} | {b['dec'] / zd:.3f} | "
                  f"{n / b['enc_cpu'] / 1e6:.1f} | {n / b['dec_cpu'] / 1e6:.1f} |", flush=True)
        print(f"| | | zlib-1 (float32 bytes) | | | {n / zc / 1e6:.1f} | {n / zd / 1e6:.1f} | 1 | 1 | | |")
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

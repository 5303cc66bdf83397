"""Size and speed of every index coder against the empirical order-0 entropy.

Synthetic streams: discretised Laplacian and Gaussian sources at entropies of about 2, 3 and 4 bits per symbol,
re-indexed as a layer's codebook is (only the symbols used, the most frequent first). For each coder it prints a
Markdown table: bits per symbol, overhead against the empirical entropy, and encode/decode throughput in millions
of symbols per second (best of a few runs for fast coders; one run for the slow ones). ``--cpu`` times with the
process's CPU clock instead of the wall clock, for a shared machine where other jobs steal the cores.

    .venv/bin/python benchmarks/coders.py [--quick] [--cpu] [--n 1000000] [--npy stream.npy [--alphabet-size K]]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from udnc_fx.coding import available_coders, empirical_entropy_bits, get_coder

TARGET_BITS = (2.0, 3.0, 4.0)


def frequency_ranked(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Re-index to the used values, most frequent first (ties by value), as the quantizer orders a codebook."""
    used, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    order = np.lexsort((used, -counts))
    rank = np.empty(used.size, np.int64)
    rank[order] = np.arange(used.size)
    return rank[inverse.reshape(-1)], int(used.size)


def discretised(kind: str, scale: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    draw = rng.laplace if kind == "laplace" else rng.normal
    return np.round(draw(0.0, scale, n)).astype(np.int64)


def scale_for_entropy(kind: str, bits: float) -> float:
    """Source scale whose discretisation has about ``bits`` of entropy (bisection on a 200k-sample estimate)."""
    lo, hi = 0.05, 100.0
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        stream, k = frequency_ranked(discretised(kind, mid, 200_000, seed=123))
        if empirical_entropy_bits(stream, k) / stream.size < bits:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


CLOCK = time.perf_counter


def timed(fn, *args, min_time: float = 0.3, max_runs: int = 3):
    """Best time of up to ``max_runs`` calls (fewer once ``min_time`` is spent) and the last result."""
    best = math.inf
    spent = 0.0
    for _ in range(max_runs):
        start = CLOCK()
        result = fn(*args)
        elapsed = CLOCK() - start
        best = min(best, elapsed)
        spent += elapsed
        if spent > min_time:
            break
    return best, result


def measure(coder_name: str, stream: np.ndarray, k: int, entropy_bits: float) -> dict:
    coder = get_coder(coder_name)
    t_enc, data = timed(coder.encode, stream, k)
    t_dec, out = timed(coder.decode, data, stream.size, k)
    if not np.array_equal(out, stream):
        raise AssertionError(f"{coder_name} does not round-trip")
    n = stream.size
    return {
        "bits": 8 * len(data) / n,
        "overhead": (8 * len(data) / entropy_bits - 1) * 100 if entropy_bits else math.inf,
        "enc": n / t_enc / 1e6,
        "dec": n / t_dec / 1e6,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k symbols, Laplacian only")
    parser.add_argument("--n", type=int, default=1_000_000, help="symbols per synthetic stream")
    parser.add_argument("--npy", help="bench this stream (a .npy of non-negative integers) instead")
    parser.add_argument("--alphabet-size", type=int, help="K for --npy (default: max + 1)")
    parser.add_argument("--cpu", action="store_true", help="time with the process CPU clock, not the wall clock")
    parser.add_argument("--coders", nargs="*", default=None, help=f"subset of {', '.join(available_coders())}")
    args = parser.parse_args(argv)
    coders = args.coders or available_coders()
    global CLOCK
    CLOCK = time.process_time if args.cpu else time.perf_counter

    streams: list[tuple[str, np.ndarray, int]] = []
    if args.npy:
        stream = np.load(args.npy).reshape(-1).astype(np.int64)
        k = args.alphabet_size or (int(stream.max()) + 1 if stream.size else 1)
        streams.append((args.npy, stream, k))
    else:
        n = 200_000 if args.quick else args.n
        kinds = ["laplace"] if args.quick else ["laplace", "gaussian"]
        for kind in kinds:
            for bits in TARGET_BITS:
                stream, k = frequency_ranked(discretised(kind, scale_for_entropy(kind, bits), n, seed=0))
                streams.append((f"{kind} ~{bits:g} b", stream, k))

    entropies = [empirical_entropy_bits(s, k) for _, s, k in streams]
    print(f"Clock: {'process CPU time' if args.cpu else 'wall time'}")
    print(f"Streams: {', '.join(f'{label} (n={s.size}, K={k}, H={h / max(s.size, 1):.3f} b/sym)' for (label, s, k), h in zip(streams, entropies))}")
    for name in coders:
        print(f"\n### {name}\n")
        print("| stream | n | K | entropy (b/sym) | coded (b/sym) | overhead | encode (M sym/s) | decode (M sym/s) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for (label, stream, k), h in zip(streams, entropies):
            r = measure(name, stream, k, h)
            print(
                f"| {label} | {stream.size} | {k} | {h / max(stream.size, 1):.3f} | {r['bits']:.3f} | "
                f"{r['overhead']:+.2f}% | {r['enc']:.2f} | {r['dec']:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does constriction release the GIL while it decodes? (Decides whether tensors can be coded in parallel threads.)

A background thread decodes a 20M-symbol ANS stream in one constriction call while the main thread spins a Python
loop; the loop's iteration count during the call, and the longest pause between iterations, tell whether the call
held the GIL (no iterations, one long pause) or released it (iterations throughout).

    .venv/bin/python benchmarks/constriction_gil.py
"""

from __future__ import annotations

import threading
import time

import constriction
import numpy as np


def main() -> int:
    n = 20_000_000
    symbols = np.random.default_rng(0).integers(0, 6, n).astype(np.int32)
    model = constriction.stream.model.Categorical(np.ones(6), perfect=False)
    encoder = constriction.stream.stack.AnsCoder()
    encoder.encode_reverse(symbols, model)
    words = encoder.get_compressed()
    span = {}

    def decode():
        start = time.perf_counter()
        constriction.stream.stack.AnsCoder(words).decode(model, n)
        span["call"] = (start, time.perf_counter())

    worker = threading.Thread(target=decode)
    worker.start()
    stamps = []
    while worker.is_alive():
        stamps.append(time.perf_counter())
    start, stop = span["call"]
    inside = np.array([t for t in stamps if start <= t <= stop])
    edges = np.concatenate([[start], inside, [stop]])
    longest = float(np.diff(edges).max())
    print(f"decode call {stop - start:.3f} s; main-thread loop iterations during the call: {inside.size}; "
          f"longest pause in it {longest:.3f} s -> GIL {'held' if longest > 0.5 * (stop - start) else 'released'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

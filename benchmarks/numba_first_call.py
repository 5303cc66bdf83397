"""First-call cost of ans-dither-v2's numba kernels in a fresh process: cold (empty cache: compiled) and warm (the
on-disk cache from the cold run), wall and CPU seconds.

Each measurement is a new Python process with ``NUMBA_CACHE_DIR`` pointed at a fresh temporary folder (cold), then
run again on the same folder (warm). Timed: importing the coders, then one encode + decode of a 1,000-symbol stream
(one state) and of a 70,000-symbol stream (four states), uint8 symbols with dither codes and row classes: the
kernels a first ``udnc_fx.save``/``load`` of a model with K <= 256 needs.

    .venv/bin/python benchmarks/numba_first_call.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = r"""
import time
t0, c0 = time.perf_counter(), time.process_time()
import numpy as np
from udnc_fx.coding import get_coder
from udnc_fx.coding.ans import dither_codes
t1, c1 = time.perf_counter(), time.process_time()
v2 = get_coder("ans-dither-v2")
rng = np.random.default_rng(0)
for n in (1000, 70000):
    s = rng.integers(0, 20, n).astype(np.uint8)
    codes = dither_codes(1, n, 1)
    data = v2.encode(s, 20, context=codes, row_length=100)
    assert (v2.decode(data, n, 20, context=codes, dtype=np.uint8) == s).all()
t2, c2 = time.perf_counter(), time.process_time()
print(f"{t1 - t0:.2f} {c1 - c0:.2f} {t2 - t1:.2f} {c2 - c1:.2f}")
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        print("| run | import wall s | import CPU s | first encode+decode wall s | first encode+decode CPU s |")
        print("|---|---|---|---|---|")
        for run in ("cold (compile)", "warm (cache)"):
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
            print(f"| {run} | " + " | ".join(out.stdout.split()) + " |")
    print(f"load average {os.getloadavg()[0]:.1f} (1 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

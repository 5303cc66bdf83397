"""all-MiniLM-L6-v2: the first ``udnc_fx.load`` in a fresh process against the next one (numba's one-time cost).

The default coder's kernels are compiled by numba into its cache once per installation; every new process then
imports numba and loads the cached kernels on its first use. This script compresses MiniLM once
(``transformer_config(target_bits=--bits)``, the default coder), saves it, and starts ``--processes`` fresh
interpreters, each timing two consecutive loads of the file onto a MiniLM model it built before the clock starts.
One thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cold_load.py [--bits 3.75] [--processes 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import os, sys, time
import torch
torch.set_num_threads(1)
from udnc_fx.hf import drop_pooler, load_minilm
import udnc_fx
model = drop_pooler(load_minilm()).eval()
times = []
for _ in range(2):
    t = time.perf_counter()
    udnc_fx.load(sys.argv[1], model, progress=False)
    times.append(time.perf_counter() - t)
print(f"{times[0]:.3f} {times[1]:.3f}")
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=3.75)
    parser.add_argument("--processes", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import udnc_fx
    from udnc_fx.hf import drop_pooler, load_minilm, transformer_config

    torch.set_num_threads(1)
    model = drop_pooler(load_minilm()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.udnc"
        udnc_fx.save(udnc_fx.compress(model, transformer_config(target_bits=args.bits)), path, progress=False)
        print(f"MiniLM at {args.bits} bits/weight: {path.stat().st_size} bytes")
        print("| process | first load s | second load s |")
        print("|---|---|---|")
        for i in range(args.processes):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                                 check=True, env=os.environ)
            first, second = out.stdout.split()[-2:]
            print(f"| {i + 1} | {first} | {second} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where the memory of save and load goes: resident size sampled per phase, with the code running at each new peak.

A sampler thread reads the process's resident size every few milliseconds while one step runs (compress, save,
load, materialize) and, at each new high, records the main thread's Python stack. The report gives, per step, the
resident size before, the peak, and the innermost frames (in this package) that were running when the peak was
reached; ``--tracemalloc`` adds the step's peak of traced allocations (NumPy and Python objects; torch tensors
are not traced).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_peaks.py [--size 1e7] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402


class PeakSampler:
    """Samples VmRSS every ``interval`` seconds; keeps the peak and the main thread's stack when it was reached."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self.where: list[str] = []
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = scale._rss_bytes()
            if rss > self.peak:
                self.peak = rss
                frame = sys._current_frames().get(self._main)
                stack = []
                while frame is not None:
                    code = frame.f_code
                    if "udnc_fx" in code.co_filename or "/passes/" in code.co_filename:
                        stack.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
                    frame = frame.f_back
                self.where = stack[:4]
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(label: str, fn, use_tracemalloc: bool, rows: list) -> object:
    before = scale._rss_bytes()
    if use_tracemalloc:
        tracemalloc.start()
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        result = fn()
    seconds = time.perf_counter() - t0
    traced = None
    if use_tracemalloc:
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    rows.append((label, seconds, before, max(sampler.peak, before), traced, sampler.where))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1e7", choices=sorted(scale.SIZES))
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    import udnc_fx
    from udnc_fx.passes.materialize import materialize

    model = scale._build(scale.SIZES[args.size])
    weights = sum(m.weight.numel() for m in model)
    float_bytes = 4 * weights
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.udnc"
        cfg = udnc_fx.CompressConfig(relative_step=scale.RELATIVE_STEP, seed=0)
        gm = measure("compress", lambda: udnc_fx.compress(model, cfg), args.tracemalloc, rows)
        measure("save", lambda: udnc_fx.save(gm, path, progress=False), args.tracemalloc, rows)
        del gm
        loaded = measure("load", lambda: udnc_fx.load(path, model, progress=False), args.tracemalloc, rows)
        measure("materialize", lambda: materialize(loaded, inplace=True), args.tracemalloc, rows)
    print(f"{weights:,} weights, float32 {float_bytes / 2**20:.0f} MiB; MiB and multiples of the float bytes")
    print("| step | s | RSS before | peak | peak − before | traced peak | running at the peak |")
    print("|---|---|---|---|---|---|---|")
    for label, seconds, before, peak, traced, where in rows:
        t = "" if traced is None else f"{traced / 2**20:.0f} ({traced / float_bytes:.2f}x)"
        print(f"| {label} | {seconds:.2f} | {before / 2**20:.0f} ({before / float_bytes:.2f}x) | "
              f"{peak / 2**20:.0f} ({peak / float_bytes:.2f}x) | {(peak - before) / 2**20:.0f} "
              f"({(peak - before) / float_bytes:.2f}x) | {t} | {' < '.join(where)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

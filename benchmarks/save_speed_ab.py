"""MiniLM save, old writer against new, side by side in one process: the table choice of ``ans-dither-v1`` and the
``lattice-coords`` order check as they were at a git revision (``--old``, default 85c8676, before the h11-speed
changes) against the working tree's, interleaved and repeated (the machine is shared: only the ratio within a
repeat means anything). Both must write the same bytes (checked: SHA-256 of every file).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/save_speed_ab.py [--repeats 3] [--old 85c8676]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

import udnc_fx
from udnc_fx.coding import ans, payload
from udnc_fx.coding import lattice_coords as lc

ROOT = Path(__file__).resolve().parent.parent


def old_ans(rev: str) -> types.ModuleType:
    """``udnc_fx/coding/ans.py`` at ``rev`` as a module of its own (its coder is not registered again)."""
    source = subprocess.run(["git", "show", f"{rev}:udnc_fx/coding/ans.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    source = source.replace("\nregister(AnsDitherCoder())", "\n")
    module = types.ModuleType("ans_old")
    module.__file__ = f"{rev}:udnc_fx/coding/ans.py"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def rebuild_rule(cb_int: np.ndarray, indices: np.ndarray) -> bool:
    """The order check as it was: rebuild indices and codebook from every vector."""
    rebuilt_indices, rebuilt_points, _ = lc.index_points(cb_int[np.asarray(indices, dtype=np.intp)])
    return np.array_equal(rebuilt_points, cb_int) and np.array_equal(rebuilt_indices, indices)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old", default="85c8676")
    parser.add_argument("--bits", type=float, default=3.75)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from udnc_fx.hf import drop_pooler, load_minilm, transformer_config

    old = old_ans(args.old)
    new = {name: getattr(ans, name) for name in ("_best_tables", "_best_table", "_row_labels", "_varint_bytes")}
    new_choose, new_order = ans.AnsDitherCoder._choose, payload._in_reader_order

    def use(which: str) -> None:
        if which == "old":
            for name in new:
                setattr(ans, name, getattr(old, name))
            ans.AnsDitherCoder._choose = old.AnsDitherCoder._choose
            payload._in_reader_order = rebuild_rule
        else:
            for name, fn in new.items():
                setattr(ans, name, fn)
            ans.AnsDitherCoder._choose = new_choose
            payload._in_reader_order = new_order

    model = drop_pooler(load_minilm()).eval()
    gm = udnc_fx.compress(model, transformer_config(target_bits=args.bits))
    times: dict[str, list[float]] = {"old": [], "new": []}
    digests: dict[str, set[str]] = {"old": set(), "new": set()}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for which in ("old", "new") if r % 2 == 0 else ("new", "old"):
                use(which)
                path = Path(tmp) / f"{which}.udnc"
                if path.exists():
                    path.unlink()
                t = time.perf_counter()
                udnc_fx.save(gm, path, progress=False)
                times[which].append(time.perf_counter() - t)
                digests[which].add(hashlib.sha256(path.read_bytes()).hexdigest())
    use("new")
    same = digests["old"] == digests["new"] and len(digests["new"]) == 1
    print(f"old = {args.old}, new = working tree; {args.repeats} repeats, alternating; load average "
          f"{os.getloadavg()[0]:.1f} (1 min) at the end; same bytes: {same} ({sorted(digests['new'])[0][:16]})")
    print("| repeat | old save s | new save s | old / new |")
    print("|---|---|---|---|")
    for r, (a, b) in enumerate(zip(times["old"], times["new"])):
        print(f"| {r} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

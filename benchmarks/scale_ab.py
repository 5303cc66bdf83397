"""compress + save of benchmarks/scale.py's synthetic models with this code and an older one, alternating, one run per
process, with the files' SHA-256 (the two must agree) and each step's time and peak RSS.

The old code is given as a package tree importable through ``PYTHONPATH`` (a folder holding ``udnc_fx`` with
``passes`` and ``export`` copied in as ``udnc_fx/passes`` and ``udnc_fx/export``), for example from main::

    rm -rf /tmp/old && mkdir -p /tmp/old/pkg && git archive main | tar -x -C /tmp/old \\
        && cp -r /tmp/old/udnc_fx /tmp/old/pkg/ && cp -r /tmp/old/passes /tmp/old/pkg/udnc_fx/passes \\
        && cp -r /tmp/old/export /tmp/old/pkg/udnc_fx/export
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/scale_ab.py --old /tmp/old --size 1e8 --rounds 3

Times on a shared machine are noisy: the load average is printed with each run, and only runs side by side count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(tree: str, root: Path, size: str, path: Path) -> dict:
    """One compress + save by ``scale.py --worker compress`` of the code tree ``tree`` ("new": this repository)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if tree == "new":
        script, cwd = HERE / "scale.py", HERE.parent
        env.pop("PYTHONPATH", None)
    else:
        script, cwd = root / "benchmarks" / "scale.py", Path(tempfile.gettempdir())
        env["PYTHONPATH"] = str(root / "pkg")
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, str(script), "--worker", "compress", "--size", size, "--path", str(path)],
                          cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    out["load"] = load
    path.unlink()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the old code: a folder with benchmarks/ and pkg/")
    parser.add_argument("--size", default="1e8", help="a size of benchmarks/scale.py (1e8, 1e9, ...)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="udnc-scale-ab-"))
    rows = []
    for r in range(args.rounds):
        for tree in ("new", "old"):
            res = run(tree, args.old, args.size, tmp / f"{tree}.udnc")
            rows.append((tree, r + 1, res))
            print(f"{tree} round {r + 1}: load {res['load']:.1f}, quantize {res['quantize_s']:.1f} s, save "
                  f"{res['save_s']:.1f} s, total {res['seconds']:.1f} s, peak {res['peak'] / 2**20:.0f} MiB "
                  f"({res['peak'] / res['float_bytes']:.2f}x the float bytes), sha256 {res['sha256'][:16]}",
                  flush=True)
    if len({res["sha256"] for _, _, res in rows}) != 1:
        print("the files differ")
        return 1
    print("all files identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

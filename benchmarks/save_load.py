"""all-MiniLM-L6-v2 save and load, side by side: udnc-fx per index coder, zlib level 1, NNCodec (one run).

One process compresses MiniLM once (``transformer_config(target_bits=...)``, Z¹, dithered), then, interleaved and
repeated (the best of ``--repeats`` is kept for every row: the machine is shared, so each repeat times every method
within the same minute or two), times

* ``udnc_fx.save`` / ``udnc_fx.load`` with each index coder (the file's bytes are reported too),
* ``zlib.compress(level=1)`` / ``zlib.decompress`` of the model's float32 bytes: a machine-independent yardstick,
* NNCodec 2.1.3's ``compress`` / ``decompress`` of the float state dict (single thread, in its own venv, see
  ``nncodec_env.py``), when its venv is available (``--nncodec-qp``; skipped with a note otherwise).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/save_load.py [--bits 3.75] [--repeats 3] [--no-nncodec]
        [--coders ans-dither-v2,ans-dither-v1] [--workers 1,2] [--threads 1,2]

With ``--workers 1,2`` every load is timed with each worker count in turn (the rows after the first repeat the
first's save time).

The ``spread`` columns give (worst − best) / best over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import udnc_fx  # noqa: E402

CODERS = ["ans-dither-v2", "ans-dither-v1"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=3.75)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-nncodec", action="store_true")
    parser.add_argument("--nncodec-qp", type=int, default=-34)
    parser.add_argument("--coders", default=",".join(CODERS), help="comma-separated index coders to time")
    parser.add_argument("--workers", default="1",
                        help="comma-separated udnc_fx.load worker counts to time (a row each after the first)")
    parser.add_argument("--threads", default="1",
                        help="comma-separated udnc_fx.save/load thread counts to time (a row each after the first)")
    args = parser.parse_args(argv)
    coders = [c for c in args.coders.split(",") if c]
    worker_counts = [int(w) for w in args.workers.split(",") if w] or [1]
    thread_counts = [int(t) for t in args.threads.split(",") if t] or [1]
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from udnc_fx.hf import drop_pooler, load_minilm, transformer_config

    model = drop_pooler(load_minilm()).eval()
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    floats = b"".join(a.tobytes() for a in state.values())
    print(f"MiniLM: {sum(a.size for a in state.values())} float32 values, {len(floats)} bytes; torch threads 1, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    start = time.perf_counter()
    gm = udnc_fx.compress(model, transformer_config(target_bits=args.bits))
    print(f"compress (target {args.bits} bits/weight): {time.perf_counter() - start:.2f} s", flush=True)

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            t = time.perf_counter()
            packed = zlib.compress(floats, 1)
            t1 = time.perf_counter()
            zlib.decompress(packed)
            t2 = time.perf_counter()
            row = rows.setdefault("zlib-1 (float32 bytes)", {"bytes": len(packed), "save": [], "load": []})
            row["save"].append(t1 - t)
            row["load"].append(t2 - t1)
            for coder, threads in [(c, t) for c in coders for t in thread_counts]:
                path = Path(tmp) / f"{coder}.udnc"
                if path.exists():
                    path.unlink()
                t = time.perf_counter()
                size = udnc_fx.save(gm, path, coder=coder, progress=False, threads=threads)
                save_s = time.perf_counter() - t
                for i, workers in enumerate(worker_counts):
                    t1 = time.perf_counter()
                    loaded = udnc_fx.load(path, model, progress=False, workers=workers, threads=threads)
                    t2 = time.perf_counter()
                    name = (f"udnc-fx {coder}" + (f" threads={threads}" if len(thread_counts) > 1 else "")
                            + (f" (load workers={workers})" if i else ""))
                    row = rows.setdefault(name, {"bytes": size, "save": [], "load": []})
                    row["save"].append(save_s)
                    row["load"].append(t2 - t1)
                    del loaded
            if not args.no_nncodec:  # once per repeat, between our runs: side by side under the same load
                for name, row in run_nncodec(state, args.nncodec_qp, Path(tmp)).items():
                    if "note" in row:
                        rows[name] = row
                        continue
                    kept = rows.setdefault(name, {"bytes": row["bytes"], "save": [], "load": []})
                    kept["save"] += row["save"]
                    kept["load"] += row["load"]
    base = rows["zlib-1 (float32 bytes)"]
    zc, zd = min(base["save"]), min(base["load"])
    print(f"\n{args.repeats} repeats; load average {os.getloadavg()[0]:.1f} (1 min) at the end")
    print("| method | bytes | save / encode s | load / decode s | save / zlib-1 compress | load / zlib-1 decompress "
          "| save spread | load spread |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        if "note" in row:
            print(f"| {name} | {row['note']} | | | | | | |")
            continue
        s, d = min(row["save"]), min(row["load"])
        spread = [(max(v) - min(v)) / min(v) for v in (row["save"], row["load"])]
        print(f"| {name} | {row['bytes']} | {s:.2f} | {d:.2f} | {s / zc:.3f} | {d / zd:.3f} | {spread[0]:.0%} "
              f"| {spread[1]:.0%} |")
    nn = next((row for name, row in rows.items() if name.startswith("NNCodec") and "note" not in row), None)
    for name, row in rows.items():
        if nn is not None and name.startswith("udnc-fx"):  # repeat by repeat: the two ran within the same minutes
            fast = [(a / b, c / d) for a, b, c, d in zip(nn["save"], row["save"], nn["load"], row["load"])]
            print(f"{name} vs NNCodec, per repeat: save {', '.join(f'{x:.1f}x' for x, _ in fast)} faster; "
                  f"load {', '.join(f'{y:.1f}x' for _, y in fast)} faster")
    return 0


def run_nncodec(state: dict[str, np.ndarray], qp: int, tmp: Path) -> dict:
    import nncodec_env

    if not (nncodec_env.VENV / "bin" / "python").exists():
        return {"NNCodec 2.1.3": {"note": "venv not set up (python -c 'import nncodec_env; nncodec_env.ensure_venv()')"}}
    params = tmp / "params.npz"
    out = tmp / "nncodec"
    nncodec_env.save_params_npz(params, state)
    cmd = [str(nncodec_env.python()), str(nncodec_env.WORKER), str(params), str(out), f"--qps={qp}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode:
        return {"NNCodec 2.1.3": {"note": f"worker failed: {proc.stderr[-300:]!r}"}}
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"][0]
    return {f"NNCodec 2.1.3 (qp {qp})": {"bytes": run["bitstream_bytes"], "save": [run["encode_s"]],
                                          "load": [run["decode_s"]]}}


if __name__ == "__main__":
    raise SystemExit(main())

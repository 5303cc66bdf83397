"""all-MiniLM-L6-v2: the highest compression ratio that keeps sentence embeddings at mean cosine >= 0.99.

For each step allocation (one relative step for all layers; data-free sensitivity; probed sensitivity) the target
bits per weight are lowered from the top of a grid until the mean cosine over the fixed sentence set
(``udnc_fx.hf.SENTENCES``, 64 sentences) falls below the threshold. Every point is compressed, written with
``udnc_fx.save`` and measured with ``udnc_fx.size_report`` (true container bytes):

* ``file x``: float32 bytes of every tensor in the file over the file's size (LayerNorm and bias tensors included,
  stored raw as float32);
* ``weights x``: float32 bytes of the compressed weights over their sections (indices, codebooks, header entries).

The probe measures sensitivities on ``udnc_fx.hf.CALIBRATION_SENTENCES`` (32 other sentences), never on the
evaluation set. The pooler is removed before compression (mean pooling never uses it), so it is neither
compressed nor stored. Optionally the best failing probe point is distilled (codebook fine-tuning against the float
model on the calibration sentences) to see whether it crosses the threshold.

Run: ``python benchmarks/minilm.py --quick`` (one seed, coarse grid) or without ``--quick`` (finer grid, 3 seeds:
a point passes only if every seed passes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import udnc_fx
from udnc_fx import hf
from udnc_fx.passes.allocate import allocate

METHODS = ("uniform", "weights", "probe")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed and a 0.25-bit grid")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--bits", default=None, help="comma-separated grid of target bits/weight (high to low)")
    p.add_argument("--seeds", default=None, help="comma-separated dither seeds (default: 0 quick, 0,1,2 full)")
    p.add_argument("--threshold", type=float, default=0.99, help="mean cosine to keep (default 0.99)")
    p.add_argument("--lattice", default="Z", help="lattice for every layer: Z (scalar), A2, D4, E8")
    p.add_argument("--probe-bits", type=float, default=4.0,
                   help="operating point (bits/weight) where sensitivities are measured, then reused for every target")
    p.add_argument("--refine", type=int, default=0, help="extra probe rounds at the allocated steps")
    p.add_argument("--finetune-epochs", type=int, default=4, help="distil the best failing probe point (0: off)")
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--json", default=None, help="write all measured points here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def _measure(model, evaluation, reference, workdir: Path, name: str) -> dict:
    fidelity = hf.embedding_fidelity(reference, hf.mean_pooled_embeddings(model, evaluation))
    path = workdir / f"{name}.udnc"
    udnc_fx.save(model, path)
    sizes = udnc_fx.size_report(path)
    path.unlink()
    return {
        "cos_mean": fidelity.mean,
        "cos_min": fidelity.min,
        "entropy_bits": udnc_fx.inspect(model).mean_entropy_bits,
        "file_bytes": sizes["file_bytes"],
        "file_ratio": sizes["file_ratio"],
        "weights_ratio": sizes["weights_ratio"],
        "coded_bits": 32.0 / sizes["weights_ratio"],
    }


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # distillation compares deterministic outputs
    return model


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}")
    if args.bits:
        grid = sorted((float(b) for b in args.bits.split(",")), reverse=True)
    elif args.quick:
        grid = [5.0, 4.75, 4.5, 4.25, 4.0, 3.75, 3.5, 3.25, 3.0]
    else:
        grid = [5.0 - 0.125 * i for i in range(17)]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    st = hf.load_minilm()
    encoder = hf.drop_pooler(st[0].auto_model.eval())
    evaluation = hf.tokenize(st.tokenizer, hf.SENTENCES)
    calibration = hf.tokenize(st.tokenizer, hf.CALIBRATION_SENTENCES)
    reference = hf.mean_pooled_embeddings(encoder, evaluation)
    n_weights = sum(p.numel() for p in encoder.parameters())
    print(f"all-MiniLM-L6-v2 without pooler: {n_weights} parameters; {len(hf.SENTENCES)} evaluation sentences, "
          f"{len(hf.CALIBRATION_SENTENCES)} calibration sentences; loaded in {time.perf_counter() - t0:.1f} s")

    points: list[dict] = []
    allocations: dict = {}
    timings: dict = {"compress_s": [], "allocate_s": {}}
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for method in methods:
            passed_all = True
            best = robust = None
            first_fail = None
            for bits in grid:
                seed_rows = []
                for seed in seeds:
                    base = hf.transformer_config(target_bits=bits, seed=seed, lattice=args.lattice)
                    t = time.perf_counter()
                    if method == "uniform":
                        config = base
                    else:
                        key = (method, seed)
                        if key not in allocations:  # sensitivities once per method and seed; the scale per target
                            allocations[key] = allocate(
                                encoder, base.replace(target_bits=args.probe_bits),
                                calibration_inputs=calibration if method == "probe" else None,
                                output_fn=hf.mean_pooled_embeddings, method=method, refine=args.refine,
                            )
                            timings["allocate_s"][f"{method}/{seed}"] = time.perf_counter() - t
                            if seed == seeds[0]:
                                print(allocations[key])
                        alloc = allocate(encoder, base, reuse=allocations[key])
                        config = alloc.config
                    t = time.perf_counter()
                    model = udnc_fx.compress(encoder, config)
                    timings["compress_s"].append(time.perf_counter() - t)
                    row = {"method": method, "target_bits": bits, "seed": seed}
                    row.update(_measure(model, evaluation, reference, workdir, f"{method}-{bits}-{seed}"))
                    row["pass"] = row["cos_mean"] >= args.threshold
                    seed_rows.append((row, model))
                    points.append(row)
                    print(
                        f"{method:8s} target {bits:5.3f} seed {seed}: cos mean {row['cos_mean']:.5f} "
                        f"min {row['cos_min']:.5f}  entropy {row['entropy_bits']:.3f} coded {row['coded_bits']:.3f} "
                        f"bits/w  file {row['file_ratio']:.2f}x  weights {row['weights_ratio']:.2f}x",
                        flush=True,
                    )
                ok = all(r["pass"] for r, _ in seed_rows)
                worst = min(seed_rows, key=lambda rm: rm[0]["cos_mean"])[0]
                if ok:
                    if best is None or worst["file_ratio"] > best["file_ratio"]:
                        best = worst
                    if passed_all:
                        robust = worst
                else:
                    passed_all = False
                    if first_fail is None:
                        first_fail = (bits, seed_rows)
                    break  # lower targets only get worse: stop this method
            summary.append({"method": method, "best": best, "robust": robust, "first_fail": first_fail})

        if "probe" in methods and args.finetune_epochs > 0:
            from udnc_fx.passes.finetune import finetune

            entry = next(s for s in summary if s["method"] == "probe")
            if entry["first_fail"] is not None:
                bits, seed_rows = entry["first_fail"]
                teacher = hf.SentenceEncoder(encoder).eval()
                n_cal = len(hf.CALIBRATION_SENTENCES)
                data = [{k: v[i : i + 8] for k, v in calibration.items()} for i in range(0, n_cal, 8)]
                tuned_rows = []
                for row, model in seed_rows:
                    student = _no_dropout(hf.SentenceEncoder(copy.deepcopy(model)))
                    t = time.perf_counter()
                    finetune(
                        student, data, teacher=teacher, distill="mse", epochs=args.finetune_epochs,
                        lr=args.finetune_lr, progress=False, keep="last",
                    )
                    tuned = student.encoder.eval()
                    tuned_row = {"method": "probe+distill", "target_bits": bits, "seed": row["seed"]}
                    tuned_row.update(_measure(tuned, evaluation, reference, workdir, f"tuned-{bits}"))
                    tuned_row["pass"] = tuned_row["cos_mean"] >= args.threshold
                    tuned_row["finetune_s"] = time.perf_counter() - t
                    tuned_rows.append(tuned_row)
                    points.append(tuned_row)
                    print(
                        f"probe+distill target {bits:5.3f} seed {row['seed']}: cos mean {row['cos_mean']:.5f} -> "
                        f"{tuned_row['cos_mean']:.5f} (min {tuned_row['cos_min']:.5f}), file "
                        f"{tuned_row['file_ratio']:.2f}x weights {tuned_row['weights_ratio']:.2f}x "
                        f"({tuned_row['finetune_s']:.0f} s, {args.finetune_epochs} epochs on "
                        f"{len(hf.CALIBRATION_SENTENCES)} sentences)",
                        flush=True,
                    )
                ok = all(r["pass"] for r in tuned_rows)
                worst = min(tuned_rows, key=lambda r: r["cos_mean"])
                passing = sum(r["pass"] for r in tuned_rows)
                note = (f"distilled at target {bits:.3f} ({worst['file_ratio']:.2f}x): {passing}/{len(tuned_rows)} "
                        f"seeds reach {args.threshold} (cos mean "
                        + "/".join(f"{r['cos_mean']:.5f}" for r in tuned_rows) + ")")
                summary.append({"method": "probe+distill", "best": worst if ok else None, "robust": None,
                                "first_fail": None, "note": note})

    print()
    print(f"highest ratio with mean cosine >= {args.threshold} (lattice {args.lattice}, seeds {seeds}; "
          "file = whole .udnc file, weights = compressed weights only)")
    head = f"{'allocation':14s} {'target':>6s} {'entropy':>7s} {'coded':>6s} {'cos mean':>8s} {'cos min':>8s} " \
           f"{'file x':>7s} {'weights x':>9s} {'MB':>6s}"
    print(head)
    print("-" * len(head))
    for s in summary:
        b = s["best"]
        if b is None:
            print(f"{s['method']:14s} {s.get('note', 'none of the grid passed')}")
            continue
        print(
            f"{s['method']:14s} {b['target_bits']:6.3f} {b['entropy_bits']:7.3f} {b['coded_bits']:6.3f} "
            f"{b['cos_mean']:8.5f} {b['cos_min']:8.5f} {b['file_ratio']:7.2f} {b['weights_ratio']:9.2f} "
            f"{b['file_bytes'] / 1e6:6.2f}"
        )
    cs = timings["compress_s"]
    print(f"\ncompress(): {len(cs)} runs, median {sorted(cs)[len(cs) // 2]:.1f} s for {n_weights / 1e6:.1f}M weights; "
          f"allocation: {', '.join(f'{k} {v:.0f} s' for k, v in timings['allocate_s'].items())}; "
          f"total {time.perf_counter() - t0:.0f} s")
    result = {"points": points, "summary": [{k: v for k, v in s.items() if k != "first_fail"} for s in summary],
              "timings": timings, "seeds": seeds, "threshold": args.threshold}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""What the float codeword table costs after fine-tuning, and what the affine correction saves, per lattice, on the
demo CNN (issue 12, point 2).

Codeword fine-tuning moves the codewords off the lattice, so the file can no longer store the points as
``lattice-coords`` (integer coordinates, no table) and falls back to indices plus a float table of the points used.
Format 1.3 can instead store the integer points under a per-layer affine correction ``float32(float32(a·p) + b)``
(``udnc_fx.passes.finetune.choose_codebooks``). For each lattice and dither seed this runs the demo's pipeline
(``udnc_fx.demo.run_demo``'s defaults: BatchNorm folded, 80 % of the weights pruned in whole lattice vectors, kept
weights retrained, ``exact_zero`` compression at h(0.8) + 2 bits per kept weight, 8 epochs of codeword + bias
fine-tuning, float16 raw tensors and codebooks) and measures, on real ``.udnc`` files written with ``udnc_fx.save``:

* ``on lattice``: the compressed model before fine-tuning (points as ``lattice-coords`` where that is smaller);
* ``fine-tuned, table``: after fine-tuning, every layer a float table (``finetune(..., codebook="table")``): file
  bytes, how many of them are the codebook sections (``size_report``'s ``codebook_bytes``), accuracy;
* ``affine``: the same fine-tuned model with every layer's table replaced by the correction (``a``, ``b`` fitted by
  usage-weighted least squares, the exact zero kept at 0; ``choose_codebooks(..., "affine")``): the real file and
  its accuracy;
* ``auto``: fine-tuning's default per-layer choice (``choose_codebooks(..., "auto")``: the correction where it
  saves at least 10 % of the layer's table-form bytes): the real file, its accuracy and how many layers took the
  correction.

Accuracy is on the 540 test images of the digits split; ratio = float32 bytes of the ORIGINAL model's parameters
(BatchNorm included) over the file, as the demo prints it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_table.py [--lattices Z1,A2,D4,E8] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import udnc_fx
from udnc_fx.demo import DEMO_KEPT_BITS, evaluate, load_digits_split, train_digits_cnn
from udnc_fx.storage import round_for_storage
from udnc_fx.passes.finetune import choose_codebooks, finetune, finetune_float
from udnc_fx.passes.fold import fold_batchnorm
from udnc_fx.passes.materialize import served_params
from udnc_fx.passes.prune import prune

LATTICES = {"Z1": ("Z", 1), "Z4": ("Z", 4), "A2": ("A2", 2), "D4": ("D4", 4), "E8": ("E8", 8)}
SPARSITY = 0.8


def _file(gm, path: Path) -> dict:
    nbytes = udnc_fx.save(gm, path, raw_float_dtype="float16", codebook_float_dtype="float16")
    sizes = udnc_fx.size_report(path)
    q = [r for r in sizes["rows"] if r["kind"] == "quantized"]
    path.unlink()
    return {"bytes": nbytes, "codebook_bytes": sum(r["codebook_bytes"] for r in q),
            "index_bytes": sum(r["index_bytes"] for r in q),
            "encodings": sorted({r["codebook_encoding"] for r in q})}


def run_lattice(name: str, seeds: list[int], data, model, n_params: int, tmp: Path, epochs: int) -> list[dict]:
    lattice, n = LATTICES[name]
    h = -SPARSITY * np.log2(SPARSITY) - (1 - SPARSITY) * np.log2(1 - SPARSITY)
    target = round(float(h) + (1 - SPARSITY) * DEMO_KEPT_BITS, 3)
    base = fold_batchnorm(model)
    rows = []
    for seed in seeds:
        config = udnc_fx.CompressConfig(lattice=lattice, n=n, seed=seed, target_bits=target, exact_zero=True)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train),
                                             batch_size=64, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        source, masks = prune(base, SPARSITY, config=config)
        finetune_float(source, masks, loader, F.cross_entropy, epochs=epochs, lr=3e-3, keep="last", progress=False)
        gm = udnc_fx.compress(source, config)
        before = copy.deepcopy(gm)
        round_for_storage(before, raw_float_dtype="float16", codebook_float_dtype="float16")
        acc0 = evaluate(before, data.x_test, data.y_test)
        f0 = _file(before, tmp / f"{name}-{seed}-0.udnc")
        finetune(gm, loader, F.cross_entropy, epochs=8, lr=3e-3, train_bias=True, train_norm=True, keep="last",
                 progress=False, codebook="table")
        tuned = copy.deepcopy(gm)
        round_for_storage(gm, raw_float_dtype="float16", codebook_float_dtype="float16")
        acc1 = evaluate(gm, data.x_test, data.y_test)
        f1 = _file(gm, tmp / f"{name}-{seed}-1.udnc")
        row = {"lattice": name, "seed": seed, "target_bits": target, "on_lattice_acc": acc0,
               "on_lattice_bytes": f0["bytes"], "on_lattice_encodings": f0["encodings"],
               "table_acc": acc1, "table_bytes": f1["bytes"], "table_codebook_bytes": f1["codebook_bytes"],
               "table_index_bytes": f1["index_bytes"], "table_encodings": f1["encodings"],
               "on_lattice_codebook_bytes": f0["codebook_bytes"], "on_lattice_index_bytes": f0["index_bytes"]}
        for label in ("affine", "auto"):
            m = copy.deepcopy(tuned)
            choices = choose_codebooks(m, label)
            round_for_storage(m, raw_float_dtype="float16", codebook_float_dtype="float16")
            f = _file(m, tmp / f"{name}-{seed}-{label}.udnc")
            row[f"{label}_acc"] = evaluate(m, data.x_test, data.y_test)
            row[f"{label}_bytes"] = f["bytes"]
            row[f"{label}_encodings"] = f["encodings"]
            row[f"{label}_layers"] = sum(c["form"] == "affine" for c in choices)
            row[f"{label}_choices"] = choices
        print(f"{name} seed {seed}: on lattice {acc0:.2f} % {f0['bytes']} B | fine-tuned table {acc1:.2f} % "
              f"{f1['bytes']} B (codebooks {f1['codebook_bytes']} B) | affine {row['affine_acc']:.2f} % "
              f"{row['affine_bytes']} B | auto {row['auto_acc']:.2f} % {row['auto_bytes']} B "
              f"({row['auto_layers']}/{len(choices)} layers affine)", flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict], lattices: list[str], n_params: int) -> str:
    out = ["| lattice | on lattice: ratio, acc mean (min) | fine-tuned + float table: ratio, acc mean (min) | "
           "table bytes (share of file) | affine, every layer: ratio, acc mean (min) | auto: ratio, acc mean (min), "
           "layers affine |",
           "|---|---|---|---|---|---|"]
    for name in lattices:
        rs = [r for r in rows if r["lattice"] == name]
        if not rs:
            continue

        def acc(key):
            v = [r[key] for r in rs]
            return f"{statistics.mean(v):.2f} ({min(v):.2f})"

        def ratio(key):
            return f"{4 * n_params / statistics.mean(r[key] for r in rs):.2f}x"

        cb = statistics.mean(r["table_codebook_bytes"] for r in rs)
        share = cb / statistics.mean(r["table_bytes"] for r in rs)
        layers = "/".join(str(r["auto_layers"]) for r in rs)
        out.append(f"| {name} | {ratio('on_lattice_bytes')}, {acc('on_lattice_acc')} | {ratio('table_bytes')}, "
                   f"{acc('table_acc')} | {cb:.0f} ({share:.0%}) | {ratio('affine_bytes')}, {acc('affine_acc')} | "
                   f"{ratio('auto_bytes')}, {acc('auto_acc')}, {layers} of {len(rs[0]['auto_choices'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lattices", default="Z1,A2,D4,E8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30, help="training and retraining epochs (the demo's 30)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lattices = [x for x in args.lattices.split(",") if x]
    unknown = set(lattices) - set(LATTICES)
    if unknown:
        raise SystemExit(f"unknown lattices {sorted(unknown)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_digits_split()
    model = train_digits_cnn(data, epochs=args.epochs, seed=0, progress=False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"float accuracy {evaluate(model, data.x_test, data.y_test):.2f} %, {n_params} parameters")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in lattices:
            rows += run_lattice(name, seeds, data, model, n_params, Path(tmp), args.epochs)
    print()
    print(table(rows, lattices, n_params))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

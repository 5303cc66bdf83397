"""Rate against accuracy on the demo CNN with and without codeword fine-tuning, with and without pruning.

For each lattice (Z^1, Z^4, E8) and sparsity (0, 50, 70, 80, 90 %) it sweeps the rate from fine to coarse. At every
rate and for each dither seed it compresses (pruned models: prune whole lattice vectors, retrain the kept float
weights, compress with ``exact_zero=True``), measures test accuracy, writes the ``.udnc`` container, then fine-tunes
the codewords (with biases and BatchNorm) and measures again. The summary gives, per setting, the highest
compression ratio whose accuracy stays within 0.5 points of the float model's *robustly*: at that rate and at every
finer rate of the sweep, the mean over seeds passes (and, in its own column, every seed passes).

Ratio = float32 bytes of all the ORIGINAL model's parameters (38,378, BatchNorm included) / bytes of the ``.udnc``
file (``udnc_fx.save``: every tensor the model needs, headers and codebooks included), when the container is
available; otherwise the estimate 32 / (mean index entropy in bits per weight), labelled as such. The estimate is
printed beside it. By default BatchNorm is folded into the convolutions first (``--no-fold-bn`` keeps it: its
weights and statistics are then stored too) and the raw tensors (biases) and fine-tuned codebooks are stored as
float16 (``--raw-float-dtype float32``, ``--codebook-float-dtype float32`` keep float32). Accuracies are those of
the model loaded back from the file (``udnc_fx.load``), so any loss from float16 storage is counted.

A second table compares two ways to code pruned zeros at the same steps: as the lattice point 0 of the index
stream (``exact_zero``) against a separately coded mask plus the indices of the kept weights only.

    .venv/bin/python benchmarks/finetune_curve.py [--quick] [--seeds 3] [--lattices Z1] [--no-fold-bn]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import udnc_fx
from udnc_fx.demo import DigitsCNN, evaluate, load_digits_split, train_digits_cnn
from udnc_fx.passes.finetune import finetune, finetune_float
from udnc_fx.passes.fold import fold_batchnorm
from udnc_fx.passes.materialize import materialize, served_params
from udnc_fx.passes.prune import prune
from udnc_fx.quantizer import quantize_array

OUT = Path(__file__).resolve().parent / "out"
LATTICES = {"Z1": ("Z", 1), "Z4": ("Z", 4), "E8": ("E8", 8)}
# Bits per *kept* weight; the target rate is h(sparsity) + (1 - sparsity) * b.
KEPT_BITS = [4.0, 3.5, 3.0, 2.5, 2.25, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5]
TOLERANCE = 0.5
ZERO_TABLE_BITS = (3.0, 2.0, 1.0)  # bits per kept weight where the zero-coding table is measured


def binary_entropy(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def entropy_bits(symbols: np.ndarray) -> float:
    """Order-0 empirical entropy of a stream in bits (total, not per symbol)."""
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def container_bytes(gm, path: Path | None, float_dtypes: tuple[str, str] = ("float32", "float32")) -> int | None:
    if path is None:
        return None
    return udnc_fx.save(gm, path, raw_float_dtype=float_dtypes[0], codebook_float_dtype=float_dtypes[1])


def saved_point(gm, path: Path | None, fresh, data, float_dtypes: tuple[str, str]) -> tuple[int | None, float]:
    """Bytes of the ``.udnc`` file and the test accuracy of the model loaded back from it (in-memory accuracy when
    the container is unavailable). ``float_dtypes``: storage of the raw tensors and of fine-tuned codebooks."""
    nbytes = container_bytes(gm, path, float_dtypes)
    if nbytes is None:
        return None, evaluate(gm, data.x_test, data.y_test)
    return nbytes, evaluate(udnc_fx.load(path, fresh), data.x_test, data.y_test)


def have_container() -> bool:
    try:
        import udnc_fx.storage  # noqa: F401
    except ImportError:
        return False
    return hasattr(udnc_fx, "save")


def zero_coding_row(pruned, masks, gm, config) -> dict:
    """Bits of the pruned layers coded two ways at the same steps and dither."""
    from udnc_fx.record import weight_key

    params = dict(pruned.named_parameters())
    stream = mask_way = 0.0
    stream_bytes = mask_bytes = 0
    from udnc_fx.coding.coders import DEFAULT_CODER, get_coder

    coder = get_coder(DEFAULT_CODER)
    weights = 0
    for dlp in served_params(gm):
        w = params[dlp.fqn].detach().numpy()
        weights += w.size
        key = weight_key(config.seed, dlp.fqn, config.dithered)
        plain = quantize_array(w, lattice=dlp.lattice, n=dlp.n, step=dlp.step, key=key, exact_zero=False)
        mask = masks[dlp.fqn].numpy().reshape(-1)
        # a vector is kept if any of its real elements is (padding counts as pruned)
        mask = np.concatenate([mask, np.zeros((-mask.size) % dlp.n, dtype=bool)]).reshape(-1, dlp.n).any(1)
        idx = dlp.indices.numpy().astype(np.int64)
        stream += entropy_bits(idx)
        kept = plain.indices[mask]
        mask_way += entropy_bits(mask.astype(np.int64)) + entropy_bits(kept)
        stream_bytes += len(coder.encode(idx, dlp.num_codewords))
        _, kept_dense = np.unique(kept, return_inverse=True)
        mask_bytes += len(coder.encode(mask.astype(np.int64), 2)) + len(coder.encode(kept_dense.reshape(-1), int(kept_dense.max()) + 1 if kept.size else 1))
    return {
        "stream_bits_per_weight": stream / weights,
        "mask_bits_per_weight": mask_way / weights,
        "stream_coded_bytes": stream_bytes,
        "mask_coded_bytes": mask_bytes,
    }


def masked_accuracy(gm, masks, data) -> float:
    """Accuracy of the mask way of coding zeros: dithered decode everywhere, then pruned positions set to 0."""
    plain = materialize(gm)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name in masks:
                p.masked_fill_(~masks[name], 0.0)
    return evaluate(plain, data.x_test, data.y_test)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Z1 only, sparsity 0 and 0.8, one seed, few rates")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lattices", default="Z1,Z4,E8")
    parser.add_argument("--sparsities", default="0,0.5,0.7,0.8,0.9")
    parser.add_argument("--ft-epochs", type=int, default=8, help="codeword fine-tuning epochs")
    parser.add_argument("--retrain-epochs", type=int, default=30, help="float retraining epochs after pruning")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this small CNN)")
    parser.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                        help="keep BatchNorm (default: fold it into the convolutions before pruning)")
    parser.add_argument("--raw-float-dtype", default="float16", choices=("float16", "float32"),
                        help="storage of the raw (uncompressed) float tensors: biases, BatchNorm")
    parser.add_argument("--codebook-float-dtype", default="float16", choices=("float16", "float32"),
                        help="storage of fine-tuned codebooks (untouched ones are exact integer coordinates)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else list(range(args.seeds))
    lattices = ["Z1"] if args.quick else args.lattices.split(",")
    sparsities = [0.0, 0.8] if args.quick else [float(s) for s in args.sparsities.split(",")]
    kept_bits = [3.0, 2.0, 1.5] if args.quick else KEPT_BITS
    ft_epochs = 2 if args.quick else args.ft_epochs
    retrain_epochs = 2 if args.quick else args.retrain_epochs
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    true_bytes = have_container()

    t_start = time.perf_counter()
    data = load_digits_split()
    model = train_digits_cnn(data, epochs=30, seed=0, progress=False)
    float_acc = evaluate(model, data.x_test, data.y_test)
    n_params = sum(p.numel() for p in model.parameters())  # of the original model: the ratio's numerator
    base = fold_batchnorm(model) if args.fold_bn else model
    float_dtypes = (args.raw_float_dtype, args.codebook_float_dtype)
    fresh = (fold_batchnorm(DigitsCNN()) if args.fold_bn else DigitsCNN()).eval()  # what load() rebuilds onto
    folded_acc = evaluate(base, data.x_test, data.y_test)
    threshold = float_acc - TOLERANCE
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=64, shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    ratio_kind = "true .udnc bytes" if true_bytes else "ESTIMATED 32/index entropy"
    print(f"float test accuracy {float_acc:.2f} % ({len(data.y_test)} images), {n_params} parameters "
          f"({4 * n_params} float32 bytes); pass = accuracy >= {threshold:.2f} %; ratio: {ratio_kind}")
    folded = f"folded (folded float model: {folded_acc:.2f} %)" if args.fold_bn else "kept"
    print(f"BatchNorm {folded}; "
          f"raw tensors stored as {args.raw_float_dtype}, fine-tuned codebooks as {args.codebook_float_dtype}; "
          f"accuracy of the model loaded from the file\n")

    points, zero_rows, retrained = [], [], {}
    tmp = Path(tempfile.mkdtemp(prefix="udnc-curve-"))
    for lname in lattices:
        lattice, n = LATTICES[lname]
        for sparsity in sparsities:
            base_cfg = udnc_fx.CompressConfig(lattice=lattice, n=n, exact_zero=sparsity > 0)
            source, masks = base, None
            if sparsity > 0:
                source, masks = prune(base, sparsity, config=base_cfg)
                finetune_float(source, masks, loader, F.cross_entropy, epochs=retrain_epochs, lr=3e-3, keep="last",
                               progress=False)
                retrained[(lname, sparsity)] = evaluate(source, data.x_test, data.y_test)
            fails = 0
            for b in kept_bits:
                target = binary_entropy(sparsity) + (1 - sparsity) * b
                row = {"lattice": lname, "sparsity": sparsity, "kept_bits": b, "target_bits": target, "seeds": []}
                try:
                    for seed in seeds:
                        cfg = base_cfg.replace(seed=seed, target_bits=target)
                        gm = udnc_fx.compress(source, cfg)
                        entropy = udnc_fx.inspect(gm).mean_entropy_bits
                        bytes0, acc0 = saved_point(gm, tmp / "a.udnc" if true_bytes else None, fresh, data,
                                                   float_dtypes)
                        if masks is not None and b in ZERO_TABLE_BITS:
                            if seed == seeds[0]:
                                zero_rows.append(zero_coding_row(source, masks, gm, cfg))
                                zero_rows[-1].update(lattice=lname, sparsity=sparsity, target_bits=target, kept_bits=b,
                                                     exact_zero_accuracy=[], mask_accuracy=[])
                            plain_cfg = cfg.replace(
                                exact_zero=False, target_bits=None,
                                overrides={d.fqn.rpartition(".")[0]: udnc_fx.LayerConfig(step=d.step)
                                           for d in served_params(gm)},
                            )
                            zero_rows[-1]["exact_zero_accuracy"].append(evaluate(gm, data.x_test, data.y_test))
                            zero_rows[-1]["mask_accuracy"].append(
                                masked_accuracy(udnc_fx.compress(source, plain_cfg), masks, data))
                        finetune(gm, loader, F.cross_entropy, epochs=ft_epochs, lr=3e-3, train_bias=True,
                                 train_norm=True, keep="last", progress=False)
                        bytes1, acc1 = saved_point(gm, tmp / "b.udnc" if true_bytes else None, fresh, data,
                                                   float_dtypes)
                        row["seeds"].append({"seed": seed, "entropy": entropy, "acc": acc0, "acc_ft": acc1,
                                             "bytes": bytes0, "bytes_ft": bytes1})
                except udnc_fx.ConfigError as exc:
                    row["unreachable"] = str(exc)
                    points.append(row)
                    print(f"  {lname} s={sparsity} b={b}: unreachable ({str(exc)[:80]})", flush=True)
                    continue
                est = 32 / statistics.mean(s["entropy"] for s in row["seeds"])
                for tag, acc_key, bytes_key in (("", "acc", "bytes"), ("_ft", "acc_ft", "bytes_ft")):
                    accs = [s[acc_key] for s in row["seeds"]]
                    row[f"acc_mean{tag}"], row[f"acc_min{tag}"] = statistics.mean(accs), min(accs)
                    row[f"ratio{tag}"] = (
                        4 * n_params / statistics.mean(s[bytes_key] for s in row["seeds"]) if true_bytes else est
                    )
                row["ratio_est"] = est
                points.append(row)
                print(f"  {lname} s={sparsity} b={b} target {target:.3f}: ratio {row['ratio']:.1f}x/{row['ratio_ft']:.1f}x "
                      f"(est {est:.1f}x) acc {row['acc_mean']:.2f} ({row['acc_min']:.2f}) -> fine-tuned "
                      f"{row['acc_mean_ft']:.2f} ({row['acc_min_ft']:.2f})  [{time.perf_counter() - t_start:.0f} s]",
                      flush=True)
                fails = fails + 1 if row["acc_mean_ft"] < threshold else 0
                if fails >= 2:
                    break

    def robust(rows, acc_key, ratio_key):
        best = None
        for r in rows:  # finest rate first
            if "unreachable" in r:
                continue
            if r[acc_key] < threshold:
                break
            best = r
        return best

    print(f"\n## Highest compression within {TOLERANCE} points of float ({float_acc:.2f} %), robust over the sweep\n")
    print(f"ratio: {ratio_kind} (all {n_params} parameters of the original model as float32 / file"
          f"{'; BatchNorm folded' if args.fold_bn else ''}; raw tensors {args.raw_float_dtype}, fine-tuned codebooks "
          f"{args.codebook_float_dtype}); "
          f"est. = 32 / mean index entropy. "
          f"Dithered, {len(seeds)} seed(s): 'mean' = the mean accuracy passes, 'every seed' = the worst seed passes.\n")
    print("| lattice | sparsity | fine-tuned | ratio (mean passes) | acc mean (min) there | est. ratio | bits/param in file "
          "| ratio (every seed passes) | float acc after prune+retrain |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for lname in lattices:
        for sparsity in sparsities:
            rows = [r for r in points if r["lattice"] == lname and r["sparsity"] == sparsity]
            for tag in ("", "_ft"):
                best = robust(rows, f"acc_mean{tag}", f"ratio{tag}")
                worst = robust(rows, f"acc_min{tag}", f"ratio{tag}")
                ret = retrained.get((lname, sparsity))
                line = {
                    "lattice": lname, "sparsity": sparsity, "finetuned": bool(tag),
                    "ratio": best and best[f"ratio{tag}"], "ratio_every_seed": worst and worst[f"ratio{tag}"],
                }
                summary.append(line)
                if best is None:
                    cells = ["none", "", "", ""]
                else:
                    cells = [
                        f"{best[f'ratio{tag}']:.1f}x",
                        f"{best[f'acc_mean{tag}']:.2f} ({best[f'acc_min{tag}']:.2f})",
                        f"{best['ratio_est']:.1f}x",
                        f"{32 / best[f'ratio{tag}']:.2f}",
                    ]
                print(f"| {lname} | {sparsity:.0%} | {'yes' if tag else 'no'} | " + " | ".join(cells)
                      + f" | {'none' if worst is None else format(worst[f'ratio{tag}'], '.1f') + 'x'} | "
                      + ("" if ret is None else f"{ret:.2f}") + " |")

    if zero_rows:
        print("\n## Pruned zeros: lattice point 0 in the index stream (exact_zero) vs. a separately coded mask\n")
        print("Same steps and dither; bits per Conv/Linear weight; entropy = ideal order-0, coded = the default coder "
              "(range-adaptive-v1). Accuracy without fine-tuning (mask way: dithered decode, pruned positions zeroed), "
              "mean over seeds.\n")
        print("| lattice | sparsity | bits/kept weight | stream entropy | mask+kept entropy | saving | stream coded "
              "| mask+kept coded | saving | acc exact_zero | acc mask |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for z in zero_rows:
            print(
                f"| {z['lattice']} | {z['sparsity']:.0%} | {z['kept_bits']} | {z['stream_bits_per_weight']:.3f} | "
                f"{z['mask_bits_per_weight']:.3f} | {1 - z['stream_bits_per_weight'] / z['mask_bits_per_weight']:.1%} | "
                f"{8 * z['stream_coded_bytes']} b | {8 * z['mask_coded_bytes']} b | "
                f"{1 - z['stream_coded_bytes'] / z['mask_coded_bytes']:.1%} | "
                f"{statistics.mean(z['exact_zero_accuracy']):.2f} | "
                f"{statistics.mean(z['mask_accuracy']) if z['mask_accuracy'] else float('nan'):.2f} |"
            )

    (out_dir / "finetune_curve.json").write_text(json.dumps(
        {"float_accuracy": float_acc, "parameters": n_params, "ratio_kind": ratio_kind, "fold_bn": args.fold_bn,
         "raw_float_dtype": args.raw_float_dtype, "codebook_float_dtype": args.codebook_float_dtype,
         "folded_float_accuracy": folded_acc, "points": points,
         "summary": summary, "zero_coding": zero_rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"\n(matplotlib is not installed: no PNG; the points are in {out_dir / 'finetune_curve.json'})")
        return 0
    fig, ax = plt.subplots(figsize=(8, 5))
    for lname in lattices:
        for sparsity in sparsities:
            rows = [r for r in points if r["lattice"] == lname and r["sparsity"] == sparsity and "unreachable" not in r]
            if not rows:
                continue
            for tag, style in (("", ":"), ("_ft", "-")):
                ax.plot([r[f"ratio{tag}"] for r in rows], [r[f"acc_mean{tag}"] for r in rows], style, marker="o",
                        ms=3, label=f"{lname} {sparsity:.0%}{' fine-tuned' if tag else ''}")
    ax.axhline(threshold, color="k", lw=0.8, ls="--", label=f"float − {TOLERANCE}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.set_xlabel(f"compression ratio ({ratio_kind})")
    ax.set_ylabel("test accuracy % (mean over seeds)")
    ax.set_ylim(max(0, threshold - 15), 100)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "finetune_curve.png", dpi=130)
    print(f"\nwrote {out_dir / 'finetune_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

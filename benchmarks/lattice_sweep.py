"""Accuracy against rate for each lattice on the demo CNN, without fine-tuning.

For every lattice and target rate it solves the shared relative step (``target_bits``), compresses with several
dither seeds and prints test accuracy and the index entropy; where a target cannot be met (vector lattices saturate
on small layers: every vector gets its own codeword) it says so. The codebook cost is printed beside the entropy
because for vector lattices it is not negligible.

    .venv/bin/python benchmarks/lattice_sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import udnc_fx
from udnc_fx.demo import evaluate, load_digits_split, train_digits_cnn

LATTICES = [("Z", 1), ("Z", 4), ("D4", 4), ("E8", 8)]


def codebook_bits(gm) -> float:
    """Bits to store the used codewords as integer lattice coordinates at their empirical per-coordinate entropy
    (an optimistic estimate of what a coder needs); float32 codewords cost 32 bits per coordinate instead."""
    import numpy as np

    from udnc_fx.passes.materialize import served_params

    total = 0.0
    for dlp in served_params(gm):
        for col in dlp.codebook_int.T:
            _, counts = np.unique(col, return_counts=True)
            p = counts / counts.sum()
            total += float(-(p * np.log2(p)).sum()) * len(col)
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer rates")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else list(range(args.seeds))
    rates = [3.0] if args.quick else [1.0, 2.0, 3.0, 4.0]
    data = load_digits_split()
    model = train_digits_cnn(data, progress=False)
    float_acc = evaluate(model, data.x_test, data.y_test)
    print(f"float test accuracy {float_acc:.2f} % ({len(data.y_test)} images); dithered, no fine-tuning\n")
    print("| lattice | target bits/w | index entropy bits/w | + codebook bits/w | accuracy % mean (min) over seeds | relative step |")
    print("|---|---|---|---|---|---|")
    for lattice, n in LATTICES:
        for bits in rates:
            accs, ents, cbs, steps = [], [], [], []
            try:
                for seed in seeds:
                    cfg = udnc_fx.CompressConfig(lattice=lattice, n=n, seed=seed, target_bits=bits)
                    gm = udnc_fx.compress(model, cfg)
                    rep = udnc_fx.inspect(gm)
                    accs.append(evaluate(gm, data.x_test, data.y_test))
                    ents.append(rep.mean_entropy_bits)
                    cbs.append(codebook_bits(gm) / rep.total_weights)
                    steps.append(udnc_fx.passes.materialize.served_params(gm)[0].relative_step)
            except udnc_fx.ConfigError as exc:
                print(f"| {lattice}{n if lattice == 'Z' else ''} | {bits} | unreachable | | | {str(exc)[:90]} |")
                continue
            print(
                f"| {lattice}{n if lattice == 'Z' else ''} | {bits} | {statistics.mean(ents):.3f} | "
                f"{statistics.mean(cbs):.3f} | {statistics.mean(accs):.2f} ({min(accs):.2f}) | {steps[0]:.3f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

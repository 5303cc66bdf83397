"""Accuracy against rate for each lattice on the demo CNN, without fine-tuning, measured on the real files.

For every lattice and target rate it solves the shared relative step (``target_bits``: the estimated coded rate,
which every lattice can reach since vector lattices store ``lattice-coords`` instead of a table of points), compresses
with several dither seeds, saves each model to a ``.udnc`` file and prints test accuracy and the file's bits per
compressed weight (every byte of the compressed tensors' sections and header entries) and the whole file's ratio.

    .venv/bin/python benchmarks/lattice_sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import udnc_fx
from udnc_fx.demo import evaluate, load_digits_split, train_digits_cnn

LATTICES = [("Z", 1), ("A2", 2), ("Z", 4), ("D4", 4), ("E8", 8)]


def file_bits(gm, path: Path) -> tuple[float, float, float]:
    """``(bits per compressed weight, whole-file ratio, index entropy)`` of ``gm`` saved at ``path``."""
    from udnc_fx.coding.container import read_header, section_sizes

    udnc_fx.save(gm, path)
    header = read_header(path)
    sizes = section_sizes(header)
    rep = udnc_fx.inspect(gm)
    quantized = [t for t in sizes["tensors"].values() if t["kind"] == "quantized"]
    bits = 8 * sum(t["total"] for t in quantized) / rep.total_weights
    float_bytes = 4 * sum(math_prod(r["shape"]) for r in header["raw"]) + 4 * rep.total_weights
    return bits, float_bytes / sizes["file"], rep.mean_entropy_bits


def math_prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


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
    print("| lattice | target bits/w | file bits/w (compressed tensors) | whole file ratio | index entropy bits/w "
          "| accuracy % mean (min) over seeds | relative step |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for lattice, n in LATTICES:
            for bits in rates:
                accs, fbits, ratios, ents, steps = [], [], [], [], []
                try:
                    for seed in seeds:
                        cfg = udnc_fx.CompressConfig(lattice=lattice, n=n, seed=seed, target_bits=bits)
                        gm = udnc_fx.compress(model, cfg)
                        accs.append(evaluate(gm, data.x_test, data.y_test))
                        fb, ratio, ent = file_bits(gm, Path(tmp) / f"{lattice}{n}-{bits}-{seed}.udnc")
                        fbits.append(fb)
                        ratios.append(ratio)
                        ents.append(ent)
                        steps.append(udnc_fx.passes.materialize.served_params(gm)[0].relative_step)
                except udnc_fx.ConfigError as exc:
                    print(f"| {lattice}{n if lattice == 'Z' else ''} | {bits} | unreachable | | | | {str(exc)[:90]} |")
                    continue
                print(
                    f"| {lattice}{n if lattice == 'Z' else ''} | {bits} | {statistics.mean(fbits):.3f} | "
                    f"{statistics.mean(ratios):.2f}x | {statistics.mean(ents):.3f} | "
                    f"{statistics.mean(accs):.2f} ({min(accs):.2f}) | {steps[0]:.3f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The rate ``target_bits`` solves for against the real file, per lattice, on real models (issue 12, point 3).

For each lattice and target it compresses the model (``target_bits``, data-free, one seed), saves it with
``udnc_fx.save`` and compares, over the compressed tensors, the solver's estimate
(``DitheredLatticeParam.rate_bits``: for vector lattices what the default coder writes, tables and dither contexts
included; for Z¹ the index entropy) with the bits of the tensors' sections in the file, and with every byte the
tensors own in the file (sections and header entries). ``--prune`` (digits only) first prunes 80 % of the weights in
whole lattice vectors (BatchNorm folded, ``exact_zero``), as the demo pipeline does.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rate_estimate.py --model digits [--prune] [--bits 1.122,2]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rate_estimate.py --model minilm --bits 3.4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LATTICES = {"Z1": ("Z", 1), "Z4": ("Z", 4), "A2": ("A2", 2), "D4": ("D4", 4), "E8": ("E8", 8)}


def previous_estimate(dlp) -> float:
    """The estimate before this fix, bits per weight: ``min(H(k) + K·Hc/m, Hc) / n`` with ``H(k)`` the index
    entropy and ``Hc`` the sum of the ``lattice-coords`` symbol columns' order-0 entropies (a table row costed as a
    coded vector; no count tables, no dither contexts); the index entropy for Z¹."""
    import numpy as np

    from udnc_fx.coding.lattice_coords import coordinate_entropy_bits

    q = dlp.record()
    points = np.asarray(q.codebook_int)[np.asarray(q.indices)]
    m, n = points.shape
    counts = np.bincount(np.asarray(q.indices))
    p = counts[counts > 0] / m
    h_joint = float(-(p * np.log2(p)).sum())
    if n == 1:
        return h_joint
    h_coords = coordinate_entropy_bits(points, q.lattice)
    return min(h_joint + p.size * h_coords / m, h_coords) / n


def measure(model, lattice: str, n: int, bits: float, prune: bool, path: Path) -> dict:
    import udnc_fx
    from udnc_fx.coding.container import read_header, section_sizes
    from udnc_fx.passes.materialize import served_params

    config = udnc_fx.CompressConfig(lattice=lattice, n=n, seed=0, target_bits=bits, exact_zero=prune)
    source = model
    if prune:
        from udnc_fx.passes.fold import fold_batchnorm
        from udnc_fx.passes.prune import prune as prune_model

        source = prune_model(fold_batchnorm(model), 0.8, config=config)[0]
    gm = udnc_fx.compress(source, config, progress=False)
    udnc_fx.save(gm, path, progress=False)
    sizes = section_sizes(read_header(path))["tensors"]
    est = old = sections = owned = weights = 0.0
    worst = 0.0
    for dlp in served_params(gm):
        layer_est = dlp.rate_bits() * dlp.numel
        old += previous_estimate(dlp) * dlp.numel
        layer_sections = 8 * (sizes[dlp.fqn]["indices"] + sizes[dlp.fqn]["codebook"])
        est += layer_est
        sections += layer_sections
        owned += 8 * sizes[dlp.fqn]["total"]
        weights += dlp.numel
        worst = max(worst, abs(layer_est - layer_sections) / layer_sections)
    path.unlink()
    return {"estimate": est / weights, "previous": old / weights, "sections": sections / weights, "owned": owned / weights, "worst": worst,
            "layers": len(served_params(gm))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits", choices=["digits", "minilm"])
    ap.add_argument("--lattices", default="Z1,A2,D4,E8")
    ap.add_argument("--bits", default=None, help="comma-separated targets (default 1.122,3 digits; 3.4 minilm)")
    ap.add_argument("--prune", action="store_true", help="digits: prune 80 %% in lattice vectors, exact zeros")
    args = ap.parse_args(argv)
    if args.model == "digits":
        import torch

        from udnc_fx.demo import load_digits_split, train_digits_cnn

        torch.manual_seed(0)
        model = train_digits_cnn(load_digits_split(), progress=False)
        bits = args.bits or ("1.122,2" if args.prune else "1.122,3")
    else:
        import peers

        model = peers.minilm_task().float_model
        bits = args.bits or "3.4"
    print(f"{args.model}{' pruned 80 %' if args.prune else ''}: bits per compressed weight, seed 0\n")
    print("| lattice | target | estimate (rate_bits) | previous estimate | file sections "
          "| file, tensors' bytes with header entries | worst layer abs(estimate − sections) / sections |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.lattices.split(","):
            lattice, n = LATTICES[label]
            for b in (float(x) for x in bits.split(",")):
                r = measure(model, lattice, n, b, args.prune, Path(tmp) / "m.udnc")
                print(f"| {label} | {b:g} | {r['estimate']:.3f} | {r['previous']:.3f} | {r['sections']:.3f} | "
                      f"{r['owned']:.3f} | "
                      f"{100 * r['worst']:.1f} % of {r['layers']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

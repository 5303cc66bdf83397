"""Accuracy against rate for each lattice on the demo CNN, without fine-tuning, measured on the real files.

For every lattice and target rate it solves the shared relative step (``target_bits``: the estimated coded rate,
which every lattice can reach since vector lattices store ``lattice-coords`` instead of a table of points), compresses
with several dither seeds, saves each model to a ``.udnc`` file and prints test accuracy and the file's bits per
compressed weight (every byte of the compressed tensors' sections and header entries) and the whole file's ratio.

    .venv/bin/python benchmarks/lattice_sweep.py [--quick]

``--bar`` (issue 12) instead gives, per lattice, the best ratio at which every dither seed (default 5) stays within
0.5 points of float test accuracy, for two settings side by side in one run, on the same rate ladder for every
lattice; a point counts only if it and every finer point of the ladder pass (``_common.robust_best``); the ratio is
every float32 tensor of the original ``state_dict`` (BatchNorm included, as ``encoder.py``) over the ``.udnc`` file's
bytes, the accuracy that of the file loaded back:

* ``post-training``: ``encoder.py``'s digits setting ``compensated`` — the demo CNN with BatchNorm,
  ``compress(..., calibration=TRAIN batches)`` (error-compensating rounding, probe allocation), float16 raw tensors,
  along ``--post-bits`` (target bits per weight);
* ``demo pipeline``: ``udnc demo``'s recipe through ``digits_pipeline.Pipeline`` — BatchNorm folded, 80 % of the
  weights pruned in whole lattice vectors, kept weights retrained 30 epochs, data-free ``compress`` with
  ``exact_zero=True`` at h(0.8) + ``kept`` bits per kept weight, 8 epochs of codeword + bias fine-tuning, float16 raw
  tensors and codebooks; along ``--kept-bits`` (0.25 bits per kept weight is 0.05 bits per weight). The data order of
  both trainings is fixed, so the dither seed is the only thing that varies between seeds.

Each sweep runs fine to coarse and stops after two consecutive failing points. Calibration and training use only the
TRAIN split; nothing is chosen on the test split. Also printed: per layer, the bytes of seed 0's file at each
lattice's best point and at Z1's best rate (``--json`` keeps every point with its per-layer bytes).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lattice_sweep.py --bar [--seeds-list 0,1,2,3,4]
        [--lattices Z1,A2,D4,E8] [--settings post,pipeline] [--json out.json]

``--pool a.json,b.json`` pools such runs made with different seeds (a point passes if every seed of every run does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

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


#: target bits per weight of the post-training setting, fine to coarse (0.05-bit steps)
POST_BITS = [round(1.8 - 0.05 * i, 2) for i in range(19)]  # 1.8 ... 0.9
#: bits per kept weight of the demo pipeline, fine to coarse (0.25 per kept weight = 0.05 per weight at 80 % pruned)
KEPT_BITS = [round(4.0 - 0.25 * i, 2) for i in range(15)]  # 4.0 ... 0.5
DEMO_SPARSITY = 0.8


def _sweep(evaluate_at, ladder: list[float], stop_after_failures: int = 2) -> list:
    """``evaluate_at`` along ``ladder`` (fine to coarse) until ``stop_after_failures`` consecutive points fail."""
    points, fails = [], 0
    for x in ladder:
        points.append(evaluate_at(x))
        fails = 0 if points[-1].passes else fails + 1
        if fails >= stop_after_failures:
            break
    return points


def post_point(task, lattice: str, bits: float, seeds: list[int], calibration, tmp: Path):
    """``encoder.py``'s ``compensated`` digits point for one lattice: every seed compressed with calibration, saved
    (float16 raw tensors), loaded back onto the float model and scored."""
    import _common as C
    import digits_pipeline as P
    from udnc_fx.passes.materialize import materialize

    per_seed = []
    for seed in seeds:
        cfg = udnc_fx.CompressConfig(target_bits=bits, seed=seed, **P.lattice_fields(lattice))
        gm = udnc_fx.compress(task.float_model, cfg, calibration=calibration, progress=False)
        path = tmp / f"post-{lattice}-{bits:g}-{seed}.udnc"
        nbytes = udnc_fx.save(gm, path, raw_float_dtype="float16")
        quality = task.quality_fn(materialize(udnc_fx.load(path, task.float_model), inplace=True))
        layers = P.layer_bytes(path)
        path.unlink()
        per_seed.append({"bytes": nbytes, "quality": quality, "encode_s": None, "decode_s": None,
                         "extra": {"layers": layers}})
    point = C.aggregate(f"post-training {lattice}", f"target {bits:g} bits", -bits, per_seed, task.bar,
                        task.score_key, task.numerator)
    point.extra.update(bits=bits, per_seed_acc=[r["quality"]["acc"] for r in per_seed])
    C.log(f"  [post {lattice}] {bits:g} bits ratio {point.ratio:6.2f}x acc "
          f"{', '.join(f'{a:.2f}' for a in point.extra['per_seed_acc'])} {'pass' if point.passes else 'FAIL'}")
    return point


def _layer_table(points_by: dict, names: list[str]) -> str:
    """Per-layer bytes (index + codebook) of seed 0's file at each chosen point, one column per point."""
    import _common as C

    layers = [k for k in next(iter(points_by.values())).extra["layers"] if not k.startswith("(")]
    rows = []
    for layer in layers + ["(raw)", "(shared)", "(file)"]:
        row = [layer]
        for name in names:
            e = points_by[name].extra["layers"][layer]
            if "index_bytes" in e:
                row.append(f"{e['bytes']} ({e['index_bytes']} + {e['codebook_bytes']} {e['encoding']}"
                           f"{', affine' if e['affine'] else ''})")
            else:
                row.append(str(e["bytes"]))
        rows.append(row)
    return C.md_table(["tensor"] + names, rows)


def bar(args) -> int:
    """``--bar``: the best ratio at the 5-seed bar per lattice, post-training and demo pipeline side by side."""
    import torch

    import _common as C
    import digits_pipeline as P
    import peers

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds_list.split(",")]
    lattices = [x for x in args.lattices.split(",") if x]
    for lat in lattices:
        P.lattice_fields(lat)  # refuses an unknown name before any work
    settings = [x for x in args.settings.split(",") if x]
    post_bits = [float(b) for b in args.post_bits.split(",")] if args.post_bits else POST_BITS
    kept_bits = [float(b) for b in args.kept_bits.split(",")] if args.kept_bits else KEPT_BITS
    task = peers.digits_task()
    data = task.extra["data"]
    calibration = [data.x_train[i:i + 256] for i in range(0, len(data.x_train), 256)]
    C.log(f"float {task.float_quality}; bar: {task.bar_text}; seeds {seeds}")
    sweeps: dict[str, dict[str, list]] = {"post": {}, "pipeline": {}}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for lat in lattices:
            if "post" in settings:
                sweeps["post"][lat] = _sweep(lambda b: post_point(task, lat, b, seeds, calibration, tmp), post_bits)
            if "pipeline" in settings:
                recipe = P.Recipe(sparsity=DEMO_SPARSITY, lattice=lat, calibrate=False)
                pipe = P.Pipeline(task.float_model, data, recipe, task.numerator, tmp)
                sweeps["pipeline"][lat] = _sweep(lambda b: pipe.point(DEMO_SPARSITY, b, seeds), kept_bits)
    head = ["lattice"]
    if "post" in settings:
        head += ["post-training compensated: best ratio (target bits)", "worst seed there", "next coarser point"]
    if "pipeline" in settings:
        head += ["demo pipeline + fine-tune: best ratio (bits/kept, bits/weight)", "worst seed there",
                 "next coarser point"]
    rows = []
    for lat in lattices:
        row = [lat]
        for key in ("post", "pipeline"):
            if key not in settings:
                continue
            pts = sweeps[key][lat]
            best = C.robust_best(pts)
            nxt = None
            if best is not None:
                coarser = sorted((p for p in pts if p.order > best.order), key=lambda p: p.order)
                nxt = coarser[0] if coarser else None

            def where(p, key=key):
                return f"{p.extra['bits']:g}" if key == "post" else f"{p.extra['kept_bits']:g}/kept, {-p.order:g}"

            if best is None:
                first = min(pts, key=lambda p: p.order)
                row += [f"none ({first.ratio:.2f}x at {where(first)} fails)", f"{first.score_worst:.2f} %", ""]
            else:
                row += [f"{best.ratio:.2f}x ({where(best)})", f"{best.score_worst:.2f} %",
                        "" if nxt is None else f"{nxt.ratio:.2f}x fails, worst {nxt.score_worst:.2f} %"
                        if not nxt.passes else f"{nxt.ratio:.2f}x passes (a finer point failed)"]
        rows.append(row)
    print(f"\nDemo CNN, {len(data.y_test)} test images, {task.bar_text}; seeds {seeds}; ratio = float32 state_dict "
          f"({task.numerator} bytes) over the file\n")
    print(C.md_table(head, rows))
    for key in ("post", "pipeline"):
        if key not in settings:
            continue
        bests = {lat: C.robust_best(sweeps[key][lat]) for lat in lattices}
        chosen = {f"{lat} best": p for lat, p in bests.items() if p is not None}
        z1 = bests.get("Z1")
        if z1 is not None:
            for lat in lattices:
                same = [p for p in sweeps[key][lat] if p.order == z1.order]
                if lat != "Z1" and same:
                    chosen[f"{lat} at Z1's rate"] = same[0]
        if chosen:
            print(f"\n{key}: bytes per tensor of seed 0's file (total (indices + codebook encoding)):\n")
            print(_layer_table(chosen, list(chosen)))
        print(f"\n{key}: every point (ratio, accuracy per seed):\n")
        print(C.md_table(["lattice", "setting", "ratio", "acc per seed", ""],
                         [[lat, p.setting, f"{p.ratio:.2f}x",
                           " ".join(f"{a:.2f}" for a in p.extra["per_seed_acc"]), "pass" if p.passes else "FAIL"]
                          for lat in lattices for p in sweeps[key][lat]]))
    if args.json:
        Path(args.json).write_text(json.dumps({k: {lat: [p.to_dict() for p in pts] for lat, pts in v.items()}
                                               for k, v in sweeps.items()}, indent=1, default=str))
    return 0


def pool(paths: list[str], threshold: float, numerator: int) -> str:
    """Several ``--bar --json`` runs with different seeds pooled: per setting and lattice, the robust best over the
    ladder points every run measured, a point passing only if every seed of every run stays at ``threshold`` or
    above (ratio: ``numerator`` over the mean file bytes); and the mean accuracy at 19x of a linear fit of each
    point's seed-mean accuracy against its ratio over the points from 17x to 21.5x."""
    import numpy as np

    import _common as C

    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = []
    for key in ("post", "pipeline"):
        for lat in [lat for lat in runs[0].get(key, {}) if all(lat in r.get(key, {}) for r in runs)]:
            by_order = [{p["order"]: p for p in r[key][lat]} for r in runs]
            best, nxt = None, None
            for order in sorted(set.intersection(*(set(b) for b in by_order))):
                pts = [b[order] for b in by_order]
                accs = [a for p in pts for a in p["extra"]["per_seed_acc"]]
                ratio = numerator * len(pts) / sum(p["bytes"] for p in pts)
                if min(accs) < threshold:
                    nxt = f"{ratio:.2f}x fails, worst {min(accs):.2f} %"
                    break
                best = f"{ratio:.2f}x ({-order:g} bits/weight), worst {min(accs):.2f} %"
            every = [p for r in runs for p in r[key][lat]]
            ratio = np.array([p["ratio"] for p in every])
            mean = np.array([statistics.mean(p["extra"]["per_seed_acc"]) for p in every])
            band = (ratio >= 17) & (ratio <= 21.5)
            fit = np.polyval(np.polyfit(ratio[band], mean[band], 1), 19.0) if band.sum() >= 3 else float("nan")
            seeds = sum(len(r[key][lat][0]["extra"]["per_seed_acc"]) for r in runs)
            rows.append([key, lat, seeds, best or "none", nxt or "", f"{fit:.2f} %"])
    return C.md_table(["setting", "lattice", "seeds", "robust best, every seed of every run", "next coarser point",
                       "fitted mean accuracy at 19x"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer rates")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bar", action="store_true",
                        help="best ratio at the every-seed bar per lattice, post-training and demo pipeline")
    parser.add_argument("--seeds-list", default="0,1,2,3,4", help="--bar: the dither seeds")
    parser.add_argument("--lattices", default="Z1,A2,D4,E8", help="--bar: the lattices")
    parser.add_argument("--settings", default="post,pipeline", help="--bar: post, pipeline or both")
    parser.add_argument("--post-bits", default=None, help="--bar: target bits ladder, fine to coarse "
                        f"(default {POST_BITS[0]} ... {POST_BITS[-1]} in 0.05 steps)")
    parser.add_argument("--kept-bits", default=None, help="--bar: bits per kept weight ladder, fine to coarse "
                        f"(default {KEPT_BITS[0]} ... {KEPT_BITS[-1]} in 0.25 steps)")
    parser.add_argument("--json", default=None, help="--bar: write every point here")
    parser.add_argument("--pool", default=None, metavar="A.json,B.json",
                        help="pool --bar --json runs of different seeds (same ladders): every seed of every run")
    args = parser.parse_args(argv)
    if args.pool:
        import peers

        task = peers.digits_task()  # the bar and the ratio's numerator, as the runs had them
        print(pool(args.pool.split(","), task.threshold, task.numerator))
        return 0
    if args.bar:
        return bar(args)
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

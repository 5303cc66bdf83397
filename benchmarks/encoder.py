"""The rate–distortion encoder (issue 10) side by side with NNCodec, in one run, on the demo CNN and MiniLM.

For each model and each udnc-fx encoder setting, the target bits per weight are lowered along a ladder until some
dither seed fails the quality bar; a point passes only if *every* seed passes. Every point is written with
``udnc_fx.save(..., raw_float_dtype="float16")``; the ratio counts the whole ``state_dict`` over the file (as
``peers.py`` does), so it compares directly with NNCodec's bitstream for the same tensors, measured in the same run.

udnc-fx settings (all post-training, no fine-tuning, no pruning; calibration only; ``--pipeline`` adds, on the
digits CNN, the row with pruning and codeword fine-tuning from ``digits_pipeline.py``):

* ``plain + probe allocation``: ``compress(..., calibration=batches, config(compensate=False))`` — each weight
  rounded on its own, steps allocated by the probe (what the project did before this encoder);
* ``compensated``: the default with calibration — error-compensating dithered rounding (columns by decreasing
  ``H_jj``, padded token positions left out of ``H`` and of the probe), probe allocation;
* ``compensated + sequential H``: the same with ``sequential=True`` (each layer's ``H`` measured through the
  already-quantized earlier layers);
* ``compensated (weight order + padded H)``: the encoder before ``act_order`` and ``mask_padding`` (both False);
* ``compensated (weight order)``: ``act_order=False`` alone; ``compensated (padded H)``: ``mask_padding=False``
  alone (it changes nothing on the digits CNN, whose batches have no ``attention_mask``);
* ``compensated + 4 seed trials``: the same, keeping the best of 4 dither seeds on the calibration batches
  (each "seed" of the table is then a base seed whose 4 trials are ``seed·4 … seed·4+3``).

Calibration data never overlaps the evaluation data: the digits CNN calibrates on images of the TRAIN split and is
scored on the test split; MiniLM calibrates on ``benchmarks/data/calibration.txt`` and is scored on
``benchmarks/data/sentences.txt`` (the run checks that no sentence is in both).

Also measured: per-layer output error ``tr(ΔW·H·ΔWᵀ)/rows`` on the calibration inputs of plain against compensated
rounding at *equal rate* (each layer's step solved separately to the same bits per weight for each rounding), and
the time ``compress`` with calibration takes on MiniLM (single thread; set ``OMP_NUM_THREADS=1``; wall and process
CPU seconds), and how many calibration sentences MiniLM needs before every Linear layer is compensated
(``--rows-only`` prints that table alone, ``--time-only`` the encode times alone).

Run: ``OMP_NUM_THREADS=1 python benchmarks/encoder.py [--model digits|minilm|both] [--seeds 0,1,2,3,4] [--quick]``.
Writes ``benchmarks/out/encoder.md`` and ``encoder.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common as C  # noqa: E402
import nncodec_env  # noqa: E402
import peers  # noqa: E402


MINILM_DOC_SENTENCES = 288


def _lattice(label: str) -> tuple[str, int]:
    """``"Z1"``/``"Z4"`` -> ``("Z", n)``; ``"A2"``, ``"D4"``, ``"E8"`` -> ``(name, its dimension)``."""
    if label.startswith("Z"):
        return "Z", int(label[1:] or 1)
    if label in ("A2", "D4", "E8"):
        return label, int(label[1:])
    raise SystemExit(f"unknown lattice {label!r} (Z1..Z8, A2, D4, E8)")


def _variants(quick: bool, lattices: tuple[str, ...] = ("Z1",)) -> list[dict]:
    """Each encoder setting for each lattice; a lattice other than Z¹ is named in the label ("compensated E8")."""
    out = [
        {"label": "plain + probe allocation", "compensate": False, "trials": 1},
        {"label": "compensated", "compensate": True, "trials": 1},
        {"label": "compensated + sequential H", "compensate": True, "trials": 1, "sequential": True},
        {"label": "compensated (weight order + padded H)", "compensate": True, "trials": 1,
         "cfg": {"act_order": False, "mask_padding": False}},
        {"label": "compensated (weight order)", "compensate": True, "trials": 1, "cfg": {"act_order": False}},
        {"label": "compensated (padded H)", "compensate": True, "trials": 1, "cfg": {"mask_padding": False}},
    ]
    if not quick:
        out.append({"label": "compensated + 4 seed trials", "compensate": True, "trials": 4})
    if tuple(lattices) == ("Z1",):
        return out
    return [{**v, "label": f"{v['label']} {lat}", "lattice": _lattice(lat)[0], "n": _lattice(lat)[1],
             "base_label": v["label"]} for lat in lattices for v in out]


def _calibration(task, doc_sentences: int | None = None) -> list:
    if task.key == "digits":
        x = task.extra["data"].x_train  # the TRAIN split only (the score is on the test split)
        return [x[i : i + 256] for i in range(0, len(x), 256)]
    # benchmarks/data/calibration.txt first (the probe allocation uses batch 0), then Python-documentation prose:
    # 32 sentences alone give too few token rows for H (see _calib_text.py)
    import _calib_text

    tokenizer = task.extra["tokenizer"]
    own = peers.read_sentences(peers.DATA / "calibration.txt")
    evaluation = set(peers.read_sentences(peers.DATA / "sentences.txt"))
    count = MINILM_DOC_SENTENCES if doc_sentences is None else doc_sentences
    more = _calib_text.python_doc_sentences(count, exclude=evaluation | set(own)) if count else []
    return [task.extra["calibration_batch"]] + _calib_text.batches(tokenizer, more)


def calibration_rows(task, counts=(0, 32, 64, 96, 128, 288)) -> list[dict]:
    """How many calibration sentences compensation needs on MiniLM: for each number of documentation sentences
    added to the 32 of calibration.txt, the input rows every layer's ``H`` is built from (token positions of the
    padded batches: the hooks see padding too) and how many layers get compensated rounding (the rule in
    ``passes/calibrate.py``: at least ``MIN_ROWS_PER_COLUMN`` rows per input column), checked by a real calibration
    pass for each count."""
    import udnc_fx
    from udnc_fx.passes.trace import prepare
    from udnc_fx.passes.calibrate import collect_inputs
    from udnc_fx.passes.select import select_weights

    cfg = udnc_fx.CompressConfig(**task.udnc_fields)
    target, _ = prepare(task.float_model, cfg)
    gm = target if isinstance(target, torch.fx.GraphModule) else None
    cands, _ = select_weights(target, cfg, gm)
    out = []
    for count in counts:
        batches = _calibration(task, count)
        calib = collect_inputs(target, cands, batches, keep_outputs=False)
        widths = sorted({rec.d for rec in calib.inputs.values()})
        out.append({"doc_sentences": count, "sentences": 32 + count,
                    "rows": int(sum(b["input_ids"].numel() for b in batches)),
                    "real_tokens": int(sum(b["attention_mask"].sum() for b in batches)),
                    "compensated": len(calib.inputs),
                    "linear_layers": len(calib.inputs) + sum(1 for why in calib.fallback.values() if "rows" in why),
                    "widths": widths})
        C.log(f"  [minilm] calibration {out[-1]}")
    return out


def _udnc_point(task, variant, bits, seeds, calibration, tmp: Path) -> C.Point:
    import udnc_fx
    from udnc_fx.passes.materialize import materialize

    per_seed = []
    for seed in seeds:
        base = seed * variant["trials"]
        cfg = udnc_fx.CompressConfig(target_bits=bits, seed=base, compensate=variant["compensate"],
                                     sequential=variant.get("sequential", False), seed_trials=variant["trials"],
                                     lattice=variant.get("lattice", "Z"), n=variant.get("n", 1), **task.udnc_fields,
                                     **variant.get("cfg", {}))
        path = tmp / f"{task.key}-{variant['label'].replace(' ', '_')}-{bits:.4g}-{seed}.udnc"
        with C.Stopwatch() as enc:
            gm = udnc_fx.compress(task.float_model, cfg, calibration=calibration)
        nbytes = udnc_fx.save(gm, path, raw_float_dtype=peers.RAW_FLOAT_DTYPE)
        extra = {"entropy_bits": udnc_fx.inspect(gm).mean_entropy_bits, "file": str(path)}
        if task.reload_each:
            quality = task.quality_fn(materialize(udnc_fx.load(path, task.float_model), inplace=True))
        else:
            peers._round_raw_fp16_(gm)
            quality = task.quality_fn(gm)
        path.unlink()
        del gm
        per_seed.append({"bytes": nbytes, "quality": quality, "encode_s": enc.s, "decode_s": None, "extra": extra})
    point = C.aggregate(f"udnc-fx {variant['label']}", f"target {bits:g} bits", -bits, per_seed, task.bar,
                        task.score_key, task.numerator)
    worst = [s["quality"][task.score_key] for s in per_seed]
    C.log(f"  [{task.key}] {point.method:40s} {point.setting:18s} ratio {point.ratio:6.2f}x  {task.score_key} "
          f"{point.score:.4f} (seeds {', '.join(f'{w:.4f}' for w in worst)}) {'pass' if point.passes else 'FAIL'}"
          f"  enc {C.fmt_s(point.encode_s)} s")
    return point


def _sweep(task, variant, ladder, seeds, calibration, tmp, exact: bool = False) -> list[C.Point]:
    """The ladder until the first failure, then one refinement point (or finer points if even the first fails);
    with ``exact``, only the ladder's own points (for runs that must fit a time budget)."""
    return peers.scan(lambda b: _udnc_point(task, variant, b, seeds, calibration, tmp), ladder,
                      midpoint=lambda a, b: float(f"{(a + b) / 2:.4g}"), finer=None if exact else lambda b: b * 1.25,
                      refine=not exact)


def layer_errors(task, calibration, bits: float, seed: int = 0) -> list[dict]:
    """Per calibrated layer: the step solved to ``bits`` separately for plain and compensated rounding, and the
    output error each gives on the calibration inputs."""
    import udnc_fx
    from udnc_fx.dither import tensor_key
    from udnc_fx.lattice import get_lattice
    from udnc_fx.passes.calibrate import collect_inputs
    from udnc_fx.passes.compensate import compensated_points, inverse_factor, output_error
    from udnc_fx.passes.quantize import solve_scale
    from udnc_fx.passes.select import select_weights
    from udnc_fx.quantizer import coded_rate_bits_per_weight, coded_rate_of_raw_points, quantize_array, raw_dither, vectors_of
    from udnc_fx.passes.trace import prepare

    cfg = udnc_fx.CompressConfig(target_bits=bits, seed=seed, **task.udnc_fields)
    target, _ = prepare(task.float_model, cfg)
    gm = target if isinstance(target, torch.fx.GraphModule) else None
    cands, _ = select_weights(target, cfg, gm)
    calib = collect_inputs(target, cands, calibration, keep_outputs=False)
    rows = []
    for cand in cands:
        rec = calib.inputs.get(cand.fqn)
        if rec is None:
            continue
        w = cand.param.detach().double().numpy()
        w2 = w.reshape(w.shape[0], -1)
        lat = get_lattice("Z", 1)
        u = raw_dither(tensor_key(seed, cand.fqn), w.size, lat)
        factors = [inverse_factor(rec.hessian(g), cfg.damping)[0] for g in range(rec.groups)]
        std = float(w.std())
        v = vectors_of(w, 1)
        s_plain = solve_scale(lambda s: coded_rate_bits_per_weight(v, lat, s * std, u), bits)
        s_comp = solve_scale(lambda s: coded_rate_of_raw_points(compensated_points(w2, factors, lat, s * std, u), lat), bits)
        err = {}
        for name, s, pts in (("plain", s_plain, None),
                             ("compensated", s_comp, compensated_points(w2, factors, lat, s_comp * std, u))):
            q = quantize_array(w, lattice="Z", n=1, step=s * std, key=tensor_key(seed, cand.fqn), u_raw=u,
                               raw_points=pts)
            what = q.decode(raw_dither=u).astype(np.float64).reshape(w2.shape)
            per = w2.shape[0] // rec.groups
            e = sum(output_error(w2[g * per:(g + 1) * per], what[g * per:(g + 1) * per], rec.hessian(g)) * per
                    for g in range(rec.groups)) / w2.shape[0]
            err[name] = (e, q.entropy_bits(), s)
        rows.append({"layer": cand.fqn, "weights": int(w.size), "bits_plain": err["plain"][1],
                     "bits_comp": err["compensated"][1], "err_plain": err["plain"][0],
                     "err_comp": err["compensated"][0], "ratio": err["compensated"][0] / err["plain"][0],
                     "step_plain_rel": err["plain"][2], "step_comp_rel": err["compensated"][2]})
    return rows


def encode_time(task, calibration, bits: float) -> dict:
    """Wall and process CPU seconds of ``compress`` on one thread (CPU time: the machine is shared, and a loaded
    machine stretches the wall time of a single-threaded process far more than its CPU time)."""
    import udnc_fx

    torch.set_num_threads(1)
    out = {}
    for label, kwargs in (("no calibration", {}), ("calibration (compensated, probe allocation)",
                                                    {"calibration": calibration}),
                          ("calibration, sequential", {"calibration": calibration, "sequential": True})):
        cfg = udnc_fx.CompressConfig(target_bits=bits, sequential=kwargs.pop("sequential", False), **task.udnc_fields)
        cpu = time.process_time()
        with C.Stopwatch() as sw:
            udnc_fx.compress(task.float_model, cfg, progress=False, **kwargs)
        out[label] = (sw.s, time.process_time() - cpu)
    raw = b"".join(t.float().numpy().tobytes() for t in task.state.values())
    import zlib

    cpu = time.process_time()
    with C.Stopwatch() as z:
        zlib.compress(raw, 1)
    out["zlib level 1 on the float32 state_dict (yardstick)"] = (z.s, time.process_time() - cpu)
    return out


def run(task, quick: bool, seeds: list[int], tmp: Path, nncodec_ok: bool, ladder: list[float] | None = None,
        variants: str | None = None, extras: bool = True, pipeline: bool = False,
        lattices: tuple[str, ...] = ("Z1",), exact_ladder: bool = False) -> dict:
    calibration = _calibration(task)
    p = peers.plan(task.key, quick)
    sweep = peers.NNCodecSweep(task, p["nncodec_qps"], tmp / f"nncodec-{task.key}", refine=p["nncodec_refine"]) \
        if nncodec_ok else None
    if ladder is None and task.key == "digits":
        ladder = [2.4, 2.1, 1.9, 1.7, 1.55, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8]
    elif ladder is None:
        ladder = [4.0, 3.6, 3.3, 3.0, 2.8, 2.6, 2.4, 2.2, 2.0]
    methods = {}
    wanted = None if variants is None else set(variants.split(","))
    for v in _variants(quick, lattices):
        if wanted is not None and v.get("base_label", v["label"]) not in wanted:
            continue
        methods[f"udnc-fx {v['label']}"] = _sweep(task, v, ladder, seeds, calibration, tmp, exact_ladder)
        if sweep is not None:
            sweep.poll()
    pipeline_md = None
    if pipeline and task.key == "digits":
        import digits_pipeline

        res = digits_pipeline.run(task, seeds, tmp)
        methods[digits_pipeline.METHOD] = res["points"]
        pipeline_md = digits_pipeline.report(res, seeds)
    result = {"task": task.key, "title": task.title, "bar": task.bar_text, "methods": methods, "seeds": seeds,
              "calibration": f"the {len(task.extra['data'].x_train)} TRAIN images, batches of 256" if task.key == "digits"
              else f"benchmarks/data/calibration.txt (32 sentences) + {MINILM_DOC_SENTENCES} sentences of Python's "
                   "documentation (pydoc_data), none in the evaluation set"}
    best_comp = C.robust_best(methods.get("udnc-fx compensated", []))
    probe_bits = -best_comp.order if best_comp else (2.0 if task.key == "digits" else 3.0)
    result["layers"], result["layers_bits"] = [], probe_bits
    result["pipeline_md"] = pipeline_md
    if extras:
        with C.Stopwatch() as sw:
            result["layers"] = layer_errors(task, calibration, probe_bits)
        C.log(f"  [{task.key}] per-layer equal-rate errors at {probe_bits} bits in {sw.s:.1f} s")
    if task.key == "minilm" and extras:
        result["calibration_rows"] = calibration_rows(task)
        result["encode_time"] = encode_time(task, calibration, 3.0)
        C.log(f"  [{task.key}] encode time {result['encode_time']}")
    if sweep is not None:
        pts, _ = sweep.finish()
        methods["NNCodec 2.1.3"] = pts
    return result


def report(results: list[dict], command: str) -> str:
    lines = [f"# Encoder benchmark (issue 10)\n\n`{command}`\n\n{C.machine_line()}\n"]
    for r in results:
        lines.append(f"## {r['title']}\n\nBar: {r['bar']}; seeds {r['seeds']}; calibration: {r['calibration']}.\n")
        head = ["method", "best ratio (every seed passes)", "setting", "mean score", "worst seed", "encode s/seed"]
        rows = []
        for name, pts in r["methods"].items():
            best = C.robust_best(pts)
            if best is None:
                rows.append([name, "none passes", "", "", "", ""])
            else:
                rows.append([name, f"{best.ratio:.2f}x", best.setting, f"{best.score:.4f}", f"{best.score_worst:.4f}",
                             C.fmt_s(best.encode_s)])
        lines.append(C.md_table(head, rows))
        nn_best = C.robust_best(r["methods"].get("NNCodec 2.1.3", []))
        for name, pts in r["methods"].items():
            best = C.robust_best(pts)
            if nn_best and best and name.startswith("udnc"):
                lines.append(f"- {name}: {best.ratio / nn_best.ratio:.2f}x NNCodec's ratio")
        lines.append("\nAll points:\n")
        rows = [[name, p.setting, f"{p.ratio:.2f}x", f"{p.score:.4f}", f"{p.score_worst:.4f}",
                 "pass" if p.passes else "FAIL"] for name, pts in r["methods"].items() for p in pts]
        lines.append(C.md_table(["method", "setting", "ratio", "mean", "worst", ""], rows))
        if r.get("pipeline_md"):
            lines.append("\n" + r["pipeline_md"])
        if not r["layers"]:
            lines.append("")
            continue
        lines.append(f"\nPer-layer calibration output error at equal rate ({r['layers_bits']} bits/weight per layer, "
                     "step solved separately for each rounding; seed 0):\n")
        rows = [[x["layer"], x["weights"], f"{x['bits_plain']:.3f}", f"{x['bits_comp']:.3f}", f"{x['err_plain']:.4g}",
                 f"{x['err_comp']:.4g}", f"{x['ratio']:.3f}"] for x in r["layers"]]
        lines.append(C.md_table(["layer", "weights", "bits plain", "bits comp", "error plain", "error comp",
                                 "comp/plain"], rows))
        if r.get("calibration_rows"):
            lines.append("\nCalibration rows and compensated layers (a layer with d input columns is compensated when "
                         "its H comes from at least 2·d rows):\n")
            lines.append(C.md_table(
                ["sentences (32 + docs)", "input rows (padded tokens)", "real tokens", "compensated / Linear layers"],
                [[x["sentences"], x["rows"], x["real_tokens"], f"{x['compensated']} / {x['linear_layers']}"]
                 for x in r["calibration_rows"]]))
        if r.get("encode_time"):
            lines.append("\nEncode time, one thread (compress only, target 3 bits):\n")
            lines.append(C.md_table(["what", "wall s", "process CPU s"],
                                    [[k, f"{v[0]:.2f}", f"{v[1]:.2f}"] for k, v in r["encode_time"].items()]))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    global MINILM_DOC_SENTENCES
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="both", choices=["digits", "minilm", "both"])
    ap.add_argument("--plain-probe", action="store_true",
                    help="the allocation probe rounds every layer plainly (the behaviour before the held-out "
                         "compensated probe; passes/calibrate.py PROBE_HELD_OUT)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--quick", action="store_true", help="no seed-trials variant, NNCodec's quick ladder")
    ap.add_argument("--no-nncodec", action="store_true")
    ap.add_argument("--bits", default=None, help="comma-separated target bits ladder, fine to coarse")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the udnc-fx settings' labels")
    ap.add_argument("--lattices", default="Z1",
                    help="comma-separated lattices (Z1..Z8, A2, D4, E8): every setting is run with each, side by side")
    ap.add_argument("--exact-ladder", action="store_true",
                    help="evaluate only the --bits given (no refinement point, no finer points after a failure)")
    ap.add_argument("--no-extras", action="store_true", help="skip the per-layer table and the encode-time runs")
    ap.add_argument("--pipeline", action="store_true",
                    help="digits: also the prune + calibrated compress + codeword fine-tune row (digits_pipeline.py)")
    ap.add_argument("--doc-sentences", type=int, default=MINILM_DOC_SENTENCES,
                    help="MiniLM: Python-documentation sentences added to calibration.txt's 32")
    ap.add_argument("--time-only", action="store_true", help="MiniLM: only the encode-time table")
    ap.add_argument("--rows-only", action="store_true",
                    help="MiniLM: only the calibration-rows table (how many sentences compensation needs)")
    ap.add_argument("--out", default=str(C.OUT))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    MINILM_DOC_SENTENCES = args.doc_sentences
    if args.plain_probe:
        import udnc_fx.passes.calibrate as calibrate

        calibrate.PROBE_HELD_OUT = False
    if args.time_only:
        task = peers.minilm_task()
        times = encode_time(task, _calibration(task), 3.0)
        print(C.md_table(["what", "wall s", "process CPU s"], [[k, f"{v[0]:.2f}", f"{v[1]:.2f}"] for k, v in times.items()]))
        return 0
    if args.rows_only:
        task = peers.minilm_task()
        rows = calibration_rows(task)
        print(C.md_table(["sentences (32 + docs)", "input rows (padded tokens)", "real tokens",
                          "compensated / Linear layers"],
                         [[x["sentences"], x["rows"], x["real_tokens"], f"{x['compensated']} / {x['linear_layers']}"]
                          for x in rows]))
        return 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    nncodec_ok = False
    if not args.no_nncodec:
        setup = nncodec_env.ensure_venv(log=C.log)
        nncodec_ok = setup["ok"]
        if not nncodec_ok:
            C.log(f"NNCodec unavailable: {setup['message']}")
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for key in (["digits", "minilm"] if args.model == "both" else [args.model]):
            task = peers.digits_task() if key == "digits" else peers.minilm_task()
            if key == "minilm":
                evaluation = set(peers.read_sentences(peers.DATA / "sentences.txt"))
                calib = set(peers.read_sentences(peers.DATA / "calibration.txt"))
                if evaluation & calib:
                    raise RuntimeError(f"calibration and evaluation sentences overlap: {sorted(evaluation & calib)[:3]}")
            C.log(f"== {task.title}: float {task.float_quality}")
            ladder = [float(b) for b in args.bits.split(",")] if args.bits else None
            results.append(run(task, args.quick, seeds, tmp, nncodec_ok, ladder, args.variants, not args.no_extras,
                               args.pipeline, tuple(x.strip() for x in args.lattices.split(",") if x.strip()),
                               args.exact_ladder))
    command = "OMP_NUM_THREADS=1 python benchmarks/encoder.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, command)
    (out_dir / "encoder.md").write_text(text)
    (out_dir / "encoder.json").write_text(json.dumps(
        [{**r, "methods": {k: [p.to_dict() for p in v] for k, v in r["methods"].items()}} for r in results],
        indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

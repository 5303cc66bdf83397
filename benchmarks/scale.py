"""Speed and memory of compress (quantize + encode + save) and decompress (load + decode) from 1e5 to 1e9 weights.

Models are stacks of ``nn.Linear`` layers of real shapes with synthetic Gaussian weights (std 1/√fan_in), compressed
at one relative step (``relative_step=0.25``: about 4 bits per weight on Gaussian weights). Each measurement runs in
its own subprocess so that peak memory (``ru_maxrss``) belongs to that step alone; the table reports the peak and
the peak minus the process's resident size just before the step (the float model and the imports), per weight.

    .venv/bin/python benchmarks/scale.py [--quick] [--sizes 1e8] [--out-name scale]
    .venv/bin/python benchmarks/scale.py --report benchmarks/out/scale.json   # the tables of an earlier run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

# (label, [(in_features, out_features), ...]) — real layer shapes
SIZES = {
    "1e5": [(384, 256)],  # a small projection
    "1e6": [(1024, 1024)],
    "1e7": [(768, 3072), (3072, 768), (768, 3072), (3072, 768)],  # two BERT-base FFN blocks, 9.4M
    "3e7": [(4096, 4096)] * 2,
    "1e8": [(4096, 4096)] * 6,  # 100.7M
    "1e9": [(8192, 8192)] * 15,  # 1.007G (4 GB float32): only with --sizes 1e9 (about 15 GB free memory needed)
}
RELATIVE_STEP = 0.25


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    return _status("VmRSS") or 0


def _reset_peak() -> bool:
    """Reset the kernel's resident high-water mark (Linux ≥ 4.0), so the peak read later belongs to the step."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    # VmHWM, not ru_maxrss: ru_maxrss survives fork + exec, so a child started by a big parent reports the parent's
    # size as its own peak.
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _build(layers):
    import torch

    gen = torch.Generator().manual_seed(0)
    mods = []
    for fan_in, fan_out in layers:
        lin = torch.nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) / fan_in ** 0.5)
            lin.bias.zero_()
        mods.append(lin)
    return torch.nn.Sequential(*mods).eval()


def worker(phase: str, size: str, lattice: str, n: int, path: Path, target_bits: float | None = None) -> dict:
    import torch

    torch.set_num_threads(1)
    import udnc_fx
    from udnc_fx.passes.materialize import materialize

    model = _build(SIZES[size])
    weights = sum(m.weight.numel() for m in model)
    _reset_peak()
    base_rss = _rss_bytes()
    base_peak = _peak_bytes()
    out = {"phase": phase, "size": size, "lattice": lattice, "n": n, "weights": weights}
    if phase == "safetensors":  # the float model's own checkpoint, for scale: save then load, same process
        from safetensors.torch import load_file, save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        target = path.with_suffix(".safetensors")
        t0 = time.perf_counter()
        save_file(state, str(target))
        t1 = time.perf_counter()
        back = load_file(str(target))
        t2 = time.perf_counter()
        # load_file maps the file lazily: copying into the model reads every byte, as udnc_fx.load decodes them
        model.load_state_dict(back)
        t3 = time.perf_counter()
        del back
        target.unlink(missing_ok=True)
        out.update(save_s=t1 - t0, load_s=t2 - t1, load_into_model_s=t3 - t1, seconds=t3 - t0, base_rss=base_rss,
                   peak=_peak_bytes(), base_peak=base_peak, float_bytes=4 * weights)
        return out
    # Each step's own high-water mark: the kernel's peak is reset between steps, and "adds" is a step's peak minus
    # the resident size just before it (what that step alone costs on top of what is already held).
    if phase == "compress":
        goal = {"relative_step": RELATIVE_STEP} if target_bits is None else {"target_bits": target_bits}
        cfg = udnc_fx.CompressConfig(lattice=lattice, n=n, seed=0, **goal)
        t0 = time.perf_counter()
        gm = udnc_fx.compress(model, cfg)
        t1 = time.perf_counter()
        steps = {"quantize": (base_rss, _peak_bytes())}
        before = _rss_bytes()
        _reset_peak()
        nbytes = udnc_fx.save(gm, path)
        t2 = time.perf_counter()
        steps["save"] = (before, _peak_bytes())
        out.update(quantize_s=t1 - t0, save_s=t2 - t1, seconds=t2 - t0, file_bytes=nbytes,
                   bits_per_weight=8 * nbytes / weights)
    else:
        t0 = time.perf_counter()
        loaded = udnc_fx.load(path, model)
        t1 = time.perf_counter()
        steps = {"load": (base_rss, _peak_bytes())}
        before = _rss_bytes()
        _reset_peak()
        materialize(loaded, inplace=True)
        t2 = time.perf_counter()
        steps["materialize"] = (before, _peak_bytes())
        out.update(load_s=t1 - t0, materialize_s=t2 - t1, seconds=t2 - t0)
    out["steps"] = {k: {"before": b, "peak": p} for k, (b, p) in steps.items()}
    out.update(base_rss=base_rss, peak=max(p for _, p in steps.values()), base_peak=base_peak,
               float_bytes=4 * weights)
    return out


def run_one(phase: str, size: str, lattice: str, n: int, path: Path, timeout: float = 1800,
            target_bits: float | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", phase, "--size", size, "--lattice", lattice,
           "--n", str(n), "--path", str(path)] + ([] if target_bits is None else ["--target-bits", str(target_bits)])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"phase": phase, "size": size, "lattice": lattice, "n": n,
                "error": (proc.stdout + proc.stderr).strip()[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(sizes: list[str], lattices: list[tuple[str, int, list[str]]], log=C.log, target_bits: float | None = None) -> dict:
    """``lattices``: (name, n, sizes it runs at)."""
    tmp = Path(tempfile.mkdtemp(prefix="udnc-scale-"))
    rows = []
    for size in sizes:
        for lattice, n, allowed in lattices:
            if size not in allowed:
                continue
            path = tmp / f"{size}-{lattice}{n}.udnc"
            comp = run_one("compress", size, lattice, n, path, target_bits=target_bits)
            dec = run_one("decompress", size, lattice, n, path) if "error" not in comp else {"error": "skipped"}
            path.unlink(missing_ok=True)
            ref = run_one("safetensors", size, lattice, n, path)
            rows.append({"compress": comp, "decompress": dec, "safetensors": ref})
            if "error" not in ref:
                log(f"  [scale] {size} safetensors: save {ref['save_s']:.2f} s, load {ref['load_s']:.2f} s, "
                    f"peak {ref['peak'] / 2**20:.0f} MiB")
            label = f"Z{n}" if lattice == "Z" else lattice
            if "error" in comp or "error" in dec:
                log(f"  [scale] {size} {label}: error {comp.get('error') or dec.get('error')}")
                continue
            w = comp["weights"]
            log(f"  [scale] {size} {label}: {w:,} weights; compress {comp['seconds']:.2f} s "
                f"({w / comp['seconds'] / 1e6:.2f} M/s), peak +{(comp['peak'] - comp['base_rss']) / w:.1f} B/w; "
                f"decompress {dec['seconds']:.2f} s ({w / dec['seconds'] / 1e6:.2f} M/s), "
                f"peak +{(dec['peak'] - dec['base_rss']) / w:.1f} B/w")
    return {"rows": rows, "relative_step": RELATIVE_STEP if target_bits is None else f"none (target_bits={target_bits})"}


def report(res: dict) -> str:
    head = ["weights", "lattice", "bits/w (file)", "compress s", "M weights/s", "(quantize / save s)",
            "peak RSS MiB", "peak − before, B/w", "decompress s", "M weights/s", "(load / materialize s)",
            "peak RSS MiB", "peak − before, B/w"]
    rows = []
    for r in res["rows"]:
        c, d = r["compress"], r["decompress"]
        if "error" in c or "error" in d:
            rows.append([c.get("size"), f"{c.get('lattice')} n={c.get('n')}", "error", (c.get("error") or d.get("error"))
                         [:80]] + [""] * 9)
            continue
        w = c["weights"]
        lat = f"Z{c['n']}" if c["lattice"] == "Z" else c["lattice"]
        rows.append([f"{w:,}", lat, f"{c['bits_per_weight']:.3f}", C.fmt_s(c["seconds"]),
                     f"{w / c['seconds'] / 1e6:.2f}", f"{c['quantize_s']:.2f} / {c['save_s']:.2f}",
                     f"{c['peak'] / 2**20:.0f}", f"{(c['peak'] - c['base_rss']) / w:.1f}", C.fmt_s(d["seconds"]),
                     f"{w / d['seconds'] / 1e6:.2f}", f"{d['load_s']:.2f} / {d['materialize_s']:.2f}",
                     f"{d['peak'] / 2**20:.0f}", f"{(d['peak'] - d['base_rss']) / w:.1f}"])
    text = [f"Synthetic Gaussian weights (std 1/√fan_in) in real Linear shapes, `relative_step={res['relative_step']}`, "
            "dithered, default coder, one thread, one subprocess per step. \"peak − before\" is the peak resident "
            "size of the step's process minus its resident size just before the step (imports and the float model "
            "already loaded), per weight; the float32 weights themselves are 4 B/w.", "",
            C.md_table(head, rows)]
    text += ["", "Per step (each step's own peak: the kernel's high-water mark is reset between steps; \"adds\" is the "
             "peak minus the resident size just before the step; both over the float32 bytes of the weights; time "
             "over safetensors' save_file, resp. load_file + load_state_dict, of the same model in the same run):", "",
             C.md_table(["weights", "step", "s", "× safetensors", "peak RSS MiB", "peak / float", "adds / float"],
                        step_rows(res))]
    ref_rows = [[f"{r['safetensors']['weights']:,}", f"{r['safetensors']['save_s']:.2f}",
                 f"{r['safetensors']['load_s']:.2f}", f"{r['safetensors']['peak'] / 2**20:.0f}"]
                for r in res["rows"] if "safetensors" in r and "error" not in r["safetensors"]]
    if ref_rows:
        text += ["", "`safetensors` (save_file then load_file of the same float model, same machine, same run):", "",
                 C.md_table(["weights", "save s", "load s", "peak RSS MiB"], ref_rows)]
    return "\n".join(text)


def step_rows(res: dict) -> list[list[str]]:
    """One row per step of every size: seconds, ratio to safetensors, peak and added memory over the float bytes."""
    rows = []
    for r in res["rows"]:
        ref = r.get("safetensors", {})
        for phase in ("compress", "decompress"):
            d = r[phase]
            if "error" in d or "steps" not in d:
                continue
            for step, m in d["steps"].items():
                seconds = d[f"{step}_s"]
                peer = {"save": ref.get("save_s"), "load": ref.get("load_into_model_s")}.get(step)
                rows.append([f"{d['weights']:,}", step, f"{seconds:.2f}", f"{seconds / peer:.0f}x" if peer else "",
                             f"{m['peak'] / 2**20:.0f}", f"{m['peak'] / d['float_bytes']:.2f}",
                             f"{(m['peak'] - m['before']) / d['float_bytes']:.2f}"])
        if "error" not in ref and "float_bytes" in ref:
            rows.append([f"{ref['weights']:,}", "safetensors save + load", f"{ref['seconds']:.2f}", "1x",
                         f"{ref['peak'] / 2**20:.0f}", f"{ref['peak'] / ref['float_bytes']:.2f}",
                         f"{(ref['peak'] - ref['base_rss']) / ref['float_bytes']:.2f}"])
    return rows


def plan(quick: bool) -> tuple[list[str], list]:
    if quick:
        return ["1e5", "1e6", "1e7"], [("Z", 1, ["1e5", "1e6", "1e7"]), ("E8", 8, ["1e5", "1e6"])]
    return ["1e5", "1e6", "1e7", "3e7", "1e8"], [("Z", 1, ["1e5", "1e6", "1e7", "3e7", "1e8"]),
                                                 ("E8", 8, ["1e5", "1e6", "1e7"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=["compress", "decompress", "safetensors"])
    parser.add_argument("--sizes", nargs="*", default=None, help="only these sizes (Z1), e.g. 1e8")
    parser.add_argument("--size")
    parser.add_argument("--lattice", default="Z")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--path", type=Path)
    parser.add_argument("--target-bits", type=float, default=None,
                        help="compress with target_bits instead of relative_step=0.25 (the solve over all layers)")
    parser.add_argument("--report", type=Path, help="only print the report of an earlier run's scale.json")
    parser.add_argument("--out-name", default="scale", help="output names: OUT/<name>.json and OUT/<NAME>.md")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.lattice, args.n, args.path, args.target_bits)))
        return 0
    sizes, lattices = plan(args.quick)
    if args.sizes:
        sizes, lattices = args.sizes, [("Z", 1, args.sizes)]
    res = run(sizes, lattices, target_bits=args.target_bits)
    C.OUT.mkdir(parents=True, exist_ok=True)
    (C.OUT / f"{args.out_name}.json").write_text(json.dumps(res, indent=1))
    text = report(res)
    (C.OUT / f"{args.out_name.upper()}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compressed ONNX against float ONNX in onnxruntime: inference latency, session start, file sizes.

For each model (a ResNeXt-style CNN with grouped convolutions and a stack of transformer blocks) and lattice it
exports the float model and the compressed one (with a sidecar and self-contained), then reports in one run:

* inference latency of the compressed model over the float model's (same process, sessions interleaved, one
  intra-op thread, ORT_ENABLE_ALL; target <= 1.02: after loading, both run the same float graph);
* session-creation time of each loading path over the float model's: ``load_onnx(decode="numpy")`` (weights
  decoded with NumPy and handed over as initializers) and ``decode="ort"`` (onnxruntime folds the dequantize
  subgraphs), each with and without a sidecar, and plain onnxruntime opening the self-contained file;
* file sizes: ONNX + sidecar and the self-contained ONNX against the float ONNX.

Timings are medians over interleaved repetitions (the machine may be shared).

    .venv/bin/python benchmarks/onnx_runtime.py [--quick] [--lattices Z,E8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

import udnc_fx
from udnc_fx.export import load_onnx, to_onnx


class Bottleneck(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        mid = channels // 2
        self.conv1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(x + self.bn3(self.conv3(y)))


class ResNeXt(nn.Module):
    def __init__(self, width: int, blocks: int):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*[Bottleneck(width, groups=8) for _ in range(blocks)])
        self.head = nn.Linear(width, 100)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))).mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim, heads=8) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


def models(quick: bool):
    if quick:
        return {
            "resnext": (ResNeXt(128, 4), (4, 3, 16, 16)),
            "transformer": (Transformer(256, 2), (2, 32, 256)),
        }
    return {
        "resnext": (ResNeXt(256, 8), (4, 3, 16, 16)),
        "transformer": (Transformer(512, 4), (4, 64, 512)),
    }


def _options() -> dict:
    return dict(graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, intra_op_num_threads=1,
                log_severity_level=3)


def _plain(path):
    so = ort.SessionOptions()
    for k, v in _options().items():
        setattr(so, k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_model(name, model, shape, lattice, workdir: Path, repeats: int, runs_budget_s: float) -> dict:
    torch.manual_seed(0)
    model = model.eval()
    n = 1 if lattice == "Z" else None
    step = 0.5 if lattice == "Z" else 1.0
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(lattice=lattice, n=n, relative_step=step)).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = gm(x).numpy()
    float_path = workdir / f"{name}_{lattice}_float.onnx"
    side_path = workdir / f"{name}_{lattice}_sidecar.onnx"
    self_path = workdir / f"{name}_{lattice}_self.onnx"
    t = time.perf_counter()
    to_onnx(udnc_fx.materialize(gm), (x,), float_path, sidecar=False)
    float_export = time.perf_counter() - t
    t = time.perf_counter()
    side = to_onnx(gm, (x,), side_path, sidecar=True)
    export_s = time.perf_counter() - t
    to_onnx(gm, (x,), self_path, sidecar=False)
    numel = sum(d.numel for d in udnc_fx.passes.materialize.served_params(gm))

    loaders = {
        "float": lambda: _plain(float_path),
        "sidecar+numpy": lambda: load_onnx(side_path, decode="numpy", **_options()),
        "sidecar+ort": lambda: load_onnx(side_path, decode="ort", **_options()),
        "self+numpy": lambda: load_onnx(self_path, decode="numpy", **_options()),
        "self+ort": lambda: load_onnx(self_path, decode="ort", **_options()),
        "self+plain-ort": lambda: _plain(self_path),
    }
    start_times = {k: [] for k in loaders}
    sessions = {}
    for _ in range(repeats):  # interleaved, so a busy moment hits every path alike
        for key, load in loaders.items():
            t = time.perf_counter()
            sessions[key] = load()
            start_times[key].append(time.perf_counter() - t)
    start = {k: statistics.median(v) for k, v in start_times.items()}

    feed_name = sessions["float"].get_inputs()[0].name
    feed = {feed_name: x.numpy()}
    outputs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
    err = max(float(np.abs(y - ref).max() / np.abs(ref).max()) for k, y in outputs.items() if k != "float")
    identical = all(np.array_equal(outputs["self+numpy"], y) for k, y in outputs.items() if k != "float")
    # Latency: single runs, interleaved session by session, so load from other processes hits all alike; a second
    # float session is the control that shows the noise floor of the ratio.
    timed = {"float": sessions["float"], "float (control)": _plain(float_path),
             "sidecar+numpy": sessions["sidecar+numpy"], "sidecar+ort": sessions["sidecar+ort"]}
    for s in timed.values():
        for _ in range(3):
            s.run(None, feed)  # warm-up
    single = _median_time(lambda: timed["float"].run(None, feed), 3)
    runs = int(min(1000, max(30, runs_budget_s / (len(timed) * single))))
    lat = {k: [] for k in timed}
    for _ in range(runs):
        for key, s in timed.items():
            t = time.perf_counter()
            s.run(None, feed)
            lat[key].append(time.perf_counter() - t)
    latency = {k: statistics.median(v) for k, v in lat.items()}
    ratios = {k: latency[k] / latency["float"] for k in lat if k != "float"}

    from udnc_fx.coding.container import read_container

    sidecar_decode = _median_time(lambda: read_container(side.sidecar_path), repeats)

    sizes = {
        "float_onnx": float_path.stat().st_size,
        "sidecar_onnx": side.onnx_bytes,
        "sidecar_udnc": side.sidecar_bytes,
        "self_onnx": self_path.stat().st_size,
    }
    return {
        "model": name,
        "lattice": lattice,
        "compressed_weights": numel,
        "export_s": export_s,
        "float_export_s": float_export,
        "rel_err_vs_torch": err,
        "loading_paths_identical": identical,
        "runs": runs,
        "latency_ms": {k: v * 1e3 for k, v in latency.items()},
        "latency_ratio": ratios,
        "session_start_s": start,
        "session_start_ratio": {k: v / start["float"] for k, v in start.items()},
        "sidecar_container_decode_s": sidecar_decode,
        "sizes": sizes,
    }


def _print(r: dict) -> None:
    s = r["sizes"]
    print(f"\n== {r['model']} / {r['lattice']}: {r['compressed_weights']:,} compressed weights "
          f"(export {r['export_s']:.2f} s; float export {r['float_export_s']:.2f} s)")
    print(f"  output vs compressed torch: max rel err {r['rel_err_vs_torch']:.2e}; "
          f"all loading paths give identical outputs: {r['loading_paths_identical']}")
    lat, ratio = r["latency_ms"], r["latency_ratio"]
    print(f"  inference latency (median of {r['runs']} interleaved runs): float {lat['float']:.3f} ms; "
          + "; ".join(f"{k} {lat[k]:.3f} ms ({ratio[k]:.3f}x)" for k in ratio) + "  [target <= 1.02]")
    print("  session start:   " + "; ".join(
        f"{k} {v * 1e3:.0f} ms ({r['session_start_ratio'][k]:.2f}x)" for k, v in r["session_start_s"].items()))
    print(f"                   of which decoding the .udnc sidecar (read_container): "
          f"{r['sidecar_container_decode_s'] * 1e3:.0f} ms")
    total = s["sidecar_onnx"] + s["sidecar_udnc"]
    print(f"  file sizes: float ONNX {s['float_onnx']:,} B; ONNX + sidecar {s['sidecar_onnx']:,} + "
          f"{s['sidecar_udnc']:,} = {total:,} B ({s['float_onnx'] / total:.1f}x smaller); self-contained ONNX {s['self_onnx']:,} B "
          f"({s['float_onnx'] / s['self_onnx']:.1f}x smaller)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repetitions")
    parser.add_argument("--lattices", default="Z,E8", help="comma-separated: Z (Z^1), D4, E8, A2")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 5, quick 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    budget = 8.0 if args.quick else 30.0  # seconds of interleaved latency runs per model
    torch.set_num_threads(1)
    results = []
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, intra_op_num_threads=1, ORT_ENABLE_ALL; "
          f"medians of {repeats} interleaved repetitions")
    with tempfile.TemporaryDirectory() as tmp:
        for lattice in [s.strip() for s in args.lattices.split(",") if s.strip()]:
            for name, (model, shape) in models(args.quick).items():
                r = bench_model(name, model, shape, lattice, Path(tmp), repeats, budget)
                _print(r)
                results.append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

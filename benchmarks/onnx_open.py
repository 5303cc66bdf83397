"""Opening an exported model: session start and peak memory of each ONNX variant, against the float ONNX.

A ResNet-18-style CNN (11.7M weights, random weights; compressed at 3 bits/weight) is exported as

* ``float``: ``torch.onnx`` of the float model (the yardstick);
* ``compact``: ``to_onnx(sidecar=False)``, indices as small-integer initializers and dequantize subgraphs that
  onnxruntime constant-folds when the session opens (plain onnxruntime, ORT_ENABLE_ALL);
* ``compact-noopt``: the same file with graph optimisations off (opens without folding; every run decodes);
* ``decoded``: ``to_onnx(decoded=True)``, the decoded weights as plain float initializers (plain onnxruntime);
* ``sidecar``: ``to_onnx(sidecar=True)`` + ``udnc_fx.export.load_onnx`` (entropy-coded sidecar decoded by NumPy).

Each variant is opened in a fresh Python process (so peak RSS is its own): the child imports onnxruntime and
numpy (plus udnc_fx for the sidecar path), times session creation and one inference, and reports
its own peak RSS (``VmHWM``). Ratios are against the float file measured in the same run.

    .venv/bin/python benchmarks/onnx_open.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
path, mode = sys.argv[1], sys.argv[2]

def hwm_mb():  # this process's own peak RSS (ru_maxrss would include the parent's, carried over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

base = hwm_mb()
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if mode == "noopt"
                                 else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
if mode == "sidecar":
    from udnc_fx.export import load_onnx  # imported before the clock starts: only opening is timed
t = time.perf_counter()
if mode == "sidecar":
    sess = load_onnx(path, intra_op_num_threads=1)
else:
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
start = time.perf_counter() - t
x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
name = sess.get_inputs()[0].name
sess.run(None, {name: x})
t = time.perf_counter()
for _ in range(3):
    sess.run(None, {name: x})
run = (time.perf_counter() - t) / 3
print(json.dumps({"start_s": start, "run_s": run,
                  "peak_rss_mb": hwm_mb(), "base_rss_mb": base}))
"""


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (11.7M weights), without torchvision (which does not import beside this torch build)."""

    def __init__(self, width: int = 64, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers, cin = [], width
        for i, w in enumerate(widths):
            layers += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        y = self.layers(self.stem(x))
        return self.fc(y.mean((2, 3)))


def _child(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter-width ResNet (0.7M weights)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import udnc_fx
    from udnc_fx.export import to_onnx

    torch.manual_seed(0)
    model = ResNet18(width=16 if args.quick else 64).eval()
    weights = sum(p.numel() for p in model.parameters())
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=3.0)).eval()
    x = torch.randn(1, 3, 64, 64)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        torch.onnx.export(model, (x,), d / "float.onnx", dynamo=False, external_data=False,
                          input_names=["image"], output_names=["logits"])
        to_onnx(gm, x, d / "compact.onnx", sidecar=False, input_names=["image"], output_names=["logits"])
        to_onnx(gm, x, d / "decoded.onnx", decoded=True, input_names=["image"], output_names=["logits"])
        exported = to_onnx(gm, x, d / "side.onnx", sidecar=True, input_names=["image"], output_names=["logits"])
        variants = [("float", d / "float.onnx", "plain"), ("compact", d / "compact.onnx", "plain"),
                    ("compact-noopt", d / "compact.onnx", "noopt"), ("decoded", d / "decoded.onnx", "plain"),
                    ("sidecar", d / "side.onnx", "sidecar")]
        for name, path, mode in variants:
            r = _child(path, mode)
            size = path.stat().st_size + (exported.sidecar_bytes if name == "sidecar" else 0)
            rows[name] = {**r, "file_bytes": size}
    ref = rows["float"]
    print(f"ResNet-18-style CNN, {weights / 1e6:.2f}M weights, 3 bits/weight; one process per variant; "
          "onnxruntime, 1 intra-op thread")
    print(f"{'variant':14} {'file MB':>8} {'start s':>8} {'x float':>8} {'peak RSS MB':>12} {'x float':>8} "
          f"{'run ms':>8} {'x float':>8}")
    for name, r in rows.items():
        print(f"{name:14} {r['file_bytes'] / 1e6:8.2f} {r['start_s']:8.3f} {r['start_s'] / ref['start_s']:8.2f} "
              f"{r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] / ref['peak_rss_mb']:8.2f} {r['run_s'] * 1e3:8.2f} "
              f"{r['run_s'] / ref['run_s']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"weights": weights, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Self-contained ONNX files run in a process that imports only onnxruntime and numpy (no torch, no udnc_fx),
in both variants: ``decoded`` (plain float initializers; opens as fast as the float model) and ``compact``
(indices and dequantize subgraphs)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import udnc_fx
from udnc_fx.demo import DigitsCNN
from udnc_fx.export import to_onnx

CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort
path, inp = sys.argv[1], sys.argv[2]
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
x = np.load(inp)
out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
banned = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "udnc_fx", "onnx"))
print(json.dumps({"out": out.tolist(), "banned": banned}))
"""


class ResNetish(torch.nn.Module):
    """Residual blocks with BatchNorm, strided and 1x1 shortcut convolutions, global pooling and a linear head."""

    def __init__(self, width=16):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3, padding=1)
        self.a1, self.a2 = torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.Conv2d(width, width, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(width)
        self.b1 = torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.b2 = torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.short = torch.nn.Conv2d(width, 2 * width, 1, stride=2)
        self.fc = torch.nn.Linear(2 * width, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.bn(self.a2(torch.relu(self.a1(x)))))
        x = torch.relu(self.short(x) + self.b2(torch.relu(self.b1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("variant", ["decoded", "compact"])
@pytest.mark.parametrize("name", ["digits", "resnet"])
def test_self_contained_onnx_runs_with_only_onnxruntime_and_numpy(tmp_path, name, variant):
    torch.manual_seed(0)
    model, shape = (DigitsCNN(), (2, 1, 8, 8)) if name == "digits" else (ResNetish(), (2, 3, 16, 16))
    gm = udnc_fx.compress(model.eval(), udnc_fx.CompressConfig(target_bits=3.0)).eval()
    x = torch.randn(shape)
    path = tmp_path / "m.onnx"
    to_onnx(gm, x, path, sidecar=False, decoded=variant == "decoded", input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    assert not list(tmp_path.glob("*.udnc"))  # one file
    batch = torch.randn((5, *shape[1:]))
    np.save(tmp_path / "x.npy", batch.numpy())
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / "x.npy")], capture_output=True,
                          text=True, timeout=300, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["banned"] == []
    with torch.no_grad():
        want = gm(batch).numpy()
    assert np.abs(np.asarray(result["out"], np.float32) - want).max() < 1e-4

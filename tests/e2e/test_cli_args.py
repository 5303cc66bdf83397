"""Bad command-line arguments: one clean line naming the user's path, exit status 2, no traceback, and nothing
computed (the factory is not even called) when the problem is an argument that can be checked first."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

UDNC = [sys.executable, "-m", "udnc_fx.cli"]

FACTORIES = '''
import pathlib
from udnc_fx.demo import DigitsCNN

def make():  # leaves a trace when called, so a test can tell that validation came first
    pathlib.Path("factory-called").write_text("yes")
    return DigitsCNN()

def boom():
    raise RuntimeError("boom from the user's factory")

import torch

class Gate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent: torch.fx cannot trace it

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.gate(x))

def untraceable():
    return Net()
'''


def _fail(args, cwd):
    proc = subprocess.run(UDNC + args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("udnc: error:")]
    assert len(lines) == 1, proc.stderr
    assert ".tmp" not in proc.stderr
    return lines[0]


@pytest.fixture
def work(tmp_path):
    (tmp_path / "factories.py").write_text(FACTORIES)
    return tmp_path


def test_a_factory_that_raises_is_one_line(work):
    line = _fail(["compress", "factories:boom", "--out", "m.udnc"], work)
    assert "factories:boom() raised RuntimeError: boom from the user's factory" in line


def test_invalid_config_json_names_the_file_and_comes_first(work):
    (work / "bad.json").write_text('{"target_bits": 3,,}')
    line = _fail(["compress", "factories:make", "--out", "m.udnc", "--config", "bad.json"], work)
    assert "--config bad.json is not valid JSON" in line and "line 1" in line
    assert not (work / "factory-called").exists()


def test_config_with_a_wrong_field_is_one_line(work):
    (work / "c.json").write_text(json.dumps({"target_bits": "three"}))
    line = _fail(["compress", "factories:make", "--out", "m.udnc", "--config", "c.json"], work)
    assert "c.json" in line and "target_bits" in line


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt", "w.bin"])
def test_a_garbage_weights_file_is_one_line_naming_it(work, name):
    (work / name).write_bytes(b"\x00garbage, not weights\xff" * 10)
    line = _fail(["compress", "factories:make", "--out", "m.udnc", "--weights", name], work)
    assert f"--weights {name}" in line
    assert not (work / "m.udnc").exists()


def test_unwritable_out_names_the_users_path_before_any_work(work):
    line = _fail(["compress", "factories:make", "--out", "no/such/dir/m.udnc"], work)
    assert "--out no/such/dir/m.udnc" in line and "does not exist" in line
    assert not (work / "factory-called").exists()
    (work / "adir").mkdir()
    line = _fail(["compress", "factories:make", "--out", "adir"], work)
    assert "--out adir is a directory" in line


def test_out_never_replaces_a_file_that_is_not_a_container(work):
    """A mistyped --out (the user's weights, a source file) is refused before any work and left as it was; an
    earlier .udnc at that name is what the user asked to replace."""
    weights = work / "model.safetensors"
    weights.write_bytes(b"the user's only copy of the weights")
    line = _fail(["compress", "factories:make", "--out", "model.safetensors"], work)
    assert "--out model.safetensors exists and is not a .udnc container" in line
    assert weights.read_bytes() == b"the user's only copy of the weights"
    assert not (work / "factory-called").exists()
    first = subprocess.run(UDNC + ["compress", "factories:make", "--out", "m.udnc"], cwd=work, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(UDNC + ["compress", "factories:make", "--out", "m.udnc"], cwd=work, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr


def test_decompress_never_replaces_an_existing_file(work):
    ok = subprocess.run(UDNC + ["compress", "factories:make", "--out", "m.udnc"], cwd=work, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    (work / "w.safetensors").write_bytes(b"keep me")
    line = _fail(["decompress", "m.udnc", "--out", "w.safetensors"], work)
    assert "--out w.safetensors exists (nothing is overwritten)" in line
    assert (work / "w.safetensors").read_bytes() == b"keep me"


def test_unknown_coder_fails_before_compressing(work):
    line = _fail(["compress", "factories:make", "--out", "m.udnc", "--coder", "zstd"], work)
    assert "zstd-v1" in line  # the suggestion
    assert not (work / "factory-called").exists()


def test_pickled_calibration_is_refused(work):
    (work / "cal.pt").write_bytes(b"anything")
    line = _fail(["compress", "factories:make", "--out", "m.udnc", "--calibration", "cal.pt"], work)
    assert "--calibration cal.pt" in line and "refused" in line


@pytest.fixture
def container(work):
    subprocess.run(UDNC + ["compress", "udnc_fx.demo:DigitsCNN", "--out", "m.udnc", "--quiet"], cwd=work,
                   check=True, capture_output=True, timeout=300)
    return work


@pytest.mark.parametrize("dtype", ["float33", "Tensor", "nn"])
def test_bad_example_dtype_is_one_line(container, dtype):
    line = _fail(["export", "m.udnc", "--model", "udnc_fx.demo:DigitsCNN", "--example-shape", "1x1x8x8",
                  "--example-dtype", dtype, "--out", "x.onnx"], container)
    assert f"--example-dtype {dtype!r}" in line


@pytest.mark.parametrize("shape", ["1x-1x8x8", "0x1x8x8", "1xax8"])
def test_bad_example_shape_is_one_line(container, shape):
    line = _fail(["export", "m.udnc", "--model", "udnc_fx.demo:DigitsCNN", "--example-shape", shape,
                  "--out", "x.onnx"], container)
    assert "--example-shape" in line and shape in line


def test_export_to_an_unwritable_place_names_the_users_path(container):
    line = _fail(["export", "m.udnc", "--model", "udnc_fx.demo:DigitsCNN", "--example-shape", "1x1x8x8",
                  "--out", "missing/x.onnx"], container)
    assert "--out missing/x.onnx" in line


def test_config_overriding_flags_is_announced(work):
    (work / "c.json").write_text(json.dumps({"target_bits": 2.0}))
    proc = subprocess.run(UDNC + ["compress", "udnc_fx.demo:DigitsCNN", "--out", "m.udnc", "--config", "c.json",
                                  "--bits", "5", "--quiet"], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ignoring --bits" in proc.stderr
    assert "compressing the random initial weights" in proc.stderr  # no --weights: said so


def test_untraceable_model_remedies_name_cli_flags(work):
    line = _fail(["compress", "factories:untraceable", "--out", "m.udnc", "--fallback", "error"], work)
    assert "--leaf-module Gate" in line and "--fallback module_swap" in line
    assert "CompressConfig(" not in line
    proc = subprocess.run(UDNC + ["compress", "factories:untraceable", "--out", "m.udnc", "--quiet"], cwd=work,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compressed by module swap" in proc.stderr and "--fallback" in proc.stderr
    proc = subprocess.run(UDNC + ["compress", "factories:untraceable", "--out", "m.udnc", "--leaf-module", "Gate",
                                  "--quiet"], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "module swap" not in proc.stderr

"""The ``udnc`` command line, run as a user would (a subprocess per command)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

UDNC = [sys.executable, "-m", "udnc_fx.cli"]


def _run(args, cwd, expect=0):
    proc = subprocess.run(UDNC + args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_compress_inspect_export_roundtrip(tmp_path):
    out, _ = _run(["compress", "udnc_fx.demo:DigitsCNN", "--out", "m.udnc", "--bits", "3"], tmp_path)
    assert "whole-file ratio" in out and (tmp_path / "m.udnc").exists()
    table, _ = _run(["inspect", "m.udnc"], tmp_path)
    assert "fc1.weight" in table and "whole file" in table
    data = json.loads(_run(["inspect", "m.udnc", "--json"], tmp_path)[0])
    assert data["sizes"]["file_bytes"] == (tmp_path / "m.udnc").stat().st_size
    # the header is stored compressed (format 1.5), and inspect says so
    stored, plain = data["header"]["header_length"], data["header"]["header_json_length"]
    assert stored < plain and f"header: {stored} bytes (udnc-hcm-v1, {plain} bytes of JSON)" in table
    _run(["export", "m.udnc", "--model", "udnc_fx.demo:DigitsCNN", "--example-shape", "1x1x8x8", "--out", "x.onnx"],
         tmp_path)
    listing, _ = _run(["inspect", "x.onnx"], tmp_path)
    sidecar = next(p.name for p in tmp_path.glob("x.onnx.*.udnc"))
    assert "4 dequantize subgraphs" in listing and sidecar in listing


def test_export_never_touches_the_input_container(tmp_path):
    """The natural names (m.udnc in, m.onnx out) work and leave m.udnc as it was; exporting onto the input itself
    or onto a directory is refused before any work, and leaves no file behind (issue 15)."""
    _run(["compress", "udnc_fx.demo:DigitsCNN", "--out", "m.udnc"], tmp_path)
    before = (tmp_path / "m.udnc").read_bytes()
    export = ["export", "m.udnc", "--model", "udnc_fx.demo:DigitsCNN", "--example-shape", "1x1x8x8", "--out"]
    _run(export + ["m.onnx"], tmp_path)
    assert (tmp_path / "m.udnc").read_bytes() == before
    _, err = _run(export + ["m.udnc"], tmp_path, expect=2)
    assert "refusing to replace" in err and (tmp_path / "m.udnc").read_bytes() == before
    (tmp_path / "outdir").mkdir()
    listing = sorted(p.name for p in tmp_path.iterdir())
    _, err = _run(export + ["outdir"], tmp_path, expect=2)
    assert "is a directory" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing and not list((tmp_path / "outdir").iterdir())


@pytest.mark.parametrize(
    "args,message",
    [
        (["compress", "nope", "--out", "x.udnc"],
         "MODEL must be a save_pretrained directory or look like 'package.module:factory', got 'nope'"),
        (["compress", "udnc_fx.demo:Missing", "--out", "x.udnc"],
         "cannot import 'udnc_fx.demo:Missing': module 'udnc_fx.demo' has no attribute 'Missing'"),
        (["compress", "udnc_fx.demo:DigitsCNN", "--out", "x.udnc", "--lattice", "Q"],
         "unknown lattice 'Q'; available: Z (n = 1..8), A2 (n = 2), D4 (n = 4), E8 (n = 8)"),
        (["inspect", "missing.udnc"], "No such file or directory: missing.udnc"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    """Exit status 2 and exactly one line, ``udnc: error: <what is wrong>``, with no traceback and no file left."""
    out, err = _run(args, tmp_path, expect=2)
    assert out == ""
    assert err.splitlines() == [f"udnc: error: {message}"]
    assert list(tmp_path.iterdir()) == []


def test_inspect_of_a_corrupt_file_names_the_kind(tmp_path):
    _run(["compress", "udnc_fx.demo:DigitsCNN", "--out", "m.udnc"], tmp_path)
    data = bytearray((tmp_path / "m.udnc").read_bytes())
    data[0] ^= 0xFF
    (tmp_path / "bad.udnc").write_bytes(bytes(data))
    _, err = _run(["inspect", "bad.udnc"], tmp_path, expect=2)
    assert "bad_magic" in err


def test_demo_smoke(tmp_path):
    out, _ = _run(["demo", "--epochs", "2", "--finetune-epochs", "1", "--no-progress", "--out", "demo"], tmp_path)
    for line in ("float accuracy", "compressed accuracy", "entropy", "container", "time"):
        assert line in out
    assert (tmp_path / "demo" / "digits-cnn.udnc").exists()
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["results"]["file_bytes"] == (tmp_path / "demo" / "digits-cnn.udnc").stat().st_size


def test_max_loss_searches_the_rate_and_plots_the_curve(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32))
    out, _ = _run(["compress", "udnc_fx.demo:DigitsCNN", "--out", "m.udnc", "--calibration", "x.npy",
                   "--max-loss", "0.01", "--plot", "curve.png"], tmp_path)
    assert "rate-quality curve explored" in out and "<- chosen" in out
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    chosen = [line for line in out.splitlines() if "<- chosen" in line][0].split()
    assert int(chosen[1]) == (tmp_path / "m.udnc").stat().st_size and float(chosen[2]) <= 0.01


def test_fold_prune_allocate_then_export_and_decompress(tmp_path):
    out, _ = _run(["compress", "udnc_fx.demo:DigitsCNN", "--out", "m.udnc", "--fold-bn", "--prune", "0.5",
                   "--allocate", "weights", "--bits", "2"], tmp_path)
    assert "folded 2 BatchNorm" in out and "pruned to sparsity 0.5" in out and "step allocation: weights" in out
    assert "bn1" not in out  # folded away
    # export rebuilds the folded architecture from the file's record of --fold-bn
    _run(["export", "m.udnc", "--model", "udnc_fx.demo:DigitsCNN", "--example-shape", "2x1x8x8", "--out", "x.onnx",
          "--input-names", "image", "--output-names", "logits", "--dynamic-batch"], tmp_path)
    import onnxruntime as ort

    from udnc_fx.export import load_onnx

    session = load_onnx(tmp_path / "x.onnx")
    import numpy as np

    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape[0] == "batch"
    got = session.run(["logits"], {"image": np.zeros((5, 1, 8, 8), np.float32)})[0]
    assert got.shape == (5, 10)
    assert ort is not None


def test_demo_into_a_log_writes_no_progress_redraws(tmp_path):
    """``./dev.sh demo > log 2>&1``: bars are drawn only on a terminal, so a log gets none."""
    out, err = _run(["demo", "--epochs", "2", "--finetune-epochs", "1", "--out", "demo"], tmp_path)
    assert "\r" not in out + err and "it/s" not in err and "epoch/s" not in err

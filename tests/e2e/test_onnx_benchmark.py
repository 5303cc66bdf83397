"""Smoke test of benchmarks/onnx_runtime.py (slow: not in the default run; ``pytest -m slow``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_onnx_runtime_benchmark_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import onnx_runtime

    out = tmp_path / "bench.json"
    assert onnx_runtime.main(["--quick", "--lattices", "E8", "--repeats", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {r["model"] for r in results} == {"resnext", "transformer"}
    for r in results:
        assert r["rel_err_vs_torch"] <= 1e-5 and r["loading_paths_identical"]
        assert r["sizes"]["sidecar_onnx"] + r["sizes"]["sidecar_udnc"] < r["sizes"]["float_onnx"]
        assert set(r["session_start_s"]) >= {"float", "sidecar+numpy", "sidecar+ort", "self+numpy", "self+ort"}
    assert "inference latency" in capsys.readouterr().out

"""Layers quantized in parallel threads give the same file, bit for bit, as one thread and as the NumPy path."""

import hashlib

import pytest
import torch

import udnc_fx
import udnc_fx.passes.quantize as QP
from udnc_fx.passes.materialize import served_params

pytest.importorskip("numba")


def _model():
    g = torch.Generator().manual_seed(4)
    m = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.ReLU(), torch.nn.Linear(80, 64),
                            torch.nn.Linear(64, 50), torch.nn.Linear(50, 10))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        m[0].weight[:, ::4] = 0
    return m.eval()


def _run(tmp_path, name, config):
    gm = udnc_fx.compress(_model(), config, progress=False)
    path = tmp_path / f"{name}.udnc"
    udnc_fx.save(gm, path, progress=False)
    return hashlib.sha256(path.read_bytes()).hexdigest(), [float(d.sqnr_db).hex() for d in served_params(gm)]


@pytest.mark.parametrize("config", [
    dict(lattice="Z", relative_step=0.3),
    dict(lattice="Z", n=2, relative_step=1.2, exact_zero=True),
    dict(lattice="E8", relative_step=0.5),
    dict(lattice="Z", target_bits=2.5),
])
def test_layer_threads_same_bytes(tmp_path, monkeypatch, config):
    cfg = udnc_fx.CompressConfig(seed=11, **config)
    monkeypatch.setenv("UDNC_NATIVE", "0")
    reference = _run(tmp_path, "numpy", cfg)
    monkeypatch.setenv("UDNC_NATIVE", "1")
    for threads in (1, 2, 5):
        monkeypatch.setattr(QP, "LAYER_THREADS", threads)
        assert _run(tmp_path, f"t{threads}", cfg) == reference


def test_threads_used_only_with_native_kernels(monkeypatch):
    monkeypatch.setattr(QP, "LAYER_THREADS", 3)
    monkeypatch.setenv("UDNC_NATIVE", "0")
    with QP._layer_threads(1 << 30) as pool:
        assert isinstance(pool, QP._Serial)
    monkeypatch.setenv("UDNC_NATIVE", "1")
    with QP._layer_threads(10) as pool:
        assert not isinstance(pool, QP._Serial)


def test_bad_layer_still_raises_with_threads(monkeypatch):
    monkeypatch.setenv("UDNC_NATIVE", "1")
    monkeypatch.setattr(QP, "LAYER_THREADS", 3)
    m = _model()
    with torch.no_grad():
        m[2].weight[3, 3] = float("nan")
    with pytest.raises(udnc_fx.ConfigError, match="NaN"):
        udnc_fx.compress(m, udnc_fx.CompressConfig(seed=0, relative_step=0.3), progress=False)

"""compress_to: the smallest file whose quality stays within a bound, by bisection over target_bits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import udnc_fx
from udnc_fx import CompressConfig, ConfigError, PassError
from udnc_fx.passes.allocate import default_output_fn


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


def _loss(reference, x):
    with torch.no_grad():
        want = reference(x)

    def loss(model):
        with torch.no_grad():
            return float(((model(x) - want) ** 2).sum() / (want**2).sum())

    return loss


def test_finds_the_smallest_passing_file_and_records_the_curve(tmp_path):
    model, x = _model(), torch.randn(32, 16)
    quality = _loss(model, x)
    search = udnc_fx.compress_to(model, quality, 1e-3, CompressConfig(seed=1), calibration_inputs=x,
                                 max_bits=8.0, tolerance=0.1)
    assert search.best.ok and search.best.quality <= 1e-3
    assert quality(search.model) == pytest.approx(search.best.quality)
    passing = [p for p in search.points if p.ok]
    assert search.best.file_bytes == min(p.file_bytes for p in passing)
    assert any(not p.ok for p in search.points)  # the bound was binding: the search saw both sides
    assert len(search.points) >= 4
    # a looser bound gives a smaller file
    loose = udnc_fx.compress_to(model, quality, 1e-2, CompressConfig(seed=1), calibration_inputs=x, tolerance=0.1)
    assert loose.best.file_bytes < search.best.file_bytes
    text = str(search)
    assert "chosen" in text and str(search.best.file_bytes) in text
    search.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_higher_is_better_and_an_unreachable_bound():
    model, x = _model(), torch.randn(32, 16)
    quality = _loss(model, x)

    def cos(m):
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(
                default_output_fn(m, x).flatten(), model(x).flatten(), dim=0))

    search = udnc_fx.compress_to(model, cos, 0.999, higher_is_better=True, method="weights", tolerance=0.2)
    assert search.best.quality >= 0.999
    with pytest.raises(PassError, match="even 2 bits"):
        udnc_fx.compress_to(model, quality, 1e-9, max_bits=2.0)
    with pytest.raises(ConfigError):
        udnc_fx.compress_to(model, quality, 1e-3, min_bits=4.0, max_bits=2.0)

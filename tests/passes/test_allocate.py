"""The sensitivity-aware step allocation pass (passes/allocate.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import udnc_fx
from udnc_fx import CompressConfig, ConfigError, LayerConfig
from udnc_fx.passes.allocate import Allocation, allocate, allocate_steps


class TwoPaths(nn.Module):
    """Two same-sized, same-distribution layers; the output weighs ``loud`` ten times more than ``quiet``, so
    quantization noise in ``loud`` costs 100x more output distortion per unit Δ²."""

    def __init__(self):
        super().__init__()
        self.loud = nn.Linear(32, 16)
        self.quiet = nn.Linear(32, 16)
        with torch.no_grad():
            self.quiet.weight.copy_(self.loud.weight.flip(0))  # same weights, same std

    def forward(self, x):
        return 10.0 * self.loud(x) + self.quiet(x)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Linear(16, 16)
        self.big = nn.Linear(16, 256)
        self.head = nn.Linear(256, 4)

    def forward(self, x):
        return self.head(torch.relu(self.big(torch.relu(self.small(x)))))


def _model(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


def _calib(seed=1, n=64, d=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def _output_mse(a, b, x):
    with torch.no_grad():
        return float(((a(x) - b(x)) ** 2).mean())


def _mean_bits(gm):
    return udnc_fx.inspect(gm).mean_entropy_bits


def test_probe_gives_the_sensitive_layer_a_finer_step_and_less_distortion_at_equal_rate():
    model = _model(TwoPaths)
    x = _calib()
    alloc = allocate(model, CompressConfig(target_bits=3.0), calibration_inputs=x)
    assert alloc.method == "probe" and alloc.probe_forwards == 3
    rows = {r.fqn: r for r in alloc.layers}
    # Water-filling: Δ ∝ 1/sqrt(sensitivity per weight) → Δ_loud/Δ_quiet ≈ 1/10.
    ratio = rows["loud.weight"].step / rows["quiet.weight"].step
    assert 0.05 < ratio < 0.2, ratio
    assert rows["loud.weight"].bits > rows["quiet.weight"].bits + 2
    assert abs(alloc.mean_bits - 3.0) <= 3e-3 * 3.0

    allocated = udnc_fx.compress(model, alloc.config)
    uniform = udnc_fx.compress(model, CompressConfig(target_bits=3.0))
    assert abs(_mean_bits(allocated) - _mean_bits(uniform)) < 0.01
    test_x = _calib(seed=7)
    assert _output_mse(allocated, model, test_x) < 0.5 * _output_mse(uniform, model, test_x)


def test_every_free_layer_pays_the_same_distortion_per_weight():
    alloc = allocate(_model(Stack), CompressConfig(target_bits=4.0), calibration_inputs=_calib(d=16))
    products = [r.sensitivity * r.step**2 for r in alloc.layers]
    assert max(products) / min(products) == pytest.approx(1.0, rel=1e-9)


def test_allocated_config_meets_the_target_through_compress():
    model = _model(Stack)
    for target in (2.0, 4.5):
        config = allocate_steps(model, CompressConfig(target_bits=target), _calib(d=16))
        assert set(config.overrides) == {"small", "big", "head"}
        assert all(isinstance(v, LayerConfig) and v.step is not None for v in config.overrides.values())
        gm = udnc_fx.compress(model, config)
        assert abs(_mean_bits(gm) - target) <= 3e-3 * target
        steps = {r.fqn: r.step for r in udnc_fx.inspect(gm).layers}
        assert steps == {f"{k}.weight": v.step for k, v in config.overrides.items()}


def test_data_free_weights_method_gives_big_layers_coarser_relative_steps():
    model = _model(Stack)
    alloc = allocate(model, CompressConfig(target_bits=3.0))
    assert alloc.method == "weights" and alloc.probe_forwards == 0
    rows = {r.fqn: r for r in alloc.layers}
    assert rows["big.weight"].relative_step > rows["small.weight"].relative_step
    # Δ ∝ sqrt(N)·rms: the ratio of relative steps follows sqrt of the sizes (rms ≈ std here).
    expected = math.sqrt(rows["big.weight"].numel / rows["small.weight"].numel)
    got = rows["big.weight"].relative_step / rows["small.weight"].relative_step
    assert got == pytest.approx(expected, rel=0.15)
    assert abs(alloc.mean_bits - 3.0) <= 3e-3 * 3.0


def test_uniform_method_reproduces_compress_with_target_bits():
    model = _model(Stack)
    alloc = allocate(model, CompressConfig(target_bits=3.0), method="uniform")
    rel = {r.relative_step for r in alloc.layers}
    assert max(rel) / min(rel) == pytest.approx(1.0, rel=1e-9)
    gm = udnc_fx.compress(model, CompressConfig(target_bits=3.0))
    for row, layer in zip(alloc.layers, udnc_fx.inspect(gm).layers):
        assert row.step == pytest.approx(layer.step, rel=0.02)


def test_fixed_layers_keep_their_step_and_count_towards_the_target():
    model = _model(Stack)
    base = CompressConfig(target_bits=3.0, overrides={"head": LayerConfig(step=0.05)})
    alloc = allocate(model, base, calibration_inputs=_calib(d=16))
    rows = {r.fqn: r for r in alloc.layers}
    assert rows["head.weight"].fixed and rows["head.weight"].step == 0.05
    assert alloc.config.overrides["head"] == LayerConfig(step=0.05)
    assert abs(alloc.mean_bits - 3.0) <= 3e-3 * 3.0
    assert "fixed" in str(alloc)


def test_layer_lattice_from_a_pattern_override_is_kept():
    model = _model(Stack)
    base = CompressConfig(target_bits=3.0, overrides={"re:b.*": LayerConfig(lattice="E8")})
    alloc = allocate(model, base, calibration_inputs=_calib(d=16))
    assert alloc.config.overrides["big"].lattice == "E8" and alloc.config.overrides["big"].n == 8
    assert alloc.config.overrides["small"].lattice is None
    gm = udnc_fx.compress(model, alloc.config)
    lattices = {r.fqn: r.lattice for r in udnc_fx.inspect(gm).layers}
    assert lattices == {"small.weight": "Z", "big.weight": "E8", "head.weight": "Z"}


def test_reuse_skips_probing_and_retargets():
    model = _model(Stack)
    first = allocate(model, CompressConfig(target_bits=4.0), calibration_inputs=_calib(d=16))
    second = allocate(model, CompressConfig(target_bits=2.5), reuse=first)
    assert second.method == "probe" and second.probe_forwards == 0
    assert abs(second.mean_bits - 2.5) <= 3e-3 * 2.5
    # Same sensitivities, so the steps keep their ratios.
    r1 = [a.step / b.step for a, b in zip(first.layers, second.layers)]
    assert max(r1) / min(r1) == pytest.approx(1.0, rel=1e-9)


def test_refine_probes_again_at_the_allocated_steps():
    model = _model(TwoPaths)
    alloc = allocate(model, CompressConfig(target_bits=3.0), calibration_inputs=_calib(), refine=1)
    assert alloc.probe_forwards == 6
    assert abs(alloc.mean_bits - 3.0) <= 3e-3 * 3.0


def test_user_model_is_unchanged():
    model = _model(Stack)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    allocate(model, CompressConfig(target_bits=3.0), calibration_inputs=_calib(d=16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_report_table_and_json():
    alloc = allocate(_model(Stack), CompressConfig(target_bits=3.0), calibration_inputs=_calib(d=16))
    table = str(alloc)
    for fqn in ("small.weight", "big.weight", "head.weight", "mean"):
        assert fqn in table
    data = json.loads(json.dumps(alloc.to_dict()))
    assert data["method"] == "probe" and len(data["layers"]) == 3
    assert isinstance(alloc, Allocation)


def test_allocated_config_round_trips_through_json():
    model = _model(Stack)
    config = allocate_steps(model, CompressConfig(target_bits=3.0), _calib(d=16))
    again = CompressConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    a, b = udnc_fx.compress(model, config), udnc_fx.compress(model, again)
    x = _calib(seed=3, d=16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_deterministic_rounding_is_supported():
    alloc = allocate(_model(Stack), CompressConfig(target_bits=3.0, dithered=False), calibration_inputs=_calib(d=16))
    assert abs(alloc.mean_bits - 3.0) <= 3e-3 * 3.0


def test_output_fn_chooses_what_is_measured():
    model = _model(TwoPaths)
    # Measuring only the quiet path's contribution makes "quiet" the sensitive layer.
    alloc = allocate(
        model,
        CompressConfig(target_bits=3.0),
        calibration_inputs=_calib(),
        output_fn=lambda m, x: m.quiet(x),
    )
    rows = {r.fqn: r for r in alloc.layers}
    assert rows["quiet.weight"].step < rows["loud.weight"].step
    assert any("did not change the output" in n for n in alloc.notes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="probe"), "calibration_inputs"),
        (dict(method="magic"), "method"),
        (dict(target_bits=0), "target_bits"),
        (dict(target_bits=40), "target_bits"),
        (dict(refine=-1), "refine"),
        (dict(target_bits=31.0), "cannot be met"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        allocate(_model(Stack), CompressConfig(), **kwargs)


def test_nothing_selected_is_an_error():
    with pytest.raises(ConfigError, match="no layer"):
        allocate(_model(Stack), CompressConfig(overrides={"type:Linear": None}))


class OwnWeights(nn.Module):
    """Bare Parameters of the root module used through F.linear: found in the graph, not overridable per layer."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(24, 16) * 0.2)
        self.w2 = nn.Parameter(torch.randn(4, 24) * 0.2)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(self.fc(x), self.w1)), self.w2)


def test_weights_that_cannot_be_overridden_are_left_to_the_target_solver():
    model = _model(OwnWeights)
    alloc = allocate(model, CompressConfig(target_bits=3.0), calibration_inputs=_calib(d=16))
    rows = {r.fqn: r for r in alloc.layers}
    assert rows["fc.weight"].applied and not rows["w1"].applied and not rows["w2"].applied
    assert set(alloc.config.overrides) == {"fc"} and alloc.config.target_bits == 3.0
    assert any("w1" in n and "cannot take a per-layer step" in n for n in alloc.notes)
    gm = udnc_fx.compress(model, alloc.config)
    assert abs(_mean_bits(gm) - 3.0) <= 3e-3 * 3.0


def test_a_global_step_is_replaced_by_the_allocation():
    model = _model(Stack)
    alloc = allocate(model, CompressConfig(relative_step=0.3), target_bits=3.0, calibration_inputs=_calib(d=16))
    assert not any(r.fixed for r in alloc.layers)
    assert alloc.config.relative_step is None and alloc.config.target_bits == 3.0
    assert abs(_mean_bits(udnc_fx.compress(model, alloc.config)) - 3.0) <= 3e-3 * 3.0

"""Tests of the select pass: which weights become candidates, their resolved settings, and the recorded skips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import udnc_fx
from udnc_fx import CompressConfig, ConfigError, LayerConfig, PassError
from udnc_fx.passes.materialize import served_params
from udnc_fx.passes.select import select_weights
from udnc_fx.passes.trace import trace_model


class OwnLinear(nn.Module):
    """A custom module holding its own weight and calling ``F.linear`` (not a Linear subclass)."""

    def __init__(self, i, o):
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i))
        self.table = nn.Parameter(torch.randn(3, 3))  # a 2-D parameter no weight op uses

    def forward(self, x):
        return F.linear(x, self.w) + self.table.sum()


class Zoo(nn.Module):
    """One of each selectable layer type, plus things that must not be selected."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv3d(4, 4, 1)
        self.t1 = nn.ConvTranspose1d(4, 4, 3, padding=1)
        self.t2 = nn.ConvTranspose2d(4, 4, 3, padding=1)
        self.t3 = nn.ConvTranspose3d(4, 4, 1)
        self.bn = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.own = OwnLinear(4, 4)

    def forward(self, idx):
        x = self.emb(idx).transpose(1, 2)  # (B, 4, L)
        x = self.t1(self.c1(x))
        x4 = x.unsqueeze(-1)
        x4 = self.t2(self.c2(x4))
        x5 = self.t3(self.c3(x4.unsqueeze(-1)))
        x = self.bn(x5.squeeze(-1).squeeze(-1)).transpose(1, 2)
        return self.own(self.fc(self.ln(x)))


TYPE_WEIGHTS = ["c1.weight", "c2.weight", "c3.weight", "t1.weight", "t2.weight", "t3.weight", "fc.weight"]


def by_fqn(changes):
    return {c.fqn: c for c in changes}


def test_default_selection_by_type_and_recorded_skips():
    model = Zoo()
    candidates, changes = select_weights(model, CompressConfig())
    assert [c.fqn for c in candidates] == TYPE_WEIGHTS
    assert all(c.found_by == "type" for c in candidates)
    skipped = by_fqn(changes)
    # every multi-dimensional parameter left float says why; biases and norm parameters (1-D) are not weights
    assert set(skipped) == {"emb.weight", "own.w", "own.table"}
    assert all(c.action == "skipped" and "not a selected layer type" in c.reason for c in changes)
    assert "Embedding.weight" in skipped["emb.weight"].reason


def test_functional_use_of_a_parameter_is_selected_from_the_graph():
    gm = trace_model(Zoo())
    candidates, changes = select_weights(gm, CompressConfig(), gm)
    found = {c.fqn: c.found_by for c in candidates}
    assert found["own.w"] == "functional"
    assert set(found) == set(TYPE_WEIGHTS) | {"own.w"}
    assert set(by_fqn(changes)) == {"emb.weight", "own.table"}  # table feeds no weight op


def test_include_embeddings_and_layer_types():
    model = Zoo()
    cands, _ = select_weights(model, CompressConfig(include_embeddings=True))
    assert "emb.weight" in [c.fqn for c in cands]
    cands, changes = select_weights(model, CompressConfig(layer_types=("Linear", "Conv2d")))
    assert [c.fqn for c in cands] == ["c2.weight", "fc.weight"]
    assert {"c1.weight", "t2.weight", "c3.weight"} <= set(by_fqn(changes))


def test_filter_fn_receives_module_and_fqn_and_its_skips_are_recorded():
    calls = []

    def only_2d_convs_and_linear(module, fqn):
        calls.append((type(module).__name__, fqn))
        return isinstance(module, (nn.Conv2d, nn.Linear))

    cands, changes = select_weights(Zoo(), CompressConfig(filter_fn=only_2d_convs_and_linear))
    assert [c.fqn for c in cands] == ["c2.weight", "fc.weight"]
    assert ("Conv1d", "c1") in calls and ("Linear", "fc") in calls
    reasons = by_fqn(changes)
    assert reasons["t3.weight"].reason == "filter_fn returned False"


def test_min_numel_skips_small_layers_with_a_reason():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 50))
    cands, changes = select_weights(model, CompressConfig(min_numel=10))
    assert [c.fqn for c in cands] == ["1.weight"]
    assert by_fqn(changes)["0.weight"].reason == "4 elements < min_numel=10"


def test_non_float32_weights_are_skipped():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    model[0].weight = nn.Parameter(torch.zeros(3, 3, dtype=torch.int64), requires_grad=False)
    model[1].double()
    model[2].half()
    cands, changes = select_weights(model, CompressConfig())
    assert [c.fqn for c in cands] == ["3.weight"]
    reasons = by_fqn(changes)
    assert "not floating point" in reasons["0.weight"].reason
    assert "only float32" in reasons["1.weight"].reason and "float64" in reasons["1.weight"].reason
    assert "only float32" in reasons["2.weight"].reason


def test_tied_weight_is_one_candidate_with_every_owner():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    cands, changes = select_weights(model, CompressConfig())
    assert len(cands) == 1
    assert cands[0].fqn == "0.weight"
    assert cands[0].owners == [("0", "weight"), ("2", "weight")]
    assert changes == []


# ----------------------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 1)

    def forward(self, x):
        return self.head(self.enc(x)) + self.conv(x.unsqueeze(-1)).squeeze(-1)


def test_override_precedence_in_selection():
    config = CompressConfig(
        step=0.1,
        overrides={
            nn.Linear: LayerConfig(lattice="A2"),  # type
            "re:enc\\..*": LayerConfig(lattice="D4", relative_step=0.2),  # pattern beats type
            "enc.1": LayerConfig(lattice="E8"),  # exact beats pattern
        },
    )
    cands = {c.fqn: c for c in select_weights(Net(), config)[0]}
    assert (cands["enc.0.weight"].lattice, cands["enc.0.weight"].n) == ("D4", 4)
    assert (cands["enc.0.weight"].step_kind, cands["enc.0.weight"].step_value) == ("relative_step", 0.2)
    assert cands["enc.0.weight"].override_key == "re:enc\\..*"
    assert (cands["enc.1.weight"].lattice, cands["enc.1.weight"].n) == ("E8", 8)
    assert (cands["enc.1.weight"].step_kind, cands["enc.1.weight"].step_value) == ("step", 0.1)  # inherited
    assert cands["head.weight"].lattice == "A2" and cands["head.weight"].override_key == "type:Linear"
    assert (cands["conv.weight"].lattice, cands["conv.weight"].n) == ("Z", 1)
    assert cands["conv.weight"].override_key is None


def test_overrides_reach_the_compressed_params():
    config = CompressConfig(
        step=0.1,
        overrides={
            nn.Linear: LayerConfig(lattice="A2", step=0.3),
            "re:enc\\..*": LayerConfig(lattice="D4"),
            "enc.1": LayerConfig(lattice="E8", relative_step=0.5),
        },
    )
    model = Net()
    gm = udnc_fx.compress(model, config)
    got = {d.fqn: (d.lattice, d.n, d.step) for d in served_params(gm)}
    std = model.enc[1].weight.detach().double().std(unbiased=False).item()
    assert got["enc.0.weight"] == ("D4", 4, 0.1)
    assert got["enc.1.weight"][:2] == ("E8", 8) and got["enc.1.weight"][2] == pytest.approx(0.5 * std, rel=1e-9)
    assert got["head.weight"] == ("A2", 2, 0.3)
    assert got["conv.weight"] == ("Z", 1, 0.1)


def test_override_n_only_keeps_the_global_lattice():
    cands = {c.fqn: c for c in select_weights(Net(), CompressConfig(overrides={"head": LayerConfig(n=4)}))[0]}
    assert (cands["head.weight"].lattice, cands["head.weight"].n) == ("Z", 4)
    assert cands["head.weight"].step_kind == "target_bits"


def test_override_none_leaves_the_layer_float_and_says_which_key():
    config = CompressConfig(overrides={"re:enc\\.0": None, nn.Conv1d: None, "head": None})
    cands, changes = select_weights(Net(), config)
    assert [c.fqn for c in cands] == ["enc.1.weight"]
    reasons = {c.fqn: c.reason for c in changes}
    assert "'re:enc\\\\.0'" in reasons["enc.0.weight"]
    assert "'type:Conv1d'" in reasons["conv.weight"]
    assert "'head'" in reasons["head.weight"]


def test_override_dimension_the_lattice_lacks_is_a_config_error():
    with pytest.raises(ConfigError, match="dimension"):
        select_weights(Net(), CompressConfig(lattice="E8", overrides={"head": LayerConfig(n=4)}))


@pytest.mark.parametrize("key", ["head.weight", "encoder.0", "enc.2"])
def test_exact_override_key_naming_no_module_is_a_config_error(key):
    # An exact key that names nothing is a typo (often the parameter's fqn instead of the module's); silently
    # ignoring it would quantize a layer the user meant to leave float.
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="names no module"):
        udnc_fx.compress(model, CompressConfig(step=0.1, overrides={key: None}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pattern_and_type_keys_matching_nothing_are_allowed():
    # patterns and types are generic (one config for many models), so matching nothing is not an error
    config = CompressConfig(step=0.1, overrides={"re:decoder\\..*": None, nn.Conv3d: None})
    gm = udnc_fx.compress(Net(), config)
    assert {c["fqn"] for c in udnc_fx.inspect(gm).changes if c["action"] == "quantized"} == {
        "enc.0.weight", "enc.1.weight", "head.weight", "conv.weight"
    }


# ----------------------------------------------------------------------------------------------------------------
# Strict mode
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        CompressConfig(step=0.1, strict=True, overrides={"head": None}),
        CompressConfig(step=0.1, strict=True, filter_fn=lambda m, fqn: fqn != "conv"),
        CompressConfig(step=0.1, strict=True, min_numel=65),
        CompressConfig(step=0.1, strict=True, layer_types=("Linear",)),
    ],
    ids=["override-None", "filter_fn", "min_numel", "layer_types"],
)
def test_strict_turns_a_skip_into_pass_error(config):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PassError, match="strict"):
        udnc_fx.compress(model, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same config without strict compresses, recording the skip
    gm = udnc_fx.compress(model, config.replace(strict=False))
    assert any(c["action"] == "skipped" for c in udnc_fx.inspect(gm).changes)


def test_strict_with_nothing_skipped_compresses():
    gm = udnc_fx.compress(Net(), CompressConfig(step=0.1, strict=True))
    assert [c["action"] for c in udnc_fx.inspect(gm).changes] == ["quantized"] * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_verb_refuses_a_model_without_float32_weights_the_same_way(dtype):
    # one bad input, one error: compress, allocate and prune used to raise three different types for it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    x = torch.randn(4, 8, dtype=dtype)
    verbs = {
        "compress": lambda: udnc_fx.compress(model, CompressConfig(step=0.05)),
        "allocate": lambda: udnc_fx.allocate(model, target_bits=3.0, calibration_inputs=x),
        "prune": lambda: udnc_fx.prune(model, sparsity=0.5),
    }
    for verb, call in verbs.items():
        with pytest.raises(udnc_fx.UnsupportedModelError, match=r"float32 weights only.*model\.float\(\)") as info:
            call()
        assert str(dtype).removeprefix("torch.") in str(info.value), verb


def test_a_model_with_nothing_selectable_keeps_each_verbs_own_error():
    # no floating-point weight of another dtype: the dtype refusal must not hide the verb's real reason
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(PassError, match="no weights to prune"):
        udnc_fx.prune(model, sparsity=0.5)

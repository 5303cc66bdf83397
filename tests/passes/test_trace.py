"""Tests of the prepare step (``passes/trace.py``): a deep copy traced with the config's leaves, the module-swap
fallback as ``config.fallback`` says with the reason recorded, one typed error for an untraceable model when the
fallback is off, and every verb that starts from it (compress, load, allocate, prune, fold_batchnorm) preparing a
model the same way."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import udnc_fx
from udnc_fx import CompressConfig, ConfigError, UnsupportedModelError
from udnc_fx.demo import DigitsCNN
from udnc_fx.passes.allocate import allocate
from udnc_fx.passes.fold import fold_batchnorm
from udnc_fx.passes.prune import prune
from udnc_fx.passes.trace import FALLBACK_PREFIX, TRACED, prepare


class DataDependent(nn.Module):
    """torch.fx cannot trace a branch on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(-x)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(6, 6)
        self.inner = DataDependent()
        self.post = nn.Linear(6, 3)

    def forward(self, x):
        return self.post(self.inner(self.pre(x)))


class Functional(nn.Module):
    """A weight used through ``F.linear``: only the graph finds it (select looks at modules otherwise)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.w = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return F.linear(torch.relu(self.fc(x)), self.w)


def untraceable() -> Untraceable:
    torch.manual_seed(3)
    return Untraceable()


def cnn() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN(width=4)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(expected)
    for k, v in now.items():
        assert torch.equal(v, expected[k]), f"{k} changed"


def shared_objects(a: nn.Module, b: nn.Module) -> set[str]:
    """Names of modules, parameters and buffers of ``a`` that are the very objects of ``b``."""
    ids = {id(m) for m in b.modules()} | {id(t) for t in b.parameters()} | {id(t) for t in b.buffers()}
    named = [*a.named_modules(), *a.named_parameters(), *a.named_buffers()]
    return {name for name, obj in named if id(obj) in ids}


# ----------------------------------------------------------------------------------------------------------------
# prepare


def test_a_traceable_model_becomes_a_graph_over_a_deep_copy():
    model = cnn().eval()
    prepared, how = prepare(model, CompressConfig())
    assert isinstance(prepared, fx.GraphModule) and how == TRACED
    prepared.graph.lint()
    assert shared_objects(prepared, model) == set()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))


def test_preparing_never_changes_the_users_model():
    model = cnn().train()
    before = state_of(model)
    prepared, _ = prepare(model, CompressConfig())
    with torch.no_grad():
        prepared(torch.randn(5, 1, 8, 8))  # train mode: moves the copy's BatchNorm statistics
        for p in prepared.parameters():
            p.add_(1.0)
    assert_state(model, before)


def test_leaf_modules_are_kept_whole_in_the_graph():
    prepared, how = prepare(untraceable(), CompressConfig(leaf_modules=(DataDependent,)))
    assert isinstance(prepared, fx.GraphModule) and how == TRACED
    assert [n.target for n in prepared.graph.nodes if n.op == "call_module"] == ["pre", "inner", "post"]


@pytest.mark.parametrize("fallback", ["auto", "module_swap"])
def test_an_untraceable_model_falls_back_to_a_module_swap_copy_with_the_reason(fallback):
    model = untraceable()
    before = state_of(model)
    prepared, how = prepare(model, CompressConfig(fallback=fallback))
    assert type(prepared) is Untraceable and prepared is not model
    assert shared_objects(prepared, model) == set()
    assert how.startswith(FALLBACK_PREFIX + ": ")
    assert "'inner'" in how and "DataDependent" in how  # the module torch.fx failed in
    x = torch.randn(3, 6)
    torch.testing.assert_close(prepared(x), model(x), rtol=0, atol=0)
    assert_state(model, before)


def test_fallback_error_is_one_typed_error_naming_the_module_and_the_remedy():
    model = untraceable()
    before = state_of(model)
    with pytest.raises(UnsupportedModelError) as info:
        prepare(model, CompressConfig(fallback="error"))
    message = str(info.value)
    assert "inside module 'inner' (DataDependent)" in message
    assert "leaf_modules=('DataDependent',)" in message and "fallback='module_swap'" in message
    assert_state(model, before)


def test_inplace_traces_the_callers_own_copy():
    work = untraceable()
    prepared, how = prepare(work, CompressConfig(leaf_modules=("DataDependent",)), inplace=True)
    assert how == TRACED and prepared.pre is work.pre and prepared.inner.fc.weight is work.inner.fc.weight
    swapped, how = prepare(work, CompressConfig(fallback="module_swap"), inplace=True)
    assert swapped is work and how.startswith(FALLBACK_PREFIX)


# ----------------------------------------------------------------------------------------------------------------
# the verbs prepare the same way


def test_compress_and_load_record_how_the_model_was_prepared(tmp_path):
    model = untraceable()
    config = CompressConfig(step=0.05, fallback="module_swap")
    _, how = prepare(model, config)
    out = udnc_fx.compress(model, config)
    assert udnc_fx.compression_record(out)["trace"] == how
    udnc_fx.save(out, tmp_path / "m.udnc")
    loaded = udnc_fx.load(tmp_path / "m.udnc", untraceable())
    assert type(loaded) is Untraceable
    assert udnc_fx.compression_record(loaded)["trace"] == how
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), out(x))


def test_load_prepares_as_the_stored_config_says(tmp_path):
    config = CompressConfig(step=0.05, leaf_modules=("DataDependent",), fallback="error")
    gm = udnc_fx.compress(untraceable(), config)
    udnc_fx.save(gm, tmp_path / "leaf.udnc")
    loaded = udnc_fx.load(tmp_path / "leaf.udnc", untraceable())
    assert isinstance(loaded, fx.GraphModule) and udnc_fx.compression_record(loaded)["trace"] == TRACED
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), gm(x))
    # the same layers in a class the stored leaf_modules does not name: torch.fx fails inside it, and the stored
    # fallback="error" refuses (as compress would) instead of falling back
    with pytest.raises(UnsupportedModelError, match="inside module 'inner'"):
        udnc_fx.load(tmp_path / "leaf.udnc", _renamed_inner())


def _renamed_inner() -> nn.Module:
    class Renamed(DataDependent):
        pass

    model = untraceable()
    renamed = Renamed()
    renamed.load_state_dict(model.inner.state_dict())
    model.inner = renamed
    return model


def test_prune_honours_fallback_error():
    model = untraceable()
    before = state_of(model)
    with pytest.raises(UnsupportedModelError, match="inside module 'inner'"):
        prune(model, 0.5, config=CompressConfig(fallback="error"))
    assert_state(model, before)


@pytest.mark.parametrize("fallback", ["auto", "module_swap"])
def test_prune_under_the_fallback_selects_what_compress_quantizes(fallback):
    model = untraceable()
    before = state_of(model)
    config = CompressConfig(step=0.05, fallback=fallback)
    pruned, masks = prune(model, 0.5, config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" warns about the fallback: tested in test_quantize
        out = udnc_fx.compress(model, config)
    quantized = {c.fqn for c in udnc_fx.compression_record(out)["changes"] if c.action == "quantized"}
    assert set(masks) == quantized == {"pre.weight", "inner.fc.weight", "post.weight"}
    assert type(pruned) is Untraceable and shared_objects(pruned, model) == set()
    assert_state(model, before)
    for fqn, mask in masks.items():
        weight = pruned.get_parameter(fqn)
        assert not mask.all() and (weight[~mask] == 0).all()
        assert torch.equal(weight[mask], model.get_parameter(fqn)[mask])


def test_prune_finds_functional_weights_through_the_graph():
    torch.manual_seed(0)
    model = Functional()
    _, masks = prune(model, 0.5)
    assert set(masks) == {"fc.weight", "w"}


def test_allocate_honours_fallback_error():
    with pytest.raises(UnsupportedModelError, match="inside module 'inner'"):
        allocate(untraceable(), CompressConfig(target_bits=3.0, fallback="error"), method="weights")


def test_allocate_under_the_fallback_says_so():
    result = allocate(untraceable(), CompressConfig(target_bits=3.0, fallback="module_swap"), method="weights")
    assert any("module-swap fallback" in note for note in result.notes)
    assert {r.fqn for r in result.layers} == {"pre.weight", "inner.fc.weight", "post.weight"}


def test_fold_refuses_an_untraceable_model_and_bad_leaves():
    with pytest.raises(UnsupportedModelError, match="inside module 'inner'"):
        fold_batchnorm(untraceable())
    with pytest.raises(ConfigError, match="leaf_modules"):
        fold_batchnorm(cnn(), leaf_modules=(3,))
    model = cnn().train()
    before = state_of(model)
    gm = fold_batchnorm(model)
    assert isinstance(gm, fx.GraphModule) and shared_objects(gm, model) == set()
    assert_state(model, before)

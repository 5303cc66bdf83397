"""Tests of the pruning pass: target sparsity (global and per layer) in whole lattice vectors, smallest first, the
same selection as the quantize pass, pruned weights decoding to exact zeros before and after fine-tuning, and bad
input."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import udnc_fx
from udnc_fx import ConfigError, LayerConfig, PassError
from udnc_fx.demo import DigitsCNN
from udnc_fx.passes.finetune import finetune, finetune_float
from udnc_fx.passes.materialize import served_params
from udnc_fx.passes.prune import mask_sparsity, prune
from udnc_fx.record import apply_affine


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Small convolutions gain nothing from a second thread, and lose a lot when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsCNN().eval()


def vectors(t: torch.Tensor, n: int) -> torch.Tensor:
    flat = t.reshape(-1)
    return torch.cat([flat, flat.new_zeros((-flat.numel()) % n)]).view(-1, n)


def random_batches(count=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(count)]


LAYERS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.9, 0.97])
@pytest.mark.parametrize("n", [1, 4])
def test_global_pruning_hits_the_target_in_whole_vectors_smallest_first(sparsity, n):
    model = cnn()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, masks = prune(model, sparsity, n=n)
    assert set(masks) == set(LAYERS)
    total = sum(m.numel() for m in masks.values())
    assert abs(mask_sparsity(masks) - sparsity) <= n / total
    params = dict(pruned.named_parameters())
    kept_rms, pruned_rms = [], []
    for fqn, mask in masks.items():
        w, w0 = params[fqn].detach(), original[fqn]
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert torch.all(w[~mask] == 0) and torch.equal(w[mask], w0[mask])
        # whole n-vectors: every vector is all kept or all pruned (padding positions count as kept)
        mv = vectors(mask.float(), n)
        real = vectors(torch.ones_like(mask, dtype=torch.float), n)
        assert torch.all((mv == real).all(1) | (mv == 0).all(1))
        rms = vectors(w0, n).norm(dim=1) / math.sqrt(n)
        kept_rms.append(rms[mv.sum(1) > 0])
        pruned_rms.append(rms[mv.sum(1) == 0])
    kept, dropped = torch.cat(kept_rms), torch.cat(pruned_rms)
    if dropped.numel() and kept.numel():
        assert dropped.max() <= kept.min()  # magnitude order over all layers
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, original[k])


@pytest.mark.parametrize("sparsity", [0.25, 0.8, 0.9])
def test_layer_scope_prunes_every_layer_to_the_target(sparsity):
    pruned, masks = prune(cnn(), sparsity, scope="layer", n=2)
    for fqn, mask in masks.items():
        vectors_in_layer = math.ceil(mask.numel() / 2)
        assert abs(1 - mask.float().mean().item() - sparsity) <= 1 / vectors_in_layer + 1e-9, fqn


def test_vector_length_comes_from_the_config_and_its_overrides():
    config = udnc_fx.CompressConfig(lattice="E8", overrides={"fc2": LayerConfig(lattice="Z", n=1)})
    _, masks = prune(cnn(), 0.6, config=config)
    fc1 = vectors(masks["fc1.weight"].float(), 8)
    assert torch.all((fc1.sum(1) == 0) | (fc1.sum(1) == 8))
    fc2 = vectors(masks["fc2.weight"].float(), 8)
    assert torch.any((fc2.sum(1) > 0) & (fc2.sum(1) < 8))  # n = 1 there: single weights


class Functional(nn.Module):
    """A weight the quantize pass finds through the graph (``F.linear``), and a layer an override leaves float."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.skip = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.skip(F.linear(x, self.w)))


def test_pruning_selects_exactly_what_compress_quantizes():
    torch.manual_seed(0)
    model = Functional()
    config = udnc_fx.CompressConfig(overrides={"skip": None}, step=0.1)
    _, masks = prune(model, 0.5, config=config)
    gm = udnc_fx.compress(model, config)
    quantized = {c["fqn"] for c in udnc_fx.inspect(gm).changes if c["action"] == "quantized"}
    assert set(masks) == quantized == {"w", "head.weight"}


@pytest.mark.parametrize("lattice, n", [("Z", 1), ("Z", 4), ("D4", 4), ("E8", 8)])
def test_pruned_weights_decode_to_exact_zero_before_and_after_finetuning(lattice, n):
    config = udnc_fx.CompressConfig(lattice=lattice, n=n, relative_step=0.5, seed=5, exact_zero=True)
    pruned, masks = prune(cnn(), 0.7, config=config)
    finetune_float(pruned, masks, random_batches(), F.cross_entropy, epochs=1, lr=1e-2, progress=False)
    for fqn, p in pruned.named_parameters():
        if fqn in masks:
            assert torch.all(p[~masks[fqn]] == 0)
    gm = udnc_fx.compress(pruned, config)
    dlps = {d.fqn: d for d in served_params(gm)}

    def check():
        for fqn, mask in masks.items():
            w = dlps[fqn]()
            assert torch.all(w[~mask] == 0), fqn
            if not mask.all():
                assert dlps[fqn].zero_index is not None

    check()
    zero_rows = {fqn: d.codebook.detach()[d.zero_index].clone() for fqn, d in dlps.items() if d.zero_index is not None}
    assert zero_rows
    finetune(gm, random_batches(seed=1), F.cross_entropy, epochs=2, lr=1e-2, train_bias=True, weight_decay=1e-2,
             optimizer="adamw", progress=False)
    check()
    for fqn, row in zero_rows.items():
        d = dlps[fqn]
        # A trained table keeps its exact-zero row; under the affine correction (vector lattices) the row is the
        # corrected zero point, never trained, and the decoder still maps the zero index to exactly 0 (check()).
        expected = row if d.affine is None else torch.from_numpy(apply_affine(row.numpy()[None], d.affine)[0])
        assert torch.equal(d.codebook.detach()[d.zero_index], expected), fqn


def test_without_exact_zero_pruned_weights_get_dither_noise():
    config = udnc_fx.CompressConfig(target_bits=1.0, seed=5)
    pruned, masks = prune(cnn(), 0.7, config=config)
    gm = udnc_fx.compress(pruned, config)
    w = {d.fqn: d() for d in served_params(gm)}
    assert any(bool((w[f][~m] != 0).any()) for f, m in masks.items())


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_sparsity_outside_0_1_is_refused(sparsity):
    with pytest.raises(ConfigError, match="sparsity"):
        prune(cnn(), sparsity)


def test_other_bad_input_raises_clear_errors():
    with pytest.raises(ConfigError, match="scope"):
        prune(cnn(), 0.5, scope="channel")
    with pytest.raises(ConfigError, match="n must be"):
        prune(cnn(), 0.5, n=0)
    with pytest.raises(ConfigError, match="CompressConfig"):
        prune(cnn(), 0.5, config={"lattice": "Z"})
    compressed = udnc_fx.compress(cnn(), udnc_fx.CompressConfig(target_bits=2.0))
    with pytest.raises(PassError, match="no weights to prune"):
        prune(compressed, 0.5)
    model = cnn()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        prune(model, 0.5)
    assert math.isnan(model.fc1.weight[0, 0].item())  # the user's model is untouched even on error


def _layer_sparsity(masks) -> dict[str, float]:
    return {k: 1 - m.float().mean().item() for k, m in masks.items()}


@pytest.mark.parametrize("sparsity,cap,n", [(0.9, 0.95, 1), (0.9, 0.92, 4), (0.8, 0.85, 2)])
def test_layer_bound_caps_global_pruning_and_moves_the_rest_to_other_layers(sparsity, cap, n):
    model = cnn()
    _, plain = prune(model, sparsity, n=n)
    assert _layer_sparsity(plain)["fc1.weight"] > cap  # unbounded, the largest layer takes more than the bound
    pruned, masks = prune(model, sparsity, n=n, max_layer_sparsity=cap)
    total = sum(m.numel() for m in masks.values())
    assert abs(mask_sparsity(masks) - sparsity) <= n / total  # the total still hits the target
    per_layer = _layer_sparsity(masks)
    assert all(v <= cap + 1e-9 for v in per_layer.values()), per_layer
    assert per_layer["fc1.weight"] >= cap - n / masks["fc1.weight"].numel() - 1e-9  # the bound binds
    # within the layers the bound does not bind, still smallest first: every pruned vector of an unbound layer is
    # no larger than every kept vector of any unbound layer
    params, original = dict(pruned.named_parameters()), dict(model.named_parameters())
    unbound = [f for f, v in per_layer.items() if v < cap - n / masks[f].numel() - 1e-9]
    kept, dropped = [], []
    for fqn in unbound:
        mv = vectors(masks[fqn].float(), n)
        rms = vectors(original[fqn].detach(), n).norm(dim=1) / math.sqrt(n)
        kept.append(rms[mv.sum(1) > 0])
        dropped.append(rms[mv.sum(1) == 0])
        assert torch.all(params[fqn].detach()[~masks[fqn]] == 0)
    kept, dropped = torch.cat(kept), torch.cat(dropped)
    assert dropped.numel() and dropped.max() <= kept.min()


def test_a_bound_that_does_not_bind_changes_nothing():
    model = cnn()
    a, ma = prune(model, 0.5)
    b, mb = prune(model, 0.5, max_layer_sparsity=1.0)
    c, mc = prune(model, 0.5, max_layer_sparsity={"conv1.weight": 1.0})
    for k in ma:
        assert torch.equal(ma[k], mb[k]) and torch.equal(ma[k], mc[k])


def test_per_layer_bounds_by_name_and_layer_scope():
    _, masks = prune(cnn(), 0.9, max_layer_sparsity={"fc1.weight": 0.9, "conv1.weight": 0.0})
    per_layer = _layer_sparsity(masks)
    assert per_layer["conv1.weight"] == 0.0 and per_layer["fc1.weight"] <= 0.9 + 1e-9
    assert abs(mask_sparsity(masks) - 0.9) <= 1 / sum(m.numel() for m in masks.values())
    _, masks = prune(cnn(), 0.8, scope="layer", max_layer_sparsity={"fc2.weight": 0.5})
    per_layer = _layer_sparsity(masks)
    assert per_layer["fc2.weight"] <= 0.5 and abs(per_layer["fc2.weight"] - 0.5) <= 1 / 640 + 1e-9
    assert abs(per_layer["conv2.weight"] - 0.8) <= 1 / 4608 + 1e-9


@pytest.mark.parametrize("bound,match", [
    (1.5, "max_layer_sparsity"), (-0.1, "max_layer_sparsity"), (float("nan"), "max_layer_sparsity"),
    (True, "max_layer_sparsity"), ("0.9", "max_layer_sparsity"), ({"fc9.weight": 0.5}, "fc9.weight"),
    ({"fc1.weight": 2.0}, "fc1.weight"), (0.5, "at most"),
])
def test_bad_layer_bounds_are_refused(bound, match):
    model = cnn()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        prune(model, 0.9, max_layer_sparsity=bound)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sparsity=st.floats(0.0, 0.99),
    caps=st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), min_size=4, max_size=4),
    n=st.sampled_from([1, 3]),
)
def test_bounds_always_hold_and_the_target_is_met_or_refused(sparsity, caps, n):
    bounds = {f: c for f, c in zip(LAYERS, caps) if c is not None}
    model = cnn()
    try:
        _, masks = prune(model, sparsity, n=n, max_layer_sparsity=bounds)
    except ConfigError as exc:
        assert "at most" in str(exc)
        reachable = sum(math.floor(bounds.get(f, 1.0) * m.numel()) for f, m in model.named_parameters()
                        if f in LAYERS)
        assert reachable < sparsity * sum(p.numel() for f, p in model.named_parameters() if f in LAYERS)
        return
    per_layer = _layer_sparsity(masks)
    for fqn, cap in bounds.items():
        assert per_layer[fqn] <= cap + 1e-9
    total = sum(m.numel() for m in masks.values())
    # met to within one vector per layer (a bound can stop a layer one partial vector short)
    assert abs(mask_sparsity(masks) - sparsity) <= len(LAYERS) * n / total

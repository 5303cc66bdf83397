"""Gradual pruning, ``prune(model, s, steps=K, data=..., loss_fn=...)``: the cubic schedule, retraining between
steps with nested masks (a vector pruned once stays pruned), the target and the layer bounds met at the end, the
user's model untouched, and bad input refused before anything trains."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import udnc_fx
from udnc_fx import ConfigError, TrainOptions
from udnc_fx.demo import DigitsCNN
from udnc_fx.passes import prune as prune_module
from udnc_fx.passes.materialize import served_params
from udnc_fx.passes.prune import mask_sparsity, prune, sparsity_schedule


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsCNN().eval()


def batches(count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(count)]


def quick(**kw) -> TrainOptions:
    return TrainOptions(epochs=1, lr=1e-2, progress=False, keep="last", **kw)


def test_schedule_is_cubic_rising_and_ends_at_the_target():
    assert sparsity_schedule(0.9, 1) == [0.9]
    s = sparsity_schedule(0.9, 4)
    assert s == pytest.approx([0.9 * (1 - (1 - i / 4) ** 3) for i in range(1, 5)])
    assert s[-1] == 0.9 and all(a < b for a, b in zip(s, s[1:]))
    # large steps first: every step prunes less than the one before
    steps = [b - a for a, b in zip([0.0] + s, s)]
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert sparsity_schedule(0.9, 3, initial_sparsity=0.5)[0] > 0.5


@given(sparsity=st.floats(0.0, 0.99), steps=st.integers(1, 12), s0=st.floats(0.0, 1.0))
@settings(max_examples=50, deadline=None)
def test_schedule_property(sparsity, steps, s0):
    s0 = s0 * sparsity
    s = sparsity_schedule(sparsity, steps, initial_sparsity=s0)
    assert len(s) == steps and s[-1] == pytest.approx(sparsity)
    assert all(s0 - 1e-12 <= a <= b + 1e-12 for a, b in zip(s, s[1:] + [sparsity]))


def test_gradual_pruning_retrains_between_steps_with_nested_masks(monkeypatch):
    seen = []
    real = prune_module.finetune_float

    def spy(model, masks, data, loss_fn, *, options):
        seen.append({k: m.clone() for k, m in masks.items()})
        # pruned positions are exact zeros when the retraining starts
        params = dict(model.named_parameters())
        assert all(torch.all(params[k].detach()[~m] == 0) for k, m in masks.items())
        return real(model, masks, data, loss_fn, options=options)

    monkeypatch.setattr(prune_module, "finetune_float", spy)
    model = cnn()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, masks = prune(model, 0.9, steps=4, data=batches(), loss_fn=F.cross_entropy, options=quick(),
                          max_layer_sparsity=0.95)
    assert len(seen) == 3  # steps - 1 retrainings: none after the last step
    schedule = sparsity_schedule(0.9, 4)
    total = sum(m.numel() for m in masks.values())
    for got, want in zip(seen + [masks], schedule):
        assert abs(mask_sparsity(got) - want) <= 4 / total
    for earlier, later in zip(seen, seen[1:] + [masks]):
        for k in later:
            assert not torch.any(later[k] & ~earlier[k]), k  # a vector pruned once stays pruned
    assert all(1 - m.float().mean().item() <= 0.95 + 1e-9 for m in masks.values())
    params = dict(pruned.named_parameters())
    assert all(torch.all(params[k].detach()[~m] == 0) for k, m in masks.items())
    # the retraining moved the kept weights (not just one-shot pruning of the original weights)
    _, oneshot = prune(model, 0.9, max_layer_sparsity=0.95)
    assert any(not torch.equal(params[k].detach()[masks[k]], dict(model.named_parameters())[k].detach()[masks[k]])
               for k in masks)
    assert any(not torch.equal(masks[k], oneshot[k]) for k in masks)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the user's model untouched


def test_gradual_pruning_is_reproducible_and_distils_from_a_teacher():
    teacher = cnn(1)
    a, ma = prune(cnn(), 0.8, steps=3, data=batches(), options=quick(teacher=teacher, temperature=2.0))
    b, mb = prune(cnn(), 0.8, steps=3, data=batches(), options=quick(teacher=teacher, temperature=2.0))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_gradual_pruned_model_compresses_to_exact_zeros():
    pruned, masks = prune(cnn(), 0.85, steps=2, data=batches(), loss_fn=F.cross_entropy, options=quick())
    gm = udnc_fx.compress(pruned, udnc_fx.CompressConfig(exact_zero=True, target_bits=1.5), progress=False)
    weights = {d.fqn: d() for d in served_params(gm)}
    for k, m in masks.items():
        assert torch.all(weights[k].detach()[~m] == 0), k


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps"), (dict(steps=2.0), "steps"), (dict(steps=True), "steps"),
    (dict(steps=3), "give data"),
    (dict(steps=3, data=batches()), "loss_fn"),
    (dict(steps=1, data=batches(), loss_fn=F.cross_entropy), "steps > 1"),
    (dict(steps=2, data=batches(), loss_fn=F.cross_entropy, options={"epochs": 1}), "TrainOptions"),
    (dict(steps=2, data=batches(), loss_fn=F.cross_entropy, initial_sparsity=0.95), "initial_sparsity"),
    (dict(steps=2, data=batches(), loss_fn=F.cross_entropy, initial_sparsity=-0.1), "sparsity"),
    (dict(steps=2, data=torch.zeros(3), loss_fn=F.cross_entropy, options=quick()), "data"),
])
def test_bad_gradual_input_is_refused_and_changes_nothing(kwargs, match):
    model = cnn()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        prune(model, 0.9, **kwargs)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_gradual_pruning_keeps_the_demo_cnn_closer_to_float_than_one_shot_at_equal_epochs():
    """The reason for ``steps``: on the demo CNN (digits, a validation split carved from TRAIN) at 0.9 bounded at
    0.95, 5 steps with 6 epochs between them plus 30 epochs after are measured at about half the KL to the float
    model of one-shot pruning with the same 54 epochs (0.0039 against 0.0077)."""
    from sklearn.model_selection import train_test_split

    from udnc_fx.demo import load_digits_split, train_digits_cnn
    from udnc_fx.passes.finetune import finetune_float
    from udnc_fx.passes.fold import fold_batchnorm

    data = load_digits_split()
    fit, val = train_test_split(range(len(data.y_train)), test_size=0.2, random_state=0,
                                stratify=data.y_train.numpy())
    fit, val = torch.tensor(fit), torch.tensor(val)
    data = type(data)(data.x_train[fit], data.y_train[fit], data.x_train[val], data.y_train[val])
    base = fold_batchnorm(train_digits_cnn(data, epochs=30, seed=0, progress=False))

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=64,
                                           shuffle=True, generator=torch.Generator().manual_seed(0))

    def options(epochs):
        return TrainOptions(epochs=epochs, lr=3e-3, keep="last", progress=False, teacher=base, temperature=2.0)

    def kl(model):
        with torch.no_grad():
            ref = F.log_softmax(base(data.x_test), 1)
            return float(F.kl_div(F.log_softmax(model.eval()(data.x_test), 1), ref, log_target=True,
                                  reduction="batchmean"))

    config = udnc_fx.CompressConfig(exact_zero=True)
    one, one_masks = prune(base, 0.9, config=config, max_layer_sparsity=0.95)
    finetune_float(one, one_masks, loader(), F.cross_entropy, options=options(54))
    grad, grad_masks = prune(base, 0.9, config=config, max_layer_sparsity=0.95, steps=5, data=loader(),
                             loss_fn=F.cross_entropy, options=options(6))
    finetune_float(grad, grad_masks, loader(), F.cross_entropy, options=options(30))
    assert abs(mask_sparsity(grad_masks) - mask_sparsity(one_masks)) < 1e-3
    assert kl(grad) < 0.75 * kl(one), (kl(grad), kl(one))

"""Tests of the fine-tuning pass: the paper's average-gradient rule against a hand computation, what moves and what
stays fixed, that fine-tuning (and distillation without labels) helps, keep-best, the schedule, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import udnc_fx
from udnc_fx import ConfigError, PassError
from udnc_fx.demo import evaluate, load_digits_split, train_digits_cnn
from udnc_fx.passes.finetune import TrainOptions, average_codeword_gradients, finetune, finetune_float
from udnc_fx.passes.materialize import served_params


def plain_sgd(groups, lr):
    return torch.optim.SGD(groups, lr=lr)


# ----------------------------------------------------------------------------------------------------------------
# The average-gradient rule, by hand
# ----------------------------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.9, -0.2, 0.1, 0.4, -0.6], [0.0, 0.35, -0.8, 0.15, 0.05],
                                               [-0.3, 0.7, 0.0, 0.0, 0.0]]))  # pruned tail: a zero vector for n = 1, 2, 4

    def forward(self, x):
        return self.fc(x)


def linear_loss(out, coeff):
    # dL/dW[i, j] = sum_b coeff[b, i] * x[b, j]: known in closed form
    return (out * coeff).sum()


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("exact_zero", [False, True])
def test_each_codeword_moves_by_the_average_gradient_of_its_weights(n, exact_zero):
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    coeff = torch.randn(4, 3)
    config = udnc_fx.CompressConfig(lattice="Z", n=n, step=0.25, seed=7, exact_zero=exact_zero)
    gm = udnc_fx.compress(Tiny(), config)
    (dlp,) = served_params(gm)
    before = dlp.codebook.detach().clone()
    idx = dlp.indices.long()

    # Hand computation: gradient of every weight, padded and cut into n-vectors like the parameter does.
    grad_w = coeff.T @ x  # (3, 5)
    flat = torch.cat([grad_w.reshape(-1), torch.zeros((-grad_w.numel()) % n)]).view(-1, n)
    lr = 0.1
    expected = before.clone()
    for k in range(dlp.num_codewords):
        rows = flat[idx == k]
        if rows.shape[0] == 0 or k == dlp.zero_index:
            continue  # unused and exact-zero codewords stay fixed
        expected[k] -= lr * rows.mean(0)
    if exact_zero:
        assert dlp.zero_index is not None  # the zero tail falls on the lattice point 0

    finetune(gm, [(x, coeff)], linear_loss, epochs=1, lr=lr, optimizer=plain_sgd, scheduler=None, keep="last",
             progress=False)
    torch.testing.assert_close(dlp.codebook.detach(), expected, rtol=0, atol=1e-6)
    if exact_zero:
        assert torch.equal(dlp.codebook.detach()[dlp.zero_index], before[dlp.zero_index])


def test_sum_rule_is_plain_autograd():
    torch.manual_seed(0)
    x, coeff = torch.randn(4, 5), torch.randn(4, 3)
    gm = udnc_fx.compress(Tiny(), udnc_fx.CompressConfig(step=0.25, seed=1))
    (dlp,) = served_params(gm)
    before = dlp.codebook.detach().clone()
    idx = dlp.indices.long()
    grad_w = (coeff.T @ x).reshape(-1)
    expected = before - 0.1 * torch.zeros_like(before).index_add_(0, idx, grad_w.unsqueeze(1))
    finetune(gm, [(x, coeff)], linear_loss, epochs=1, lr=0.1, optimizer=plain_sgd, scheduler=None,
             grad_rule="sum", progress=False)
    torch.testing.assert_close(dlp.codebook.detach(), expected, rtol=0, atol=1e-6)


def test_average_codeword_gradients_for_custom_loops():
    torch.manual_seed(0)
    x, coeff = torch.randn(4, 5), torch.randn(4, 3)
    gm = udnc_fx.compress(Tiny(), udnc_fx.CompressConfig(step=0.25, seed=1))
    (dlp,) = served_params(gm)
    linear_loss(gm(x), coeff).backward()
    summed = dlp.codebook.grad.clone()
    average_codeword_gradients(gm)
    counts = dlp.codeword_counts().clamp(min=1).unsqueeze(1).float()
    torch.testing.assert_close(dlp.codebook.grad, summed / counts)


# ----------------------------------------------------------------------------------------------------------------
# On the demo CNN
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    # One thread: these small convolutions gain nothing from two, and lose a lot when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = load_digits_split()
    model = train_digits_cnn(data, epochs=6, progress=False)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.y_train), generator=g)
    batches = [(data.x_train[order[i : i + 64]], data.y_train[order[i : i + 64]]) for i in range(0, len(order), 64)]
    yield data, model, batches
    torch.set_num_threads(threads)


def _snapshot(gm):
    return {name: t.detach().clone() for name, t in list(gm.named_parameters()) + list(gm.named_buffers())}


def _train_loss(gm, data):
    with torch.no_grad():
        gm.eval()
        return float(F.cross_entropy(gm(data.x_train), data.y_train))


def test_finetune_moves_codebooks_only_and_lowers_the_loss(digits):
    data, model, batches = digits
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=1.5, seed=0))
    dlps = served_params(gm)
    dither = [d.dither().clone() for d in dlps]
    before = _snapshot(gm)
    loss_before, acc_before = _train_loss(gm, data), evaluate(gm, data.x_test, data.y_test)
    grads = {name: p.requires_grad for name, p in gm.named_parameters()}
    result = finetune(gm, batches, F.cross_entropy, epochs=3, lr=3e-3, progress=False)
    after = _snapshot(gm)
    for name in before:
        if name.endswith("codebook"):
            assert not torch.equal(before[name], after[name]), f"{name} did not move"
        else:  # indices, biases, BatchNorm parameters and statistics: all frozen by default
            assert torch.equal(before[name], after[name]), f"{name} changed"
    for d, u in zip(dlps, dither):
        assert torch.equal(d.dither(), u)
    assert _train_loss(gm, data) < loss_before
    assert evaluate(gm, data.x_test, data.y_test) > acc_before
    assert result.steps == 3 * len(batches) and result.kept == "last" and result.distributed == 1
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0 by default
    assert {name: p.requires_grad for name, p in gm.named_parameters()} == grads  # flags restored
    gm.graph.lint()


@pytest.mark.parametrize("train_bias, train_norm", [(True, False), (False, True), (True, True)])
def test_biases_and_norm_parameters_train_only_when_asked(digits, train_bias, train_norm):
    data, model, batches = digits
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=2.0, seed=0))
    before = _snapshot(gm)
    finetune(gm, batches[:4], F.cross_entropy, epochs=1, lr=1e-2, train_bias=train_bias, train_norm=train_norm,
             progress=False)
    after = _snapshot(gm)
    for name in ("conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"):
        assert torch.equal(before[name], after[name]) != train_bias, name
    for name in ("bn1.weight", "bn1.bias", "bn2.running_mean", "bn2.running_var"):
        assert torch.equal(before[name], after[name]) != train_norm, name
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("indices"))


def test_distillation_without_labels_improves_agreement_with_the_teacher(digits):
    data, model, batches = digits
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=1.5, seed=1))
    inputs_only = [x for x, _ in batches]  # bare input batches: no labels anywhere

    def agreement_and_kl(student):
        student.eval()
        with torch.no_grad():
            s, t = student(data.x_test), model(data.x_test)
        kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
        return float((s.argmax(1) == t.argmax(1)).float().mean()), float(kl)

    agree0, kl0 = agreement_and_kl(gm)
    result = finetune(gm, inputs_only, teacher=model, epochs=3, lr=3e-3, progress=False)
    agree1, kl1 = agreement_and_kl(gm)
    assert kl1 < 0.5 * kl0
    assert agree1 > agree0
    assert result.steps == 3 * len(batches)
    assert not model.training  # the teacher's mode is left as it was

    gm2 = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=1.5, seed=1))
    finetune(gm2, inputs_only[:3], teacher=model, distill="mse", epochs=1, lr=3e-3, progress=False)
    assert agreement_and_kl(gm2)[1] < kl0


def test_keep_best_restores_the_best_epoch_by_metric(digits):
    data, model, batches = digits
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=2.0, seed=0))
    start = [d.codebook.detach().clone() for d in served_params(gm)]
    scores = iter([5.0, 1.0, 3.0])  # before training, after epoch 1, after epoch 2: the start is best
    result = finetune(gm, batches[:3], F.cross_entropy, epochs=2, lr=1e-2, eval_fn=lambda m: next(scores),
                      keep="best", progress=False)
    assert result.kept == "best" and result.best_epoch == 0 and result.best_metric == 5.0
    assert all(torch.equal(d.codebook, s) for d, s in zip(served_params(gm), start))
    assert [h["metric"] for h in result.history] == [5.0, 1.0, 3.0]

    scores = iter([5.0, 1.0, 3.0])
    result = finetune(gm, batches[:3], F.cross_entropy, epochs=2, lr=1e-2, eval_fn=lambda m: next(scores),
                      keep="best", mode="min", progress=False)
    assert result.best_epoch == 1 and result.best_metric == 1.0


def test_user_scheduler_factory_gets_the_total_number_of_steps(digits):
    _, model, batches = digits
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=2.0, seed=0))
    seen = {}

    def factory(optimizer, total_steps):
        seen["total"] = total_steps
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    result = finetune(gm, batches[:3], F.cross_entropy, epochs=2, lr=1.0, scheduler=factory, progress=False)
    assert seen["total"] == 6
    assert result.history[-1]["lr"] == pytest.approx(0.5**6)


def test_works_with_a_dataloader_and_an_eval_fn(digits):
    data, model, _ = digits
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train[:256], data.y_train[:256]), batch_size=64, shuffle=True
    )
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=1.5, seed=0))
    result = finetune(gm, loader, F.cross_entropy, epochs=2, lr=3e-3, progress=True,
                      eval_fn=lambda m: evaluate(m, data.x_test, data.y_test))
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.best_metric == max(h["metric"] for h in result.history)
    assert evaluate(gm, data.x_test, data.y_test) == result.best_metric


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing corrupted
# ----------------------------------------------------------------------------------------------------------------


def test_a_model_without_compressed_parameters_is_refused():
    with pytest.raises(PassError, match="no DitheredLatticeParam"):
        finetune(Tiny(), [(torch.randn(2, 5), torch.randn(2, 3))], linear_loss, progress=False)


def test_an_empty_dataloader_is_refused_before_anything_changes():
    gm = udnc_fx.compress(Tiny(), udnc_fx.CompressConfig(step=0.25))
    before = _snapshot(gm)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 5), torch.empty(0, 3)))
    with pytest.raises(ConfigError, match="empty"):
        finetune(gm, empty, linear_loss, progress=False)
    with pytest.raises(ConfigError, match="empty"):
        finetune(gm, [], linear_loss, progress=False)
    with pytest.raises(PassError, match="no batches"):
        finetune(gm, iter(()), linear_loss, epochs=1, progress=False)
    after = _snapshot(gm)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_nan_loss_stops_and_restores_the_last_good_codebooks():
    torch.manual_seed(0)
    gm = udnc_fx.compress(Tiny(), udnc_fx.CompressConfig(step=0.25, seed=2))
    (dlp,) = served_params(gm)
    seen = []

    def loss_fn(out, coeff):
        seen.append(dlp.codebook.detach().clone())  # the codebooks this loss is computed with
        loss = linear_loss(out, coeff)
        return loss * math.nan if len(seen) == 3 else loss

    batches = [(torch.randn(4, 5), torch.randn(4, 3)) for _ in range(5)]
    with pytest.raises(PassError, match="not finite"):
        finetune(gm, batches, loss_fn, epochs=1, lr=0.1, progress=False)
    assert len(seen) == 3
    assert not torch.equal(seen[1], seen[0])  # it did train before the NaN
    assert torch.equal(dlp.codebook.detach(), seen[1])  # the last codebooks that gave a finite loss
    assert torch.isfinite(gm(torch.randn(2, 5))).all()
    assert dlp.codebook.requires_grad  # flags restored


def test_non_finite_gradients_stop_with_the_codebooks_restored():
    gm = udnc_fx.compress(Tiny(), udnc_fx.CompressConfig(step=0.25, seed=2))
    (dlp,) = served_params(gm)
    before = dlp.codebook.detach().clone()
    # sqrt(|out|) at out = 0: a finite loss whose gradient is NaN
    with pytest.raises(PassError, match="non-finite gradients"):
        finetune(gm, [(torch.zeros(4, 5), torch.randn(4, 3))], lambda out, c: (out.abs().sqrt() * c).sum(),
                 progress=False)
    assert torch.equal(dlp.codebook.detach(), before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"keep": "first"}, "keep"),
        ({"mode": "up"}, "mode"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"scheduler": "step"}, "scheduler"),
        ({"grad_rule": "median"}, "grad_rule"),
        ({"distill": "js"}, "distill"),
        ({"eval_fn": 3}, "eval_fn"),
        ({"ddp": "yes"}, "ddp"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_invalid_options_raise_config_error(kwargs, match):
    gm = udnc_fx.compress(Tiny(), udnc_fx.CompressConfig(step=0.25))
    with pytest.raises(ConfigError, match=match):
        finetune(gm, [(torch.randn(2, 5), torch.randn(2, 3))], linear_loss, progress=False, **kwargs)


def test_missing_loss_bad_data_and_bad_batches_raise_clear_errors():
    gm = udnc_fx.compress(Tiny(), udnc_fx.CompressConfig(step=0.25))
    batch = (torch.randn(2, 5), torch.randn(2, 3))
    with pytest.raises(ConfigError, match="loss_fn"):
        finetune(gm, [batch], progress=False)
    with pytest.raises(ConfigError, match="data must be"):
        finetune(gm, torch.randn(3, 5), linear_loss, progress=False)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        finetune(gm, iter([batch]), linear_loss, epochs=2, progress=False)
    with pytest.raises(ConfigError, match="pair"):
        finetune(gm, [batch[0]], linear_loss, progress=False)
    with pytest.raises(ConfigError, match="not initialised"):
        finetune(gm, [batch], linear_loss, ddp=True, progress=False)


def test_finetune_float_keeps_pruned_weights_at_zero_and_trains_the_rest():
    torch.manual_seed(0)
    model = Tiny()
    mask = torch.rand(3, 5) > 0.5
    with torch.no_grad():
        model.fc.weight.masked_fill_(~mask, 0.0)
    before = model.fc.weight.detach().clone()
    batches = [(torch.randn(8, 5), torch.randn(8, 3)) for _ in range(4)]
    finetune_float(model, {"fc.weight": mask}, batches, F.mse_loss, epochs=2, lr=0.05, progress=False)
    w = model.fc.weight.detach()
    assert torch.all(w[~mask] == 0)
    assert not torch.equal(w[mask], before[mask])
    with pytest.raises(ConfigError, match="names no parameter"):
        finetune_float(model, {"fc.nope": mask}, batches, F.mse_loss, progress=False)
    with pytest.raises(ConfigError, match="shape"):
        finetune_float(model, {"fc.weight": mask[:2]}, batches, F.mse_loss, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# One options object for both verbs
# ----------------------------------------------------------------------------------------------------------------


def _tiny_batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(3)]


def test_options_object_and_keywords_train_the_same_codewords():
    codebooks = []
    for how in ("keywords", "options", "options overridden"):
        gm = udnc_fx.compress(Tiny(), udnc_fx.CompressConfig(step=0.25, seed=4))
        if how == "keywords":
            finetune(gm, _tiny_batches(), linear_loss, epochs=2, lr=0.05, optimizer="sgd", progress=False)
        elif how == "options":
            finetune(gm, _tiny_batches(), linear_loss,
                     options=TrainOptions(epochs=2, lr=0.05, optimizer="sgd", progress=False))
        else:  # keywords win over the options' fields
            finetune(gm, _tiny_batches(), linear_loss, options=TrainOptions(epochs=9, lr=1.0, progress=False),
                     epochs=2, lr=0.05, optimizer="sgd")
        codebooks.append(served_params(gm)[0].codebook.detach().clone())
    assert torch.equal(codebooks[0], codebooks[1]) and torch.equal(codebooks[0], codebooks[2])


def test_one_options_object_serves_both_verbs_with_their_own_defaults():
    options = TrainOptions(epochs=1, lr=0.05, progress=False)

    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)
            self.ln = nn.LayerNorm(3)

        def forward(self, x):
            return self.ln(self.fc(x))

    torch.manual_seed(0)
    model = Biased()
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(step=0.25, seed=4))
    bias, ln = gm.fc.bias.detach().clone(), gm.ln.weight.detach().clone()
    finetune(gm, _tiny_batches(), linear_loss, options=options)  # codewords only by default
    assert torch.equal(gm.fc.bias, bias) and torch.equal(gm.ln.weight, ln)

    bias, ln = model.fc.bias.detach().clone(), model.ln.weight.detach().clone()
    finetune_float(model, {}, _tiny_batches(), linear_loss, options=options)  # everything by default
    assert not torch.equal(model.fc.bias, bias) and not torch.equal(model.ln.weight, ln)

    bias = model.fc.bias.detach().clone()
    finetune_float(model, {}, _tiny_batches(), linear_loss, options=TrainOptions(epochs=1, train_bias=False,
                                                                                 progress=False))
    assert torch.equal(model.fc.bias, bias)  # an explicit choice in the options is respected


def test_unknown_keywords_and_wrong_options_are_refused():
    gm = udnc_fx.compress(Tiny(), udnc_fx.CompressConfig(step=0.25))
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        finetune(gm, _tiny_batches(), linear_loss, epoch=2)
    with pytest.raises(TypeError, match="grad_rule"):
        finetune_float(Tiny(), {}, _tiny_batches(), linear_loss, grad_rule="sum")  # codebooks only
    with pytest.raises(ConfigError, match="TrainOptions"):
        finetune(gm, _tiny_batches(), linear_loss, options={"epochs": 2})
    with pytest.raises(ConfigError, match="lr"):
        finetune(gm, _tiny_batches(), linear_loss, options=TrainOptions(progress=False), lr=-1.0)


# ----------------------------------------------------------------------------------------------------------------
# The demo's fine-tuning and pruning steps
# ----------------------------------------------------------------------------------------------------------------


def test_demo_prunes_retrains_compresses_and_finetunes(digits, tmp_path, capsys):
    from udnc_fx.demo import run_demo

    results = run_demo(tmp_path, epochs=2, finetune_epochs=1, sparsity=0.5, progress=False)
    text = capsys.readouterr().out
    assert "fine-tuned accuracy" in text and "pruned" in text
    assert results["finetuned_accuracy"] is not None and results["finetune_epochs"] == 1
    assert abs(results["achieved_sparsity"] - 0.5) < 0.01
    assert results["reloaded_accuracy"] == results["finetuned_accuracy"]  # the container holds the tuned model
    with pytest.raises(ConfigError, match="sparsity"):
        run_demo(tmp_path, sparsity=1.0)
    with pytest.raises(ConfigError, match="finetune_epochs"):
        run_demo(tmp_path, finetune_epochs=-1)

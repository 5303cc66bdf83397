"""Tests of the training module: the options object (defaults, validation, merging with keyword arguments), the
distillation loss against hand computations, the schedule and optimizers, batch handling, and the step-rule
contract ``run_training`` offers the verbs."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import udnc_fx
from udnc_fx import ConfigError, PassError
from udnc_fx.passes.train import (
    TrainOptions,
    batch_loss,
    check_training_inputs,
    distill_loss,
    make_optimizer,
    make_scheduler,
    merge_options,
    run_training,
)

# ----------------------------------------------------------------------------------------------------------------
# TrainOptions
# ----------------------------------------------------------------------------------------------------------------


def test_defaults_are_the_verbs_documented_defaults():
    o = TrainOptions()
    assert (o.epochs, o.lr, o.optimizer, o.weight_decay, o.scheduler) == (5, 1e-3, "adam", 0.0, "cosine")
    assert (o.keep, o.mode, o.distill, o.temperature, o.distill_weight) == ("best", "max", "kl", 1.0, 1.0)
    assert (o.eval_fn, o.teacher, o.max_steps_per_epoch, o.progress, o.ddp) == (None, None, None, True, "auto")
    assert (o.train_bias, o.train_norm) == (None, None)  # each verb fills in its own


def test_options_are_frozen_and_keyword_only():
    o = TrainOptions(epochs=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.epochs = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainOptions(2)  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"temperature": 0}, "temperature"),
        ({"distill_weight": float("nan")}, "distill_weight"),
        ({"max_steps_per_epoch": 0}, "max_steps_per_epoch"),
        ({"max_steps_per_epoch": 2.0}, "max_steps_per_epoch"),
        ({"train_bias": 1}, "train_bias"),
        ({"train_norm": "yes"}, "train_norm"),
        ({"keep": "first"}, "keep"),
        ({"mode": "up"}, "mode"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"scheduler": "step"}, "scheduler"),
        ({"distill": "js"}, "distill"),
        ({"eval_fn": "accuracy"}, "eval_fn"),
        ({"ddp": "yes"}, "ddp"),
        ({"teacher": "bert"}, "teacher"),
    ],
)
def test_invalid_options_raise_config_error_when_built(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainOptions(**kwargs)


def test_keywords_override_options_and_are_validated_again():
    base = TrainOptions(epochs=3, lr=0.1, keep="last")
    merged = merge_options(base, {"lr": 0.2}, "finetune")
    assert (merged.epochs, merged.lr, merged.keep) == (3, 0.2, "last")
    assert base.lr == 0.1  # the caller's object is untouched
    assert merge_options(base, {}, "finetune") is base
    assert merge_options(None, {"epochs": 2}, "finetune") == TrainOptions(epochs=2)
    with pytest.raises(ConfigError, match="lr"):
        merge_options(base, {"lr": 0.0}, "finetune")


def test_an_unknown_keyword_is_a_type_error_and_a_wrong_options_object_a_config_error():
    with pytest.raises(TypeError, match="finetune_float\\(\\) got an unexpected keyword argument 'epoch'"):
        merge_options(None, {"epoch": 2}, "finetune_float")
    with pytest.raises(ConfigError, match="TrainOptions"):
        merge_options({"epochs": 2}, {}, "finetune")  # type: ignore[arg-type]


def test_verb_defaults_fill_only_what_was_left_open():
    assert TrainOptions().with_verb_defaults(train_bias=True, train_norm=False) == TrainOptions(
        train_bias=True, train_norm=False
    )
    chosen = TrainOptions(train_bias=False, train_norm=True)
    assert chosen.with_verb_defaults(train_bias=True, train_norm=False) == chosen


def test_inputs_the_options_cannot_check():
    batch = (torch.zeros(2, 3), torch.zeros(2))
    check_training_inputs([batch], F.mse_loss, TrainOptions())
    check_training_inputs(iter([batch]), F.mse_loss, TrainOptions(epochs=1))  # one pass over a generator is fine
    check_training_inputs([batch[0]], None, TrainOptions(teacher=nn.Identity()))  # distillation needs no loss
    with pytest.raises(ConfigError, match="loss_fn"):
        check_training_inputs([batch], None, TrainOptions())
    with pytest.raises(ConfigError, match="loss_fn must be callable"):
        check_training_inputs([batch], "mse", TrainOptions())
    for bad in (None, "batches", b"x", torch.zeros(3), 3):
        with pytest.raises(ConfigError, match="data must be"):
            check_training_inputs(bad, F.mse_loss, TrainOptions())
    with pytest.raises(ConfigError, match="empty"):
        check_training_inputs([], F.mse_loss, TrainOptions())
    with pytest.raises(ConfigError, match="one-shot"):
        check_training_inputs(iter([batch]), F.mse_loss, TrainOptions(epochs=2))


# ----------------------------------------------------------------------------------------------------------------
# Losses, batches, optimizer and schedule
# ----------------------------------------------------------------------------------------------------------------


def test_kl_distillation_matches_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    T = 2.0
    p_t, p_s = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * T * T  # KL(teacher || student), batch mean, × T²
    torch.testing.assert_close(distill_loss("kl", s, t, T), expected)
    # sequence outputs (batch, tokens, classes): the mean is over every position
    s3, t3 = s.view(2, 2, 5), t.view(2, 2, 5)
    torch.testing.assert_close(distill_loss("kl", s3, t3, T), expected)


def test_mse_distillation_and_output_containers():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    expected = ((s - t) ** 2).mean()
    torch.testing.assert_close(distill_loss("mse", s, t, 1.0), expected)
    torch.testing.assert_close(distill_loss("mse", SimpleNamespace(logits=s), (t, None), 1.0), expected)
    assert distill_loss(lambda a, b: (a - b).abs().sum(), s, t, 1.0) == (s - t).abs().sum()
    with pytest.raises(PassError, match="tensor outputs"):
        distill_loss("mse", {"x": s}, t, 1.0)


def test_teacher_gets_no_gradient_from_distillation():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    distill_loss("kl", s, t, 1.0).backward()
    assert s.grad is not None and t.grad is None


class Kwargs(nn.Module):
    def forward(self, a, b):
        return a * b


def test_batch_loss_calls_the_model_as_the_batch_says():
    a, b, y = torch.full((2, 3), 2.0), torch.full((2, 3), 3.0), torch.zeros(2, 3)
    options = TrainOptions()
    cpu = torch.device("cpu")
    assert batch_loss(Kwargs(), ({"a": a, "b": b}, y), F.l1_loss, options, cpu) == 6.0  # dict: keyword arguments
    assert batch_loss(Kwargs(), ((a, b), y), F.l1_loss, options, cpu) == 6.0  # tuple: positional
    with pytest.raises(PassError, match="scalar"):
        batch_loss(Kwargs(), ((a, b), y), lambda out, target: out - target, options, cpu)
    with pytest.raises(ConfigError, match="pair"):
        batch_loss(Kwargs(), ((a, b), y, y), F.l1_loss, options, cpu)


def test_loss_and_distillation_are_summed_with_the_weight():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    student, teacher = nn.Linear(3, 3), nn.Linear(3, 3)
    options = TrainOptions(teacher=teacher, distill="mse", distill_weight=0.25)
    got = batch_loss(student, (x, y), F.l1_loss, options, torch.device("cpu"))
    with torch.no_grad():
        expected = F.l1_loss(student(x), y) + 0.25 * F.mse_loss(student(x), teacher(x))
    torch.testing.assert_close(got.detach(), expected)


def test_cosine_schedule_decays_to_zero_over_the_given_steps():
    p = nn.Parameter(torch.zeros(1))
    opt = make_optimizer("sgd", [{"params": [p]}], 0.5, 0.0)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    sched = make_scheduler("cosine", opt, 4)
    lrs = []
    for _ in range(5):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * min(k, 4) / 4)) for k in range(1, 6)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[3] == pytest.approx(0.0, abs=1e-12) and lrs[4] == pytest.approx(0.0, abs=1e-12)  # stays at 0
    assert make_scheduler("constant", opt, 4) is None and make_scheduler(None, opt, 4) is None
    assert isinstance(make_optimizer("adamw", [{"params": [p]}], 0.1, 0.01), torch.optim.AdamW)
    assert make_optimizer("adam", [{"params": [p]}], 0.1, 0.0).param_groups[0]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# run_training: the contract with the verbs
# ----------------------------------------------------------------------------------------------------------------


class Recorder:
    """A step rule that logs its calls and, after each step, pins w[0] at 1 (as the mask and codebook rules do)."""

    def __init__(self, param, log):
        self.param, self.log = param, log

    def after_backward(self):
        self.log.append(("backward", self.param.grad is not None))

    @torch.no_grad()
    def after_step(self):
        self.log.append(("step", None))
        self.param[0] = 1.0


def test_rules_run_after_every_backward_and_step_and_only_trainables_move():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    frozen_before = model[0].bias.detach().clone()
    stats_before = model[1].running_mean.clone()
    log: list = []
    w = model[0].weight
    batches = [(torch.randn(4, 3), torch.randn(4, 3)) for _ in range(3)]
    options = TrainOptions(epochs=2, lr=0.1, progress=False, train_bias=False, train_norm=False)
    result = run_training(model, batches, F.mse_loss, trainable=[w], rules=[Recorder(w, log)], options=options,
                          desc="test")
    assert log == [("backward", True), ("step", None)] * 6
    assert torch.equal(w.detach()[0], torch.ones(3))
    assert torch.equal(model[0].bias.detach(), frozen_before)
    assert torch.equal(model[1].running_mean, stats_before)  # frozen BatchNorm ran in eval mode
    assert result.steps == 6 and result.model is model
    assert all(p.requires_grad for p in model.parameters()) and model.training  # flags and modes restored


def test_ddp_true_without_a_process_group_is_refused_before_anything_changes():
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="not initialised"):
        run_training(model, [(torch.randn(1, 2), torch.randn(1, 2))], F.mse_loss, trainable=[model.weight],
                     rules=[], options=TrainOptions(ddp=True, train_norm=False), desc="test")
    assert model.weight.requires_grad and model.bias.requires_grad


def test_trainoptions_is_exported_at_the_top():
    assert udnc_fx.TrainOptions is TrainOptions
    assert "TrainOptions" in udnc_fx.__all__

"""Fine-tuning: train the shared codewords of a compressed model (indices and dither fixed), or the kept float
weights of a pruned model (pruned weights held at 0).

Before (``finetune``)::

    conv1.weight_q: DitheredLatticeParam(indices: fixed, C: f32[K×n] = Δ·lattice points, dither: fixed)

After::

    conv1.weight_q: DitheredLatticeParam(indices: same, C: f32[K×n] trained, dither: same)

Each codeword moves by the **average** gradient of the weights mapped to it (Choi, El-Khamy & Lee 2018). Plain
autograd through the gather ``C[k]`` gives the **sum** over those weights, so after every backward pass each row of
``C.grad`` is divided by its codeword's count; codewords with count 0 and the exact-zero codeword (``zero_index``,
pruned weights) are held fixed. Under Adam the rule changes little (Adam is invariant to a constant per-element
gradient scale up to its ``eps``); under SGD it is what keeps rare and frequent codewords on the same footing.

Runs unchanged under ``torch.distributed``: when a process group is initialised (``torchrun``; gloo on CPU, NCCL on
GPU) the model is wrapped in ``DistributedDataParallel`` (an already wrapped model is re-wrapped after freezing).
DDP all-reduces gradients as means over ranks before the per-codeword division, which is the same on every rank
(the indices are identical), so every rank ends with the same codebooks. Give each rank its own shard of the data
(``DistributedSampler``; its ``set_epoch`` is called every epoch) and the same number of batches.

The training loop itself (optimizer, schedule, distillation, DDP, keep-best) lives in :mod:`udnc_fx.passes.train`;
both verbs take its :class:`~udnc_fx.passes.train.TrainOptions`, as ``options=`` or as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, PassError
from ..param import DitheredLatticeParam
from .materialize import served_params
from .train import (
    NORM_TYPES,
    FinetuneResult,
    TrainOptions,
    check_training_inputs,
    merge_options,
    norm_param_ids,
    run_training,
    unwrap_ddp,
)

__all__ = [
    "finetune",
    "finetune_float",
    "FinetuneResult",
    "TrainOptions",
    "average_codeword_gradients",
    "NORM_TYPES",
]

_GRAD_RULES = ("average", "sum")


# ----------------------------------------------------------------------------------------------------------------
# The average-gradient rule


class _CodebookRule:
    """Per-codeword gradient scaling and the rows held fixed, for one ``DitheredLatticeParam``."""

    def __init__(self, dlp: DitheredLatticeParam, grad_rule: str):
        counts = dlp.codeword_counts().to(dlp.codebook.device)
        self.dlp = dlp
        self.frozen = counts == 0
        if dlp.zero_index is not None:
            self.frozen[dlp.zero_index] = True
        scale = 1.0 / counts.clamp(min=1).to(dlp.codebook.dtype)
        if grad_rule == "sum":
            scale = torch.ones_like(scale)
        self.scale = scale.masked_fill(self.frozen, 0.0).unsqueeze(1)
        self.fixed_rows = dlp.codebook.detach()[self.frozen].clone()

    @torch.no_grad()
    def after_backward(self) -> None:
        grad = self.dlp.codebook.grad
        if grad is not None:
            grad.mul_(self.scale)

    @torch.no_grad()
    def after_step(self) -> None:
        # Weight decay or optimizer state could still move a frozen row: put it back exactly.
        if self.fixed_rows.numel():
            self.dlp.codebook[self.frozen] = self.fixed_rows


def average_codeword_gradients(model: nn.Module) -> None:
    """Turn the summed codebook gradients autograd left in ``model``'s ``DitheredLatticeParam`` s into the paper's
    per-codeword averages (divide each row by its count; rows with count 0 and ``zero_index`` get 0). ``finetune``
    does this after every backward pass; exposed for custom training loops."""
    for dlp in served_params(model):
        _CodebookRule(dlp, "average").after_backward()


class _MaskRule:
    """Keeps pruned float weights at exactly 0: masked gradients, and the mask re-applied after every step."""

    def __init__(self, param: nn.Parameter, mask: torch.Tensor):
        self.param = param
        self.drop = ~mask.to(device=param.device, dtype=torch.bool)

    @torch.no_grad()
    def after_backward(self) -> None:
        if self.param.grad is not None:
            self.param.grad.masked_fill_(self.drop, 0.0)

    @torch.no_grad()
    def after_step(self) -> None:
        self.param.masked_fill_(self.drop, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# What trains


def _codebook_trainables(
    inner: nn.Module, dlps: list[DitheredLatticeParam], options: TrainOptions
) -> list[nn.Parameter]:
    """The codebooks, then (when asked) biases outside normalisation layers and normalisation parameters."""
    trainable: list[nn.Parameter] = [dlp.codebook for dlp in dlps]
    seen = {id(p) for p in trainable}
    norm_ids = norm_param_ids(inner)
    for name, p in inner.named_parameters():
        if id(p) in seen or not p.dtype.is_floating_point:
            continue
        is_norm = id(p) in norm_ids
        is_bias = not is_norm and name.rsplit(".", 1)[-1] == "bias"
        if (options.train_norm and is_norm) or (options.train_bias and is_bias):
            trainable.append(p)
            seen.add(id(p))
    return trainable


def _float_trainables(inner: nn.Module, options: TrainOptions) -> list[nn.Parameter]:
    """Every floating-point parameter, less biases and normalisation parameters unless asked for."""
    norm_ids = norm_param_ids(inner)
    trainable, seen = [], set()
    for name, p in inner.named_parameters():
        if id(p) in seen or not p.dtype.is_floating_point:
            continue
        is_norm = id(p) in norm_ids
        if is_norm and not options.train_norm:
            continue
        if not is_norm and not options.train_bias and name.rsplit(".", 1)[-1] == "bias":
            continue
        trainable.append(p)
        seen.add(id(p))
    return trainable


def _mask_rules(inner: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[_MaskRule]:
    params = dict(inner.named_parameters(remove_duplicate=False))
    rules = []
    for fqn, mask in masks.items():
        if fqn not in params:
            raise ConfigError(f"mask {fqn!r} names no parameter of the model")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(params[fqn].shape):
            raise ConfigError(
                f"mask {fqn!r} must be a bool tensor of shape {tuple(params[fqn].shape)}, got "
                f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
        rules.append(_MaskRule(params[fqn], mask))
    return rules


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


def finetune(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    options: TrainOptions | None = None,
    grad_rule: str = "average",
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune the codebooks of a compressed model in place; indices and dither stay fixed.

    Before: ``W = C[k] − Δ·U`` with ``C`` = Δ·(lattice points).  After: the same ``k`` and ``U``, trained ``C``.

    Each codeword moves by the average gradient of the weights mapped to it (``grad_rule="average"``, the paper's
    rule; ``"sum"`` is plain autograd). Codewords no weight uses and the exact-zero codeword (pruned weights) stay
    fixed. Everything else is frozen unless ``train_bias`` / ``train_norm`` (both off by default here); frozen
    normalisation layers are put in eval mode (running statistics unchanged). ``requires_grad`` flags and
    train/eval modes are restored afterwards.

    Example::

        finetune(gm, loader, F.cross_entropy, epochs=3, lr=3e-3)
        finetune(gm, loader, teacher=float_model, options=TrainOptions(epochs=3, distill="mse"))

    Args:
        model: a compressed model (``udnc_fx.compress``), possibly wrapped in ``DistributedDataParallel``.
        data: a re-iterable of ``(inputs, targets)`` batches, e.g. a ``DataLoader``; ``inputs`` is a tensor, a
            tuple (positional args) or a dict (keyword args). With ``teacher`` and no ``loss_fn``, batches may be
            bare inputs (labels are not needed).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; optional with ``teacher``.
        options: a :class:`~udnc_fx.passes.train.TrainOptions` (default: ``TrainOptions()``: 5 epochs, lr 1e-3,
            Adam, cosine schedule to 0, keep the best epoch by ``eval_fn``, DDP when a process group is up).
        grad_rule: ``"average"`` (default) or ``"sum"``.
        **overrides: any field of ``TrainOptions`` (``epochs``, ``lr``, ``optimizer``, ``weight_decay``,
            ``scheduler``, ``train_bias``, ``train_norm``, ``eval_fn``, ``keep``, ``mode``, ``teacher``,
            ``distill``, ``temperature``, ``distill_weight``, ``max_steps_per_epoch``, ``progress``, ``ddp``),
            applied over ``options``.

    Returns:
        A :class:`FinetuneResult` (the model, per-epoch history, best epoch and metric).

    Raises:
        PassError: the model has no ``DitheredLatticeParam``; the data yielded no batch; the loss or the gradients
            became NaN/Inf (training stops and the last parameters that gave a finite loss are restored); under
            DDP, the ranks hold different compressed models.
        ConfigError: an invalid option, an empty data loader (``len(data) == 0``), or no loss and no teacher.
        TypeError: a keyword argument that is no option.
    """
    options = merge_options(options, overrides, "finetune").with_verb_defaults(train_bias=False, train_norm=False)
    if grad_rule not in _GRAD_RULES:
        raise ConfigError(f"grad_rule must be 'average' (the paper's) or 'sum', got {grad_rule!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"finetune() needs a compressed nn.Module, got {type(model).__name__}")
    check_training_inputs(data, loss_fn, options)
    inner = unwrap_ddp(model)
    dlps = served_params(inner)
    if not dlps:
        raise PassError(
            "finetune() found no DitheredLatticeParam in the model: compress it first (udnc_fx.compress), or use "
            "finetune_float() to train a float model"
        )
    rules = [_CodebookRule(dlp, grad_rule) for dlp in dlps]
    return run_training(
        model, data, loss_fn, trainable=_codebook_trainables(inner, dlps, options), rules=rules, options=options,
        desc="fine-tuning codewords",
    )


def finetune_float(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    options: TrainOptions | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Retrain the kept float weights of a pruned model in place; pruned weights stay exactly 0.

    The paper's pipeline: ``prune`` → ``finetune_float`` → ``compress(..., CompressConfig(exact_zero=True))`` →
    ``finetune``. Every floating-point parameter is trained (biases and normalisation parameters too unless
    ``train_bias`` / ``train_norm`` are False: both on by default here); for each ``masks`` entry the gradient is
    masked and the pruned positions are reset to 0 after every optimizer step.

    Args:
        model: a float model (typically the first result of :func:`udnc_fx.passes.prune.prune`), or DDP-wrapped.
        masks: ``{parameter fqn: bool tensor}`` (True = kept), as returned by ``prune``.
        data, loss_fn, options, **overrides: as for :func:`finetune`.

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        ConfigError: a mask names no parameter or has the wrong shape, or an option is invalid.
        PassError: as for :func:`finetune`.
        TypeError: a keyword argument that is no option.
    """
    options = merge_options(options, overrides, "finetune_float").with_verb_defaults(train_bias=True, train_norm=True)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"finetune_float() needs an nn.Module, got {type(model).__name__}")
    if not isinstance(masks, Mapping):
        raise ConfigError(f"masks must be a mapping {{parameter fqn: bool tensor}}, got {type(masks).__name__}")
    check_training_inputs(data, loss_fn, options)
    inner = unwrap_ddp(model)
    rules = _mask_rules(inner, masks)
    trainable = _float_trainables(inner, options)
    if not trainable:
        raise PassError("finetune_float() found no floating-point parameter to train")
    for rule in rules:
        rule.after_step()  # start from exact zeros at the pruned positions
    return run_training(
        model, data, loss_fn, trainable=trainable, rules=rules, options=options, desc="retraining kept weights"
    )

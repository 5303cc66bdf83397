"""The training loop behind :func:`~udnc_fx.passes.finetune.finetune` and
:func:`~udnc_fx.passes.finetune.finetune_float`, and the one options object they share.

The two verbs decide *what* trains (codewords with the average-gradient rule, or the kept float weights under
their masks) and hand this module the trainable parameters and their step rules; this module decides *how*:

- :class:`TrainOptions`: every training option, validated once (``ConfigError``);
- :func:`check_training_inputs`: the data and the loss the options cannot check;
- :func:`run_training`: the loop. Frozen parameters and modes are set and restored (:func:`_training_mode`); each
  step computes the loss (:func:`batch_loss`: the task loss, distillation or both), refuses a non-finite loss or
  gradient with the last good parameters restored, and applies the verb's rules after ``backward`` and after the
  optimizer step; each epoch may be scored by ``eval_fn`` and the best one kept;
- the helpers it is built from: batch handling, the distillation loss, optimizer and scheduler construction, and
  ``torch.distributed`` (DDP wrapping, the check that every rank holds the same compressed model).

Under ``torch.distributed`` (a process group with more than one rank) the model is wrapped in
``DistributedDataParallel``; DDP all-reduces gradients as means over ranks before the rules run, and the rules are
the same on every rank, so every rank ends with the same parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError, PassError
from ..param import DitheredLatticeParam
from ..progress import progress_bar
from .materialize import served_params

__all__ = [
    "TrainOptions", "FinetuneResult", "StepRule", "NORM_TYPES", "merge_options", "check_training_inputs",
    "run_training", "batch_loss", "distill_loss", "make_optimizer", "make_scheduler", "unwrap_ddp", "norm_param_ids",
    "eval_mode",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm (affine)
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULERS = ("cosine", "constant", None)
_DISTILL = ("kl", "mse")


# ----------------------------------------------------------------------------------------------------------------
# Options and results


def _check_number(name: str, value: Any, *, positive: bool = True, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise ConfigError(f"{name} must be {what} {'> 0' if positive else '>= 0'}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """How to train: one validated set of options for ``finetune`` and ``finetune_float``.

    Pass it as ``options=`` or give its fields as keyword arguments of either verb (keywords override the fields of
    ``options``). Invalid values raise ``ConfigError`` when the object is built.

    Attributes:
        epochs: passes over the data.
        lr: peak learning rate.
        optimizer: ``"adam"`` (default), ``"adamw"``, ``"sgd"`` (momentum 0.9) or ``factory(param_groups, lr)``.
        weight_decay: for the built-in optimizers (parameters a verb holds fixed are put back after every step).
        scheduler: ``"cosine"`` (default; to 0 over all steps), ``"constant"``/None, or
            ``factory(optimizer, total_steps) -> LRScheduler``. Stepped every batch when the number of batches is
            known (``len(data)`` or ``max_steps_per_epoch``), else once per epoch with ``total_steps = epochs``.
        train_bias: also train parameters named ``bias`` outside normalisation layers. None (default): the verb's
            default (``finetune``: False; ``finetune_float``: True).
        train_norm: also train normalisation layers' affine parameters (and let BatchNorm update its statistics);
            frozen normalisation layers run in eval mode. None (default): the verb's default, as for ``train_bias``.
        eval_fn: ``eval_fn(model) -> float`` called (in eval mode, without grad) before training and after every
            epoch; shown on the progress bar and recorded. Under DDP the value is averaged over ranks.
        keep: ``"best"`` (default): keep the parameters of the best epoch by ``eval_fn`` (epoch 0 = as given, so
            training never leaves the model worse on that metric); ``"last"``: the final ones. Without ``eval_fn``
            the last ones are kept.
        mode: ``"max"`` (higher metric is better, e.g. accuracy) or ``"min"`` (e.g. a loss).
        teacher: a float model to distil from: the loss becomes ``distill(student, teacher)`` (plus the task loss
            when one is given, the distillation term weighted by ``distill_weight``). It is run in eval mode without
            grad, on the model's device (moved there if needed; its train/eval mode is restored).
        distill: ``"kl"`` (KL divergence of softened logits, × temperature²), ``"mse"`` or a
            ``callable(student_outputs, teacher_outputs) -> scalar``.
        temperature: the softening temperature of ``"kl"``.
        distill_weight: the weight of the distillation term when a task loss is given too.
        max_steps_per_epoch: stop each epoch after this many batches.
        progress: a progress bar (rank 0 only, on a terminal only) with the running loss and the metric; a false
            value (False, None) draws none.
        ddp: ``"auto"`` wraps the model in DDP when a process group with more than one rank is initialised;
            ``False`` never; ``True`` requires one.
    """

    epochs: int = 5
    lr: float = 1e-3
    optimizer: str | Callable = "adam"
    weight_decay: float = 0.0
    scheduler: str | Callable | None = "cosine"
    train_bias: bool | None = None
    train_norm: bool | None = None
    eval_fn: Callable[[nn.Module], float] | None = None
    keep: str = "best"
    mode: str = "max"
    teacher: nn.Module | None = None
    distill: str | Callable = "kl"
    temperature: float = 1.0
    distill_weight: float = 1.0
    max_steps_per_epoch: int | None = None
    progress: bool | None = True
    ddp: str | bool = "auto"

    def __post_init__(self) -> None:
        _check_number("epochs", self.epochs, integer=True)
        _check_number("lr", self.lr)
        _check_number("weight_decay", self.weight_decay, positive=False)
        _check_number("temperature", self.temperature)
        _check_number("distill_weight", self.distill_weight, positive=False)
        if self.max_steps_per_epoch is not None:
            _check_number("max_steps_per_epoch", self.max_steps_per_epoch, integer=True)
        for name in ("train_bias", "train_norm"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name} must be True, False or None (the verb's default), got {value!r}")
        self._check_choices()
        if self.teacher is not None and not isinstance(self.teacher, nn.Module):
            raise ConfigError(f"teacher must be an nn.Module (the float model), got {type(self.teacher).__name__}")

    def _check_choices(self) -> None:
        if self.keep not in ("best", "last"):
            raise ConfigError(f"keep must be 'best' or 'last', got {self.keep!r}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' (higher metric is better) or 'min', got {self.mode!r}")
        if not (callable(self.optimizer) or self.optimizer in _OPTIMIZERS):
            raise ConfigError(
                f"optimizer must be one of {_OPTIMIZERS} or a factory(param_groups, lr), got {self.optimizer!r}"
            )
        if not (callable(self.scheduler) or self.scheduler in _SCHEDULERS):
            raise ConfigError(
                "scheduler must be 'cosine', 'constant', None or a factory(optimizer, total_steps), "
                f"got {self.scheduler!r}"
            )
        if not (callable(self.distill) or self.distill in _DISTILL):
            raise ConfigError(f"distill must be 'kl', 'mse' or a callable(student, teacher), got {self.distill!r}")
        if self.eval_fn is not None and not callable(self.eval_fn):
            raise ConfigError("eval_fn must be callable as eval_fn(model) -> float")
        if self.ddp not in ("auto", True, False):
            raise ConfigError(f"ddp must be 'auto', True or False, got {self.ddp!r}")

    def with_verb_defaults(self, *, train_bias: bool, train_norm: bool) -> TrainOptions:
        """These options with ``train_bias`` / ``train_norm`` left at None replaced by a verb's defaults."""
        return replace(
            self,
            train_bias=train_bias if self.train_bias is None else self.train_bias,
            train_norm=train_norm if self.train_norm is None else self.train_norm,
        )


_OPTION_NAMES = frozenset(f.name for f in fields(TrainOptions))


def merge_options(options: TrainOptions | None, overrides: Mapping[str, Any], verb: str) -> TrainOptions:
    """The options a verb runs with: ``options`` (or the defaults) with the keyword arguments ``overrides`` applied.

    Raises:
        TypeError: a keyword that is no option (as Python itself reports an unexpected keyword argument).
        ConfigError: ``options`` is not a :class:`TrainOptions`, or an option is invalid.
    """
    unknown = sorted(set(overrides) - _OPTION_NAMES)
    if unknown:
        raise TypeError(f"{verb}() got an unexpected keyword argument {unknown[0]!r}")
    if options is None:
        return TrainOptions(**overrides)
    if not isinstance(options, TrainOptions):
        raise ConfigError(f"options must be a TrainOptions, got {type(options).__name__}")
    return replace(options, **overrides) if overrides else options


@dataclass
class FinetuneResult:
    """What fine-tuning did.

    Attributes:
        model: the trained model (the one passed in, trained in place; unwrapped if it was wrapped in DDP here).
        history: one dict per epoch: ``epoch`` (0 = before training, only when ``eval_fn`` is given), ``loss``
            (mean training loss on this rank), ``metric`` (``eval_fn``'s value or None), ``lr`` (at the epoch's end),
            ``steps`` (optimizer steps so far).
        best_epoch, best_metric: the epoch whose parameters were kept and its metric (None without ``eval_fn``).
        kept: ``"best"`` or ``"last"``: which parameters the model holds now.
        steps: optimizer steps taken.
        distributed: world size when DDP was used, else 1.
    """

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    kept: str = "last"
    steps: int = 0
    distributed: int = 1


class StepRule(Protocol):
    """What a verb adds to every step: fix up the gradients, then fix up the parameters after the update."""

    def after_backward(self) -> None: ...

    def after_step(self) -> None: ...


def check_training_inputs(data: Any, loss_fn: Any, options: TrainOptions) -> None:
    """Refuse, with a ``ConfigError``, what would fail only mid-training: no loss, bad or empty data."""
    if loss_fn is None and options.teacher is None:
        raise ConfigError("give a loss_fn(outputs, targets), or a teacher model to distil from (or both)")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError("loss_fn must be callable as loss_fn(outputs, targets) -> scalar tensor")
    if data is None or isinstance(data, (str, bytes, torch.Tensor)) or not isinstance(data, Iterable):
        raise ConfigError(
            "data must be an iterable of (inputs, targets) batches, such as a torch DataLoader; "
            f"got {type(data).__name__}"
        )
    try:
        length = len(data)  # type: ignore[arg-type]
    except TypeError:
        length = None
    if length == 0:
        raise ConfigError("the data loader is empty: fine-tuning needs at least one batch")
    if isinstance(data, Iterator) and options.epochs > 1:
        raise ConfigError(
            "data is a one-shot iterator (a generator?) but epochs > 1: pass a re-iterable such as a DataLoader or "
            "a list of batches"
        )


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def norm_param_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter owned directly by a normalisation layer (:data:`NORM_TYPES`)."""
    return {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}


# ----------------------------------------------------------------------------------------------------------------
# Batches and losses


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _split_batch(batch: Any, bare_inputs_ok: bool) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1 and bare_inputs_ok:
            return batch[0], None
        raise ConfigError(
            f"a batch must be an (inputs, targets) pair; got a {type(batch).__name__} of {len(batch)} items"
        )
    if bare_inputs_ok:
        return batch, None
    raise ConfigError(f"a batch must be an (inputs, targets) pair; got {type(batch).__name__}")


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise PassError(f"distillation needs tensor outputs (or .logits); the model returned {type(out).__name__}")


def distill_loss(kind: str | Callable, student: Any, teacher: Any, temperature: float) -> torch.Tensor:
    """The distillation term: ``kind(student, teacher)`` for a callable, else MSE or temperature-scaled KL of the
    logits (tensors, ``.logits`` or the first element of a tuple)."""
    if callable(kind):
        return kind(student, teacher)
    s, t = _logits(student), _logits(teacher).detach()
    if kind == "mse":
        return F.mse_loss(s, t)
    s = F.log_softmax(s.float() / temperature, dim=-1)
    t = F.log_softmax(t.float() / temperature, dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), reduction="batchmean", log_target=True) * temperature**2


def batch_loss(net: nn.Module, batch: Any, loss_fn: Callable | None, options: TrainOptions,
               device: torch.device) -> torch.Tensor:
    """The loss of one batch: ``loss_fn(outputs, targets)``, the distillation term against ``options.teacher``, or
    their weighted sum. A batch is ``(inputs, targets)``, or bare inputs when distilling without ``loss_fn``.

    Raises:
        ConfigError: a batch of the wrong shape.
        PassError: the loss is not a scalar tensor.
    """
    teacher = options.teacher
    inputs, targets = _split_batch(batch, bare_inputs_ok=teacher is not None and loss_fn is None)
    inputs, targets = _to_device(inputs, device), _to_device(targets, device)
    out = _call(net, inputs)
    loss = None
    if loss_fn is not None:
        loss = loss_fn(out, targets)
    if teacher is not None:
        with torch.no_grad():
            teacher_out = _call(teacher, inputs)
        d = distill_loss(options.distill, out, teacher_out, options.temperature)
        loss = d if loss is None else loss + options.distill_weight * d
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise PassError(f"the loss must be a scalar tensor, got {type(loss).__name__}")
    return loss


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(kind: str | Callable, groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer named by ``kind`` (Adam, AdamW, SGD with momentum 0.9), or ``kind(groups, lr)``."""
    if callable(kind):
        return kind(groups, lr)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


def make_scheduler(kind: str | Callable | None, optimizer: torch.optim.Optimizer, total: int):
    """A cosine decay to 0 over ``total`` steps, ``kind(optimizer, total)``, or None for a constant rate."""
    if callable(kind):
        return kind(optimizer, total)
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
        )
    return None


def _steps_per_epoch(data: Any, cap: int | None) -> int | None:
    """Batches per epoch when known (``len(data)``, capped), else None: the schedule then steps per epoch."""
    try:
        per_epoch = len(data)
    except TypeError:
        per_epoch = None
    if cap is not None:
        per_epoch = cap if per_epoch is None else min(per_epoch, cap)
    return per_epoch


# ----------------------------------------------------------------------------------------------------------------
# torch.distributed


def _dist_state() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_world_size(), dist.get_rank()
    return False, 1, 0


def _all_reduce(value: torch.Tensor, op: str) -> torch.Tensor:
    import torch.distributed as dist

    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    dist.all_reduce(value, op=ops[op])
    return value


def _ddp_plan(ddp: str | bool) -> tuple[bool, int, int]:
    """(use DDP, world size, rank) for the ``ddp`` option and the current process group."""
    initialised, world, rank = _dist_state()
    use_ddp = (ddp is True or ddp == "auto") and initialised and world > 1
    if ddp is True and not initialised:
        raise ConfigError("ddp=True but torch.distributed is not initialised (call init_process_group, or torchrun)")
    return use_ddp, world, rank


def _check_same_model_on_ranks(dlps: list[DitheredLatticeParam], device: torch.device) -> None:
    """Every rank must hold the same compressed model (indices, codebook size, dither key), or DDP would average
    gradients of unrelated codewords."""
    rows = []
    for dlp in dlps:
        idx = dlp.indices.long()
        weights = torch.arange(idx.numel(), device=idx.device) % 65521 + 1
        rows.append(
            [float((idx * weights).sum()), float(dlp.num_codewords), float((dlp.key or 0) % 2**40), float(idx.numel())]
        )
    local = torch.tensor(rows, dtype=torch.float64, device=device).reshape(-1)
    lo, hi = _all_reduce(local.clone(), "min"), _all_reduce(local.clone(), "max")
    if not torch.equal(lo, hi):
        raise PassError(
            "the ranks hold different compressed models (indices, codebook sizes or dither keys differ): compress "
            "the same model with the same config (seed) on every rank, or load the same container"
        )


def _wrap_ddp(model: nn.Module, device: torch.device, prewrapped: nn.Module | None) -> nn.Module:
    # Indices and the cached dither are identical on every rank by construction (checked above): keep DDP from
    # broadcasting them at every forward. Running statistics of normalisation layers are still broadcast.
    ignore = [
        f"{fqn}.{name}" if fqn else name
        for fqn, module in model.named_modules()
        if isinstance(module, DitheredLatticeParam)
        for name in ("indices", "_dither_cache")
    ]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    kwargs: dict[str, Any] = {}
    if prewrapped is not None:
        kwargs["process_group"] = getattr(prewrapped, "process_group", None)
        kwargs["broadcast_buffers"] = getattr(prewrapped, "broadcast_buffers", True)
        kwargs["device_ids"] = getattr(prewrapped, "device_ids", None)
    elif device.type == "cuda":
        kwargs["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, **kwargs)


def _network(inner: nn.Module, device: torch.device, prewrapped: nn.Module | None, use_ddp: bool) -> nn.Module:
    """The module the steps run: ``inner``, or ``inner`` wrapped in DDP (after the same-model check)."""
    dlps = served_params(inner)
    for dlp in dlps:
        dlp.dither()  # regenerate (and cache) once, not inside the first timed step
    if not use_ddp:
        return inner
    if dlps:
        _check_same_model_on_ranks(dlps, device)
    return _wrap_ddp(inner, device, prewrapped)


# ----------------------------------------------------------------------------------------------------------------
# The loop


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode; every submodule's own train/eval mode restored on exit."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.train(was)


@contextmanager
def _training_mode(inner: nn.Module, trainable: list[nn.Parameter], options: TrainOptions, device: torch.device):
    """Only ``trainable`` requires grad, the model is in train mode (frozen normalisation layers in eval mode, so
    their running statistics stay), the teacher in eval mode on ``device``; flags and modes restored on exit."""
    saved_requires_grad = [(p, p.requires_grad) for p in inner.parameters()]
    saved_training = [(m, m.training) for m in inner.modules()]
    teacher = options.teacher
    teacher_training = teacher.training if teacher is not None else None
    trainable_ids = {id(p) for p in trainable}
    try:
        for p in inner.parameters():
            p.requires_grad_(id(p) in trainable_ids)
        inner.train()
        for m in inner.modules():
            if isinstance(m, NORM_TYPES) and not options.train_norm:
                m.eval()
        if teacher is not None:
            teacher.eval()
            teacher.to(device)
        yield
    finally:
        for p, flag in saved_requires_grad:
            p.requires_grad_(flag)
        for m, flag in saved_training:
            m.train(flag)
        if teacher is not None and teacher_training is not None:
            teacher.train(teacher_training)


class _State:
    """The tensors that make up "the trained state": the trainable parameters and the running statistics that
    move. Copies of it are the last good parameters (restored on a non-finite loss) and the best epoch's."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors

    def copy(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def save(self, into: list[torch.Tensor]) -> None:
        for dst, src in zip(into, self.tensors):
            dst.copy_(src)

    @torch.no_grad()
    def restore(self, source: list[torch.Tensor]) -> None:
        for dst, src in zip(self.tensors, source):
            dst.copy_(src)


class _Loop:
    """One training run: the optimizer, the schedule, the state copies and the result being filled in."""

    def __init__(self, model, data, loss_fn, *, trainable, rules, options: TrainOptions, desc: str):
        prewrapped = model if isinstance(model, DistributedDataParallel) else None
        self.inner = unwrap_ddp(model)
        self.use_ddp, self.world, self.rank = _ddp_plan(options.ddp)
        self.device = next((p.device for p in trainable), None) or next(self.inner.parameters()).device
        self.data, self.loss_fn, self.options, self.desc = data, loss_fn, options, desc
        self.trainable, self.rules, self.prewrapped = trainable, rules, prewrapped
        self.steps = 0
        self.result = FinetuneResult(model=self.inner, distributed=self.world if self.use_ddp else 1)

    def setup(self) -> None:
        """What needs the training mode in place: the state, the network (DDP), the optimizer and the schedule."""
        moving_buffers = [
            b for m in self.inner.modules()
            if isinstance(m, NORM_TYPES) and self.options.train_norm for b in m.buffers(recurse=False)
        ]
        self.state = _State(self.trainable + moving_buffers)
        self.good = self.state.copy()
        self.best: list[torch.Tensor] | None = None
        self.net = _network(self.inner, self.device, self.prewrapped, self.use_ddp)
        opts = self.options
        self.optimizer = make_optimizer(opts.optimizer, [{"params": self.trainable}], opts.lr, opts.weight_decay)
        per_epoch = _steps_per_epoch(self.data, opts.max_steps_per_epoch)
        self.per_step = per_epoch is not None
        self.total = opts.epochs * per_epoch if self.per_step else opts.epochs
        self.scheduler = make_scheduler(opts.scheduler, self.optimizer, self.total)

    def evaluate(self) -> float | None:
        """``eval_fn(model)`` in eval mode without grad (averaged over ranks under DDP); None without ``eval_fn``."""
        if self.options.eval_fn is None:
            return None
        with eval_mode(self.inner), torch.no_grad():
            value = float(self.options.eval_fn(self.inner))
        if self.use_ddp:
            total = _all_reduce(torch.tensor([value], dtype=torch.float64, device=self.device), "sum")
            value = float(total) / self.world
        return value

    def record(self, epoch: int, loss: float | None, metric: float | None, lr: float) -> None:
        """Append the epoch to the history; keep a copy of the state if its metric is the best so far."""
        self.result.history.append({"epoch": epoch, "loss": loss, "metric": metric, "lr": lr, "steps": self.steps})
        if metric is None:
            return
        old = self.result.best_metric
        if epoch == 0 or old is None or (metric > old if self.options.mode == "max" else metric < old):
            self.result.best_epoch, self.result.best_metric = epoch, metric
            self.best = self.state.copy()

    def step(self, batch: Any, epoch: int, index: int) -> torch.Tensor:
        """One optimizer step on one batch, with the verb's rules; a non-finite loss or gradient restores the last
        good state and raises ``PassError``."""
        loss = batch_loss(self.net, batch, self.loss_fn, self.options, self.device)
        finite = torch.isfinite(loss.detach()).to(torch.float64).reshape(1)
        if self.use_ddp:
            finite = _all_reduce(finite, "min")  # every rank stops together
        if not bool(finite):
            self.state.restore(self.good)
            raise PassError(
                f"the loss is not finite ({loss.item()}) at epoch {epoch}, step {index}"
                + (" on some rank" if self.use_ddp else "")
                + ": stopped, and the parameters were restored to the last ones that gave a finite loss "
                "(lower lr, or check the data and loss_fn)"
            )
        self.state.save(self.good)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for rule in self.rules:
            rule.after_backward()
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.trainable):
            self.state.restore(self.good)
            raise PassError(
                f"non-finite gradients at epoch {epoch}, step {index}: stopped, and the parameters "
                "were restored to the last ones that gave a finite loss (lower lr, or check the model)"
            )
        self.optimizer.step()
        for rule in self.rules:
            rule.after_step()
        if self.scheduler is not None and self.per_step:
            self.scheduler.step()
        return loss

    def run_epoch(self, epoch: int, bar, metric: float | None) -> float:
        """One pass over the data; returns the mean loss. Raises ``PassError`` when the data yields no batch."""
        sampler = getattr(self.data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        cap = self.options.max_steps_per_epoch
        loss_sum, batches = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for batch in self.data:
            if cap is not None and batches >= cap:
                break
            loss = self.step(batch, epoch, batches + 1)
            self.steps += 1
            batches += 1
            loss_sum += loss.detach().to(torch.float64)  # no host sync per step (GPU)
            bar.update(1)
            if not bar.disable:
                bar.set_postfix(
                    epoch=epoch,
                    loss=f"{float(loss_sum) / batches:.4f}",
                    **({} if metric is None else {"metric": f"{metric:.4g}"}),
                )
        if batches == 0:
            if self.steps == 0:
                raise PassError("the data loader yielded no batches: nothing was trained (the model is unchanged)")
            raise PassError(
                f"the data yielded no batches in epoch {epoch}: pass a re-iterable (a DataLoader or a list), "
                "not a one-shot iterator"
            )
        if self.scheduler is not None and not self.per_step:
            self.scheduler.step()
        return float(loss_sum) / batches

    def run(self) -> FinetuneResult:
        """Evaluate, train every epoch, then keep the best or the last state."""
        metric = self.evaluate()
        if metric is not None:
            self.record(0, None, metric, self.options.lr)
        # progress=True means "on a terminal only" (a log gets no redraws); rank 0 draws for everyone
        bar = progress_bar(
            total=self.total if self.per_step else None,
            desc=self.desc,
            unit="step",
            progress=None if self.options.progress and self.rank == 0 else False,
        )
        try:
            for epoch in range(1, self.options.epochs + 1):
                epoch_loss = self.run_epoch(epoch, bar, metric)
                metric = self.evaluate()
                if metric is not None:
                    bar.set_postfix(epoch=epoch, loss=f"{epoch_loss:.4f}", metric=f"{metric:.4g}")
                self.record(epoch, epoch_loss, metric, self.optimizer.param_groups[0]["lr"])
        finally:
            bar.close()
        return self.finish()

    def finish(self) -> FinetuneResult:
        result = self.result
        result.steps = self.steps
        if self.options.keep == "best" and self.best is not None:
            self.state.restore(self.best)
            result.kept = "best"
        else:
            result.kept = "last"
            if self.options.eval_fn is not None:
                result.best_epoch, result.best_metric = result.history[-1]["epoch"], result.history[-1]["metric"]
        return result


def run_training(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    *,
    trainable: list[nn.Parameter],
    rules: list[StepRule],
    options: TrainOptions,
    desc: str,
) -> FinetuneResult:
    """Train ``trainable`` in place on ``data``; everything else in ``model`` stays frozen.

    Args:
        model: the model, possibly wrapped in ``DistributedDataParallel`` (re-wrapped after freezing).
        data: a re-iterable of batches (checked by :func:`check_training_inputs`).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, or None when ``options.teacher`` is given.
        trainable: the parameters to train.
        rules: applied after every backward pass and after every optimizer step, in order.
        options: the options, with ``train_bias``/``train_norm`` already resolved
            (:meth:`TrainOptions.with_verb_defaults`).
        desc: the progress bar's label.

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        ConfigError: ``ddp=True`` without a process group; a batch of the wrong shape.
        PassError: no batch; a non-finite loss or gradient (the last good parameters are restored); under DDP,
            ranks holding different compressed models.
    """
    loop = _Loop(model, data, loss_fn, trainable=trainable, rules=rules, options=options, desc=desc)
    with _training_mode(loop.inner, trainable, options, loop.device):
        loop.setup()
        return loop.run()

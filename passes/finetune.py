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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, PassError
from ..param import DitheredLatticeParam
from .materialize import served_params

__all__ = [
    "finetune",
    "finetune_float",
    "FinetuneResult",
    "average_codeword_gradients",
    "NORM_TYPES",
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
# Validation and helpers


def _check_number(name: str, value: Any, *, positive: bool = True, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise ConfigError(f"{name} must be {what} {'> 0' if positive else '>= 0'}, got {value!r}")


def _check_options(data, loss_fn, teacher, opts: dict) -> None:
    _check_number("epochs", opts["epochs"], integer=True)
    _check_number("lr", opts["lr"])
    _check_number("weight_decay", opts["weight_decay"], positive=False)
    _check_number("temperature", opts["temperature"])
    _check_number("distill_weight", opts["distill_weight"], positive=False)
    if opts["max_steps_per_epoch"] is not None:
        _check_number("max_steps_per_epoch", opts["max_steps_per_epoch"], integer=True)
    if opts["keep"] not in ("best", "last"):
        raise ConfigError(f"keep must be 'best' or 'last', got {opts['keep']!r}")
    if opts["mode"] not in ("max", "min"):
        raise ConfigError(f"mode must be 'max' (higher metric is better) or 'min', got {opts['mode']!r}")
    if not (callable(opts["optimizer"]) or opts["optimizer"] in _OPTIMIZERS):
        raise ConfigError(
            f"optimizer must be one of {_OPTIMIZERS} or a factory(param_groups, lr), got {opts['optimizer']!r}"
        )
    if not (callable(opts["scheduler"]) or opts["scheduler"] in _SCHEDULERS):
        raise ConfigError(
            "scheduler must be 'cosine', 'constant', None or a factory(optimizer, total_steps), "
            f"got {opts['scheduler']!r}"
        )
    if not (callable(opts["distill"]) or opts["distill"] in _DISTILL):
        raise ConfigError(f"distill must be 'kl', 'mse' or a callable(student, teacher), got {opts['distill']!r}")
    if opts["eval_fn"] is not None and not callable(opts["eval_fn"]):
        raise ConfigError("eval_fn must be callable as eval_fn(model) -> float")
    if opts["ddp"] not in ("auto", True, False):
        raise ConfigError(f"ddp must be 'auto', True or False, got {opts['ddp']!r}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher must be an nn.Module (the float model), got {type(teacher).__name__}")
    if loss_fn is None and teacher is None:
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
    if isinstance(data, Iterator) and opts["epochs"] > 1:
        raise ConfigError(
            "data is a one-shot iterator (a generator?) but epochs > 1: pass a re-iterable such as a DataLoader or "
            "a list of batches"
        )


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


def _distill_loss(kind, student: Any, teacher: Any, temperature: float) -> torch.Tensor:
    if callable(kind):
        return kind(student, teacher)
    s, t = _logits(student), _logits(teacher).detach()
    if kind == "mse":
        return F.mse_loss(s, t)
    s = F.log_softmax(s.float() / temperature, dim=-1)
    t = F.log_softmax(t.float() / temperature, dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), reduction="batchmean", log_target=True) * temperature**2


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
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Indices and the cached dither are identical on every rank by construction (checked above): keep DDP from
    # broadcasting them at every forward. Running statistics of normalisation layers are still broadcast.
    ignore = [
        f"{fqn}.{name}" if fqn else name
        for fqn, module in model.named_modules()
        if isinstance(module, DitheredLatticeParam)
        for name in ("indices", "_dither_cache")
    ]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    kwargs: dict[str, Any] = {}
    if prewrapped is not None:
        kwargs["process_group"] = getattr(prewrapped, "process_group", None)
        kwargs["broadcast_buffers"] = getattr(prewrapped, "broadcast_buffers", True)
        kwargs["device_ids"] = getattr(prewrapped, "device_ids", None)
    elif device.type == "cuda":
        kwargs["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
    return DDP(model, **kwargs)


def _make_optimizer(kind, groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if callable(kind):
        return kind(groups, lr)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


def _make_scheduler(kind, optimizer: torch.optim.Optimizer, total: int):
    if callable(kind):
        return kind(optimizer, total)
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
        )
    return None


def _norm_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}


# ----------------------------------------------------------------------------------------------------------------
# The training loop shared by both modes


def _train(
    model: nn.Module,
    data,
    loss_fn,
    *,
    trainable: list[nn.Parameter],
    rules: list,
    teacher: nn.Module | None,
    train_norm: bool,
    opts: dict,
    desc: str,
) -> FinetuneResult:
    ddp_pkg = torch.nn.parallel.DistributedDataParallel
    prewrapped = model if isinstance(model, ddp_pkg) else None
    inner = model.module if prewrapped is not None else model
    initialised, world, rank = _dist_state()
    use_ddp = (opts["ddp"] is True or opts["ddp"] == "auto") and initialised and world > 1
    if opts["ddp"] is True and not initialised:
        raise ConfigError("ddp=True but torch.distributed is not initialised (call init_process_group, or torchrun)")
    device = next((p.device for p in trainable), None) or next(inner.parameters()).device

    saved_requires_grad = {id(p): (p, p.requires_grad) for p in inner.parameters()}
    saved_training = {id(m): (m, m.training) for m in inner.modules()}
    teacher_training = teacher.training if teacher is not None else None
    trainable_ids = {id(p) for p in trainable}
    try:
        for p in inner.parameters():
            p.requires_grad_(id(p) in trainable_ids)
        inner.train()
        for m in inner.modules():
            if isinstance(m, NORM_TYPES) and not train_norm:
                m.eval()  # frozen normalisation: its running statistics stay as they are
        if teacher is not None:
            teacher.eval()
            teacher.to(device)

        # What "last good state" means: the trainable parameters and the running statistics that move.
        moving_buffers = [
            b for m in inner.modules() if isinstance(m, NORM_TYPES) and train_norm for b in m.buffers(recurse=False)
        ]
        state = trainable + moving_buffers
        good = [t.detach().clone() for t in state]

        def save(into: list[torch.Tensor]) -> None:
            with torch.no_grad():
                for dst, src in zip(into, state):
                    dst.copy_(src)

        def restore(source: list[torch.Tensor]) -> None:
            with torch.no_grad():
                for dst, src in zip(state, source):
                    dst.copy_(src)

        dlps = served_params(inner)
        for dlp in dlps:
            dlp.dither()  # regenerate (and cache) once, not inside the first timed step
        if use_ddp:
            if dlps:
                _check_same_model_on_ranks(dlps, device)
            net = _wrap_ddp(inner, device, prewrapped)
        else:
            net = inner

        groups = [{"params": trainable}]
        optimizer = _make_optimizer(opts["optimizer"], groups, opts["lr"], opts["weight_decay"])
        try:
            per_epoch = len(data)
        except TypeError:
            per_epoch = None
        if opts["max_steps_per_epoch"] is not None:
            cap = opts["max_steps_per_epoch"]
            per_epoch = cap if per_epoch is None else min(per_epoch, cap)
        per_step = per_epoch is not None
        total = opts["epochs"] * per_epoch if per_step else opts["epochs"]
        scheduler = _make_scheduler(opts["scheduler"], optimizer, total)

        eval_fn, keep = opts["eval_fn"], opts["keep"]

        def better(new: float, old: float | None) -> bool:
            if old is None:
                return True
            return new > old if opts["mode"] == "max" else new < old
        result = FinetuneResult(model=inner, distributed=world if use_ddp else 1)

        def evaluate() -> float | None:
            if eval_fn is None:
                return None
            modes = [(m, m.training) for m in inner.modules()]
            inner.eval()
            try:
                with torch.no_grad():
                    value = float(eval_fn(inner))
            finally:
                for m, was in modes:
                    m.train(was)
            if use_ddp:
                value = float(_all_reduce(torch.tensor([value], dtype=torch.float64, device=device), "sum")) / world
            return value

        best_state = None
        metric = evaluate()
        if metric is not None:
            result.history.append({"epoch": 0, "loss": None, "metric": metric, "lr": opts["lr"], "steps": 0})
            result.best_epoch, result.best_metric = 0, metric
            best_state = [t.detach().clone() for t in state]

        from ..progress import progress_bar

        # progress=True means "on a terminal only" (a log gets no redraws); rank 0 draws for everyone
        bar = progress_bar(
            total=total if per_step else None,
            desc=desc,
            unit="step",
            progress=None if opts["progress"] and rank == 0 else False,
        )
        steps = 0
        try:
            for epoch in range(1, opts["epochs"] + 1):
                sampler = getattr(data, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                loss_sum, batches = torch.zeros((), dtype=torch.float64, device=device), 0
                for batch in data:
                    if opts["max_steps_per_epoch"] is not None and batches >= opts["max_steps_per_epoch"]:
                        break
                    inputs, targets = _split_batch(batch, bare_inputs_ok=teacher is not None and loss_fn is None)
                    inputs, targets = _to_device(inputs, device), _to_device(targets, device)
                    out = _call(net, inputs)
                    loss = None
                    if loss_fn is not None:
                        loss = loss_fn(out, targets)
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_out = _call(teacher, inputs)
                        d = _distill_loss(opts["distill"], out, teacher_out, opts["temperature"])
                        loss = d if loss is None else loss + opts["distill_weight"] * d
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise PassError(f"the loss must be a scalar tensor, got {type(loss).__name__}")
                    finite = torch.isfinite(loss.detach()).to(torch.float64).reshape(1)
                    if use_ddp:
                        finite = _all_reduce(finite, "min")
                    if not bool(finite):
                        restore(good)
                        raise PassError(
                            f"the loss is not finite ({loss.item()}) at epoch {epoch}, step {batches + 1}"
                            + (" on some rank" if use_ddp else "")
                            + ": stopped, and the parameters were restored to the last ones that gave a finite loss "
                            "(lower lr, or check the data and loss_fn)"
                        )
                    save(good)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    for rule in rules:
                        rule.after_backward()
                    bad = [p for p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
                    if bad:
                        restore(good)
                        raise PassError(
                            f"non-finite gradients at epoch {epoch}, step {batches + 1}: stopped, and the parameters "
                            "were restored to the last ones that gave a finite loss (lower lr, or check the model)"
                        )
                    optimizer.step()
                    for rule in rules:
                        rule.after_step()
                    if scheduler is not None and per_step:
                        scheduler.step()
                    steps += 1
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
                    if steps == 0:
                        raise PassError(
                            "the data loader yielded no batches: nothing was trained (the model is unchanged)"
                        )
                    raise PassError(
                        f"the data yielded no batches in epoch {epoch}: pass a re-iterable (a DataLoader or a list), "
                        "not a one-shot iterator"
                    )
                if scheduler is not None and not per_step:
                    scheduler.step()
                metric = evaluate()
                epoch_loss = float(loss_sum) / batches
                if metric is not None:
                    bar.set_postfix(epoch=epoch, loss=f"{epoch_loss:.4f}", metric=f"{metric:.4g}")
                result.history.append(
                    {
                        "epoch": epoch,
                        "loss": epoch_loss,
                        "metric": metric,
                        "lr": optimizer.param_groups[0]["lr"],
                        "steps": steps,
                    }
                )
                if metric is not None and better(metric, result.best_metric):
                    result.best_epoch, result.best_metric = epoch, metric
                    best_state = [t.detach().clone() for t in state]
        finally:
            bar.close()

        result.steps = steps
        if keep == "best" and best_state is not None:
            restore(best_state)
            result.kept = "best"
        else:
            result.kept = "last"
            if eval_fn is not None:
                result.best_epoch, result.best_metric = result.history[-1]["epoch"], result.history[-1]["metric"]
        return result
    finally:
        for p, flag in saved_requires_grad.values():
            p.requires_grad_(flag)
        for m, flag in saved_training.values():
            m.train(flag)
        if teacher is not None and teacher_training is not None:
            teacher.train(teacher_training)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


def finetune(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    optimizer: str | Callable = "adam",
    weight_decay: float = 0.0,
    scheduler: str | Callable | None = "cosine",
    train_bias: bool = False,
    train_norm: bool = False,
    eval_fn: Callable[[nn.Module], float] | None = None,
    keep: str = "best",
    mode: str = "max",
    teacher: nn.Module | None = None,
    distill: str | Callable = "kl",
    temperature: float = 1.0,
    distill_weight: float = 1.0,
    grad_rule: str = "average",
    max_steps_per_epoch: int | None = None,
    progress: bool = True,
    ddp: str | bool = "auto",
) -> FinetuneResult:
    """Fine-tune the codebooks of a compressed model in place; indices and dither stay fixed.

    Before: ``W = C[k] − Δ·U`` with ``C`` = Δ·(lattice points).  After: the same ``k`` and ``U``, trained ``C``.

    Each codeword moves by the average gradient of the weights mapped to it (``grad_rule="average"``, the paper's
    rule; ``"sum"`` is plain autograd). Codewords no weight uses and the exact-zero codeword (pruned weights) stay
    fixed. Everything else is frozen unless ``train_bias`` / ``train_norm``; frozen normalisation layers are put in
    eval mode (running statistics unchanged). ``requires_grad`` flags and train/eval modes are restored afterwards.

    Args:
        model: a compressed model (``udnc_fx.compress``), possibly wrapped in ``DistributedDataParallel``.
        data: a re-iterable of ``(inputs, targets)`` batches, e.g. a ``DataLoader``; ``inputs`` is a tensor, a
            tuple (positional args) or a dict (keyword args). With ``teacher`` and no ``loss_fn``, batches may be
            bare inputs (labels are not needed).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; optional with ``teacher``.
        epochs: passes over ``data``.
        lr: peak learning rate.
        optimizer: ``"adam"`` (default), ``"adamw"``, ``"sgd"`` (momentum 0.9) or ``factory(param_groups, lr)``.
        weight_decay: for the built-in optimizers (frozen codewords are put back after every step regardless).
        scheduler: ``"cosine"`` (default; to 0 over all steps), ``"constant"``/None, or
            ``factory(optimizer, total_steps) -> LRScheduler``. Stepped every batch when the number of batches is
            known (``len(data)`` or ``max_steps_per_epoch``), else once per epoch with ``total_steps = epochs``.
        train_bias: also train every parameter named ``bias`` outside normalisation layers.
        train_norm: also train normalisation layers' affine parameters (and let BatchNorm update its statistics).
        eval_fn: ``eval_fn(model) -> float`` called (in eval mode, without grad) before training and after every
            epoch; shown on the progress bar and recorded. Under DDP the value is averaged over ranks.
        keep: ``"best"`` (default): keep the parameters of the best epoch by ``eval_fn`` (epoch 0 = as compressed,
            so fine-tuning never leaves the model worse on that metric); ``"last"``: the final ones. Without
            ``eval_fn`` the last ones are kept.
        mode: ``"max"`` (higher metric is better, e.g. accuracy) or ``"min"`` (e.g. a loss).
        teacher: the original float model to distil from: the loss becomes ``distill(student, teacher)`` (plus
            ``loss_fn`` when given, the distillation term weighted by ``distill_weight``). It is run in eval mode
            without grad, on the model's device (moved there if needed; its train/eval mode is restored).
        distill: ``"kl"`` (KL divergence of softened logits, × temperature²), ``"mse"`` or a callable.
        grad_rule: ``"average"`` (default) or ``"sum"``.
        max_steps_per_epoch: stop each epoch after this many batches.
        progress: a progress bar (rank 0 only, on a terminal only) with the running loss and the metric.
        ddp: ``"auto"`` wraps the model in DDP when a process group with more than one rank is initialised;
            ``False`` never; ``True`` requires one.

    Returns:
        A :class:`FinetuneResult` (the model, per-epoch history, best epoch and metric).

    Raises:
        PassError: the model has no ``DitheredLatticeParam``; the data yielded no batch; the loss or the gradients
            became NaN/Inf (training stops and the last parameters that gave a finite loss are restored); under
            DDP, the ranks hold different compressed models.
        ConfigError: an invalid option, an empty data loader (``len(data) == 0``), or no loss and no teacher.
    """
    opts = dict(
        epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay, scheduler=scheduler, eval_fn=eval_fn,
        keep=keep, mode=mode, distill=distill, temperature=temperature, distill_weight=distill_weight,
        max_steps_per_epoch=max_steps_per_epoch, progress=progress, ddp=ddp,
    )
    if grad_rule not in ("average", "sum"):
        raise ConfigError(f"grad_rule must be 'average' (the paper's) or 'sum', got {grad_rule!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"finetune() needs a compressed nn.Module, got {type(model).__name__}")
    _check_options(data, loss_fn, teacher, opts)
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    dlps = served_params(inner)
    if not dlps:
        raise PassError(
            "finetune() found no DitheredLatticeParam in the model: compress it first (udnc_fx.compress), or use "
            "finetune_float() to train a float model"
        )
    rules: list = [_CodebookRule(dlp, grad_rule) for dlp in dlps]
    trainable: list[nn.Parameter] = [dlp.codebook for dlp in dlps]
    seen = {id(p) for p in trainable}
    norm_ids = _norm_param_ids(inner)
    for name, p in inner.named_parameters():
        if id(p) in seen or not p.dtype.is_floating_point:
            continue
        is_norm = id(p) in norm_ids
        if (train_norm and is_norm) or (train_bias and not is_norm and name.rsplit(".", 1)[-1] == "bias"):
            trainable.append(p)
            seen.add(id(p))
    return _train(
        model, data, loss_fn, trainable=trainable, rules=rules, teacher=teacher, train_norm=train_norm, opts=opts,
        desc="fine-tuning codewords",
    )


def finetune_float(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    optimizer: str | Callable = "adam",
    weight_decay: float = 0.0,
    scheduler: str | Callable | None = "cosine",
    train_bias: bool = True,
    train_norm: bool = True,
    eval_fn: Callable[[nn.Module], float] | None = None,
    keep: str = "best",
    mode: str = "max",
    teacher: nn.Module | None = None,
    distill: str | Callable = "kl",
    temperature: float = 1.0,
    distill_weight: float = 1.0,
    max_steps_per_epoch: int | None = None,
    progress: bool = True,
    ddp: str | bool = "auto",
) -> FinetuneResult:
    """Retrain the kept float weights of a pruned model in place; pruned weights stay exactly 0.

    The paper's pipeline: ``prune`` → ``finetune_float`` → ``compress(..., CompressConfig(exact_zero=True))`` →
    ``finetune``. Every floating-point parameter is trained (biases and normalisation parameters unless
    ``train_bias`` / ``train_norm`` are False); for each ``masks`` entry the gradient is masked and the pruned
    positions are reset to 0 after every optimizer step.

    Args:
        model: a float model (typically the first result of :func:`udnc_fx.passes.prune.prune`), or DDP-wrapped.
        masks: ``{parameter fqn: bool tensor}`` (True = kept), as returned by ``prune``.
        Other arguments: as for :func:`finetune`.

    Raises:
        ConfigError: a mask names no parameter or has the wrong shape, or an option is invalid.
        PassError: as for :func:`finetune`.
    """
    opts = dict(
        epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay, scheduler=scheduler, eval_fn=eval_fn,
        keep=keep, mode=mode, distill=distill, temperature=temperature, distill_weight=distill_weight,
        max_steps_per_epoch=max_steps_per_epoch, progress=progress, ddp=ddp,
    )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"finetune_float() needs an nn.Module, got {type(model).__name__}")
    if not isinstance(masks, Mapping):
        raise ConfigError(f"masks must be a mapping {{parameter fqn: bool tensor}}, got {type(masks).__name__}")
    _check_options(data, loss_fn, teacher, opts)
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    params = dict(inner.named_parameters(remove_duplicate=False))
    rules: list = []
    for fqn, mask in masks.items():
        if fqn not in params:
            raise ConfigError(f"mask {fqn!r} names no parameter of the model")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(params[fqn].shape):
            raise ConfigError(
                f"mask {fqn!r} must be a bool tensor of shape {tuple(params[fqn].shape)}, got "
                f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
        rules.append(_MaskRule(params[fqn], mask))
    norm_ids = _norm_param_ids(inner)
    trainable, seen = [], set()
    for name, p in inner.named_parameters():
        if id(p) in seen or not p.dtype.is_floating_point:
            continue
        is_norm = id(p) in norm_ids
        if is_norm and not train_norm:
            continue
        if not is_norm and not train_bias and name.rsplit(".", 1)[-1] == "bias":
            continue
        trainable.append(p)
        seen.add(id(p))
    if not trainable:
        raise PassError("finetune_float() found no floating-point parameter to train")
    for rule in rules:
        rule.after_step()  # start from exact zeros at the pruned positions
    return _train(
        model, data, loss_fn, trainable=trainable, rules=rules, teacher=teacher, train_norm=train_norm, opts=opts,
        desc="retraining kept weights",
    )

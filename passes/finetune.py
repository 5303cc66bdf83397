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

**Table or affine correction** (issue 12): trained codewords are off the lattice, so a file must store them as a
float table (``K × n`` floats), which for the vector lattices costs as much as the indices. After training,
:func:`choose_codebooks` decides per layer between that table and the integer lattice points under a per-layer
affine correction ``float32(float32(a·p) + b)`` (``a``, ``b`` fitted to the trained codewords by usage-weighted
least squares; :func:`udnc_fx.record.codebook_from_int`), measuring both entries' real coded bytes and how much of
the training's move the correction keeps; the choice is kept on each parameter (``codebook_choice``) and shown by
``inspect``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coding.format import canonical_json
from ..coding.entries import entry_from_record
from ..coding.header import compact_codebook
from ..coding.payload import encode_quantized
from ..errors import ConfigError, PassError
from ..param import DitheredLatticeParam
from ..record import CompressedWeight, apply_affine, codebook_from_int, on_lattice
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
    "fit_affine",
    "choose_codebooks",
    "CODEBOOK_FORMS",
    "DEFAULT_MIN_SAVING",
]

_GRAD_RULES = ("average", "sum")
#: ``finetune``'s ``codebook`` choices: ``"auto"`` (per layer, by measured bytes), ``"table"`` (always the float
#: table: the behaviour before issue 12), ``"affine"`` (always the correction where a layer has integer points).
CODEBOOK_FORMS = ("auto", "table", "affine")
#: ``"auto"`` keeps the affine correction where it saves at least this share of the table form's bytes (the layer's
#: index and codebook sections plus its codebook header object). Z¹ tables are a few % of a layer, vector-lattice
#: tables 40-85 % (``benchmarks/finetune_table.py``).
DEFAULT_MIN_SAVING = 0.1


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
# Table or affine correction


def fit_affine(
    points: np.ndarray, tuned: np.ndarray, counts: np.ndarray, zero_index: int | None = None
) -> tuple[float, float] | None:
    """Least squares ``tuned ≈ a·points + b`` over every coordinate of every codeword, each codeword weighted by how
    many vectors use it (unused ones and the exact-zero codeword ``zero_index`` left out: the latter decodes to 0
    whatever ``a``, ``b``). Returns ``(a, b)`` rounded to float32, or ``None`` when nothing determines them (no used
    codeword, all points equal) or the fit is not a usable correction (``a`` rounds to 0 or is not finite)."""
    keep = np.asarray(counts) > 0
    if zero_index is not None and 0 <= zero_index < len(keep):
        keep[zero_index] = False
    x = np.asarray(points, dtype=np.float64)[keep]
    y = np.asarray(tuned, dtype=np.float64)[keep]
    w = np.broadcast_to(np.asarray(counts, dtype=np.float64)[keep][:, None], x.shape)
    sw = w.sum()
    if sw == 0:
        return None
    mx, my = (w * x).sum() / sw, (w * y).sum() / sw
    sxx = (w * (x - mx) ** 2).sum()
    if not sxx > 0:
        return None
    a = (w * (x - mx) * (y - my)).sum() / sxx
    b = my - a * mx
    a32, b32 = float(np.float32(a)), float(np.float32(b))
    if not (np.isfinite(a32) and np.isfinite(b32)) or a32 == 0.0:
        return None
    return a32, b32


def _entry_bytes(record: CompressedWeight, coder: str | None) -> int:
    """What the file spends on ``record`` beyond the shared header: its index and codebook sections (as the
    container codes them) plus its codebook header object."""
    q = entry_from_record(record, fqn="w", coder=coder)
    entry, indices, codebook = encode_quantized(q, "float32", 1 << 62)
    return len(indices) + len(codebook) + len(canonical_json(compact_codebook(entry["codebook"])))


@torch.no_grad()
def choose_codebooks(
    model: nn.Module, form: str = "auto", *, min_saving: float = DEFAULT_MIN_SAVING, coder: str | None = None
) -> list[dict]:
    """Per layer, keep the trained float table or replace it by the integer lattice points under a per-layer affine
    correction (:func:`fit_affine`), in place.

    For each compressed parameter whose codebook was trained off its lattice points, it measures both forms' real
    coded bytes (index and codebook sections and the codebook header object, with ``coder``, the file's default
    when ``None``) and the usage-weighted squared distance of each form to the trained codewords; ``kept`` is the
    share of the training's move (trained codewords against the plain lattice points) the correction keeps.
    ``"auto"`` takes the correction where it saves at least ``min_saving`` of the table form's bytes, ``"affine"``
    wherever it exists, ``"table"`` never. Each parameter's ``codebook_choice`` records the decision.

    Returns:
        One dict per parameter that was trained off its points: ``fqn``, ``form`` (``"affine"`` or ``"table"``),
        ``table_bytes``, ``affine_bytes``, ``a``, ``b``, ``kept`` (``None`` where no fit exists).

    Raises:
        ConfigError: an unknown ``form`` or a ``min_saving`` outside ``[0, 1]``.
    """
    if form not in CODEBOOK_FORMS:
        raise ConfigError(f"codebook form must be one of {CODEBOOK_FORMS}, got {form!r}")
    if isinstance(min_saving, bool) or not isinstance(min_saving, (int, float)) or not 0 <= min_saving <= 1:
        raise ConfigError(f"min_saving must be a number in [0, 1], got {min_saving!r}")
    out = []
    for dlp in served_params(unwrap_ddp(model)):
        if dlp.codebook_int is None:
            continue
        tuned = dlp.codebook.detach().cpu().to(torch.float32).numpy().copy()
        if on_lattice(tuned, dlp.codebook_int, dlp.lattice, dlp.n, dlp.step, dlp.affine) or on_lattice(
            tuned, dlp.codebook_int, dlp.lattice, dlp.n, dlp.step
        ):
            continue  # not moved (or already the correction): nothing to decide
        dlp.affine = None
        table = dlp.record()
        points = codebook_from_int(dlp.codebook_int, dlp.lattice, dlp.n, dlp.step)
        counts = dlp.codeword_counts().cpu().numpy()
        fit = fit_affine(points, tuned, counts, dlp.zero_index)
        choice = {"fqn": dlp.fqn, "form": "table", "table_bytes": _entry_bytes(table, coder), "affine_bytes": None,
                  "a": None, "b": None, "kept": None}
        candidate = None if fit is None else apply_affine(points, fit)
        if candidate is not None and np.isfinite(candidate).all():
            affine_record = CompressedWeight(
                indices=table.indices, codebook=None, codebook_int=dlp.codebook_int, shape=dlp.shape,
                lattice=dlp.lattice, n=dlp.n, step=dlp.step, key=dlp.key, zero_index=dlp.zero_index, affine=fit,
            )
            use = counts > 0
            if dlp.zero_index is not None:
                use[dlp.zero_index] = False
            w = counts[use].astype(np.float64)[:, None]
            moved = float((w * (tuned[use].astype(np.float64) - points[use]) ** 2).sum())
            left = float((w * (tuned[use].astype(np.float64) - candidate[use]) ** 2).sum())
            choice.update(affine_bytes=_entry_bytes(affine_record, coder), a=fit[0], b=fit[1],
                          kept=1.0 - left / moved if moved > 0 else 1.0)
            saving = 1.0 - choice["affine_bytes"] / choice["table_bytes"]
            if form == "affine" or (form == "auto" and saving >= min_saving):
                choice["form"] = "affine"
                dlp.codebook.copy_(torch.from_numpy(candidate).to(dlp.codebook.device))
                dlp.affine = fit
        dlp.codebook_choice = choice
        out.append(choice)
    return out


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
    codebook: str = "auto",
    min_saving: float = DEFAULT_MIN_SAVING,
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
        codebook: after training, per layer, how the trained codewords are kept (:func:`choose_codebooks`):
            ``"auto"`` (default: the integer points under a per-layer affine correction where that saves at least
            ``min_saving`` of the layer's bytes against a float table, else the table), ``"table"`` (always the
            exact trained table), ``"affine"`` (always the correction).
        min_saving: ``"auto"``'s threshold, a share of the table form's bytes (default 0.1).
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
    if codebook not in CODEBOOK_FORMS:
        raise ConfigError(f"codebook must be one of {CODEBOOK_FORMS}, got {codebook!r}")
    if isinstance(min_saving, bool) or not isinstance(min_saving, (int, float)) or not 0 <= min_saving <= 1:
        raise ConfigError(f"min_saving must be a number in [0, 1], got {min_saving!r}")
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
    result = run_training(
        model, data, loss_fn, trainable=_codebook_trainables(inner, dlps, options), rules=rules, options=options,
        desc="fine-tuning codewords",
    )
    choose_codebooks(inner, codebook, min_saving=min_saving)
    return result


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

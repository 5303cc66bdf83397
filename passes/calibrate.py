"""Calibration: run a few batches through the float model once and collect each selected layer's input second
moment ``H = E[x xᵀ]`` (what error-compensating rounding needs), plus the batches' float outputs.

Before::

    compress(model, config)                                   # each weight rounded on its own

After::

    compress(model, config, calibration=batches)             # H_l from hooks on every selected Linear/Conv;
                                                             # columns rounded in order, errors compensated

What ``H`` is for each layer kind (``d`` = elements of one output row of the weight, its "columns"):

* ``Linear``: ``x`` reshaped to ``(-1, in_features)``.
* ``Conv1d``/``Conv2d``: im2col rows (``F.unfold``; a non-zero ``padding_mode`` pads first), ``d = C/g·∏k`` in the
  weight's own row-major order; a grouped convolution has one ``H`` per group, from its own input channels.
* Anything else (``Embedding``, ``ConvTranspose``, ``Conv3d``, transformers' ``Conv1D``, weights used through
  ``F.linear`` in a graph, layers no batch reaches): no ``H``; the layer falls back to plain dithered rounding and
  the reason is recorded.

``XᵀX`` is formed per batch in float32 (it is a sum of products of float32 activations) and accumulated in
float64; the damping, Cholesky factorisations and inverse are float64 (see :mod:`udnc_fx.passes.compensate`).
A tensor feeding several layers with the same im2col geometry (a transformer's q, k and v) is multiplied once per
batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .allocate import first_tensor
from .select import Candidate

__all__ = [
    "Calibration",
    "LayerInputs",
    "as_batches",
    "run_batch",
    "collect_inputs",
    "probe_scales",
    "output_sensitivity",
    "padding_mask",
    "MIN_ROWS_PER_COLUMN",
]


class _StopForward(BaseException):
    """Raised from a hook once every hooked layer of a batch has run: the rest of the forward is not needed.
    A ``BaseException`` so that a model's own ``except Exception`` cannot swallow it."""

# A layer whose H was estimated from fewer input rows than this many per column gets plain rounding. Why: with few
# rows, H is nearly singular and compensation fits the calibration inputs instead of the layer: on all-MiniLM-L6-v2
# with 544 token rows, compensated rounding raised the held-out output error of layers with d = 384 and 1536 columns
# 1.1-3x over plain rounding (any damping from 0.01 to 1), while with ~20k rows it lowered it to 0.3-0.6x.
MIN_ROWS_PER_COLUMN = 2

# How many calibration batches (from the first) the allocation probe measures each layer's output error on.
PROBE_BATCHES = 1

# Whether the probe rounds layers that will be compensated with compensated rounding from an H without its batches
# (see probe_scales); False: plain rounding for every layer, as before (for side-by-side benchmarks).
PROBE_HELD_OUT = True

# The dampings (multiples of config.damping, at most 1) the held-out probe tries for each compensated layer; the one
# with the least output error on the probe's batches is used for that layer (Calibration.dampings).
DAMPING_CHOICES = (1.0, 3.0, 10.0)


@dataclass
class LayerInputs:
    """The accumulated ``Σ x xᵀ`` of one weight's inputs: one ``(d, d)`` float64 array per group."""

    groups: int
    d: int
    sums: list[np.ndarray]
    rows: int = 0  # input rows accumulated (tokens, or im2col positions)
    #: "inputs": Σ x xᵀ of the layer's inputs; "output": Σ g gᵀ of output-sensitivity rows (see output_sensitivity)
    source: str = "inputs"
    #: the part of ``sums`` (and ``rows``) from the batches the allocation probe measures on (``Calibration.held``),
    #: so that the probe can round with an ``H`` that never saw them; dropped once the probe has run
    held: list[np.ndarray] | None = None
    held_rows: int = 0

    def hessian(self, g: int) -> np.ndarray:
        """``E[x xᵀ]`` of group ``g`` (float64)."""
        return self.sums[g] / max(self.rows, 1)

    def held_out_hessian(self, g: int) -> np.ndarray:
        """``E[x xᵀ]`` of group ``g`` over the batches the probe does not measure on (float64)."""
        return (self.sums[g] - self.held[g]) / max(self.rows - self.held_rows, 1)


@dataclass
class Calibration:
    """What calibration produced for the rest of the pipeline.

    Attributes:
        batches: the calibration batches (kept: the sensitivity probe and seed scoring run them again).
        inputs: parameter fqn → :class:`LayerInputs` for every layer whose inputs were seen.
        fallback: parameter fqn → why the layer gets plain rounding (no usable ``H``).
        outputs: the float model's output tensor (float64) for each batch, for the probe and seed scoring.
    """

    batches: list[Any]
    inputs: dict[str, LayerInputs] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    outputs: list[torch.Tensor] | None = None
    scales: dict[str, float] | None = None  # allocation: Δ_l = c·scales[fqn] (probe sensitivities)
    allocation_note: str | None = None
    probe_step: float | None = None  # the probe's one relative step (plain rounding): the rate solve's first guess
    #: parameter fqns in the order their layers first ran, grouped into stages: consecutive calls on the same input
    #: tensor (a transformer's q, k, v) form one stage (sequential compensation re-measures H stage by stage)
    stages: list[list[str]] = field(default_factory=list)
    #: per batch, how many times each hooked module ran (lets a later pass stop a forward once they all have)
    calls: list[dict[str, int]] = field(default_factory=list)
    #: the float model the inputs were measured on, kept only for sequential compensation (``config.sequential``)
    model: Any = None
    #: padded token positions were left out of the Linear layers' H (``config.mask_padding``)
    mask_padding: bool = False
    #: per layer, the damping the held-out probe chose (see :data:`DAMPING_CHOICES`); others use ``config.damping``
    dampings: dict[str, float] = field(default_factory=dict)
    #: the first ``held`` batches' share of each ``H`` is also kept apart (``LayerInputs.held``): the allocation probe
    #: measures on them, with rounding compensated by an ``H`` from the other batches (see :func:`probe_scales`)
    held: int = 0

    def release(self, fqn: str) -> None:
        """Drop the ``Σ x xᵀ`` of ``fqn`` once its factors are computed (memory: one ``d×d`` array per layer, not
        two). The row count stays for the record."""
        rec = self.inputs.get(fqn)
        if rec is not None:
            rec.sums = None
            rec.held = None


def as_batches(calibration: Any) -> list[Any]:
    """Materialise ``calibration`` (an iterable of batches) as a list, refusing what cannot be batches.

    Raises:
        ConfigError: a bare tensor or mapping (one batch, not an iterable of batches), a non-iterable, no batch, or
            a batch that is not a tensor, a tuple of positional inputs or a mapping of keyword inputs.
    """
    if isinstance(calibration, (torch.Tensor, Mapping, str, bytes)):
        raise ConfigError(
            "calibration must be an iterable of batches (e.g. [x] or a DataLoader), not a single "
            f"{type(calibration).__name__}: wrap one batch in a list"
        )
    if not isinstance(calibration, Iterable):
        raise ConfigError(f"calibration must be an iterable of batches, got {type(calibration).__name__}")
    batches = list(calibration)
    if not batches:
        raise ConfigError("calibration holds no batch: give at least one, or leave calibration=None")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, tuple, Mapping)):
            raise ConfigError(
                f"calibration batch {i} is a {type(batch).__name__}: each batch must be a tensor, a tuple of "
                "positional inputs or a mapping of keyword inputs"
            )
    return batches


def padding_mask(batch: Any) -> torch.Tensor | None:
    """The real-token mask ``(batch, tokens)`` (bool) of a keyword batch holding a 2-D ``attention_mask`` (what a
    Hugging Face tokenizer returns with ``padding=True``), else None.

    Why: the hidden states at padded positions are computed but never used by the model's output (attention masks
    them out, mean pooling leaves them out); counted in ``H`` they pull the compensation toward inputs the model
    never serves. A Linear layer whose input has leading dimensions equal to the mask's shape then contributes only
    the rows of real tokens.
    """
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask != 0


def output_mask(calib: "Calibration", i: int) -> torch.Tensor | None:
    """The entries of the model's output on batch ``i`` that count in an output error (the probe's, seed
    trials'): with ``mask_padding``, the real tokens' (:func:`padding_mask`) when the output is per token; else
    ``None``, every entry."""
    keep = padding_mask(calib.batches[i]) if calib.mask_padding else None
    ref = calib.outputs[i] if calib.outputs else None
    if keep is None or ref is None or tuple(ref.shape[: keep.dim()]) != tuple(keep.shape):
        return None  # no mask, or the output is not per token (e.g. pooled): every entry counts
    return keep


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one batch with the calibration convention (tuple → ``*args``, mapping → ``**kwargs``)."""
    if isinstance(batch, tuple):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def _geometry(module: nn.Module) -> tuple[str, int] | None:
    """``(kind, groups)`` for a layer whose inputs give ``H``, else None."""
    if isinstance(module, nn.Linear):
        return "linear", 1
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv", module.groups
    return None


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``x`` whose outer products make ``H``: ``(rows, groups·d)``, columns in weight row-major order."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    one_d = isinstance(module, nn.Conv1d)
    if x.dim() == len(module.kernel_size) + 1:  # an unbatched input
        x = x.unsqueeze(0)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * len(module.kernel_size)
    else:
        padding = module.padding
    if isinstance(padding, str):  # "same"/"valid": what nn.Conv computed is in _reversed_padding_repeated_twice
        x = F.pad(x, module._reversed_padding_repeated_twice)
        padding = (0,) * len(module.kernel_size)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if one_d:
        x = x.unsqueeze(2)
        kernel, stride, dilation, padding = (1, kernel[0]), (1, stride[0]), (1, dilation[0]), (0, padding[0])
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C·∏k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def collect_inputs(
    model: nn.Module,
    candidates: list[Candidate],
    batches: list[Any],
    *,
    keep_outputs: bool = True,
    stop_after: list[dict[str, int]] | None = None,
    mask_padding: bool = False,
    held: int = 0,
) -> Calibration:
    """Run every batch through ``model`` (eval mode, no autograd) with hooks on the candidates' layers.

    ``model`` is the traced deep copy that is about to be quantized (graph or module-swap target); it is left as it
    was (mode restored, hooks removed).

    Args:
        model: the float model (its hooks are removed afterwards).
        candidates: the selected weights; those of Linear/Conv1d/Conv2d layers get an ``H``.
        batches: the calibration batches.
        keep_outputs: keep the model's output on each batch (for the probe and seed scoring).
        stop_after: per batch, how many calls of each hooked module a full forward makes (``Calibration.calls`` of
            an earlier full run); the forward of a batch is stopped as soon as the hooked modules have all run that
            often. Why: sequential compensation measures a few layers at a time, and the layers after them need
            not run. Implies ``keep_outputs=False``.
        mask_padding: leave padded token positions out of Linear layers' ``H`` (see :func:`padding_mask`).
        held: also keep the first ``held`` batches' share of every ``H`` apart (``LayerInputs.held``), for the
            allocation probe's out-of-sample rounding.

    Raises:
        ConfigError: a batch does not fit the model (names the batch and the innermost module that failed), or a
            layer's input does not have the shape its weight needs.
    """
    calib = Calibration(batches=batches, mask_padding=mask_padding, held=held)
    modules = dict(model.named_modules(remove_duplicate=False))
    hooked: dict[str, list[tuple[str, nn.Module]]] = {}  # module fqn -> [(param fqn, module)]
    for cand in candidates:
        kinds = []
        for owner, attr in cand.owners:
            module = modules[owner]
            geo = _geometry(module) if attr == "weight" else None
            kinds.append(geo)
        if any(k is None for k in kinds):
            bad = [f"{o}.{a}" if o else a for (o, a), k in zip(cand.owners, kinds) if k is None]
            what = type(modules[cand.owners[0][0]]).__name__
            calib.fallback[cand.fqn] = (
                f"its use by {', '.join(bad)} ({what}) has no input second moment"
                if len(cand.owners) == 1
                else f"tied; the use by {', '.join(bad)} has no input second moment, so H would cover only some uses"
            )
            continue
        if len({k for k in kinds}) > 1:
            calib.fallback[cand.fqn] = "tied between layers of different kinds"
            continue
        groups = kinds[0][1]
        d = cand.param.numel() // cand.param.shape[0]
        calib.inputs[cand.fqn] = LayerInputs(groups, d, [np.zeros((d, d)) for _ in range(groups)],
                                             held=[np.zeros((d, d)) for _ in range(groups)] if held else None)
        for owner, _ in cand.owners:
            hooked.setdefault(owner, []).append((cand.fqn, modules[owner]))

    stack: list[str] = []
    products: dict[tuple, torch.Tensor] = {}  # per batch: (id(x), geometry) -> XᵀX, so q/k/v share one product
    current: dict[str, Any] = {}
    calls: dict[str, int] = {}  # this batch: hooked module -> times it ran
    stages: list[list[str]] = []  # parameter fqns, in the order their modules first ran (see Calibration.stages)
    seen: set[str] = set()
    previous: dict[str, Any] = {}  # the last hooked module's input (held, not its id: ids of freed tensors recur)
    if stop_after is not None:
        keep_outputs = False

    def push(name):
        def hook(module, args):
            stack.append(name)
        return hook

    def pop(module, args, output):
        if stack:
            stack.pop()

    def record(owner: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            src = args[0]  # the caller's tensor: layers on one input receive this same object (detach() would not)
            x = src.detach()
            calls[owner] = calls.get(owner, 0) + 1
            fresh = [fqn for fqn, _ in hooked[owner] if fqn not in seen]
            if fresh:
                seen.update(fresh)
                if stages and previous.get("x") is src:
                    stages[-1].extend(fresh)
                else:
                    stages.append(fresh)
            previous["x"] = src
            for fqn, mod in hooked[owner]:
                rec = calib.inputs[fqn]
                try:
                    cols = _columns(mod, x).to(torch.float32)
                except RuntimeError as exc:
                    raise ConfigError(
                        f"calibration batch {current['i']} does not fit the model: layer {owner} got an input of "
                        f"shape {tuple(x.shape)} it cannot use: {exc}"
                    ) from None
                mask = current["mask"]
                if mask is not None and isinstance(mod, nn.Linear) and tuple(x.shape[:-1]) == tuple(mask.shape):
                    cols = cols[mask.reshape(-1)]  # the real tokens' rows only
                if cols.shape[1] != rec.groups * rec.d:
                    raise ConfigError(
                        f"calibration batch {current['i']} does not fit the model: layer {owner} got an input with "
                        f"{cols.shape[1]} columns, its weight needs {rec.groups * rec.d}"
                    )
                key = (id(src), rec.groups, rec.d, getattr(mod, "kernel_size", None), getattr(mod, "stride", None),
                       getattr(mod, "padding", None), getattr(mod, "dilation", None),
                       getattr(mod, "padding_mode", None))
                cached = products.get(key)
                # the id of a freed tensor is soon given to a new one (a later layer's input): the weak reference
                # tells whether the cached product is of this very tensor
                if cached is not None and cached[0]() is src:
                    prods = cached[1]
                else:
                    prods = []
                    for g in range(rec.groups):
                        block = cols[:, g * rec.d : (g + 1) * rec.d]
                        prods.append((block.T @ block).to(torch.float64).numpy())
                    products[key] = (weakref.ref(src), prods)
                for g in range(rec.groups):
                    rec.sums[g] += prods[g]
                rec.rows += cols.shape[0]
                if current["i"] < held:
                    for g in range(rec.groups):
                        rec.held[g] += prods[g]
                    rec.held_rows += cols.shape[0]
            if stop_after is not None:
                wanted = stop_after[current["i"]]
                if all(calls.get(o, 0) >= wanted.get(o, 0) for o in hooked):
                    raise _StopForward
        return hook

    handles = []
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(push(name or "(root)")))
            handles.append(module.register_forward_hook(pop))
        for owner in hooked:
            handles.append(modules[owner].register_forward_pre_hook(record(owner)))
        was_training = model.training
        model.eval()
        outputs = []
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    current["i"] = i
                    current["mask"] = padding_mask(batch) if mask_padding else None
                    stack.clear()
                    products.clear()
                    calls.clear()
                    previous.clear()
                    try:
                        out = run_batch(model, batch)
                    except _StopForward:
                        continue
                    except ConfigError:
                        raise
                    except Exception as exc:
                        where = stack[-1] if stack else "(root)"
                        raise ConfigError(
                            f"calibration batch {i} does not fit the model: layer {where} raised "
                            f"{type(exc).__name__}: {exc}"
                        ) from exc
                    finally:
                        calib.calls.append(dict(calls))
                    if keep_outputs:
                        try:
                            outputs.append(first_tensor(out).detach().to(torch.float64))
                        except ConfigError:
                            outputs.append(None)  # no tensor to compare: seed scoring needs a score_fn
        finally:
            model.train(was_training)
            products.clear()
    finally:
        for h in handles:
            h.remove()
    if keep_outputs:
        calib.outputs = outputs
    previous.clear()
    calib.stages = [[fqn for fqn in stage if fqn in calib.inputs] for stage in stages]
    for fqn, rec in list(calib.inputs.items()):
        if rec.rows == 0:
            calib.fallback[fqn] = "no calibration batch reached it"
            del calib.inputs[fqn]
        elif rec.rows < MIN_ROWS_PER_COLUMN * rec.d:
            calib.fallback[fqn] = (
                f"only {rec.rows} calibration input rows for {rec.d} columns (compensation needs at least "
                f"{MIN_ROWS_PER_COLUMN * rec.d} to generalise): give more calibration data"
            )
            del calib.inputs[fqn]
    return calib


# The random projections of output_sensitivity come from this fixed seed: the calibration, and so the bytes, do not
# depend on the dither seed (seed trials share one calibration).
SENSITIVITY_SEED = 0


def output_sensitivity(model: nn.Module, candidates: list[Candidate], calib: Calibration) -> list[str]:
    """An ``H`` for ``Embedding`` weights from the model's output sensitivity (sets ``calib.inputs[fqn]`` with
    ``source="output"``; returns the fqns given one).

    A lookup has no input second moment, so :func:`collect_inputs` leaves embeddings to plain rounding. But the
    error of a row ``e`` (``1×d``) reaches the model's output as ``J e`` (``J``: Jacobian of the output with respect
    to that output row of the layer, at each place the token occurs), so the output error it causes is
    ``e G eᵀ`` with ``G = E[JᵀJ]``: the same quadratic form as a Linear layer's ``e H eᵀ``, and the same
    error-compensating rounding applies with ``G`` in place of ``H``. ``G`` is estimated as ``E[g gᵀ]`` over the
    calibration tokens with ``g = Jᵀ v`` for a standard normal ``v`` (``E[v vᵀ] = I``): one backward pass per batch.
    Padded positions (``calib.mask_padding``) are left out of ``v`` and of the rows, as in the probe.

    Why: on all-MiniLM-L6-v2 the word embeddings are half of the weights; ``G`` is far from isotropic (the
    LayerNorm after the embedding sum removes the mean direction, its gains weight the dimensions 2-44x) and
    compensated rounding with it has 0.68x the output error of plain rounding at the same step and rate. ``G``
    depends on the contexts, not on which token a row is, so every row, seen in calibration or not, shares it.

    Embeddings also used by a non-Embedding module (a tied language-model head), whose owners have no output
    tensor, or that no gradient reaches, keep plain rounding (their ``calib.fallback`` reason is kept, extended).
    The model's parameters do not require grad during the pass (only the activations are differentiated); flags,
    mode and hooks are restored.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    owners: dict[str, str] = {}  # module fqn -> parameter fqn
    dims: dict[str, int] = {}
    for cand in candidates:
        if cand.fqn not in calib.fallback or cand.param.dim() != 2:
            continue
        if all(attr == "weight" and isinstance(modules[o], nn.Embedding) for o, attr in cand.owners):
            for o, _ in cand.owners:
                owners[o] = cand.fqn
            dims[cand.fqn] = int(cand.param.shape[1])
    if not owners:
        return []
    sums = {fqn: np.zeros((d, d)) for fqn, d in dims.items()}
    rows = dict.fromkeys(dims, 0)
    held = {fqn: np.zeros((d, d)) for fqn, d in dims.items()} if calib.held else None  # see Calibration.held
    held_rows = dict.fromkeys(dims, 0)
    captured: list[tuple[str, torch.Tensor]] = []

    def hook_for(fqn: str):
        def hook(module, args, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.shape[-1] != dims[fqn]:
                return None
            leaf = out.detach().requires_grad_(True)
            captured.append((fqn, leaf))
            return leaf.clone()  # not the leaf itself: the model may change its input in place
        return hook

    gen = torch.Generator().manual_seed(SENSITIVITY_SEED)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = [modules[o].register_forward_hook(hook_for(fqn)) for o, fqn in owners.items()]
    was_training = model.training
    failed = None
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        for i, batch in enumerate(calib.batches):
            captured.clear()
            mask = padding_mask(batch) if calib.mask_padding else None
            with torch.enable_grad():
                try:
                    y = first_tensor(run_batch(model, batch))
                except Exception as exc:  # noqa: BLE001 - the same forward ran in collect_inputs: not bad input
                    failed = f"the output could not be differentiated ({type(exc).__name__}: {exc})"
                    break
                if not captured or not y.is_floating_point() or not y.requires_grad:
                    failed = "the model's output does not depend differentiably on it"
                    break
                v = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
                if mask is not None and tuple(y.shape[: mask.dim()]) == tuple(mask.shape):
                    v = v * mask.reshape(tuple(mask.shape) + (1,) * (y.dim() - mask.dim())).to(v.dtype)
                leaves = [leaf for _, leaf in captured]
                try:
                    grads = torch.autograd.grad(y, leaves, grad_outputs=v, allow_unused=True)
                except RuntimeError as exc:
                    failed = f"the output could not be differentiated ({exc})"
                    break
            for (fqn, leaf), g in zip(captured, grads):
                if g is None:
                    continue
                g = g.detach().to(torch.float64)
                if mask is not None and tuple(g.shape[:-1]) == tuple(mask.shape):
                    g = g[mask]
                g = g.reshape(-1, dims[fqn])
                product = (g.T @ g).numpy()
                sums[fqn] += product
                rows[fqn] += g.shape[0]
                if held is not None and i < calib.held:
                    held[fqn] += product
                    held_rows[fqn] += g.shape[0]
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        captured.clear()
    done = []
    for fqn, d in dims.items():
        if failed is not None:
            calib.fallback[fqn] += f"; output sensitivity unavailable: {failed}"
        elif rows[fqn] == 0 or not sums[fqn].any():
            calib.fallback[fqn] += "; output sensitivity unavailable: no gradient reached it"
        elif rows[fqn] < MIN_ROWS_PER_COLUMN * d:
            calib.fallback[fqn] += (
                f"; output sensitivity from only {rows[fqn]} rows for {d} columns (needs "
                f"{MIN_ROWS_PER_COLUMN * d}): give more calibration data"
            )
        else:
            del calib.fallback[fqn]
            calib.inputs[fqn] = LayerInputs(1, d, [sums[fqn]], rows[fqn], source="output",
                                            held=None if held is None else [held[fqn]], held_rows=held_rows[fqn])
            done.append(fqn)
    return done


def probe_scales(model: nn.Module, candidates: list[Candidate], config: Any, calib: Calibration) -> None:
    """Sensitivity allocation on the first calibration batch (sets ``calib.scales`` and ``calib.allocation_note``).

    Every layer whose step is solved for (``target_bits``) is quantized alone at the uniform operating point
    (``Δ_l = s·std_l`` meeting the target) and the mean squared change of the model's output on batch 0 is ``D_l``;
    then ``a_l = D_l / Δ_l²`` and, as in :mod:`udnc_fx.passes.allocate`, ``Δ_l ∝ sqrt(N_l / a_l)``.

    Layers that will get compensated rounding are probed with compensated rounding too, but from an ``H`` that
    leaves out the probe's own batches (``calib.held``, kept apart by :func:`collect_inputs` and
    :func:`output_sensitivity`): the probe then measures the error compensation leaves on data it did not fit, as on
    a user's inputs. Why: compensation lowers some layers' output error far more than others' (on all-MiniLM-L6-v2
    with E8 at 3.18 bits, out of sample: the value projections of layers 1-5 0.16-0.36x plain rounding's output
    error, the FFN output layers 0.85-1.08x), so sensitivities measured with plain rounding spend bits where
    compensation has already removed the error. An in-sample probe (``H`` from data including the probe batch) is
    worse than a plain one: it under-rates exactly the layers whose compensation generalises worst (layer 5 FFN
    output: 0.24x plain rounding's error on the calibration text, 0.63x on held-out sentences; mean cosine 0.914
    against 0.963 for the plain probe at 3 bits/weight). Layers with too few rows left without the probe batches,
    and every layer when the calibration is a single batch or the config is ``exact_zero`` (pruned models, where it
    measured worse; ``udnc_fx.api._calibrate``), are probed with plain rounding. ``model`` is restored; the held-out
    sums are dropped when the probe is done.

    The held-out rounding also chooses each compensated layer's damping: the probe rounds the layer with
    :func:`_damping_choices` from the largest down, until one does no better than the one before, and keeps the
    damping (``calib.dampings``, used by the quantize pass and recorded) and the error of the one that leaves the
    least output error on the probe batches. Why: when the calibration text differs from what the model will see,
    ``H`` is fitted too closely, and how much to trust it differs by layer; the held-out batch measures that instead
    of one global guess (all-MiniLM-L6-v2, E8, 3.18 bits, 5 seeds: mean cosine 0.99033 → 0.99071 on held-out
    sentences, every seed above 0.99).
    """
    try:
        _probe_scales(model, candidates, config, calib)
    finally:
        for rec in calib.inputs.values():
            rec.held = None


def _probe_scales(model: nn.Module, candidates: list[Candidate], config: Any, calib: Calibration) -> None:
    from ..lattice import get_lattice
    from ..quantizer import quantize_array, vectors_of
    from ..record import raw_dither, weight_key
    from .compensate import compensated_points
    from .quantize import factor_groups, layer_stats, solve_relative_step

    reference = calib.outputs[0] if calib.outputs else None
    if reference is None:
        calib.allocation_note = "no allocation: the model's output on batch 0 has no tensor to compare"
        return
    free, fixed_bits, fixed_numel = [], 0.0, 0
    from ..quantizer import coded_rate_bits_per_weight

    for cand in candidates:
        w, std = layer_stats(cand)
        lat = get_lattice(cand.lattice, cand.n)
        v = vectors_of(w, lat.dim)
        key = weight_key(config.seed, cand.fqn, config.dithered)
        u = raw_dither(key, v.shape[0], lat)
        if cand.step_kind == "target_bits":
            if std == 0.0:
                continue  # make_params raises the error with its remedy
            free.append((cand, w, std, lat, v, key, u))
        else:
            step = float(cand.step_value) * (1.0 if cand.step_kind == "step" else std)
            fixed_bits += coded_rate_bits_per_weight(v, lat, step, u, key=key, shape=w.shape) * v.size
            fixed_numel += v.size
    if not free:
        return
    s = solve_relative_step(
        [(v, std, lat, u, key, w.shape) for _, w, std, lat, v, key, u in free], fixed_bits, fixed_numel,
        config.effective_target_bits,
    )
    calib.probe_step = s
    scales, zero = {}, []
    probe = []  # (batch, float output, rows kept or None) of each batch the probe runs
    for i in range(min(PROBE_BATCHES, len(calib.batches))):
        ref = calib.outputs[i]
        if ref is None:
            break
        probe.append((calib.batches[i], ref, output_mask(calib, i)))
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            distortions = {}
            compensated = 0

            def probe_error(cand, w, lat, step, key, u, points) -> float:
                """The mean squared output change on the probe batches with ``cand`` alone quantized."""
                q = quantize_array(w, lattice=lat.name, n=lat.dim, step=step, key=key,
                                   exact_zero=config.exact_zero, u_raw=u, raw_points=points)
                param = cand.param
                saved = param.data
                param.data = torch.from_numpy(q.decode(raw_dither=u).reshape(w.shape)).to(saved.device, saved.dtype)
                try:
                    total = count = 0.0
                    for batch, ref, keep in probe:
                        test = first_tensor(run_batch(model, batch)).detach().to(torch.float64)
                        sq = (test - ref) ** 2
                        if keep is not None:
                            sq = sq[keep]  # real tokens only (config.mask_padding)
                        total += float(sq.sum())
                        count += sq.numel()
                finally:
                    param.data = saved
                return total / max(count, 1.0)

            for cand, w, std, lat, v, key, u in free:
                step = s * std
                best = None  # (error, damping) of the held-out compensated roundings
                hessians = _held_out_hessians(calib, cand.fqn, lat, config)
                # the largest damping first (most layers keep it: on all-MiniLM-L6-v2, 25 of 38), then smaller ones
                # while they do better: two roundings for most layers instead of three (time)
                for damping in _damping_choices(config)[::-1] if hessians is not None else ():
                    factors, _ = factor_groups(hessians, lat, config, damping)
                    if factors is None:
                        continue
                    points = compensated_points(w.reshape(w.shape[0], -1), factors[0], lat, step, u,
                                                exact_zero=config.exact_zero, perms=factors[1],
                                                metric=config.metric_rounding)
                    error = probe_error(cand, w, lat, step, key, u, points)
                    if best is not None and error >= best[0]:
                        break  # less damping stopped helping: the smaller ones are not tried
                    best = (error, damping)
                if best is not None:
                    compensated += 1
                    calib.dampings[cand.fqn] = best[1]
                    error = best[0]
                else:
                    error = probe_error(cand, w, lat, step, key, u, None)
                distortions[cand.fqn] = (error, step, w.size)
        finally:
            model.train(was_training)
    floor = max(max(d for d, _, _ in distortions.values()) * 1e-9, 1e-300)
    for fqn, (dist, step, numel) in distortions.items():
        if dist <= 0.0:
            zero.append(fqn)
        sens = max(dist, floor) / (step**2 * numel)
        scales[fqn] = 1.0 / math.sqrt(sens)
    calib.scales = scales
    held = f"batches 0-{len(probe) - 1}" if len(probe) > 1 else "batch 0"
    calib.allocation_note = (
        f"step allocation probed on {held} ({len(free)} layers, one forward per rounding tried"
        + (f"; {compensated} with compensated rounding from an H without {held}" if compensated else "")
        + (f"; {len(zero)} did not change the output" if zero else "")
        + ")"
    )


def _damping_choices(config: Any) -> list[float]:
    """The dampings the probe tries for each compensated layer: ``config.damping`` times :data:`DAMPING_CHOICES`,
    at most 1."""
    return sorted({min(1.0, config.damping * f) for f in DAMPING_CHOICES})


def _held_out_hessians(calib: Calibration, fqn: str, lat: Any, config: Any) -> list[np.ndarray] | None:
    """``fqn``'s per-group ``H`` without the probe's batches, or ``None`` when the probe cannot round it compensated
    (not compensated, no held-out share, rows not whole vectors, or too few rows left)."""
    rec = calib.inputs.get(fqn)
    if (not config.compensate or rec is None or rec.held is None or rec.sums is None or rec.d % lat.dim
            or rec.rows - rec.held_rows < MIN_ROWS_PER_COLUMN * rec.d):
        return None
    return [rec.held_out_hessian(g) for g in range(rec.groups)]

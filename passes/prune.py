"""Magnitude pruning of the weights the quantize pass would select, in whole lattice vectors.

Before::

    conv1.weight: f32[16,1,3,3]  (dense)

After (``prune(model, 0.8)``)::

    conv1.weight: f32[16,1,3,3]  with 80 % of its n-vectors set to exact 0,  masks["conv1.weight"]: bool (True = kept)

A weight is flattened in row-major order, zero-padded to a multiple of the lattice dimension ``n`` and cut into
``n``-vectors, exactly as :class:`~udnc_fx.DitheredLatticeParam` does; whole vectors are ranked by their RMS (L2 norm
/ √n, so layers with different ``n`` compare fairly) and the smallest are set to zero. A zero vector is the lattice
point 0, and with ``CompressConfig(exact_zero=True)`` it decodes to exactly 0 with no dither: the pruned positions
then cost one symbol of the index stream and need no separate mask. The paper's pipeline is
``prune`` → :func:`~udnc_fx.passes.finetune.finetune_float` (retrain the kept weights) → ``compress`` →
:func:`~udnc_fx.passes.finetune.finetune` (fine-tune the codewords).

Gradual pruning (``prune(model, 0.9, steps=5, data=loader, loss_fn=F.cross_entropy, options=...)``): the sparsity
rises along the cubic schedule of Zhu & Gupta (2017, "To prune, or not to prune"),
``s_i = s + (s_0 - s)(1 - i/steps)^3`` for ``i = 1 … steps``, and the kept weights are retrained
(:func:`~udnc_fx.passes.finetune.finetune_float`) after every step but the last; a vector pruned once stays pruned.
The many small steps early and the few late ones let the network move its weight onto the vectors it keeps before
the last ones go: on the demo CNN at 0.9 (layer bound 0.95), 5 steps with 6 epochs between them and 30 after leave
the pruned float model at half the KL to the float model of one-shot pruning retrained for the same 54 epochs (test
split: 0.0067 against 0.0132; ``benchmarks/digits_pipeline.py --distill-temperature 2 --compare-pruning 0.9@0.95``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from ..config import CompressConfig
from ..errors import ConfigError, PassError, UnsupportedModelError
from .finetune import finetune_float
from .select import Candidate, refuse_non_float32, select_weights
from .train import TrainOptions
from .trace import prepare

__all__ = ["prune", "mask_sparsity", "check_sparsity", "sparsity_schedule"]

_SCOPES = ("global", "layer")


def check_sparsity(sparsity) -> float:
    """Validate a target sparsity (a fraction of weights set to zero) and return it as a float.

    Raises:
        ConfigError: not a finite number in ``[0, 1)``.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(
            f"sparsity must be in [0, 1) (the fraction of selected weights set to zero), got {sparsity!r}"
        )
    return float(sparsity)


def _select(work: nn.Module, config: CompressConfig) -> list[Candidate]:
    """The candidates the quantize pass would choose (prepared as ``compress`` prepares, so functional weights such
    as ``F.linear(x, self.w)`` are found; an untraceable model is pruned by module type alone, as the module-swap
    fallback would quantize it, unless ``config.fallback == "error"``)."""
    # The GraphModule shares the parameter objects with ``work``: zeroing a candidate prunes ``work``.
    target, _ = prepare(work, config, inplace=True)
    candidates, _ = select_weights(target, config, target if isinstance(target, fx.GraphModule) else None)
    return candidates


def _vector_scores(weight: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS of each n-vector of the flattened, zero-padded weight, and how many real elements each covers."""
    flat = weight.detach().reshape(-1).to(torch.float64)
    numel = flat.numel()
    pad = (-numel) % n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    vectors = flat.view(-1, n)
    scores = vectors.norm(dim=1) / math.sqrt(n)
    elems = torch.full((vectors.shape[0],), n, dtype=torch.int64)
    elems[-1] = n - pad
    return scores, elems


def _check_caps(max_layer_sparsity, names: list[str]) -> list[float]:
    """Per-layer upper bounds on the pruned fraction, one per name (1.0 = no bound)."""
    if max_layer_sparsity is None:
        return [1.0] * len(names)
    if isinstance(max_layer_sparsity, Mapping):
        unknown = sorted(set(max_layer_sparsity) - set(names))
        if unknown:
            raise ConfigError(
                f"max_layer_sparsity names {unknown}, which are not pruned weights; the selected weights are {names}"
            )
        caps = {k: _check_cap(v, f"max_layer_sparsity[{k!r}]") for k, v in max_layer_sparsity.items()}
        return [caps.get(name, 1.0) for name in names]
    cap = _check_cap(max_layer_sparsity, "max_layer_sparsity")
    return [cap] * len(names)


def _check_cap(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(
            f"{what} must be in [0, 1] (the most of a layer's elements that may be pruned), got {value!r}"
        )
    return float(value)


def _capped_global(scores, elems, owner, caps, numels, target: float) -> torch.Tensor:
    """Indices (into the concatenated vectors) of the smallest vectors overall, skipping a layer's vectors once it
    would exceed its cap, until the pruned element count is closest to ``target``.

    Equal to the plain global ranking when no cap binds: a cap only removes a layer's larger vectors from the
    candidates, and every other layer's vectors keep their order."""
    order = torch.argsort(scores, stable=True)
    budget = torch.tensor([math.floor(c * m + 1e-9) for c, m in zip(caps, numels)], dtype=torch.int64)
    # the k-th smallest vector of a layer is allowed when the layer's elements pruned so far, itself included,
    # stay within its budget (vectors of one layer are taken in ascending order, so this is a prefix per layer)
    owner_sorted, elems_sorted = owner[order], elems[order]
    allowed = torch.zeros_like(order, dtype=torch.bool)
    for i in range(len(caps)):
        mine = owner_sorted == i
        cum = elems_sorted[mine].cumsum(0)
        allowed[mine] = cum <= budget[i]
    order = order[allowed]
    k = _how_many(elems[order], target)
    return order[:k]


def _how_many(elems_sorted: torch.Tensor, target: float) -> int:
    """Number of leading (smallest) vectors whose element count is closest to ``target``."""
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), elems_sorted.cumsum(0).to(torch.float64)])
    return int((cum - target).abs().argmin())


def sparsity_schedule(sparsity: float, steps: int, initial_sparsity: float = 0.0) -> list[float]:
    """The sparsity after each of ``steps`` pruning steps: Zhu & Gupta's cubic schedule
    ``s_i = s + (s_0 - s)(1 - i/steps)^3``, ``i = 1 … steps`` (large steps first, the last one ends at ``sparsity``).

    Raises:
        ConfigError: a bad sparsity, ``steps`` not a positive integer, or ``initial_sparsity`` outside
            ``[0, sparsity]``.
    """
    sparsity = check_sparsity(sparsity)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer (the number of pruning steps), got {steps!r}")
    s0 = check_sparsity(initial_sparsity)
    if s0 > sparsity:
        raise ConfigError(f"initial_sparsity must be in [0, sparsity={sparsity}], got {initial_sparsity!r}")
    return [sparsity + (s0 - sparsity) * (1.0 - i / steps) ** 3 for i in range(1, steps + 1)]


def prune(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    config: CompressConfig | None = None,
    n: int | None = None,
    max_layer_sparsity: float | Mapping[str, float] | None = None,
    steps: int = 1,
    data: Iterable | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    options: TrainOptions | None = None,
    initial_sparsity: float = 0.0,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Magnitude-prune the weights ``compress(model, config)`` would quantize, to ``sparsity``, in whole n-vectors.

    Args:
        model: any ``nn.Module``; it is deep-copied and never changed.
        sparsity: fraction of the selected weights (elements) to set to zero, in ``[0, 1)``.
        scope: ``"global"`` (one ranking over all selected weights: small layers may lose more or less than
            ``sparsity``) or ``"layer"`` (every layer pruned to ``sparsity``).
        config: the :class:`CompressConfig` that will be used to compress (selection, per-layer lattices); default
            ``CompressConfig()``. Compress the pruned model with ``exact_zero=True`` so pruned vectors decode to 0.
        n: vector length for every layer; default each layer's lattice dimension from ``config`` (so a pruned
            vector is exactly one lattice point 0).
        max_layer_sparsity: the most of each layer's elements that may be pruned, in ``[0, 1]``: one number for
            every layer, or ``{parameter fqn: bound}`` for some (the others unbounded). With ``scope="global"``
            the ranking skips a layer's vectors once it reaches its bound and takes the next smallest vectors of
            the other layers instead, so the total stays ``sparsity`` (global magnitude pruning otherwise empties
            the largest layer first: on the demo CNN at 0.9, ``fc1`` loses 98 %); with ``scope="layer"`` each
            layer is pruned to ``min(sparsity, bound)``.
        steps: gradual pruning: prune in this many steps along :func:`sparsity_schedule` (cubic, from
            ``initial_sparsity`` to ``sparsity``) and retrain the kept weights with
            :func:`~udnc_fx.passes.finetune.finetune_float` on ``data`` after every step but the last (``steps - 1``
            retrainings; retrain the result once more before compressing, as after one-shot pruning). Each step
            ranks the vectors by their magnitude after the retraining before it; a vector pruned once stays
            pruned. 1 (default): one-shot pruning, no training.
        data, loss_fn, options: the retraining between steps, as for ``finetune_float`` (``data``: a re-iterable
            of ``(inputs, targets)`` batches; ``options``: a :class:`~udnc_fx.TrainOptions`, e.g. its ``epochs``
            per step, ``lr``, ``teacher`` to distil from). Only with ``steps > 1``.
        initial_sparsity: the schedule's start ``s_0`` (its first step prunes to more than this), in
            ``[0, sparsity]``.

    Returns:
        ``(pruned, masks)``: the pruned deep copy, and ``{parameter fqn: bool tensor of the weight's shape}`` with
        True where a weight is kept. The achieved sparsity is within one vector (per layer) of the target; see
        :func:`mask_sparsity`.

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``, sparsity outside ``[0, 1)``, an unknown scope, a bad ``n``,
            NaN/Inf weights, a ``max_layer_sparsity`` bound outside ``[0, 1]`` or naming no selected weight, or
            bounds so tight that ``sparsity`` cannot be reached; a bad ``steps`` or ``initial_sparsity``,
            ``steps > 1`` without ``data`` or without a loss (``loss_fn`` or ``options.teacher``), or ``data``,
            ``loss_fn`` or ``options`` with ``steps == 1``; as for ``finetune_float`` (bad data, options).
        PassError: no weight is selected (nothing to prune, e.g. an already compressed model); as for
            ``finetune_float`` (a non-finite loss).
        UnsupportedModelError: torch.fx cannot trace ``model`` and ``config.fallback == "error"`` (as
            :func:`udnc_fx.compress` would refuse it).
    """
    sparsity = check_sparsity(sparsity)
    schedule = sparsity_schedule(sparsity, steps, initial_sparsity)
    if steps == 1 and (data is not None or loss_fn is not None or options is not None):
        raise ConfigError("data, loss_fn and options are the retraining between pruning steps: give steps > 1")
    if steps > 1:
        if data is None:
            raise ConfigError(f"steps={steps} retrains between pruning steps: give data (and loss_fn or a teacher)")
        if options is not None and not isinstance(options, TrainOptions):
            raise ConfigError(f"options must be a TrainOptions, got {type(options).__name__}")
        if loss_fn is None and (options is None or options.teacher is None):
            raise ConfigError("give a loss_fn(outputs, targets), or options with a teacher model to distil from")
    if scope not in _SCOPES:
        raise ConfigError(f"scope must be 'global' or 'layer', got {scope!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"n must be a positive integer (the lattice dimension) or None, got {n!r}")
    config = CompressConfig() if config is None else config
    if not isinstance(config, CompressConfig):
        raise ConfigError(f"config must be a CompressConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prune() needs an nn.Module, got {type(model).__name__}")

    work = copy.deepcopy(model)
    candidates = _select(work, config)
    if not candidates:
        refuse_non_float32(work)
        raise PassError(
            "prune() found no weights to prune: no Conv/Linear weight is selected by this config "
            "(is the model already compressed?)"
        )
    candidates = [cand for cand in candidates if cand.param.numel()]
    caps = _check_caps(max_layer_sparsity, [cand.fqn for cand in candidates])
    masks: dict[str, torch.Tensor] | None = None
    for i, target in enumerate(schedule):
        if i:
            finetune_float(work, masks, data, loss_fn, options=options)
        masks = _prune_step(candidates, target, scope, n, caps, max_layer_sparsity is not None, masks)
    return work, masks


def _prune_step(
    candidates: list[Candidate],
    sparsity: float,
    scope: str,
    n: int | None,
    caps: list[float],
    bounded: bool,
    previous: dict[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Zero the smallest vectors of ``candidates`` in place to ``sparsity``; vectors ``previous`` pruned rank below
    every other (so they stay pruned: the schedule only rises, and a bound held before holds again)."""
    layers = []
    for cand in candidates:
        p = cand.param
        if not torch.isfinite(p.detach()).all():
            raise ConfigError(f"layer {cand.fqn} has NaN/Inf weights: fix the model before pruning")
        vec_n = n if n is not None else cand.n
        scores, elems = _vector_scores(p, vec_n)
        if previous is not None:
            kept = _vector_scores(previous[cand.fqn].to(torch.float64), vec_n)[0] > 0
            scores = torch.where(kept, scores, torch.full_like(scores, -1.0))
        layers.append((cand, vec_n, scores, elems))

    numels = [cand.param.numel() for cand, *_ in layers]
    pruned_vectors: list[torch.Tensor] = []
    if scope == "layer":
        for (cand, vec_n, scores, elems), cap in zip(layers, caps):
            order = torch.argsort(scores, stable=True)
            k = _how_many(elems[order], min(sparsity, cap) * cand.param.numel())
            while k and int(elems[order[:k]].sum()) > math.floor(cap * cand.param.numel() + 1e-9):
                k -= 1  # never past the bound
            pruned_vectors.append(order[:k])
    else:
        scores = torch.cat([s for _, _, s, _ in layers])
        elems = torch.cat([e for *_, e in layers])
        owner = torch.cat([torch.full((s.numel(),), i, dtype=torch.int64) for i, (_, _, s, _) in enumerate(layers)])
        local = torch.cat([torch.arange(s.numel()) for _, _, s, _ in layers])
        target = sparsity * float(elems.sum())
        if not bounded:
            order = torch.argsort(scores, stable=True)
            chosen = order[: _how_many(elems[order], target)]
        else:
            reachable = sum(math.floor(c * m + 1e-9) for c, m in zip(caps, numels))
            if reachable < target - max(vec_n for _, vec_n, _, _ in layers):
                raise ConfigError(
                    f"max_layer_sparsity allows at most {reachable} of {int(elems.sum())} elements to be pruned "
                    f"({reachable / float(elems.sum()):.4f}), below the target sparsity {sparsity}"
                )
            chosen = _capped_global(scores, elems, owner, caps, numels, target)
        for i in range(len(layers)):
            pruned_vectors.append(local[chosen[owner[chosen] == i]])

    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for (cand, vec_n, scores, _), drop in zip(layers, pruned_vectors):
            keep = torch.ones(scores.numel(), dtype=torch.bool)
            keep[drop] = False
            p = cand.param
            mask = keep.repeat_interleave(vec_n)[: p.numel()].view(p.shape).to(p.device)
            p.masked_fill_(~mask, 0.0)
            masks[cand.fqn] = mask
    return masks


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """The fraction of masked-out (pruned) elements over all masks."""
    total = sum(m.numel() for m in masks.values())
    if not total:
        return 0.0
    return float(sum(int((~m.bool()).sum()) for m in masks.values())) / total

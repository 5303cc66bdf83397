"""Sequential error compensation (GPTQ's sequential mode): each layer's ``H`` from the inputs the already-quantized
earlier layers produce.

Before (``CompressConfig(sequential=False)``, the default)::

    H_l = E[x_l xᵀ_l]   with x_l from the FLOAT model          (one forward pass over the calibration batches)
    round every layer with its own H_l

After (``sequential=True``)::

    for each stage (layers that run one after another on the same input: a transformer's q, k, v):
        H_l = E[x̂_l x̂ᵀ_l]  with x̂_l from the model whose earlier layers already hold their decoded weights
        round the stage's layers with it, write their decoded weights into the float copy

Why: compensation then also absorbs the error the earlier layers already made to this layer's input (it aims
``Ŵ x̂`` at ``W x̂``, the float layer on the inputs it will really see). The steps are the ones ``target_bits`` solved
with the float-input ``H`` (solving them again through the sequential pass would cost one such pass per trial
step), so the rate drifts a little from the target; the record says by how much.

Cost and memory: one forward per stage, each stopped as soon as the stage's layers have seen their inputs (so on
average about half a forward per stage); one stage's ``H`` (and one layer's factor) is held at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..quantizer import quantize_array
from .calibrate import Calibration, collect_inputs
from .compensate import act_order, compensated_points, inverse_factor
from .select import Candidate

__all__ = ["sequential_points"]


def _param_of(model: torch.nn.Module, cand: Candidate) -> torch.nn.Parameter:
    owner, attr = cand.owners[0]
    module = model.get_submodule(owner) if owner else model
    return module._parameters[attr]


def sequential_points(
    calibration: Calibration,
    layers: list[tuple[Candidate, np.ndarray, Any, float, int | None, np.ndarray]],
    compensated: set[str],
    *,
    damping: float,
    exact_zero: bool,
    columns_by_energy: bool = False,
    metric: bool = False,
    fallback_points: Callable[[Candidate], np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Raw lattice points of every layer in ``compensated``, each rounded with ``H`` measured through the model
    whose earlier layers already hold their quantized weights.

    Args:
        calibration: from :func:`udnc_fx.passes.calibrate.collect_inputs`, with ``model`` (the float copy the
            inputs were measured on), ``stages`` and ``calls`` set. The copy's weights are changed while this runs
            and restored before it returns.
        layers: ``(candidate, weight, lattice, step, key, u_raw)`` for every selected weight (steps already
            solved; ``u_raw`` the raw dither of ``key``).
            Those not in ``compensated`` are plainly rounded and written into the copy first, since they are
            quantized whatever happens.
        compensated: fqns of the layers to round with error compensation.
        damping: as :func:`udnc_fx.passes.compensate.inverse_factor`.
        columns_by_energy: round columns in :func:`udnc_fx.passes.compensate.act_order` (``config.act_order``).
        exact_zero, metric: as :func:`udnc_fx.passes.compensate.compensated_points`.
        fallback_points: points to use when a layer's sequential ``H`` cannot be factored (the float-input
            compensation).

    Returns:
        ``(points, notes)``: fqn → raw points ``(num_vectors, n)``; fqn → how the layer's ``H`` was obtained.
    """
    model = calibration.model
    by_fqn = {cand.fqn: (cand, w, lat, step, u) for cand, w, lat, step, _, u in layers}
    keys = {cand.fqn: key for cand, _, _, _, key, _ in layers}
    saved: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}

    def install(fqn: str, raw_points: np.ndarray | None) -> None:
        cand, w, lat, step, u = by_fqn[fqn]
        q = quantize_array(w, lattice=lat.name, n=lat.dim, step=step, key=keys[fqn], exact_zero=exact_zero, u_raw=u,
                           raw_points=raw_points)
        param = _param_of(model, cand)
        saved.setdefault(fqn, (param, param.data))
        decoded = torch.from_numpy(q.decode(raw_dither=u).reshape(w.shape))
        param.data = decoded.to(param.device, param.dtype)

    points: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    try:
        with torch.no_grad():
            for fqn in by_fqn:
                if fqn not in compensated:
                    install(fqn, None)
            staged = {fqn for stage in calibration.stages for fqn in stage}
            for fqn in by_fqn:  # compensated with an H no stage re-measures (an Embedding's output sensitivity)
                if fqn in compensated and fqn not in staged:
                    points[fqn] = fallback_points(by_fqn[fqn][0])
                    notes[fqn] = "float-model H: no stage re-measures it (an Embedding's output sensitivity)"
                    install(fqn, points[fqn])
            for stage in calibration.stages:
                todo = [fqn for fqn in stage if fqn in compensated]
                if not todo:
                    continue
                cands = [by_fqn[fqn][0] for fqn in todo]
                measured = collect_inputs(model, cands, calibration.batches, stop_after=calibration.calls,
                                          mask_padding=calibration.mask_padding)
                for fqn in todo:
                    cand, w, lat, step, u = by_fqn[fqn]
                    rec = measured.inputs.get(fqn)
                    factors, perms = [], []
                    why = measured.fallback.get(fqn, "")
                    if rec is not None:
                        for g in range(rec.groups):
                            h = rec.hessian(g)
                            perm = act_order(h, lat.dim) if columns_by_energy else None
                            U, why = inverse_factor(h if perm is None else h[np.ix_(perm, perm)], damping)
                            if U is None:
                                factors = None
                                break
                            factors.append(U)
                            perms.append(perm)
                        measured.release(fqn)
                    if rec is None or factors is None:
                        points[fqn] = fallback_points(cand)
                        notes[fqn] = f"float-input H (sequential H unusable: {why})"
                    else:
                        w2 = w.reshape(w.shape[0], -1)
                        points[fqn] = compensated_points(w2, factors, lat, step, u, exact_zero=exact_zero, perms=perms,
                                                          metric=metric)
                        notes[fqn] = f"sequential H from {rec.rows} input rows through the quantized earlier layers"
                    del factors
                    install(fqn, points[fqn])
                del measured
    finally:
        for param, data in saved.values():
            param.data = data
    for fqn in compensated - points.keys():  # a layer no stage reached (cannot happen with collect_inputs' stages)
        points[fqn] = fallback_points(by_fqn[fqn][0])
        notes[fqn] = "float-input H (no stage ran it)"
    return points, notes

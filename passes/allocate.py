"""Sensitivity-aware step allocation: per-layer steps that spend one bit budget where it buys the most quality.

One relative step for every layer (``Δ_l = s·std_l``, what ``target_bits`` does) treats all layers alike, but a
bit taken from the word embeddings of a transformer costs far less output quality than one taken from a sensitive
FFN. This pass chooses the steps from high-rate theory:

* distortion: quantizing layer ``l`` alone with step ``Δ_l`` changes the model's output by ``D_l ≈ a_l·Δ_l²``
  (the dithered quantization error is uniform, independent of the weights and of the other layers, so the
  contributions add: ``D ≈ Σ a_l·Δ_l²``);
* rate: ``R_l ≈ N_l·(h_l − log2 Δ_l)`` bits for the layer's ``N_l`` weights.

Minimising ``D`` at fixed ``Σ R_l`` (Lagrange) gives ``a_l·Δ_l² ∝ N_l``: every layer pays the same distortion per
weight ("reverse water-filling"), i.e. ``Δ_l = c·sqrt(N_l / a_l)``. The common factor ``c`` is then solved so that
the weighted mean entropy over the layers hits ``target_bits`` exactly (the same solver ``target_bits`` uses).

Where ``a_l`` comes from (``method``):

* ``"probe"`` (needs ``calibration_inputs``): measured. Each selected tensor alone is quantized at the uniform
  operating point (the relative step that meets ``target_bits`` for all layers), with its own dither, and the mean
  squared change of ``output_fn(model, inputs)`` is recorded; ``a_l = D_l / Δ_l²``. ``L`` forward passes.
  ``refine`` re-probes at the allocated steps (``a_l`` is then measured where it is used) and solves again.
* ``"weights"`` (data-free): assumes every layer's relative output noise reaches the final output with the same
  weight, so ``a_l ∝ 1 / E[w_l²]`` and ``Δ_l ∝ sqrt(N_l)·rms(w_l)``: big layers (embeddings) get coarser relative
  steps than small ones. A heuristic; the probe is better when a few inputs are at hand.
* ``"uniform"``: ``Δ_l ∝ std_l`` (the plain ``target_bits`` behaviour), for comparison.

Weight statistics (kurtosis, largest ``|w|/std``) are reported for every layer but not used: the quantizer has no
clipping range, so outliers cost a few codewords rather than resolution (see docs and FINDINGS).

Before::

    compress(model, CompressConfig(target_bits=4.5))            # Δ_l = s·std_l for every layer

After::

    config = allocate_steps(model, CompressConfig(target_bits=4.5), calibration_inputs=batch, output_fn=embed)
    compress(model, config)                                      # overrides {fqn: LayerConfig(step=Δ_l)}
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..config import CompressConfig, LayerConfig
from ..errors import ConfigError
from ..lattice import get_lattice
from ..quantizer import coded_rate_bits_per_weight, entropy_bits_per_weight, quantize_array, vectors_of
from ..record import raw_dither, weight_key
from .quantize import layer_stats, solve_relative_step
from .select import Candidate, refuse_non_float32, select_weights
from .trace import prepare

__all__ = ["allocate", "allocate_steps", "Allocation", "LayerAllocation", "METHODS", "default_output_fn"]

METHODS = ("probe", "weights", "uniform")


@dataclass
class LayerAllocation:
    """One row of the allocation table."""

    fqn: str  # the parameter's fqn
    module: str  # the module fqn used as the override key
    numel: int
    std: float
    kurtosis: float  # excess kurtosis of the weights (0 for a Gaussian)
    peak_over_std: float  # max |w| / std
    sensitivity: float | None  # a_l / N_l: output distortion per weight per unit Δ² (None for fixed layers)
    probe_distortion: float | None  # D_l measured at the probe step (probe method)
    uniform_step: float | None  # Δ_l of the uniform allocation at the same target
    uniform_bits: float | None
    step: float
    relative_step: float  # Δ_l / std_l
    bits: float  # entropy of the layer's indices at the chosen step, bits per weight
    fixed: bool = False  # the config already fixed this layer's step: kept
    applied: bool = True  # the step is in the returned config (False: compress solves this layer's step)


@dataclass
class Allocation:
    """The result of :func:`allocate`: ``config`` (per-layer ``LayerConfig(step=...)`` overrides), a row per layer,
    and the figures behind them. ``str()`` is a table; ``to_dict()`` is JSON-able."""

    config: CompressConfig
    layers: list[LayerAllocation]
    method: str
    target_bits: float
    mean_bits: float
    uniform_relative_step: float
    probe_forwards: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_bits": self.target_bits,
            "mean_bits": self.mean_bits,
            "uniform_relative_step": self.uniform_relative_step,
            "probe_forwards": self.probe_forwards,
            "notes": list(self.notes),
            "layers": [asdict(r) for r in self.layers],
        }

    def __str__(self) -> str:
        head = ["fqn", "weights", "kurt", "max/std", "sens/w", "uniform Δ/std", "bits", "Δ/std", "bits"]
        med = np.median([r.sensitivity for r in self.layers if r.sensitivity]) if self.layers else 1.0

        def num(x, fmt):
            return "-" if x is None else format(x, fmt)

        rows = [
            [
                r.fqn,
                str(r.numel),
                f"{r.kurtosis:.1f}",
                f"{r.peak_over_std:.1f}",
                "fixed" if r.fixed else num(None if r.sensitivity is None else r.sensitivity / med, ".3g"),
                num(None if r.uniform_step is None else r.uniform_step / r.std if r.std else None, ".4f"),
                num(r.uniform_bits, ".3f"),
                f"{r.relative_step:.4f}",
                f"{r.bits:.3f}",
            ]
            for r in self.layers
        ]
        total = sum(r.numel for r in self.layers)
        ubits = [r.uniform_bits for r in self.layers if r.uniform_bits is not None]
        umean = (
            sum(r.uniform_bits * r.numel for r in self.layers if r.uniform_bits is not None) / total
            if len(ubits) == len(self.layers) and total
            else None
        )
        rows.append(["mean", str(total), "", "", "", "", num(umean, ".3f"), "", f"{self.mean_bits:.3f}"])
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        lines = [
            f"step allocation: method={self.method}, target {self.target_bits:g} bits/weight "
            f"(sens/w relative to the median layer; 'uniform' = one relative step s={self.uniform_relative_step:.4g})",
            "  ".join(h.ljust(w) for h, w in zip(head, widths)),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def default_output_fn(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run ``model`` on ``inputs`` (a tuple of positional arguments, a mapping of keyword arguments, or one value)
    and return its output tensor (the first tensor of a tuple, ``last_hidden_state``/``logits`` of a model output)."""
    if isinstance(inputs, tuple):
        out = model(*inputs)
    elif isinstance(inputs, Mapping):
        out = model(**inputs)
    else:
        out = model(inputs)
    return first_tensor(out)


def first_tensor(out: Any) -> torch.Tensor:
    """The tensor a model output stands for: the output itself, ``last_hidden_state``/``logits`` of a model output,
    or the first tensor of a mapping, tuple or list.

    Raises:
        ConfigError: no tensor is found (the caller should pass an ``output_fn``).
    """
    if isinstance(out, torch.Tensor):
        return out
    for name in ("last_hidden_state", "logits"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise ConfigError(f"cannot find an output tensor in a {type(out).__name__}: pass output_fn")


@dataclass
class _Layer:
    cand: Candidate
    module: str
    w: np.ndarray
    std: float
    lat: Any
    v: np.ndarray
    key: int | None
    u: np.ndarray
    fixed: bool
    overridable: bool = True


def _prepare(model: nn.Module, config: CompressConfig) -> tuple[nn.Module, list[_Layer], list[str]]:
    """Deep-copy, prepare (trace with the config's fallback) and select exactly as :func:`udnc_fx.compress` would.
    Returns the copy itself, not its graph: the probe runs ``output_fn`` on the model as the user wrote it."""
    work = copy.deepcopy(model)
    target, _ = prepare(work, config, inplace=True)  # the graph shares work's parameters: the probe swaps them
    gm = target if isinstance(target, fx.GraphModule) else None
    notes: list[str] = []
    if gm is None:
        notes.append("model not traceable: layers selected as the module-swap fallback would")
    candidates, _ = select_weights(target, config, gm)
    if not candidates:
        refuse_non_float32(work)
        raise ConfigError("no layer is selected for compression: nothing to allocate")
    per_module: dict[str, int] = {}
    for cand in candidates:
        per_module[cand.owners[0][0]] = per_module.get(cand.owners[0][0], 0) + 1
    layers = []
    for cand in candidates:
        w, std = layer_stats(cand)
        lat = get_lattice(cand.lattice, cand.n)
        v = vectors_of(w, lat.dim)
        key = weight_key(config.seed, cand.fqn, config.dithered)
        # Only a step given by an override is kept; a global step or relative_step is what allocation replaces.
        override = config.overrides.get(cand.override_key) if cand.override_key else None
        fixed = override is not None and (override.step is not None or override.relative_step is not None)
        if not fixed and std == 0.0:
            raise ConfigError(f"layer {cand.fqn} has all weights equal (std 0): give it a step or leave it float")
        if fixed and cand.step_kind == "step":
            cand.step = float(cand.step_value)
        elif fixed:
            cand.step = float(cand.step_value) * std
        module = cand.owners[0][0]
        # Overrides name modules: a weight owned by the root module, or by a module owning another selected weight
        # (bare Parameters used through F.linear), cannot get a step of its own.
        overridable = module != "" and per_module[module] == 1
        layers.append(
            _Layer(cand, module, w, std, lat, v, key, raw_dither(key, v.shape[0], lat), fixed, overridable)
        )
    return work, layers, notes


def _solve(layers: list[_Layer], scales: dict[int, float], target: float) -> float:
    """The common factor c with Δ_l = c·scales[l] for the free layers that meets ``target`` (fixed layers count)."""
    fixed_bits = fixed_numel = 0
    for L in layers:
        if L.fixed:
            rate = coded_rate_bits_per_weight(L.v, L.lat, L.cand.step, L.u, key=L.key, shape=L.w.shape)
            fixed_bits += rate * L.v.size
            fixed_numel += L.v.size
    # The solver searches a relative step in [1e-4, 1e3]: express the scales relative to each layer's std (their
    # geometric mean made 1) so that c is of the order of a relative step whatever units a_l came in.
    idx = [i for i, L in enumerate(layers) if not L.fixed]
    norm = math.exp(sum(math.log(scales[i] / layers[i].std) for i in idx) / len(idx))
    free = [
        (layers[i].v, scales[i] / norm, layers[i].lat, layers[i].u, layers[i].key, layers[i].w.shape) for i in idx
    ]
    return solve_relative_step(free, fixed_bits, fixed_numel, target) / norm


def _distortions(
    work: nn.Module, layers: list[_Layer], steps: dict[int, float], inputs: Any, output_fn: Callable, exact_zero: bool,
    progress: bool | None = None,
) -> dict[int, float]:
    """Mean squared output change when layer i alone is quantized at steps[i], for every i in ``steps``."""
    with torch.no_grad():
        reference = output_fn(work, inputs).detach().double()
        out = {}
        from ..progress import progress_bar

        # one forward per layer: minutes on a large model, so a bar (on a terminal only)
        for i, step in progress_bar(
            steps.items(), total=len(steps), desc="probing layer sensitivities", unit="layer", progress=progress
        ):
            L = layers[i]
            param = L.cand.param
            saved = param.data
            q = quantize_array(
                L.w, lattice=L.lat.name, n=L.lat.dim, step=step, key=L.key, exact_zero=exact_zero, u_raw=L.u
            )
            decoded = torch.from_numpy(q.decode(raw_dither=L.u).reshape(L.w.shape))
            param.data = decoded.to(dtype=saved.dtype, device=saved.device)
            try:
                test = output_fn(work, inputs).detach().double()
            finally:
                param.data = saved
            out[i] = float(((test - reference) ** 2).mean())
    return out


def allocate(
    model: nn.Module,
    config: CompressConfig | None = None,
    *,
    target_bits: float | None = None,
    calibration_inputs: Any = None,
    output_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    method: str | None = None,
    refine: int = 0,
    reuse: Allocation | None = None,
    progress: bool | None = None,
) -> Allocation:
    """Choose a step per layer so that ``target_bits`` (mean entropy per weight) gives the least output distortion.

    Args:
        model: the float model (deep-copied; never changed).
        config: the :class:`CompressConfig` to start from (selection, lattice, seed, fallback...). Layers it already
            gives a ``step``/``relative_step`` keep it and count towards the target.
        target_bits: mean bits per weight over the selected weights; default ``config.target_bits`` (or 3.0).
        calibration_inputs: one batch for the probe: a tuple of positional arguments, a mapping of keyword
            arguments, or a single input. A few dozen samples suffice.
        output_fn: ``output_fn(model, inputs) -> Tensor`` whose squared change is the distortion (default: the
            model's output tensor, see :func:`default_output_fn`). For sentence embeddings pass the normalised
            pooled embedding: its squared change is twice the cosine loss.
        method: ``"probe"`` (default when ``calibration_inputs`` is given), ``"weights"`` (data-free, the default
            otherwise) or ``"uniform"``.
        refine: extra probe rounds at the allocated steps (probe method only).
        reuse: an earlier :class:`Allocation` of the same model and selection whose per-layer sensitivities are
            reused (no probing): only the common scale is solved again, e.g. to try several targets.
        progress: a bar over the probes: ``None`` (default) on a terminal only, ``False`` never, ``True`` always.

    Returns:
        An :class:`Allocation`; ``allocation.config`` compresses with :func:`udnc_fx.compress`.

    Raises:
        ConfigError: bad arguments, no selected layer, or an unreachable target.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"allocate() needs an nn.Module, got {type(model).__name__}")
    config = CompressConfig() if config is None else config
    if not isinstance(config, CompressConfig):
        raise ConfigError(f"config must be a CompressConfig, got {type(config).__name__}")
    if target_bits is None:
        target_bits = config.effective_target_bits or CompressConfig.DEFAULT_TARGET_BITS
    if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or not 0 < target_bits <= 32:
        raise ConfigError(f"target_bits must be a number in (0, 32], got {target_bits!r}")
    if reuse is not None:
        if not isinstance(reuse, Allocation):
            raise ConfigError(f"reuse must be an Allocation, got {type(reuse).__name__}")
        if method is not None and method != reuse.method:
            raise ConfigError(f"reuse holds a {reuse.method!r} allocation, not {method!r}")
        method = reuse.method
    if method is None:
        method = "probe" if calibration_inputs is not None else "weights"
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if method == "probe" and calibration_inputs is None and reuse is None:
        raise ConfigError("method='probe' needs calibration_inputs (or use method='weights', which is data-free)")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ConfigError(f"refine must be an integer >= 0, got {refine!r}")
    output_fn = default_output_fn if output_fn is None else output_fn

    work, layers, notes = _prepare(model, config)
    work.eval()  # dropout off: the probe compares two deterministic runs
    free = [i for i, L in enumerate(layers) if not L.fixed]
    stds = {i: layers[i].std for i in free}
    s_uniform = _solve(layers, stds, target_bits) if free else float("nan")
    uniform_steps = {i: s_uniform * stds[i] for i in free}

    sens: dict[int, float] = {}
    probe: dict[int, float] = {}
    forwards = 0
    if reuse is not None:
        known = {r.fqn: r for r in reuse.layers}
        missing = [layers[i].cand.fqn for i in free if known.get(layers[i].cand.fqn) is None]
        if missing or any(known[layers[i].cand.fqn].sensitivity is None for i in free) and method != "uniform":
            raise ConfigError(f"reuse: the earlier allocation has no sensitivity for {missing[:3] or 'some layers'}")
        if method == "uniform":
            scales = dict(stds)
        else:
            for i in free:
                row = known[layers[i].cand.fqn]
                sens[i] = row.sensitivity
                if row.probe_distortion is not None:
                    probe[i] = row.probe_distortion
            scales = {i: 1.0 / math.sqrt(sens[i]) for i in free}
        notes.append(f"sensitivities reused from an earlier '{method}' allocation (no probing)")
    elif method == "uniform":
        scales = dict(stds)
    elif method == "weights":
        for i in free:
            rms2 = float(np.mean(layers[i].w.astype(np.float64) ** 2))
            sens[i] = 1.0 / (rms2 * layers[i].w.size)  # a_l / N_l with a_l = 1 / E[w²]
        scales = {i: 1.0 / math.sqrt(sens[i]) for i in free}
    else:
        probe_steps = dict(uniform_steps)
        for round_ in range(refine + 1):
            probe = _distortions(
                work, layers, probe_steps, calibration_inputs, output_fn, config.exact_zero, progress
            )
            forwards += len(probe_steps) + 1
            floor = max(max(probe.values()) * 1e-9, 1e-300)
            for i in free:
                if probe[i] <= 0.0:
                    notes.append(f"{layers[i].cand.fqn}: quantizing it alone did not change the output (unused?)")
                sens[i] = max(probe[i], floor) / (probe_steps[i] ** 2 * layers[i].w.size)
            scales = {i: 1.0 / math.sqrt(sens[i]) for i in free}
            if round_ < refine:
                c = _solve(layers, scales, target_bits)
                probe_steps = {i: c * scales[i] for i in free}
    c = _solve(layers, scales, target_bits) if free else float("nan")

    overrides = dict(config.overrides)
    rows = []
    total_bits = total = 0.0
    default_lat = get_lattice(config.lattice, config.n)
    for i, L in enumerate(layers):
        step = L.cand.step if L.fixed else c * scales[i]
        bits = entropy_bits_per_weight(L.v, L.lat, step, L.u)
        total_bits += bits * L.v.size
        total += L.v.size
        w = L.w.astype(np.float64).reshape(-1)
        centred = w - w.mean()
        var = float(np.mean(centred**2))
        kurt = float(np.mean(centred**4) / var**2 - 3.0) if var > 0 else 0.0
        if not L.fixed and not L.overridable:
            notes.append(
                f"{L.cand.fqn}: its module {L.module or '(the root)'} cannot take a per-layer step (overrides name "
                "modules); compress solves its step within the same target"
            )
        elif not L.fixed:
            same_lattice = (L.lat.name, L.lat.dim) == (default_lat.name, default_lat.dim)
            overrides[L.module] = LayerConfig(
                lattice=None if same_lattice else L.lat.name, n=None if same_lattice else L.lat.dim, step=step
            )
        rows.append(
            LayerAllocation(
                fqn=L.cand.fqn,
                module=L.module,
                numel=int(L.w.size),
                std=L.std,
                kurtosis=kurt,
                peak_over_std=float(np.abs(w).max() / L.std) if L.std > 0 else 0.0,
                sensitivity=sens.get(i),
                probe_distortion=probe.get(i),
                uniform_step=uniform_steps.get(i),
                uniform_bits=None
                if i not in uniform_steps
                else entropy_bits_per_weight(L.v, L.lat, uniform_steps[i], L.u),
                step=float(step),
                relative_step=float(step / L.std) if L.std > 0 else float("nan"),
                bits=float(bits),
                fixed=L.fixed,
                applied=L.fixed or L.overridable,
            )
        )
    if any(L.fixed for L in layers):
        notes.append("layers marked 'fixed' kept the step their config gave them")
    # Layers with an override keep their step; compress solves one relative step for any others (weights whose
    # module cannot be overridden) so that the whole still meets target_bits.
    new_config = config.replace(overrides=overrides, step=None, relative_step=None, target_bits=float(target_bits))
    return Allocation(
        config=new_config,
        layers=rows,
        method=method,
        target_bits=float(target_bits),
        mean_bits=total_bits / total if total else 0.0,
        uniform_relative_step=s_uniform,
        probe_forwards=forwards,
        notes=notes,
    )


def allocate_steps(
    model: nn.Module,
    config: CompressConfig | None = None,
    calibration_inputs: Any = None,
    output_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    *,
    target_bits: float | None = None,
    method: str | None = None,
    refine: int = 0,
) -> CompressConfig:
    """:func:`allocate` returning only the config (per-layer ``LayerConfig(step=...)`` overrides)."""
    return allocate(
        model,
        config,
        target_bits=target_bits,
        calibration_inputs=calibration_inputs,
        output_fn=output_fn,
        method=method,
        refine=refine,
    ).config

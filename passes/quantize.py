"""The quantize pass: serve each selected weight from a ``DitheredLatticeParam``.

Before::

    x → conv1(weight: f32[16,1,3,3]) → ...            (call_module conv1)

After::

    conv1_weight_q = self.conv1.weight_q()            (call_module: DitheredLatticeParam(indices:u8, C:f32[K×n], key))
    x → torch.conv2d(x, conv1_weight_q, self.conv1.bias, stride, padding, dilation, groups) → ...

The original op is kept (as its functional form) and fed the decoded weight; ``get_attr`` uses of a selected
weight (``F.linear(x, self.fc.weight)``) become ``call_module`` uses of its ``DitheredLatticeParam``. Weights the
graph cannot see (inside leaf modules, or every weight under the module-swap fallback) are served through a
``torch.nn.utils.parametrize`` parametrization of their module. The float weight is removed either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..config import CompressConfig
from ..errors import ConfigError, PassError
from ..lattice import get_lattice
from ..param import DitheredLatticeParam
from ..progress import progress_bar
from ..quantizer import (
    blocked_std,
    coded_rate_bits_per_weight,
    coded_rate_of_raw_points,
    quantize_array,
    quantize_with_sums,
    vectors_of,
    z1_rate_bits_chunked,
)
from ..record import raw_dither, weight_key
from ..record_store import set_record
from .compensate import act_order, compensated_points, inverse_factor
from .select import Candidate, Change, select_weights

__all__ = [
    "PassResult",
    "quantize",
    "install",
    "padded_conv",
    "ServeWeight",
    "solve_relative_step",
    "solve_scale",
    "make_params",
]


@dataclass
class PassResult:
    """What a pass returns: the rewritten module and every decision it made."""

    graph_module: nn.Module
    changes: list[Change] = field(default_factory=list)


class ServeWeight(nn.Module):
    """Parametrization that ignores the (emptied) original tensor and returns the decoded weight."""

    def __init__(self, dlp: DitheredLatticeParam):
        super().__init__()
        self.dlp = dlp

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.dlp()

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # Keep no float copy of the weight: the original becomes an empty tensor.
        return weight.new_empty(0)


def padded_conv(x, weight, bias, pad, mode, stride, dilation, groups, dim: int):
    """A convolution with a non-zero ``padding_mode`` (what ``nn.ConvNd._conv_forward`` does)."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    return conv(F.pad(x, pad, mode=mode), weight, bias, stride, 0, dilation, groups)


def _functional_call(module: nn.Module, node: fx.Node):
    """``(target, extra_args)`` for the functional form of a module call, or None if it cannot be rewritten."""
    if node.kwargs or len(node.args) != 1:
        return None
    if isinstance(module, nn.Linear):
        return F.linear, ()
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.padding_mode == "zeros":
            fn = (F.conv1d, F.conv2d, F.conv3d)[len(module.kernel_size) - 1]
            return fn, (module.stride, module.padding, module.dilation, module.groups)
        return padded_conv, (
            module._reversed_padding_repeated_twice,
            module.padding_mode,
            module.stride,
            module.dilation,
            module.groups,
            len(module.kernel_size),
        )
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        if module.padding_mode != "zeros":
            return None
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(module.kernel_size) - 1]
        return fn, (module.stride, module.padding, module.output_padding, module.groups, module.dilation)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return None  # max_norm renormalises the weight in place: keep the module (parametrized)
        return F.embedding, (module.padding_idx, None, module.norm_type, module.scale_grad_by_freq, module.sparse)
    return None


def _register(owner: nn.Module, attr: str, dlp: DitheredLatticeParam) -> str:
    name = f"{attr}_q"
    while name in owner._modules and owner._modules[name] is not dlp:
        name += "_"
    owner.add_module(name, dlp)
    return name


def install(model: nn.Module, candidates: list[Candidate], dlps: list[DitheredLatticeParam]) -> list[Change]:
    """Rewrite ``model`` (a GraphModule, or any module for the module-swap path) so each candidate's weight is
    served by its ``DitheredLatticeParam``. Returns one ``Change`` per parameter fqn served."""
    modules = dict(model.named_modules(remove_duplicate=False))
    gm = model if isinstance(model, fx.GraphModule) else None
    dlp_path: dict[str, str] = {}  # "owner.attr" -> path of the registered DitheredLatticeParam
    for cand, dlp in zip(candidates, dlps):
        first_owner, first_attr = cand.owners[0]
        name = _register(modules[first_owner], first_attr, dlp)
        path = f"{first_owner}.{name}" if first_owner else name
        for o, a in cand.owners:
            dlp_path[f"{o}.{a}" if o else a] = path

    remaining_calls: set[str] = set()
    if gm is not None:
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op == "get_attr" and node.target in dlp_path:
                with graph.inserting_before(node):
                    new = graph.call_module(dlp_path[node.target])
                node.replace_all_uses_with(new)
                graph.erase_node(node)
            elif node.op == "call_module" and f"{node.target}.weight" in dlp_path:
                module = modules[node.target]
                spec = _functional_call(module, node)
                if spec is None:
                    continue
                fn, extra = spec
                with graph.inserting_before(node):
                    weight = graph.call_module(dlp_path[f"{node.target}.weight"])
                    bias = None
                    if getattr(module, "bias", None) is not None:
                        bias = graph.get_attr(f"{node.target}.bias")
                    if fn is F.embedding:
                        args = (node.args[0], weight) + extra
                    else:
                        args = (node.args[0], weight, bias) + extra
                    new = graph.call_function(fn, args)
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
        graph.lint()
        gm.recompile()
        remaining_calls = {n.target for n in graph.nodes if n.op == "call_module"}
    changes: list[Change] = []
    for cand, dlp in zip(candidates, dlps):
        how = []
        for o, a in cand.owners:
            owner = modules[o]
            hidden = gm is None or any(
                o == leaf or o.startswith(leaf + ".") for leaf in remaining_calls if leaf not in dlp_path.values()
            )
            if hidden:
                # The graph cannot reach this weight (leaf module / no graph): serve it by parametrization.
                parametrize.register_parametrization(owner, a, ServeWeight(dlp), unsafe=True)
                how.append("module swap" if gm is None else f"parametrized inside leaf of '{o}'")
            else:
                owner._parameters[a] = None
                how.append("graph")
        fq = cand.fqn
        changes.append(
            Change(
                fq,
                "quantized",
                f"{dlp.lattice}{dlp.n if dlp.lattice == 'Z' else ''} step={dlp.step:.4g} K={dlp.num_codewords} "
                f"{dlp.entropy_bits():.3f} bits/weight via {', '.join(sorted(set(how)))}"
                + (f"; {cand.extra['rounding']}" if cand.extra.get("rounding") else ""),
            )
        )
        for o, a in cand.owners[1:]:
            changes.append(Change(f"{o}.{a}" if o else a, "shared", f"tied to {fq}: served by the same parameter"))
    return changes


def layer_stats(cand: Candidate) -> tuple[np.ndarray, float]:
    """A candidate's weight as float64 NumPy and its standard deviation (the unit of a relative step).

    Raises:
        ConfigError: the weight is empty or holds NaN/Inf values.
    """
    w = cand.param.detach().to("cpu", torch.float64).numpy()
    if w.size == 0:
        raise ConfigError(f"layer {cand.fqn} has zero elements: exclude it (override None) or remove it")
    if not np.isfinite(w).all():
        bad = int((~np.isfinite(w)).sum())
        raise ConfigError(f"layer {cand.fqn} has {bad} NaN/Inf weights: fix the model before compressing")
    return w, float(w.std())


def solve_relative_step(
    layers: list[tuple[np.ndarray, float, Any, np.ndarray]], fixed_bits: float, fixed_numel: int, target: float
) -> float:
    """Find one relative step ``s`` (Δ_l = s·std_l) so the weighted mean estimated coded rate over all layers
    (:func:`udnc_fx.quantizer.coded_rate_bits_per_weight`: index entropy for Z¹, and for vector lattices what the default
    coder writes for the smaller of indices plus a table of points and table-free ``lattice-coords``) is ``target``.

    ``layers``: ``(vectors, std, lattice, u_raw)`` or ``(vectors, std, lattice, u_raw, key, shape)`` for each layer
    solved for (the dither key and weight shape let the vector lattices' estimate count the dither contexts and row
    classes of the file); ``fixed_*``: the total bits and weights of layers with explicit steps. Entropy falls as the
    step grows; the search is on ``log s``.

    Raises:
        ConfigError: the target is outside what these layers can reach.
    """
    total = fixed_numel + sum(layer[0].size for layer in layers)

    def layer_bits(layer: tuple, s: float) -> float:
        v, std, lat, u, *rest = layer
        key, shape = rest if rest else (None, None)
        return coded_rate_bits_per_weight(v, lat, s * std, u, key=key, shape=shape) * v.size

    def mean_bits(s: float) -> float:
        return (fixed_bits + sum(layer_bits(layer, s) for layer in layers)) / total

    return solve_scale(mean_bits, target)


def solve_scale(mean_bits: Callable[[float], float], target: float, start: float = 1.0) -> float:
    """The ``s`` in [1e-4, 1e3] where the decreasing function ``mean_bits(s)`` equals ``target`` (within 0.1 %).

    ``start`` is the first ``s`` tried (a good guess saves evaluations, each of which quantizes every layer).

    Raises:
        ConfigError: the target is outside what ``mean_bits`` reaches on that range.
    """
    # Safeguarded secant on x = log s instead of plain bisection (why: each evaluation quantizes every layer, ~0.8 s
    # on all-MiniLM-L6-v2's 22.7M weights, and bisection needed ~13 of them). High-rate theory gives the first
    # moves (one bit per weight per halving of the step); once the target is bracketed, secant steps are kept at
    # least a tenth of the bracket away from its ends so the bracket always shrinks. Unreachable targets are
    # detected at the ends of the search range [1e-4, 1e3], with the messages bisection gave.
    lo, hi = math.log(1e-4), math.log(1e3)
    tol = 1e-3 * target
    fine: tuple[float, float] | None = None  # (x, bits) with bits > target: the step must grow
    coarse: tuple[float, float] | None = None  # (x, bits) with bits < target
    x = min(max(math.log(start), lo), hi) if start > 0 and math.isfinite(start) else 0.0
    for _ in range(60):
        bits = mean_bits(math.exp(x))
        if abs(bits - target) <= tol:
            return math.exp(x)
        if bits > target:
            if x >= hi:
                raise ConfigError(
                    f"target_bits={target} cannot be met: the coarsest step still costs {bits:.3f} bits/weight"
                )
            fine = (x, bits)
        else:
            if x <= lo:
                raise ConfigError(
                    f"target_bits={target} cannot be met: at the finest step tried these layers reach {bits:.3f} "
                    "bits/weight (small layers saturate: each vector already has its own codeword)"
                )
            coarse = (x, bits)
        if fine is not None and coarse is not None:
            (xa, ba), (xb, bb) = fine, coarse
            width = xb - xa
            guess = xa + (ba - target) * width / (ba - bb) if ba != bb else xa + 0.5 * width
            x = min(max(guess, xa + 0.1 * width), xb - 0.1 * width)
        else:
            x = min(max(x + (bits - target) * math.log(2.0) * 1.1, lo), hi)
    if fine is None or coarse is None:
        return math.exp(x)
    return math.exp(0.5 * (fine[0] + coarse[0]))


def factor_groups(hessians: list[np.ndarray], lat, config: CompressConfig, damping: float | None = None):
    """``((factors, perms), note)`` for compensated rounding with one ``H`` per group (act-order permutation and
    damped inverse Cholesky factor, :mod:`udnc_fx.passes.compensate`; ``damping`` defaults to ``config.damping``),
    or ``(None, why not)``."""
    factors, perms, notes = [], [], []
    damping = config.damping if damping is None else damping
    for h in hessians:
        perm = act_order(h, lat.dim) if config.act_order else None
        U, note = inverse_factor(h if perm is None else h[np.ix_(perm, perm)], damping)
        if U is None:
            return None, note
        factors.append(U)
        perms.append(perm)
        if note:
            notes.append(note)
    return (factors, perms), "; ".join(sorted(set(notes)))


def _compensation_factors(cand: Candidate, lat, calibration: Any, config: CompressConfig):
    """``(factors, note)`` for a candidate: per-group Cholesky factors of ``H⁻¹`` when compensated rounding applies
    (cached on ``calibration``: they do not depend on the seed), else ``(None, why plain rounding)``."""
    if calibration is None:
        return None, None
    if not config.compensate:
        return None, "plain rounding (compensate=False)"
    if cand.fqn in calibration.fallback:
        return None, f"plain rounding: {calibration.fallback[cand.fqn]}"
    rec = calibration.inputs.get(cand.fqn)
    if rec is None:
        return None, "plain rounding: not calibrated"
    if rec.d % lat.dim:
        return None, f"plain rounding: a row of {rec.d} weights does not split into {lat.dim}-vectors"
    cache = calibration.__dict__.setdefault("_factors", {})
    damping = getattr(calibration, "dampings", {}).get(cand.fqn, config.damping)  # the probe's choice, if any
    key = (cand.fqn, damping, config.act_order)
    if key not in cache and rec.sums is None:
        return None, "plain rounding: its H was released after factoring with another damping or column order"
    if key not in cache:
        cache[key] = factor_groups([rec.hessian(g) for g in range(rec.groups)], lat, config, damping)
        calibration.release(cand.fqn)  # the factors replace H: hold one d×d array per layer, not two
    factors, note = cache[key]
    if factors is None:
        return None, f"plain rounding: {note}"
    order = ", columns by decreasing H_jj" if config.act_order else ""
    source = "output-sensitivity H from {} token rows" if rec.source == "output" else "H from {} input rows"
    if config.metric_rounding and lat.dim > 1:
        order += ", points nearest in H's metric"
    if damping != config.damping:
        order += f", damping {damping:g} (least held-out probe error)"
    how = f"compensated rounding ({source.format(rec.rows)}{order}{', ' + note if note else ''})"
    return factors, how


def make_params(
    candidates: list[Candidate], config: CompressConfig, calibration: Any = None, *, progress: bool | None = None
) -> list[DitheredLatticeParam]:
    """Resolve every candidate's step and quantize it (validating all layers before anything is changed).

    With ``calibration`` (:class:`udnc_fx.passes.calibrate.Calibration`), layers with a known input second moment
    are rounded with error compensation (:mod:`udnc_fx.passes.compensate`), ``target_bits`` is met by the indices
    that rounding really produces, and, when ``calibration.scales`` holds an allocation, each layer's step is
    ``c·scale_l`` instead of ``s·std_l``. Each candidate's ``extra["rounding"]`` says how it was rounded.
    """
    if _streamable(candidates, calibration):
        return _stream_params(candidates, config, progress)
    stats = [layer_stats(c) for c in candidates]
    prepared = []
    comp: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}  # id(cand) -> (w as rows × d, factors)
    for cand, (w, std) in zip(candidates, stats):
        lat = get_lattice(cand.lattice, cand.n)
        v = vectors_of(w, lat.dim)
        if v.shape[0] * lat.dim > 2**32:
            raise ConfigError(f"layer {cand.fqn} is too large for the 32-bit dither counter")
        key = weight_key(config.seed, cand.fqn, config.dithered)
        _set_fixed_step(cand, std)
        factors, how = _compensation_factors(cand, lat, calibration, config)
        if how is not None:
            cand.extra["rounding"] = how
        if factors is not None:
            comp[id(cand)] = (w.reshape(w.shape[0], -1), factors)
        prepared.append((cand, w, std, lat, v, key))
    us = {id(p[0]): raw_dither(p[5], p[4].shape[0], p[3]) for p in prepared}
    last_points: dict[int, tuple[float, np.ndarray]] = {}  # the latest compensated rounding of each layer

    def points_of(cand, lat, step, exact_zero) -> np.ndarray:
        cached = last_points.get(id(cand))
        if cached is not None and cached[0] == step:
            return cached[1]
        w2, (factors, perms) = comp[id(cand)]
        pts = compensated_points(w2, factors, lat, step, us[id(cand)], exact_zero=exact_zero, perms=perms,
                                 metric=config.metric_rounding)
        last_points[id(cand)] = (step, pts)
        return pts

    keys = {id(p[0]): (p[5], tuple(p[1].shape)) for p in prepared}

    def bits_of(cand, lat, v, step) -> float:
        key, shape = keys[id(cand)]
        if id(cand) in comp:
            points = points_of(cand, lat, step, config.exact_zero)
            return coded_rate_of_raw_points(points, lat, key=key, shape=shape, exact_zero=config.exact_zero) * v.size
        rate = coded_rate_bits_per_weight(v, lat, step, us[id(cand)], key=key, shape=shape, exact_zero=config.exact_zero)
        return rate * v.size

    to_solve = [p for p in prepared if p[0].step_kind == "target_bits"]
    if to_solve:
        target = config.effective_target_bits
        # Sums by math.fsum (exact, so independent of the layers' order): compress_checkpoint visits a checkpoint's
        # tensors in the file's order, not the model's, and must find the same step to the last bit.
        fixed_terms, fixed_numel = [], 0
        for cand, w, std, lat, v, key in prepared:
            if cand.step_kind != "target_bits":
                fixed_terms.append(bits_of(cand, lat, v, cand.step))
                fixed_numel += v.size
        scales = {id(p[0]): p[2] for p in to_solve}
        allocated = calibration is not None and calibration.scales is not None
        if allocated:
            for p in to_solve:
                scales[id(p[0])] = calibration.scales.get(p[0].fqn, p[2])
            # keep the common factor near a relative step (the solver searches [1e-4, 1e3])
            norm = math.exp(sum(math.log(scales[id(p[0])] / p[2]) for p in to_solve) / len(to_solve))
            scales = {k: v / norm for k, v in scales.items()}
        total = fixed_numel + sum(p[4].size for p in to_solve)

        def mean_bits(s: float) -> float:
            bits = math.fsum(fixed_terms + [bits_of(p[0], p[3], p[4], s * scales[id(p[0])]) for p in to_solve])
            return bits / total

        # With a probed allocation, the probe's plain-rounding solution is a close first guess (the scales are
        # normalised to the same geometric mean as the standard deviations it multiplied): on all-MiniLM-L6-v2 at
        # 3.3 bits, 4 evaluations of every layer's compensated rounding instead of 5 from s = 1.
        start = getattr(calibration, "probe_step", None) if allocated else None
        s = solve_scale(mean_bits, target, start=start or 1.0)
        for p in to_solve:
            p[0].step = s * scales[id(p[0])]
            p[0].extra["relative_step"] = p[0].step / p[2]
    sequential: dict[int, np.ndarray] = {}
    if comp and config.sequential and getattr(calibration, "model", None) is not None:
        sequential = _sequential(prepared, comp, us, config, calibration, points_of)
    dlps = []
    bar = progress_bar(prepared, desc="quantizing", unit="layer", progress=progress) if len(prepared) > 1 else prepared
    for cand, w, std, lat, v, key in bar:
        if id(cand) in sequential:
            raw_points = sequential[id(cand)]
        else:
            raw_points = points_of(cand, lat, cand.step, config.exact_zero) if id(cand) in comp else None
        q = quantize_array(
            w,
            lattice=lat.name,
            n=lat.dim,
            step=cand.step,
            key=key,
            exact_zero=config.exact_zero,
            u_raw=us[id(cand)],
            raw_points=raw_points,
        )
        decoded = q.decode(raw_dither=us[id(cand)]).reshape(-1).astype(np.float64)
        err = float(((decoded - w.reshape(-1)) ** 2).sum())
        sig = float((w**2).sum())
        # the record keeps the codewords' integer coordinates: the container stores those instead of floats while
        # fine-tuning leaves the codebook untouched
        dlps.append(_served(q, cand, sig, err, std))
    return dlps


def _set_fixed_step(cand: Candidate, std: float) -> None:
    """``cand.step`` from an absolute or relative step (``target_bits`` steps are solved later, over all layers)."""
    if cand.step_kind == "step":
        cand.step = float(cand.step_value)
    elif std == 0.0:
        raise ConfigError(
            f"layer {cand.fqn} has all weights equal (std 0): a relative step is undefined; give it an absolute "
            f"step with overrides={{'{cand.owners[0][0]}': LayerConfig(step=...)}} or leave it float (None)"
        )
    elif cand.step_kind == "relative_step":
        cand.step = float(cand.step_value) * std


def _served(q, cand: Candidate, sig: float, err: float, std: float) -> DitheredLatticeParam:
    """The module that serves one weight: the record, its names, its SQNR (``sig``/``err``: the weight's and the
    rounding error's sums of squares) and the relative step it was rounded with."""
    dlp = DitheredLatticeParam.from_record(
        q,
        fqn=cand.fqn,
        aliases=tuple(f"{o}.{a}" if o else a for o, a in cand.owners[1:]),
        sqnr_db=10 * math.log10(sig / err) if err > 0 else math.inf,
    ).to(cand.param.device)
    dlp.relative_step = cand.step / std if std > 0 else None
    return dlp


def _streamable(candidates: list[Candidate], calibration: Any) -> bool:
    """Whether :func:`_stream_params` applies: plain rounding (no calibration), and every step known up front or
    every layer on Z¹ (whose ``target_bits`` rate estimate, the index entropy, is counted chunk by chunk)."""
    if calibration is not None:
        return False
    if all(c.step_kind != "target_bits" for c in candidates):
        return True
    return all(get_lattice(c.lattice, c.n).name == "Z" and get_lattice(c.lattice, c.n).dim == 1 for c in candidates)


def _native_flat(cand: Candidate) -> np.ndarray:
    """A candidate's weight as a flat NumPy array in its own float dtype (no copy for a contiguous float32/float64
    CPU tensor; other float dtypes go through float32, exactly)."""
    t = cand.param.detach().to("cpu")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.numpy().reshape(-1)


#: Threads that quantize independent layers at once in the streaming path (``None``: the environment's
#: ``UDNC_THREADS``, else the CPU count, at most 4). Used only with the native kernels, which release the GIL; the
#: result is the same bit for bit whatever the count (tests/passes/test_quantize_threads.py).
LAYER_THREADS: int | None = None


class _Serial:
    """``ThreadPoolExecutor``'s ``map`` in the caller's thread (one worker: no thread at all)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def _layer_threads(largest: int):
    """An executor for per-layer work: threads when the native kernels run the loops (``largest``: the largest
    layer's size, which decides whether they load, :func:`udnc_fx.dither.native`), else the caller's thread."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from ..dither import native

    count = LAYER_THREADS
    if count is None:
        env = os.environ.get("UDNC_THREADS", "")
        count = int(env) if env.isdigit() and int(env) > 0 else min(4, os.cpu_count() or 1)
    if count <= 1 or native(largest) is None:
        return _Serial()
    return ThreadPoolExecutor(max_workers=count, thread_name_prefix="udnc-quantize")


def _stream_params(candidates: list[Candidate], config: CompressConfig, progress: bool | None):
    """:func:`make_params` for absolute and relative steps without calibration, one layer at a time.

    The same steps, indices and SQNR bit for bit as the general path, but no float64 copy of any weight and no
    cached dither: the standard deviation and the SQNR are summed block by block in NumPy's own order
    (:func:`udnc_fx.quantizer.blocked_std` / :func:`~udnc_fx.quantizer.blocked_sum`) and the quantizer regenerates
    the dither chunk by chunk, so the memory added is that of one layer's indices plus a few MiB.
    """
    with _layer_threads(max((c.param.numel() for c in candidates), default=0)) as pool:
        # Layers are independent: each one's numbers are the same whichever thread computes them. Results are taken
        # in the layers' order, so errors are raised for the first bad layer and modules are built in order, here.
        return _stream_params_on(pool, candidates, config, progress)


def _stream_params_on(pool, candidates: list[Candidate], config: CompressConfig, progress: bool | None):
    """:func:`_stream_params` with the per-layer work mapped on ``pool`` (an executor's ``map``, in order)."""

    def measured(cand: Candidate) -> tuple[float | None, int]:
        """``(std, 0)``, or ``(None, number of NaN/Inf weights)``; ``(None, 0)`` for a layer refused by size."""
        lat = get_lattice(cand.lattice, cand.n)
        flat = _native_flat(cand)
        if flat.size == 0 or -(-flat.size // lat.dim) * lat.dim > 2**32:
            return None, 0
        try:
            return blocked_std(flat), 0
        except ConfigError:
            return None, int((~np.isfinite(flat)).sum())

    lats, keys, stds = [], [], []
    for cand, (std, bad) in zip(candidates, pool.map(measured, candidates)):  # validate every layer first
        lat = get_lattice(cand.lattice, cand.n)
        numel = cand.param.numel()
        if numel == 0:
            raise ConfigError(f"layer {cand.fqn} has zero elements: exclude it (override None) or remove it")
        if -(-numel // lat.dim) * lat.dim > 2**32:
            raise ConfigError(f"layer {cand.fqn} is too large for the 32-bit dither counter")
        if std is None:
            raise ConfigError(f"layer {cand.fqn} has {bad} NaN/Inf weights: fix the model before compressing")
        _set_fixed_step(cand, std)
        stds.append(std)
        lats.append(lat)
        keys.append(weight_key(config.seed, cand.fqn, config.dithered))
    to_solve = [i for i, c in enumerate(candidates) if c.step_kind == "target_bits"]
    if to_solve:
        # make_params' solve on Z¹ (every layer is, see _streamable), each layer's index entropy counted chunk by
        # chunk: the same sums (math.fsum), hence the same step, bit for bit
        def bits(i: int, step: float) -> float:
            flat = _native_flat(candidates[i])
            return z1_rate_bits_chunked(flat, step, keys[i]) * flat.size

        fixed = [i for i, c in enumerate(candidates) if c.step_kind != "target_bits"]
        fixed_terms = list(pool.map(lambda i: bits(i, candidates[i].step), fixed))
        fixed_numel = sum(candidates[i].param.numel() for i in fixed)
        total = fixed_numel + sum(candidates[i].param.numel() for i in to_solve)

        def mean_bits(s: float) -> float:
            return math.fsum(fixed_terms + list(pool.map(lambda i: bits(i, s * stds[i]), to_solve))) / total

        s = solve_scale(mean_bits, config.effective_target_bits, start=1.0)
        for i in to_solve:
            candidates[i].step = s * stds[i]
            candidates[i].extra["relative_step"] = candidates[i].step / stds[i]

    def quantized(item) -> tuple:
        cand, lat, key, _ = item
        flat = _native_flat(cand)
        # with the general path's float((w ** 2).sum()) and float(((decoded - w) ** 2).sum()), in the same order
        return quantize_with_sums(
            flat.reshape(tuple(cand.param.shape)), lattice=lat.name, n=lat.dim, step=cand.step, key=key,
            exact_zero=config.exact_zero,
        )

    dlps = []
    items = list(zip(candidates, lats, keys, stds))
    shown = progress if len(items) > 1 else False
    bar = progress_bar(total=len(items), desc="quantizing", unit="layer", progress=shown)
    with bar:
        for (cand, lat, key, std), (q, sig, err) in zip(items, pool.map(quantized, items)):
            dlps.append(_served(q, cand, sig, err, std))
            bar.update(1)
    return dlps


def _sequential(prepared, comp, us, config, calibration, points_of) -> dict[int, np.ndarray]:
    """Points of the compensated layers from :func:`udnc_fx.passes.sequential.sequential_points` (keyed by
    ``id(cand)``), with each layer's rounding note updated."""
    from .sequential import sequential_points

    layers = [(cand, w, lat, cand.step, key, us[id(cand)]) for cand, w, std, lat, v, key in prepared]
    lat_of = {cand.fqn: lat for cand, w, std, lat, v, key in prepared}
    points, notes = sequential_points(
        calibration,
        layers,
        {cand.fqn for cand, *_ in prepared if id(cand) in comp},
        damping=config.damping,
        exact_zero=config.exact_zero,
        columns_by_energy=config.act_order,
        metric=config.metric_rounding,
        fallback_points=lambda c: points_of(c, lat_of[c.fqn], c.step, config.exact_zero),
    )
    out = {}
    for cand, *_ in prepared:
        if cand.fqn in points:
            out[id(cand)] = points[cand.fqn]
            cand.extra["rounding"] = f"compensated rounding ({notes[cand.fqn]})"
    return out


def quantize(
    model: nn.Module,
    config: CompressConfig,
    *,
    calibration: Any = None,
    progress: bool | None = None,
    how: str | None = None,
    sources: dict[int, tuple[nn.Parameter, torch.Tensor]] | None = None,
) -> PassResult:
    """Quantize the selected weights of ``model`` (a traced ``GraphModule``, or a plain module for the
    module-swap fallback) in place, and record every decision.

    ``calibration`` (from :func:`udnc_fx.passes.calibrate.collect_inputs` on this same model) turns on
    error-compensating rounding where a layer's input second moment is known; see :func:`make_params`.
    ``how``: how ``model`` was prepared (:func:`udnc_fx.passes.trace.prepare`'s note), stored with the config and
    the changes in the model's compression record (:mod:`udnc_fx.record_store`).
    ``sources`` (:func:`udnc_fx.passes.trace.hollow_copy`'s): each selected weight that is a placeholder there is
    read from its source instead (the user's parameter, never changed).

    Raises:
        ConfigError: bad weights (NaN/Inf, empty, constant with a relative step) or an unreachable target rate;
            raised before anything is changed.
        PassError: ``config.strict`` and a layer would have been skipped.
    """
    gm = model if isinstance(model, fx.GraphModule) else None
    candidates, changes = select_weights(model, config, gm)
    if config.strict and changes:
        raise PassError("strict mode: " + "; ".join(f"{c.fqn}: {c.reason}" for c in changes))
    for cand in candidates if sources else ():
        entry = sources.get(id(cand.param))
        if entry is not None:
            cand.param = entry[1]
    dlps = make_params(candidates, config, calibration, progress=progress)
    changes = install(model, candidates, dlps) + changes
    set_record(model, config=config, changes=changes, trace=how)
    return PassResult(model, changes)

"""Fold eval-mode BatchNorm into the Conv/Linear before it, so the BatchNorm disappears from the graph.

Before::

    x → conv1(weight W, bias b) → bn1(γ, β, running_mean μ, running_var σ², eps ε) → ...

After (``fold_batchnorm(model)``)::

    x → conv1(weight W·s, bias (b − μ)·s + β) → ...        with s = γ / √(σ² + ε) per output channel

The folded model computes what the original computes in **eval mode** (BatchNorm using its running statistics),
up to float rounding; the new weights are computed in float64 and rounded once. On a small model this removes
every BatchNorm tensor from a compressed file (four vectors and a counter per BatchNorm) and the BatchNorm's
per-channel scale is then carried by the quantized weight itself.

Matched patterns (the Conv/Linear output must feed the BatchNorm and nothing else, each module must be called
exactly once, and the BatchNorm must keep running statistics):

- ``Conv1d → BatchNorm1d``, ``Conv2d → BatchNorm2d``, ``Conv3d → BatchNorm3d`` (any groups, with or without bias);
- ``Linear → BatchNorm1d``, only where the Linear's output is known to be 2-D ``(N, C)`` (pass ``example_inputs``:
  BatchNorm1d normalises dimension 1, which is the Linear's feature dimension only for 2-D outputs).

Every other BatchNorm is left alone with a recorded reason: ``fold_report(gm)`` (also ``gm.meta["udnc_fold"]``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from ..config import CompressConfig
from ..errors import ConfigError, UnsupportedModelError
from .trace import prepare

__all__ = ["fold_batchnorm", "fold_report", "FoldRecord"]

_CONV_FOR_BN = {nn.BatchNorm1d: nn.Conv1d, nn.BatchNorm2d: nn.Conv2d, nn.BatchNorm3d: nn.Conv3d}
_BN_TYPES = tuple(_CONV_FOR_BN)


@dataclass(frozen=True)
class FoldRecord:
    """One BatchNorm: folded into ``layer`` or left alone (``reason``)."""

    bn: str
    layer: str | None
    folded: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def fold_report(gm: nn.Module) -> list[FoldRecord]:
    """The records :func:`fold_batchnorm` left on its result (empty for any other module)."""
    meta = getattr(gm, "meta", None)
    return list(meta.get("udnc_fold", [])) if isinstance(meta, dict) else []


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:  # pragma: no cover - fx guarantees call_module targets exist
        return None


def _output_rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def _why_not(gm: fx.GraphModule, bn_node: fx.Node, bn: nn.Module, calls: dict[str, int], shaped: bool) -> str | None:
    """Why ``bn_node`` cannot be folded into its input, or None when it can."""
    if type(bn) not in _CONV_FOR_BN:
        return f"{type(bn).__name__} is not BatchNorm1d/2d/3d"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm keeps no running statistics (it normalises with batch statistics even in eval mode)"
    if calls.get(bn_node.target, 0) != 1:
        return f"the BatchNorm module is called {calls.get(bn_node.target, 0)} times in the graph"
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return "the BatchNorm call has extra arguments"
    src = bn_node.args[0]
    if not isinstance(src, fx.Node):
        return "the BatchNorm input is not a graph value"
    layer = _module(gm, src)
    if layer is None:
        return f"its input is not a Conv/Linear module call (it is {src.op} {src.target})"
    want = _CONV_FOR_BN[type(bn)]
    if type(layer) is nn.Linear:
        if type(bn) is not nn.BatchNorm1d:
            return f"Linear '{src.target}' feeds a {type(bn).__name__} (only BatchNorm1d follows a Linear)"
        if layer.out_features != bn.num_features:
            return f"Linear '{src.target}' has {layer.out_features} outputs, the BatchNorm {bn.num_features} features"
        if not shaped:
            return (f"Linear '{src.target}' → BatchNorm1d: pass example_inputs to check the Linear output is 2-D "
                    "(BatchNorm1d normalises dimension 1, the Linear's features only for (N, C) outputs)")
        rank = _output_rank(src)
        if rank != 2:
            return f"Linear '{src.target}' output has rank {rank}, not 2: BatchNorm1d normalises another dimension"
    elif type(layer) is want:
        if layer.out_channels != bn.num_features:
            return f"'{src.target}' has {layer.out_channels} channels, the BatchNorm {bn.num_features}"
        if shaped and _output_rank(src) != layer.weight.dim():
            return f"'{src.target}' runs on unbatched input (output rank {_output_rank(src)}): channels are not dim 1"
    else:
        return f"its input is {type(layer).__name__} '{src.target}', not a {want.__name__} or Linear"
    if calls.get(src.target, 0) != 1:
        return f"'{src.target}' is called {calls.get(src.target, 0)} times in the graph"
    if len(src.users) != 1:
        others = sorted(u.name for u in src.users if u is not bn_node)
        return f"the output of '{src.target}' is also used by {others}"
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.is_meta or not weight.is_floating_point():
        return f"'{src.target}' has no floating-point weight parameter"
    if nn.utils.parametrize.is_parametrized(layer):
        return f"'{src.target}' is parametrized (already compressed?)"
    return None


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    w = layer.weight
    dtype = torch.float64
    mean = bn.running_mean.to(dtype)
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    bias = shift if layer.bias is None else layer.bias.to(dtype) * scale + shift
    shape = (-1,) + (1,) * (w.dim() - 1)
    w.copy_((w.to(dtype) * scale.view(shape)).to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(bias.to(layer.bias.dtype))


def fold_batchnorm(
    model: nn.Module, *, example_inputs: Any = None, leaf_modules: tuple = ()
) -> fx.GraphModule:
    """Fold every BatchNorm that follows a Conv/Linear into it (eval-mode semantics); the model is not changed.

    Args:
        model: any ``nn.Module`` torch.fx can trace (or a ``GraphModule``); deep-copied first.
        example_inputs: optional input (a tensor or a tuple of them) used to learn every value's shape, which
            ``Linear → BatchNorm1d`` needs (and which makes the Conv checks exact).
        leaf_modules: module types or class names the tracer keeps as leaves (as ``CompressConfig.leaf_modules``).

    Returns:
        An ``fx.GraphModule`` without the folded BatchNorms (their submodules removed), in the input's train/eval
        mode. In eval mode its outputs equal the original's eval-mode outputs up to float rounding. Records in
        ``fold_report(gm)``: one :class:`FoldRecord` per BatchNorm module call.

    Raises:
        UnsupportedModelError: torch.fx cannot trace the model.
        ConfigError: ``model`` is not an ``nn.Module``, or ``leaf_modules`` holds something other than module
            classes or class names.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fold_batchnorm() needs an nn.Module, got {type(model).__name__}")
    modes = {name: m.training for name, m in model.named_modules()}
    # Folding rewrites the graph: there is no module-swap fallback, so an untraceable model is refused.
    gm, _ = prepare(model, CompressConfig(leaf_modules=tuple(leaf_modules), fallback="error"))
    shaped = example_inputs is not None
    if shaped:
        from torch.fx.passes.shape_prop import ShapeProp

        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    records: list[FoldRecord] = []
    folded_targets = []
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        reason = _why_not(gm, node, bn, calls, shaped)
        if reason is not None:
            records.append(FoldRecord(bn=node.target, layer=None, folded=False, reason=reason))
            continue
        src = node.args[0]
        _fold_into(gm.get_submodule(src.target), bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded_targets.append(node.target)
        records.append(FoldRecord(bn=node.target, layer=src.target, folded=True))
    for target in folded_targets:
        gm.delete_submodule(target)
    gm.graph.lint()
    gm.recompile()
    for name, m in gm.named_modules():  # the trace shares the copy's submodules; the root is new
        m.training = modes.get(name, modes[""])
    gm.meta["udnc_fold"] = records
    return gm

"""The prepare step: ``nn.Module`` → a deep copy ready for the passes, traced by torch.fx when it can be.

:func:`prepare` is the one place that deep-copies the user's model and traces it with the config's leaves, falling
back to module swapping (no graph) as ``config.fallback`` says; ``compress``, ``load``, ``allocate``, ``prune`` and
``fold_batchnorm`` all start with it, so a model is traced (or refused) the same way whichever verb sees it.
:func:`trace_model` is the bare trace, with failures that say what to do.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CompressConfig

__all__ = ["prepare", "hollow_parameter", "hollow_copy", "restore_hollow", "trace_model", "UdncTracer", "TRACED", "FALLBACK_PREFIX"]

#: ``prepare``'s note for a model torch.fx traced (recorded as the compression record's ``"trace"``).
TRACED = "torch.fx symbolic trace"
#: How ``prepare``'s note for an untraceable model starts; the tracer's reason follows.
FALLBACK_PREFIX = "module-swap fallback (no graph)"


class UdncTracer(fx.Tracer):
    """``fx.Tracer`` that keeps the given module types (or class names) as leaves and remembers which module
    it was inside when tracing failed, so the error can name it."""

    def __init__(self, leaf_modules: Iterable[Any] = ()):
        super().__init__()
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self._stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types) or type(m).__name__ in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        fqn = self.path_of_module(m)
        self._stack.append((fqn, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._stack[-1]
            raise
        finally:
            self._stack.pop()


def trace_model(
    model: nn.Module, *, leaf_modules: Iterable[Any] = (), concrete_args: dict[str, Any] | None = None
) -> fx.GraphModule:
    """Symbolically trace ``model`` (which is not copied: callers deep-copy first).

    Before: ``model`` (any ``nn.Module``). After: an ``fx.GraphModule`` sharing ``model``'s submodules.

    Raises:
        UnsupportedModelError: torch.fx cannot trace the model; the message names the innermost module being
            traced and the remedies (mark it a leaf, or ``fallback="module_swap"``).
    """
    tracer = UdncTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, RuntimeError...: all mean "not traceable"
        where = "at the top level"
        remedy = "use CompressConfig(fallback='module_swap')"
        if tracer.failed_in is not None and tracer.failed_in[0]:
            fqn, kind = tracer.failed_in
            where = f"inside module '{fqn}' ({kind})"
            remedy = (
                f"mark it a leaf with CompressConfig(leaf_modules=({kind!r},)) (its own Linear/Conv weights are then "
                f"quantized without a graph), or use CompressConfig(fallback='module_swap')"
            )
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__} {where}: {type(exc).__name__}: {exc}. Remedy: {remedy}."
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def hollow_parameter(p: torch.Tensor) -> nn.Parameter:
    """A placeholder for ``p`` in a deep copy: same shape, dtype, device and ``requires_grad``, backed by a single
    element (stride 0), so the copy does not hold ``p``'s values again."""
    return nn.Parameter(torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape), requires_grad=p.requires_grad)


def _storage_key(t: torch.Tensor) -> tuple | None:
    """What identifies ``t``'s storage among the model's tensors, or ``None`` when it has none to share (not
    strided, on ``meta``, or empty)."""
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr()) if storage.nbytes() else None


def hollow_copy(
    model: nn.Module, *, replaced: Iterable[str] | None = None, overwritten: Iterable[str] = ()
) -> tuple[nn.Module, dict[int, tuple[nn.Parameter, torch.Tensor]]]:
    """Deep-copy ``model`` without copying the values of the tensors the caller replaces or overwrites.

    * ``replaced`` (parameter names; ``None``: every plain floating-point parameter) become placeholders of the
      same shape, dtype, device and ``requires_grad`` backed by a single element (:func:`hollow_parameter`). A
      caller replaces them (``load``: by the decoded weights), or reads their values from the user's model
      (``sources``) and gives those still in use their values afterwards with :func:`restore_hollow`
      (``compress``).
    * ``overwritten`` (parameter and buffer names) get uninitialised storage, with the same shape, dtype, device,
      ``requires_grad`` and attributes (strides where dense): the caller writes every value before the copy is used
      (``load``: what the file stores). Storage is shared as ``copy.deepcopy`` shares it: a parameter gets its own,
      buffers that view one storage get views of one fresh storage when all of them are overwritten, and are
      deep-copied with their values otherwise. Only plain tensors and parameters (a subclass is deep-copied).

    Everything else is deep-copied, so the user's model is never changed and the copy shares nothing with it. Tied
    tensors (one object under several names) stay tied. A tensor attribute the model does not register (neither
    parameter nor buffer) that views an overwritten buffer's storage gets its own copy of the user's values.

    Returns:
        ``(copy, sources)``: ``sources`` maps ``id(placeholder)`` to ``(placeholder, the user's parameter)`` for
        every placeholder of a replaced parameter.
    """
    params = list(model.named_parameters(remove_duplicate=False))
    if replaced is None:
        chosen = [p for _, p in params if type(p) is nn.Parameter and p.is_floating_point() and p.layout == torch.strided]
    else:
        by_name = dict(params)
        chosen = [by_name[name] for name in replaced if name in by_name]
    memo: dict[int, Any] = {}
    sources: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for p in chosen:
        if id(p) not in memo:
            stand_in = hollow_parameter(p)
            stand_in.__dict__.update(copy.deepcopy(p.__dict__, memo))  # as a deep copy: the marks users set
            memo[id(p)] = stand_in
            sources[id(stand_in)] = (stand_in, p)
    registered = dict(params)
    buffers = list(model.named_buffers(remove_duplicate=False))
    registered.update(buffers)
    # copy.deepcopy clones each parameter's values into storage of its own and copies a storage once for all the
    # plain tensors on it: the buffers sharing a storage with others are those whose stand-ins must share one too
    users: dict[tuple, set[int]] = {}
    for _, t in buffers:
        key = _storage_key(t)
        if key is not None and type(t) is torch.Tensor:
            users.setdefault(key, set()).add(id(t))
    rewritten = [
        t for t in (registered[name] for name in overwritten if name in registered)
        if id(t) not in memo and type(t) in (nn.Parameter, torch.Tensor) and t.layout == torch.strided
    ]
    covered = {id(t) for t in rewritten}
    storages: dict[tuple, torch.UntypedStorage] = {}
    for t in rewritten:
        if id(t) in memo:  # tied: stood in under its first name
            continue
        key = None if type(t) is nn.Parameter else _storage_key(t)
        if key is None or users[key] == {id(t)}:
            data = torch.empty_like(t.detach())
        elif users[key] <= covered:  # shared by buffers that are all overwritten: one fresh storage, the same views
            if key not in storages:
                storages[key] = torch.UntypedStorage(t.untyped_storage().nbytes(), device=t.device)
            data = torch.empty(0, dtype=t.dtype, device=t.device)
            data.set_(storages[key], t.storage_offset(), t.size(), t.stride())
        else:
            continue  # shares its storage with a tensor whose values the copy keeps: deep-copied with it
        fresh = nn.Parameter(data, requires_grad=t.requires_grad) if type(t) is nn.Parameter else data
        fresh.__dict__.update(copy.deepcopy(t.__dict__, memo))
        memo[id(t)] = fresh
    return copy.deepcopy(model, memo), sources


def restore_hollow(model: nn.Module, sources: dict[int, tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Give each placeholder of :func:`hollow_copy` that ``model`` still holds (as a parameter, untouched: a weight
    a pass replaced or emptied is not one) a copy of its source's values, as ``copy.deepcopy`` would have."""
    for _, p in model.named_parameters(remove_duplicate=False):
        entry = sources.get(id(p))
        if entry is None or p.shape != entry[1].shape or (p.numel() > 1 and any(s != 0 for s in p.stride())):
            continue
        with torch.no_grad():
            p.data = entry[1].detach().clone(memory_format=torch.preserve_format)
        del sources[id(p)]


def prepare(model: nn.Module, config: CompressConfig, *, inplace: bool = False) -> tuple[nn.Module, str]:
    """Deep-copy ``model`` and trace the copy with ``config.leaf_modules``; an untraceable model falls back to
    module swapping (the copy itself, no graph) unless ``config.fallback == "error"``.

    The copy comes first because ``fx.symbolic_trace`` shares submodules with the module it traces: a pass
    working on the result never changes the user's model. A verb that hands back the model itself rather than
    its graph (``prune``; ``allocate`` probes it) makes its own copy and passes ``inplace=True``.

    Before: ``model`` (any ``nn.Module``). After: ``(gm, "torch.fx symbolic trace")`` with ``gm`` an
    ``fx.GraphModule`` over the copy's submodules, or ``(copy, "module-swap fallback (no graph): <why>")``, whose
    weights the passes then serve by parametrizations.

    Args:
        model: the user's model; never changed (unless ``inplace``).
        config: a ``CompressConfig``; only ``leaf_modules`` and ``fallback`` are used.
        inplace: trace ``model`` itself, already the caller's own copy: the graph then shares its submodules
            and parameters, and the fallback returns ``model``.

    Returns:
        ``(prepared, how)``: the prepared copy and how it was prepared (recorded as the compression record's
        ``"trace"``; it starts with :data:`TRACED` or :data:`FALLBACK_PREFIX`).

    Raises:
        UnsupportedModelError: torch.fx cannot trace the model and ``config.fallback == "error"``; the message
            names the innermost module being traced and the remedies.
    """
    work = model if inplace else copy.deepcopy(model)
    try:
        return trace_model(work, leaf_modules=config.leaf_modules), TRACED
    except UnsupportedModelError as exc:
        if config.fallback == "error":
            raise
        return work, f"{FALLBACK_PREFIX}: {exc}"

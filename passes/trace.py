"""Tracing: ``nn.Module`` → ``torch.fx.GraphModule``, with user-chosen leaves and failures that say what to do."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["trace_model", "UdncTracer"]


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

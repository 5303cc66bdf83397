"""Materialize: fold a compressed model back to plain float weights with identical values.

Before: ``w = self.conv1.weight_q(); torch.conv2d(x, w, ...)``.  After: ``torch.conv2d(x, self.conv1.weight, ...)``
with ``conv1.weight`` an ``nn.Parameter`` holding the decoded weight bit for bit. For speed once fine-tuning is done.
"""

from __future__ import annotations

import copy

from torch import fx, nn
from torch.nn.utils import parametrize

from ..param import DitheredLatticeParam

__all__ = ["materialize", "served_params"]


def served_params(model: nn.Module) -> list[DitheredLatticeParam]:
    """The distinct ``DitheredLatticeParam`` modules of a compressed model, in module order."""
    seen, out = set(), []
    for _, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, DitheredLatticeParam) and id(module) not in seen:
            seen.add(id(module))
            out.append(module)
    return out


def _split(fqn: str) -> tuple[str, str]:
    owner, _, attr = fqn.rpartition(".")
    return owner, attr


def materialize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ``DitheredLatticeParam`` by a float ``nn.Parameter`` holding exactly its decoded value.

    Tied weights stay tied (one Parameter object for every owner). ``inplace=False`` (default) works on a deep copy.
    """
    if not inplace:
        model = copy.deepcopy(model)
    dlps = served_params(model)
    registered = [
        (parent_fqn, parent, name, child)
        for parent_fqn, parent in model.named_modules(remove_duplicate=False)
        for name, child in parent._modules.items()
        if isinstance(child, DitheredLatticeParam)
    ]
    node_target: dict[str, str] = {}
    for dlp in dlps:
        weight = nn.Parameter(dlp.materialize(), requires_grad=dlp.codebook.requires_grad)
        for fqn in (dlp.fqn, *dlp.aliases):
            owner_fqn, attr = _split(fqn)
            owner = model.get_submodule(owner_fqn)
            if parametrize.is_parametrized(owner, attr):
                parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
            owner._parameters[attr] = weight
        for parent_fqn, _, name, child in registered:
            if child is dlp:
                node_target[f"{parent_fqn}.{name}" if parent_fqn else name] = dlp.fqn
    for _, parent, name, _ in registered:
        parent._modules.pop(name, None)
    if isinstance(model, fx.GraphModule):
        graph = model.graph
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target in node_target:
                with graph.inserting_before(node):
                    new = graph.get_attr(node_target[node.target])
                node.replace_all_uses_with(new)
                graph.erase_node(node)
        graph.lint()
        model.recompile()
        model.meta.pop("udnc", None)
    return model

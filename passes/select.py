"""Selection: which weights to compress, with every decision (selected or skipped, and why) recorded."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..config import CompressConfig, LayerConfig
from ..errors import ConfigError, UnsupportedModelError

__all__ = ["Change", "Candidate", "select_weights", "lattice_and_step", "refuse_non_float32", "FUNCTIONAL_WEIGHT_OPS"]

_TYPE_BY_NAME = {
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "ConvTranspose1d": nn.ConvTranspose1d,
    "ConvTranspose2d": nn.ConvTranspose2d,
    "ConvTranspose3d": nn.ConvTranspose3d,
    "Linear": nn.Linear,
    "Embedding": nn.Embedding,
}

# Functional ops whose argument 1 is a weight: a get_attr parameter there is a weight even when its owner is a
# custom module (e.g. ``F.linear(x, self.weight)``).
FUNCTIONAL_WEIGHT_OPS = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.embedding,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.conv_transpose1d,
    torch.conv_transpose2d,
    torch.conv_transpose3d,
    torch.matmul,
    operator.matmul,
}


@dataclass(frozen=True)
class Change:
    """One recorded decision: ``action`` is ``quantized``, ``shared`` (a tied alias) or ``skipped``."""

    fqn: str
    action: str
    reason: str

    def to_dict(self) -> dict:
        return {"fqn": self.fqn, "action": self.action, "reason": self.reason}


@dataclass
class Candidate:
    """A weight parameter chosen for compression, with its resolved settings."""

    fqn: str  # the parameter's fqn (its first owner's), e.g. "conv1.weight"
    owners: list[tuple[str, str]]  # every (module fqn, attribute) holding this parameter (tied weights: several)
    param: nn.Parameter
    lattice: str
    n: int
    step_kind: str  # "step", "relative_step" or "target_bits"
    step_value: float | None
    found_by: str  # "type" or "functional"
    override_key: str | None = None
    step: float | None = None  # resolved Δ, filled in by the quantize pass
    extra: dict = field(default_factory=dict)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def param_owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """Every place each parameter of ``model`` is registered, tied weights included.

    Returns:
        ``id(parameter)`` → ``[(module fqn, attribute name), ...]`` in ``named_modules`` order (the first is the
        parameter's canonical name).
    """
    owners: dict[int, list[tuple[str, str]]] = {}
    for mod_fqn, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None and (mod_fqn, attr) not in owners.setdefault(id(p), []):
                owners[id(p)].append((mod_fqn, attr))
    return owners


def _functional_weights(gm: fx.GraphModule | None) -> set[str]:
    if gm is None:
        return set()
    found = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in FUNCTIONAL_WEIGHT_OPS and len(node.args) > 1:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                found.add(weight.target)
    return found


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is or contains a Hugging Face ``transformers`` ``PreTrainedModel`` (by class name, so that
    this does not import transformers)."""
    return any(k.__name__ == "PreTrainedModel" for m in model.modules() for k in type(m).__mro__)


def select_weights(
    model: nn.Module, config: CompressConfig, gm: fx.GraphModule | None = None
) -> tuple[list[Candidate], list[Change]]:
    """Choose the weights to compress.

    A weight is a candidate when its module's type is in ``config.layer_types`` (``Embedding`` with
    ``include_embeddings``, by default only in ``transformers`` models; any class in ``extra_layer_types``), or when the graph passes it as the weight of a
    functional op (``F.linear``, ``F.conv*``...). Candidates are then filtered by overrides (``None`` = leave
    float), ``filter_fn`` and ``min_numel``. Other multi-dimensional parameters are recorded as skipped ("not a
    selected layer type").

    Returns:
        ``(candidates, changes)``: candidates in module order; ``changes`` holds the skips (the quantize pass adds
        the rest).
    """
    wanted = tuple(_TYPE_BY_NAME[t] for t in config.layer_types)
    if config.include_embeddings or (config.include_embeddings is None and is_transformers_model(model)):
        wanted += (nn.Embedding,)
    wanted += tuple(t for t in config.extra_layer_types if isinstance(t, type))
    extra_names = {t for t in config.extra_layer_types if isinstance(t, str)}

    def is_wanted(m: nn.Module) -> bool:
        return isinstance(m, wanted) or (bool(extra_names) and any(k.__name__ in extra_names for k in type(m).__mro__))

    owners = param_owners(model)
    functional = _functional_weights(gm)
    modules = dict(model.named_modules(remove_duplicate=False))
    _check_exact_override_keys(config, modules)
    candidates: list[Candidate] = []
    changes: list[Change] = []
    seen: set[int] = set()
    for mod_fqn, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            fqn = _join(mod_fqn, attr)
            all_owners = owners[id(p)]
            by_type = attr == "weight" and is_wanted(module)
            by_type = by_type or any(a == "weight" and is_wanted(modules[o]) for o, a in all_owners)
            by_functional = any(_join(o, a) in functional for o, a in all_owners)
            if not (by_type or by_functional):
                if p.ndim >= 2:
                    changes.append(
                        Change(fqn, "skipped", f"not a selected layer type ({type(module).__name__}.{attr})")
                    )
                continue
            found, override, key = config.layer_override(mod_fqn, module)
            if found and override is None:
                changes.append(Change(fqn, "skipped", f"override {key!r} leaves it float"))
                continue
            if config.filter_fn is not None and not config.filter_fn(module, mod_fqn):
                changes.append(Change(fqn, "skipped", "filter_fn returned False"))
                continue
            if not p.dtype.is_floating_point:
                changes.append(Change(fqn, "skipped", f"dtype {p.dtype} is not floating point"))
                continue
            if p.dtype != torch.float32:
                # DitheredLatticeParam decodes to float32 (codebook and dither are float32 by format); served to a
                # float64/float16/bfloat16 op it would fail at run time with a dtype mismatch.
                changes.append(
                    Change(fqn, "skipped", f"dtype {p.dtype}: only float32 weights are compressed (use model.float())")
                )
                continue
            if p.numel() and p.numel() < config.min_numel:
                changes.append(Change(fqn, "skipped", f"{p.numel()} elements < min_numel={config.min_numel}"))
                continue
            candidates.append(_resolve(fqn, all_owners, p, config, override, key, "type" if by_type else "functional"))
    return candidates, changes


def _check_exact_override_keys(config: CompressConfig, modules: dict[str, nn.Module]) -> None:
    # An exact key that names no module is a typo (often the parameter's fqn, "fc.weight", for the module's "fc"):
    # ignoring it would silently quantize a layer the user meant to treat differently. Patterns and types are
    # generic (one config for many models) and may match nothing.
    for key in config.overrides:
        if key.startswith(("re:", "type:")) or key in modules:
            continue
        owner, _, attr = key.rpartition(".")
        hint = ""
        if owner in modules and attr in modules[owner]._parameters:
            hint = f"; overrides name modules: did you mean {owner!r}?"
        raise ConfigError(
            f"override key {key!r} names no module of the (traced) model{hint} "
            "(use 're:pattern' to match names that may be absent)"
        )


def lattice_and_step(config: CompressConfig, override: LayerConfig | None) -> tuple[str, int | None, str, float | None]:
    """``(lattice, n, step_kind, step_value)`` for one weight: the config's, with a layer override's lattice, ``n``
    and step taking precedence (``step_value`` is ``None`` for ``target_bits``, solved later over all layers). The one
    rule for ``compress`` and ``compress_checkpoint``."""
    lattice = config.lattice
    n = config.n
    step_kind, step_value = config.step_mode, None
    if step_kind != "target_bits":
        step_value = getattr(config, step_kind)
    if override is not None:
        if override.lattice is not None:
            lattice, n = override.lattice, override.n
        elif override.n is not None:
            n = override.n
        if override.step is not None:
            step_kind, step_value = "step", override.step
        elif override.relative_step is not None:
            step_kind, step_value = "relative_step", override.relative_step
    return lattice, n, step_kind, step_value


def _resolve(fqn, owners, p, config: CompressConfig, override: LayerConfig | None, key, found_by) -> Candidate:
    lattice, n, step_kind, step_value = lattice_and_step(config, override)
    from ..lattice import get_lattice

    lat = get_lattice(lattice, n)
    return Candidate(
        fqn=fqn,
        owners=list(owners),
        param=p,
        lattice=lat.name,
        n=lat.dim,
        step_kind=step_kind,
        step_value=step_value,
        found_by=found_by,
        override_key=key,
    )


def refuse_non_float32(model: nn.Module) -> None:
    """The one refusal, shared by every verb that selects weights, for a model with nothing float32 to compress.

    Call it when a verb selected no weight. A model whose floating-point parameters are all float16/bfloat16/float64
    would "compress" nothing (the format decodes weights to float32: codebooks and the dither are float32 by contract,
    and serving a float32 weight to a float16 op fails), so say so, with the remedy, instead of the verb's generic
    "nothing selected" error. A model with some float32 layers compresses those and records why the others were
    skipped; a model without such parameters returns here and gets the verb's own error.

    Raises:
        UnsupportedModelError: nothing was selected and ``model`` has floating-point parameters other than float32.
    """
    others = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                     if p.is_floating_point() and p.dtype != torch.float32})
    if others:
        raise UnsupportedModelError(
            f"no weight was compressed: the model's parameters are {', '.join(others)} and udnc-fx compresses "
            "float32 weights only (they decode to float32 by format); convert the model with model.float() first"
        )

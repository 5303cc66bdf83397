"""Typed, validated, JSON-round-trippable configuration for :func:`udnc_fx.compress`."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["CompressConfig", "LayerConfig", "DEFAULT_LAYER_TYPES", "CONFIG_VERSION", "FALLBACKS"]

CONFIG_VERSION = 1
DEFAULT_LAYER_TYPES = (
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Linear",
)
_SELECTABLE_TYPES = DEFAULT_LAYER_TYPES + ("Embedding",)
_STEP_FIELDS = ("step", "relative_step", "target_bits")
#: ``CompressConfig.fallback`` values (see its docstring).
FALLBACKS = ("auto", "module_swap", "error")


def _check_positive(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _check_lattice(lattice: str | None, n: int | None) -> None:
    if lattice is None:
        return
    from .lattice import get_lattice  # validates name and dimension, raising ConfigError

    get_lattice(lattice, n)


@dataclass(frozen=True, kw_only=True)
class LayerConfig:
    """Per-layer override: any field left ``None`` inherits from :class:`CompressConfig`.

    Give at most one of ``step`` (absolute Δ) and ``relative_step`` (Δ = relative_step · std(W)). A layer with an
    explicit step keeps it when a global ``target_bits`` is solved for.
    """

    lattice: str | None = None
    n: int | None = None
    step: float | None = None
    relative_step: float | None = None

    def __post_init__(self):
        _check_positive("step", self.step)
        _check_positive("relative_step", self.relative_step)
        if self.step is not None and self.relative_step is not None:
            raise ConfigError("give at most one of step and relative_step in a LayerConfig")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1):
            raise ConfigError(f"n must be a positive integer, got {self.n!r}")
        if self.lattice is not None:
            _check_lattice(self.lattice, self.n)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _override_key(key: Any) -> str:
    """Normalise an override key: a module class -> ``"type:Name"``; strings are kept."""
    if isinstance(key, type):
        return f"type:{key.__name__}"
    if not isinstance(key, str) or not key:
        raise ConfigError(f"override keys are module types, 'type:Name', 're:pattern' or exact fqns; got {key!r}")
    if key.startswith("re:"):
        try:
            re.compile(key[3:])
        # re.error for bad syntax; OverflowError for a repeat count past the engine's limit (a{99999999999});
        # RecursionError for groups nested a few thousand deep: all of them mean "not a usable pattern".
        except (re.error, OverflowError, RecursionError, ValueError) as exc:
            shown = key if len(key) <= 80 else key[:77] + "..."
            raise ConfigError(
                f"override pattern {shown!r} is not a valid regular expression: {type(exc).__name__}: {exc}"
            ) from None
    return key


def _layer_config_from_dict(key: str, value: Any) -> LayerConfig | None:
    # LayerConfig(**value) would raise TypeError on a non-mapping or an unknown key: say which override is bad.
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"override {key!r} must be a mapping of LayerConfig fields or null, got {value!r}")
    names = {f.name for f in dataclasses.fields(LayerConfig)}
    unknown = set(value) - names
    if unknown:
        raise ConfigError(f"override {key!r} has unknown keys {sorted(unknown)}; known: {sorted(names)}")
    return LayerConfig(**value)


@dataclass(frozen=True, kw_only=True)
class CompressConfig:
    """How :func:`udnc_fx.compress` quantizes a model.

    Attributes:
        lattice: ``"Z"`` (the paper's hypercube lattice, scalar when ``n == 1``), ``"A2"``, ``"D4"`` or ``"E8"``.
        n: lattice dimension; defaults to the lattice's own (1 for ``"Z"``).
        seed: user seed (uint64); each tensor's dither key is derived from it and the tensor's fqn.
        step: absolute quantizer step Δ for every layer.
        relative_step: Δ = relative_step · std(W) per layer.
        target_bits: average entropy in bits per weight over the selected weights; the pass solves for one
            relative step shared by all layers. The default when no step field is given (3.0).
        dithered: subtractive dither on (the paper's randomized quantizer); off gives deterministic rounding.
        exact_zero: vectors quantized to the lattice point 0 decode to exactly 0 (no dither): pruned weights stay
            0 and cost one symbol. Turn on after pruning.
        layer_types: module class names whose ``weight`` is selected.
        include_embeddings: also select ``nn.Embedding`` weights. ``None`` (default): only in Hugging Face
            ``transformers`` models (any submodule a ``PreTrainedModel``), where the embeddings are a large share
            of the weights; ``True``/``False`` always/never.
        extra_layer_types: further module classes (or class names, matched anywhere in the class's MRO) whose
            ``weight`` parameter is selected, for layers outside torch.nn. The default, ``("Conv1D",)``, selects
            Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2; ``weight`` is ``in × out`` and used by
            ``torch.addmm``) without a hand-written config; ``()`` turns that off.
            The op that uses the weight is kept as it is: the weight is fed to it by the graph (``get_attr`` uses)
            or by a parametrization (inside a leaf, or under the module-swap fallback). Recorded by name.
        min_numel: skip (with a recorded reason) weights with fewer elements.
        overrides: ``{key: LayerConfig | None}`` with keys a module type (or ``"type:Name"``), ``"re:pattern"``
            (``re.fullmatch`` on the module fqn) or an exact module fqn. Precedence: exact fqn > pattern > type;
            among patterns the first listed wins. ``None`` leaves the layer float.
        filter_fn: ``filter_fn(module, fqn) -> bool``; layers for which it returns False are skipped. Not
            serialisable: ``to_dict`` records only that one was used.
        leaf_modules: module types (or class names) the tracer keeps as leaves.
        fallback: what to do when torch.fx cannot trace the model. ``"auto"`` (default): quantize the same layers
            without a graph (module swap), record why in ``inspect(model).trace`` and warn; ``"module_swap"``: the
            same without the warning (asked for); ``"error"``: raise ``UnsupportedModelError``.
        strict: turn every skip into a ``PassError``.
        compensate: with ``calibration`` given to :func:`udnc_fx.compress`, round each calibrated Linear/Conv
            weight with error compensation (GPTQ-style, dither kept); False: plain dithered rounding everywhere.
        allocate: with ``calibration`` and a ``target_bits`` goal, spread the bits over layers by measured
            sensitivity (a probe on the first calibration batch); False: one relative step for every layer.
        sequential: with compensation, measure each layer's ``H`` on the inputs the already-quantized earlier
            layers produce (GPTQ's sequential mode; one partial forward per stage of layers) instead of on the float
            model's inputs. The steps are still solved with the float-input ``H``.
        damping: ``λ`` added to ``H``'s diagonal as a fraction of its mean (compensated rounding), in (0, 1]. When
            the allocation probe runs on held-out data (calibration of two or more batches, ``allocate``, not
            ``exact_zero``), it tries
            ``damping``, 3x and 10x it (at most 1) for each compensated layer and keeps the one whose rounding leaves
            the least output error on the probe batch, which ``H`` never saw; the choice is recorded per layer.
        act_order: with compensation, round each layer's input columns in order of decreasing ``H_jj`` (GPTQ's
            "act-order"; whole lattice vectors for ``n > 1``); False: in the weight's own order (the encoder before
            this switch). Only which lattice
            point each weight gets changes: dither, file and decoder are the same.
        metric_rounding: with compensation and a vector lattice (``n > 1``), give each vector the lattice point
            whose error adds least to the layer's output error (its error measured in the metric of the block's
            ``H``) among the Euclidean nearest point and its nearest neighbours (E8: 240, D4: 24, A2: 6, ``Z^n``:
            ``2n``), instead of the Euclidean nearest point. Same rate, lower output error; no effect on ``Z¹``
            (whose column-by-column feedback already accounts for it). Dither, file and decoder are the same.
        mask_padding: with calibration batches that are mappings holding an ``attention_mask`` (a Hugging Face
            tokenizer's output), leave the padded token positions (mask 0) out of each Linear layer's ``H``. Applies
            to Linear inputs whose leading dimensions are the mask's ``(batch, tokens)``; other inputs use every row.
            The allocation probe's output error then also counts real tokens only.
        compensate_embeddings: with compensation, also round ``Embedding`` weights (a lookup has no input second
            moment) with error compensation, using as ``H`` the sensitivity of the model's output to the layer's
            output rows, ``G = E[JᵀJ]`` (one backward pass per calibration batch with a random projection of the
            output; :func:`udnc_fx.passes.calibrate.output_sensitivity`). Every row of the table shares ``G``, so
            rows of tokens the calibration never saw are compensated too. False: plain rounding for embeddings.
        seed_trials: how many dither seeds to try (``seed``, ``seed + 1``, ...); the one whose compressed model is
            closest to the float model on the calibration batches (mean squared output change; with
            ``mask_padding``, over the real tokens only) or has the lowest ``score_fn`` is kept. 1..256.
        score_fn: ``score_fn(compressed_model) -> float``, lower is better (return ``-accuracy`` for an accuracy),
            used by ``seed_trials`` instead of the calibration output error. Recorded by name only.
    """

    version: int = CONFIG_VERSION
    lattice: str = "Z"
    n: int | None = None
    seed: int = 0
    step: float | None = None
    relative_step: float | None = None
    target_bits: float | None = None
    dithered: bool = True
    exact_zero: bool = False
    layer_types: tuple[str, ...] = DEFAULT_LAYER_TYPES
    include_embeddings: bool | None = None
    extra_layer_types: tuple[Any, ...] = ("Conv1D",)
    min_numel: int = 1
    overrides: Mapping[Any, LayerConfig | None] = field(default_factory=dict)
    filter_fn: Callable[[Any, str], bool] | None = None
    leaf_modules: tuple[Any, ...] = ()
    fallback: str = "auto"
    strict: bool = False
    compensate: bool = True
    allocate: bool = True
    sequential: bool = False
    damping: float = 0.01
    act_order: bool = True
    metric_rounding: bool = True
    mask_padding: bool = True
    compensate_embeddings: bool = True
    seed_trials: int = 1
    score_fn: Callable[[Any], float] | None = None

    DEFAULT_TARGET_BITS = 3.0
    MAX_SEED_TRIALS = 256

    def __post_init__(self):
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"config version {self.version!r} is not supported (this is {CONFIG_VERSION})")
        if not isinstance(self.lattice, str):
            raise ConfigError(f"lattice must be a name such as 'Z' or 'E8', got {self.lattice!r}")
        _check_lattice(self.lattice, self.n)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        given = [name for name in _STEP_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigError(f"give at most one of step, relative_step, target_bits; got {', '.join(given)}")
        for name in _STEP_FIELDS:
            _check_positive(name, getattr(self, name))
        if self.target_bits is not None and self.target_bits > 32:
            raise ConfigError(f"target_bits={self.target_bits} cannot be met: a float32 weight costs 32 bits")
        # Sequences are checked before they are iterated, so a wrong kind of value (``layer_types=5``) is a
        # ConfigError like any other bad value, not a TypeError from deep inside.
        if not isinstance(self.layer_types, (tuple, list)):
            raise ConfigError(
                f"layer_types must be a tuple of {', '.join(_SELECTABLE_TYPES)}; got {self.layer_types!r}"
            )
        bad_types = [t for t in self.layer_types if t not in _SELECTABLE_TYPES]
        if bad_types:
            raise ConfigError(
                f"layer_types must be a tuple of {', '.join(_SELECTABLE_TYPES)}; unknown: {bad_types}"
            )
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 1:
            raise ConfigError(f"min_numel must be an integer >= 1, got {self.min_numel!r}")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"fallback must be one of {', '.join(map(repr, FALLBACKS))}, got {self.fallback!r}")
        if self.include_embeddings not in (None, True, False):
            raise ConfigError(f"include_embeddings must be true, false or null (auto), got {self.include_embeddings!r}")
        for name in ("compensate", "allocate", "sequential", "act_order", "metric_rounding", "mask_padding",
                     "compensate_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if (
            isinstance(self.damping, bool)
            or not isinstance(self.damping, (int, float))
            or not math.isfinite(self.damping)
            or not 0 < self.damping <= 1
        ):
            raise ConfigError(f"damping must be a number in (0, 1], got {self.damping!r}")
        if (
            isinstance(self.seed_trials, bool)
            or not isinstance(self.seed_trials, int)
            or not 1 <= self.seed_trials <= self.MAX_SEED_TRIALS
        ):
            raise ConfigError(
                f"seed_trials must be an integer in [1, {self.MAX_SEED_TRIALS}] (each trial compresses the model "
                f"once more), got {self.seed_trials!r}"
            )
        if self.score_fn is not None and not callable(self.score_fn):
            raise ConfigError("score_fn must be callable as score_fn(compressed_model) -> float")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError("filter_fn must be callable as filter_fn(module, fqn) -> bool")
        if not isinstance(self.leaf_modules, (tuple, list)) or not all(
            isinstance(m, (str, type)) for m in self.leaf_modules
        ):
            # the tracer matches classes and class names only: anything else would be ignored without a word
            raise ConfigError(
                f"leaf_modules must be a tuple of module classes or class names, got {self.leaf_modules!r}"
            )
        # layer_types is a closed list of torch.nn names; classes from other libraries come in through here.
        if not isinstance(self.extra_layer_types, (tuple, list)) or not all(
            isinstance(m, (str, type)) for m in self.extra_layer_types
        ):
            raise ConfigError(
                f"extra_layer_types must be a tuple of module classes or class names, got {self.extra_layer_types!r}"
            )
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(
                f"overrides must be a mapping {{key: LayerConfig | None}}, got {type(self.overrides).__name__}"
            )
        normalised = {}
        for key, value in dict(self.overrides).items():
            if value is not None and not isinstance(value, LayerConfig):
                raise ConfigError(f"override for {key!r} must be a LayerConfig or None, got {type(value).__name__}")
            normalised[_override_key(key)] = value
        object.__setattr__(self, "overrides", normalised)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        object.__setattr__(self, "extra_layer_types", tuple(self.extra_layer_types))

    @property
    def step_mode(self) -> str:
        """``"step"``, ``"relative_step"`` or ``"target_bits"`` (the default)."""
        for name in _STEP_FIELDS:
            if getattr(self, name) is not None:
                return name
        return "target_bits"

    @property
    def effective_target_bits(self) -> float | None:
        if self.step_mode != "target_bits":
            return None
        return self.target_bits if self.target_bits is not None else self.DEFAULT_TARGET_BITS

    def replace(self, **changes) -> CompressConfig:
        return dataclasses.replace(self, **changes)

    def layer_override(self, fqn: str, module: Any) -> tuple[bool, LayerConfig | None, str | None]:
        """Find the override for a module: ``(found, value, key)`` with precedence exact > pattern > type."""
        if fqn in self.overrides:
            return True, self.overrides[fqn], fqn
        for key, value in self.overrides.items():
            if key.startswith("re:") and re.fullmatch(key[3:], fqn):
                return True, value, key
        for klass in type(module).__mro__:
            key = f"type:{klass.__name__}"
            if key in self.overrides:
                return True, self.overrides[key], key
        return False, None, None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``filter_fn`` and leaf module classes are recorded by name only."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "overrides":
                value = {k: (None if v is None else v.to_dict()) for k, v in value.items()}
            elif f.name in ("filter_fn", "score_fn"):
                value = None if value is None else getattr(value, "__qualname__", "<callable>")
            elif f.name in ("leaf_modules", "extra_layer_types"):
                value = [v if isinstance(v, str) else v.__name__ for v in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressConfig:
        """Inverse of :meth:`to_dict` (a recorded ``filter_fn`` or ``score_fn`` cannot be restored and is dropped)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        kwargs = dict(data)
        kwargs.pop("filter_fn", None)
        kwargs.pop("score_fn", None)
        if "overrides" in kwargs:
            raw = kwargs["overrides"]
            if not isinstance(raw, Mapping):
                raise ConfigError("overrides must be a mapping")
            kwargs["overrides"] = {k: _layer_config_from_dict(k, v) for k, v in raw.items()}
        for name in ("layer_types", "leaf_modules", "extra_layer_types"):
            if name in kwargs and isinstance(kwargs[name], list):  # JSON has lists; anything else is checked later
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

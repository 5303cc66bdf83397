"""Compress a ``.safetensors`` checkpoint (sharded too) tensor by tensor, never building the float model.

:func:`compress_checkpoint` reads one tensor at a time (safetensors' ``safe_open``, a memory map opened and closed per
tensor, so the pages it touched are released), quantizes it exactly as :func:`udnc_fx.compress` would, and hands it
to the streaming container writer (:func:`udnc_fx.coding.container.write_container`), which writes its sections to
disk before the next tensor is read. Memory stays at one tensor's working set plus the header, whatever the size of
the checkpoint. The file loads with :func:`udnc_fx.load` onto the float model (or with
:func:`udnc_fx.hf_io.from_udnc` for a Hugging Face directory), and its weights equal those of
``save(compress(model, config), ...)`` bit for bit.

Which tensors are compressed:

- **With a model skeleton** (``model=``, any ``nn.Module`` of the checkpoint's architecture; build it on the
  ``meta`` device so it costs no memory), or automatically for a Hugging Face directory (``config.json``; the
  skeleton is built on ``meta`` from it): exactly the weights ``compress(model, config)`` selects (the same code,
  :func:`udnc_fx.passes.select.select_weights` on the traced skeleton), tied weights stored once with their
  aliases, every other tensor of the skeleton's ``state_dict`` stored raw. Floating-point tensors are converted to
  the skeleton's dtype (float32), as ``from_pretrained(dtype=torch.float32)`` does. A tensor of the model that the
  checkpoint lacks (under all its tied names) is refused (``from_pretrained`` would initialise it at random);
  tensors the model does not use are left out, with a warning.
- **Without one** (a bare ``.safetensors`` file or shard set): the rule is by name, shape and dtype: a tensor is a
  weight to compress when its name ends in ``.weight``, it has two or more dimensions and it is float32 (Linear,
  Conv, ConvTranspose, Embedding and GPT-2 ``Conv1D`` weights are exactly these in ordinary models; normalisation
  weights are one-dimensional). Embeddings are included, as ``compress`` includes them in ``transformers`` models;
  for another model with an ``nn.Embedding`` the file then compresses it too (it still loads), where ``compress``
  would leave it float by default. Overrides apply to the module name (the tensor name without ``.weight``); config
  fields that need module classes (``type:`` overrides, ``filter_fn``, non-default ``layer_types``,
  ``include_embeddings=False``) are refused: pass ``model=``. Every other tensor is stored raw. Weights are visited
  in the checkpoint's order; with ``target_bits`` the one relative step is solved from exact sums
  (``math.fsum``, as ``compress`` does), so it does not depend on that order. Where the rule and ``compress``
  select the same weights (models built of those layer types, no tied weights), ``load`` gives the same weights
  bit for bit; the entries' order in the file may differ.

Every check runs before the output is created: the index and its shards, the tensors' names, shapes and dtypes, and a
first pass over every weight to compress (NaN/Inf, empty, constant weights with a relative step). The output is
written atomically and never replaces an existing file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .coding.container import Container, RawTensor, write_container
from .coding.entries import entry_from_record
from .coding.format import RAW_DTYPES
from .config import DEFAULT_LAYER_TYPES, CompressConfig
from .errors import ConfigError
from .lattice import get_lattice
from .passes.quantize import solve_scale
from .passes.select import lattice_and_step, select_weights
from .passes.trace import prepare
from .progress import progress_bar
from .quantizer import coded_rate_bits_per_weight, quantize_array, raw_dither, vectors_of
from .record import index_dtype, weight_key
from .storage import SAVE_CODER, stored_config

__all__ = ["compress_checkpoint", "CHECKPOINT_INDEX"]

#: The index file of a sharded checkpoint (``save_pretrained(max_shard_size=...)``).
CHECKPOINT_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
#: An index file larger than this is refused (a real one lists names: ~100 bytes per tensor).
_MAX_INDEX_BYTES = 64 << 20


def _safe_open():
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("compress_checkpoint reads .safetensors: pip install safetensors") from None
    return safe_open


@dataclass
class _Info:
    name: str
    shard: Path
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]


class _Checkpoint:
    """The tensors of a single ``.safetensors`` file or of an index and its shards: names, shards, dtypes and shapes
    from the headers only; :meth:`read` loads one tensor (the shard is mapped and unmapped around it)."""

    def __init__(self, source: Path):
        self.source = source
        self.directory, shards, self.weight_map = _resolve(source)
        safe_open = _safe_open()
        self.infos: dict[str, _Info] = {}
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        dtype = _DTYPE_NAMES.get(sl.get_dtype())
                        if dtype is None:
                            raise ConfigError(
                                f"{shard.name}: tensor {name!r} has dtype {sl.get_dtype()}, which udnc cannot read"
                            )
                        if name in self.infos:
                            raise ConfigError(f"tensor {name!r} is in two shards: {self.infos[name].shard.name}, "
                                              f"{shard.name}")
                        self.infos[name] = _Info(name, shard, dtype, tuple(int(d) for d in sl.get_shape()))
            except ConfigError:
                raise
            except Exception as exc:  # SafetensorError, OSError...: not a readable safetensors file
                raise ConfigError(f"{shard} is not a readable .safetensors file: {type(exc).__name__}: {exc}") from None
        if self.weight_map is not None:
            for name, shard_name in self.weight_map.items():
                info = self.infos.get(name)
                if info is None or info.shard.name != shard_name:
                    raise ConfigError(f"{CHECKPOINT_INDEX}: tensor {name!r} is not in the shard it names, {shard_name}")
            extra = sorted(set(self.infos) - set(self.weight_map))
            if extra:
                raise ConfigError(f"the shards hold tensors the index does not list: {extra[:5]}")
            self.names = list(self.weight_map)
        else:
            self.names = list(self.infos)

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        try:
            with _safe_open()(str(info.shard), framework="pt") as f:
                tensor = f.get_tensor(name)
        except Exception as exc:
            raise ConfigError(f"cannot read tensor {name!r} from {info.shard}: {type(exc).__name__}: {exc}") from None
        if tuple(tensor.shape) != info.shape:
            raise ConfigError(f"{info.shard.name}: tensor {name!r} changed while it was read")
        return tensor


_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}


def _regular(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a regular file")
    return path


def _resolve(source: Path) -> tuple[Path, list[Path], dict[str, str] | None]:
    """``(directory, shard files, weight_map or None)`` of a checkpoint path: a ``.safetensors`` file, an index
    ``*.safetensors.index.json``, or a directory holding one of ``model.safetensors.index.json`` /
    ``model.safetensors``."""
    if source.is_dir():
        if (source / CHECKPOINT_INDEX).exists():
            source = source / CHECKPOINT_INDEX
        elif (source / _SINGLE).exists():
            source = source / _SINGLE
        else:
            raise ConfigError(f"{source} holds no {CHECKPOINT_INDEX} nor {_SINGLE}: not a safetensors checkpoint")
    if source.name.endswith(".index.json"):
        _regular(source, "the index")
        if source.stat().st_size > _MAX_INDEX_BYTES:
            raise ConfigError(f"{source} is larger than {_MAX_INDEX_BYTES} bytes: not a checkpoint index")
        try:
            index = json.loads(source.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source} is not a JSON checkpoint index: {exc}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{source} has no \"weight_map\" object naming each tensor's shard")
        shards: list[Path] = []
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or shard in (".", "..") or "/" in shard or "\\" in shard:
                raise ConfigError(f"{source}: tensor {str(name)[:80]!r} names the shard {str(shard)[:80]!r}; a shard "
                                  "is a file name in the index's folder")
            path = source.parent / shard
            if path not in shards:
                shards.append(_regular(path, f"the shard named by {source.name}:"))
        return source.parent, shards, weight_map
    if source.suffix != ".safetensors":
        raise ConfigError(f"{source} is not a checkpoint: give a .safetensors file, a {CHECKPOINT_INDEX} or their "
                          "folder")
    return source.parent, [_regular(source, "the checkpoint")], None


# ---------------------------------------------------------------------------------------------------------------
# The plan: which tensor is compressed, under which names; what else is stored
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Weight:
    fqn: str
    aliases: tuple[str, ...]
    source: str  # the checkpoint's name for it
    shape: tuple[int, ...]
    lattice: str
    n: int
    step_kind: str
    step_value: float | None
    std: float = math.nan
    step: float | None = None


@dataclass
class _Raw:
    name: str
    source: str
    dtype: str | None  # convert to this torch dtype name (None: as stored)


def _hf_skeleton(directory: Path) -> nn.Module | None:
    """The ``transformers`` model of ``directory/config.json`` on the meta device (no memory), or None when the
    folder has no config.json."""
    if not (directory / "config.json").is_file():
        return None
    from .hf_io import import_transformers

    transformers = import_transformers()
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read the config in {directory}: {type(exc).__name__}: {exc}") from None
    cls = getattr(transformers, (hf_config.architectures or [""])[0] or "", None)  # as load_checkpoint_dir picks it
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        cls = transformers.AutoModel
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = cls.from_config(hf_config) if cls is transformers.AutoModel else cls(hf_config)
    except Exception as exc:
        raise ConfigError(f"cannot build {getattr(cls, '__name__', cls)} from {directory}/config.json: "
                          f"{type(exc).__name__}: {exc}") from None
    return model.eval()


def _plan_from_model(ckpt: _Checkpoint, model: nn.Module, config: CompressConfig):
    target, _ = prepare(model, config)
    gm = target if isinstance(target, fx.GraphModule) else None
    candidates, _ = select_weights(target, config, gm)
    used: set[str] = set()

    def find(names: list[str], what: str) -> str:
        for name in names:
            if name in ckpt.infos:
                return name
        raise ConfigError(f"the checkpoint has no tensor {names[0]!r} ({what} of the model)"
                          + (f"; nor under its tied names {names[1:]}" if len(names) > 1 else ""))

    weights, compressed = [], set()
    for cand in candidates:
        names = [f"{o}.{a}" if o else a for o, a in cand.owners]
        source = find([cand.fqn] + [n for n in names if n != cand.fqn], "a weight")
        info = ckpt.infos[source]
        if info.shape != tuple(cand.param.shape):
            raise ConfigError(f"{source}: the checkpoint's shape {info.shape} differs from the model's "
                              f"{tuple(cand.param.shape)}")
        if not _is_float(info.dtype):
            raise ConfigError(f"{source}: the checkpoint stores {info.dtype}, not a floating-point weight")
        used.update(n for n in names if n in ckpt.infos)
        compressed.add(id(cand.param))
        weights.append(_Weight(cand.fqn, tuple(n for n in names if n != cand.fqn), source, info.shape, cand.lattice,
                               cand.n, cand.step_kind, cand.step_value))
    raws, seen = [], set()
    owners: dict[int, list[str]] = {}
    for name, t in target.state_dict(keep_vars=True).items():
        owners.setdefault(id(t), []).append(name)
    for name, t in target.state_dict(keep_vars=True).items():
        if id(t) in seen or id(t) in compressed or ".parametrizations." in name:
            continue
        seen.add(id(t))
        source = find(owners[id(t)], "a tensor")
        info = ckpt.infos[source]
        if info.shape != tuple(t.shape):
            raise ConfigError(f"{source}: the checkpoint's shape {info.shape} differs from the model's "
                              f"{tuple(t.shape)}")
        want = str(t.dtype).removeprefix("torch.")
        if info.dtype != want and not (_is_float(info.dtype) and _is_float(want)):
            raise ConfigError(f"{source}: the checkpoint stores {info.dtype}, the model's tensor is {want}")
        used.update(n for n in owners[id(t)] if n in ckpt.infos)
        raws.append(_Raw(name, source, want if want != info.dtype else None))
    unused = [n for n in ckpt.names if n not in used]
    if unused:
        warnings.warn(f"the checkpoint holds {len(unused)} tensors the model does not use (not stored): {unused[:5]}",
                      UserWarning, stacklevel=3)
    return weights, raws


def _is_float(dtype: str) -> bool:
    return dtype in ("float16", "bfloat16", "float32", "float64")


def _check_rule_config(config: CompressConfig) -> None:
    needs = []
    if config.filter_fn is not None:
        needs.append("filter_fn")
    if tuple(config.layer_types) != tuple(DEFAULT_LAYER_TYPES):
        needs.append("layer_types")
    if config.include_embeddings is False:
        needs.append("include_embeddings=False")
    if any(str(k).startswith("type:") for k in config.overrides):
        needs.append("'type:' overrides")
    if needs:
        raise ConfigError(f"{', '.join(needs)} select weights by module class: without a model the checkpoint's "
                          "tensors have none; pass model= (a skeleton on the meta device is enough)")


def _plan_by_rule(ckpt: _Checkpoint, config: CompressConfig):
    _check_rule_config(config)
    modules = {""}
    for name in ckpt.names:
        parts = name.split(".")[:-1]
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for key in config.overrides:
        if not str(key).startswith("re:") and key not in modules:
            raise ConfigError(f"override key {key!r} names no module of the checkpoint (a module is a tensor name "
                              "without its last part; use 're:pattern' for names that may be absent)")
    weights, raws = [], []
    for name in ckpt.names:
        info = ckpt.infos[name]
        module, _, attr = name.rpartition(".")
        if attr == "weight" and len(info.shape) >= 2 and info.dtype == "float32":
            numel = math.prod(info.shape)
            found, override, _ = config.layer_override(module, None)
            if not (found and override is None) and not (numel and numel < config.min_numel):
                lattice, n, kind, value = lattice_and_step(config, override)
                lat = get_lattice(lattice, n)
                weights.append(_Weight(name, (), name, info.shape, lat.name, lat.dim, kind, value))
                continue
        if info.dtype not in RAW_DTYPES:
            raise ConfigError(f"tensor {name!r} is {info.dtype}, which a .udnc file cannot store raw (float16, "
                              "float32, float64 and integers can): convert the checkpoint, or give model= (a float32 "
                              "skeleton converts it)")
        raws.append(_Raw(name, name, None))
    return weights, raws


# ---------------------------------------------------------------------------------------------------------------
# Reading weights, steps, and the lazy entries the container writer pulls
# ---------------------------------------------------------------------------------------------------------------


def _weight_array(ckpt: _Checkpoint, w: _Weight) -> np.ndarray:
    """The weight as float64 NumPy (after a float32 conversion, what the model would hold)."""
    tensor = ckpt.read(w.source)
    if tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)
    return tensor.numpy().astype(np.float64)


def _first_pass(ckpt: _Checkpoint, weights: list[_Weight], config: CompressConfig, bar) -> None:
    """Every weight read once, checked as ``compress`` checks it (and before anything is written), its std kept."""
    for w in weights:
        values = _weight_array(ckpt, w)
        if values.size == 0:
            raise ConfigError(f"layer {w.fqn} has zero elements: exclude it (override None) or remove it")
        finite = np.isfinite(values)
        if not finite.all():
            raise ConfigError(f"layer {w.fqn} has {int((~finite).sum())} NaN/Inf weights: fix the checkpoint before "
                              "compressing")
        del finite
        w.std = float(values.std())
        lat = get_lattice(w.lattice, w.n)
        if -(-values.size // lat.dim) * lat.dim > 2**32:
            raise ConfigError(f"layer {w.fqn} is too large for the 32-bit dither counter")
        if w.step_kind == "step":
            w.step = float(w.step_value)
        elif w.std == 0.0:
            raise ConfigError(f"layer {w.fqn} has all weights equal (std 0): a relative step is undefined; give it an "
                              "absolute step with an override, or leave it float (None)")
        elif w.step_kind == "relative_step":
            w.step = float(w.step_value) * w.std
        bar.update(values.size)


def _bits(ckpt: _Checkpoint, w: _Weight, step: float, config: CompressConfig) -> float:
    """What ``make_params`` adds for this layer: its estimated coded rate times its (padded) size."""
    lat = get_lattice(w.lattice, w.n)
    v = vectors_of(_weight_array(ckpt, w), lat.dim)
    u = raw_dither(weight_key(config.seed, w.fqn, config.dithered), v.shape[0], lat)
    return coded_rate_bits_per_weight(v, lat, step, u) * v.size


def _solve_steps(ckpt: _Checkpoint, weights: list[_Weight], config: CompressConfig, progress) -> None:
    """The one relative step of ``target_bits``, found as ``make_params`` finds it (the same exact sums, so the
    order of the layers does not matter), reading each weight again at every evaluation instead of keeping them."""
    to_solve = [w for w in weights if w.step_kind == "target_bits"]
    if not to_solve:
        return
    fixed_terms, fixed_numel = [], 0
    for w in weights:
        if w.step_kind != "target_bits":
            fixed_terms.append(_bits(ckpt, w, w.step, config))
            fixed_numel += _padded(w)
    total = fixed_numel + sum(_padded(w) for w in to_solve)

    def mean_bits(s: float) -> float:
        layers = progress_bar(to_solve, desc="solving the step", unit="layer", progress=progress)
        return math.fsum(fixed_terms + [_bits(ckpt, w, s * w.std, config) for w in layers]) / total

    s = solve_scale(mean_bits, config.effective_target_bits)
    for w in to_solve:
        w.step = s * w.std


def _padded(w: _Weight) -> int:
    n = get_lattice(w.lattice, w.n).dim
    return -(-math.prod(w.shape) // n) * n


class _LazyEntries(Sequence):
    """The container's entries, made one at a time as the writer iterates: only one tensor is alive at once."""

    def __init__(self, items: list, make):
        self._items = items
        self._make = make

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        return self._make(self._items[i])

    def __iter__(self) -> Iterator:
        for item in self._items:
            yield self._make(item)


def compress_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: CompressConfig | None = None,
    *,
    model: nn.Module | None = None,
    coder: str = SAVE_CODER,
    raw_float_dtype: str = "float32",
    metadata: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> int:
    """Compress the ``.safetensors`` checkpoint at ``source`` to the ``.udnc`` file ``out`` without building the
    float model: one tensor is read, quantized and written at a time (see the module's documentation for which
    tensors are compressed).

    ``udnc_fx.load(out, model)`` on the float model then gives the weights of ``save(compress(model, config), ...)``
    bit for bit; for a Hugging Face directory, ``udnc_fx.hf_io.from_udnc(out)`` rebuilds the model (its config is
    stored, as ``udnc compress`` stores it).

    Args:
        source: a ``.safetensors`` file, a ``model.safetensors.index.json`` (sharded; its shards beside it), or a
            folder holding either (a ``save_pretrained`` directory).
        out: the ``.udnc`` file to write; it must not exist (nothing is overwritten).
        config: a :class:`CompressConfig` (default: Z^1, target 3 bits/weight, seed 0). Calibration-based options
            do not apply (there is no data): ``seed_trials`` must be 1.
        model: optional skeleton of the checkpoint's architecture (weights unused; ``torch.device("meta")`` is
            enough): selects the weights with ``compress``'s own rule and names tied weights.
        coder, raw_float_dtype, metadata: as for :func:`udnc_fx.save`.
        progress: bars over the weights read: ``None`` (default) on a terminal only, ``False`` never.

    Returns:
        The size of the file written, in bytes.

    Raises:
        ConfigError: ``source`` is not a checkpoint (missing shards, an index naming absent tensors, an unreadable
            file), a tensor's dtype or shape does not fit, a weight holds NaN/Inf, ``out`` exists, or the config
            asks for what a checkpoint cannot give. Raised before ``out`` is created.
        ImportError: ``safetensors`` (or, for a Hugging Face directory, ``transformers``) is not installed.
    """
    config = CompressConfig() if config is None else config
    if not isinstance(config, CompressConfig):
        raise ConfigError(f"config must be a CompressConfig, got {type(config).__name__}")
    if config.seed_trials > 1 or config.score_fn is not None:
        raise ConfigError("compress_checkpoint has no calibration data: seed_trials must be 1 and score_fn None")
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module (a skeleton), got {type(model).__name__}")
    source, out = Path(source), Path(out)
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out} exists (nothing is overwritten): remove it or choose another name")
    if not out.parent.is_dir():
        raise ConfigError(f"{out}: the folder {out.parent} does not exist")
    ckpt = _Checkpoint(source)
    if any(out.resolve() == info.shard.resolve() for info in ckpt.infos.values()):
        raise ConfigError(f"{out} is a shard of the checkpoint")
    metadata = dict(metadata or {})
    if model is None:
        model = _hf_skeleton(ckpt.directory)
        if model is not None:
            from .hf_io import hf_metadata

            metadata = {**(hf_metadata(model) or {}), **metadata}  # from_udnc rebuilds the model from it
    weights, raws = _plan_from_model(ckpt, model, config) if model is not None else _plan_by_rule(ckpt, config)
    if not weights:
        raise ConfigError(f"{source}: no weight to compress (no float32 tensor named *.weight with 2+ dimensions)"
                          if model is None else f"{source}: the model selects no weight to compress")
    total = sum(math.prod(w.shape) for w in weights)
    bar = progress_bar(total=total, desc="checking weights", unit="w", unit_scale=True, progress=progress)
    try:
        _first_pass(ckpt, weights, config, bar)
    finally:
        bar.close()
    _solve_steps(ckpt, weights, config, progress)

    bar = progress_bar(total=total, desc="compressing", unit="w", unit_scale=True, progress=progress)

    def entry(w: _Weight):
        q = quantize_array(_weight_array(ckpt, w), lattice=w.lattice, n=w.n, step=w.step,
                           key=weight_key(config.seed, w.fqn, config.dithered), exact_zero=config.exact_zero)
        bar.update(math.prod(w.shape))
        # the indices in the narrow dtype a DitheredLatticeParam holds (quantize_array already returns them so:
        # no copy then); the writer widens them per segment, so the bytes are the same
        q = dataclasses.replace(q, indices=q.indices.astype(index_dtype(q.codebook_int.shape[0]), copy=False))
        return entry_from_record(q, fqn=w.fqn, coder=coder, meta={"aliases": list(w.aliases)} if w.aliases else {})

    def raw(r: _Raw) -> RawTensor:
        tensor = ckpt.read(r.source)
        if r.dtype is not None:
            tensor = tensor.to(getattr(torch, r.dtype))
        return RawTensor(r.name, tensor.numpy())

    container = Container(
        quantized=_LazyEntries(weights, entry),
        raw=_LazyEntries(raws, raw),
        config=stored_config(config),
        metadata=metadata,
        seed=config.seed,
    )
    try:
        return write_container(out, container, raw_float_dtype=raw_float_dtype, progress=False, compress_header=True)
    finally:
        bar.close()

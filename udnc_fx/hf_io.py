"""Standard checkpoints in and out: Hugging Face ``save_pretrained`` directories and ``.safetensors`` state dicts.

In::

    model = load_checkpoint_dir("./gpt2-small")          # config.json + *.safetensors (sharded too), offline
    gm = udnc_fx.compress(model)                          # embeddings and Conv1D selected, module-swap fallback
    udnc_fx.save(gm, "gpt2.udnc", metadata=hf_metadata(model))   # the HF config travels in the container

Out::

    model = from_udnc("gpt2.udnc")                        # a plain transformers model, decoded float weights
    write_checkpoint_dir("gpt2.udnc", "./gpt2-decoded")   # config.json + model.safetensors for any runtime
    write_state_dict("cnn.udnc", "cnn.safetensors")       # any model: the decoded state_dict, no architecture needed

A ``.udnc`` file holds every tensor a model needs, so its float state dict can be decoded without the model's code
(:func:`decoded_state_dict`); a Hugging Face checkpoint additionally needs its ``config.json``, which
:func:`hf_metadata` stores in the container's free-form ``metadata`` section under ``"huggingface"``.

Nothing here downloads anything: ``HF_HUB_OFFLINE=1`` is set unless already set, and every ``from_pretrained``
call passes ``local_files_only=True``.
"""

from __future__ import annotations

import json
import os
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, FormatError

__all__ = [
    "HF_METADATA_KEY",
    "is_checkpoint_dir",
    "load_checkpoint_dir",
    "hf_metadata",
    "decoded_state_dict",
    "from_udnc",
    "write_checkpoint_dir",
    "write_state_dict",
    "guard_save_pretrained",
    "tensor_io",
    "HF_INPUT_NAMES",
]

#: The inputs a transformers model takes by position when exported through :class:`TensorIO`.
HF_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")

#: Key of the container's ``metadata`` section that holds a Hugging Face model's architecture and config.
HF_METADATA_KEY = "huggingface"


def import_transformers():
    """Import ``transformers`` offline (``HF_HUB_OFFLINE=1`` unless set), its progress bars off where ours are.

    Raises:
        ImportError: naming the ``hf`` extra, when ``transformers`` is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "Hugging Face checkpoints need the 'transformers' package (pip install 'udnc-fx[hf]')"
        ) from None
    from .progress import progress_enabled

    if not progress_enabled() or os.environ.get("TQDM_DISABLE"):
        transformers.utils.logging.disable_progress_bar()  # its loading/saving bars would fill a log
    return transformers


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``save_pretrained`` (it holds a ``config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def _model_class(transformers, architecture: str | None):
    cls = getattr(transformers, architecture, None) if architecture else None
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return cls
    return None


def load_checkpoint_dir(path: str | Path) -> nn.Module:
    """Build the float model saved in a ``save_pretrained`` directory (config.json + safetensors, sharded or not),
    offline, in float32 and eval mode.

    The class is the config's first ``architectures`` entry (e.g. ``GPT2LMHeadModel``, so the LM head and its tie
    to the embeddings come along), or ``AutoModel`` when there is none.

    Raises:
        ConfigError: not a checkpoint directory, an unreadable config, or weights transformers cannot load (the
            message names the directory).
        ImportError: ``transformers`` is not installed.
    """
    path = Path(path)
    if not is_checkpoint_dir(path):
        raise ConfigError(f"{path} is not a save_pretrained directory (no config.json)")
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, JSONDecodeError...: all "bad config"
        raise ConfigError(f"cannot read the config in {path}: {type(exc).__name__}: {exc}") from None
    cls = _model_class(transformers, (config.architectures or [None])[0]) or transformers.AutoModel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        raise ConfigError(f"transformers cannot load the checkpoint in {path}: {type(exc).__name__}: {exc}") from None
    return model.eval()


def hf_metadata(model: nn.Module) -> dict[str, Any] | None:
    """``{"huggingface": {...}}`` for :func:`udnc_fx.save`'s ``metadata`` when ``model`` is a transformers
    ``PreTrainedModel`` (its class name, full config and the transformers version), else None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or not hasattr(model, "save_pretrained"):
        return None
    transformers = import_transformers()
    return {
        HF_METADATA_KEY: {
            "architecture": type(model).__name__,
            "config": json.loads(config.to_json_string(use_diff=False)),
            "transformers_version": transformers.__version__,
        }
    }


def decoded_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The float state dict stored in a ``.udnc`` file, decoded without the model's code: every compressed weight
    (under its name and every tied alias, one shared tensor) and every raw tensor. Values equal what
    :func:`udnc_fx.load` gives, bit for bit.

    Raises:
        FormatError: the file is malformed.
    """
    from .coding.container import read_container
    from .storage import params_from

    container = read_container(Path(path))
    state: dict[str, torch.Tensor] = {}
    for dlp in params_from(container):
        weight = dlp.materialize()
        for name in (dlp.fqn, *dlp.aliases):
            state[name] = weight
    for raw in container.raw:
        if raw.name in state:
            raise FormatError("bad_header", f"tensor {raw.name!r} is stored twice")
        state[raw.name] = torch.from_numpy(raw.array.copy())
    return state


def _hf_entry(path: str | Path) -> dict[str, Any] | None:
    from .storage import read_header

    entry = read_header(Path(path)).get("metadata", {}).get(HF_METADATA_KEY)
    return entry if isinstance(entry, dict) else None


def from_udnc(path: str | Path, *, materialize: bool = True) -> nn.Module:
    """Load a ``.udnc`` file of a Hugging Face model back into a working ``transformers`` model, in one call.

    The architecture and config come from the file (stored by ``udnc compress`` or ``save(...,
    metadata=hf_metadata(model))``); no checkpoint directory is needed.

    Args:
        path: the ``.udnc`` file.
        materialize: ``True`` (default): plain float weights (``save_pretrained``, ``generate``, ONNX exporters
            work as on the original); ``False``: the compressed model (weights served by ``DitheredLatticeParam``,
            for fine-tuning or saving again with :func:`udnc_fx.save`).

    Raises:
        FormatError: the file holds no Hugging Face config (``kind="model_mismatch"``), or is malformed.
        ImportError: ``transformers`` is not installed.
    """
    from .storage import load
    from .passes.materialize import materialize as _materialize

    entry = _hf_entry(path)
    if entry is None or not isinstance(entry.get("config"), dict):
        raise FormatError(
            "model_mismatch",
            f"{path} holds no Hugging Face config: load it with udnc_fx.load(path, model) onto the float model, "
            "or decode its tensors with udnc_fx.hf_io.decoded_state_dict(path)",
        )
    transformers = import_transformers()
    cls = _model_class(transformers, entry.get("architecture"))
    if cls is None:
        raise FormatError("model_mismatch", f"transformers has no model class {entry.get('architecture')!r}")
    try:
        config = cls.config_class.from_dict(dict(entry["config"]))
    except Exception as exc:
        raise FormatError("bad_value", f"the stored Hugging Face config is invalid: {type(exc).__name__}: {exc}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = cls(config).eval()
    compressed = load(path, skeleton)
    if not materialize:
        return compressed
    model = _materialize(compressed)  # carries no compression record: a plain model
    model.__dict__.pop("save_pretrained", None)  # the guard installed on compressed models (a plain model now)
    return model


def write_checkpoint_dir(path: str | Path, out_dir: str | Path) -> Path:
    """Decode a ``.udnc`` file of a Hugging Face model to a standard checkpoint: ``out_dir/config.json`` and
    ``out_dir/model.safetensors`` (tied weights stored once, as ``save_pretrained`` does), loadable by
    ``from_pretrained`` and by anything that reads Hugging Face checkpoints.

    Raises:
        ConfigError: ``out_dir`` exists and is not an empty directory (nothing is overwritten).
        FormatError: the file holds no Hugging Face config, or is malformed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not an empty directory: choose a new --out")
    model = from_udnc(path)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def write_state_dict(path: str | Path, out_file: str | Path) -> Path:
    """Decode a ``.udnc`` file (any model) to a ``.safetensors`` state dict. Tied weights are stored under each of
    their names (safetensors has no shared storage).

    Raises:
        ConfigError: ``out_file`` exists (nothing is overwritten) or does not end in ``.safetensors``.
        ImportError: ``safetensors`` is not installed.
    """
    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise ConfigError(f"the state dict is written as .safetensors; got {out_file}")
    if out_file.exists():
        raise ConfigError(f"{out_file} exists: choose a new --out (nothing is overwritten)")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("writing .safetensors needs the 'safetensors' package (pip install safetensors)") from None
    state = decoded_state_dict(path)
    seen: set[int] = set()
    flat = {}
    for name, tensor in state.items():
        flat[name] = tensor.clone() if id(tensor) in seen else tensor.contiguous()
        seen.add(id(tensor))
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    try:
        save_file(flat, str(tmp), metadata={"format": "pt", "written_by": "udnc decompress"})
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


def _save_pretrained_decoded(self, save_directory, *args, **kwargs):
    from .passes.materialize import materialize

    warnings.warn(
        "save_pretrained on a compressed model writes the decoded float weights (a standard checkpoint). "
        "For the compressed file use udnc_fx.save(model, 'model.udnc'); to get the model back from it, "
        "udnc_fx.hf_io.from_udnc('model.udnc').",
        UserWarning,
        stacklevel=2,
    )
    plain = materialize(self)
    plain.__dict__.pop("save_pretrained", None)  # materialize already dropped the compression record
    return type(plain).save_pretrained(plain, save_directory, *args, **kwargs)


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Give a compressed ``transformers`` model a ``save_pretrained`` that works: it writes the decoded float
    weights (``materialize(model).save_pretrained(...)``) and warns that this is a standard, uncompressed
    checkpoint. Without it, transformers fails on the shared compressed tensors after creating the directory.
    Other models are returned unchanged. A bound method, so that deep copies save themselves."""
    if getattr(type(model), "save_pretrained", None) is None or not hasattr(model, "config"):
        return model
    model.save_pretrained = types.MethodType(_save_pretrained_decoded, model)
    return model


def _tensor_forward(self, *inputs):
    import inspect

    params = inspect.signature(type(self).forward).parameters
    names = [n for n in HF_INPUT_NAMES if n in params]
    if len(inputs) > len(names):
        raise ConfigError(f"{type(self).__name__} takes at most {len(names)} inputs here: {names}")
    kwargs = dict(zip(names, inputs))
    if "attention_mask" in names and kwargs.get("attention_mask") is None:
        kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
    if "use_cache" in params:
        kwargs["use_cache"] = False
    out = type(self).forward(self, **kwargs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def tensor_io(model: nn.Module) -> nn.Module:
    """Give a transformers model, in place, a ``forward(input_ids, attention_mask=None, token_type_ids=None)`` with
    tensors in and one tensor out (``logits`` for language-model heads, else ``last_hidden_state``), for ONNX
    export. The module tree is unchanged, so compressed weights keep their names. The KV cache is off, and a missing
    attention mask is all ones, computed in the graph: without one transformers looks for packed sequences with
    ``torch.diff``, which the TorchScript ONNX exporter lacks. Returns ``model``."""
    model.forward = types.MethodType(_tensor_forward, model)
    return model

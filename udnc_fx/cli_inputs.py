"""What the ``udnc`` command line reads from the user: models, weights, configs, calibration data, output paths.

Every function here checks one argument and raises :class:`~udnc_fx.errors.ConfigError` with a one-line message
naming the user's path (never a temporary file), so that ``udnc`` prints it and exits with status 2 before any
compression work starts.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "check_output_path",
    "check_coder",
    "read_config",
    "load_factory",
    "load_weights",
    "load_model",
    "read_calibration",
    "parse_shapes",
    "parse_dtype",
    "cli_remedy",
]

CALIBRATION_SUFFIXES = (".txt", ".safetensors", ".npy")


def check_output_path(path: str, *, what: str = "--out", directory: bool = False, replaces: str = "any") -> None:
    """The output can be written: its folder exists and is writable, and it is not a directory (a file output)
    or not a non-empty directory (a directory output). Nothing is created.

    ``replaces`` says which existing file the output may take the place of: ``"any"``, ``"udnc"`` (only a
    ``.udnc`` container, so a mistyped ``--out`` never destroys the user's weights or anything else) or
    ``"none"``."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: the folder {parent} is not writable")
    if directory:
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise ConfigError(f"{what} {path} exists and is not an empty directory (nothing is overwritten)")
    elif p.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a file name")
    elif p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"{what} {path} exists and is not writable")
    elif p.exists() and replaces == "none":
        raise ConfigError(f"{what} {path} exists (nothing is overwritten): remove it or choose another name")
    elif p.exists() and replaces == "udnc" and not _is_container(p):
        raise ConfigError(
            f"{what} {path} exists and is not a .udnc container (nothing is overwritten): remove it or choose "
            "another name"
        )


def _is_container(path: Path) -> bool:
    from .coding.container import MAGIC

    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def check_coder(name: str | None) -> None:
    """``name`` is a registered index coder or ``auto`` (``--coder``)."""
    from .coding.payload import AUTO_CODER

    if name is None or name == AUTO_CODER:
        return
    from .coding.coders import available_coders

    names = available_coders()
    if name not in names:
        close = [n for n in names if n.startswith(name)]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"--coder {name!r} is not a coder{hint}; available: {', '.join(names)}")


def read_config(path: str):
    """A :class:`CompressConfig` from a JSON file (``--config``)."""
    from .config import CompressConfig

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    try:
        return CompressConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    except (TypeError, ValueError) as exc:  # a field of the wrong kind that from_dict passes on
        raise ConfigError(f"--config {path}: {exc}") from None


def load_factory(spec: str):
    """``package.module:factory`` -> the float model the factory returns."""
    import torch

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"MODEL must be a save_pretrained directory or look like 'package.module:factory', got {spec!r}"
        )
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {spec!r}: {exc}") from None
    finally:
        sys.path.pop(0)
    if not callable(factory):
        raise ConfigError(f"{spec} is not callable")
    try:
        model = factory()
    except Exception as exc:  # the user's code: whatever it raises, say where and stop cleanly
        raise ConfigError(f"{spec}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _tied_groups(model) -> dict[str, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: names for names in groups.values() for n in names}


def load_weights(model, path: str) -> None:
    """Weights from a ``.safetensors`` file or a ``torch.save``'d state_dict (loaded with ``weights_only``).

    A tied weight (GPT-2's ``lm_head.weight`` is ``wte.weight``) may be stored under one of its names only, as
    ``save_pretrained`` does; any other missing or unexpected name is an error."""
    import torch

    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError("reading .safetensors needs the 'safetensors' package (pip install safetensors)") from None
        try:
            state = load_file(path)
        except OSError:
            raise
        except Exception as exc:  # SafetensorError and friends: a damaged or foreign file
            raise ConfigError(f"--weights {path} is not a readable .safetensors file: {exc}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError...: not a state_dict we can read safely
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"--weights {path} is not a state_dict torch.load can read safely (weights_only): {first}"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"--weights {path} does not hold a state_dict of tensors")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"the weights in {path} do not fit the model: {str(exc).splitlines()[0]} ...") from None
    tied = _tied_groups(model)
    present = set(state)
    missing = [k for k in result.missing_keys if not any(t in present for t in tied.get(k, ()))]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"the weights in {path} do not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def load_model(spec: str, weights: str | None):
    """The float model named on the command line and what it is: ``(model, is_checkpoint_dir, random_weights)``."""
    from . import hf_io

    if Path(spec).is_dir():
        if not hf_io.is_checkpoint_dir(spec):
            raise ConfigError(f"{spec} is a directory without config.json: not a save_pretrained checkpoint")
        if weights:
            raise ConfigError("--weights is for a factory MODEL; a checkpoint directory holds its own weights")
        return hf_io.load_checkpoint_dir(spec), True, False
    model = load_factory(spec)
    if weights:
        load_weights(model, weights)
    return model, False, not weights


def _tokenizer_for(checkpoint: str | None):
    if checkpoint is None:
        raise ConfigError(
            "a .txt calibration file is tokenized with the checkpoint's tokenizer: give a save_pretrained "
            "directory as MODEL, or a tensor file (.safetensors or .npy) of inputs"
        )
    from .hf_io import import_transformers

    transformers = import_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"{checkpoint} has no tokenizer for the .txt calibration file ({type(exc).__name__}: {exc})") from None
    if tok.pad_token is None:  # GPT-2 has none; padding positions are masked out anyway
        tok.pad_token = tok.eos_token
    return tok


def read_calibration(path: str, *, checkpoint: str | None = None, max_length: int = 128) -> Any:
    """One calibration batch from ``--calibration``: a tuple of positional inputs, a mapping of keyword inputs, or
    a single tensor.

    * ``.txt``: one sentence per line (blank lines ignored), tokenized with the checkpoint's tokenizer (padding,
      truncation to ``max_length``) into ``input_ids``/``attention_mask``/... keyword inputs;
    * ``.safetensors``: one tensor is the single positional input; several are keyword inputs by name;
    * ``.npy``: one array, the single positional input (read with ``allow_pickle=False``).

    ``.pt``/pickles are refused: unpickling runs code from the file.
    """
    import numpy as np
    import torch

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in CALIBRATION_SUFFIXES:
        raise ConfigError(
            f"--calibration {path}: use a .txt file of sentences, a .safetensors or a .npy file "
            "(pickled .pt files are refused: loading them can run code)"
        )
    if not p.is_file():
        raise ConfigError(f"--calibration {path}: no such file")
    if suffix == ".txt":
        try:
            lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--calibration {path} is not UTF-8 text: {exc}") from None
        sentences = [s for s in lines if s]
        if not sentences:
            raise ConfigError(f"--calibration {path} holds no sentences")
        tok = _tokenizer_for(checkpoint)
        batch = tok(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(batch)
    if suffix == ".npy":
        try:
            array = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise ConfigError(f"--calibration {path} is not a readable .npy array: {exc}") from None
        if array.dtype.kind not in "biuf" or array.ndim == 0 or array.size == 0:
            raise ConfigError(f"--calibration {path}: expected a non-empty numeric array, got {array.dtype} {array.shape}")
        return torch.from_numpy(np.ascontiguousarray(array))
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(p))
    except ImportError:
        raise ConfigError("reading .safetensors needs the 'safetensors' package (pip install safetensors)") from None
    except Exception as exc:
        raise ConfigError(f"--calibration {path} is not a readable .safetensors file: {exc}") from None
    if not tensors:
        raise ConfigError(f"--calibration {path} holds no tensors")
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    return dict(sorted(tensors.items()))


def batch_size(batch: Any) -> int:
    """Number of samples in a calibration batch (the first dimension of its first tensor)."""
    import torch

    first = batch if isinstance(batch, torch.Tensor) else next(
        t for t in (batch.values() if isinstance(batch, dict) else batch) if isinstance(t, torch.Tensor)
    )
    return int(first.shape[0]) if first.ndim else 1


def split_batch(batch: Any, size: int) -> list[Any]:
    """The calibration batch cut into mini-batches of ``size`` samples (for fine-tuning)."""
    n = batch_size(batch)
    out = []
    for i in range(0, n, size):
        if isinstance(batch, dict):
            out.append({k: v[i : i + size] for k, v in batch.items()})
        elif isinstance(batch, tuple):
            out.append(tuple(v[i : i + size] for v in batch))
        else:
            out.append(batch[i : i + size])
    return out


def parse_shapes(texts: list[str]) -> list[tuple[int, ...]]:
    """``--example-shape 1x3x32x32 ...`` -> shapes with positive dimensions."""
    shapes = []
    for text in texts:
        try:
            dims = tuple(int(d) for d in text.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--example-shape must look like 1x3x32x32, got {text!r}") from None
        if any(d <= 0 for d in dims) or math.prod(dims) > 2**31:
            raise ConfigError(f"--example-shape {text!r}: every dimension must be a positive integer (and small)")
        shapes.append(dims)
    return shapes


def parse_dtype(name: str):
    """``--example-dtype`` -> a torch dtype."""
    import torch

    dtype = getattr(torch, name, None) if re.fullmatch(r"[a-z0-9_]+", name or "") else None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"--example-dtype {name!r} is not a torch dtype (e.g. float32, int64)")
    return dtype


def cli_remedy(message: str) -> str:
    """Rewrite the Python remedies in an error message as the command-line flags that apply them."""
    message = re.sub(r"CompressConfig\(fallback='(\w+)'\)", r"--fallback \1", message)
    message = re.sub(r"CompressConfig\(fallback=\"(\w+)\"\)", r"--fallback \1", message)
    message = re.sub(r"CompressConfig\(leaf_modules=\('([\w.]+)',\)\)", r"--leaf-module \1", message)
    return message

"""Save a compressed model to a ``.udnc`` container and load it back onto a float model of the same architecture."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .coding import limits
from .coding.coders import get_coder
from .coding.container import (
    Container,
    RawTensor,
    iter_container,
    read_header,
    section_sizes,
    write_container,
)
from .coding.entries import entry_from_record, record_from_entry
from .coding.payload import AUTO_CODER, check_workers
from .config import CompressConfig
from .errors import ConfigError, FormatError
from .param import DitheredLatticeParam
from .passes.materialize import served_params
from .passes.quantize import install
from .passes.select import Candidate, param_owners
from .passes.trace import hollow_copy, prepare
from .record import on_lattice
from .record_store import compression_record, set_record

__all__ = ["save", "load", "read_header", "size_report", "round_for_storage", "stored_config", "SAVE_CODER"]

#: The index coder ``save`` uses by default: ``"auto"``, per tensor the smaller of the default of ``udnc_fx.coding``
#: (``ans-dither-v2``: static rANS with per-dither-bin tables, as ``QuantizedTensor``'s and the ONNX sidecar's) and,
#: for tensors of at most 2^17 vectors, ``range-context-v1`` (adaptive, no tables: smaller on small layers).
SAVE_CODER = AUTO_CODER
#: Config fields ``load`` needs to rebuild the model (how to trace it); ``save`` stores only these by default.
_LOAD_CONFIG_FIELDS = ("leaf_modules", "fallback")


def _codebook_is_untouched(dlp: DitheredLatticeParam) -> bool:
    """Whether the codebook is still the quantizer's lattice points (stored as exact integers): the one rule,
    :func:`udnc_fx.record.on_lattice`."""
    codebook = dlp.codebook.detach().cpu().to(torch.float32).numpy()
    return on_lattice(codebook, dlp.codebook_int, dlp.lattice, dlp.n, dlp.step, dlp.affine) or on_lattice(
        codebook, dlp.codebook_int, dlp.lattice, dlp.n, dlp.step
    )


def _dlp_state_names(model: nn.Module) -> set[str]:
    """State-dict names that belong to the compressed parameters (stored in their own sections)."""
    names = set()
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, DitheredLatticeParam):
            names.update(f"{path}.{k}" for k in module.state_dict())
    return names


def _raw_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a decoder needs besides the compressed weights, by state_dict name (tied ones once)."""
    skip = _dlp_state_names(model)
    out, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in skip or ".parametrizations." in name:
            continue  # parametrization originals are emptied placeholders of compressed weights
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach()
    return out


def save(
    model: nn.Module,
    path: str | Path,
    *,
    coder: str = SAVE_CODER,
    raw_float_dtype: str = "float32",
    codebook_float_dtype: str = "float32",
    full_config: bool = False,
    metadata: dict[str, Any] | None = None,
    progress: bool | None = None,
    threads: int = 1,
    compress_header: bool = True,
) -> int:
    """Write a compressed model (from :func:`udnc_fx.compress`, possibly fine-tuned) to a ``.udnc`` container.

    Index streams are entropy-coded with ``coder`` (default ``"auto"``: per tensor, whichever of ``ans-dither-v2``
    and, on tensors of at most 2^17 vectors, ``range-context-v1`` gives fewer bytes; the entry names the one used,
    and ``udnc inspect`` shows it); codebooks untouched by fine-tuning are stored as integer
    lattice coordinates, fine-tuned ones as float32 or float16 (``codebook_float_dtype``); every other tensor
    (biases, normalisation parameters and buffers) raw, as float32 or float16 (``raw_float_dtype``). The float16
    options are lossy: :func:`load` then returns the float16 values (widened), not the in-memory ones, so measure
    accuracy on the loaded model. The write is atomic and deterministic.

    Every entry holds what decoding needs (lattice, step, dither key -- omitted when it is the one derived from the
    config's seed --, codebook, indices). The compression config is provenance, not needed to decode: by default
    only the fields :func:`load` uses (``leaf_modules``, ``fallback``) are stored, when not at their defaults;
    ``full_config=True`` stores the whole config (its non-default fields), about 50-100 bytes more.
    ``progress`` draws a bar over the coded weights: ``None`` (default) on a terminal only, ``False`` never.
    ``threads``: tensors coded side by side (the default coder's kernels release the GIL; at most ``threads``
    tensors in flight); the file's bytes are the same for every count.
    ``compress_header``: store the JSON header compressed (``udnc-hcm-v1``, format 1.5; a deterministic context-mixing
    coder, about 5x smaller on small models' headers) when that is shorter; ``False`` writes the plain JSON header,
    readable by pre-1.5 readers when nothing else needs 1.5.

    ``metadata`` is a JSON object stored as is in the container's free-form ``metadata`` section (e.g. a Hugging
    Face config from :func:`udnc_fx.hf_io.hf_metadata`, which ``udnc compress`` stores for checkpoint directories);
    :func:`read_header` returns it under ``"metadata"``.

    Returns:
        The file size in bytes.
    """
    record = compression_record(model)
    dlps = served_params(model)
    if record is None or not dlps:
        raise ConfigError("save() needs a model compressed by udnc_fx.compress (no DitheredLatticeParam found)")
    if coder != AUTO_CODER:
        get_coder(coder)
    quantized = []
    for dlp in dlps:
        # Only what decoding needs: on a small model every header byte shows in the ratio.
        meta = {"aliases": list(dlp.aliases)} if dlp.aliases else {}
        quantized.append(entry_from_record(dlp.record(), fqn=dlp.fqn, coder=coder, meta=meta))
    raw = [RawTensor(name, t.cpu().numpy()) for name, t in _raw_state(model).items()]
    config = record["config"]
    container = Container(
        quantized=quantized,
        raw=raw,
        config=_compact_config(config, full_config),
        metadata=dict(metadata or {}),
        seed=config.seed,
    )
    return write_container(
        Path(path), container, raw_float_dtype=raw_float_dtype, codebook_float_dtype=codebook_float_dtype,
        progress=progress, threads=threads, compress_header=compress_header,
    )


@torch.no_grad()
def round_for_storage(
    model: nn.Module, *, raw_float_dtype: str = "float32", codebook_float_dtype: str = "float32"
) -> nn.Module:
    """Round, in place, what :func:`save` with the same float16 options would store lossily: the float32 raw
    tensors (biases, normalisation) and the fine-tuned (float) codebooks. Afterwards the in-memory model computes
    exactly what :func:`load` rebuilds from the file, so accuracies measured on it are the file's. Codebooks that
    were not fine-tuned are stored as exact integer coordinates and left alone. Returns ``model``."""
    for name, value in (("raw_float_dtype", raw_float_dtype), ("codebook_float_dtype", codebook_float_dtype)):
        if value not in ("float32", "float16"):
            raise ConfigError(f"{name} must be 'float32' or 'float16', got {value!r}")
    if raw_float_dtype == "float16":
        for tensor in _raw_state(model).values():
            if tensor.dtype == torch.float32:
                tensor.copy_(tensor.half().float())
    if codebook_float_dtype == "float16":
        for dlp in served_params(model):
            if not _codebook_is_untouched(dlp):
                dlp.codebook.copy_(dlp.codebook.half().float())
    return model


def _compact_config(config: CompressConfig, full: bool = True) -> dict:
    """The config's ``to_dict()`` without the fields that hold their defaults (``from_dict`` restores them). With
    ``full``, every other field and ``version`` (which pins what the defaults are); else only the fields ``load``
    needs."""
    values = config.to_dict()
    defaults = CompressConfig().to_dict()
    kept = {k: v for k, v in values.items() if v != defaults.get(k, object())}
    if full:
        return {"version": values["version"], **kept}
    return {k: v for k, v in kept.items() if k in _LOAD_CONFIG_FIELDS}


def stored_config(config: CompressConfig, full: bool = False) -> dict:
    """The config as :func:`save` stores it (``full_config``): what a writer of the same model stores too."""
    return _compact_config(config, full)


def _mismatch(message: str) -> FormatError:
    return FormatError("model_mismatch", message)


def _aliases(meta: Any, fqn: str) -> tuple[str, ...]:
    """``meta.aliases`` of a stored entry: the other names of a tied weight, a list of strings."""
    aliases = meta.get("aliases", []) if isinstance(meta, dict) else None
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise FormatError("bad_value", f"{fqn}: meta.aliases must be a list of names, got {str(aliases)[:80]}")
    return tuple(aliases)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_from(stored: Any, seed: Any) -> CompressConfig:
    """The stored config, or FormatError: a hostile one may fail in any way (types, patterns that overflow)."""
    try:
        config = CompressConfig.from_dict(stored)
        if "seed" not in stored:  # the file's key seed: saving the loaded model again derives the same keys
            config = config.replace(seed=seed)
    except Exception as exc:  # ConfigError, TypeError, OverflowError, RecursionError, ...
        raise FormatError("bad_header", f"the stored config is invalid: {type(exc).__name__}: {exc}") from None
    return config


def _model_limits(model: nn.Module) -> tuple[int, int]:
    """``(tensors, bytes)`` of everything a file of ``model`` can hold (parameters and buffers, tied ones once)."""
    seen, tensors, nbytes = set(), 0, 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            tensors += 1
            nbytes += t.numel() * t.element_size()
    return tensors, nbytes


@dataclass
class _LoadTargets:
    """What the header check matched in the model, for decoding to fill: each compressed weight's parameter with
    its owners (the file's name first, then its aliases), and every other tensor the file stores, by name."""

    weights: dict[str, tuple[torch.nn.Parameter, list[tuple[str, str]]]]
    raw: dict[str, torch.Tensor]


def _check_header_against(header: dict, target: nn.Module, tensors: int, model_bytes: int) -> _LoadTargets:
    """Every name, shape and dtype the file declares must be the model's, and its sizes those a file of this model
    can have -- checked on the header, before a single stream is decoded (a 191-byte file may declare 2^28
    elements: the model, not the file, bounds what decoding may cost).

    Returns:
        The model's tensors the file's entries were matched to. The container decodes exactly the entries of
        this header (same names and shapes), so :func:`load` fills these without checking them again.
    """
    allowed = limits.payload_allowance(model_bytes, tensors)
    if header["payload_length"] > allowed:
        raise _mismatch(f"the payload is {header['payload_length']} bytes; a file of this model holds at most {allowed}")
    params: dict[str, torch.nn.Parameter] = {}
    for name, p in target.named_parameters(remove_duplicate=False):
        params.setdefault(name, p)
    owners = param_owners(target)
    weights: dict[str, tuple[torch.nn.Parameter, list[tuple[str, str]]]] = {}
    compressed_ids = set()
    for entry in header["quantized"]:
        fqn = entry["fqn"]
        p = params.get(fqn)
        if p is None:
            raise _mismatch(f"the model has no parameter {fqn!r} (the file compresses it)")
        if tuple(p.shape) != tuple(entry["shape"]):
            raise _mismatch(f"{fqn}: the model's shape {tuple(p.shape)} differs from the file's {tuple(entry['shape'])}")
        if p.dtype != torch.float32:
            raise _mismatch(f"{fqn}: the model's parameter is {_dtype_name(p.dtype)}; the file decodes it to float32")
        if id(p) in compressed_ids:
            raise _mismatch(f"{fqn}: the file compresses the same parameter twice")
        compressed_ids.add(id(p))
        tied = owners[id(p)]  # named_parameters and param_owners walk the same modules: fqn is one of these names
        names = [f"{o}.{a}" if o else a for o, a in tied]
        aliases = _aliases(entry.get("meta"), fqn)
        if sorted(n for n in names if n != fqn) != sorted(aliases):
            raise _mismatch(f"{fqn}: the model ties it to {names}, the file to {[fqn, *aliases]}")
        first = names.index(fqn)
        weights[fqn] = (p, [tied[first]] + [t for i, t in enumerate(tied) if i != first])
    expected, seen = {}, set()
    for name, t in target.state_dict(keep_vars=True).items():
        if id(t) in seen or ".parametrizations." in name:  # as _raw_state: what save stores
            continue
        seen.add(id(t))
        if id(t) not in compressed_ids:
            expected[name] = t
    stored = {r["name"]: r for r in header["raw"]}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise _mismatch(f"tensors differ: missing from the file {missing[:5]}, not in the model {extra[:5]}")
    for name, t in expected.items():
        r = stored[name]
        if tuple(r["shape"]) != tuple(t.shape):
            raise _mismatch(f"{name}: the model's shape {tuple(t.shape)} differs from the file's {tuple(r['shape'])}")
        dtype = r.get("source_dtype") or r["dtype"]
        if dtype != _dtype_name(t.dtype):
            raise _mismatch(f"{name}: the model's tensor is {_dtype_name(t.dtype)}, the file stores {dtype}")
    return _LoadTargets(weights=weights, raw=expected)


def _params_from(container: Container) -> list[DitheredLatticeParam]:
    return [
        DitheredLatticeParam.from_record(record_from_entry(q), fqn=q.fqn, aliases=_aliases(q.meta, q.fqn))
        for q in container.quantized
    ]


#: The header metadata key that marks an ONNX export's sidecar (``udnc_fx.export.runtime.SIDECAR_META_KEY``).
_SIDECAR_MARK = "udnc_onnx"


def _refuse_onnx_sidecar(header: dict, path: str | Path) -> None:
    """A sidecar holds only an ONNX export's indices and codebooks (no biases, no config): say what it is and which
    ONNX file it belongs to, rather than a confusing mismatch with the model. ``header``: the file's, resolved."""
    metadata = header.get("metadata")
    mark = metadata.get(_SIDECAR_MARK) if isinstance(metadata, dict) else None
    if mark is None:
        return
    onnx_file = mark.get("onnx_file") if isinstance(mark, dict) else None
    raise FormatError(
        "onnx_sidecar",
        f"{path} is the sidecar of the ONNX export {str(onnx_file)[:200]!r} (its weight indices only), not a model "
        "container: open it with udnc_fx.export.load_onnx on that ONNX file, or load the .udnc file udnc_fx.save "
        "wrote",
    )


def load(
    path: str | Path, model: nn.Module, *, progress: bool | None = None, workers: int = 1, threads: int = 1
) -> nn.Module:
    """Rebuild the compressed model saved at ``path`` on ``model`` (an uncompressed model of the same
    architecture; it is deep-copied, never changed). Decoded weights equal the saved ones bit for bit.
    ``progress`` draws a bar over the decoded weights: ``None`` (default) on a terminal only, ``False`` never.
    ``workers``: processes decoding the index streams side by side (forked, at most one tensor each in flight;
    POSIX only); ``1`` (default) decodes in this process. The loaded model is the same, bit for bit, for every
    count. Workers pay only with idle cores: on a busy 2-core machine (load 5.4) 2 workers loaded MiniLM 0.83x
    as fast as 1. ``threads``: threads decoding the index streams side by side (with ``workers == 1``; the default
    coder's kernels release the GIL), the same model for every count.

    Raises:
        ConfigError: ``workers`` is not an integer in [1, 256].
        FormatError: the file is malformed (any ``kind``), ``model_mismatch`` when the model's layers, shapes
            or other tensors do not match the file, or ``onnx_sidecar`` when it is an ONNX export's sidecar.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"load() needs the float model to load onto, an nn.Module; got {type(model).__name__}")
    check_workers(workers)
    tensors, model_bytes = _model_limits(model)
    prepared: dict[str, Any] = {}

    def check(header: dict) -> None:
        # Runs on the validated header, before the payload is read: everything the file declares is held against
        # the model, so decoding does only the work a valid file of this model needs.
        _refuse_onnx_sidecar(header, path)
        config = _config_from(header["config"], header["seed"])
        # The copy holds neither the float weights the file replaces (placeholders backed by one element, which
        # install() drops or empties when it serves the decoded weights) nor the values of every other tensor the
        # file stores (biases, norms, buffers: uninitialised storage, filled from the file before the model is
        # returned; the header check below refuses a file that misses one).
        work, _ = hollow_copy(
            model, replaced=[e["fqn"] for e in header["quantized"]], overwritten=[r["name"] for r in header["raw"]]
        )
        target, how = prepare(work, config, inplace=True)  # traced (or refused) as compress did
        targets = _check_header_against(header, target, tensors, model_bytes)
        prepared.update(config=config, target=target, how=how, targets=targets)

    # Tensor by tensor (iter_container): each compressed weight becomes its parameter and each raw tensor is copied
    # into the model as soon as it is decoded, so loading never holds the payload or a list of decoded arrays.
    # Elements: the model's tensors (shapes are checked to be the model's) plus codebooks (K <= count + slack).
    stream = iter_container(
        Path(path),
        max_elements=2 * (model_bytes + limits.ALPHABET_SLACK * 8 * tensors) + 1,
        max_header_length=limits.header_allowance(tensors),
        check_header=check,
        progress=progress,
        workers=workers,
        threads=threads,
    )
    dlps, candidates = [], []
    device = None
    with torch.no_grad():
        for tensor in stream:
            targets = prepared["targets"]  # check() has run: the first tensor comes after the header check
            if device is None:
                device = next((t.device for t in prepared["target"].parameters()), torch.device("cpu"))
            if isinstance(tensor, RawTensor):
                # install serves the compressed weights and leaves these tensors (biases, norms, buffers) in place
                dest = targets.raw[tensor.name]
                dest.copy_(torch.from_numpy(np.array(tensor.array)).to(dest.dtype))
                continue
            # The file holds exactly the header's entries, which check() matched to the model (names, shapes,
            # ties, dtypes): what is left is to put each decoded weight where it was matched.
            p, owners = targets.weights[tensor.fqn]
            dlp = DitheredLatticeParam.from_record(
                record_from_entry(tensor), fqn=tensor.fqn, aliases=_aliases(tensor.meta, tensor.fqn)
            ).to(device)
            del tensor  # its indices live on in the parameter (shared, not copied); the rest goes now
            dlps.append(dlp)
            candidates.append(
                Candidate(
                    fqn=dlp.fqn, owners=owners, param=p, lattice=dlp.lattice, n=dlp.n,
                    step_kind="step", step_value=dlp.step, found_by="file", step=dlp.step,
                )
            )
    target = prepared["target"]  # the stream runs check() before its first tensor, even when it holds none
    changes = install(target, candidates, dlps)
    set_record(target, config=prepared["config"], changes=changes, trace=prepared["how"])
    if not isinstance(target, fx.GraphModule):
        from .hf_io import guard_save_pretrained

        guard_save_pretrained(target)  # a transformers model: save_pretrained writes decoded weights, not a crash
    target.train(model.training)
    return target


def size_report(path: str | Path, float_model: nn.Module | None = None) -> dict[str, Any]:
    """Honest sizes of a ``.udnc`` file: per tensor bytes and bits per weight, and compression ratios.

    ``weights_ratio`` covers only the compressed weights: their float32 bytes over their sections (indices,
    codebook, header entry). ``file_ratio`` covers every tensor in the file: the float32 bytes of all of them
    (compressed weights at float32 plus the raw tensors at 4 bytes per element) over the whole file size.
    """
    header = read_header(Path(path))
    sizes = section_sizes(header)
    rows = []
    weights_float = weights_bytes = raw_float = 0
    for entry in header["quantized"]:
        s = sizes["tensors"][entry["fqn"]]
        numel = math.prod(entry["shape"])
        weights_float += 4 * numel
        weights_bytes += s["total"]
        coords = entry["codebook"]["encoding"] == "lattice-coords"
        rows.append(
            {
                "name": entry["fqn"],
                "kind": "quantized",
                "shape": entry["shape"],
                "lattice": entry["lattice"],
                "n": entry["n"],
                # lattice-coords stores every vector's coordinates and no table: K is not in the file
                "codewords": None if coords else entry["indices"]["alphabet_size"],
                "codebook_encoding": entry["codebook"]["encoding"],
                "layout": entry["codebook"].get("layout"),
                # the fine-tuned codewords' per-layer correction (a, b) over integer points (format 1.3), or None
                "affine": entry["codebook"].get("affine"),
                "coder": entry["indices"]["coder"],
                "bytes": s["total"],
                "index_bytes": s["indices"],
                "codebook_bytes": s["codebook"],
                # None for an empty tensor (nothing to divide by); a file may hold one
                "bits_per_weight": 8 * s["total"] / numel if numel else None,
                "ratio": 4 * numel / s["total"] if s["total"] else None,
            }
        )
    for entry in header["raw"]:
        s = sizes["tensors"][entry["name"]]
        numel = math.prod(entry["shape"])
        raw_float += 4 * numel
        rows.append({"name": entry["name"], "kind": "raw", "shape": entry["shape"], "bytes": s["total"]})
    file_bytes = sizes["file"]
    return {
        "rows": rows,
        "file_bytes": file_bytes,
        "shared_bytes": sizes["shared"]["total"],
        "weights_float_bytes": weights_float,
        "weights_bytes": weights_bytes,
        "weights_ratio": weights_float / weights_bytes if weights_bytes else None,
        "all_float_bytes": weights_float + raw_float,
        "file_ratio": (weights_float + raw_float) / file_bytes if file_bytes else None,
    }


def params_from(container: Container) -> list[DitheredLatticeParam]:
    """The compressed parameters a decoded container holds, one :class:`DitheredLatticeParam` per tensor.

    The public name of the container → parameters step, for readers that decode a file without a model
    (``udnc_fx.hf_io.decoded_state_dict``).

    Raises:
        FormatError: ``unknown_codec`` for an unknown dither generator, ``bad_value`` for an entry no compressed
            weight can have (an unknown lattice, an integer codebook that overflows float32 once scaled).
    """
    return _params_from(container)

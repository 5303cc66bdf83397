"""Running an exported model: ``load_onnx`` (sidecar decoding, integrity checks, two decode paths).

An ONNX file written by :func:`udnc_fx.export.to_onnx` carries, in its ``metadata_props``:

* ``udnc.format``: ``"udnc-onnx-v2"`` (this module refuses other values; ``v1`` files, whose hash did not cover
  the model-local functions, must be re-exported);
* ``udnc.tensors``: a JSON list, one entry per compressed weight (see :class:`TensorSpec`), validated like the
  container's header (finite positive steps, known lattices, consistent and bounded sizes);
* ``udnc.content_sha256``: SHA-256 over ``b"udnc-onnx-v2\\0"`` and, each prefixed by its length (8 bytes, little
  endian), the tensors JSON, the graph, every model-local function and the opset imports, each serialised by
  protobuf (``SerializeToString(deterministic=True)``). It covers every node, initializer, graph input and
  function body (the dither generator included), so an edit of anything that defines the weights is detected;
* with a sidecar, ``udnc.sidecar`` (the sidecar's plain file name, ``<onnx file name>.<16 hex>.udnc``, read only
  beside the ONNX file) and ``udnc.sidecar_sha256`` (SHA-256 of the sidecar's bytes).

The sidecar is a ``.udnc`` container (``docs/FORMAT.md``) holding each weight's entropy-coded indices and its
codebook; its metadata records ``{"udnc_onnx": {"format", "content_sha256", "onnx_file"}}``. The binding is
therefore two-way and free of circularity: the sidecar names the content hash of the ONNX graph (which does not
include the model-level metadata), and the ONNX file names the hash of the sidecar's bytes. A sidecar written for
another export fails the first check (``model_mismatch``); a sidecar edited after export fails the second
(``checksum_mismatch``).

Two decode paths build the session (``load_onnx(decode=...)``):

* ``"numpy"`` (default): the weights are decoded here with NumPy (:func:`udnc_fx.dither.uniform_np` and
  :meth:`udnc_fx.lattice.Lattice.dither_raw`, in chunks on a thread pool: the hash is counter-based), each dequantize
  subgraph is replaced by an initializer declared as external data and handed to onnxruntime from memory
  (``SessionOptions.add_external_initializers``: no copy into the protobuf), so onnxruntime opens an ordinary float
  model and treats the weights as constants (pre-packing, Conv+BatchNorm fusion) as it does for the float model;
* ``"ort"``: the indices (and, with a sidecar, the codebooks) become initializers and onnxruntime folds the
  dequantize subgraphs when it creates the session (its constant folding runs the graph single-threaded, with a
  buffer per node: 0.1–0.9 µs per weight; with graph optimisations disabled it would recompute them every run).

Measured with ``benchmarks/onnx_runtime.py`` (2 shared cores): ``"numpy"`` opens sessions in 1.1–8.7× the float
model's time, ``"ort"`` in 9–46×, so ``"numpy"`` is the default. Both give bit-identical weights. This module needs
NumPy, onnx and onnxruntime, and constriction for sidecars written with the default range coders; not torch. A
missing one raises ``ImportError`` naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ExportError, FormatError, UdncError
from ..record import DECODE_CHUNK_ELEMENTS, codebook_from_int  # noqa: F401 (codebook_from_int: re-exported)
from . import files as _files
from .spec import MAX_ELEMENTS, NAME_PREFIX, TensorSpec, tensors_json  # noqa: F401 (re-exported)

__all__ = [
    "ONNX_FORMAT_ID",
    "TensorSpec",
    "read_udnc_onnx",
    "content_sha256",
    "decode_weight_np",
    "prepare_model",
    "load_onnx",
    "DECODE_PATHS",
    "DEFAULT_DECODE",
]

ONNX_FORMAT_ID = "udnc-onnx-v2"
KEY_FORMAT = "udnc.format"
KEY_TENSORS = "udnc.tensors"
KEY_CONTENT = "udnc.content_sha256"
KEY_SIDECAR = "udnc.sidecar"
KEY_SIDECAR_SHA = "udnc.sidecar_sha256"
SIDECAR_META_KEY = "udnc_onnx"
SHARED_PREFIX = "udnc/const/"
#: Domain of the model-local functions (``Hash32``, ``Uniform24``, ``DitherRaw_<lattice>``).
FUNCTION_DOMAIN = "udnc"

DECODE_PATHS = ("numpy", "ort")
#: Measured by ``benchmarks/onnx_runtime.py``: NumPy decoding opens sessions 3-8x faster than letting onnxruntime
#: fold the dequantize subgraphs.
DEFAULT_DECODE = "numpy"
_INDEX_ITEMSIZE = {"uint8": 1, "int16": 2, "int32": 4}
_SHA = re.compile(r"[0-9a-f]{64}")


def require(package: str, why: str):
    """Import ``package`` or raise an ``ImportError`` that names it and says what needs it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"{why} needs the {package!r} package, which cannot be imported ({exc}); install it with "
            f"`pip install {package}` (or `pip install udnc-fx[onnx]`)",
            name=package,
        ) from exc


def content_sha256(model, tensors: str) -> str:
    """The hash that binds the graph, its functions, the tensor table and the sidecar (see the module docstring):
    everything that defines the weights but the model-level metadata, which holds the hash itself."""
    h = hashlib.sha256(ONNX_FORMAT_ID.encode() + b"\0")
    parts = [tensors.encode("utf-8"), model.graph.SerializeToString(deterministic=True)]
    parts += [f.SerializeToString(deterministic=True) for f in model.functions]
    parts += [o.SerializeToString(deterministic=True) for o in model.opset_import]
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def _props(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@dataclass
class UdncOnnx:
    """A parsed, verified exported model."""

    model: Any  # onnx.ModelProto
    specs: list[TensorSpec]
    props: dict[str, str]
    path: str

    @property
    def has_sidecar(self) -> bool:
        return KEY_SIDECAR in self.props


def _load_model(onnx_path):
    onnx = require("onnx", "reading an exported ONNX file")
    from google.protobuf.message import DecodeError

    path = os.fspath(onnx_path)
    data = _files.read_regular_file(path, _files.MAX_FILE_BYTES, "ONNX file")
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError, TypeError) as exc:
        raise FormatError("bad_value", f"{path} is not a readable ONNX model: {exc}") from exc
    if not model.graph.node and not model.graph.output:
        raise FormatError("bad_value", f"{path} is not an ONNX model (no graph)")
    return model


def _guarded(what: str, fn, *args, **kwargs):
    """Run ``fn``; an exception that is not one of ours (or a missing package's ``ImportError``) comes from a
    malformed file reaching a library (protobuf, onnx, NumPy) and becomes a ``FormatError`` saying so."""
    try:
        return fn(*args, **kwargs)
    except (UdncError, ImportError, MemoryError):
        raise
    except Exception as exc:
        raise FormatError("bad_value", f"{what}: malformed content ({type(exc).__name__}: {exc})") from exc


def _external_tensors(graph) -> list[str]:
    """Names of tensors in ``graph`` (initializers, node attributes, subgraphs) that point at external files."""
    from onnx import TensorProto

    found = [t.name for t in graph.initializer if t.data_location == TensorProto.EXTERNAL]
    found += [t.values.name for t in graph.sparse_initializer if t.values.data_location == TensorProto.EXTERNAL]
    for node in graph.node:
        found += _external_in_attributes(node)
    return found


def _external_in_attributes(node) -> list[str]:
    from onnx import TensorProto

    found = []
    for attr in node.attribute:
        tensors = [attr.t] if attr.HasField("t") else []
        tensors += list(attr.tensors)
        found += [f"{node.name or node.op_type}.{attr.name}" for t in tensors if t.data_location == TensorProto.EXTERNAL]
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            found += _external_tensors(g)
    return found


def read_udnc_onnx(onnx_path) -> UdncOnnx:
    """Read an ONNX file and, if :func:`to_onnx` wrote it, verify its content hash and parse its tensor table.

    A plain ONNX file (no ``udnc.format``) comes back with no tensors.

    Raises:
        FormatError: ``missing_file``, ``bad_value`` (not ONNX, not a regular file), ``unsupported_version``,
            ``bad_header`` (a malformed tensor table or sidecar name), ``checksum_mismatch`` (edited after export).
            No other exception type, whatever the file holds.
        ImportError: ``onnx`` is not installed.
    """
    path = os.fspath(onnx_path)
    return _guarded(path, _read_udnc_onnx, path)


def _read_udnc_onnx(path: str) -> UdncOnnx:
    model = _load_model(path)
    props = _props(model)
    fmt = props.get(KEY_FORMAT)
    if fmt is None:
        return UdncOnnx(model, [], props, path)
    if fmt == "udnc-onnx-v1":
        raise FormatError(
            "unsupported_version",
            f"{path} was exported by an earlier udnc-fx (udnc-onnx-v1, whose content hash does not cover the dither "
            "functions): export the model again with to_onnx",
        )
    if fmt != ONNX_FORMAT_ID:
        raise FormatError(
            "unsupported_version", f"{path}: udnc.format is {fmt!r}; this version reads {ONNX_FORMAT_ID!r}"
        )
    if KEY_TENSORS not in props or KEY_CONTENT not in props:
        raise FormatError("bad_header", f"{path}: udnc metadata incomplete (needs {KEY_TENSORS} and {KEY_CONTENT})")
    tensors = props[KEY_TENSORS]
    # to_onnx never writes external data; onnxruntime would read whatever path such a tensor names.
    external = _external_tensors(model.graph) + [n for f in model.functions for node in f.node
                                                 for n in _external_in_attributes(node)]
    if external:
        raise FormatError("bad_value", f"{path}: tensors {external[:5]} name external data files: refusing them")
    actual = content_sha256(model, tensors)
    if actual != props[KEY_CONTENT]:
        raise FormatError(
            "checksum_mismatch",
            f"{path}: the ONNX graph or its udnc tensor table was modified after export "
            f"(content SHA-256 {actual[:16]}… != recorded {props[KEY_CONTENT][:16]}…); re-export the model",
        )
    try:
        entries = json.loads(tensors)
    except json.JSONDecodeError as exc:
        raise FormatError("bad_header", f"{path}: udnc.tensors is not JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise FormatError("bad_header", f"{path}: udnc.tensors must be a list")
    specs = [TensorSpec.from_json(e, f"{path}: udnc.tensors[{i}]") for i, e in enumerate(entries)]
    for field_name in ("fqn", "output", "prefix", "indices", "codebook"):
        values = [getattr(s, field_name) for s in specs]
        if len(set(values)) != len(values):
            raise FormatError("bad_header", f"{path}: udnc.tensors has two entries with the same {field_name}")
    if KEY_SIDECAR in props:
        _files.check_sidecar_name(props[KEY_SIDECAR], path)
        if not _SHA.fullmatch(props.get(KEY_SIDECAR_SHA, "")):
            raise FormatError("bad_header", f"{path}: {KEY_SIDECAR_SHA} is missing or not a SHA-256 hex digest")
    return UdncOnnx(model, specs, props, path)


# ---------------------------------------------------------------------------------------------------------------
# Sidecar
# ---------------------------------------------------------------------------------------------------------------


def sidecar_candidates(info: UdncOnnx) -> list[str]:
    """Where the sidecar of ``info`` is looked for: beside the ONNX file, under the name recorded at export, then
    under the name an export to the ONNX file's current name would give it (the pair renamed together:
    ``a.onnx`` + ``a.onnx.<h>.udnc`` → ``b.onnx`` + ``b.onnx.<h>.udnc``). Only plain file names are used."""
    directory = os.path.dirname(os.path.abspath(info.path))
    recorded = _files.check_sidecar_name(info.props[KEY_SIDECAR], info.path)
    renamed = _files.sidecar_name(info.path, info.props[KEY_SIDECAR_SHA])
    return [os.path.join(directory, name) for name in dict.fromkeys([recorded, renamed])]


def max_sidecar_bytes(specs: list[TensorSpec]) -> int:
    """The most bytes a sidecar for ``specs`` can need: every index and codeword stored raw, twice over (no coder
    expands more), plus 4 KiB of header per tensor and 64 KiB for the rest. A larger file is refused unread."""
    total = 1 << 16
    for s in specs:
        total += 2 * (s.num_vectors * _INDEX_ITEMSIZE[s.index_dtype] + 4 * s.num_codewords * s.n) + 4096
    return total


def _decode_sidecar(data: bytes, specs: list[TensorSpec], where: str):
    """Decode the sidecar's bytes, bounded by what ``specs`` need; a coder's missing package is an ImportError."""
    from ..coding.container import decode_container

    # A lattice-coords tensor stores no K: the reader bounds its codebook by one row per vector.
    limit = max(1, sum(s.numel + max(s.num_codewords, s.num_vectors) * s.n for s in specs))
    try:
        return decode_container(data, max_elements=limit)
    except FormatError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, ImportError):  # the coders wrap their errors too
            cause = cause.__cause__
        if isinstance(cause, ImportError):  # e.g. constriction for the range coders: not a corrupt file
            package = (getattr(cause, "name", None) or "a coder's package").split(".")[0]
            require(package, f"decoding the sidecar {where}")
            raise ImportError(f"decoding the sidecar {where} needs {package!r}: {cause}", name=package) from cause
        raise FormatError(exc.kind, f"sidecar {where}: {exc.message}") from exc


def _read_sidecar(info: UdncOnnx, sidecar_path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Check the binding and decode ``{fqn: (indices, codebook)}`` from the sidecar."""
    from ..coding.container import read_header

    onnx_path = info.path
    if sidecar_path is None:
        candidates = sidecar_candidates(info)
        sidecar_path = next((c for c in candidates if os.path.lexists(c)), None)
        if sidecar_path is None:
            raise FormatError(
                "missing_sidecar",
                f"{onnx_path} keeps its weight indices in a sidecar, but none of {candidates} exists "
                "(copy the sidecar next to the ONNX file or pass sidecar_path=)",
            )
    sidecar_path = os.fspath(sidecar_path)
    data = _files.read_regular_file(
        sidecar_path, max_sidecar_bytes(info.specs), f"sidecar of {onnx_path}:", missing_kind="missing_sidecar"
    )
    try:
        header = read_header(data)
    except FormatError as exc:
        raise FormatError(exc.kind, f"sidecar {sidecar_path}: {exc.message}") from exc
    metadata = header.get("metadata")
    binding = metadata.get(SIDECAR_META_KEY) if isinstance(metadata, dict) else None
    recorded = info.props[KEY_CONTENT]
    if not isinstance(binding, dict) or binding.get("content_sha256") != recorded:
        theirs = str(binding.get("onnx_file", "?"))[:200] if isinstance(binding, dict) else "no ONNX export"
        raise FormatError(
            "model_mismatch",
            f"sidecar {sidecar_path} does not belong to {onnx_path}: it was written for {theirs!r} "
            f"(content {str(binding.get('content_sha256') if isinstance(binding, dict) else None)[:16]}…), "
            f"this model's content is {recorded[:16]}…",
        )
    # Checked before decoding: the decoder then only ever sees the bytes the exporter wrote.
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.props.get(KEY_SIDECAR_SHA):
        raise FormatError(
            "checksum_mismatch",
            f"sidecar {sidecar_path} was modified after export (SHA-256 {digest[:16]}… != recorded "
            f"{str(info.props.get(KEY_SIDECAR_SHA))[:16]}… in {onnx_path})",
        )
    from ..coding.entries import record_from_entry

    container = _decode_sidecar(data, info.specs, sidecar_path)
    by_name = {q.fqn: q for q in container.quantized}
    out = {}
    for spec in info.specs:
        q = by_name.get(spec.fqn)
        where = f"sidecar {sidecar_path}, tensor {spec.fqn!r}"
        if q is None:
            raise FormatError("model_mismatch", f"{where}: missing")
        rec = record_from_entry(q, where)
        if (rec.shape, rec.lattice, rec.n, rec.step, rec.key, rec.zero_index) != (
            spec.shape, spec.lattice, spec.n, spec.step, spec.key, spec.zero_index
        ):
            raise FormatError("model_mismatch", f"{where}: its quantizer parameters differ from the ONNX file's")
        if rec.codebook.shape != (spec.num_codewords, spec.n):
            raise FormatError("model_mismatch", f"{where}: codebook shape {rec.codebook.shape}")
        out[spec.fqn] = (rec.indices.astype(spec.index_dtype), np.ascontiguousarray(rec.codebook))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Decoding and session creation
# ---------------------------------------------------------------------------------------------------------------


#: Weights decoded per work item (:data:`udnc_fx.record.DECODE_CHUNK_ELEMENTS`).
CHUNK_ELEMENTS = DECODE_CHUNK_ELEMENTS


def decode_weight_np(spec: TensorSpec, indices: np.ndarray, codebook: np.ndarray, *, executor=None) -> np.ndarray:
    """The decoded weight (float32, ``spec.shape``), bit-exact with the ONNX dequantize subgraph and with
    ``DitheredLatticeParam.forward``: :meth:`udnc_fx.record.CompressedWeight.decode` of ``spec.record(...)``,
    ``(C[k] − float32(dither_raw(r)·scale·Δ))``, zero index → 0, cut and reshaped.

    Args:
        spec: the tensor's entry.
        indices, codebook: its indices ``(m,)`` and float32 codebook ``(K, n)``.
        executor: an optional ``concurrent.futures`` executor; the rows are then decoded in chunks on it.

    Raises:
        FormatError: ``bad_value`` when the arrays do not fit the entry.
    """
    try:
        record = spec.record(indices, np.asarray(codebook, dtype=np.float32))
    except ConfigError as exc:
        raise FormatError("bad_value", f"tensor {spec.fqn!r}: {exc}") from None
    return record.decode(executor=executor)


def _initializer_arrays(model, names: set[str]) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer if init.name in names}


def _remove_unused_shared(graph) -> None:
    used = {i for node in graph.node for i in node.input}
    used |= {o.name for o in graph.output}
    keep = [init for init in graph.initializer if not init.name.startswith(SHARED_PREFIX) or init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _external_placeholder(name: str, array: np.ndarray):
    """An initializer declaring ``name`` with external data, to be supplied from memory by
    ``SessionOptions.add_external_initializers`` (no copy of the weight into the protobuf)."""
    from onnx import TensorProto, helper

    tensor = TensorProto(name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "udnc-decoded-in-memory"), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v
    return tensor


def _workers(threads: int | None) -> int:
    if threads is None:
        return max(1, min(8, os.cpu_count() or 1))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"decode_threads must be a positive integer or None, got {threads!r}")
    return threads


def _prepare(onnx_path, sidecar_path, decode: str, decode_threads: int | None):
    """``(ModelProto, {name: decoded weight})``: with ``decode="numpy"`` the weights are declared as external
    initializers in the proto and returned separately; otherwise the dict is empty."""
    require("onnx", "reading an exported ONNX file")
    from onnx import numpy_helper

    if decode not in DECODE_PATHS:
        raise ConfigError(f"decode must be one of {DECODE_PATHS}, got {decode!r}")
    workers = _workers(decode_threads)
    info = read_udnc_onnx(onnx_path)
    model, graph = info.model, info.model.graph
    if not info.specs:
        if sidecar_path is not None:
            raise FormatError("model_mismatch", f"{info.path} has no compressed weights, so it takes no sidecar")
        return model, {}
    if info.has_sidecar:
        data = _read_sidecar(info, sidecar_path)
    elif sidecar_path is not None:
        raise FormatError(
            "model_mismatch", f"{info.path} is self-contained (indices inside the file): it takes no sidecar"
        )
    else:
        names = {s.indices for s in info.specs} | {s.codebook_int or s.codebook for s in info.specs}
        arrays = _initializer_arrays(model, names)
        missing = names - set(arrays)
        if missing:
            raise FormatError("bad_header", f"{info.path}: initializers {sorted(missing)} are missing")
        data = {}
        for s in info.specs:
            if s.codebook_int is None:
                data[s.fqn] = (arrays[s.indices], arrays[s.codebook])
            else:
                ci = arrays[s.codebook_int]
                if ci.dtype.kind != "i" or ci.ndim != 2 or ci.shape[1] != s.n:
                    raise FormatError("bad_value", f"{info.path}: integer codebook of {s.fqn!r} is malformed")
                try:
                    data[s.fqn] = (arrays[s.indices], codebook_from_int(ci, s.lattice, s.n, s.step, s.affine))
                except ValueError as exc:  # not lattice points
                    raise FormatError("bad_value", f"{info.path}: integer codebook of {s.fqn!r}: {exc}") from exc
                if not np.isfinite(data[s.fqn][1]).all():
                    raise FormatError("bad_value", f"{info.path}: integer codebook of {s.fqn!r} overflows float32")

    for spec in info.specs:
        idx, cb = data[spec.fqn]
        if idx.dtype.kind not in "iu" or cb.dtype != np.float32:
            raise FormatError("bad_value", f"{info.path}: indices or codebook of {spec.fqn!r} have the wrong dtype")
        if idx.shape != (spec.num_vectors,) or cb.shape != (spec.num_codewords, spec.n):
            raise FormatError("bad_value", f"{info.path}: indices or codebook of {spec.fqn!r} have the wrong shape")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= spec.num_codewords):
            raise FormatError("bad_value", f"{info.path}: indices of {spec.fqn!r} outside [0, {spec.num_codewords})")

    if decode == "ort":
        if info.has_sidecar:
            fed = {s.indices for s in info.specs} | {s.codebook for s in info.specs}
            kept = [v for v in graph.input if v.name not in fed]
            del graph.input[:]
            graph.input.extend(kept)
            for spec in info.specs:
                idx, cb = data[spec.fqn]
                graph.initializer.append(numpy_helper.from_array(idx, spec.indices))
                graph.initializer.append(numpy_helper.from_array(cb, spec.codebook))
        return model, {}

    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:  # NumPy releases the GIL in its loops
            weights = {s.output: decode_weight_np(s, *data[s.fqn], executor=pool) for s in info.specs}
    else:
        weights = {s.output: decode_weight_np(s, *data[s.fqn]) for s in info.specs}
    prefixes = tuple(s.prefix for s in info.specs)
    kept_nodes = [node for node in graph.node if not node.name.startswith(prefixes)]
    kept_inits = [init for init in graph.initializer if not init.name.startswith(prefixes)]
    kept_inputs = [v for v in graph.input if not v.name.startswith(prefixes)]
    kept_inits += [_external_placeholder(name, w) for name, w in weights.items()]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.input[:]
    graph.input.extend(kept_inputs)
    _remove_unused_shared(graph)
    used = {f.name for f in model.functions} & {n.op_type for n in graph.node if n.domain == FUNCTION_DOMAIN}
    kept_functions = [f for f in model.functions if f.name in used]
    del model.functions[:]
    model.functions.extend(kept_functions)
    if not kept_functions:
        kept_opsets = [o for o in model.opset_import if o.domain != FUNCTION_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept_opsets)
    return model, weights


def prepare_model(onnx_path, sidecar_path=None, *, decode: str = DEFAULT_DECODE, decode_threads: int | None = None):
    """The ``onnx.ModelProto`` a session is created from, for inspection or saving: verified, with the sidecar's
    data filled in, and with ``decode="numpy"`` each dequantize subgraph replaced by an initializer holding the
    decoded weight (a plain float model). :func:`load_onnx` does the same work without copying the weights into
    the protobuf.

    Raises:
        FormatError: see :func:`load_onnx`.
        ConfigError: an unknown ``decode``.
        ImportError: ``onnx`` (or a sidecar coder's package) is not installed.
    """
    require("onnx", "prepare_model")
    from onnx import numpy_helper

    model, weights = _guarded(os.fspath(onnx_path), _prepare, onnx_path, sidecar_path, decode, decode_threads)
    if weights:
        inits = [numpy_helper.from_array(weights[i.name], i.name) if i.name in weights else i
                 for i in model.graph.initializer]
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
    return model


def session_options(sess_options=None, **options):
    """An ``onnxruntime.SessionOptions`` with ``options`` set as attributes (``intra_op_num_threads=1``,
    ``graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL``, ...)."""
    import onnxruntime as ort

    so = sess_options if sess_options is not None else ort.SessionOptions()
    for name, value in options.items():
        if not hasattr(so, name):
            raise ConfigError(f"onnxruntime.SessionOptions has no option {name!r}")
        setattr(so, name, value)
    return so


def load_onnx(
    onnx_path,
    sidecar_path=None,
    *,
    decode: str = DEFAULT_DECODE,
    providers=None,
    sess_options=None,
    decode_threads: int | None = None,
    **options,
):
    """Open an ONNX file written by :func:`udnc_fx.export.to_onnx` (or any plain ONNX file) in onnxruntime.

    Args:
        onnx_path: the ``.onnx`` file.
        sidecar_path: the ``.udnc`` sidecar; default: ``<stem>.udnc`` next to the ONNX file, else the name
            recorded at export.
        decode: ``"numpy"`` (default: decode the weights here and hand them to onnxruntime as initializers; the
            faster start) or ``"ort"`` (onnxruntime folds the dequantize subgraphs at session creation).
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
        sess_options: an ``onnxruntime.SessionOptions`` to start from.
        decode_threads: threads for ``decode="numpy"`` (default: the CPU count, at most 8).
        **options: ``SessionOptions`` attributes to set, e.g. ``intra_op_num_threads=1``,
            ``graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL``.

    Returns:
        ``onnxruntime.InferenceSession``.

    Raises:
        FormatError: ``missing_file`` / ``missing_sidecar``; ``checksum_mismatch`` (ONNX or sidecar edited after
            export); ``model_mismatch`` (a sidecar written for another export, or one given to a model that takes
            none); ``unsupported_version``; ``bad_header``/``bad_value`` (a malformed tensor table, a recorded
            sidecar name that is not a plain file name beside the ONNX file, a sidecar that is not a regular file
            or is larger than the tensor table allows); the container's own kinds for a damaged sidecar. Each
            message names the file and, where it applies, the tensor. Whatever the files hold, no exception
            other than these and the two below escapes.
        ConfigError: an unknown ``decode`` or session option.
        ExportError: onnxruntime refused the model.
        ImportError: a package this needs is missing, named in the message: ``onnx`` and ``onnxruntime`` always,
            ``constriction`` for a sidecar whose indices use the range coders (the default). torch is not needed.
    """
    ort = require("onnxruntime", "load_onnx")
    model, weights = _guarded(os.fspath(onnx_path), _prepare, onnx_path, sidecar_path, decode, decode_threads)
    so = session_options(sess_options, **options)
    values = [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()]
    if weights:
        so.add_external_initializers(list(weights), values)
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), so, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ExportError(f"onnxruntime could not open {os.fspath(onnx_path)}: {exc}") from exc
    # onnxruntime may serve the weights from these buffers: they live as long as the session.
    session._udnc_buffers = (weights, values)
    return session


def file_sizes(onnx_path) -> dict[str, int]:
    """``{"onnx": bytes, "sidecar": bytes}`` of an export (sidecar 0 when self-contained or not found)."""
    info = _props(_load_model(onnx_path))
    size = Path(onnx_path).stat().st_size
    side = 0
    if KEY_SIDECAR in info:
        name = _files.check_sidecar_name(info[KEY_SIDECAR], onnx_path)
        p = Path(os.path.dirname(os.path.abspath(onnx_path))) / name
        side = p.stat().st_size if p.is_file() else 0
    return {"onnx": size, "sidecar": side}

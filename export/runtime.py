"""Running an exported model: ``load_onnx`` (sidecar decoding, integrity checks, two decode paths).

An ONNX file written by :func:`udnc_fx.export.to_onnx` carries, in its ``metadata_props``:

* ``udnc.format``: ``"udnc-onnx-v1"`` (this module refuses other values);
* ``udnc.tensors``: a JSON list, one entry per compressed weight (see :class:`TensorSpec`);
* ``udnc.content_sha256``: ``SHA-256(b"udnc-onnx-v1\\0" + tensors JSON + b"\\0" + graph bytes)``, the graph
  serialised by protobuf (``GraphProto.SerializeToString(deterministic=True)``). It covers every node, initializer
  and graph input, so an edit of the graph or of the tensor table after export is detected;
* with a sidecar, ``udnc.sidecar`` (the sidecar's file name, looked for next to the ONNX file) and
  ``udnc.sidecar_sha256`` (SHA-256 of the sidecar's bytes).

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
NumPy, onnx and onnxruntime, not torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dither import DITHER_ID
from ..errors import ConfigError, ExportError, FormatError
from ..lattice import get_lattice
from ..quantizer import codebook_from_int

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

ONNX_FORMAT_ID = "udnc-onnx-v1"
KEY_FORMAT = "udnc.format"
KEY_TENSORS = "udnc.tensors"
KEY_CONTENT = "udnc.content_sha256"
KEY_SIDECAR = "udnc.sidecar"
KEY_SIDECAR_SHA = "udnc.sidecar_sha256"
SIDECAR_META_KEY = "udnc_onnx"
#: Names of everything the exporter adds start with this; each weight's subgraph with ``udnc/<fqn>/``.
NAME_PREFIX = "udnc/"
SHARED_PREFIX = "udnc/const/"
#: Domain of the model-local functions (``Hash32``, ``Uniform24``, ``DitherRaw_<lattice>``).
FUNCTION_DOMAIN = "udnc"

DECODE_PATHS = ("numpy", "ort")
#: Measured by ``benchmarks/onnx_runtime.py``: NumPy decoding opens sessions 3-8x faster than letting onnxruntime
#: fold the dequantize subgraphs.
DEFAULT_DECODE = "numpy"


@dataclass(frozen=True)
class TensorSpec:
    """One compressed weight as the ONNX file records it (an entry of ``udnc.tensors``).

    Attributes:
        fqn: the parameter's qualified name (``"conv1.weight"``).
        aliases: other names of the same (tied) parameter.
        output: the graph value the dequantize subgraph produces (the weight's initializer name before lowering).
        shape: the weight's shape.
        lattice, n, step: the quantizer.
        key: the uint64 dither key, or ``None`` (no dither).
        num_vectors: ``ceil(numel / n)``, the number of indices.
        num_codewords: ``K``.
        index_dtype: ``"uint8"``, ``"int16"`` or ``"int32"``.
        zero_index: the index that decodes to exact 0, or ``None``.
        indices, codebook: graph names of the index and float32 codebook tensors (initializers, or graph inputs
            filled from the sidecar; the codebook is computed by the graph when ``codebook_int`` is set).
        prefix: the name prefix of this weight's nodes and private initializers.
        codebook_int: in a self-contained file, the initializer of the codewords' integer lattice coordinates
            (int8/int16/int32, ``K × n``) the graph rebuilds ``codebook`` from, exactly as the quantizer made it;
            ``None`` when the codebook is stored as float32 (fine-tuned codewords) or comes from the sidecar.
    """

    fqn: str
    aliases: tuple[str, ...]
    output: str
    shape: tuple[int, ...]
    lattice: str
    n: int
    step: float
    key: int | None
    num_vectors: int
    num_codewords: int
    index_dtype: str
    zero_index: int | None
    indices: str
    codebook: str
    prefix: str
    codebook_int: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def factor(self) -> float:
        """``lattice.scale * step`` (float64): raw dither → weight units, as every decoder computes it."""
        return float(get_lattice(self.lattice, self.n).scale) * float(self.step)

    def to_json(self) -> dict:
        return {
            "fqn": self.fqn,
            "aliases": list(self.aliases),
            "output": self.output,
            "shape": list(self.shape),
            "lattice": self.lattice,
            "n": self.n,
            "step": self.step,
            "key": None if self.key is None else f"{self.key:016x}",
            "dither": DITHER_ID,
            "num_vectors": self.num_vectors,
            "num_codewords": self.num_codewords,
            "index_dtype": self.index_dtype,
            "zero_index": self.zero_index,
            "indices": self.indices,
            "codebook": self.codebook,
            "prefix": self.prefix,
            "codebook_int": self.codebook_int,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> TensorSpec:
        try:
            if obj.get("dither", DITHER_ID) != DITHER_ID:
                raise FormatError("unsupported_version", f"{where}: unknown dither generator {obj['dither']!r}")
            key = obj["key"]
            spec = cls(
                fqn=str(obj["fqn"]),
                aliases=tuple(str(a) for a in obj["aliases"]),
                output=str(obj["output"]),
                shape=tuple(int(s) for s in obj["shape"]),
                lattice=str(obj["lattice"]),
                n=int(obj["n"]),
                step=float(obj["step"]),
                key=None if key is None else int(key, 16),
                num_vectors=int(obj["num_vectors"]),
                num_codewords=int(obj["num_codewords"]),
                index_dtype=str(obj["index_dtype"]),
                zero_index=None if obj["zero_index"] is None else int(obj["zero_index"]),
                indices=str(obj["indices"]),
                codebook=str(obj["codebook"]),
                prefix=str(obj["prefix"]),
                codebook_int=None if obj.get("codebook_int") is None else str(obj["codebook_int"]),
            )
            get_lattice(spec.lattice, spec.n)
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
            raise FormatError("bad_header", f"{where}: malformed tensor entry: {exc!r}") from exc
        if spec.index_dtype not in ("uint8", "int16", "int32"):
            raise FormatError("bad_header", f"{where}: index dtype {spec.index_dtype!r}")
        if spec.num_vectors != -(-spec.numel // spec.n) or not spec.prefix.startswith(NAME_PREFIX):
            raise FormatError("bad_header", f"{where}: inconsistent tensor entry for {spec.fqn!r}")
        return spec


def tensors_json(specs: list[TensorSpec]) -> str:
    return json.dumps([s.to_json() for s in specs], sort_keys=True, separators=(",", ":"))


def content_sha256(graph, tensors: str) -> str:
    """The hash that binds the graph, the tensor table and the sidecar (see the module docstring)."""
    h = hashlib.sha256()
    h.update(ONNX_FORMAT_ID.encode() + b"\0" + tensors.encode("utf-8") + b"\0")
    h.update(graph.SerializeToString(deterministic=True))
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
    import onnx
    from google.protobuf.message import DecodeError

    path = os.fspath(onnx_path)
    if not os.path.exists(path):
        raise FormatError("missing_file", f"ONNX file {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise FormatError("bad_value", f"{path} is not a readable ONNX model: {exc}") from exc
    if not model.graph.node and not model.graph.output:
        raise FormatError("bad_value", f"{path} is not an ONNX model (no graph)")
    return model


def read_udnc_onnx(onnx_path) -> UdncOnnx:
    """Read an ONNX file and, if :func:`to_onnx` wrote it, verify its content hash and parse its tensor table.

    A plain ONNX file (no ``udnc.format``) comes back with no tensors.

    Raises:
        FormatError: ``missing_file``, ``bad_value`` (not ONNX), ``unsupported_version``, ``bad_header``,
            ``checksum_mismatch`` (edited after export).
    """
    path = os.fspath(onnx_path)
    model = _load_model(path)
    props = _props(model)
    fmt = props.get(KEY_FORMAT)
    if fmt is None:
        return UdncOnnx(model, [], props, path)
    if fmt != ONNX_FORMAT_ID:
        raise FormatError(
            "unsupported_version", f"{path}: udnc.format is {fmt!r}; this version reads {ONNX_FORMAT_ID!r}"
        )
    if KEY_TENSORS not in props or KEY_CONTENT not in props:
        raise FormatError("bad_header", f"{path}: udnc metadata incomplete (needs {KEY_TENSORS} and {KEY_CONTENT})")
    tensors = props[KEY_TENSORS]
    actual = content_sha256(model.graph, tensors)
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
    return UdncOnnx(model, specs, props, path)


# ---------------------------------------------------------------------------------------------------------------
# Sidecar
# ---------------------------------------------------------------------------------------------------------------


def default_sidecar_path(onnx_path) -> str:
    """``model.onnx`` → ``model.udnc``; any other name gets ``.udnc`` appended."""
    path = os.fspath(onnx_path)
    return path[: -len(".onnx")] + ".udnc" if path.endswith(".onnx") else path + ".udnc"


def _read_sidecar(info: UdncOnnx, sidecar_path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Check the binding and decode ``{fqn: (indices, codebook)}`` from the sidecar."""
    from ..coding.container import decode_container

    onnx_path = info.path
    if sidecar_path is None:
        # The pair may have been renamed together (model.onnx + model.udnc → v2.onnx + v2.udnc): look for the
        # ONNX file's own stem first, then for the name recorded at export. The binding check decides either way.
        recorded = os.path.join(os.path.dirname(os.path.abspath(onnx_path)), info.props[KEY_SIDECAR])
        candidates = list(dict.fromkeys([default_sidecar_path(onnx_path), recorded]))
        sidecar_path = next((c for c in candidates if os.path.exists(c)), None)
        if sidecar_path is None:
            raise FormatError(
                "missing_sidecar",
                f"{onnx_path} keeps its weight indices in a sidecar, but none of {candidates} exists "
                "(copy the .udnc file next to the ONNX file or pass sidecar_path=)",
            )
    sidecar_path = os.fspath(sidecar_path)
    if not os.path.exists(sidecar_path):
        raise FormatError("missing_sidecar", f"sidecar {sidecar_path} for {onnx_path} does not exist")
    with open(sidecar_path, "rb") as f:
        data = f.read()
    try:
        container = decode_container(data)
    except FormatError as exc:
        raise FormatError(exc.kind, f"sidecar {sidecar_path}: {exc.message}") from exc
    binding = container.metadata.get(SIDECAR_META_KEY) if isinstance(container.metadata, dict) else None
    recorded = info.props[KEY_CONTENT]
    if not isinstance(binding, dict) or binding.get("content_sha256") != recorded:
        theirs = binding.get("onnx_file", "?") if isinstance(binding, dict) else "no ONNX export"
        raise FormatError(
            "model_mismatch",
            f"sidecar {sidecar_path} does not belong to {onnx_path}: it was written for {theirs!r} "
            f"(content {str(binding.get('content_sha256') if isinstance(binding, dict) else None)[:16]}…), "
            f"this model's content is {recorded[:16]}…",
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.props.get(KEY_SIDECAR_SHA):
        raise FormatError(
            "checksum_mismatch",
            f"sidecar {sidecar_path} was modified after export (SHA-256 {digest[:16]}… != recorded "
            f"{str(info.props.get(KEY_SIDECAR_SHA))[:16]}… in {onnx_path})",
        )
    by_name = {q.fqn: q for q in container.quantized}
    out = {}
    for spec in info.specs:
        q = by_name.get(spec.fqn)
        where = f"sidecar {sidecar_path}, tensor {spec.fqn!r}"
        if q is None:
            raise FormatError("model_mismatch", f"{where}: missing")
        key = None if q.dither == "none" else q.key
        if (tuple(q.shape), q.lattice, q.n, float(q.step), key, q.zero_index) != (
            spec.shape, spec.lattice, spec.n, spec.step, spec.key, spec.zero_index
        ) or len(q.indices) != spec.num_vectors:
            raise FormatError("model_mismatch", f"{where}: its quantizer parameters differ from the ONNX file's")
        codebook = q.codebook if q.codebook is not None else codebook_from_int(q.codebook_int, q.lattice, q.n, q.step)
        if codebook.shape != (spec.num_codewords, spec.n):
            raise FormatError("model_mismatch", f"{where}: codebook shape {codebook.shape}")
        out[spec.fqn] = (np.asarray(q.indices).astype(spec.index_dtype), np.ascontiguousarray(codebook, np.float32))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Decoding and session creation
# ---------------------------------------------------------------------------------------------------------------


#: Weights decoded per work item: small enough that the float64 temporaries stay in cache, large enough that
#: NumPy's per-call overhead does not show.
CHUNK_ELEMENTS = 1 << 18


def _decode_rows(spec: TensorSpec, idx: np.ndarray, codebook: np.ndarray, out: np.ndarray, v0: int, v1: int) -> None:
    from ..dither import uniform_np

    lat = get_lattice(spec.lattice, spec.n)
    rows = idx[v0:v1]
    vectors = codebook[rows]
    if spec.key is not None:
        # The hash is counter-based: rows v0..v1 need elements v0·n..v1·n of the stream only.
        r = uniform_np(spec.key, (v1 - v0) * spec.n, start=v0 * spec.n).reshape(-1, spec.n)
        vectors -= (lat.dither_raw(r) * spec.factor).astype(np.float32)
    if spec.zero_index is not None:
        vectors[rows == spec.zero_index] = 0.0
    out[v0:v1] = vectors


def decode_weight_np(spec: TensorSpec, indices: np.ndarray, codebook: np.ndarray, *, executor=None) -> np.ndarray:
    """The decoded weight (float32, ``spec.shape``), bit-exact with the ONNX dequantize subgraph and with
    ``DitheredLatticeParam.forward``: ``(C[k] − float32(dither_raw(r)·scale·Δ))``, zero index → 0, cut and reshaped.

    Args:
        spec: the tensor's entry.
        indices, codebook: its indices ``(m,)`` and float32 codebook ``(K, n)``.
        executor: an optional ``concurrent.futures`` executor; the rows are then decoded in chunks on it.
    """
    idx = np.asarray(indices).astype(np.intp, copy=False)
    codebook = np.asarray(codebook, dtype=np.float32)
    out = np.empty((spec.num_vectors, spec.n), dtype=np.float32)
    step = max(1, CHUNK_ELEMENTS // spec.n)
    bounds = [(v0, min(v0 + step, spec.num_vectors)) for v0 in range(0, spec.num_vectors, step)]
    if executor is None or len(bounds) <= 1:
        for v0, v1 in bounds:
            _decode_rows(spec, idx, codebook, out, v0, v1)
    else:
        for f in [executor.submit(_decode_rows, spec, idx, codebook, out, v0, v1) for v0, v1 in bounds]:
            f.result()
    return out.reshape(-1)[: spec.numel].reshape(spec.shape)


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
                    data[s.fqn] = (arrays[s.indices], codebook_from_int(ci, s.lattice, s.n, s.step))
                except ValueError as exc:  # not lattice points
                    raise FormatError("bad_value", f"{info.path}: integer codebook of {s.fqn!r}: {exc}") from exc

    for spec in info.specs:
        idx, cb = data[spec.fqn]
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
    """
    from onnx import numpy_helper

    model, weights = _prepare(onnx_path, sidecar_path, decode, decode_threads)
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
            none); ``unsupported_version``; ``bad_header``/``bad_value``; the container's own kinds for a damaged
            sidecar. Each message names the file and, where it applies, the tensor.
        ConfigError: an unknown ``decode`` or session option.
        ExportError: onnxruntime refused the model.
    """
    import onnxruntime as ort

    model, weights = _prepare(onnx_path, sidecar_path, decode, decode_threads)
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
    """``{"onnx": bytes, "sidecar": bytes}`` of an export (sidecar 0 when self-contained)."""
    info = _props(_load_model(onnx_path))
    size = Path(onnx_path).stat().st_size
    side = 0
    if KEY_SIDECAR in info:
        p = Path(os.path.dirname(os.path.abspath(onnx_path))) / info[KEY_SIDECAR]
        side = p.stat().st_size if p.exists() else 0
    return {"onnx": size, "sidecar": side}

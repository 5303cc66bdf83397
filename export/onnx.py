"""Lowering a compressed model to ONNX: dequantize subgraphs that regenerate the dither in the graph.

Before (what ``torch.onnx.export`` writes for the materialized model)::

    conv1.weight: f32[16,1,3,3] (initializer) ──▶ Conv

After (names under ``udnc/conv1.weight/``; ``udnc.*`` are model-local functions, domain ``udnc``)::

    indices: u8[m] ─Cast─▶ Gather(codebook: f32[K×n]) ─▶ Sub ─▶ [Where zero_index → 0] ─▶ Reshape(-1)
        ─▶ [Slice :numel] ─▶ Reshape(shape) = conv1.weight ──▶ Conv
                  ▲
    key: u64, count ─udnc.Hash32─▶ h: u32[m·n] ─udnc.Uniform24─▶ r: f64 ─udnc.DitherRaw_E8─▶ u: f64[m×n]
        ─Mul(factor = scale·Δ, f64)─▶ Cast(float32)

    Hash32:       a, b = whitened key words; h_i = fmix32(fmix32(i ^ a) ^ b), i = Cast(Range(count), uint32)
    Uniform24:    r_i = (h_i >> 8)·2^-24
    DitherRaw_Λ:  x = r·box_raw; u = x − Q_Λ(x)    (Conway & Sloane's decoders, lattice.py's tie-breaking)

In a self-contained file a codebook that is still lattice points (not fine-tuned) is stored as int8/int16 integer
coordinates and rebuilt by the graph as ``float32(from_int(c)·factor)``, exactly as the quantizer built it; a
fine-tuned codebook kept as the points under a per-layer affine correction (``passes.finetune.choose_codebooks``)
adds a float32 ``Mul`` by ``a`` and ``Add`` of ``b`` after it (:func:`udnc_fx.record.codebook_from_int`).

Every step is the integer hash of :mod:`udnc_fx.dither` and the lattice arithmetic of
:meth:`udnc_fx.lattice.Lattice.dither_raw`, op for op (uint32 wrapping ``Mul``, unsigned ``BitShift``,
``BitwiseXor``, round-half-even ``Round``, first-index ``ArgMax``), so the weight onnxruntime computes equals
``DitheredLatticeParam.forward()`` bit for bit. Nothing of size ``m·n`` but the indices is stored: the counter is an
``int64`` ``Range`` cast to ``uint32`` and every other constant is a scalar or has ``n`` entries. The functions are
defined once per model and inlined by onnxruntime at load; a weight costs ~10 nodes in the main graph.

Why the TorchScript exporter (``dynamo=False``) and not the dynamo one: with ``do_constant_folding=False`` it keeps
every weight as an untouched initializer named by its fqn, while the dynamo exporter folds BatchNorm into
convolution weights and pre-transposes Linear weights (new float tensors that are no longer the decoded weight,
so they could not be replaced by a dequantize subgraph), and takes ~8 s for a small CNN. onnxruntime folds the
``Transpose`` and fuses Conv+BatchNorm itself at session creation, for both the float and the compressed model.

The op builders (the graph builder, the hash, uniform, nearest-point and dither bodies, the function protos and a
weight's dequantize subgraph) are in :mod:`udnc_fx.export.onnx_ops`; this module assembles models from them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, ExportError, FormatError
from ..lattice import get_lattice
from ..progress import progress_bar
from . import files as _files
from . import runtime as _rt
from ..record import CompressedWeight
from .onnx_ops import Body, dequantize_subgraph, dither_subgraph, functions_for, store_codebook
from .runtime import FUNCTION_DOMAIN, NAME_PREFIX, ONNX_FORMAT_ID, TensorSpec

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "to_onnx",
    "OnnxExport",
    "build_dither_model",
    "build_decode_model",
]

#: BitwiseXor and BitwiseAnd need opset 18.
MIN_OPSET = 18
DEFAULT_OPSET = 18

_INDEX_DTYPES = {"uint8": np.uint8, "int16": np.int16, "int32": np.int32}


# ---------------------------------------------------------------------------------------------------------------
# Small models for tests and inspection
# ---------------------------------------------------------------------------------------------------------------


def _finish_model(b: Body, inputs: list, outputs: list, opset: int, name: str):
    from onnx import helper

    graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=list(b.initializers.values()))
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(FUNCTION_DOMAIN, 1)],
        producer_name="udnc-fx",
        functions=functions_for(b.functions_used, opset),
    )
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime releases that predate IR 10
    return model


def build_dither_model(
    num_vectors: int, lattice: str, n: int, step: float = 1.0, *, key: int | None = None, opset: int = DEFAULT_OPSET
):
    """A tiny ONNX model that computes one tensor's dither exactly as an exported model does.

    Outputs: ``hash`` (uint32 ``(m·n,)``: the hash stream ``h_i``), ``uniform`` (float64 ``(m·n,)``: ``r_i``),
    ``raw`` (float64 ``(m, n)``: ``dither_raw(r)``) and ``dither`` (float32 ``(m, n)``: ``Δ·u``, what is
    subtracted from the codewords).

    Args:
        num_vectors: ``m``.
        lattice, n, step: the quantizer.
        key: the uint64 key as a constant; ``None`` makes it a uint64 scalar graph input named ``key``, so one
            model serves many keys.

    Returns:
        ``onnx.ModelProto``.
    """
    from onnx import TensorProto, helper

    b = Body(function=False)
    p = f"{NAME_PREFIX}dither/"
    inputs = []
    if key is None:
        key_name = "key"
        inputs.append(helper.make_tensor_value_info("key", TensorProto.UINT64, []))
    else:
        key_name = b.private(p, "key", np.asarray(key, dtype=np.uint64))
    outs: dict = {}
    outs["dither"] = dither_subgraph(b, p, key_name, num_vectors, lattice, n, step, outs)
    m = num_vectors
    for name, src, dtype, shape in [
        ("hash", outs["hash"], TensorProto.UINT32, [m * n]),
        ("uniform", outs["uniform"], TensorProto.DOUBLE, [m * n]),
        ("raw", outs["raw"], TensorProto.DOUBLE, [m, n]),
        ("dither", outs["dither"], TensorProto.FLOAT, [m, n]),
    ]:
        b.op(p, "Identity", [src], output=name)
    outputs = [
        helper.make_tensor_value_info("hash", TensorProto.UINT32, [m * n]),
        helper.make_tensor_value_info("uniform", TensorProto.DOUBLE, [m * n]),
        helper.make_tensor_value_info("raw", TensorProto.DOUBLE, [m, n]),
        helper.make_tensor_value_info("dither", TensorProto.FLOAT, [m, n]),
    ]
    return _finish_model(b, inputs, outputs, opset, "udnc_dither")


def build_decode_model(dlp, *, opset: int = DEFAULT_OPSET):
    """A tiny ONNX model with no inputs whose outputs are a ``DitheredLatticeParam``'s decoded ``weight`` and its
    ``dither`` (float32 ``(m, n)``; zeros-free models without a key have no ``dither`` output).

    The subgraph is the one :func:`to_onnx` writes, so comparing these outputs with ``dlp.materialize()`` and
    ``dlp.dither()`` checks the exported model's weights bit for bit.
    """
    from onnx import TensorProto, helper

    b = Body(function=False)
    record = _record_of(dlp)
    spec = _spec_for(dlp, record, output="weight", prefix=f"{NAME_PREFIX}{_fqn(dlp)}/")
    b.private(spec.prefix, "indices", _indices(record, spec))
    spec = store_codebook(b, record, spec)
    key_name = None if spec.key is None else b.private(spec.prefix, "key", np.asarray(spec.key, dtype=np.uint64))
    outs: dict = {}
    dequantize_subgraph(b, spec, key_name, outs)
    outputs = [helper.make_tensor_value_info("weight", TensorProto.FLOAT, list(spec.shape))]
    if "dither" in outs:
        b.op(spec.prefix, "Identity", [outs["dither"]], output="dither")
        outputs.append(helper.make_tensor_value_info("dither", TensorProto.FLOAT, [spec.num_vectors, spec.n]))
    return _finish_model(b, [], outputs, opset, "udnc_decode")


# ---------------------------------------------------------------------------------------------------------------
# to_onnx
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class OnnxExport:
    """What :func:`to_onnx` wrote.

    Attributes:
        onnx_path: the ONNX file.
        sidecar_path: the sidecar (``<onnx file>.<16 hex>.udnc``, beside the ONNX file), or ``None`` when
            self-contained.
        tensors: fqns of the weights lowered to dequantize subgraphs.
        skipped: ``(fqn, reason)`` for compressed weights the exported graph does not use.
        onnx_bytes, sidecar_bytes: file sizes.
        content_sha256: the binding hash recorded in both files.
    """

    onnx_path: str
    sidecar_path: str | None
    tensors: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    onnx_bytes: int = 0
    sidecar_bytes: int = 0
    content_sha256: str = ""


def _fqn(dlp) -> str:
    return getattr(dlp, "fqn", None) or f"param_{id(dlp):x}"


def _record_of(dlp) -> CompressedWeight:
    """``dlp.record()``: the compressed weight the export lowers (its codebook as it is now, and its integer
    coordinates while they still give exactly these codewords)."""
    try:
        record = dlp.record()
    except ConfigError as exc:
        raise ExportError(f"{_fqn(dlp)}: {exc}") from exc
    if record.indices.dtype.name not in ("uint8", "int16", "int32"):
        raise ExportError(f"{_fqn(dlp)}: indices of dtype {record.indices.dtype} are not supported")
    return record


def _spec_for(dlp, record: CompressedWeight, *, output: str, prefix: str) -> TensorSpec:
    return TensorSpec.from_record(
        record, fqn=_fqn(dlp), aliases=tuple(getattr(dlp, "aliases", ())), output=output, prefix=prefix
    )


def _indices(record: CompressedWeight, spec: TensorSpec) -> np.ndarray:
    """The indices in the dtype the tensor table names (the parameter already keeps that one: no copy)."""
    return record.indices.astype(spec.index_dtype, copy=False)


def _detached_copy(model):
    """A deep copy whose parametrized modules have classes of their own.

    ``torch.nn.utils.parametrize`` gives a parametrized module a generated class that holds the parametrized
    properties; ``copy.deepcopy`` shares that class between original and copy, so removing a parametrization from
    the copy (what ``materialize`` does) would delete the property from the original too.
    """
    from torch.nn.utils import parametrize

    work = copy.deepcopy(model)
    for module in work.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return work


def _export_float(model, args, opset, input_names, output_names, dynamic_axes) -> bytes:
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; errors still raise
        try:
            torch.onnx.export(
                model,
                args,
                buffer,
                dynamo=False,
                opset_version=opset,
                do_constant_folding=False,  # keep each weight an untouched initializer (see module docstring)
                export_params=True,
                keep_initializers_as_inputs=False,
                training=torch.onnx.TrainingMode.EVAL,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
        except Exception as exc:
            # The first line names the op ("Exporting the operator 'aten::cummax' to ONNX opset version 18 is not
            # supported"); the TorchScript graph dump that follows, with each node's module scope, stays on the
            # chained exception.
            first = (str(exc).strip().splitlines() or [""])[0]
            remedy = "another opset, or replace the op"
            if any(k.__name__ == "PreTrainedModel" for k in type(model).__mro__):
                # transformers models return ModelOutput and a KV cache object the exporter cannot take
                remedy = ("a transformers model: export udnc_fx.hf_io.tensor_io(model) (tensors in, logits or "
                          "last_hidden_state out, no KV cache), as `udnc export` does")
            raise ExportError(
                f"torch.onnx.export (TorchScript exporter, opset {opset}) cannot export {type(model).__name__}: "
                f"{type(exc).__name__}: {first} (the traced graph with module scopes is in __cause__; remedies: "
                f"{remedy})"
            ) from exc
    return buffer.getvalue()


def _match_initializers(model, dlps, weights) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``{initializer name: dlp}`` for each compressed weight's initializer, found by name (checked bit for bit)
    or, where the exporter renamed it, by exact value; plus ``(fqn, reason)`` for weights the graph does not use."""
    from onnx import numpy_helper

    by_name = {}
    by_digest: dict[tuple, Any] = {}
    for dlp, w in zip(dlps, weights):
        for name in (_fqn(dlp), *getattr(dlp, "aliases", ())):
            by_name[name] = (dlp, w)
        by_digest.setdefault((w.shape, hashlib.sha256(w.tobytes()).digest()), (dlp, w))
    found: dict[str, Any] = {}
    for init in model.graph.initializer:
        if init.data_type != 1:  # FLOAT
            continue
        dims = tuple(init.dims)
        cand = by_name.get(init.name)
        if cand is not None and cand[1].shape == dims:
            arr = numpy_helper.to_array(init)
            if not np.array_equal(arr.view(np.uint32), cand[1].view(np.uint32)):
                raise ExportError(
                    f"the exporter changed weight {init.name!r} (its initializer no longer equals the decoded "
                    "weight): it cannot be replaced by a dequantize subgraph"
                )
            found[init.name] = cand[0]
            continue
        if math.prod(dims) == 0 or not any(w.shape == dims for w in weights):
            continue
        arr = numpy_helper.to_array(init)
        cand = by_digest.get((dims, hashlib.sha256(np.ascontiguousarray(arr).tobytes()).digest()))
        if cand is not None:
            found[init.name] = cand[0]
    used = {id(d) for d in found.values()}
    skipped = [(_fqn(d), "not used by the exported graph") for d in dlps if id(d) not in used]
    return found, skipped


def to_onnx(
    model,
    example_inputs,
    path,
    *,
    sidecar: bool = True,
    opset: int = DEFAULT_OPSET,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict | None = None,
    coder: str | None = None,
    decoded: bool = False,
    progress: bool | None = None,
) -> OnnxExport:
    """Export a compressed model to ONNX, each compressed weight lowered to a dequantize subgraph.

    Before: ``x → conv(weight = weight_q())`` with ``weight_q: DitheredLatticeParam``.
    After: ``model.onnx`` where ``conv1.weight`` is computed from ``udnc/conv1.weight/{indices,codebook,key}`` by
    the graph (see the module docstring), plus, with ``sidecar=True``, the sidecar ``model.onnx.<16 hex>.udnc``
    holding the indices and codebooks entropy-coded (its name ends in the start of its SHA-256, which the ONNX
    file records; ship the two files together).

    Files: ``to_onnx`` never replaces a file it did not write. ``path`` may only be new or an earlier export of
    ``to_onnx`` (whose sidecar is then removed once the new pair is in place); a model container saved as
    ``model.udnc`` is never touched. The pair is written atomically: the new sidecar under its new name first, then
    the ONNX file renamed into place, then the old sidecar removed, so an interruption at any moment leaves the old
    export or the new one, complete and loadable (files an interrupted export left behind are removed by the next
    export to the same path).

    Args:
        model: a model from :func:`udnc_fx.compress` (a GraphModule, or a module under the module-swap fallback).
            It is not changed.
        example_inputs: a tensor or a tuple of tensors to trace with.
        path: the ``.onnx`` file to write (new, or an earlier export). The sidecar goes next to it.
        sidecar: ``True``: the ONNX file holds no indices or codebooks (they are graph inputs that
            :func:`udnc_fx.export.load_onnx` fills from the sidecar). ``False``: a self-contained model (indices as
            uint8/int16/int32 initializers) that plain onnxruntime runs without this package.
        opset: ONNX opset (>= 18, for BitwiseXor).
        input_names, output_names, dynamic_axes: passed to ``torch.onnx.export``.
        coder: the sidecar's index coder (default: the container's default coder).
        decoded: write the decoded weights as plain float initializers instead of dequantize subgraphs (no sidecar;
            ``sidecar`` is ignored): a standard ONNX file as large as the float model's that any runtime opens as
            fast as the float model (onnxruntime need not fold decode subgraphs at session start, which for the
            compact self-contained file costs seconds and gigabytes on a model of ~10M weights). Outputs equal
            the compressed model's.
        progress: a bar over the weights being lowered: ``None`` (default) on a terminal only, ``False`` never.

    Returns:
        :class:`OnnxExport`.

    Raises:
        ExportError: the exporter cannot handle the model (the message names the op and module it reports), an
            unsupported opset, a weight the exporter transformed, ``path`` is a directory or a file ``to_onnx`` did
            not write, or the files cannot be written (the earlier export, if any, is then left as it was).
    """
    import onnx
    from onnx import TensorProto, helper

    from ..passes.materialize import materialize, served_params

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"opset must be an integer >= {MIN_OPSET} (BitwiseXor), got {opset!r}")
    path = os.fspath(path)
    _files.check_replaceable(path)  # fail before the slow work; checked again just before writing
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    dlps = served_params(model)
    for dlp in dlps:
        if get_lattice(dlp.lattice, dlp.n).dim * dlp.indices.numel() >= 2**31:
            raise ExportError(f"{_fqn(dlp)}: more than 2**31 elements do not fit one ONNX dequantize subgraph")
    float_model = materialize(_detached_copy(model), inplace=True).eval()
    weights = []
    for dlp in dlps:  # materialize put each decoded weight (bit for bit) where the parameter was
        try:
            weights.append(float_model.get_parameter(_fqn(dlp)).detach().cpu().numpy())
        except AttributeError:
            weights.append(dlp.materialize().cpu().numpy())
    float_bytes = _export_float(float_model, args, opset, input_names, output_names, dynamic_axes)
    if decoded:
        return _write_decoded(float_bytes, path, dlps)
    proto = onnx.load_from_string(float_bytes)
    graph = proto.graph

    found, skipped = _match_initializers(proto, dlps, weights)
    b = Body(function=False)
    specs: list[TensorSpec] = []
    records: dict[str, CompressedWeight] = {}
    lowered: dict[int, TensorSpec] = {}
    extra_inputs = []
    for init_name, dlp in progress_bar(found.items(), total=len(found), desc="lowering weights", unit="weight",
                                       progress=progress):
        if id(dlp) in lowered:  # a tied weight the exporter kept twice: alias the first subgraph
            # (outside the tensor's prefix: with decode="numpy" the alias then reads the decoded initializer)
            b.op(f"{NAME_PREFIX[:-1]}-alias/", "Identity", [lowered[id(dlp)].output], output=init_name)
            continue
        record = _record_of(dlp)
        spec = _spec_for(dlp, record, output=init_name, prefix=f"{NAME_PREFIX}{_fqn(dlp)}/")
        indices = _indices(record, spec)
        if sidecar:
            extra_inputs.append(
                helper.make_tensor_value_info(
                    spec.indices, helper.np_dtype_to_tensor_dtype(indices.dtype), [spec.num_vectors]
                )
            )
            extra_inputs.append(
                helper.make_tensor_value_info(spec.codebook, TensorProto.FLOAT, [spec.num_codewords, spec.n])
            )
        else:
            b.private(spec.prefix, "indices", indices)
            spec = store_codebook(b, record, spec)
        key_name = None if spec.key is None else b.private(spec.prefix, "key", np.asarray(spec.key, np.uint64))
        dequantize_subgraph(b, spec, key_name)
        specs.append(spec)
        records[spec.fqn] = record
        lowered[id(dlp)] = spec

    kept = [init for init in graph.initializer if init.name not in found]
    del graph.initializer[:]
    graph.initializer.extend(kept + list(b.initializers.values()))
    graph.input.extend(extra_inputs)
    # Subgraph nodes go first: every one of them depends on initializers and graph inputs only.
    nodes = list(b.nodes) + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain in ("", "ai.onnx") for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("", opset))
    if b.functions_used:
        proto.opset_import.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
        proto.functions.extend(functions_for(b.functions_used, opset))

    table = _rt.tensors_json(specs)
    content = _rt.content_sha256(proto, table)
    props = {_rt.KEY_FORMAT: ONNX_FORMAT_ID, _rt.KEY_TENSORS: table, _rt.KEY_CONTENT: content}

    pair_sidecar = None
    sidecar_bytes = 0
    if sidecar and specs:
        data = _sidecar_bytes(records, specs, content, os.path.basename(path), coder)
        digest = hashlib.sha256(data).hexdigest()
        pair_sidecar = (_files.sidecar_name(path, digest), data)
        props[_rt.KEY_SIDECAR] = pair_sidecar[0]
        props[_rt.KEY_SIDECAR_SHA] = digest
        sidecar_bytes = len(data)
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # a bug here, not the user's: say so with the checker's words
        raise ExportError(f"the lowered ONNX model fails onnx.checker: {exc}") from exc
    try:
        data_onnx = proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GiB limit
        raise ExportError(
            f"the lowered model does not fit one ONNX protobuf ({exc}); export with sidecar=True, which keeps the "
            "indices out of the file"
        ) from exc
    old_sidecar = _files.check_replaceable(path)
    sidecar_path = _files.write_pair(path, data_onnx, pair_sidecar, old_sidecar)
    if sidecar_path is not None and not os.path.isabs(path):  # report it the way the caller named the ONNX file
        sidecar_path = os.path.join(os.path.dirname(path), os.path.basename(sidecar_path))
    return OnnxExport(
        onnx_path=path,
        sidecar_path=sidecar_path,
        tensors=[s.fqn for s in specs],
        skipped=skipped,
        onnx_bytes=len(data_onnx),
        sidecar_bytes=sidecar_bytes,
        content_sha256=content,
    )


def _write_decoded(float_bytes: bytes, path: str, dlps) -> OnnxExport:
    """The ``decoded=True`` export: the float graph with the decoded weights, tagged as such (not a udnc-fx
    compressed ONNX: :func:`load_onnx` is not needed and plain onnxruntime opens it)."""
    import onnx

    proto = onnx.load_from_string(float_bytes)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "udnc.decoded_from", "udnc-fx compressed weights, decoded to float32 at export"
    data = proto.SerializeToString()
    old_sidecar = _files.check_replaceable(path)  # atomic, and never over a file to_onnx did not write
    _files.write_pair(path, data, None, old_sidecar)
    return OnnxExport(onnx_path=path, sidecar_path=None, tensors=[_fqn(d) for d in dlps], skipped=[],
                      onnx_bytes=len(data), sidecar_bytes=0, content_sha256="")


def _sidecar_bytes(
    records: dict[str, CompressedWeight], specs: list[TensorSpec], content: str, onnx_name: str, coder: str | None
) -> bytes:
    from ..coding import container as _c
    from ..coding.entries import entry_from_record

    # Integer lattice coordinates only while they still give these exact codewords (the record keeps them then).
    quantized = [entry_from_record(records[spec.fqn], fqn=spec.fqn, coder=coder) for spec in specs]
    meta = {_rt.SIDECAR_META_KEY: {"format": ONNX_FORMAT_ID, "content_sha256": content, "onnx_file": onnx_name}}
    try:
        return _c.encode_container(_c.Container(quantized=quantized, metadata=meta))
    except FormatError as exc:
        raise ExportError(f"cannot write the sidecar: {exc}") from exc

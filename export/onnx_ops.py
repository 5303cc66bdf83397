"""The ONNX op builders of the export: a graph builder and the subgraphs that decode a weight in the graph.

:class:`Body` collects the nodes of the main graph or of one function body. The functions (domain ``udnc``) are the
integer hash of :mod:`udnc_fx.dither` (``Hash32``, ``Uniform24``) and the Voronoi dither of each lattice
(``DitherRaw_<lattice>``, Conway & Sloane's nearest-point decoders with :mod:`udnc_fx.lattice`'s tie-breaking), op
for op; :func:`dither_subgraph`, :func:`store_codebook` and :func:`dequantize_subgraph` build one weight's
``indices, codebook, key ↦ weight`` subgraph from its :class:`~udnc_fx.export.runtime.TensorSpec`.
:mod:`udnc_fx.export.onnx` assembles them into models (``to_onnx``, ``build_dither_model``, ``build_decode_model``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..dither import FMIX_MULTIPLIERS, KEY_WHITENERS
from ..errors import ExportError
from ..lattice import SQRT3, SQRT3_2, get_lattice
from ..record import CompressedWeight, lattice_factor
from .runtime import FUNCTION_DOMAIN, SHARED_PREFIX, TensorSpec

__all__ = [
    "Body",
    "function_proto",
    "functions_for",
    "dither_subgraph",
    "exact_codebook_int",
    "store_codebook",
    "dequantize_subgraph",
]

# The generator's constants come from its definition (udnc_fx/dither.py): this is its ONNX twin.
_C1, _C2 = FMIX_MULTIPLIERS
_KA, _KB = KEY_WHITENERS


# ---------------------------------------------------------------------------------------------------------------
# The subgraph builder
# ---------------------------------------------------------------------------------------------------------------

# FUNCTION_DOMAIN ("udnc"): the model-local functions (``Hash32``, ``Uniform24``, ``DitherRaw_<lattice>``);
# onnxruntime inlines them when it loads the model, then folds the result like any constant subgraph.


class Body:
    """Nodes of the main graph or of one function body.

    Constants become shared initializers (``udnc/const/...``) in the main graph and ``Constant`` nodes inside a
    function (a function cannot see the graph's initializers).
    """

    def __init__(self, *, function: bool):
        self.function = function
        self.nodes: list = []
        self.initializers: dict[str, Any] = {}
        self.functions_used: set[str] = set()
        self._consts: dict[str, str] = {}
        self._count = 0

    def const(self, name: str, value, dtype) -> str:
        from onnx import helper, numpy_helper

        if self.function:
            if name not in self._consts:
                out = f"c_{name}"
                tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), out)
                self.nodes.append(helper.make_node("Constant", [], [out], value=tensor))
                self._consts[name] = out
            return self._consts[name]
        full = SHARED_PREFIX + name
        if full not in self.initializers:
            self.initializers[full] = numpy_helper.from_array(np.asarray(value, dtype=dtype), full)
        return full

    def private(self, prefix: str, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        full = prefix + name
        self.initializers[full] = numpy_helper.from_array(np.asarray(array), full)
        return full

    def op(self, prefix: str, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        from onnx import helper

        self._count += 1
        name = f"{prefix}{op_type}_{self._count}"
        out = output or (f"t{self._count}" if self.function else name)
        domain = ""
        if op_type in _FUNCTIONS or op_type.startswith("DitherRaw_"):
            domain = FUNCTION_DOMAIN
            self.functions_used.add(op_type)
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=None if self.function else name, domain=domain, **attrs)
        )
        return out

    def u32(self, value: int) -> str:
        return self.const(f"u32_{value:08x}", value, np.uint32)

    def f64(self, value: float, label: str) -> str:
        return self.const(f"f64_{label}", value, np.float64)

    def i64(self, value, label: str) -> str:
        return self.const(f"i64_{label}", value, np.int64)


def _fmix32(b: Body, h: str) -> str:
    """MurmurHash3's finaliser on uint32 (Mul wraps modulo 2**32; BitShift is unsigned)."""
    s16, s13 = b.u32(16), b.u32(13)
    h = b.op("", "BitwiseXor", [h, b.op("", "BitShift", [h, s16], direction="RIGHT")])
    h = b.op("", "Mul", [h, b.u32(_C1)])
    h = b.op("", "BitwiseXor", [h, b.op("", "BitShift", [h, s13], direction="RIGHT")])
    h = b.op("", "Mul", [h, b.u32(_C2)])
    return b.op("", "BitwiseXor", [h, b.op("", "BitShift", [h, s16], direction="RIGHT")])


def _body_hash32(b: Body) -> None:
    """``Hash32(key: uint64 scalar, count: int64 scalar) -> h: uint32 [count]``: ``dither.hash_stream_np``."""
    from onnx import TensorProto

    k0 = b.op("", "Cast", [b.op("", "BitwiseAnd", ["key", b.const("u64_ffffffff", 0xFFFFFFFF, np.uint64)])],
              to=TensorProto.UINT32)
    k1 = b.op("", "Cast", [b.op("", "BitShift", ["key", b.const("u64_32", 32, np.uint64)], direction="RIGHT")],
              to=TensorProto.UINT32)
    a = _fmix32(b, b.op("", "BitwiseXor", [k0, b.u32(_KA)]))
    bw = _fmix32(b, b.op("", "BitwiseXor", [b.op("", "BitwiseXor", [k1, b.u32(_KB)]), a]))
    # Range exists only for signed types: an int64 counter cast to uint32 (values < 2**32, so the cast is exact).
    i = b.op("", "Cast", [b.op("", "Range", [b.i64(0, "0"), "count", b.i64(1, "1")])], to=TensorProto.UINT32)
    h = _fmix32(b, b.op("", "BitwiseXor", [i, a]))
    b.op("", "Identity", [_fmix32(b, b.op("", "BitwiseXor", [h, bw]))], output="h")


def _body_uniform24(b: Body) -> None:
    """``Uniform24(h: uint32) -> r: float64``, ``r = (h >> 8)·2^-24`` (exact)."""
    from onnx import TensorProto

    top = b.op("", "BitShift", ["h", b.u32(8)], direction="RIGHT")
    b.op("", "Mul", [b.op("", "Cast", [top], to=TensorProto.DOUBLE), b.f64(2.0**-24, "2^-24")], output="r")


def _nearest_dn(b: Body, x: str, n: int) -> str:
    """Conway & Sloane's D_n decoder on float64 rows, with lattice.py's tie-breaking (first ArgMax, >= 0 → +1)."""
    axes = b.i64([1], "axes1")
    f = b.op("", "Round", [x])
    s = b.op("", "ReduceSum", [f, axes], keepdims=1)
    zero, one, two = b.f64(0.0, "0"), b.f64(1.0, "1"), b.f64(2.0, "2")
    odd = b.op("", "Not", [b.op("", "Equal", [b.op("", "Mod", [s, two], fmod=1), zero])])
    err = b.op("", "Sub", [x, f])
    k = b.op("", "ArgMax", [b.op("", "Abs", [err])], axis=1, keepdims=1, select_last_index=0)
    err_k = b.op("", "GatherElements", [err, k], axis=1)
    adjust = b.op("", "Where", [b.op("", "GreaterOrEqual", [err_k, zero]), one, b.f64(-1.0, "-1")])
    onehot = b.op("", "Equal", [k, b.i64(np.arange(n).reshape(1, n), f"arange{n}")])
    move = b.op("", "Where", [b.op("", "And", [onehot, odd]), adjust, zero])
    return b.op("", "Add", [f, move])


def _pick_closer(b: Body, x: str, y0: str, y1: str) -> str:
    """``y1`` where ``Σ (y1-y0)(2x-y0-y1) > 0`` (strictly closer), else ``y0``: lattice.py's ``_pick_closer``."""
    two, zero = b.f64(2.0, "2"), b.f64(0.0, "0")
    t = b.op("", "Sub", [b.op("", "Sub", [b.op("", "Mul", [two, x]), y0]), y1])
    gap = b.op("", "ReduceSum", [b.op("", "Mul", [b.op("", "Sub", [y1, y0]), t]), b.i64([1], "axes1")], keepdims=1)
    return b.op("", "Where", [b.op("", "Greater", [gap, zero]), y1, y0])


def _nearest(b: Body, x: str, name: str, n: int) -> str:
    """Nearest raw lattice point of each row of ``x`` (float64, ``(m, n)``): lattice.py's kernels op for op."""
    if name == "Z":
        return b.op("", "Round", [x])
    if name == "D4":
        return _nearest_dn(b, x, n)
    half = b.f64(0.5, "0.5")
    if name == "E8":
        y0 = _nearest_dn(b, x, n)
        y1 = b.op("", "Add", [_nearest_dn(b, b.op("", "Sub", [x, half]), n), half])
        return _pick_closer(b, x, y0, y1)
    if name == "A2":
        axes = b.i64([1], "axes1")
        x0 = b.op("", "Slice", [x, b.i64([0], "s0"), b.i64([1], "s1"), axes])
        x1 = b.op("", "Slice", [x, b.i64([1], "s1"), b.i64([2], "s2"), axes])
        sq3, sq3_2 = b.f64(SQRT3, "sqrt3"), b.f64(SQRT3_2, "sqrt3_2")
        two, one = b.f64(2.0, "2"), b.f64(1.0, "1")
        j0 = b.op("", "Round", [b.op("", "Div", [x1, sq3])])
        j1 = b.op("", "Round", [b.op("", "Div", [b.op("", "Sub", [x1, sq3_2]), sq3])])
        y0 = b.op("", "Concat", [b.op("", "Round", [x0]), b.op("", "Mul", [b.op("", "Mul", [two, j0]), sq3_2])], axis=1)
        y1a = b.op("", "Add", [b.op("", "Round", [b.op("", "Sub", [x0, half])]), half])
        y1b = b.op("", "Mul", [b.op("", "Add", [b.op("", "Mul", [two, j1]), one]), sq3_2])
        y1 = b.op("", "Concat", [y1a, y1b], axis=1)
        return b.op("", "Add", [_pick_closer(b, x, y0, y1), b.f64(0.0, "0")])
    raise ExportError(f"no ONNX nearest-point decoder for lattice {name!r}")


def _body_dither_raw(b: Body, lattice: str, n: int) -> None:
    """``DitherRaw_<label>(r: float64 [m·n]) -> u: float64 [m, n]``: :meth:`Lattice.dither_raw`."""
    lat = get_lattice(lattice, n)
    r = b.op("", "Reshape", ["r", b.i64([-1, n], f"rows{n}")])
    box = np.asarray(lat.box_raw, dtype=np.float64)
    x = r if np.all(box == 1.0) else b.op("", "Mul", [r, b.const(f"box_{lat.label}", box.reshape(1, n), np.float64)])
    b.op("", "Sub", [x, _nearest(b, x, lat.name, n)], output="u")


_FUNCTIONS = {"Hash32": (["key", "count"], ["h"]), "Uniform24": (["h"], ["r"])}


def function_proto(name: str, opset: int):
    from onnx import helper

    body = Body(function=True)
    if name == "Hash32":
        _body_hash32(body)
        inputs, outputs = _FUNCTIONS[name]
        doc = "uint32 hash stream h_i, i = 0..count-1, of the uint64 key (udnc-hash32-v1, udnc_fx/dither.py)"
    elif name == "Uniform24":
        _body_uniform24(body)
        inputs, outputs = _FUNCTIONS[name]
        doc = "r = (h >> 8) * 2^-24 in float64"
    else:
        label = name[len("DitherRaw_") :]
        lattice, n = (("Z", int(label[1:])) if label.startswith("Z") else (label, None))
        _body_dither_raw(body, lattice, get_lattice(lattice, n).dim)
        inputs, outputs = ["r"], ["u"]
        doc = f"Voronoi dither u = x - Q(x), x = r * box, on lattice {label} in raw coordinates (float64)"
    return helper.make_function(
        FUNCTION_DOMAIN, name, inputs, outputs, body.nodes, [helper.make_opsetid("", opset)], doc_string=doc
    )


def functions_for(used: set[str], opset: int) -> list:
    return [function_proto(name, opset) for name in sorted(used)]


def dither_subgraph(b: Body, p: str, key: str, num_vectors: int, lattice: str, n: int, step: float, outputs: dict) -> str:
    """float32 ``(m, n)`` dither ``Δ·u`` as :func:`udnc_fx.param.compute_dither`; intermediate names go to
    ``outputs`` (``hash``, ``uniform``, ``raw``) for the test models."""
    from onnx import TensorProto

    lat = get_lattice(lattice, n)
    count = b.private(p, "count", np.asarray(num_vectors * n, dtype=np.int64))
    h = b.op(p, "Hash32", [key, count])
    r = b.op(p, "Uniform24", [h])
    u = b.op(p, f"DitherRaw_{lat.label}", [r])
    outputs.update(hash=h, uniform=r, raw=u)
    factor = b.private(p, "factor", np.asarray(lattice_factor(lat, step), dtype=np.float64))
    return b.op(p, "Cast", [b.op(p, "Mul", [u, factor])], to=TensorProto.FLOAT)


def _codebook_from_int(b: Body, spec: TensorSpec) -> None:
    """``codebook = float32(from_int(codebook_int) · (scale·Δ))``: :func:`udnc_fx.record.codebook_from_int`
    (and the quantizer) op for op; every step but the last product is exact. With ``spec.affine = (a, b)`` a float32
    ``Mul`` by ``a`` and a float32 ``Add`` of ``b`` follow, in that order (the record's rule)."""
    from onnx import TensorProto

    p = spec.prefix
    c = b.op(p, "Cast", [spec.codebook_int], to=TensorProto.DOUBLE)
    if spec.lattice == "E8":
        c = b.op(p, "Mul", [c, b.f64(0.5, "0.5")])
    elif spec.lattice == "A2":  # (a + b/2, b·fl(√3/2)) + 0.0
        axes = b.i64([1], "axes1")
        a0 = b.op(p, "Slice", [c, b.i64([0], "s0"), b.i64([1], "s1"), axes])
        b1 = b.op(p, "Slice", [c, b.i64([1], "s1"), b.i64([2], "s2"), axes])
        x0 = b.op(p, "Add", [a0, b.op(p, "Mul", [b.f64(0.5, "0.5"), b1])])
        x1 = b.op(p, "Mul", [b1, b.f64(SQRT3_2, "sqrt3_2")])
        c = b.op(p, "Add", [b.op(p, "Concat", [x0, x1], axis=1), b.f64(0.0, "0")])
    factor = b.private(p, "factor", np.asarray(spec.factor, dtype=np.float64))
    if spec.affine is None:
        b.op(p, "Cast", [b.op(p, "Mul", [c, factor])], to=TensorProto.FLOAT, output=spec.codebook)
        return
    points = b.op(p, "Cast", [b.op(p, "Mul", [c, factor])], to=TensorProto.FLOAT)
    a = b.private(p, "affine_a", np.asarray(spec.affine[0], dtype=np.float32))
    off = b.private(p, "affine_b", np.asarray(spec.affine[1], dtype=np.float32))
    b.op(p, "Add", [b.op(p, "Mul", [points, a]), off], output=spec.codebook)


def exact_codebook_int(record: CompressedWeight) -> np.ndarray | None:
    """The codewords' integer lattice coordinates in the narrowest signed dtype while the record still has them
    (its codebook is exactly those lattice points: :func:`udnc_fx.record.on_lattice`); else ``None``."""
    ci = record.codebook_int
    if ci is None:
        return None
    lo, hi = (int(ci.min()), int(ci.max())) if ci.size else (0, 0)
    dtype = next(t for t in (np.int8, np.int16, np.int32, np.int64) if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)
    return ci.astype(dtype)


def store_codebook(b: Body, record: CompressedWeight, spec: TensorSpec) -> TensorSpec:
    """Self-contained storage of a codebook: integer coordinates rebuilt by the graph when exact, else float32."""
    ci = exact_codebook_int(record)
    if ci is None or ci.dtype == np.int64:
        b.private(spec.prefix, "codebook", record.codebook)
        return dataclasses.replace(spec, affine=None)  # the float codebook already holds the correction
    spec = dataclasses.replace(spec, codebook_int=b.private(spec.prefix, "codebook_int", ci))
    _codebook_from_int(b, spec)
    return spec


def dequantize_subgraph(b: Body, spec: TensorSpec, key_name: str | None, outputs: dict | None = None) -> None:
    """The subgraph ``indices, codebook, key ↦ weight`` whose output is named ``spec.output``."""
    from onnx import TensorProto

    p = spec.prefix
    outputs = {} if outputs is None else outputs
    idx = b.op(p, "Cast", [spec.indices], to=TensorProto.INT64)
    vectors = b.op(p, "Gather", [spec.codebook, idx], axis=0)
    if key_name is not None:
        d = dither_subgraph(b, p, key_name, spec.num_vectors, spec.lattice, spec.n, spec.step, outputs)
        outputs["dither"] = d
        vectors = b.op(p, "Sub", [vectors, d])
    if spec.zero_index is not None:
        z = b.private(p, "zero_index", np.asarray([spec.zero_index], dtype=np.int64))
        mask = b.op(p, "Unsqueeze", [b.op(p, "Equal", [idx, z]), b.i64([1], "axes1")])
        vectors = b.op(p, "Where", [mask, b.const("f32_0", 0.0, np.float32), vectors])
    flat = b.op(p, "Reshape", [vectors, b.i64([-1], "flat")])
    if spec.num_vectors * spec.n != spec.numel:
        flat = b.op(p, "Slice", [flat, b.i64([0], "s0"), b.private(p, "numel", np.asarray([spec.numel], np.int64))])
    b.op(p, "Reshape", [flat, b.private(p, "shape", np.asarray(spec.shape, dtype=np.int64))], output=spec.output)

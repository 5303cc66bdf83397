"""The dither onnxruntime computes is bit-exact with udnc_fx/dither.py, the lattices and DitheredLatticeParam.

The tiny models come from ``build_dither_model`` / ``build_decode_model``, which use the same functions and
subgraph as ``to_onnx``: equality here is equality of the exported models' weights.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from udnc_fx import dither
from udnc_fx.export import build_decode_model, build_dither_model, decode_weight_np
from udnc_fx.export.runtime import TensorSpec
from udnc_fx.lattice import get_lattice
from udnc_fx.param import DitheredLatticeParam, compute_dither
from udnc_fx.quantizer import quantize_array

KEYS = [0, 1, 2, 0x9E3779B9, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 0x0123456789ABCDEF, dither.tensor_key(7, "fc.weight")]
ALL_LATTICES = [("Z", n) for n in range(1, 9)] + [("A2", 2), ("D4", 4), ("E8", 8)]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def test_hash_stream_matches_numpy_and_torch_up_to_a_million():
    count = 1_000_003
    session = _session(build_dither_model(count, "Z", 1))
    for key in KEYS:
        h, r, _, _ = session.run(None, {"key": np.array(key, dtype=np.uint64)})
        expected = dither.hash_stream_np(key, count)
        assert h.dtype == np.uint32 and h.shape == (count,)
        np.testing.assert_array_equal(h, expected, err_msg=f"key {key:#x}")
        np.testing.assert_array_equal(_bits(r), _bits(dither.uniform_np(key, count)))
    # and with PyTorch's twin, for two keys (it is slower)
    for key in KEYS[:2]:
        h, r, _, _ = session.run(None, {"key": np.array(key, dtype=np.uint64)})
        np.testing.assert_array_equal(_bits(r), _bits(dither.uniform_torch(key, count).numpy()))


def test_known_answer_vector():
    """udnc-hash32-v1, key 0, i = 0..3: computed from the definition in dither.py's docstring, not from the code."""
    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    for key in (0, 0x0123456789ABCDEF):
        a = fmix((key & 0xFFFFFFFF) ^ 0x9E3779B9)
        b = fmix((key >> 32) ^ 0x7F4A7C15 ^ a)
        expected = [fmix(fmix(i ^ a) ^ b) for i in range(4)]
        h = _session(build_dither_model(4, "Z", 1, key=key)).run(["hash"], {})[0]
        assert h.tolist() == expected


@pytest.mark.parametrize("lattice,n", ALL_LATTICES, ids=[f"{l}{n}" if l == "Z" else l for l, n in ALL_LATTICES])
def test_dither_matches_lattice_and_compute_dither(lattice, n):
    num_vectors = 120_000 // n
    step = 0.0123
    session = _session(build_dither_model(num_vectors, lattice, n, step))
    lat = get_lattice(lattice, n)
    for key in KEYS[:4]:
        h, r, raw, d = session.run(None, {"key": np.array(key, dtype=np.uint64)})
        expected_raw = lat.dither_raw(dither.uniform_np(key, num_vectors * n).reshape(num_vectors, n))
        np.testing.assert_array_equal(_bits(raw), _bits(expected_raw))
        expected = compute_dither(key, num_vectors, lattice, n, step)
        assert d.dtype == np.float32 and d.shape == (num_vectors, n)
        np.testing.assert_array_equal(_bits(d), _bits(expected))


def _param(lattice, n, shape, *, key=1234, zero=False, seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    q = quantize_array(w, lattice=lattice, n=n, step=0.3, key=key)
    dlp = DitheredLatticeParam(
        torch.from_numpy(q.indices), torch.from_numpy(q.codebook), shape=shape, lattice=lattice, n=n, step=0.3,
        key=key, zero_index=0 if zero else None,
    )
    dlp.fqn = "layer.weight"
    dlp.codebook_int = q.codebook_int  # as the quantize pass records it: exported as integer coordinates
    return dlp


@pytest.mark.parametrize(
    "lattice,n,shape,zero,key",
    [
        ("Z", 1, (64, 33), False, 99),
        ("Z", 5, (7, 3, 3, 3), True, 2**64 - 1),  # 189 elements: padded to 190
        ("D4", 4, (50, 30), False, 5),
        ("D4", 4, (13, 7), True, 6),  # padded
        ("E8", 8, (64, 64), False, 0),
        ("E8", 8, (10, 3, 3, 3), True, 3),  # padded
        ("A2", 2, (31, 5), False, 11),
        ("E8", 8, (16, 16), False, None),  # no dither
    ],
)
def test_decoded_weight_matches_param(lattice, n, shape, zero, key):
    dlp = _param(lattice, n, shape, key=key, zero=zero)
    session = _session(build_decode_model(dlp))
    outputs = {o.name: v for o, v in zip(session.get_outputs(), session.run(None, {}))}
    expected = dlp.materialize().numpy()
    np.testing.assert_array_equal(_bits(outputs["weight"]), _bits(expected))
    if key is None:
        assert "dither" not in outputs
    else:
        np.testing.assert_array_equal(_bits(outputs["dither"]), _bits(dlp.dither().numpy()))
    if zero:
        assert (expected[np.unravel_index(0, shape)] == 0) or (dlp.indices[0] != 0)
        assert not np.signbit(expected[expected == 0]).any()  # exact +0.0, as torch.where with zeros gives
    spec = TensorSpec(
        fqn=dlp.fqn, aliases=(), output="w", shape=shape, lattice=lattice, n=n, step=0.3, key=key,
        num_vectors=dlp.indices.numel(), num_codewords=dlp.num_codewords, index_dtype="uint8",
        zero_index=dlp.zero_index, indices="i", codebook="c", prefix="udnc/x/",
    )
    w_np = decode_weight_np(spec, dlp.indices.numpy(), dlp.codebook.detach().numpy())
    np.testing.assert_array_equal(_bits(w_np), _bits(expected))


def test_functions_are_shared_and_model_is_small():
    """The hash and the lattice arithmetic live in model-local functions: the graph holds a handful of nodes per
    weight, and no constant with more than n entries."""
    model = build_decode_model(_param("E8", 8, (64, 64)))
    assert {f.name for f in model.functions} == {"Hash32", "Uniform24", "DitherRaw_E8"}
    assert len(model.graph.node) <= 16  # incl. rebuilding the codebook from integer coordinates
    sizes = {i.name: onnx.numpy_helper.to_array(i).size for i in model.graph.initializer}
    assert sizes["udnc/layer.weight/indices"] == 512
    assert all(v <= 8 for k, v in sizes.items() if not k.endswith(("/indices", "/codebook", "/codebook_int")))


@pytest.mark.parametrize("lattice,n", ALL_LATTICES, ids=[f"{l}{n}" if l == "Z" else l for l, n in ALL_LATTICES])
def test_the_three_dither_implementations_agree_through_the_record(lattice, n):
    """The record's NumPy dither (the definition), the torch hash twin (``uniform_torch`` with the same lattice and
    scaling rules) and the ONNX graph's twin give the same float32 bits, and the graph decodes the record's weight."""
    from udnc_fx.record import scaled_dither

    w = np.random.default_rng(3).standard_normal((37, 11)).astype(np.float32)
    key = dither.tensor_key(9, "block.weight")
    rec = quantize_array(w, lattice=lattice, n=n, step=0.07, key=key, exact_zero=True)
    m, lat = rec.num_vectors, get_lattice(lattice, n)
    via_torch = scaled_dither(lat.dither_raw(dither.uniform_torch(key, m * n).numpy().reshape(m, n)), rec.factor)
    (via_onnx,) = _session(build_dither_model(m, lattice, n, 0.07, key=key)).run(["dither"], {})
    np.testing.assert_array_equal(_bits(via_torch), _bits(rec.dither()))
    np.testing.assert_array_equal(_bits(via_onnx), _bits(rec.dither()))
    dlp = DitheredLatticeParam.from_record(rec, fqn="block.weight")
    (weight,) = _session(build_decode_model(dlp)).run(["weight"], {})
    np.testing.assert_array_equal(_bits(weight), _bits(rec.decode()))

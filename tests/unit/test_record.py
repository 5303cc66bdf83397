"""Tests of the compressed-weight record (``udnc_fx.record``): its decode against the formulas every decoder used
before the record existed, the one "no dither" (``key=None``), exact zeros, the on-lattice rule (bit-exact), the
per-tensor key, the mapping to and from the container's entry, and a round trip record → DitheredLatticeParam →
record."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udnc_fx import ConfigError, DitheredLatticeParam, FormatError
from udnc_fx import record as R
from udnc_fx.coding.container import Container, QuantizedTensor, decode_container, encode_container
from udnc_fx.coding.entries import entry_from_record, record_from_entry
from udnc_fx.dither import DITHER_ID, tensor_key, uniform_np, uniform_torch
from udnc_fx.export.spec import TensorSpec
from udnc_fx.lattice import get_lattice
from udnc_fx.param import compute_dither
from udnc_fx.quantizer import quantize_array

LATTICES = [("Z", 1), ("Z", 3), ("A2", 2), ("D4", 4), ("E8", 8)]
LAT_IDS = [f"{name}{n}" for name, n in LATTICES]
SETTINGS = settings(deadline=None, derandomize=True, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def reference_decode(indices, codebook, shape, lattice, n, step, key, zero_index=None) -> np.ndarray:
    """The decode as written out before the record, independently of it: ``r`` from the hash stream,
    ``u = float32(dither_raw(r) · (scale·Δ))``, ``C[k] − u``, vectors at the zero index → 0, cut and reshaped."""
    lat = get_lattice(lattice, n)
    m = len(indices)
    vectors = np.asarray(codebook, dtype=np.float32)[np.asarray(indices, dtype=np.int64)]
    if key is not None:
        r = uniform_np(key, m * lat.dim).reshape(m, lat.dim)
        vectors = vectors - (lat.dither_raw(r) * (float(lat.scale) * float(step))).astype(np.float32)
    if zero_index is not None:
        vectors[np.asarray(indices) == zero_index] = 0.0
    return vectors.reshape(-1)[: math.prod(shape)].reshape(shape)


def weights(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lattice, n", LATTICES, ids=LAT_IDS)
@pytest.mark.parametrize("key", [None, 0, tensor_key(3, "conv.weight")])
def test_decode_equals_the_formula_every_decoder_used(lattice, n, key):
    w = weights((7, 5, 3))  # 105 elements: padded for every n > 1 but 3 and 5
    rec = quantize_array(w, lattice=lattice, n=n, step=0.2, key=key, exact_zero=True)
    expected = reference_decode(rec.indices, rec.codebook, w.shape, lattice, n, 0.2, key, rec.zero_index)
    got = rec.decode()
    assert got.dtype == np.float32 and got.shape == w.shape
    np.testing.assert_array_equal(bits(got), bits(expected))
    # the quantizer's error bound holds for what it decodes (a wrong dither would break it)
    lat = get_lattice(lattice, n)
    assert np.abs(got - w).max() <= 0.2 * lat.scale * 2.0


@pytest.mark.parametrize("lattice, n", LATTICES, ids=LAT_IDS)
def test_chunked_decode_on_threads_and_a_cached_dither_give_the_same_bits(lattice, n, monkeypatch):
    w = weights((53, 31), seed=1)
    rec = quantize_array(w, lattice=lattice, n=n, step=0.1, key=tensor_key(0, "fc.weight"))
    whole = rec.decode()
    monkeypatch.setattr(R, "DECODE_CHUNK_ELEMENTS", 64)  # many chunks, the last one short
    with ThreadPoolExecutor(3) as pool:
        chunked = rec.decode(executor=pool)
    cached = rec.decode(raw_dither=rec.raw_dither())
    np.testing.assert_array_equal(bits(chunked), bits(whole))
    np.testing.assert_array_equal(bits(cached), bits(whole))
    # a row range of the dither is that slice of the whole dither (the hash is counter-based)
    np.testing.assert_array_equal(bits(rec.dither(5, 17)), bits(rec.dither()[5:17]))


def test_decode_uses_the_cached_dither_it_is_given():
    rec = quantize_array(weights((40,)), lattice="Z", n=1, step=0.5, key=9)
    zero = np.zeros((40, 1))
    np.testing.assert_array_equal(bits(rec.decode(raw_dither=zero)), bits(rec.codebook[rec.indices].reshape(-1)))


def test_an_empty_weight_decodes_to_an_empty_array():
    rec = R.CompressedWeight(indices=np.zeros(0, np.uint8), codebook=np.zeros((1, 4), np.float32), shape=(0, 4),
                             lattice="D4", n=4, step=1.0, key=5)
    assert rec.decode().shape == (0, 4) and rec.num_vectors == 0


# ----------------------------------------------------------------------------------------------------------------
# No dither, exact zeros
# ----------------------------------------------------------------------------------------------------------------


def test_no_dither_is_key_none_and_decodes_to_the_codewords():
    w = weights((10, 6), seed=2)
    rec = quantize_array(w, lattice="E8", n=8, step=0.3, key=None)
    assert rec.key is None and not rec.dithered
    assert not rec.dither().any() and rec.dither().dtype == np.float32
    flat = rec.codebook[rec.indices].reshape(-1)[: w.size].reshape(w.shape)
    np.testing.assert_array_equal(bits(rec.decode()), bits(flat))
    # the file spells it generator "none" with key 0; only the entry mapping knows that
    q = entry_from_record(rec, fqn="w")
    assert (q.dither, q.key) == ("none", 0)
    assert record_from_entry(q).key is None
    # key 0 is a key like any other, not "no dither"
    rec0 = quantize_array(w, lattice="E8", n=8, step=0.3, key=0)
    assert rec0.dithered and rec0.dither().any()
    q0 = entry_from_record(rec0, fqn="w")
    assert (q0.dither, q0.key) == (DITHER_ID, 0) and record_from_entry(q0).key == 0


def test_an_unknown_dither_generator_is_refused():
    q = entry_from_record(quantize_array(weights((8,)), lattice="Z", n=1, step=0.5, key=1), fqn="w")
    q.dither = "udnc-hash64-v9"
    with pytest.raises(FormatError) as info:
        record_from_entry(q)
    assert info.value.kind == "unknown_codec" and "udnc-hash64-v9" in info.value.message


@pytest.mark.parametrize("lattice, n", LATTICES, ids=LAT_IDS)
def test_the_zero_index_decodes_to_exact_positive_zeros_whatever_the_dither(lattice, n):
    w = weights((64, 24), seed=3)  # rows of 24: whole vectors for every n here
    w[::2] = 0.0  # pruned rows
    rec = quantize_array(w, lattice=lattice, n=n, step=0.25, key=tensor_key(1, "w"), exact_zero=True)
    assert rec.zero_index is not None and not rec.codebook_int[rec.zero_index].any()
    out = rec.decode().reshape(-1)
    flat_idx = np.repeat(rec.indices, rec.n)[: w.size]
    zeroed = flat_idx == rec.zero_index
    assert zeroed.sum() >= w.size // 2 and not bits(out[zeroed]).any()  # +0.0, not -0.0
    assert np.abs(out[~zeroed]).min() > 0 or not (~zeroed).any()


# ----------------------------------------------------------------------------------------------------------------
# The on-lattice rule (bit-exact)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lattice, n", LATTICES, ids=LAT_IDS)
def test_on_lattice_is_bit_exact_equality_with_the_rebuilt_codebook(lattice, n):
    rec = quantize_array(weights((30, 8), seed=4), lattice=lattice, n=n, step=0.07, key=2)
    args = (rec.codebook_int, rec.lattice, rec.n, rec.step)
    assert rec.on_lattice and R.on_lattice(rec.codebook, *args)
    np.testing.assert_array_equal(bits(rec.codebook), bits(R.codebook_from_int(*args)))
    moved = rec.codebook.copy()
    moved[0, 0] = np.nextafter(moved[0, 0], np.float32(np.inf))  # one ulp: fine-tuned
    assert not R.on_lattice(moved, *args)
    assert not R.on_lattice(rec.codebook.astype(np.float64), *args)  # not the float32 words
    assert not R.on_lattice(rec.codebook, None, rec.lattice, rec.n, rec.step)
    assert not R.on_lattice(rec.codebook[1:], rec.codebook_int[:-1] * 0 + 1, rec.lattice, rec.n, rec.step)


def test_a_negative_zero_codeword_is_not_on_the_lattice():
    # Value equality (the rule save used to apply) calls -0.0 equal to the rebuilt +0.0; a file storing the integers
    # would then load +0.0 where the model had -0.0. Bit equality keeps such a codebook as floats.
    rec = quantize_array(np.array([0.0, 1.0, -1.0, 0.0]), lattice="Z", n=1, step=1.0, key=None)
    z = int(np.flatnonzero(rec.codebook_int[:, 0] == 0)[0])
    signed = rec.codebook.copy()
    signed[z, 0] = -0.0
    assert np.array_equal(signed, rec.codebook)  # equal values...
    assert not R.on_lattice(signed, rec.codebook_int, "Z", 1, 1.0)  # ...different bits
    dlp = DitheredLatticeParam.from_record(rec, fqn="w")
    with torch.no_grad():
        dlp.codebook[z, 0] = -0.0
    back = dlp.record()
    assert back.codebook_int is None and not back.on_lattice
    entry = entry_from_record(back, fqn="w")
    decoded = record_from_entry(decode_container(encode_container(Container(quantized=[entry]))).quantized[0])
    np.testing.assert_array_equal(bits(decoded.decode()), bits(dlp.materialize().numpy()))
    assert bits(decoded.decode())[0] == 0x80000000  # the -0.0 survived the file


def test_a_record_refuses_integers_that_do_not_rebuild_its_codebook():
    rec = quantize_array(weights((12,)), lattice="Z", n=1, step=0.5, key=1)
    moved = rec.codebook + np.float32(0.01)
    with pytest.raises(ConfigError, match="rebuild"):
        R.CompressedWeight(indices=rec.indices, codebook=moved, codebook_int=rec.codebook_int, shape=rec.shape,
                           lattice="Z", n=1, step=0.5, key=1)


# ----------------------------------------------------------------------------------------------------------------
# Keys, factor, index dtype
# ----------------------------------------------------------------------------------------------------------------


def test_the_per_tensor_key_has_one_definition():
    from udnc_fx.coding import container as C

    for seed, fqn in [(0, "conv1.weight"), (2**64 - 1, ""), (7, "encoder.layer.0.attention.self.query.weight")]:
        assert R.weight_key(seed, fqn) == tensor_key(seed, fqn) == C.derived_key(seed, fqn)
    assert R.weight_key(0, "conv1.weight") == 0x721DB20751752A2B  # docs/FORMAT.md's test vector
    assert R.weight_key(5, "w", dithered=False) is None
    with pytest.raises(ConfigError):
        R.weight_key(-1, "w")


def test_compress_derives_each_key_with_weight_key():
    import udnc_fx

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    for dithered in (True, False):
        gm = udnc_fx.compress(model, udnc_fx.CompressConfig(seed=11, step=0.1, dithered=dithered))
        dlps = [m for m in gm.modules() if isinstance(m, DitheredLatticeParam)]
        assert len(dlps) == 2
        for dlp in dlps:
            assert dlp.key == R.weight_key(11, dlp.fqn, dithered)


@pytest.mark.parametrize("lattice, n", LATTICES, ids=LAT_IDS)
def test_factor_is_one_float64_product_shared_with_the_onnx_spec(lattice, n):
    rec = quantize_array(weights((16,)), lattice=lattice, n=n, step=0.37, key=1)
    lat = get_lattice(lattice, n)
    assert rec.factor == float(lat.scale) * 0.37 == R.lattice_factor(lat, 0.37)
    spec = TensorSpec.from_record(rec, fqn="w", output="w", prefix="udnc/w/")
    assert spec.factor == rec.factor and spec.num_vectors == rec.num_vectors and spec.index_dtype == "uint8"


@pytest.mark.parametrize("k, name", [(1, "uint8"), (256, "uint8"), (257, "int16"), (2**15, "int16"),
                                      (2**15 + 1, "int32"), (2**31, "int32")])
def test_index_dtype_is_the_smallest_every_decoder_gathers_with(k, name):
    assert R.index_dtype(k).name == name
    from udnc_fx.param import index_dtype_for

    assert str(index_dtype_for(k)) == f"torch.{name}"


def test_index_dtype_refuses_more_than_2_to_the_31_codewords():
    with pytest.raises(ConfigError):
        R.index_dtype(2**31 + 1)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _fields(**over):
    base = dict(indices=np.array([0, 1, 1], np.int64), codebook=np.array([[0.0], [0.5]], np.float32), shape=(3,),
                lattice="Z", n=1, step=0.5, key=3)
    base.update(over)
    return base


@pytest.mark.parametrize("over, words", [
    (dict(lattice="Q"), "unknown lattice"),
    (dict(n=9), "dimensions"),
    (dict(step=0.0), "step"),
    (dict(step=math.nan), "step"),
    (dict(step="0.5"), "step"),
    (dict(key=-1), "key"),
    (dict(key=2**64), "key"),
    (dict(key=True), "key"),
    (dict(shape=(4,)), "entries"),
    (dict(shape=(-3,)), "shape"),
    (dict(indices=np.array([0, 1, 2])), "outside"),
    (dict(indices=np.array([0.0, 1.0, 1.0])), "integer"),
    (dict(codebook=np.zeros((2, 2), np.float32)), "codebook"),
    (dict(codebook=None), "needs its codebook"),
    (dict(zero_index=2), "zero_index"),
    (dict(codebook=None, codebook_int=np.array([[1], [2**62]]), step=1e30), "overflows"),
    (dict(lattice="D4", n=4, shape=(4,), indices=np.array([0]), codebook=None, codebook_int=np.array([[1, 0, 0, 0]])),
     "not a point"),
])
def test_inconsistent_fields_raise_config_error(over, words):
    with pytest.raises(ConfigError, match=words):
        R.CompressedWeight(**_fields(**over))


def test_a_record_is_frozen():
    rec = R.CompressedWeight(**_fields())
    with pytest.raises(AttributeError):
        rec.key = 4


def test_a_bad_entry_read_from_a_file_is_a_format_error():
    q = QuantizedTensor(fqn="w", shape=(2,), lattice="Z", n=1, step=1e30, key=0, dither="none",
                        indices=np.array([0, 0]), codebook=None, codebook_int=np.array([[2**62]]))
    with pytest.raises(FormatError) as info:
        record_from_entry(q)
    assert info.value.kind == "bad_value" and "'w'" in info.value.message


# ----------------------------------------------------------------------------------------------------------------
# The three dither implementations agree bit for bit (the ONNX graph's twin is checked in tests/e2e/test_onnx_dither)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lattice, n", LATTICES, ids=LAT_IDS)
def test_record_param_and_torch_hash_dithers_agree(lattice, n):
    key = tensor_key(4, "layer.weight")
    rec = quantize_array(weights((33, 7), seed=5), lattice=lattice, n=n, step=0.11, key=key)
    lat = get_lattice(lattice, n)
    m = rec.num_vectors
    via_torch = R.scaled_dither(lat.dither_raw(uniform_torch(key, m * n).numpy().reshape(m, n)), rec.factor)
    dlp = DitheredLatticeParam.from_record(rec, fqn="layer.weight")
    for other in (dlp.dither().numpy(), compute_dither(key, m, lattice, n, 0.11), via_torch):
        np.testing.assert_array_equal(bits(rec.dither()), bits(other))


# ----------------------------------------------------------------------------------------------------------------
# Round trips: record → DitheredLatticeParam → record, record → container entry → file → record
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def records(draw):
    lattice, n = draw(st.sampled_from(LATTICES))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    seed = draw(st.integers(0, 2**32 - 1))
    w = np.random.default_rng(seed).standard_normal(shape)
    if draw(st.booleans()):
        w[w < 0] = 0.0  # many exact zeros
    key = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    step = draw(st.floats(0.01, 3.0))
    return quantize_array(w, lattice=lattice, n=n, step=step, key=key, exact_zero=draw(st.booleans()))


def assert_same_record(a: R.CompressedWeight, b: R.CompressedWeight) -> None:
    assert (a.shape, a.lattice, a.n, a.step, a.key, a.zero_index) == (b.shape, b.lattice, b.n, b.step, b.key,
                                                                       b.zero_index)
    np.testing.assert_array_equal(np.asarray(a.indices, np.int64), np.asarray(b.indices, np.int64))
    np.testing.assert_array_equal(bits(a.codebook), bits(b.codebook))
    assert (a.codebook_int is None) == (b.codebook_int is None)
    if a.codebook_int is not None:
        np.testing.assert_array_equal(a.codebook_int, b.codebook_int)
    np.testing.assert_array_equal(bits(a.decode()), bits(b.decode()))


@SETTINGS
@given(records())
def test_record_to_param_to_record_round_trips(rec):
    dlp = DitheredLatticeParam.from_record(rec, fqn="w")
    back = dlp.record()
    assert_same_record(rec, back)
    np.testing.assert_array_equal(bits(dlp.materialize().numpy()), bits(rec.decode()))


@SETTINGS
@given(records(), st.sampled_from(["zlib-v1", "ans-dither-v1"]))
def test_record_to_file_entry_to_record_round_trips(rec, coder):
    entry = entry_from_record(rec, fqn="a.weight", coder=coder, meta={"aliases": ["b.weight"]})
    assert entry.codebook is None and entry.codebook_int is not None  # integers while on the lattice
    read = decode_container(encode_container(Container(quantized=[entry]))).quantized[0]
    assert read.meta == {"aliases": ["b.weight"]} and read.coder == coder
    assert_same_record(rec, record_from_entry(read))

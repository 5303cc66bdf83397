"""The container with the dither-conditioned coders (format 1.1, v2 1.4): every lattice round-trips bit-exact, the version
written is the lowest that reads the file, a golden file pins the 1.1 bytes, and damaged 1.1 files raise FormatError."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from udnc_fx.coding.container import (
    MAGIC,
    Container,
    QuantizedTensor,
    RawTensor,
    decode_container,
    derived_key,
    encode_container,
    read_header,
)
from udnc_fx.dither import uniform_np
from udnc_fx.errors import FormatError
from udnc_fx.quantizer import quantize_array

LATTICES = [("Z", 1), ("Z", 2), ("Z", 4), ("A2", 2), ("D4", 4), ("E8", 8)]


def quantized(fqn: str, lattice: str, n: int, step: float, *, seed: int = 0, shape=(64, 96), exact_zero=False,
              coder: str = "ans-dither-v1", key: int | None = None) -> QuantizedTensor:
    values = np.random.default_rng(len(fqn)).laplace(size=shape)
    if exact_zero:
        values[np.abs(values) < 1.0] = 0.0  # pruned
    key = derived_key(seed, fqn) if key is None else key
    qa = quantize_array(values, lattice=lattice, n=n, step=step, key=key, exact_zero=exact_zero)
    return QuantizedTensor(
        fqn=fqn, shape=shape, lattice=lattice, n=n, step=qa.step, key=key, dither="udnc-hash32-v1",
        indices=qa.indices, codebook=qa.codebook, codebook_int=qa.codebook_int, coder=coder,
        zero_index=qa.zero_index,
    )


def minor_version(data: bytes) -> int:
    return struct.unpack_from("<HH", data, len(MAGIC))[1]


@pytest.mark.parametrize("lattice,n", LATTICES)
@pytest.mark.parametrize("exact_zero", [False, True])
@pytest.mark.parametrize("step", [2.0, 0.3])
@pytest.mark.parametrize("coder", ["ans-dither-v1", "ans-dither-v2"])
def test_every_lattice_round_trips_bit_exact(lattice, n, exact_zero, step, coder):
    q = quantized("layer.weight", lattice, n, step, exact_zero=exact_zero, coder=coder)
    data = encode_container(Container([q], [RawTensor("b", np.ones(3, np.float32))]))
    assert encode_container(Container([q], [RawTensor("b", np.ones(3, np.float32))])) == data
    # 1.2 exactly when the points are stored as coordinates (lattice-coords), 1.4 in the -u layouts (A2, D4, E8:
    # contexts from each coordinate's own dither), else 1.1 (the ans-dither-v1 coder); ans-dither-v2: always 1.4
    codebook = read_header(data)["quantized"][0]["codebook"]
    coords = codebook["encoding"] == "lattice-coords"
    own = coords and codebook["layout"].endswith("-u")
    assert own is (coords and lattice in ("A2", "D4", "E8"))
    assert minor_version(data) == (4 if own or coder == "ans-dither-v2" else 2 if coords else 1)
    back = decode_container(data).quantized[0]
    np.testing.assert_array_equal(back.indices, q.indices)
    assert back.coder == coder and back.zero_index == q.zero_index


def test_conditioning_pays_at_low_rate_and_costs_nothing_at_high_rate():
    def index_bytes(q):
        q.codebook_int = None  # a float codebook: the index stream is stored (never lattice-coords)
        return read_header(encode_container(Container([q])))["quantized"][0]["indices"]["length"]

    for step, better in ((3.5, True), (0.02, False)):
        ans = index_bytes(quantized("w", "Z", 1, step))
        flat = index_bytes(quantized("w", "Z", 1, step, coder="range-adaptive-v1"))
        if better:
            assert ans < 0.92 * flat  # 0.90 seen
        else:
            assert ans <= 1.01 * flat


def test_files_without_the_new_coder_stay_version_1_0():
    q = quantized("w", "Z", 1, 1.0, coder="range-context-v1")
    data = encode_container(Container([q]))
    assert minor_version(data) == 0
    mixed = Container([q, quantized("v", "Z", 1, 1.0)])
    assert minor_version(encode_container(mixed)) == 1


def test_the_dither_is_the_context():
    """Decoding with another tensor's dither key must not give back the indices (the key is in the header)."""
    q = quantized("w", "Z", 1, 2.5)
    data = encode_container(Container([q]))
    np.testing.assert_array_equal(decode_container(data).quantized[0].indices, q.indices)
    moved = QuantizedTensor(**{**q.__dict__, "key": q.key ^ 1})
    other = encode_container(Container([moved]))
    assert other != data


def test_undithered_tensors_are_coded_without_bins():
    q = quantized("w", "Z", 1, 2.5)
    q.dither = "none"
    q.key = 0
    data = encode_container(Container([q]))
    np.testing.assert_array_equal(decode_container(data).quantized[0].indices, q.indices)


@pytest.mark.parametrize("coder", ["ans-dither-v1", "ans-dither-v2"])
def test_damaged_files_raise_format_error(coder):
    data = bytearray(encode_container(Container([quantized("w", "Z", 1, 2.5, coder=coder)])))
    for cut in (len(data) - 1, len(data) // 2, 100):
        with pytest.raises(FormatError):
            decode_container(bytes(data[:cut]))
    rng = np.random.default_rng(0)
    for _ in range(50):
        bad = bytearray(data)
        bad[int(rng.integers(88, len(bad)))] ^= 1 << int(rng.integers(8))
        with pytest.raises(FormatError):
            decode_container(bytes(bad))


# ------------------------------------------------------------------------------------------------------------------
# Golden file, format 1.1: a dithered Z¹ tensor coded with ans-dither-v1 using its dither bins (docs/FORMAT.md)
# ------------------------------------------------------------------------------------------------------------------


def golden_1_1(coder: str = "ans-dither-v1") -> Container:
    """4096 indices of a dithered Z¹ quantizer (key 1, step 1) on uniform data from the dither hash itself (key 2):
    integer hashing and exact float64 arithmetic only, so the same on every platform."""
    v = uniform_np(2, 4096) * 3.0 - 1.5
    r = uniform_np(1, 4096)
    y = np.floor(v + (r - np.round(r)) + 0.5).astype(np.int64)
    q = QuantizedTensor(
        fqn="w", shape=(64, 64), lattice="Z", n=1, step=1.0, key=1, dither="udnc-hash32-v1",
        indices=y - y.min(), codebook=None, codebook_int=np.arange(y.min(), y.max() + 1)[:, None],
        coder=coder,
    )
    return Container([q], [], {}, {})


GOLDEN_1_1 = "1231:bbabe48c2fad6adc40ee0418a249d4064141d37d7afb6a53578dc92def19c381"


def test_golden_1_1_bytes():
    data = encode_container(golden_1_1())
    assert minor_version(data) == 1
    header = read_header(data)
    entry = header["quantized"][0]
    payload_start = len(data) - header["payload_length"]
    assert entry["indices"]["offset"] == 0 and data[payload_start] > 0  # the index stream uses dither bins
    assert f"{len(data)}:{hashlib.sha256(data).hexdigest()}" == GOLDEN_1_1
    np.testing.assert_array_equal(decode_container(data).quantized[0].indices, golden_1_1().quantized[0].indices)


# Golden file, format 1.4: the same tensor coded with ans-dither-v2 (docs/FORMAT.md, ``ans-dither-v2``)
GOLDEN_1_4 = "1236:c550bf318894c9818da5e891060b72c4e106ebb7f75301a41f96f911b4a57ac5"


def test_golden_1_4_bytes():
    data = encode_container(golden_1_1("ans-dither-v2"))
    assert minor_version(data) == 4
    header = read_header(data)
    payload_start = len(data) - header["payload_length"]
    assert header["quantized"][0]["indices"]["coder"] == "ans-dither-v2" and data[payload_start] > 0  # dither bins
    assert f"{len(data)}:{hashlib.sha256(data).hexdigest()}" == GOLDEN_1_4
    np.testing.assert_array_equal(decode_container(data).quantized[0].indices, golden_1_1().quantized[0].indices)


@pytest.mark.parametrize("coder", ["ans-dither-v1", "ans-dither-v2"])
@pytest.mark.parametrize("step", [0.3, 0.002])  # K <= 256 (uint8) and K > 256 (uint16)
def test_indices_decode_straight_into_the_narrow_dtype(step, coder):
    """The reader asks the ANS coders for the narrow dtype it keeps (no int64 copy): same values as written."""
    q = quantized("w", "Z", 1, step, shape=(300, 250), coder=coder)
    back = decode_container(encode_container(Container([q]))).quantized[0]
    k = int(q.indices.max()) + 1
    assert back.indices.dtype == (np.uint8 if k <= 256 else np.uint16)
    np.testing.assert_array_equal(back.indices, q.indices)

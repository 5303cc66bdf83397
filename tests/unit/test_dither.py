"""The dither generator: known-answer vectors (docs/FORMAT.md), NumPy/PyTorch bit-exactness, statistics."""

import numpy as np
import pytest
import torch

from udnc_fx import ConfigError
from udnc_fx.dither import hash_stream_np, key_words, tensor_key, uniform_np, uniform_torch

# The same vectors are printed in docs/FORMAT.md ("Dither generator"): a change here is a format change.
KEY_VECTORS = [
    (0, "conv1.weight", 0x721DB20751752A2B),
    (1, "conv1.weight", 0xB9EDDECB58F2C8D3),
    (0, "fc.weight", 0xD95673DEC91D26AA),
    (2**64 - 1, "", 0xECFCA53864E35B5E),
]
HASH_VECTORS = [
    (0x0, [0x7E3D55DD, 0x6C6858CD, 0x7DC93873, 0x45960480, 0xD4AFB643, 0x688AC882]),
    (0x1, [0xAC35EF61, 0xA53A2FBE, 0x678F3B0A, 0xCD4DFB86, 0x8925AE62, 0xF9DB653A]),
    (0x0123456789ABCDEF, [0xA36084A0, 0x7ECD0A97, 0x2CC6FAA6, 0x6200C4FA, 0x86F6CB96, 0xD7C104A1]),
    (0xFFFFFFFFFFFFFFFF, [0x189C1A40, 0x7FAA8E99, 0x57E03F7D, 0xB9616779, 0x8C9BAB10, 0xD3E159F6]),
]


@pytest.mark.parametrize("seed,fqn,expected", KEY_VECTORS)
def test_tensor_key_vectors(seed, fqn, expected):
    assert tensor_key(seed, fqn) == expected


@pytest.mark.parametrize("key,expected", HASH_VECTORS)
def test_hash_vectors_numpy_and_torch(key, expected):
    h = hash_stream_np(key, len(expected))
    assert [int(x) for x in h] == expected
    r = uniform_np(key, len(expected))
    assert np.array_equal(r, np.array([x >> 8 for x in expected], dtype=np.float64) * 2.0**-24)
    assert torch.equal(uniform_torch(key, len(expected)), torch.from_numpy(r))


def test_element_depends_only_on_key_and_index():
    key = 0xDEADBEEF12345678
    whole = hash_stream_np(key, 10_000)
    assert np.array_equal(hash_stream_np(key, 100, start=5_000), whole[5_000:5_100])
    # the counter's last values work too (no overflow at the top of the 32-bit space)
    tail = hash_stream_np(key, 3, start=2**32 - 3)
    assert tail.dtype == np.uint32 and tail.shape == (3,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_bit_exact_with_numpy_large(dtype):
    for key in (3, tensor_key(7, "layer.weight")):
        ref = uniform_np(key, 200_003, start=123, dtype=np.float32 if dtype == torch.float32 else np.float64)
        got = uniform_torch(key, 200_003, start=123, dtype=dtype).numpy()
        assert np.array_equal(ref, got)


def test_float32_and_float64_agree_exactly():
    key = tensor_key(0, "x")
    assert np.array_equal(uniform_np(key, 50_000, dtype=np.float32).astype(np.float64), uniform_np(key, 50_000))


def test_uniformity_chi_square():
    # 1e6 draws in 1000 equal bins: chi-square with 999 degrees of freedom has mean 999, sd ~44.7;
    # 5.5 sd either side fails by chance with probability ~1e-7.
    r = uniform_np(tensor_key(0, "chi2"), 1_000_000)
    assert r.min() >= 0.0 and r.max() < 1.0
    counts = np.bincount((r * 1000).astype(np.int64), minlength=1000)
    expected = 1000.0
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert abs(chi2 - 999) < 5.5 * np.sqrt(2 * 999), chi2


def test_top_bits_are_uniform_too():
    h = hash_stream_np(42, 1_000_000)
    for bit in range(8, 32):
        frac = float(((h >> np.uint32(bit)) & np.uint32(1)).mean())
        assert abs(frac - 0.5) < 0.003, (bit, frac)  # sd 0.0005


@pytest.mark.parametrize("lag", [1, 2, 3, 7, 64, 4096])
def test_no_correlation_between_lags(lag):
    r = uniform_np(tensor_key(1, "lag"), 1_000_000) - 0.5
    corr = np.corrcoef(r[:-lag], r[lag:])[0, 1]
    assert abs(corr) < 0.005, corr  # sd 0.001


@pytest.mark.parametrize("key_a,key_b", [(0, 1), (1000, 1001), (2**32, 2**32 + 1), (5, 5 + 2**32), (7, 7 ^ 2**40)])
def test_no_correlation_between_neighbouring_raw_keys(key_a, key_b):
    a = uniform_np(key_a, 1_000_000) - 0.5
    b = uniform_np(key_b, 1_000_000) - 0.5
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.005
    # nor with a shifted copy of each other (a keyed permutation of one counter would show up here)
    for shift in (1, 2, 3):
        assert abs(np.corrcoef(a[:-shift], b[shift:])[0, 1]) < 0.005
        assert abs(np.corrcoef(a[shift:], b[:-shift])[0, 1]) < 0.005
    assert int((a == b).sum()) < 1_000  # equal draws only by chance (p = 2**-24 each)


def test_neighbouring_seeds_and_fqns_give_unrelated_streams():
    base = uniform_np(tensor_key(0, "conv.weight"), 200_000) - 0.5
    for other in (tensor_key(1, "conv.weight"), tensor_key(0, "conv.weigh"), tensor_key(0, "conv.weight ")):
        assert abs(np.corrcoef(base, uniform_np(other, 200_000) - 0.5)[0, 1]) < 0.012  # sd 0.0022


def test_key_words_are_32_bit():
    for key in (0, 1, 2**63, 2**64 - 1):
        a, b = key_words(key)
        assert 0 <= a < 2**32 and 0 <= b < 2**32


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "3", True, None])
def test_bad_seed_is_config_error(seed):
    with pytest.raises(ConfigError):
        tensor_key(seed, "w")


def test_out_of_range_counter_is_config_error():
    with pytest.raises(ConfigError):
        hash_stream_np(0, 2, start=2**32 - 1)
    with pytest.raises(ConfigError):
        uniform_torch(0, -1)
    with pytest.raises(ConfigError):
        key_words(2**64)

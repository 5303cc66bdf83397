"""range-context-v1: per-row density context for pruned index streams."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from udnc_fx.coding import get_coder
from udnc_fx.errors import ConfigError, FormatError

CODER = get_coder("range-context-v1")
FLAT = get_coder("range-adaptive-v1")


def pruned_rows(rows: int, length: int, k: int, seed: int = 0, zero: int = 0) -> np.ndarray:
    """Rows of very different density (dead, sparse, dense), non-zero symbols Laplacian: a magnitude-pruned layer."""
    rng = np.random.default_rng(seed)
    density = rng.choice([0.0, 0.03, 0.3, 0.6], rows)
    keep = rng.random((rows, length)) < density[:, None]
    values = np.clip(np.round(rng.laplace(0, 2.0, (rows, length))), -(k // 2), k // 2 - 1).astype(np.int64)
    values = (values + k // 2) % k
    values[values == zero] = (zero + 1) % k
    return np.where(keep, values, zero).reshape(-1)


def hashed_rows(rows: int = 48, length: int = 300) -> np.ndarray:
    """A row-structured stream from integer hashing only (no RNG, no libm): the same on every platform."""
    i = np.arange(rows * length, dtype=np.uint64)
    h = ((i * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & np.uint64(0xFFFF)
    row = np.arange(rows * length) // length
    threshold = np.array([0, 600, 6000, 30000])[row % 4]  # dead, 1 %, 9 %, 46 % of the row non-zero
    symbols = 1 + (h % np.uint64(9)).astype(np.int64)
    return np.where(h < threshold, symbols, 0).astype(np.int64)


@pytest.mark.parametrize(
    "rows, length, k, zero",
    [(64, 512, 10, 0), (32, 144, 13, 6), (10, 64, 2, 0), (10, 64, 2, 1), (7, 33, 300, 150), (1, 500, 5, 2),
     (200, 3, 4, 0), (5, 1, 3, 0)],
)
def test_round_trip_with_rows(rows, length, k, zero):
    stream = pruned_rows(rows, length, k, seed=rows + length, zero=zero)
    for hint in (length, max(1, length // 2), length + 7, 1, stream.size, 10**6):
        data = CODER.encode(stream, k, row_length=min(hint, (1 << 24) - 1))
        assert CODER.encode(stream, k, row_length=min(hint, (1 << 24) - 1)) == data  # deterministic
        np.testing.assert_array_equal(CODER.decode(data, stream.size, k), stream)
        assert len(data) <= 1 + len(FLAT.encode(stream, k))  # never worse than the flat coder plus its mode byte


def test_row_mode_on_every_row_kind():
    # dead rows, full rows (no zero at all), mixed rows, and a short last row
    k, length = 6, 50
    rows = [np.zeros(length, np.int64), np.full(length, 3), np.where(np.arange(length) % 5 == 0, 2, 0),
            np.where(np.arange(length) % 2 == 0, 5, 0), np.array([1, 0, 0])]
    stream = np.concatenate(rows * 20)
    coder = CODER
    data = coder._encode_rows(stream, k, length)  # mode 1 forced, whatever its size
    assert data[0] == 1
    np.testing.assert_array_equal(coder.decode(data, stream.size, k), stream)


def test_pruned_rows_cost_less_than_order0():
    stream = pruned_rows(64, 512, 18, seed=3)
    flat = FLAT.encode(stream, 18)
    data = CODER.encode(stream, 18, row_length=512)
    assert data[0] == 1 and len(data) < 0.85 * len(flat)  # about 0.8 here


def test_streams_without_rows_stay_flat():
    rng = np.random.default_rng(0)
    iid = np.where(rng.random(20_000) < 0.2, rng.integers(1, 9, 20_000), 0)
    data = CODER.encode(iid, 9, row_length=500)
    assert data[0] == 0 and data[1:] == FLAT.encode(iid, 9)
    assert CODER.encode(iid, 9)[0] == 0  # no row length: only the flat mode is tried


def test_known_answer_row_mode():
    stream = hashed_rows()
    data = CODER.encode(stream, 10, row_length=300)
    assert data[:4] == bytes([1, 0xAC, 0x02, 0])  # mode 1, L = 300 (varint), z = 0
    assert f"{len(data)}:{hashlib.sha256(data).hexdigest()}" == KNOWN_ROW_MODE
    np.testing.assert_array_equal(CODER.decode(data, stream.size, 10), stream)


KNOWN_ROW_MODE = "1522:919ee4c9525e35be7c15e564241f16834ea6cba18be2f7f95dae736229133870"  # 1894 bytes flat


def test_trivial_streams_are_empty():
    assert CODER.encode(np.zeros(0, np.int64), 5, row_length=3) == b""
    assert CODER.encode(np.zeros(100, np.int64), 1, row_length=10) == b""
    np.testing.assert_array_equal(CODER.decode(b"", 100, 1), np.zeros(100))
    with pytest.raises(FormatError):
        CODER.decode(b"\x00", 0, 5)


def test_bad_row_length_arguments():
    stream = np.array([0, 1, 0, 2])
    for bad in (0, -1, 1 << 24, 2.0, True, "4"):
        with pytest.raises(ConfigError):
            CODER.encode(stream, 3, row_length=bad)


def _row_payload(stream, k, length):
    data = CODER._encode_rows(stream, k, length)
    assert data[0] == 1
    return data


def test_hostile_row_payloads_raise_format_error():
    stream = pruned_rows(8, 40, 7, seed=1)
    data = _row_payload(stream, 7, 40)
    n = stream.size

    def refused(payload, kind=None):
        with pytest.raises(FormatError) as info:
            CODER.decode(payload, n, 7)
        assert kind is None or info.value.kind == kind, info.value

    refused(bytes([2]) + data[1:], "corrupt_payload")  # unknown mode
    refused(bytes([1, 0]) + data[2:], "corrupt_payload")  # L = 0
    refused(bytes([1, 0x80, 0x80, 0x80, 0x08]) + data[2:], "corrupt_payload")  # L = 2^24
    refused(data[:2] + bytes([7]) + data[3:], "corrupt_payload")  # z = K
    refused(data[:-1], "truncated")
    refused(data + b"\x00", "corrupt_payload")
    refused(b"\x01")
    # garbage words behind a valid head: a failure is always a FormatError, never another exception
    rng = np.random.default_rng(0)
    head = data[:4]
    for _ in range(200):
        words = rng.integers(0, 256, 4 * int(rng.integers(1, 12)), dtype=np.uint8).tobytes()
        payload = head[:3] + bytes([len(words) // 4]) + words
        try:
            out = CODER.decode(payload, n, 7)
        except FormatError as exc:
            assert exc.kind in ("truncated", "corrupt_payload", "bad_value")
        else:
            assert out.shape == (n,) and out.min() >= 0 and out.max() < 7


def test_a_row_count_above_the_row_length_is_refused():
    # rows of length 3 whose counts are coded as bit lengths: forge a count of 3 bits' worth (b = 3: k >= 4 > 3)
    import constriction

    from udnc_fx.coding.coder_base import varint as _varint
    from udnc_fx.coding.range_coders import _AdaptiveModel

    enc = constriction.stream.queue.RangeEncoder()
    model = _AdaptiveModel(3)  # bit_length(3) + 1
    enc.encode(np.array([2], np.int32), constriction.stream.model.Categorical(model.probabilities(), perfect=False))
    enc.encode(np.array([1], np.int32), constriction.stream.model.Categorical(CODER._HALF, perfect=False))  # k = 3
    words = enc.get_compressed().astype("<u4")
    payload = bytes([1]) + _varint(3) + _varint(0) + _varint(words.size) + words.tobytes()
    np.testing.assert_array_equal(CODER.decode(payload, 3, 2), [1, 1, 1])  # k = 3 = len: a full row, fine
    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(np.array([2], np.int32), constriction.stream.model.Categorical(model.probabilities(), perfect=False))
    enc.encode(np.array([1], np.int32), constriction.stream.model.Categorical(CODER._HALF, perfect=False))
    words = enc.get_compressed().astype("<u4")
    payload = bytes([1]) + _varint(3) + _varint(0) + _varint(words.size) + words.tobytes()
    with pytest.raises(FormatError, match="exceeds"):
        CODER.decode(payload, 2, 2)  # the same count for a row of 2


def test_container_passes_the_row_length(tmp_path):
    from udnc_fx.coding.container import Container, QuantizedTensor, read_container, read_header, encode_container

    stream = pruned_rows(64, 512, 12, seed=5)
    q = QuantizedTensor(
        fqn="fc1.weight", shape=(64, 512), lattice="Z", n=1, step=0.1, key=0, dither="none", indices=stream,
        codebook=np.arange(12, dtype=np.float32)[:, None], coder="range-context-v1", zero_index=0,
    )
    data = encode_container(Container([q]))
    length = read_header(data)["quantized"][0]["indices"]["length"]
    assert length == len(CODER.encode(stream, 12, row_length=512)) < len(CODER.encode(stream, 12))
    np.testing.assert_array_equal(read_container(data).quantized[0].indices, stream)

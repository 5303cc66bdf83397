"""The compressed header (format 1.5, ``udnc-hcm-v1``): known-answer bytes, round trips, the compiled kernel against
the same code run by the interpreter, the bounds a reader enforces, and files with a compressed header."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udnc_fx.coding import header_codec as hc
from udnc_fx.coding.container import (
    MAGIC,
    PREAMBLE_SIZE,
    Container,
    QuantizedTensor,
    RawTensor,
    decode_container,
    derived_key,
    encode_container,
    read_header,
    section_sizes,
)
from udnc_fx.coding.format import canonical_json
from udnc_fx.errors import FormatError
from udnc_fx.quantizer import quantize_array

#: A small header and its compressed form, pinned: any change to the model, the primer or the coder changes them.
KNOWN_JSON = (
    b'{"quantized":[{"fqn":"fc.weight","indices":{"alphabet_size":5,"length":12},"shape":[4,3],"step":0.5}],'
    b'"raw":[["fc.bias",[4]]]}'
)
KNOWN_STORED = "00017e1a8db6b1be4135ff1483e571971949d00895f8ebca2e39e1"  # 126 bytes of JSON in 27


def test_known_answer():
    stored = hc.compress_header(KNOWN_JSON)
    assert stored.hex() == KNOWN_STORED
    assert stored[:2] == bytes([hc.MARKER, hc.METHOD]) and stored[2] == len(KNOWN_JSON)  # one-byte varint
    assert hc.decompress_header(stored, 1 << 20) == KNOWN_JSON


def test_primer_and_tables_are_pinned():
    # the primer and the model's fixed tables are part of the format (docs/FORMAT.md)
    assert hashlib.sha256(hc.PRIMER).hexdigest()[:16] == "381f32c0adba927d"
    assert len(hc.PRIMER) == 1558
    assert hc.STRETCH[0] == -2047 and hc.STRETCH[4095] == 2047 and hc.STRETCH[2048] == 1
    assert hc.SQUASH[2047] == 2047 and hc.SQUASH[0] == 1 and hc.SQUASH[4094] == 4094
    assert list(hc.RATES[:3]) == [43690, 26214, 18724] and len(hc.RATES) == hc.LIMIT + 1
    assert [hc.table_bits(n) for n in (1, 1023, 1024, 2047, 2048, 16383, 16384, 1 << 26)] == [16, 16, 17, 17, 18, 20,
                                                                                               20, 20]


@pytest.mark.parametrize(
    "data",
    [KNOWN_JSON, b"{}", b"x", bytes(range(256)) * 3, b"\x00" * 5000, b"\xff" * 300,
     canonical_json({"metadata": {"text": "\u00e9\u4e2d" * 40}, "seed": 2**64 - 1})],
)
def test_round_trip_and_interpreted_kernel_agree(data):
    stored = hc.compress_header(data)
    assert hc.decompress_header(stored, len(data)) == data
    # the interpreter runs the same code with Python's integers: any overflow or shift that numba compiled
    # differently would change the bytes
    stream = stored[2 + len(hc.varint(len(data))):]
    assert hc._encode(data, hc._code.py_func) == stream
    assert hc._decode(stream, len(data), hc._code.py_func) == data


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.binary(min_size=1, max_size=400))
def test_any_bytes_round_trip(data):
    stored = hc.compress_header(data)
    assert hc.decompress_header(stored, len(data)) == data
    assert hc.compress_header(data) == stored  # deterministic


def test_plain_json_passes_through():
    assert hc.decompress_header(b'{"a":1}', 10) == b'{"a":1}'
    assert hc.decompress_header(b' {"a":1}', 10) == b' {"a":1}'  # leading whitespace: still JSON, not compressed


def test_declared_length_is_bounded_before_decoding():
    stored = hc.compress_header(KNOWN_JSON)
    with pytest.raises(FormatError) as info:
        hc.decompress_header(stored, len(KNOWN_JSON) - 1)
    assert info.value.kind == "bad_value" and "max_header_length" in str(info.value)
    # a huge declared length over a tiny stream is refused by the limit, not decoded
    bomb = bytes([hc.MARKER, hc.METHOD]) + hc.varint(1 << 40) + b"\x00"
    with pytest.raises(FormatError) as info:
        hc.decompress_header(bomb, 4 << 20)
    assert info.value.kind == "bad_value"


@pytest.mark.parametrize(
    "stored,kind",
    [
        (b"\x00", "bad_header"),  # no method byte
        (b"\x00\x02\x05abc", "unknown_codec"),  # unknown method
        (b"\x00\x01", "bad_header"),  # no length
        (b"\x00\x01\x85\x00abc", "bad_header"),  # non-canonical varint
        (b"\x00\x01\x00abc", "bad_header"),  # empty header declared
        (b"\x00\x01\x05", "bad_header"),  # no stream
    ],
)
def test_malformed_frames_are_refused(stored, kind):
    with pytest.raises(FormatError) as info:
        hc.decompress_header(stored, 1 << 20)
    assert info.value.kind == kind, info.value


def _stream_variants(stored: bytes):
    head = 2 + len(hc.varint(len(KNOWN_JSON)))
    stream = stored[head:]
    yield stored[:head] + stream + b"\x00"  # a trailing byte
    yield stored[:head] + stream[:-1]  # the last byte dropped
    yield stored[:head] + stream[:-1] + bytes([stream[-1] ^ 1])  # a non-canonical flush byte
    for i in range(0, len(stream), 3):
        yield stored[:head] + stream[:i] + bytes([stream[i] ^ 0x5A]) + stream[i + 1:]


def test_damaged_streams_never_decode_silently_to_the_declared_length_unless_valid():
    stored = hc.compress_header(KNOWN_JSON)
    for bad in _stream_variants(stored):
        try:
            out = hc.decompress_header(bad, 1 << 20)
        except FormatError as exc:
            assert exc.kind == "bad_header"
            continue
        assert len(out) == len(KNOWN_JSON) and out != KNOWN_JSON  # a flipped byte may decode to other bytes


# ---------------------------------------------------------------------------------------------------------------
# Files with a compressed header
# ---------------------------------------------------------------------------------------------------------------


def _container(tensors: int = 3, seed: int = 7) -> Container:
    quantized = []
    for i in range(tensors):
        fqn = f"layers.{i}.weight"
        key = derived_key(seed, fqn)
        values = np.random.default_rng(i).laplace(size=(8, 16))
        qa = quantize_array(values, lattice="Z", n=1, step=0.7, key=key)
        quantized.append(QuantizedTensor(
            fqn=fqn, shape=(8, 16), lattice="Z", n=1, step=qa.step, key=key, dither="udnc-hash32-v1",
            indices=qa.indices, codebook=qa.codebook, coder="range-context-v1",
        ))
    raw = [RawTensor(f"layers.{i}.bias", np.arange(8, dtype=np.float32)) for i in range(tensors)]
    return Container(quantized, raw, config={"fallback": "module_swap"}, seed=seed)


def minor(data: bytes) -> int:
    return struct.unpack_from("<HH", data, len(MAGIC))[1]


def stored_header(data: bytes) -> bytes:
    return data[PREAMBLE_SIZE: PREAMBLE_SIZE + struct.unpack_from("<I", data, 12)[0]]


def test_a_compressed_header_reads_back_the_same():
    c = _container()
    plain = encode_container(c)
    packed = encode_container(c, compress_header=True)
    assert encode_container(c, compress_header=True) == packed  # deterministic
    assert minor(packed) == 5 and minor(plain) == 0
    assert stored_header(packed)[:2] == b"\x00\x01" and stored_header(plain)[:1] == b"{"
    assert len(packed) < len(plain)
    # the payload is the same bytes; only the header's stored form differs
    assert packed[-100:] == plain[-100:] and packed[24:56] == plain[24:56]
    a, b = decode_container(plain), decode_container(packed)
    for x, y in zip(a.quantized, b.quantized):
        assert np.array_equal(x.indices, y.indices) and np.array_equal(x.codebook, y.codebook)
    assert a.config == b.config and a.seed == b.seed
    hp, hk = read_header(plain), read_header(packed)
    assert hk["header_json_length"] == hp["header_length"] == hp["header_json_length"]
    assert hk["header_length"] == len(stored_header(packed)) < hp["header_length"]
    assert hc.decompress_header(stored_header(packed), 1 << 20) == stored_header(plain)
    for key in ("quantized", "raw", "config", "seed", "payload_sha256"):
        assert hk[key] == hp[key]


def test_section_sizes_add_up_with_a_compressed_header():
    data = encode_container(_container(5), compress_header=True)
    sizes = section_sizes(read_header(data))
    assert sizes["file"] == len(data)
    assert sizes["shared"]["total"] + sum(t["total"] for t in sizes["tensors"].values()) == len(data)
    assert all(t["header"] >= 1 for t in sizes["tensors"].values()) and sizes["shared"]["header"] >= 0


def test_writers_keep_the_plain_header_when_compressing_does_not_pay():
    empty = Container()
    assert encode_container(empty, compress_header=True) == encode_container(empty)  # "{}" stays as it is
    assert stored_header(encode_container(empty, compress_header=True)) == b"{}"


def test_the_reader_limit_bounds_the_decoded_header():
    data = encode_container(_container(), compress_header=True)
    stored = stored_header(data)
    json_length = len(hc.decompress_header(stored, 1 << 20))
    assert len(stored) < json_length
    with pytest.raises(FormatError) as info:
        read_header(data, max_header_length=json_length - 1)
    assert info.value.kind == "bad_value" and "max_header_length" in str(info.value)
    assert read_header(data, max_header_length=json_length)["header_json_length"] == json_length


def _reframe(data: bytes, stored: bytes) -> bytes:
    """``data`` with its header replaced by ``stored``, every digest valid (a crafted file)."""
    header_length = struct.unpack_from("<I", data, 12)[0]
    payload = data[PREAMBLE_SIZE + header_length:]
    head = data[:12] + struct.pack("<IQ32s", len(stored), len(payload), hashlib.sha256(payload).digest())
    return head + hashlib.sha256(head + stored).digest() + stored + payload


def test_crafted_files_with_valid_digests_and_bad_streams_are_refused():
    data = encode_container(_container(), compress_header=True)
    stored = stored_header(data)
    assert decode_container(_reframe(data, stored)) is not None
    head = 2 + len(hc.varint(len(hc.decompress_header(stored, 1 << 20))))
    bad = [stored + b"\x00", stored[:-1], stored[:head] + stored[head + 1:], b"\x00\x07" + stored[2:],
           stored[:2] + hc.varint(5 << 20) + stored[head:]]
    bad += [stored[:i] + bytes([stored[i] ^ 0xA5]) + stored[i + 1:] for i in range(head, len(stored), 5)]
    for crafted in bad:
        with pytest.raises(FormatError):
            decode_container(_reframe(data, crafted))
        with pytest.raises(FormatError):
            read_header(_reframe(data, crafted))


def test_a_damaged_compressed_header_is_a_checksum_mismatch():
    data = bytearray(encode_container(_container(), compress_header=True))
    data[PREAMBLE_SIZE + 10] ^= 0x10
    with pytest.raises(FormatError) as info:
        decode_container(bytes(data))
    assert info.value.kind == "checksum_mismatch"


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=st.integers(0, 4), seed=st.integers(0, 2**64 - 1),
    metadata=st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=20)), max_size=4),
)
def test_compressed_header_files_round_trip(tensors, seed, metadata):
    c = _container(tensors, seed)
    c.metadata = metadata
    data = encode_container(c, compress_header=True)
    plain = encode_container(c)
    hk, hp = read_header(data), read_header(plain)
    assert json.dumps(hk["metadata"], sort_keys=True) == json.dumps(hp["metadata"], sort_keys=True)
    assert hk["quantized"] == hp["quantized"] and hk["seed"] == seed
    assert len(data) <= len(plain)
    assert (minor(data) == 5) is (len(data) < len(plain))


def test_the_spec_holds_the_primer_and_the_known_answer():
    from pathlib import Path

    spec = (Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md").read_text()
    block = spec.split("The primer, 1558 bytes", 1)[1].split("```\n", 2)[1]
    assert "".join(block.splitlines()).encode() == hc.PRIMER
    assert KNOWN_STORED in spec and KNOWN_JSON.decode() in spec


def test_a_large_header_round_trips():
    # 1000 entries (~150 KB): the largest tables (2^20 slots), compiled kernel only
    header = {"quantized": [{"fqn": f"model.layers.{i // 7}.mlp.{i % 7}.weight", "shape": [384, 1536],
                             "indices": {"alphabet_size": 20 + i % 50, "length": 10000 + 37 * i},
                             "step": 1 / (i + 3)} for i in range(1000)]}
    data = canonical_json(header)
    stored = hc.compress_header(data)
    assert hc.table_bits(len(data)) == 20 and len(stored) < len(data) // 8
    assert hc.decompress_header(stored, len(data)) == data


def _spec_decode(stored: bytes) -> bytes:
    """A second decoder written from docs/FORMAT.md's text alone (*Compressed header*), with Python integers and
    dictionaries for the tables: it shares no code with the kernel, so it checks that the spec says what the code
    does."""
    assert stored[0] == 0 and stored[1] == 1
    length, shift = 0, 0
    pos = 2
    while True:
        byte = stored[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    stream = stored[pos:]
    points = [1, 2, 3, 6, 10, 16, 27, 45, 73, 120, 194, 310, 488, 747, 1101, 1546, 2047, 2549, 2994, 3348, 3607, 3785,
              3901, 3975, 4022, 4050, 4068, 4079, 4085, 4089, 4092, 4093, 4094]

    def squash(d):
        w, i = d & 127, (d >> 7) + 16
        return (points[i] * (128 - w) + points[i + 1] * w + 64) >> 7

    def stretch(p):
        return next((d for d in range(-2047, 2048) if squash(d) >= p), 2047)

    stretch_table = [stretch(p) for p in range(4096)]
    orders = [0, 1, 2, 3, 4, 6]
    b = min(20, max(16, length.bit_length() + 6))
    q = [dict() for _ in orders]  # slot -> probability; absent: 32768
    n = [dict() for _ in orders]
    w = {}
    history = []
    state = {"x1": 0, "x2": 2**32 - 1, "x": 0, "read": 0, "shifts": 0}

    def next_byte():
        i = state["read"]
        state["read"] += 1
        return stream[i] if i < len(stream) else 255

    def model_byte(value=None):  # value None: decode one byte; else learn it (priming)
        hashes = []
        for o in orders:
            h = o
            for j in range(o):
                h = ((h * 16777619) ^ (history[j] if j < len(history) else 0)) & 0xFFFFFFFF
            hashes.append(h)
        c = 1
        for bit in range(7, -1, -1):
            slots = [((((h ^ (c * 0x9E3779B1)) & 0xFFFFFFFF) * 0x2545F491) & 0xFFFFFFFF) >> (32 - b) for h in hashes]
            t = [stretch_table[q[m].get(s, 32768) >> 4] for m, s in enumerate(slots)]
            d = sum(w.get((c, m), 22000) * t[m] for m in range(len(orders))) >> 16
            p = squash(min(2047, max(-2047, d)))
            if value is None:
                pc = min(max(p, 1), 4095)
                xm = state["x1"] + ((state["x2"] - state["x1"]) >> 12) * pc
                y = 1 if state["x"] <= xm else 0
                if y:
                    state["x2"] = xm
                else:
                    state["x1"] = xm + 1
                while (state["x1"] ^ state["x2"]) & 0xFF000000 == 0:
                    assert state["read"] < len(stream) + 3, "a fourth byte past the end"
                    state["x1"] = (state["x1"] << 8) & 0xFFFFFFFF
                    state["x2"] = ((state["x2"] << 8) & 0xFFFFFFFF) | 255
                    state["x"] = ((state["x"] << 8) & 0xFFFFFFFF) | next_byte()
                    state["shifts"] += 1
            else:
                y = (value >> bit) & 1
            e = ((y << 12) - p) * 4
            for m, s in enumerate(slots):
                w[(c, m)] = min(2**20, max(-(2**20), w.get((c, m), 22000) + ((t[m] * e + 512) >> 10)))
                old = q[m].get(s, 32768)
                count = n[m].get(s, 0)
                q[m][s] = old + ((((y << 16) - old) * (131072 // (2 * count + 3))) >> 16)
                if count < 30:
                    n[m][s] = count + 1
            c = 2 * c + y
        history.insert(0, c - 256)
        return c - 256

    for byte in hc.PRIMER:
        model_byte(byte)
    for _ in range(4):
        state["x"] = (state["x"] << 8) | next_byte()
    out = bytes(model_byte() for _ in range(length))
    assert state["shifts"] == len(stream) - 1 and stream[-1] == state["x1"] >> 24
    return out


def test_an_implementation_of_the_spec_decodes_the_known_answer():
    assert _spec_decode(bytes.fromhex(KNOWN_STORED)) == KNOWN_JSON
    other = canonical_json({"config": {"fallback": "module_swap"}, "metadata": {"note": "\u00e9t\u00e9"}, "seed": 3})
    assert _spec_decode(hc.compress_header(other)) == other

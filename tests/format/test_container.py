"""The .udnc container: round trips, determinism, atomic writes, header-only reads, every error kind, a golden file."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np
import pytest

from udnc_fx.coding import container as C
from udnc_fx.coding.container import (
    MAGIC,
    PREAMBLE_SIZE,
    Container,
    QuantizedTensor,
    RawTensor,
    encode_container,
    read_container,
    read_header,
    section_sizes,
    write_container,
)
from udnc_fx.errors import FormatError

STAND_IN = "test-le32-v0"
try:
    from udnc_fx.coding import coders as _coders  # noqa: F401

    REAL_CODERS = _coders.available_coders()
except ImportError:  # the coder registry is written alongside; until it lands only the stand-in runs
    REAL_CODERS = []


class LE32Coder:
    """Stand-in coder: indices as little-endian u32 (no compression), strict about its input."""

    def encode(self, symbols, alphabet_size):
        return np.asarray(symbols, dtype="<u4").tobytes()

    def decode(self, data, count, alphabet_size):
        if len(data) != 4 * count:
            raise FormatError("bad_value", f"{len(data)} bytes for {count} symbols")
        return np.frombuffer(data, dtype="<u4").astype(np.int64)


_real_get_coder = C._get_coder


def _get_coder(name):
    return LE32Coder() if name == STAND_IN else _real_get_coder(name)


@pytest.fixture(autouse=True)
def stand_in_coder(monkeypatch):
    monkeypatch.setattr(C, "_get_coder", _get_coder)


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------


def make_container(coder=STAND_IN, *, lattice_int=False, seed=0) -> Container:
    rng = np.random.default_rng(seed)
    step = 0.05
    laplace = np.clip(np.round(rng.laplace(0, 2.0, 72)), -8, 8).astype(np.int64) + 8
    conv = QuantizedTensor(
        fqn="conv1.weight", shape=(8, 1, 3, 3), lattice="Z", n=1, step=step, key=1234, dither="udnc-hash32-v1",
        indices=laplace, codebook=(np.arange(-8, 9, dtype=np.float32) * np.float32(step))[:, None],
        codebook_int=np.arange(-8, 9, dtype=np.int64)[:, None] if lattice_int else None,
        coder=coder, zero_index=8, meta={"sqnr_db": 23.5, "note": "ünïcode ✓"},
    )
    fc_int = rng.integers(-300, 300, (5, 8)) * 2  # E8 points are stored doubled: even coordinates
    fc = QuantizedTensor(
        fqn="fc.weight", shape=(10, 7), lattice="E8", n=8, step=0.1, key=2**64 - 1, dither="udnc-hash32-v1",
        indices=rng.integers(0, 5, 9), codebook=rng.standard_normal((5, 8)).astype(np.float32),
        codebook_int=fc_int if lattice_int else None, coder=coder,
    )
    single = QuantizedTensor(
        fqn="emb.weight", shape=(3, 5), lattice="D4", n=4, step=1e-3, key=0, dither="udnc-hash32-v1",
        indices=np.zeros(4, np.int64), codebook=np.zeros((1, 4), np.float32),
        codebook_int=np.zeros((1, 4), np.int64) if lattice_int else None, coder=coder,
    )
    empty = QuantizedTensor(
        fqn="empty.weight", shape=(0, 4), lattice="A2", n=2, step=0.25, key=7, dither="udnc-hash32-v1",
        indices=np.zeros(0, np.uint8), codebook=np.zeros((2, 2), np.float32),
        codebook_int=np.zeros((2, 2), np.int64) if lattice_int else None, coder=coder,
    )
    raw = [
        RawTensor("conv1.bias", rng.standard_normal(8).astype(np.float32)),
        RawTensor("bn.num_batches_tracked", np.array(17, dtype=np.int64)),
        RawTensor("mask", rng.random((3, 3)) > 0.5),
        RawTensor("half", rng.standard_normal((2, 3)).astype(np.float16)),
        RawTensor("double", rng.standard_normal(4)),
        RawTensor("bytes", np.arange(5, dtype=np.uint8)),
        RawTensor("big_endian", np.arange(3, dtype=">i4")),
    ]
    config = {"version": 1, "step": 0.05, "layers": {"conv1": None, "fc": {"lattice": "E8"}}, "flags": [True, 2]}
    metadata = {"model": "tiny", "ünïcode": "✓", "nested": {"a": [1, 2.5, None]}}
    return Container(quantized=[conv, fc, single, empty], raw=raw, config=config, metadata=metadata)


def assert_same(decoded: Container, original: Container, *, raw_f16=False, codebook_f16=False) -> None:
    """Decoded content equals what was written, bit for bit (up to the requested float16 narrowing)."""
    assert len(decoded.quantized) == len(original.quantized)
    for d, o in zip(decoded.quantized, original.quantized):
        assert (d.fqn, d.shape, d.lattice, d.n, d.key, d.dither, d.coder, d.zero_index) == (
            o.fqn, tuple(o.shape), o.lattice, o.n, o.key, o.dither, o.coder, o.zero_index
        )
        assert struct.pack("<d", d.step) == struct.pack("<d", o.step)
        assert d.meta == o.meta
        assert d.indices.dtype == C._narrow_index_dtype(len(o.codebook))
        assert np.array_equal(d.indices, o.indices)
        if o.codebook_int is not None:
            assert d.codebook is None
            assert d.codebook_int.dtype == np.int64 and np.array_equal(d.codebook_int, o.codebook_int)
        else:
            assert d.codebook_int is None and d.codebook.dtype == np.float32
            want = o.codebook.astype(np.float16).astype(np.float32) if codebook_f16 else o.codebook
            assert d.codebook.tobytes() == np.ascontiguousarray(want, dtype=np.float32).tobytes()
    assert [r.name for r in decoded.raw] == [r.name for r in original.raw]
    for d, o in zip(decoded.raw, original.raw):
        want = o.array
        if raw_f16 and want.dtype == np.float32:
            want = want.astype(np.float16).astype(np.float32)
        assert d.array.dtype == want.dtype.newbyteorder("=") and d.array.shape == want.shape
        assert np.array_equal(d.array, want)
        assert d.array.flags.writeable
    assert decoded.config == original.config
    assert decoded.metadata == original.metadata


def split(data: bytes) -> tuple[dict, bytes]:
    header_length = struct.unpack_from("<Q", data, 12)[0]
    header = json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + header_length])
    return header, data[PREAMBLE_SIZE + header_length :]


def assemble(header: dict | bytes, payload: bytes, *, rehash_payload=True, major=1, minor=0) -> bytes:
    """A file from a (possibly crafted) header and payload, with valid checksums unless told otherwise."""
    if isinstance(header, dict):
        if rehash_payload:
            header = dict(header, payload_sha256=hashlib.sha256(payload).hexdigest())
        header = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    head = struct.pack("<8sHHQ", MAGIC, major, minor, len(header))
    return head + hashlib.sha256(head + header).digest() + header + payload


def expect(kind: str, data: bytes) -> FormatError:
    with pytest.raises(FormatError) as info:
        read_container(data)
    assert info.value.kind == kind, info.value
    return info.value


# ------------------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coder", [STAND_IN] + REAL_CODERS)
@pytest.mark.parametrize("codebook", ["f32", "f16", "lattice-int"])
def test_round_trip_bit_exact(coder, codebook):
    original = make_container(coder, lattice_int=codebook == "lattice-int")
    data = encode_container(original, codebook_float_dtype="float16" if codebook == "f16" else "float32")
    decoded = read_container(data)
    assert_same(decoded, original, codebook_f16=codebook == "f16")
    header = read_header(data)
    assert {q["codebook"]["encoding"] for q in header["quantized"]} == {codebook}


def test_raw_float16_storage_is_recorded_and_read_back_as_float32():
    original = make_container()
    data = encode_container(original, raw_float_dtype="float16")
    raws = {r["name"]: r for r in read_header(data)["raw"]}
    assert raws["conv1.bias"]["dtype"] == "float16" and raws["conv1.bias"]["source_dtype"] == "float32"
    assert raws["half"]["dtype"] == "float16" and "source_dtype" not in raws["half"]  # was float16 already
    assert raws["double"]["dtype"] == "float64"  # only float32 is narrowed
    assert_same(read_container(data), original, raw_f16=True)
    assert raws["conv1.bias"]["data"]["length"] == 2 * 8


def test_lattice_int_uses_the_narrowest_width():
    header = read_header(encode_container(make_container(lattice_int=True)))
    widths = {q["fqn"]: q["codebook"]["width"] for q in header["quantized"]}
    assert widths == {"conv1.weight": 1, "fc.weight": 2, "emb.weight": 1, "empty.weight": 1}
    extreme = np.array([[np.iinfo(np.int64).min], [np.iinfo(np.int64).max], [0]])
    q = make_container().quantized[0]
    q.shape, q.indices, q.codebook_int, q.zero_index = (3,), np.arange(3), extreme, None
    data = encode_container(Container([q], [], {}, {}))
    assert read_header(data)["quantized"][0]["codebook"]["width"] == 8
    assert np.array_equal(read_container(data).quantized[0].codebook_int, extreme)


def test_default_coder_is_the_registry_default():
    if not REAL_CODERS:
        pytest.skip("udnc_fx.coding.coders is not there yet")
    assert C.DEFAULT_CODER == _coders.DEFAULT_CODER == QuantizedTensor("w", (1,), "Z", 1, 1.0, 0, "d", None, None).coder


def test_reads_paths_bytes_and_file_objects(tmp_path):
    original = make_container()
    path = tmp_path / "m.udnc"
    n = write_container(path, original)
    assert n == path.stat().st_size
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), memoryview(path.read_bytes())):
        assert_same(read_container(source), original)
    with open(path, "rb") as f:
        assert_same(read_container(f), original)
    import io

    buf = io.BytesIO()
    assert write_container(buf, original) == n
    assert buf.getvalue() == path.read_bytes()


def test_identical_inputs_give_identical_bytes(tmp_path):
    a = encode_container(make_container())
    b = encode_container(make_container())
    assert a == b
    shuffled = make_container()
    shuffled.config = dict(reversed(list(shuffled.config.items())))  # insertion order does not matter
    assert encode_container(shuffled) == a
    write_container(tmp_path / "1.udnc", make_container())
    write_container(tmp_path / "2.udnc", make_container())
    assert (tmp_path / "1.udnc").read_bytes() == (tmp_path / "2.udnc").read_bytes() == a
    assert encode_container(make_container(seed=1)) != a


def test_unknown_keys_and_minor_versions_are_accepted():
    original = make_container()
    header, payload = split(encode_container(original))
    header["future"] = {"anything": [1, 2]}
    header["quantized"][0]["future"] = 1
    header["quantized"][1]["indices"]["future"] = "x"
    header["raw"][0]["data"]["future"] = None
    assert_same(read_container(assemble(header, payload, minor=7)), original)


# ------------------------------------------------------------------------------------------------------------------
# Atomic writes, header-only reads, accounting
# ------------------------------------------------------------------------------------------------------------------


def test_atomic_write_leaves_only_the_target(tmp_path):
    target = tmp_path / "model.udnc"
    write_container(target, make_container())
    write_container(target, make_container(seed=3))  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["model.udnc"]
    assert_same(read_container(target), make_container(seed=3))


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "model.udnc"
    write_container(target, make_container())
    before = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(C.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_container(target, make_container(seed=5))
    assert sorted(os.listdir(tmp_path)) == ["model.udnc"] and target.read_bytes() == before
    bad = make_container()
    bad.quantized[0].indices = bad.quantized[0].indices[:-1]
    with pytest.raises(FormatError):  # refused before any file is created
        write_container(tmp_path / "other.udnc", bad)
    assert sorted(os.listdir(tmp_path)) == ["model.udnc"]


def test_read_header_does_not_touch_the_payload(tmp_path, monkeypatch):
    data = bytearray(encode_container(make_container()))
    data[-1] ^= 0xFF  # payload damaged: only a full read can notice
    path = tmp_path / "m.udnc"
    path.write_bytes(bytes(data))

    class NoDecode(LE32Coder):
        def decode(self, *args):
            raise AssertionError("read_header decoded a payload")

    monkeypatch.setattr(C, "_get_coder", lambda name: NoDecode())
    for source in (path, bytes(data)):
        header = read_header(source)
        assert [q["fqn"] for q in header["quantized"]] == ["conv1.weight", "fc.weight", "emb.weight", "empty.weight"]
    monkeypatch.setattr(C, "_get_coder", _get_coder)
    expect("checksum_mismatch", bytes(data))
    with pytest.raises(FormatError) as info:  # but header-level truncation is still seen
        read_header(bytes(data[:-1]))
    assert info.value.kind == "truncated"


def test_section_sizes_account_for_every_byte():
    data = encode_container(make_container())
    sizes = section_sizes(read_header(data))
    assert sizes["file"] == len(data)
    assert sizes["shared"]["total"] + sum(t["total"] for t in sizes["tensors"].values()) == len(data)
    conv = sizes["tensors"]["conv1.weight"]
    assert conv["kind"] == "quantized" and conv["indices"] == 4 * 72 and conv["codebook"] == 4 * 17
    bias = sizes["tensors"]["conv1.bias"]
    assert bias == {"kind": "raw", "data": 32, "header": bias["header"], "total": 32 + bias["header"]}
    assert bias["header"] == len(json.dumps(split(data)[0]["raw"][0], sort_keys=True, separators=(",", ":")))
    with pytest.raises(FormatError):
        section_sizes({"quantized": "nope"})


# ------------------------------------------------------------------------------------------------------------------
# Every error kind, from crafted files
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def good() -> bytes:
    return encode_container(make_container())


def test_bad_magic(good):
    expect("bad_magic", b"PK\x03\x04" + good[4:])
    expect("bad_magic", b"\x89UDNX")
    expect("bad_magic", b"{}" * 40)


def test_unsupported_version(good):
    header, payload = split(good)
    err = expect("unsupported_version", assemble(header, payload, major=2))
    assert "2.0" in str(err)
    expect("unsupported_version", good[:8] + b"\x00\x00" + good[10:])


def test_truncated(good):
    header_end = PREAMBLE_SIZE + struct.unpack_from("<Q", good, 12)[0]
    for cut in (0, 3, 8, 20, 51, PREAMBLE_SIZE + 10, header_end, header_end + 1, len(good) - 1):
        expect("truncated", good[:cut])


def test_bad_header(good):
    header, payload = split(good)
    head = good[:12]
    expect("bad_header", head + struct.pack("<Q", 0) + good[20:])
    expect("bad_header", head + struct.pack("<Q", C.MAX_HEADER_LENGTH + 1) + good[20:])
    expect("bad_header", head + struct.pack("<Q", 2**64 - 1) + good[20:])
    for text in (b"not json", b"[1, 2]", b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff\xfe{}", b"[" * 100000):
        expect("bad_header", assemble(text, payload))

    def crafted(mutate):
        h = json.loads(json.dumps(header))
        mutate(h)
        return assemble(h, payload)

    expect("bad_header", crafted(lambda h: h.pop("payload_length")))
    expect("bad_header", crafted(lambda h: h.pop("config")))
    expect("bad_header", crafted(lambda h: h.update(quantized={})))
    expect("bad_header", crafted(lambda h: h["quantized"][0].pop("step")))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(shape="8x1")))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(shape=[8, 1.0, 3, 3])))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(n=True)))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(step="0.05")))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(key="4d2")))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(key="00000000000004D2")))
    expect("bad_header", crafted(lambda h: h["quantized"][0]["indices"].update(crc32=2**32)))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(codebook=[])))
    expect("bad_header", crafted(lambda h: h["raw"][0].update(data=None)))
    expect("bad_header", crafted(lambda h: h["raw"].append(3)))
    h = json.loads(json.dumps(header))
    expect("bad_header", assemble(dict(h, payload_sha256="00"), payload, rehash_payload=False))


def test_bad_offsets(good):
    header, payload = split(good)

    def crafted(mutate, payload=payload):
        h = json.loads(json.dumps(header))
        mutate(h)
        return assemble(h, payload)

    expect("bad_offsets", crafted(lambda h: h["quantized"][0]["indices"].update(offset=-1)))
    expect("bad_offsets", crafted(lambda h: h["raw"][0]["data"].update(length=-4)))
    def shift(section, by):
        section["offset"] += by

    expect("bad_offsets", crafted(lambda h: shift(h["quantized"][1]["indices"], -4)))  # overlap
    expect("bad_offsets", crafted(lambda h: shift(h["quantized"][0]["codebook"], 4)))  # hole
    expect("bad_offsets", crafted(lambda h: h["raw"][-1]["data"].update(offset=10**12)))  # outside
    length = header["payload_length"]
    expect("bad_offsets", crafted(lambda h: h.update(payload_length=length + 8), payload + bytes(8)))  # hole at end
    expect("bad_offsets", crafted(lambda h: h.update(payload_length=length - 1)))  # last section sticks out
    expect("bad_offsets", crafted(lambda h: h.update(payload_length=-1)))
    expect("bad_offsets", good + b"\x00")  # trailing bytes


def test_checksum_mismatch(good):
    header_length = struct.unpack_from("<Q", good, 12)[0]
    header_end = PREAMBLE_SIZE + header_length
    for position in (25, 51, PREAMBLE_SIZE + 5, header_end - 1, header_end, len(good) - 1):
        damaged = bytearray(good)
        damaged[position] ^= 0x01
        expect("checksum_mismatch", bytes(damaged))
    expect("checksum_mismatch", good[:10] + b"\x07\x00" + good[12:])  # the minor version is covered too
    header, payload = split(good)
    # a consistent payload digest but a wrong section CRC: the CRC is checked on its own
    h = json.loads(json.dumps(header))
    h["raw"][0]["data"]["crc32"] ^= 1
    err = expect("checksum_mismatch", assemble(h, payload))
    assert "conv1.bias" in str(err)
    # a payload that matches no recorded digest names the damaged section
    damaged = bytearray(payload)
    damaged[header["raw"][1]["data"]["offset"]] ^= 0x80
    err = expect("checksum_mismatch", assemble(header, bytes(damaged), rehash_payload=False))
    assert "bn.num_batches_tracked" in str(err)


def test_bad_value(good, monkeypatch):
    header, payload = split(good)

    def crafted(mutate):
        h = json.loads(json.dumps(header))
        mutate(h)
        return assemble(h, payload)

    q0 = lambda h: h["quantized"][0]  # noqa: E731
    expect("bad_value", crafted(lambda h: q0(h).update(shape=[8, 1, 3, 4])))  # count no longer matches
    expect("bad_value", crafted(lambda h: q0(h)["indices"].update(count=71)))
    expect("bad_value", crafted(lambda h: q0(h).update(lattice="E9")))
    expect("bad_value", crafted(lambda h: q0(h).update(lattice="D4")))  # n = 1 mismatch
    expect("bad_value", crafted(lambda h: q0(h).update(n=2)))
    expect("bad_value", crafted(lambda h: q0(h)["indices"].update(alphabet_size=0)))
    expect("bad_value", crafted(lambda h: q0(h)["indices"].update(alphabet_size=16)))  # codebook length mismatch
    expect("bad_value", crafted(lambda h: q0(h).update(zero_index=17)))
    expect("bad_value", crafted(lambda h: q0(h).update(zero_index=-1)))
    expect("bad_value", crafted(lambda h: q0(h).update(step=0.0)))
    expect("bad_value", crafted(lambda h: q0(h).update(step=-0.05)))
    expect("bad_value", crafted(lambda h: q0(h).update(step=10**400)))
    expect("bad_value", crafted(lambda h: q0(h).update(shape=[-8, -1, 3, 3])))
    expect("bad_value", crafted(lambda h: q0(h).update(shape=[1] * 33)))
    expect("bad_value", crafted(lambda h: h["quantized"][1].update(fqn="conv1.weight")))
    expect("bad_value", crafted(lambda h: h["raw"][0].update(name="fc.weight")))
    expect("bad_value", crafted(lambda h: h["raw"][0].update(shape=[9])))
    expect("bad_value", crafted(lambda h: h["quantized"][2]["codebook"].update(encoding="lattice-int", width=3)))
    # a huge tensor whose coded stream is tiny: refused from the header, nothing allocated
    def huge(h):
        h["quantized"][2]["shape"] = [2**40]
        h["quantized"][2]["indices"]["count"] = 2**38  # consistent with n = 4: only the element cap refuses it

    assert "more than" in str(expect("bad_value", crafted(huge)))
    with pytest.raises(FormatError) as info:
        read_container(good, max_elements=100)
    assert info.value.kind == "bad_value"
    # bool bytes other than 0/1
    h = json.loads(json.dumps(header))
    mask = h["raw"][2]["data"]
    forged = bytearray(payload)
    forged[mask["offset"]] = 2
    mask["crc32"] = zlib.crc32(bytes(forged[mask["offset"] : mask["offset"] + mask["length"]]))
    expect("bad_value", assemble(h, bytes(forged)))

    # a coder that misbehaves (out-of-range symbols, wrong count, crashes) is contained
    class Liar(LE32Coder):
        def __init__(self, result):
            self.result = result

        def decode(self, data, count, alphabet_size):
            if isinstance(self.result, Exception):
                raise self.result
            return self.result(count)

    for result in (lambda c: np.full(c, 10**6), lambda c: np.zeros(c + 1), lambda c: np.zeros(c, np.float32),
                   lambda c: "junk", KeyError("x"), MemoryError(), FormatError("truncated", "short")):
        monkeypatch.setattr(C, "_get_coder", lambda name, r=result: Liar(r))
        expect("bad_value", good)


def test_unknown_codec(good):
    header, payload = split(good)

    def crafted(mutate):
        h = json.loads(json.dumps(header))
        mutate(h)
        return assemble(h, payload)

    expect("unknown_codec", crafted(lambda h: h["quantized"][0]["indices"].update(coder="nope-v9")))
    expect("unknown_codec", crafted(lambda h: h["quantized"][0]["codebook"].update(encoding="bf16")))
    expect("unknown_codec", crafted(lambda h: h["raw"][0].update(dtype="complex64")))
    expect("unknown_codec", crafted(lambda h: h["raw"][0].update(source_dtype="float64")))


def test_writer_refuses_inconsistent_input():
    def refused(kind, mutate, **options):
        c = make_container()
        mutate(c)
        with pytest.raises(FormatError) as info:
            encode_container(c, **options)
        assert info.value.kind == kind, info.value

    q0 = lambda c: c.quantized[0]  # noqa: E731
    refused("bad_value", lambda c: setattr(q0(c), "indices", q0(c).indices[:-1]))
    refused("bad_value", lambda c: setattr(q0(c), "indices", q0(c).indices + 17))
    refused("bad_value", lambda c: setattr(q0(c), "indices", q0(c).indices.astype(np.float32)))
    refused("bad_value", lambda c: setattr(q0(c), "lattice", "E9"))
    refused("bad_value", lambda c: setattr(q0(c), "n", 2))
    refused("bad_value", lambda c: setattr(q0(c), "step", float("nan")))
    refused("bad_value", lambda c: setattr(q0(c), "key", -1))
    refused("bad_value", lambda c: setattr(q0(c), "key", 2**64))
    refused("bad_value", lambda c: setattr(q0(c), "zero_index", 17))
    refused("bad_value", lambda c: setattr(q0(c), "codebook", np.zeros((0, 1), np.float32)))
    refused("bad_value", lambda c: setattr(q0(c), "codebook", np.full((17, 1), 0.1)))  # float64 not exact in f32
    big = np.full((17, 1), 1e6, np.float32)
    refused("bad_value", lambda c: setattr(q0(c), "codebook", big), codebook_float_dtype="float16")
    refused("bad_value", lambda c: setattr(q0(c), "meta", {"x": float("nan")}))
    refused("bad_value", lambda c: setattr(q0(c), "meta", {1: "int key"}))
    refused("bad_value", lambda c: setattr(c, "config", {"x": object()}))
    refused("bad_value", lambda c: c.raw.append(RawTensor("conv1.weight", np.zeros(1))))
    refused("bad_value", lambda c: c.raw.append(RawTensor("big", big[:2, 0])), raw_float_dtype="float16")
    refused("bad_value", lambda c: None, raw_float_dtype="bfloat16")
    refused("unknown_codec", lambda c: c.raw.append(RawTensor("c", np.zeros(2, np.complex64))))
    refused("unknown_codec", lambda c: setattr(q0(c), "coder", "nope-v9"))
    circular: dict = {}
    circular["self"] = circular
    refused("bad_value", lambda c: setattr(c, "metadata", circular))
    # float64 codebooks that float32 holds exactly, and NumPy scalars in meta, are fine
    c = make_container()
    q0(c).codebook = q0(c).codebook.astype(np.float64)
    q0(c).meta = {"sqnr_db": np.float32(23.5), "k": np.int64(3)}
    assert read_container(encode_container(c)).quantized[0].meta == {"sqnr_db": 23.5, "k": 3}


# ------------------------------------------------------------------------------------------------------------------
# Golden file: pins the byte layout (stand-in coder, so it depends on the container alone)
# ------------------------------------------------------------------------------------------------------------------


def golden_container() -> Container:
    q = QuantizedTensor(
        fqn="w", shape=(2, 3), lattice="Z", n=1, step=0.5, key=1, dither="udnc-hash32-v1",
        indices=np.array([0, 1, 2, 1, 0, 2]), codebook=np.array([[-0.5], [0.0], [0.5]], np.float32),
        coder=STAND_IN, zero_index=1,
    )
    return Container([q], [RawTensor("b", np.array([1.0, -2.0], np.float32))], {"version": 1}, {"note": "golden"})


GOLDEN_HEX = (
    "8955444e430d0a1a010000003e02000000000000528ab40b252cde1ca72e5297a2b5bbb6f4bdbb0d7fe2fe8a6c66aa5e1ce681677b22636f"
    "6e666967223a7b2276657273696f6e223a317d2c226d65746164617461223a7b226e6f7465223a22676f6c64656e227d2c227061796c6f61"
    "645f6c656e677468223a34342c227061796c6f61645f736861323536223a2266623131343634306663636335383639386663363539646133"
    "363137366363393831326339616537653338356138326332653031343366396664643165386231222c227175616e74697a6564223a5b7b22"
    "636f6465626f6f6b223a7b226372633332223a313531373231363739382c22656e636f64696e67223a22663332222c226c656e677468223a"
    "31322c226f6666736574223a32347d2c22646974686572223a2275646e632d6861736833322d7631222c2266716e223a2277222c22696e64"
    "69636573223a7b22616c7068616265745f73697a65223a332c22636f646572223a22746573742d6c6533322d7630222c22636f756e74223a"
    "362c226372633332223a313839303231303031372c226c656e677468223a32342c226f6666736574223a307d2c226b6579223a2230303030"
    "303030303030303030303031222c226c617474696365223a225a222c226e223a312c227368617065223a5b322c335d2c2273746570223a30"
    "2e352c227a65726f5f696e646578223a317d5d2c22726177223a5b7b2264617461223a7b226372633332223a333238303431343239342c22"
    "6c656e677468223a382c226f6666736574223a33367d2c226474797065223a22666c6f61743332222c226e616d65223a2262222c22736861"
    "7065223a5b325d7d5d7d000000000100000002000000010000000000000002000000000000bf000000000000003f0000803f000000c0"
)


def test_golden_bytes():
    data = encode_container(golden_container())
    assert data.hex() == GOLDEN_HEX
    assert data[:8] == b"\x89UDNC\r\n\x1a" and data[8:12] == b"\x01\x00\x00\x00"
    # the payload, built by hand from the spec: u32 indices, f32 codebook, f32 raw tensor, back to back
    payload = np.array([0, 1, 2, 1, 0, 2], "<u4").tobytes() + np.array([-0.5, 0, 0.5], "<f4").tobytes()
    payload += np.array([1.0, -2.0], "<f4").tobytes()
    assert data.endswith(payload) and len(data) == 670
    assert split(data)[0]["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert_same(read_container(bytes.fromhex(GOLDEN_HEX)), golden_container())


def test_truncation_is_reported_before_value_checks(good):
    header, payload = split(good)
    h = json.loads(json.dumps(header))
    h["quantized"][0]["indices"]["coder"] = "nope-v9"
    expect("unknown_codec", assemble(h, payload))
    expect("truncated", assemble(h, payload)[:-1])  # the order of docs/FORMAT.md's table

"""The .udnc container: round trips, determinism, atomic writes, header-only reads, every error kind, a golden file."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from udnc_fx.coding import container as C
from udnc_fx.coding import coders, lattice_coords
from udnc_fx.coding import format as fmt
from udnc_fx.coding import header as hdr
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
REAL_CODERS = coders.available_coders()


class LE32Coder:
    """Stand-in coder: indices as little-endian u32 (no compression), strict about its input."""

    def encode(self, symbols, alphabet_size):
        return np.asarray(symbols, dtype="<u4").tobytes()

    def decode(self, data, count, alphabet_size):
        if len(data) != 4 * count:
            raise FormatError("bad_value", f"{len(data)} bytes for {count} symbols")
        return np.frombuffer(data, dtype="<u4").astype(np.int64)


_real_get_coder = coders.get_coder


def _get_coder(name):
    return LE32Coder() if name == STAND_IN else _real_get_coder(name)


@pytest.fixture(autouse=True)
def stand_in_coder(monkeypatch):
    # Every coder lookup of the container (fmt.lookup_coder) asks the registry by name at call time.
    monkeypatch.setattr(coders, "get_coder", _get_coder)


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------


def e8_points(rng, k: int, spread: int) -> np.ndarray:
    """``k`` random E8 points in integer coordinates (twice the point): one parity per row, sum divisible by 4."""
    r = rng.integers(-spread, spread + 1, (k, 8))
    r[:, 7] += r.sum(axis=1) % 2  # sum(c) = 2 sum(r) + 8 parity: divisible by 4 when sum(r) is even
    c = 2 * r + rng.integers(0, 2, (k, 1))
    assert not fmt.non_members("E8", c).any()
    return c


def d4_points(rng, k: int, spread: int) -> np.ndarray:
    c = rng.integers(-spread, spread + 1, (k, 4))
    c[:, 3] += c.sum(axis=1) % 2
    assert not fmt.non_members("D4", c).any()
    return c


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
    fc_int = e8_points(rng, 5, 150)
    fc = QuantizedTensor(
        fqn="fc.weight", shape=(10, 7), lattice="E8", n=8, step=0.1, key=2**64 - 1, dither="udnc-hash32-v1",
        indices=rng.integers(0, 5, 9), codebook=rng.standard_normal((5, 8)).astype(np.float32),
        codebook_int=fc_int if lattice_int else None, coder=coder,
    )
    single = QuantizedTensor(
        fqn="emb.weight", shape=(3, 5), lattice="D4", n=4, step=1e-3, key=0, dither="none",
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


def big_codebook_container(lattice: str, k: int = 300, seed: int = 0) -> Container:
    """One tensor whose integer codebook is large and concentrated: entropy coding it wins."""
    rng = np.random.default_rng(seed)
    n = {"Z": 3, "A2": 2, "D4": 4, "E8": 8}[lattice]
    if lattice == "E8":
        cb = e8_points(rng, k, 1)
    elif lattice == "D4":
        cb = d4_points(rng, k, 2)
    else:
        cb = np.clip(np.round(rng.laplace(0, 1.0, (k, n))), -4, 4).astype(np.int64)
    q = QuantizedTensor(
        fqn="w", shape=(k, n), lattice=lattice, n=n, step=0.125, key=5, dither="udnc-hash32-v1",
        indices=rng.integers(0, k, k), codebook=None, codebook_int=cb, coder=STAND_IN,
    )
    return Container([q], [], {}, {})


def assert_same(decoded: Container, original: Container, *, raw_f16=False, codebook_f16=False) -> None:
    """Decoded content equals what was written, bit for bit (up to the requested float16 narrowing)."""
    assert len(decoded.quantized) == len(original.quantized)
    for d, o in zip(decoded.quantized, original.quantized):
        assert (d.fqn, d.shape, d.lattice, d.n, d.key, d.dither, d.coder, d.zero_index) == (
            o.fqn, tuple(o.shape), o.lattice, o.n, o.key, o.dither, o.coder, o.zero_index
        )
        assert struct.pack("<d", d.step) == struct.pack("<d", o.step)
        assert d.meta == o.meta
        k = len(o.codebook_int) if o.codebook_int is not None else len(o.codebook)
        assert d.indices.dtype == fmt.narrow_index_dtype(k)
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


def header_length_of(data: bytes) -> int:
    return struct.unpack_from("<I", data, 12)[0]


def split(data: bytes) -> tuple[dict, bytes]:
    """The stored (compact) header JSON and the payload."""
    header_length = header_length_of(data)
    header = json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + header_length])
    return header, data[PREAMBLE_SIZE + header_length :]


def assemble(
    header: dict | bytes, payload: bytes, *, major=1, minor=0, payload_length=None, payload_sha256=None
) -> bytes:
    """A file from a (possibly crafted) header and payload, with valid digests unless told otherwise."""
    if isinstance(header, dict):
        header = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    head = struct.pack(
        "<8sHHIQ32s", MAGIC, major, minor, len(header), len(payload) if payload_length is None else payload_length,
        hashlib.sha256(payload).digest() if payload_sha256 is None else payload_sha256,
    )
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
    encodings = {q["codebook"]["encoding"] for q in read_header(data)["quantized"]}
    assert encodings == {codebook} or codebook == "lattice-int" and encodings <= {"lattice-int", "lattice-int-coded"}


def test_raw_float16_storage_is_recorded_and_read_back_as_float32():
    original = make_container()
    data = encode_container(original, raw_float_dtype="float16")
    stored = split(data)[0]
    assert stored["raw_float16"] is True  # one flag for the file ...
    assert stored["raw"][0] == ["conv1.bias", [8]]  # ... not per entry
    assert stored["raw"][3] == ["half", [2, 3], "float16"]  # a float16 tensor names its dtype
    raws = {r["name"]: r for r in read_header(data)["raw"]}
    assert raws["conv1.bias"]["dtype"] == "float16" and raws["conv1.bias"]["source_dtype"] == "float32"
    assert raws["half"]["dtype"] == "float16" and "source_dtype" not in raws["half"]  # was float16 already
    assert raws["double"]["dtype"] == "float64"  # only float32 is narrowed
    assert_same(read_container(data), original, raw_f16=True)
    assert raws["conv1.bias"]["data"]["length"] == 2 * 8


def test_fixed_width_lattice_int_uses_the_narrowest_width():
    header = read_header(encode_container(make_container(lattice_int=True)))
    codebooks = {q["fqn"]: q["codebook"] for q in header["quantized"]}
    # these are too small for entropy coding to pay: fixed width, 1 byte (the default, not stored)
    for fqn in ("conv1.weight", "emb.weight", "empty.weight"):
        assert codebooks[fqn]["encoding"] == "lattice-int" and codebooks[fqn]["width"] == 1
    header = split(encode_container(make_container(lattice_int=True)))[0]
    assert header["codebook_encoding"] == "lattice-int"  # three of the four: the file's default, named once
    assert ["codebook" in q for q in header["quantized"]] == [False, True, False, False]
    for values, width in (([[300], [-300], [0]], 2), ([[2**20], [0], [1]], 4)):
        q = make_container().quantized[0]
        q.shape, q.indices, q.codebook_int, q.zero_index = (3,), np.arange(3), np.array(values), None
        data = encode_container(Container([q], [], {}, {}))
        assert split(data)[0]["quantized"][0]["codebook"] == {"encoding": "lattice-int", "width": width}
        assert "codebook_encoding" not in split(data)[0]  # a width is not the default: no file-level encoding
        assert np.array_equal(read_container(data).quantized[0].codebook_int, values)
    extreme = np.array([[np.iinfo(np.int64).min], [np.iinfo(np.int64).max], [0]])
    q.codebook_int = extreme
    data = encode_container(Container([q], [], {}, {}))
    assert read_header(data)["quantized"][0]["codebook"]["width"] == 8
    assert np.array_equal(read_container(data).quantized[0].codebook_int, extreme)


@pytest.mark.parametrize("lattice", ["Z", "A2", "D4", "E8"])
def test_large_integer_codebooks_are_entropy_coded(lattice):
    original = big_codebook_container(lattice)
    data = encode_container(original)
    codebook = read_header(data)["quantized"][0]["codebook"]
    assert codebook["encoding"] == "lattice-int-coded" and codebook["coder"] == C.FORMAT_DEFAULT_CODEBOOK_CODER
    k, n = original.quantized[0].codebook_int.shape
    assert codebook["length"] < k * n / 2  # several-fold smaller than one byte per coordinate
    assert_same(read_container(data), original)
    stored = split(data)[0]["quantized"][0]["codebook"]
    assert set(stored) == {"encoding", "alphabet_size", "length"}  # the default coder is not stored


def test_the_writer_keeps_the_smaller_codebook_encoding():
    """Whichever of fixed width and coded gives the smaller file (section plus its header object) is written."""
    for lattice in ("Z", "A2", "D4", "E8"):
        for k in (1, 2, 5, 12, 40, 200):
            q = big_codebook_container(lattice, k=k, seed=k).quantized[0]
            chosen = encode_container(Container([q], [], {}, {}))
            c = q.codebook_int.astype(np.int64)
            z = lattice_coords.zigzag_encode(c)
            width = next(w for w in (1, 2, 4, 8) if int(z.max()) < 1 << (8 * w))
            fixed_object = hdr.compact_codebook({"encoding": "lattice-int", "width": width})
            fixed = width * c.size + len(fmt.canonical_json(fixed_object))
            symbols = lattice_coords.point_symbols(lattice, c)
            alphabet = int(symbols.max()) + 1
            coded = fmt.lookup_coder(C.FORMAT_DEFAULT_CODEBOOK_CODER).encode(symbols.ravel(), alphabet)
            coded_object = {"alphabet_size": alphabet, "encoding": "lattice-int-coded", "length": len(coded)}
            coded_cost = len(coded) + len(fmt.canonical_json(coded_object))
            got = read_header(chosen)["quantized"][0]["codebook"]["encoding"]
            assert got == ("lattice-int-coded" if coded_cost < fixed else "lattice-int"), (lattice, k)


# Known answers for the lattice-int-coded symbol rows (docs/FORMAT.md).
SYMBOL_VECTORS = [
    ("Z", [[0, -1, 1, -2]], [[0, 1, 2, 3]]),
    ("A2", [[3, -2]], [[6, 3]]),
    ("D4", [[1, -1, 2, 0]], [[2, 1, 4, 0]]),
    ("D4", [[1, 0, 0, -3]], [[2, 0, 0, 3]]),
    ("E8", [[1, 1, 1, 1, 1, 1, 1, 1]], [[1, 0, 0, 0, 0, 0, 0, 0, 0]]),
    ("E8", [[-1, -1, 1, 1, 1, 1, 1, 1]], [[1, 1, 1, 0, 0, 0, 0, 0, 0]]),
    ("E8", [[2, 0, 0, 0, 0, 0, 0, -2]], [[0, 2, 0, 0, 0, 0, 0, 0, 1]]),
    ("E8", [[0, 0, 0, 0, 0, 0, 0, 4]], [[0, 0, 0, 0, 0, 0, 0, 0, 2]]),
]


@pytest.mark.parametrize("lattice, coordinates, symbols", SYMBOL_VECTORS)
def test_codebook_symbol_known_answers(lattice, coordinates, symbols):
    c = np.array(coordinates, np.int64)
    assert lattice_coords.point_symbols(lattice, c).tolist() == symbols
    back = lattice_coords.points_from_symbols(lattice, np.array(symbols, np.uint64), "test")
    assert back.tolist() == coordinates


@pytest.mark.parametrize("lattice", ["Z", "A2", "D4", "E8"])
def test_codebook_symbols_invert_on_every_lattice_point(lattice):
    c = big_codebook_container(lattice, k=500).quantized[0].codebook_int
    c = np.concatenate([c, 1000 * c, -c])  # scaled and negated lattice points are lattice points too
    s = lattice_coords.point_symbols(lattice, c)
    assert s.min() >= 0 and s.shape == (len(c), fmt.coded_row_symbols(lattice, c.shape[1]))
    assert np.array_equal(lattice_coords.points_from_symbols(lattice, s.astype(np.uint64), "test"), c)
    assert not fmt.non_members(lattice, c).any()


def test_the_format_defaults_are_registered_coders():
    """The coders a file names by default (indices, coded codebooks) are always there: constriction is a
    dependency, and a missing one must fail here rather than skip the tests that use them."""
    assert {C.FORMAT_DEFAULT_CODER, C.FORMAT_DEFAULT_CODEBOOK_CODER, "zlib-v1"} <= set(REAL_CODERS)


def test_default_coder_is_the_registry_default():
    assert C.DEFAULT_CODER == coders.DEFAULT_CODER == QuantizedTensor("w", (1,), "Z", 1, 1.0, 0, "d", None, None).coder


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
    header["quantized"][1]["codebook"] = {"encoding": "f32", "future": "y"}
    assert_same(read_container(assemble(header, payload, minor=7)), original)
    assert read_header(assemble(header, payload))["quantized"][0]["future"] == 1  # kept in the resolved header
    header["raw"][0].append("float32")  # a raw entry is an array: no room for unknown keys
    header["raw"][0].append(None)
    expect("bad_header", assemble(header, payload))


# ------------------------------------------------------------------------------------------------------------------
# The compact header: defaults omitted, derived values not stored, explicit defaults accepted
# ------------------------------------------------------------------------------------------------------------------


def test_writers_omit_defaults_and_derived_values():
    header, _ = split(encode_container(make_container()))
    assert set(header) == {"coder", "quantized", "raw", "config", "metadata"}  # the stand-in is not the default
    assert header["coder"] == STAND_IN
    conv, fc, single, empty = header["quantized"]
    # lattice Z and an f32 codebook are the defaults; the key 1234 is not the one derived from the seed
    assert conv == {
        "fqn": "conv1.weight", "shape": [8, 1, 3, 3], "step": 0.05, "key": "00000000000004d2",
        "zero_index": 8, "meta": {"sqnr_db": 23.5, "note": "ünïcode ✓"},
        "indices": {"alphabet_size": 17, "length": 4 * 72},
    }
    assert "n" not in fc and "dither" not in fc and "zero_index" not in fc and "meta" not in fc
    assert fc["lattice"] == "E8" and "codebook" not in fc
    assert single["dither"] == "none" and "key" not in single  # an undithered tensor's default key is 0
    assert empty["indices"] == {"alphabet_size": 2, "length": 0}
    raws = {r[0]: r for r in header["raw"]}
    assert raws["conv1.bias"] == ["conv1.bias", [8]]  # float32 is the default dtype
    assert raws["bn.num_batches_tracked"] == ["bn.num_batches_tracked", [], "int64"]
    assert raws["big_endian"][2] == "int32"  # always stored little-endian
    text = json.dumps(header)
    for derived in ("offset", "crc32", "count", "payload", "seed", "raw_float16"):
        assert derived not in text
    bare = split(encode_container(Container([], [RawTensor("b", np.zeros(2, np.float32))], {}, {})))[0]
    assert bare == {"raw": [["b", [2]]]}
    assert split(encode_container(Container()))[0] == {}


def test_keys_derived_from_the_seed_are_not_stored():
    from udnc_fx.dither import tensor_key

    assert C.derived_key(0, "conv1.weight") == tensor_key(0, "conv1.weight") == 0x721DB20751752A2B  # FORMAT.md
    assert C.derived_key(2**64 - 1, "") == tensor_key(2**64 - 1, "") == 0xECFCA53864E35B5E
    for seed in (0, 5, 2**64 - 1):
        c = make_container()
        c.seed = seed
        for q in c.quantized[:2]:
            q.key = C.derived_key(seed, q.fqn)
        data = encode_container(c)
        header = split(data)[0]
        assert header.get("seed") == (seed or None)
        assert ["key" in q for q in header["quantized"]] == [False, False, False, True]
        assert_same(read_container(data), c)
        resolved = read_header(data)["quantized"]
        assert resolved[0]["key"] == f"{C.derived_key(seed, 'conv1.weight'):016x}" and resolved[2]["key"] == "0" * 16
    c = make_container()
    c.seed = 2**64
    with pytest.raises(FormatError) as info:
        encode_container(c)
    assert info.value.kind == "bad_value"
    header, payload = split(encode_container(make_container()))
    expect("bad_value", assemble({**header, "seed": 2**64}, payload))
    expect("bad_value", assemble({**header, "seed": -1}, payload))
    expect("bad_header", assemble({**header, "seed": "0"}, payload))
    expect("bad_header", assemble({**header, "raw_float16": 1}, payload))


def test_the_file_default_coder_is_the_most_used_one():
    other = "zlib-v1"
    c = make_container()
    c.quantized[0].coder = other
    header, _ = split(encode_container(c))
    assert header["coder"] == STAND_IN  # three of the four
    assert [q["indices"].get("coder") for q in header["quantized"]] == [other, None, None, None]
    c.quantized[1].coder = other  # a tie: the smaller name, unless the format's default is one of them
    assert split(encode_container(c))[0]["coder"] == min(other, STAND_IN)
    c.quantized[2].coder = c.quantized[3].coder = C.FORMAT_DEFAULT_CODER
    header, _ = split(encode_container(c))
    assert "coder" not in header
    assert [q["indices"].get("coder") for q in header["quantized"]] == [other, other, None, None]
    assert [q["indices"]["coder"] for q in read_header(encode_container(c))["quantized"]] == [
        other, other, C.FORMAT_DEFAULT_CODER, C.FORMAT_DEFAULT_CODER
    ]


def test_explicit_defaults_read_the_same():
    original = make_container()
    data = encode_container(original)
    resolved = read_header(data)
    header, payload = split(data)
    explicit = json.loads(json.dumps(resolved))  # every default written out, offsets and counts too
    for key in hdr.RESOLVED_ONLY:
        del explicit[key]
    assert explicit["seed"] == 0 and explicit["raw_float16"] is False and explicit["coder"] == STAND_IN
    explicit["raw"] = [[r["name"], r["shape"], r["dtype"]] for r in explicit["raw"]]  # the dtype written out
    assert explicit["quantized"][0]["codebook"] == {"encoding": "f32", "offset": 4 * 72, "length": 4 * 17}
    assert explicit["quantized"][0]["lattice"] == "Z" and explicit["quantized"][0]["key"] == "00000000000004d2"
    assert_same(read_container(assemble(explicit, payload)), original)
    assert read_header(assemble(explicit, payload))["quantized"] == resolved["quantized"]


def test_read_header_resolves_defaults_and_layout():
    data = encode_container(make_container())
    h = read_header(data)
    assert h["header_length"] == header_length_of(data)
    assert h["payload_length"] == len(data) - PREAMBLE_SIZE - h["header_length"]
    assert h["payload_sha256"] == hashlib.sha256(data[PREAMBLE_SIZE + h["header_length"] :]).hexdigest()
    fc = h["quantized"][1]
    assert (fc["n"], fc["dither"], fc["zero_index"], fc["meta"]) == (8, "udnc-hash32-v1", None, {})
    assert fc["indices"]["coder"] == STAND_IN and fc["indices"]["count"] == 9
    assert h["raw"][0]["dtype"] == "float32"
    position = 0  # the sections follow each other in entry order and fill the payload
    for s in [s for q in h["quantized"] for s in (q["indices"], q["codebook"])] + [r["data"] for r in h["raw"]]:
        assert s["offset"] == position
        position += s["length"]
    assert position == h["payload_length"]


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

    monkeypatch.setattr(coders, "get_coder", lambda name: NoDecode())
    for source in (path, bytes(data)):
        header = read_header(source)
        assert [q["fqn"] for q in header["quantized"]] == ["conv1.weight", "fc.weight", "emb.weight", "empty.weight"]
    # Every coder lookup of the container (fmt.lookup_coder) asks the registry by name at call time.
    monkeypatch.setattr(coders, "get_coder", _get_coder)
    expect("checksum_mismatch", bytes(data))
    with pytest.raises(FormatError) as info:  # but truncation is still seen
        read_header(bytes(data[:-1]))
    assert info.value.kind == "truncated"
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(FormatError) as info:
        read_header(path)
    assert info.value.kind == "truncated"


@pytest.mark.parametrize("lattice_int", [False, True])
def test_section_sizes_account_for_every_byte(lattice_int):
    data = encode_container(make_container(lattice_int=lattice_int))
    header = read_header(data)
    sizes = section_sizes(header)
    assert sizes["file"] == len(data)
    assert sizes["shared"]["total"] + sum(t["total"] for t in sizes["tensors"].values()) == len(data)
    conv = sizes["tensors"]["conv1.weight"]
    assert conv["kind"] == "quantized" and conv["indices"] == 4 * 72
    assert conv["codebook"] == (17 if lattice_int else 4 * 17)  # lattice-int: one byte per coordinate
    stored = split(data)[0]
    bias = sizes["tensors"]["conv1.bias"]
    assert bias == {"kind": "raw", "data": 32, "header": bias["header"], "total": 32 + bias["header"]}
    def compact(entry):
        return len(json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())

    assert bias["header"] == compact(stored["raw"][0])
    assert sizes["tensors"]["fc.weight"]["header"] == 1 + compact(stored["quantized"][1])
    # the stored (unresolved) header gives the same answer, its length computed from the compact form
    assert section_sizes(stored) == sizes
    with pytest.raises(FormatError):
        section_sizes({"quantized": "nope"})


# ------------------------------------------------------------------------------------------------------------------
# Every error kind, from crafted files
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def good() -> bytes:
    return encode_container(make_container())


def crafter(good: bytes):
    header, payload = split(good)

    def crafted(mutate, payload=payload, **options):
        h = json.loads(json.dumps(header))
        mutate(h)
        return assemble(h, payload, **options)

    return crafted


def test_bad_magic(good):
    expect("bad_magic", b"PK\x03\x04" + good[4:])
    expect("bad_magic", b"\x89UDNX")
    expect("bad_magic", b"{}" * 60)


def test_unsupported_version(good):
    header, payload = split(good)
    err = expect("unsupported_version", assemble(header, payload, major=2))
    assert "2.0" in str(err)
    expect("unsupported_version", good[:8] + b"\x00\x00" + good[10:])


def test_truncated(good):
    header_end = PREAMBLE_SIZE + header_length_of(good)
    for cut in (0, 3, 8, 20, 87, PREAMBLE_SIZE + 10, header_end - 1, header_end, header_end + 1, len(good) - 1):
        expect("truncated", good[:cut])
    header, payload = split(good)
    expect("truncated", assemble(header, payload, payload_length=len(payload) + 1))  # the preamble asks for more


def test_bad_header(good):
    header, payload = split(good)
    head = good[:12]
    expect("bad_header", head + struct.pack("<I", 0) + good[16:])
    expect("bad_header", head + struct.pack("<I", C.MAX_HEADER_LENGTH + 1) + good[16:])
    expect("bad_header", head + struct.pack("<I", 2**32 - 1) + good[16:])
    for text in (b"not json", b"[1, 2]", b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff\xfe{}", b"[" * 100000):
        expect("bad_header", assemble(text, payload))

    crafted = crafter(good)
    expect("bad_header", crafted(lambda h: h.update(coder=5)))
    expect("bad_header", crafted(lambda h: h.update(config=[])))
    expect("bad_header", crafted(lambda h: h.update(metadata="x")))
    expect("bad_header", crafted(lambda h: h.update(quantized={})))
    expect("bad_header", crafted(lambda h: h["quantized"][0].pop("step")))
    expect("bad_header", crafted(lambda h: h["quantized"][0].pop("fqn")))
    expect("bad_header", crafted(lambda h: h["quantized"][1].update(lattice=8)))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(shape="8x1")))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(shape=[8, 1.0, 3, 3])))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(n=True)))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(step="0.05")))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(key="4d2")))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(key="00000000000004D2")))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(dither=None)))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(meta=[])))
    expect("bad_header", crafted(lambda h: h["quantized"][0]["indices"].pop("length")))
    expect("bad_header", crafted(lambda h: h["quantized"][0]["indices"].pop("alphabet_size")))
    expect("bad_header", crafted(lambda h: h["quantized"][0]["indices"].update(coder=None)))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(codebook={})))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(codebook=[])))
    bad_width = {"encoding": "lattice-int", "width": "1"}
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(codebook=bad_width)))
    expect("bad_header", crafted(lambda h: h["quantized"][0].update(codebook={"encoding": "lattice-int-coded"})))
    expect("bad_header", crafted(lambda h: h["raw"][0].append(5)))  # dtype not a string
    expect("bad_header", crafted(lambda h: h["raw"][0].pop()))  # no shape
    expect("bad_header", crafted(lambda h: h["raw"][0].__setitem__(1, "8")))
    expect("bad_header", crafted(lambda h: h["raw"][1].append("extra")))  # at most three elements
    expect("bad_header", crafted(lambda h: h["raw"].append(3)))
    expect("bad_header", crafted(lambda h: h["raw"].append({"name": "x", "shape": [1]})))  # objects are not raw entries

    def negative_then_untyped(h):  # every type is checked before any length
        h["quantized"][0]["indices"]["length"] = -1
        h["raw"][0][0] = 5

    expect("bad_header", crafted(negative_then_untyped))


def test_bad_offsets(good):
    header, payload = split(good)
    crafted = crafter(good)
    expect("bad_offsets", crafted(lambda h: h["quantized"][0]["indices"].update(length=-1)))
    expect("bad_offsets", crafted(lambda h: h["quantized"][0]["indices"].update(length=4 * 72 + 4)))  # too long
    expect("bad_offsets", crafted(lambda h: h["quantized"][1]["indices"].update(length=0)))  # too short
    expect("bad_offsets", crafted(lambda h: h["quantized"][0]["indices"].update(alphabet_size=16)))  # codebook size
    expect("bad_offsets", crafted(lambda h: h["raw"][0].__setitem__(1, [9])))  # derived length no longer fits
    expect("bad_offsets", crafted(lambda h: h["raw"][0].append("float64")))
    expect("bad_offsets", crafted(lambda h: h.update(raw_float16=True)))  # float32 data now read as float16
    expect("bad_offsets", crafted(lambda h: h["raw"].pop()))  # a hole at the end
    expect("bad_offsets", crafted(lambda h: None, payload + bytes(8)))  # the preamble's P agrees; the sections do not
    expect("bad_offsets", good + b"\x00")  # trailing bytes


def test_checksum_mismatch(good):
    header_end = PREAMBLE_SIZE + header_length_of(good)
    for position in (17, 30, 55, 60, 87, PREAMBLE_SIZE + 5, header_end - 1, header_end, len(good) - 1):
        damaged = bytearray(good)
        damaged[position] ^= 0x01
        expect("checksum_mismatch", bytes(damaged))
    expect("checksum_mismatch", good[:10] + b"\x07\x00" + good[12:])  # the minor version is covered too
    header, payload = split(good)
    # a consistent header digest over a wrong payload digest
    err = expect("checksum_mismatch", assemble(header, payload, payload_sha256=bytes(32)))
    assert "payload" in str(err)


def test_bad_value(good, monkeypatch):
    header, payload = split(good)
    crafted = crafter(good)
    q0 = lambda h: h["quantized"][0]  # noqa: E731
    expect("bad_value", crafted(lambda h: q0(h).update(shape=[8, 1, 3, 4])))  # the index stream is now too short
    expect("bad_value", crafted(lambda h: q0(h).update(lattice="E9")))
    expect("bad_value", crafted(lambda h: q0(h).update(lattice="D4", n=1)))  # D4 has no n = 1
    expect("bad_value", crafted(lambda h: q0(h).update(n=9)))
    expect("bad_value", crafted(lambda h: h["quantized"][1].update(n=4)))  # E8 has no n = 4
    expect("bad_value", crafted(lambda h: q0(h)["indices"].update(alphabet_size=0)))
    expect("bad_value", crafted(lambda h: q0(h).update(zero_index=17)))
    expect("bad_value", crafted(lambda h: q0(h).update(zero_index=-1)))
    expect("bad_value", crafted(lambda h: q0(h).update(step=0.0)))
    expect("bad_value", crafted(lambda h: q0(h).update(step=-0.05)))
    expect("bad_value", crafted(lambda h: q0(h).update(step=10**400)))
    expect("bad_value", crafted(lambda h: q0(h).update(shape=[-8, -1, 3, 3])))
    expect("bad_value", crafted(lambda h: q0(h).update(shape=[1] * 33)))
    expect("bad_value", crafted(lambda h: h["raw"][0].__setitem__(1, [-8])))
    expect("bad_value", crafted(lambda h: h["quantized"][1].update(fqn="conv1.weight")))
    expect("bad_value", crafted(lambda h: h["raw"][0].__setitem__(0, "fc.weight")))
    expect("bad_value", crafted(lambda h: h["quantized"][2].update(codebook={"encoding": "lattice-int", "width": 3})))
    expect("bad_value", crafted(lambda h: h["quantized"][2].update(codebook={
        "encoding": "lattice-int-coded", "alphabet_size": 0, "length": 16})))
    expect("bad_value", crafted(lambda h: h["quantized"][2].update(codebook={
        "encoding": "lattice-int-coded", "alphabet_size": 2**32 + 1, "length": 16})))

    # a huge tensor (or codebook) whose coded stream is tiny: refused from the header, nothing allocated
    assert "more than" in str(expect("bad_value", crafted(lambda h: h["quantized"][2].update(shape=[2**40]))))

    def huge_codebook(h):  # K·n = 2^33 coordinates from a 16-byte stream
        h["quantized"][2]["indices"]["alphabet_size"] = 2**31
        h["quantized"][2]["codebook"] = {"encoding": "lattice-int-coded", "alphabet_size": 1, "length": 16}

    assert "more than" in str(expect("bad_value", crafted(huge_codebook)))
    with pytest.raises(FormatError) as info:
        read_container(good, max_elements=100)
    assert info.value.kind == "bad_value"

    # bool bytes other than 0/1
    sections = read_header(good)
    forged = bytearray(payload)
    forged[sections["raw"][2]["data"]["offset"]] = 2
    expect("bad_value", assemble(header, bytes(forged)))

    # a fixed-width integer codebook whose rows are not lattice points (D4: odd sum)
    c = make_container(lattice_int=True)
    h, p = split(encode_container(c))
    offset = read_header(encode_container(c))["quantized"][2]["codebook"]["offset"]
    forged = bytearray(p)
    forged[offset] = 2  # zigzag 2 = coordinate 1: the row (1, 0, 0, 0) has an odd sum
    assert "not a D4 point" in str(expect("bad_value", assemble(h, bytes(forged))))

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
        monkeypatch.setattr(coders, "get_coder", lambda name, r=result: Liar(r))
        expect("bad_value", good)


def test_bad_value_in_coded_codebooks():
    data = encode_container(big_codebook_container("E8", k=40))
    header, payload = split(data)
    resolved = read_header(data)["quantized"][0]
    assert resolved["codebook"]["encoding"] == "lattice-int-coded"
    # a parity symbol that is neither 0 nor 1: code the stream again with one, under the same alphabet
    symbols = lattice_coords.point_symbols("E8", big_codebook_container("E8", k=40).quantized[0].codebook_int)
    alphabet = resolved["codebook"]["alphabet_size"]
    symbols[3, 0] = alphabet - 1
    assert alphabet - 1 > 1
    coder = fmt.lookup_coder(C.FORMAT_DEFAULT_CODEBOOK_CODER)
    forged = coder.encode(symbols.ravel(), alphabet)
    start, length = resolved["codebook"]["offset"], resolved["codebook"]["length"]
    header["quantized"][0]["codebook"]["length"] = len(forged)
    err = expect("bad_value", assemble(header, payload[:start] + forged + payload[start + length :]))
    assert "parity" in str(err)
    # a stream that does not decode
    expect("bad_value", assemble(header, payload[:start] + bytes(len(forged)) + payload[start + length :]))


def test_unknown_codec(good):
    crafted = crafter(good)
    expect("unknown_codec", crafted(lambda h: h["quantized"][0]["indices"].update(coder="nope-v9")))
    expect("unknown_codec", crafted(lambda h: h.update(coder="nope-v9")))
    expect("unknown_codec", crafted(lambda h: h["quantized"][0].update(codebook={"encoding": "bf16"})))
    expect("unknown_codec", crafted(lambda h: h["quantized"][2].update(codebook={
        "encoding": "lattice-int-coded", "alphabet_size": 3, "length": 16, "coder": "nope-v9"})))
    expect("unknown_codec", crafted(lambda h: h["raw"][0].append("complex64")))
    expect("unknown_codec", crafted(lambda h: h["raw"][0].append("bfloat16")))


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
    refused("bad_value", lambda c: setattr(q0(c), "n", 9))
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
    refused("bad_value", lambda c: setattr(c.quantized[2], "codebook_int", np.array([[1, 0, 0, 0]])))  # odd sum
    refused("bad_value", lambda c: setattr(c.quantized[1], "codebook_int", np.array([[1] * 7 + [2]] * 5)))  # parity
    refused("bad_value", lambda c: setattr(c.quantized[1], "codebook_int", np.array([[2] + [0] * 7] * 5)))  # sum 2
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
        indices=np.array([0, 1, 2, 1, 0, 2]), codebook=None, codebook_int=np.array([[-1], [0], [1]]),
        coder=STAND_IN, zero_index=1,
    )
    raw = [RawTensor("b", np.array([1.0, -2.0], np.float32)), RawTensor("t", np.array(3, np.int64))]
    return Container([q], raw, {"version": 1}, {"note": "golden"})


GOLDEN_HEADER = (
    '{"codebook_encoding":"lattice-int","coder":"test-le32-v0","config":{"version":1},"metadata":{"note":"golden"},'
    '"quantized":[{"fqn":"w","indices":{"alphabet_size":3,"length":24},"key":"0000000000000001","shape":[2,3],'
    '"step":0.5,"zero_index":1}],"raw":[["b",[2]],["t",[],"int64"]]}'
)
GOLDEN_HEX = (
    "8955444e430d0a1a01000000160100002b000000000000005919f4c848271cdd7864a6d632ad2c3b9bf489652ec54a064f55a7e4ffd478ef"
    "e5dce4335106e0dbbe8bdb834abbbca15e3fff9f8ada356a486c98a0e356ff687b22636f6465626f6f6b5f656e636f64696e67223a226c61"
    "74746963652d696e74222c22636f646572223a22746573742d6c6533322d7630222c22636f6e666967223a7b2276657273696f6e223a317d"
    "2c226d65746164617461223a7b226e6f7465223a22676f6c64656e227d2c227175616e74697a6564223a5b7b2266716e223a2277222c2269"
    "6e6469636573223a7b22616c7068616265745f73697a65223a332c226c656e677468223a32347d2c226b6579223a22303030303030303030"
    "30303030303031222c227368617065223a5b322c335d2c2273746570223a302e352c227a65726f5f696e646578223a317d5d2c2272617722"
    "3a5b5b2262222c5b325d5d2c5b2274222c5b5d2c22696e743634225d5d7d0000000001000000020000000100000000000000020000000100"
    "020000803f000000c00300000000000000"
)


def test_golden_bytes():
    data = encode_container(golden_container())
    assert data.hex() == GOLDEN_HEX
    # every field, built by hand from the spec
    payload = np.array([0, 1, 2, 1, 0, 2], "<u4").tobytes()  # the stand-in's u32 indices
    payload += bytes([1, 0, 2])  # lattice-int, width 1: zigzag(-1, 0, 1)
    payload += np.array([1.0, -2.0], "<f4").tobytes() + np.array([3], "<i8").tobytes()  # raw data, back to back
    header = GOLDEN_HEADER.encode()
    head = MAGIC + struct.pack("<HHIQ", 1, 0, len(header), len(payload)) + hashlib.sha256(payload).digest()
    assert data == head + hashlib.sha256(head + header).digest() + header + payload
    assert len(data) == PREAMBLE_SIZE + len(header) + len(payload) == 88 + 278 + 43 == 409
    assert_same(read_container(bytes.fromhex(GOLDEN_HEX)), golden_container())


def test_truncation_is_reported_before_value_checks(good):
    header, payload = split(good)
    h = json.loads(json.dumps(header))
    h["quantized"][0]["indices"]["coder"] = "nope-v9"
    expect("unknown_codec", assemble(h, payload))
    expect("truncated", assemble(h, payload)[:-1])  # the order of docs/FORMAT.md's table


def test_the_spec_shows_the_golden_header_and_symbol_vectors():
    spec = (Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    assert GOLDEN_HEADER in spec and "409 bytes" in spec and "278-byte header" in spec
    for lattice, coordinates, symbols in SYMBOL_VECTORS:
        if lattice in ("D4", "E8"):
            row = ", ".join(str(x).replace("-", "−") for x in coordinates[0])
            assert f"| `{lattice}` | `({row})` | `{' '.join(map(str, symbols[0]))}` |" in spec


def test_the_file_codebook_encoding_is_the_most_used_bare_one():
    c = make_container()
    data = encode_container(c, codebook_float_dtype="float16")
    header, payload = split(data)
    assert header["codebook_encoding"] == "f16" and not any("codebook" in q for q in header["quantized"])
    assert_same(read_container(data), c, codebook_f16=True)
    assert {q["codebook"]["encoding"] for q in read_header(data)["quantized"]} == {"f16"}
    # the default written out, or each entry naming its encoding, reads the same
    explicit = json.loads(json.dumps(header))
    del explicit["codebook_encoding"]
    for q in explicit["quantized"]:
        q["codebook"] = {"encoding": "f16"}
    assert_same(read_container(assemble(explicit, payload)), c, codebook_f16=True)
    expect("bad_header", assemble({**header, "codebook_encoding": 16}, payload))
    expect("unknown_codec", assemble({**header, "codebook_encoding": "bf16"}, payload))
    expect("bad_offsets", assemble({**header, "codebook_encoding": "f32"}, payload))  # f16 sections read as f32
    expect("bad_header", assemble({**header, "codebook_encoding": "lattice-int-coded"}, payload))  # needs keys
    # f32 everywhere: nothing at the top level
    assert "codebook_encoding" not in split(encode_container(c))[0]

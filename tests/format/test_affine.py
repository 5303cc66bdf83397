"""The ``affine`` codebook (format 1.3, issue 12 point 2): integer lattice points under a per-layer correction
``C = float32(float32(a·p) + b)``: the rule, exact round trips for every lattice and integer encoding, the version
it is written under, and bad header values."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udnc_fx.coding.container import Container, encode_container, read_container, read_header
from udnc_fx.coding.entries import entry_from_record, record_from_entry
from udnc_fx.coding.format import PREAMBLE_SIZE
from udnc_fx.errors import ConfigError, FormatError
from udnc_fx.quantizer import quantize_array
from udnc_fx.record import CompressedWeight, codebook_from_int, float32_json

LATTICES = [("Z", 1), ("Z", 4), ("A2", 2), ("D4", 4), ("E8", 8)]
B = float(np.float32(-0.001))


def _record(lattice, n, shape=(16, 64), affine=(1.0625, B), seed=0, prune=False, step=0.3):
    w = np.random.default_rng(seed).standard_normal(shape)
    if prune:  # whole vectors at 0: the exact zero
        flat = w.reshape(-1)
        flat[: (flat.size // 3) // n * n] = 0.0
    qa = quantize_array(w, lattice=lattice, n=n, step=step, key=7)
    zero_index = None
    if prune:
        hits = np.flatnonzero(~qa.codebook_int.any(axis=1))
        zero_index = int(hits[0])
    return CompressedWeight(
        indices=qa.indices, codebook=None, codebook_int=qa.codebook_int, shape=qa.shape, lattice=lattice, n=n,
        step=qa.step, key=qa.key, zero_index=zero_index, affine=affine,
    )


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=np.float32).tobytes()


def _roundtrip(rec: CompressedWeight) -> tuple[bytes, CompressedWeight]:
    data = encode_container(Container([entry_from_record(rec, fqn="w")], []))
    return data, record_from_entry(read_container(data).quantized[0])


def test_the_rule_is_two_float32_operations_in_order():
    rec = _record("E8", 8, affine=(float(np.float32(0.97)), B))
    p = codebook_from_int(rec.codebook_int, "E8", 8, rec.step)
    a, b = np.float32(0.97), np.float32(B)
    expected = np.array([[np.float32(np.float32(a * x) + b) for x in row] for row in p], dtype=np.float32)
    assert _bits(rec.codebook) == _bits(expected)


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("shape", [(16, 64), (3, 8)])  # coordinates (no table) and an explicit integer table
@pytest.mark.parametrize("lattice,n", LATTICES)
def test_exact_round_trip_for_every_lattice(lattice, n, shape, prune):
    rec = _record(lattice, n, shape, prune=prune)
    data, back = _roundtrip(rec)
    entry = read_header(data)["quantized"][0]
    # an affine codebook makes the file 1.3; flat in a -dither lattice-coords entry (A2, D4, E8), 1.4; and 1.4
    # whenever a stream uses ans-dither-v2 (the default coder)
    flat = entry["codebook"].get("layout") in ("interleaved-u", "split-u", "grouped-u")
    assert flat is (lattice != "Z" and shape == (16, 64))
    assert struct.unpack_from("<H", data, 10)[0] == (4 if flat or b"ans-dither-v2" in data else 3)
    stored = _stored_codebook(data)
    assert (stored.get("encoding") == "affine") is not flat and (stored.get("affine") is not None) is flat
    assert back.affine == rec.affine
    assert np.array_equal(back.codebook_int, rec.codebook_int) and np.array_equal(back.indices, rec.indices)
    assert _bits(back.codebook) == _bits(rec.codebook)
    decoded = back.decode()
    assert _bits(decoded) == _bits(rec.decode())
    if prune:  # the exact zero stays exactly 0 whatever a and b
        zeros = np.repeat(back.indices == back.zero_index, n)[: back.numel].reshape(back.shape)
        assert zeros.any() and _bits(decoded[zeros]) == bytes(4 * int(zeros.sum()))
    entry = read_header(data)["quantized"][0]
    assert entry["codebook"]["affine"] == [1.0625, -0.001]  # the shortest decimals, resolved as stored


@pytest.mark.parametrize("shape", [(16, 64), (3, 8)])
@pytest.mark.parametrize("lattice,n", LATTICES)
def test_section_sizes_of_a_read_header_with_a_correction(lattice, n, shape):
    """``section_sizes(read_header(...))`` (what ``udnc compress`` prints) takes the resolved ``affine`` of every
    layout: the 1.3 wrapper's and the flat 1.4 one's; the shares add up to the file."""
    from udnc_fx.coding.container import section_sizes

    data, _ = _roundtrip(_record(lattice, n, shape))
    sizes = section_sizes(read_header(data))
    assert sizes["shared"]["total"] + sum(t["total"] for t in sizes["tensors"].values()) == len(data)
    assert sizes["tensors"]["w"]["header"] > 0


def _stored_codebook(data: bytes) -> dict:
    """The codebook object as the file stores it (compact form)."""
    h = struct.unpack_from("<I", data, 12)[0]
    return json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + h])["quantized"][0].get("codebook", {})


@pytest.mark.parametrize("lattice,n", LATTICES)
def test_without_a_correction_the_file_is_unchanged(lattice, n):
    rec = _record(lattice, n, affine=None)
    data, back = _roundtrip(rec)
    # Z: the version its coder needs (1.1 or 1.2; 1.4 for ans-dither-v2, the default); A2, D4, E8: 1.4 for their
    # -u coordinates, not for a correction
    v2 = b"ans-dither-v2" in data
    assert struct.unpack_from("<H", data, 10)[0] == (4 if v2 or lattice != "Z" else 2 if n > 1 else 1)
    assert back.affine is None and b"affine" not in data


def test_the_flat_correction_is_at_least_25_bytes_smaller_than_the_wrapper():
    """Format 1.4 stores ``[a, b]`` flat in a -dither lattice-coords entry; the 1.3 wrapper re-nests the points."""
    from udnc_fx.coding.header import compact_codebook

    def size(cb):
        return len(json.dumps(compact_codebook(cb), separators=(",", ":")))

    cb = {"encoding": "lattice-coords", "layout": "split-u", "exact_zero": False, "length": 0}
    ab = {"affine": [1.0123457, -0.0012345]}
    flat = size({**cb, **ab}) - size(cb)  # what the correction adds to the entry
    wrapped = size({**cb, **ab, "layout": "split"}) - size({**cb, "layout": "split"})
    assert wrapped - flat >= 25 and flat <= 32, (wrapped, flat)


@settings(max_examples=30, deadline=None)
@given(
    a=st.floats(width=32, allow_nan=False, allow_infinity=False).filter(lambda v: v != 0 and abs(v) < 1e30),
    b=st.floats(width=32, allow_nan=False, allow_infinity=False).filter(lambda v: abs(v) < 1e30),
    which=st.integers(0, len(LATTICES) - 1),
)
def test_any_float32_correction_round_trips(a, b, which):
    lattice, n = LATTICES[which]
    rec = _record(lattice, n, (2, 8), affine=(a, b), step=0.5)
    assert float(np.float32(float32_json(a))) == a
    if not np.isfinite(rec.codebook).all():
        return  # refused by the record already (tested below)
    _, back = _roundtrip(rec)
    assert back.affine == rec.affine and _bits(back.codebook) == _bits(rec.codebook)


def test_the_record_refuses_bad_corrections():
    base = _record("D4", 4, affine=None)
    kwargs = dict(indices=base.indices, codebook=None, codebook_int=base.codebook_int, shape=base.shape,
                  lattice="D4", n=4, step=base.step, key=base.key)
    for bad in [(0.0, 0.0), (float("nan"), 0.0), (1.0, float("inf")), (0.1, 0.0), ("1", 0.0), (1.0,), 1.0]:
        with pytest.raises(ConfigError):
            CompressedWeight(**kwargs, affine=bad)
    with pytest.raises(ConfigError, match="overflows"):
        CompressedWeight(**kwargs, affine=(float(np.float32(3e38)), 0.0))
    with pytest.raises(ConfigError, match="needs the integer"):  # a float table with a correction means nothing
        CompressedWeight(**{**kwargs, "codebook": base.codebook, "codebook_int": None}, affine=(2.0, 0.0))
    with pytest.raises(ConfigError, match="bit for bit"):  # the codebook must be the corrected points
        CompressedWeight(**{**kwargs, "codebook": base.codebook}, affine=(2.0, 0.0))


def _edited(data: bytes, edit) -> bytes:
    """``data`` with its header JSON edited and every checksum and length recomputed."""
    h = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + h])
    edit(header["quantized"][0]["codebook"])
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    payload = data[PREAMBLE_SIZE + h :]
    head = data[:12] + struct.pack("<IQ32s", len(header_bytes), len(payload), hashlib.sha256(payload).digest())
    return head + hashlib.sha256(head + header_bytes).digest() + header_bytes + payload


def _set(key, value):
    def edit(cb):
        cb[key] = value
    return edit


def _set_points(key, value):
    def edit(cb):
        cb["points"][key] = value
    return edit


@pytest.mark.parametrize(
    "edit,kind",
    [
        (_set("a", 0), "bad_value"),
        (_set("a", 1e-60), "bad_value"),  # rounds to float32 0
        (_set("a", 1e39), "bad_value"),  # past float32's range
        (_set("b", -1e39), "bad_value"),
        (_set("a", "1"), "bad_header"),
        (_set("b", None), "bad_header"),
        (lambda cb: cb.pop("a"), "bad_header"),
        (lambda cb: cb.pop("points"), "bad_header"),
        (_set("points", "lattice-int"), "bad_header"),
        (_set_points("encoding", "f32"), "bad_value"),
        (_set_points("encoding", "affine"), "bad_value"),
        (_set_points("encoding", "lattice-sparse-v9"), "unknown_codec"),
    ],
)
def test_bad_header_values_are_refused(edit, kind):
    data, _ = _roundtrip(_record("A2", 2, (3, 8)))
    assert read_container(_edited(data, lambda cb: None)).quantized[0].affine == (1.0625, B)  # the editor is sound
    with pytest.raises(FormatError) as info:
        read_container(_edited(data, edit))
    assert info.value.kind == kind


def test_a_correction_that_overflows_the_codewords_is_refused_on_load():
    data, _ = _roundtrip(_record("Z", 1, (3, 8)))
    with pytest.raises(FormatError) as info:
        record_from_entry(read_container(_edited(data, _set("a", 3e38))).quantized[0])
    assert info.value.kind == "bad_value"

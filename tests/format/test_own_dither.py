"""Format 1.4 ``lattice-coords`` layouts ``interleaved-u``/``split-u``/``grouped-u``: contexts from the bins of each
coordinate's own dither, ``A2``'s ``b`` first, exchangeable columns in one stream, and the flat ``affine`` key
(docs/FORMAT.md, *Contexts from each coordinate's own dither*)."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from udnc_fx.coding import lattice_coords as LC
from udnc_fx.coding.coders import get_coder
from udnc_fx.coding.container import Container, QuantizedTensor, decode_container, encode_container, read_header
from udnc_fx.coding.format import DIGESTED, MAGIC, PREAMBLE_SIZE
from udnc_fx.errors import FormatError
from udnc_fx.lattice import get_lattice
from udnc_fx.quantizer import quantize_array
from udnc_fx.record import raw_dither

OWN = [("A2", 2), ("D4", 4), ("E8", 8)]
ANS = "ans-dither-v1"


def _points(lattice: str, n: int, raw: np.ndarray) -> np.ndarray:
    """Lattice points (the ``to_int`` form) from arbitrary integers ``raw`` ``(m, n)``."""
    raw = raw.astype(np.int64)
    if lattice == "D4":
        raw[:, 3] += raw.sum(axis=1) & 1
    if lattice == "E8":
        coset = raw[:, :1] & 1
        h = raw >> 1
        h[:, 7] += h.sum(axis=1) & 1
        raw = 2 * h + coset
    return raw


@pytest.mark.parametrize("lattice,n", OWN)
def test_codes_are_the_bins_of_each_coordinates_own_dither(lattice, n):
    """The spec's formula on the whole tensor at once equals the chunked codes (more vectors than one chunk)."""
    count = 70_000  # > DITHER_CHUNK_ELEMENTS / n for every lattice here
    codes = LC.own_dither_codes(12345, count, lattice, n)
    u = raw_dither(12345, count, get_lattice(lattice, n))
    s = np.array(LC.OWN_DITHER_SCALE[lattice])
    expected = np.minimum(15, np.maximum(0, np.floor(u * s + 8))).astype(np.uint8)
    np.testing.assert_array_equal(codes, expected)
    # every bin is used, and the top bit is the sign of u_k
    assert set(np.unique(codes[:, 0]).tolist()) == set(range(16))
    np.testing.assert_array_equal(codes >> 3, (u >= 0).astype(np.uint8))


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(-(1 << 20), 1 << 20) | st.integers(-3, 3),
                               st.integers(-(1 << 20), 1 << 20) | st.integers(-3, 3)), max_size=30))
def test_a2_b_first_symbols_invert(rows):
    c = np.array(rows, np.int64).reshape(-1, 2)
    s = LC.vector_symbols("A2", c, own=True)
    np.testing.assert_array_equal(s[:, 0], LC.zigzag_encode(c[:, 1]).astype(np.int64))
    np.testing.assert_array_equal(LC.points_from_vector_symbols("A2", s, "t", own=True), c)


def test_a2_b_first_example_of_the_spec():
    assert LC.vector_symbols("A2", np.array([[1, 3]]), own=True).tolist() == [[6, 4]]


point_cases = st.sampled_from(OWN).flatmap(
    lambda ln: st.tuples(
        st.just(ln),
        st.lists(st.lists(st.integers(-(1 << 12), 1 << 12) | st.integers(-2, 2), min_size=ln[1], max_size=ln[1]),
                 min_size=1, max_size=60),
        st.integers(0, (1 << 64) - 1),
        st.sampled_from(LC.STREAM_LAYOUTS),
    )
)


@settings(max_examples=120, deadline=None)
@given(case=point_cases)
@example(case=(("E8", 8), [[0, 0, 0, 0, 0, 0, 0, 0], [0, -1, -1, -765, 2, 0, 52, 0], [1, 24, -1432, 0, 306, 0, -1207, -2],
                           [362, 8, 0, 2, 32, 2, -1, 2], [-1, 0, 0, -1, -1, -1, 0, 0]], 0, "split"))
def test_every_u_layout_round_trips_any_points(case):
    """Parity and coset edges (odd E8 cosets, D4/E8 last coordinates of both parities), exact zeros, any key."""
    (lattice, n), rows, key, layout = case
    c = _points(lattice, n, np.array(rows, np.int64))
    c[::5] = 0
    out = LC.encode_points(get_coder(ANS), c, lattice, n, key, True, "t", layouts=(layout,))
    if layout == "grouped" and lattice not in LC.COLUMN_GROUPS:
        assert out is None
        return
    alphabet, name, data = out
    assert LC.uses_own_dither(name)
    back = LC.decode_points(get_coder(ANS), data, c.shape[0], alphabet, name, lattice, n, key, True, "t")
    np.testing.assert_array_equal(back, c)
    bits, _ = LC.coded_bits(get_coder(ANS), c, lattice, n, key, True, layouts=(layout,))
    # the estimate prices each stream's count table approximately: up to ~2 bytes per stream on streams of a few
    # symbols with a wide alphabet (the example above: 9 split-u streams of 5 symbols, estimate 1261 bits, file 1152)
    assert abs(bits - 8 * len(data)) <= 24 + 0.01 * 8 * len(data) + 16 * len(LC.column_groups(name, lattice, 9))


def _quantized(lattice, n, step=0.05, *, shape=(48, 64), seed=0, coder=ANS, dither="udnc-hash32-v1"):
    w = np.random.default_rng(seed).standard_normal(shape)
    qa = quantize_array(w, lattice=lattice, n=n, step=step, key=1234)
    return qa, QuantizedTensor("w", shape, lattice, n, step, 1234, dither, qa.indices, qa.codebook,
                               codebook_int=qa.codebook_int, coder=coder, zero_index=qa.zero_index)


@pytest.mark.parametrize("lattice,n", OWN)
def test_own_dither_contexts_make_the_file_smaller_than_the_hash_codes(lattice, n, monkeypatch):
    """On a Gaussian weight at ~3 bits/weight the -u file is smaller than the 1.2 file of the same points, and
    both read back the same indices and codebook."""
    step = 2.0 ** (0.5 * math.log2(2 * math.pi * math.e) - 3)
    _, q = _quantized(lattice, n, step, shape=(256, 256))
    new = encode_container(Container([q]))
    monkeypatch.setattr(LC, "OWN_DITHER_LATTICES", frozenset())
    old = encode_container(Container([q]))
    monkeypatch.undo()
    assert struct.unpack_from("<H", new, 10)[0] == 4 and struct.unpack_from("<H", old, 10)[0] == 2
    assert LC.uses_own_dither(read_header(new)["quantized"][0]["codebook"]["layout"])
    assert len(new) < len(old), (len(new), len(old))  # measured: A2 0.3 %, D4 and E8 more (65k weights)
    a, b = decode_container(new).quantized[0], decode_container(old).quantized[0]  # a 1.4 reader reads 1.2 too
    np.testing.assert_array_equal(a.codebook_int, b.codebook_int)
    np.testing.assert_array_equal(a.indices, b.indices)


@pytest.mark.parametrize("coder,dither", [("range-adaptive-v1", "udnc-hash32-v1"), (ANS, "none")])
def test_without_contexts_the_file_keeps_the_1_2_layouts(coder, dither):
    _, q = _quantized("E8", 8, coder=coder, dither=dither)
    data = encode_container(Container([q]))
    entry = read_header(data)["quantized"][0]
    assert entry["codebook"]["layout"] in LC.LAYOUTS and struct.unpack_from("<H", data, 10)[0] == 2


# -- bad headers ---------------------------------------------------------------------------------------------------


def _rewrite(data: bytes, edit) -> bytes:
    _, major, minor, hlen, _, _ = DIGESTED.unpack_from(data)
    header = json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + hlen])
    payload = data[PREAMBLE_SIZE + hlen :]
    edit(header)
    hb = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head = DIGESTED.pack(MAGIC, major, minor, len(hb), len(payload), hashlib.sha256(payload).digest())
    return head + hashlib.sha256(head + hb).digest() + hb + payload


@pytest.fixture(scope="module")
def u_file() -> bytes:
    _, q = _quantized("E8", 8)
    q.affine = (1.0625, float(np.float32(-0.001)))
    q.codebook = None
    return encode_container(Container([q]))


def _cb(h):
    return h["quantized"][0]["codebook"]


@pytest.mark.parametrize(
    "edit,kind",
    [
        (lambda h: (_cb(h).pop("affine"), _cb(h).update(layout="split-v")), "unknown_codec"),
        (lambda h: h["quantized"][0].update(lattice="Z", n=8), "bad_value"),  # -u layouts: A2, D4, E8 only
        (lambda h: h["quantized"][0].update(dither="none"), "bad_value"),
        (lambda h: h["quantized"][0]["indices"].update(coder="range-adaptive-v1"), "bad_value"),
        (lambda h: _cb(h).update(affine=[0, 1]), "bad_value"),  # a = 0
        (lambda h: _cb(h).update(affine=[1e39, 1]), "bad_value"),  # past float32
        (lambda h: _cb(h).update(affine=[1.0]), "bad_header"),
        (lambda h: _cb(h).update(affine=[1.0, "0"]), "bad_header"),
        (lambda h: _cb(h).update(affine=[True, 0.0]), "bad_header"),
        (lambda h: _cb(h).update(affine={"a": 1}), "bad_header"),
        (lambda h: _cb(h).update(layout="split"), "bad_value"),  # flat affine outside a -u layout
        (lambda h: h["quantized"][0].update(codebook={"encoding": "affine", "a": 1.0, "b": 0.0,
                                                      "points": _cb(h)}), "bad_value"),  # flat inside a wrapper
    ],
)
def test_bad_u_headers_are_refused(u_file, edit, kind):
    head = read_header(u_file)["quantized"][0]["codebook"]
    assert head["affine"] == [1.0625, -0.001] and LC.uses_own_dither(head["layout"])
    assert decode_container(_rewrite(u_file, lambda h: None)).quantized[0].affine == (1.0625, float(np.float32(-0.001)))
    with pytest.raises(FormatError) as err:
        decode_container(_rewrite(u_file, edit))
    assert err.value.kind == kind


def test_grouped_u_for_a2_is_refused():
    _, q = _quantized("A2", 2)
    data = encode_container(Container([q]))
    with pytest.raises(FormatError) as err:
        decode_container(_rewrite(data, lambda h: _cb(h).update(layout="grouped-u")))
    assert err.value.kind == "bad_value"


def test_e8_coset_symbol_two_is_rejected_in_grouped_u():
    _, q = _quantized("E8", 8)
    c = q.codebook_int[q.indices]
    coder = get_coder(ANS)
    good = LC.encode_points(coder, c, "E8", 8, q.key, True, "t", layouts=("grouped",))
    assert good[1] == "grouped-u"
    valid = LC.vector_symbols("E8", c)  # the contexts of the later streams (the reader stops before them)
    symbols = valid.copy()
    symbols[3, 0] = 2
    count = c.shape[0]
    codes = LC.own_dither_codes(q.key, count, "E8", 8)[:, LC.dither_columns("E8", 8, True)]
    alphabet = max(good[0], 3)
    streams = [coder.encode(symbols[:, 0], alphabet, context=np.ascontiguousarray(codes[:, 0]))]
    streams += [coder.encode(np.ascontiguousarray(symbols[:, 1:8]).ravel(), alphabet,
                             context=LC._group_context("E8", tuple(range(1, 8)), valid, codes, True)),
                coder.encode(symbols[:, 8], alphabet, context=LC._group_context("E8", (8,), valid, codes, True))]
    from udnc_fx.coding.coder_base import varint

    data = b"".join(varint(len(s)) for s in streams[:-1]) + b"".join(streams)
    with pytest.raises(FormatError) as err:
        LC.decode_points(coder, data, count, alphabet, "grouped-u", "E8", 8, q.key, True, "t")
    assert err.value.kind == "bad_value"


def test_heavy_tails_take_the_escape_and_it_pays(monkeypatch):
    """A Student-t3 weight at ~3 bits/weight: the -u column layouts escape the rare large symbols into one tail
    table (T > 0 in the payload's first byte), the file is smaller than without, and it round-trips."""
    x = np.random.default_rng(3).standard_t(3, 400_000)
    c = None
    qa = quantize_array(x, lattice="A2", n=2, step=0.15, key=5)
    c = qa.codebook_int[qa.indices]
    coder = get_coder(ANS)
    alphabet, name, data = LC.encode_points(coder, c, "A2", 2, 5, True, "t", layouts=("split",))
    assert name == "split-u" and data[0] in LC.ESCAPES
    monkeypatch.setattr(LC, "ESCAPES", ())
    plain = LC.encode_points(coder, c, "A2", 2, 5, True, "t", layouts=("split",))[2]
    monkeypatch.undo()
    assert plain[0] == 0 and len(data) < len(plain)
    np.testing.assert_array_equal(LC.decode_points(coder, data, c.shape[0], alphabet, name, "A2", 2, 5, True, "t"), c)
    # the estimate follows the writer's choice of T
    bits, layout = LC.coded_bits(coder, c, "A2", 2, 5, True, layouts=("split",))
    assert layout == name and abs(bits - 8 * len(data)) <= 24 + 0.01 * 8 * len(data) + 32


@pytest.mark.parametrize("escape", [1 << 40, 1, 7, 9])
def test_a_bad_escape_threshold_is_refused(escape):
    """T must be 0 or in [1, S − 1); any T the writer did not choose makes the streams not decode: bad_value."""
    from udnc_fx.coding.coder_base import read_varint, varint

    _, q = _quantized("D4", 4)
    c = q.codebook_int[q.indices]
    coder = get_coder(ANS)
    alphabet, name, data = LC.encode_points(coder, c, "D4", 4, q.key, True, "t", layouts=("grouped",))
    t, pos = read_varint(memoryview(data), 0)
    bad = varint(alphabet + escape if escape > 9 else escape) + data[pos:]
    if escape == t:
        return
    with pytest.raises(FormatError) as err:
        LC.decode_points(coder, bad, c.shape[0], alphabet, name, "D4", 4, q.key, True, "t")
    assert err.value.kind in ("bad_value", "truncated", "corrupt_payload")

"""``lattice-coords``: lattice points stored by their integer coordinates, no per-layer table (docs/FORMAT.md)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udnc_fx.coding import lattice_coords as LC
from udnc_fx.coding.coders import get_coder
from udnc_fx.coding.container import (
    MAGIC,
    Container,
    QuantizedTensor,
    decode_container,
    encode_container,
    read_header,
)
from udnc_fx.errors import FormatError
from udnc_fx.lattice import get_lattice
from udnc_fx.quantizer import codebook_from_int, quantize_array

LATTICES = [("Z", 1), ("Z", 2), ("Z", 4), ("Z", 8), ("A2", 2), ("D4", 4), ("E8", 8)]
DITHER = "udnc-hash32-v1"


def lattice_points(lattice: str, n: int, raw: np.ndarray) -> np.ndarray:
    """Integer coordinates (the ``to_int`` form) of lattice points built from arbitrary integers ``raw`` (m, n)."""
    raw = raw.astype(np.int64)
    if lattice == "D4":  # fix the parity with the last coordinate: even sum
        raw[:, 3] += raw.sum(axis=1) & 1
    if lattice == "E8":  # twice a point: a coset bit, then a D8 point
        coset = raw[:, :1] & 1
        h = raw >> 1
        h[:, 7] += h.sum(axis=1) & 1
        raw = 2 * h + coset
    return raw


points_strategy = st.sampled_from(LATTICES).flatmap(
    lambda ln: st.tuples(
        st.just(ln),
        st.lists(
            st.lists(st.integers(-(1 << 20), 1 << 20) | st.integers(-3, 3), min_size=ln[1], max_size=ln[1]),
            min_size=0, max_size=40,
        ),
    )
)


@settings(max_examples=300, deadline=None)
@given(case=points_strategy)
def test_symbols_invert_for_every_lattice_including_parity_and_coset_edges(case):
    (lattice, n), rows = case
    c = lattice_points(lattice, n, np.array(rows, np.int64).reshape(-1, n))
    s = LC.point_symbols(lattice, c)
    assert s.shape == (c.shape[0], LC.symbol_width(lattice, n)) and (s >= 0).all()
    if lattice == "E8" and s.size:
        assert set(np.unique(s[:, 0]).tolist()) <= {0, 1}  # the coset bit
    np.testing.assert_array_equal(LC.points_from_symbols(lattice, s, "t"), c)
    v = LC.vector_symbols(lattice, c)
    assert v.shape == s.shape and (v >= 0).all()
    np.testing.assert_array_equal(LC.points_from_vector_symbols(lattice, v, "t"), c)


def test_a2_vector_symbols_are_the_documented_ones():
    c = np.array([[1, 3], [0, -1], [-2, 2]])
    np.testing.assert_array_equal(LC.vector_symbols("A2", c), [[4, 6], [1, 1], [1, 4]])
    np.testing.assert_array_equal(LC.points_from_vector_symbols("A2", LC.vector_symbols("A2", c), "t"), c)


def test_parity_and_coset_edge_cases_by_hand():
    # D4: odd/negative first three coordinates force an odd last coordinate; the symbol drops its parity.
    d4 = np.array([[1, 0, 0, 1], [-1, 0, 0, -1], [-1, -1, -1, 1], [0, 0, 0, 0], [1, 1, 0, -2]])
    s = LC.point_symbols("D4", d4)
    np.testing.assert_array_equal(s[:, 3], [0, 1, 0, 0, 1])  # zigzag((c3 - p) >> 1): 0, -1, 0, 0, -1
    np.testing.assert_array_equal(LC.points_from_symbols("D4", s, "t"), d4)
    # E8 (doubled): the all-½ point, its negative, a D8 point and 0.
    e8 = np.array([[1] * 8, [-1] * 8, [2, 2, 0, 0, 0, 0, 0, 0], [0] * 8, [-1, 1, 1, 1, 1, 1, 1, -1]])
    s = LC.point_symbols("E8", e8)
    np.testing.assert_array_equal(s[:, 0], [1, 1, 0, 0, 1])
    np.testing.assert_array_equal(LC.points_from_symbols("E8", s, "t"), e8)
    with pytest.raises(FormatError) as err:
        LC.points_from_symbols("E8", np.array([[2] + [0] * 8], np.uint64), "t")
    assert err.value.kind == "bad_value"


@pytest.mark.parametrize("dithered", [True, False])
@pytest.mark.parametrize("layout", LC.STREAM_LAYOUTS)
@pytest.mark.parametrize("lattice,n", LATTICES)
@pytest.mark.parametrize("coder", ["ans-dither-v1", "range-adaptive-v1"])
def test_points_round_trip_in_every_layout(lattice, n, layout, coder, dithered):
    rng = np.random.default_rng(n)
    c = lattice_points(lattice, n, np.round(rng.laplace(0, 4, (3000, n))).astype(np.int64))
    c[::7] = 0  # exact zeros
    out = LC.encode_points(get_coder(coder), c, lattice, n, 99, dithered, "t", layouts=(layout,))
    # A2/D4/E8 with a context coder and the hash dither: the -u layout (contexts from each coordinate's dither)
    own = coder == "ans-dither-v1" and dithered and lattice in LC.OWN_DITHER_LATTICES
    if layout == "grouped" and not (own and lattice in LC.COLUMN_GROUPS):
        assert out is None  # grouped streams exist only under the -u rule, for E8 and D4
        return
    assert out is not None and out[1] == ("grouped-u" if layout == "grouped" else LC.own_layout(layout, own))
    alphabet, name, data = out
    back = LC.decode_points(get_coder(coder), data, c.shape[0], alphabet, name, lattice, n, 99, dithered, "t")
    np.testing.assert_array_equal(back, c)


def test_split_contexts_carry_the_parities():
    e8 = np.array([[1] * 8, [0] * 8, [2, 2, 0, 0, 0, 0, 0, 0], [-1, 1, 1, 1, 1, 1, 1, -1]])
    s = LC.vector_symbols("E8", e8)
    dither = np.full(s.shape, 0b1011, np.uint8)
    assert LC._split_context("E8", 0, s, dither).tolist() == [11] * 4  # the coset bit: its dither code
    assert LC._split_context("E8", 3, s, dither).tolist() == [8 | 5, 5, 5, 8 | 5]  # (p << 3) | (d >> 1)
    h = (e8 - (e8[:, :1] & 1)) >> 1
    q = h[:, :7].sum(axis=1) & 1
    assert LC._split_context("E8", 8, s, None).tolist() == ((e8[:, 0] & 1) * 8 + q * 4).tolist()
    d4 = np.array([[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 2]])
    s = LC.vector_symbols("D4", d4)
    assert LC._split_context("D4", 3, s, None).tolist() == [8, 0, 0]
    assert LC._split_context("D4", 1, s, None) is None
    assert LC._split_context("Z", 0, s, None) is None


def test_the_parity_contexts_pay_on_a_gaussian_source():
    """Split E8/D4 streams with the parity contexts are smaller than without (measured 0.015 / 0.008 bit/weight)."""
    x = np.random.default_rng(0).standard_normal(200_000)
    for lattice, n in (("E8", 8), ("D4", 4)):
        qa = quantize_array(x, lattice=lattice, n=n, step=2 ** (2.047 - 3), key=5)
        c = qa.codebook_int[qa.indices]
        coder = get_coder("ans-dither-v1")
        with_parity = LC.encode_points(coder, c, lattice, n, 5, True, "t", layouts=("split",))[2]
        s = LC.vector_symbols(lattice, c)
        plain = sum(len(coder.encode(s[:, i], int(s.max()) + 1)) for i in range(s.shape[1]))
        assert len(with_parity) < plain


def quantized(lattice, n, step, *, exact_zero=False, coder="ans-dither-v1", shape=(48, 64), seed=0):
    values = np.random.default_rng(seed).laplace(size=shape)
    if exact_zero:
        values[np.abs(values) < 1.0] = 0.0
    qa = quantize_array(values, lattice=lattice, n=n, step=step, key=1234, exact_zero=exact_zero)
    return qa, QuantizedTensor(
        "w", shape, lattice, n, step, 1234, DITHER, qa.indices, qa.codebook, codebook_int=qa.codebook_int,
        coder=coder, zero_index=qa.zero_index,
    )


def decoded(q: QuantizedTensor, qa=None) -> np.ndarray:
    from udnc_fx.quantizer import raw_dither

    lat = get_lattice(q.lattice, q.n)
    cb = codebook_from_int(q.codebook_int, q.lattice, q.n, q.step) if q.codebook is None else q.codebook
    idx = np.asarray(q.indices, np.int64)
    dither = (raw_dither(q.key, idx.size, lat) * (float(lat.scale) * q.step)).astype(np.float32)
    v = cb[idx] - dither
    if q.zero_index is not None:
        v[idx == q.zero_index] = 0.0
    return v


@pytest.mark.parametrize("exact_zero", [False, True])
@pytest.mark.parametrize("lattice,n", LATTICES)
def test_fine_vector_lattices_drop_the_table_and_round_trip_bit_exact(lattice, n, exact_zero):
    qa, q = quantized(lattice, n, 0.05, exact_zero=exact_zero)
    data = encode_container(Container([q]))
    entry = read_header(data)["quantized"][0]
    back = decode_container(data).quantized[0]
    # the quantizer's own indices, codebook and zero index come back, so a loaded model is the saved one
    np.testing.assert_array_equal(back.indices.astype(np.int64), qa.indices)
    np.testing.assert_array_equal(back.codebook_int, qa.codebook_int)
    assert back.zero_index == qa.zero_index
    assert decoded(back).tobytes() == decoded(q).tobytes()
    if n > 1:  # at this rate nearly every vector is its own point: the table would cost as much as the indices
        assert entry["codebook"]["encoding"] == "lattice-coords"
        # A2/D4/E8 under the default (context) coder: contexts from each coordinate's own dither, format 1.4
        own = lattice in LC.OWN_DITHER_LATTICES
        assert LC.uses_own_dither(entry["codebook"]["layout"]) is own
        assert struct.unpack_from("<HH", data, len(MAGIC)) == (1, 4 if own else 2)
        assert entry["codebook"]["exact_zero"] is exact_zero and entry["zero_index"] is None
        assert entry["codebook"]["length"] == 0
        # and it is smaller than the explicit table it replaces
        explicit = QuantizedTensor(**{**q.__dict__, "codebook_int": None})
        assert len(data) < len(encode_container(Container([explicit])))
    if exact_zero:
        assert (decoded(back)[back.indices.astype(np.int64) == back.zero_index] == 0).all()


def test_coarse_z1_keeps_its_small_table():
    _, q = quantized("Z", 1, 3.0)
    entry = read_header(encode_container(Container([q])))["quantized"][0]
    assert entry["codebook"]["encoding"] != "lattice-coords"


def test_writes_are_deterministic():
    _, q = quantized("E8", 8, 0.05)
    assert encode_container(Container([q])) == encode_container(Container([q]))


def test_a_codebook_in_another_order_keeps_the_table_and_round_trips():
    """The reader rebuilds the quantizer's order; any other order (or unused rows) is stored explicitly."""
    qa, q = quantized("E8", 8, 0.05)
    perm = np.random.default_rng(1).permutation(qa.codebook_int.shape[0])
    inv = np.argsort(perm)
    q.codebook_int, q.codebook, q.indices = qa.codebook_int[perm], qa.codebook[perm], inv[qa.indices]
    data = encode_container(Container([q]))
    assert read_header(data)["quantized"][0]["codebook"]["encoding"] != "lattice-coords"
    back = decode_container(data).quantized[0]
    np.testing.assert_array_equal(back.indices.astype(np.int64), q.indices)
    np.testing.assert_array_equal(back.codebook_int, q.codebook_int)


def test_zero_index_not_at_the_origin_keeps_the_table():
    qa, q = quantized("D4", 4, 0.05)
    q.zero_index = int(np.flatnonzero(qa.codebook_int.any(axis=1))[0])  # a non-zero point
    entry = read_header(encode_container(Container([q])))["quantized"][0]
    assert entry["codebook"]["encoding"] != "lattice-coords"
    assert decode_container(encode_container(Container([q]))).quantized[0].zero_index == q.zero_index


# -- bad headers and payloads ----------------------------------------------------------------------------------


def _rewrite(data: bytes, edit) -> bytes:
    """Apply ``edit`` to the stored header JSON and fix the lengths and digests (only the edit is wrong)."""
    import hashlib

    from udnc_fx.coding.format import DIGESTED as _DIGESTED, PREAMBLE_SIZE

    _, major, minor, hlen, plen, psha = _DIGESTED.unpack_from(data)
    header = json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + hlen])
    payload = data[PREAMBLE_SIZE + hlen :]
    payload = edit(header, payload) or payload
    hb = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head = _DIGESTED.pack(MAGIC, major, minor, len(hb), len(payload), hashlib.sha256(payload).digest())
    return head + hashlib.sha256(head + hb).digest() + hb + payload


@pytest.fixture(scope="module")
def coords_file() -> bytes:
    _, q = quantized("E8", 8, 0.05)
    _, q2 = quantized("D4", 4, 0.05, seed=1)
    q2.fqn = "v"
    q2.key = 77
    return encode_container(Container([q, q2]))


def _entry(header, i=0):
    return header["quantized"][i]


@pytest.mark.parametrize(
    "edit,kind",
    [
        (lambda h, p: _entry(h)["codebook"].update(layout="diagonal"), "unknown_codec"),
        (lambda h, p: _entry(h)["codebook"].update(layout=3), "bad_header"),
        (lambda h, p: _entry(h)["codebook"].update(exact_zero=1), "bad_header"),
        (lambda h, p: _entry(h).update(zero_index=0), "bad_value"),
        (lambda h, p: _entry(h)["indices"].update(alphabet_size=0), "bad_value"),
        (lambda h, p: _entry(h)["indices"].update(alphabet_size=1 << 40), None),  # past the coder's alphabet
        (lambda h, p: _entry(h)["indices"].update(length=_entry(h)["indices"]["length"] - 1), None),
        (lambda h, p: _entry(h).update(shape=[1 << 20, 1 << 20]), "bad_value"),  # past max_elements
    ],
)
def test_bad_headers_raise_format_error(coords_file, edit, kind):
    bad = _rewrite(coords_file, edit)
    with pytest.raises(FormatError) as err:
        decode_container(bad)
    if kind is not None:
        assert err.value.kind == kind


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_coordinate_payloads_fail_cleanly(coords_file, data):
    def edit(header, payload):
        payload = bytearray(payload)
        for _ in range(data.draw(st.integers(1, 4))):
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
        return bytes(payload)

    try:
        out = decode_container(_rewrite(coords_file, edit))
    except FormatError:
        return
    for q in out.quantized:  # what decodes is well formed: lattice points and indices into them
        lat = get_lattice(q.lattice, q.n)
        lat.from_int(q.codebook_int)  # raises on a non-member
        assert q.indices.size == 0 or int(q.indices.max()) < q.codebook_int.shape[0]


def test_e8_coset_symbol_two_is_rejected():
    """A payload whose coset column holds a 2 (valid for the coder, not for E8) is a bad_value, not garbage."""
    _, q = quantized("E8", 8, 0.05)
    data = encode_container(Container([q]))
    entry = read_header(data)["quantized"][0]
    coder = get_coder("ans-dither-v1")
    count, alphabet = entry["indices"]["count"], entry["indices"]["alphabet_size"]
    symbols = LC.vector_symbols("E8", q.codebook_int[q.indices])
    symbols[0, 0] = 2
    payload = coder.encode(symbols.ravel(), alphabet)  # unconditioned interleaved stream

    def edit(header, _):
        e = _entry(header)
        e["indices"]["length"] = len(payload)
        e["codebook"]["layout"] = "interleaved"
        return payload

    with pytest.raises(FormatError) as err:
        decode_container(_rewrite(data, edit))
    assert err.value.kind == "bad_value"
    assert count == symbols.shape[0]

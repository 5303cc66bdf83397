"""ans-dither-v1: static ANS with per-dither-bin tables (udnc_fx.coding.ans)."""

from __future__ import annotations

import numpy as np
import pytest

from udnc_fx.coding import get_coder
from udnc_fx.coding.ans import SEGMENT, AnsDitherCoder, _pack_bits, dither_codes, table_model
from udnc_fx.coding.coder_base import varint as _varint, varints as _varints
from udnc_fx.coding.coders import empirical_entropy_bits
from udnc_fx.dither import hash_stream_np, uniform_np
from udnc_fx.errors import ConfigError, FormatError

CODER = get_coder("ans-dither-v1")


def dithered_z1(n: int, step: float, key: int = 99, seed: int = 0) -> tuple[np.ndarray, int, np.ndarray]:
    """Indices of a subtractively dithered Z¹ quantizer on Laplacian data, with the stream's dither codes."""
    v = np.random.default_rng(seed).laplace(size=n)
    r = uniform_np(key, n)
    y = np.round(v / step + (r - np.round(r))).astype(np.int64)
    k = y - y.min()
    return k, int(k.max()) + 1, dither_codes(key, n, 1)


def test_dither_codes_are_the_top_bits_of_the_dither_hash():
    # Test vectors (docs/FORMAT.md, *Dither context*).
    assert dither_codes(1, 12, 1).tolist() == [10, 10, 6, 12, 8, 15, 1, 9, 14, 7, 1, 1]
    assert dither_codes(0x0123456789ABCDEF, 12, 8).tolist() == [10, 1, 13, 5, 9, 13, 13, 11, 11, 11, 10, 5]
    for n in (1, 2, 3, 8):
        count = 70_000  # crosses a hashing chunk
        expected = hash_stream_np(12345, count * n)[::n] >> 28
        np.testing.assert_array_equal(dither_codes(12345, count, n), expected)
    with pytest.raises(ConfigError):
        dither_codes(1, 2**31 + 1, 2)


@pytest.mark.parametrize("q", [[1, 1], [5, 0, 3], [1] + [0] * 1000 + [7], [2**32 - 1, 1], list(range(1, 300))])
def test_table_model_is_exact_and_leak_free(q):
    probs = table_model(np.array(q))
    assert probs.sum() == 1 << 24 and probs.min() >= 1 and probs.size == len(q)
    # proportional to q up to the +1 floor and rounding
    free = (1 << 24) - len(q)
    assert np.all(np.abs((probs - 1) - np.array(q) * free / sum(q)) <= 1.0)


def test_coded_length_is_the_ideal_length_of_the_stored_model():
    """constriction codes with exactly table_model's probabilities: the payload is their ideal length + O(1)."""
    stream, k, codes = dithered_z1(200_000, 1.0)
    data = CODER.encode(stream, k, context=codes)
    bits, classes, _, tables, _, _ = CODER._choose(stream, codes, None)
    assert classes == 0
    bins = codes >> (4 - bits)
    ideal = 0.0
    for b, q in enumerate(tables):
        if q.size >= 2:
            p = table_model(q)
            ideal += float(np.sum(np.log2((1 << 24) / p[stream[bins == b]])))
    words = (len(data) - len(_header_of(data, tables))) // 4
    assert ideal <= 32 * words <= ideal + 96


def _header_of(data: bytes, tables) -> bytes:
    """Everything before the words: b, the tables and the word count."""
    from udnc_fx.coding.ans import table_bytes

    head = bytes([data[0]]) + b"".join(table_bytes(q) for q in tables)
    rest = data[len(head) :]
    # the varint word count
    i = 0
    while rest[i] & 0x80:
        i += 1
    return head + rest[: i + 1]


@pytest.mark.parametrize("step,expect_bins", [(3.0, True), (0.05, False)])
def test_bins_are_chosen_only_where_they_pay(step, expect_bins):
    stream, k, codes = dithered_z1(100_000, step)
    with_context = CODER.encode(stream, k, context=codes)
    without = CODER.encode(stream, k)
    np.testing.assert_array_equal(CODER.decode(with_context, stream.size, k, context=codes), stream)
    np.testing.assert_array_equal(CODER.decode(without, stream.size, k), stream)
    entropy = empirical_entropy_bits(stream, k)
    assert 8 * len(without) <= 1.01 * entropy + 200
    if expect_bins:  # low rate: H(K|U) well below H(K)
        assert with_context[0] > 0 and len(with_context) < 0.9 * len(without)
    else:  # high rate: no gain, no side information paid
        assert with_context[0] == 0 and with_context == without


def test_context_may_be_a_function_called_only_when_needed():
    stream, k, codes = dithered_z1(20_000, 0.05)
    calls = []

    def lazy():
        calls.append(1)
        return codes

    data = CODER.encode(stream, k, context=codes)
    assert data[0] == 0
    np.testing.assert_array_equal(CODER.decode(data, stream.size, k, context=lazy), stream)
    assert not calls
    stream, k, codes = dithered_z1(20_000, 3.0)
    data = CODER.encode(stream, k, context=lazy)
    assert data[0] > 0 and calls
    np.testing.assert_array_equal(CODER.decode(data, stream.size, k, context=lazy), stream)


def test_segments_and_every_bin_count_round_trip():
    stream, k, codes = dithered_z1(SEGMENT + 12_345, 2.0)
    data = CODER.encode(stream, k, context=codes)
    assert data == CODER.encode(stream, k, context=codes.copy())  # deterministic
    np.testing.assert_array_equal(CODER.decode(data, stream.size, k, context=codes), stream)
    for bits in range(5):  # force each bin count through a stream whose codes use only the top `bits` bits
        coarse = (codes >> (4 - bits)) << (4 - bits) if bits else np.zeros_like(codes)
        np.testing.assert_array_equal(
            CODER.decode(CODER.encode(stream[:5000], k, context=coarse[:5000]), 5000, k, context=coarse[:5000]),
            stream[:5000],
        )


def test_context_errors():
    stream, k, codes = dithered_z1(10_000, 3.0)
    data = CODER.encode(stream, k, context=codes)
    with pytest.raises(FormatError) as info:
        CODER.decode(data, stream.size, k)  # conditioned stream, no dither
    assert info.value.kind == "bad_value"
    with pytest.raises(FormatError):
        CODER.decode(data, stream.size, k, context=codes[:-1])
    with pytest.raises(FormatError):
        CODER.decode(data, stream.size, k, context=codes.astype(np.int64) + 16)
    with pytest.raises(ConfigError):
        CODER.encode(stream, k, context=codes[:-1])
    with pytest.raises(ConfigError):
        CODER.encode(stream, k, context=np.full(stream.size, 16))


def payload(bits: int, tables: list[bytes], words: np.ndarray = np.zeros(0, np.uint32)) -> bytes:
    return bytes([bits]) + b"".join(tables) + _varint(words.size) + words.astype("<u4").tobytes()


def dense(q: list[int]) -> bytes:
    return _varint(len(q)) + b"\x00" + _varints(np.array(q))


@pytest.mark.parametrize(
    "data,n,k,kind",
    [
        (payload(5, []), 10, 4, "corrupt_payload"),  # more context bits than there are
        (payload(0, [dense([1, 1, 1, 1, 1])]), 10, 4, "corrupt_payload"),  # m > K
        (payload(0, [_varint(0)]), 10, 4, "corrupt_payload"),  # no table for a bin that holds symbols
        (payload(0, [dense([1, 0])]), 10, 4, "corrupt_payload"),  # trailing zero count
        (payload(0, [dense([2**32, 1])]), 10, 4, "corrupt_payload"),  # sums past 2**32
        (payload(0, [_varint(2) + b"\x07"]), 10, 4, "truncated"),  # packed, 6 bits each: the fields are missing
        (payload(0, [_varint(2) + b"\x40"]), 10, 4, "corrupt_payload"),  # form 64: unknown
        (payload(0, [_varint(2) + b"\x03" + _pack_bits(np.array([1, 3]), 2)[:-1] + b"\xf3"]), 10, 4, "corrupt_payload"),
        (payload(0, [_varint(3) + b"\x01" + _varint(2) + _varints(np.array([0, 5])) + _varints(np.array([1, 1]))]),
         10, 4, "corrupt_payload"),  # sparse gap past m
        (payload(0, [_varint(3) + b"\x01" + _varint(1) + _varints(np.array([0])) + _varints(np.array([1]))]),
         10, 4, "corrupt_payload"),  # sparse table not ending at m - 1
        (payload(0, [dense([1, 1])]), 10**9, 4, "corrupt_payload"),  # 1e9 one-bit symbols in zero words
        (payload(0, [dense([1, 1])], np.array([5, 7], np.uint32)) + b"\x00", 10, 4, "corrupt_payload"),  # trailing
        (payload(0, [dense([1, 1])], np.array([5, 7], np.uint32))[:-1], 10, 4, "truncated"),
        (b"", 10, 4, "truncated"),
        (b"\x00", 0, 4, "corrupt_payload"),  # bytes for an empty stream
    ],
)
def test_bad_payloads_raise_format_error(data, n, k, kind):
    with pytest.raises(FormatError) as info:
        CODER.decode(data, n, k)
    assert info.value.kind == kind


def test_short_count_and_leftover_words_are_detected():
    stream, k, codes = dithered_z1(5_000, 1.0)
    data = CODER.encode(stream, k, context=codes)
    with pytest.raises(FormatError):
        CODER.decode(data, stream.size - 1, k, context=codes[:-1])


def test_claimed_count_is_bounded_before_allocation():
    # A 2-symbol table whose largest probability is 1/2: every symbol costs a bit; 1e12 symbols do not fit in 2 words.
    data = payload(0, [dense([1, 1])], np.array([5, 7], np.uint32))
    with pytest.raises(FormatError) as info:
        CODER.decode(data, 10**12, 4)
    assert info.value.kind == "corrupt_payload"


def test_exact_zero_streams_round_trip_and_beat_order0():
    """Pruned weights: a dominant zero symbol, independent of the dither, mixed with dithered values."""
    stream, k, codes = dithered_z1(50_000, 2.0)
    zero = 0
    pruned = np.random.default_rng(3).random(stream.size) < 0.7
    stream = np.where(pruned, zero, stream + 1)
    k += 1
    data = CODER.encode(stream, k, context=codes)
    np.testing.assert_array_equal(CODER.decode(data, stream.size, k, context=codes), stream)
    assert 8 * len(data) < empirical_entropy_bits(stream, k)


def test_is_a_registered_coder_with_the_documented_limits():
    assert isinstance(CODER, AnsDitherCoder) and CODER.max_alphabet_size == (1 << 24) - 2
    with pytest.raises(ConfigError):
        CODER.encode(np.array([0]), 1 << 24)
    big = np.array([0, (1 << 24) - 3, 5])
    np.testing.assert_array_equal(CODER.decode(CODER.encode(big, (1 << 24) - 2), 3, (1 << 24) - 2), big)


def row_stream(rows: int = 64, length: int = 512, seed: int = 0) -> tuple[np.ndarray, int, np.ndarray]:
    """A pruned weight whose output units (rows) keep very different fractions of their weights."""
    stream, k, codes = dithered_z1(rows * length, 2.0, seed=seed)
    density = np.random.default_rng(seed).choice([0.02, 0.1, 0.4, 0.9], rows)
    keep = np.random.default_rng(seed + 1).random(stream.size) < np.repeat(density, length)
    return np.where(keep, stream + 1, 0), k + 1, codes


def test_row_classes_pay_on_pruned_rows_and_round_trip():
    stream, k, codes = row_stream()
    with_rows = CODER.encode(stream, k, context=codes, row_length=512)
    without = CODER.encode(stream, k, context=codes)
    assert with_rows[0] & 0x08 and not without[0] & 0x08
    assert len(with_rows) < 0.9 * len(without)
    np.testing.assert_array_equal(CODER.decode(with_rows, stream.size, k, context=codes), stream)
    # the row length is read from the payload: a last row shorter than the others is fine too
    short = stream[:-100]
    data = CODER.encode(short, k, context=codes[:-100], row_length=512)
    np.testing.assert_array_equal(CODER.decode(data, short.size, k, context=codes[:-100]), short)
    # no row structure: the hint is ignored (the cheaper layout is kept)
    flat, k2, codes2 = dithered_z1(20_000, 2.0)
    assert CODER.encode(flat, k2, context=codes2, row_length=100) == CODER.encode(flat, k2, context=codes2)


@pytest.mark.parametrize(
    "data,n",
    [
        (bytes([0x08]) + _varint(10) + _varint(2) + _varint(1) + dense([1, 1]) + _varint(0), 10),  # L = n
        (bytes([0x08]) + _varint(5) + _varint(1) + _varint(1) + dense([1, 1]) + _varint(0), 10),  # 1 class
        (bytes([0x08]) + _varint(5) + _varint(17) + _varint(1) + dense([1, 1]) + _varint(0), 10),  # 17 classes
        (bytes([0x0C]) + _varint(5) + _varint(32) + _varint(1), 10),  # 32 classes x 16 bins
        (bytes([0x08]) + _varint(5) + _varint(2) + _varint(3), 10),  # label table wider than the classes
        (bytes([0x10]), 10),  # unknown mode bit
    ],
)
def test_bad_row_mode_payloads(data, n):
    with pytest.raises(FormatError) as info:
        CODER.decode(data, n, 4, context=np.zeros(n, np.uint8))
    assert info.value.kind == "corrupt_payload"


def _one_table_rule(counts):
    """The table rule written out width by width for one bin (the writer's definition, kept here as the reference
    for the vectorised ``_best_tables``): trailing zeros trimmed, each width's quantized counts, its exact bytes
    (``_table_cost``) plus the coded bits, the first of equal costs, stopping at the first width the counts fit."""
    from udnc_fx.coding.ans import _PRECISION, _TABLE_WIDTHS, _quantize_counts, _table_cost, table_model

    used = np.flatnonzero(counts)
    if used.size == 0:
        return np.zeros(0, np.int64), 1.0
    m = int(used[-1]) + 1
    if m == 1:
        return np.ones(1, np.int64), 1.0
    counts = np.asarray(counts[:m], np.int64)
    best = None
    for width in _TABLE_WIDTHS:
        q = _quantize_counts(counts, width)
        bits = float(np.sum(counts * (_PRECISION - np.log2(table_model(q)))))
        cost = _table_cost(q) + bits / 8
        if best is None or cost < best[1]:
            best = (q, cost)
        if width is None or int(counts.max()) < 1 << width:
            break
    return best


def test_vectorised_table_choice_matches_the_one_table_rule():
    """Same tables and the same costs, to the last bit, as the rule applied bin by bin: the writer's bytes depend
    on them. Rows of every size of count (so every width is the best somewhere), empty rows, rows of one symbol,
    trailing zeros, and blocks of widths (wide alphabets are evaluated a width at a time)."""
    from udnc_fx.coding.ans import _best_table, _best_tables

    rng = np.random.default_rng(0)
    for trial in range(40):
        m, rows = (int(rng.integers(1, 40)), int(rng.integers(1, 8))) if trial % 20 else (2000, 3)
        scale = 10 ** rng.uniform(0, 9)
        counts = np.floor(rng.exponential(scale, (rows, m)) * (rng.random((rows, m)) < rng.random())).astype(np.int64)
        counts[rng.random(rows) < 0.2] = 0
        if rng.random() < 0.3:
            counts[:, m // 2 :] = 0
        tables, cost = _best_tables(counts)
        reference = [_one_table_rule(row) for row in counts]
        assert cost == pytest.approx(sum(c for _, c in reference), rel=1e-12)
        for row, got, (want, want_cost) in zip(counts, tables, reference):
            np.testing.assert_array_equal(got, want)
            one, one_cost = _best_table(row)
            np.testing.assert_array_equal(one, want)
            assert one_cost == want_cost  # exactly: the writer compares these costs


@pytest.mark.parametrize("step", [0.05, 1.0, 3.0])  # one context (fine step) and dither-conditioned streams
def test_decode_into_a_narrow_dtype_and_in_chunks_gives_the_same_symbols(step, monkeypatch):
    """``dtype=`` (what the container asks for) and chunked single-context decoding change no symbol."""
    stream, k, codes = dithered_z1(3 * SEGMENT + 17, step)
    data = CODER.encode(stream, k, context=codes)
    reference = CODER.decode(data, stream.size, k, context=codes)
    assert reference.dtype == np.int64 and np.array_equal(reference, stream)
    narrow = np.uint8 if k <= 256 else np.uint16
    out = CODER.decode(data, stream.size, k, context=codes, dtype=narrow)
    assert out.dtype == narrow and np.array_equal(out, stream)
    import udnc_fx.coding.ans as ans

    monkeypatch.setattr(ans, "_DECODE_CHUNK", 1000)  # many calls of one model pop the same symbols as one
    assert np.array_equal(CODER.decode(data, stream.size, k, context=codes, dtype=np.int32), stream)
    if k > 2:
        with pytest.raises(ConfigError):
            CODER.decode(data, stream.size, k, context=codes, dtype=np.dtype(np.bool_))
    with pytest.raises(ConfigError):
        CODER.decode(data, stream.size, 300, context=codes, dtype=np.uint8)  # 299 does not fit a byte
    with pytest.raises(ConfigError):
        CODER.decode(data, stream.size, k, context=codes, dtype=np.float32)



@pytest.mark.parametrize("trim", [0, 100])  # a last row shorter than the others, or none
def test_chosen_tables_are_the_best_tables_of_the_coded_contexts(trim):
    """The writer's joint (row class, dither code, symbol) counts are those of the contexts it codes with."""
    from udnc_fx.coding.ans import _best_tables

    stream, k, codes = row_stream()
    stream, codes = stream[: stream.size - trim], codes[: codes.size - trim]
    bits, classes, labels, tables, _, _ = CODER._choose(stream, codes, 512)
    assert classes and bits  # both the row and the dither paths are exercised
    ctx = CODER._contexts(codes, bits, labels, 512, stream.size).astype(np.int64)
    m = int(stream.max()) + 1
    counts = np.bincount(ctx * m + stream, minlength=(classes << bits) * m).reshape(-1, m)
    expected, _ = _best_tables(counts)
    assert len(tables) == len(expected)
    for got, want in zip(tables, expected):
        np.testing.assert_array_equal(got, want)


def _choice_one_pass_per_option(arr, codes, row_length):
    """The writer's choice written out plainly: for no rows and each row-class count, the contexts built from the
    labels and dither codes, counted in a pass of their own, then the same cost rule and early stop per option."""
    from udnc_fx.coding.ans import CONTEXT_BITS, _best_tables, _label_cost, _row_labels

    m = int(arr.max()) + 1
    room = 4 * arr.size + (1 << 16)
    max_bits = CONTEXT_BITS if codes is not None and m << CONTEXT_BITS <= room else 0
    options = [(0, None)]
    if row_length is not None:
        options += [(c, _row_labels(arr, row_length, c)) for c in CODER._ROW_CLASSES if (m * c) << max_bits <= room]
    best = None
    for classes, labels in options:
        label_q, label_cost = (None, 0.0) if labels is None else _label_cost(labels, classes)
        label_cost += 0 if labels is None else 2
        previous = np.inf
        for bits in range(max_bits + 1):
            ctx = CODER._contexts(codes, bits, labels, row_length, arr.size)
            ctx = np.zeros(arr.size, np.int64) if ctx is None else ctx.astype(np.int64)
            nctx = max(classes, 1) << bits
            tables, cost = _best_tables(np.bincount(ctx * m + arr, minlength=nctx * m).reshape(nctx, m))
            cost += 1 + label_cost
            if best is None or cost < best[0]:
                best = (cost, bits, classes, labels, tables, label_q)
            if cost >= previous:
                break
            previous = cost
    return best[1:]


@pytest.mark.parametrize("case", ["rows", "rows-trimmed", "dither-only", "undithered-rows"])
def test_choice_from_one_joint_count_is_the_choice_of_a_pass_per_option(case):
    """The writer counts once at the finest row classes and sums for the coarser ones: the same choice (mode, labels,
    tables) as counting each option's contexts on their own."""
    if case == "dither-only":
        stream, k, codes = dithered_z1(50_000, 1.0)
        row_length = None
    else:
        stream, k, codes = row_stream(rows=48, length=300, seed=3)
        if case == "rows-trimmed":
            stream, codes = stream[:-77], codes[:-77]
        if case == "undithered-rows":
            codes = None
        row_length = 300
    got = CODER._choose(stream, None if codes is None else codes.astype(np.uint8), row_length)
    want = _choice_one_pass_per_option(stream, None if codes is None else codes.astype(np.uint8), row_length)
    assert got[:2] == want[:2]
    assert (got[2] is None) == (want[2] is None) and (got[2] is None or np.array_equal(got[2], want[2]))
    assert len(got[3]) == len(want[3]) and all(np.array_equal(a, b) for a, b in zip(got[3], want[3]))
    assert (got[4] is None) == (want[4] is None) and (got[4] is None or np.array_equal(got[4], want[4]))

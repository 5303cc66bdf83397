"""``ans-dither-v1``: static two-pass ANS coding of index streams, conditioned on the dither (NumPy + constriction).

Why: the universal quantizer's rate is ``H(K | U)``, not ``H(K)``. The decoder regenerates each weight's dither
before it decodes the weight's index, so the index can be coded with ``P(k | u)``. Splitting the stream into ``B``
bins of the dither value and giving each bin its own static table captures that gain (FINDINGS.md: 8 bins get all
of it on synthetic Z¹ sources; the 38k-parameter CNN's 8-bin conditional entropy is 0.92x its order-0 entropy at
1.5 bits/weight). The coder picks ``B`` per stream by the exact byte cost, tables included, so the side information
is only paid where it pays (``B = 1`` otherwise). Decoding is a handful of vectorised ``constriction`` calls per
2^16 symbols: no per-symbol or per-block Python.

**Context.** ``dither_codes(key, count, n)`` gives each index (lattice vector ``j``) a 4-bit code: the top 4 bits of
the dither generator's hash ``h`` for element ``j·n`` (the vector's first coordinate; ``udnc_fx.dither``), i.e.
``floor(16·r)`` for that coordinate's uniform variate ``r``. For ``Z^n`` that is a bin of the first coordinate of the
dither itself (``u = r − round(r)``: the bins of ``r`` are those of ``u``, rotated by half a period). For ``A2``,
``D4`` and ``E8`` the dither is ``x − Q(x)`` with ``x = r ⊙ box``: ``r`` is a function of the dither (up to a
measure-zero boundary), and the code is a bin of its first box coordinate. A stream with ``B = 2^b`` bins uses the
code's top ``b`` bits. Undithered tensors have no context and always ``B = 1``.

**Row classes.** Pruning leaves output units (rows) of very different density, and unpruned weights rows of very
different scale (a transformer's token embeddings), which no per-weight context sees. A stream may carry a class
label per row (``C`` classes), coded first; the context of index ``j`` is then ``label(j // L) · B + bin(j)``. The
writer labels a row either by its density of symbols other than the most frequent one, in ``C`` equal steps, or by
the rank of its mean symbol among the rows, in ``C`` equal quantiles (symbols grow with a weight's magnitude), and
uses whichever labelling, if any, makes the stream smallest; readers take the labels as given.

**Payload** (``count == 0`` or ``alphabet_size == 1``: zero bytes). ``varint`` is unsigned LEB128 (``coder_base.py``):

1. a mode byte: bits 0–2 ``b`` in ``0..4`` (``B = 2^b`` dither bins), bit 3 the row flag, other bits zero;
2. with the row flag: ``L`` (varint, ``1 <= L < count``: the row length; ``R = ceil(count / L)`` rows), ``C``
   (varint, ``2 <= C <= 16``, ``C · B <= 256``) and the label table (a table as below over ``C`` symbols, with
   ``1 <= m <= C``);
3. for each context ``i = 0..C·B-1`` (``C = 1`` without the row flag), its table: ``m_i`` (varint,
   ``0 <= m_i <= K``; ``0`` exactly when the context holds no symbols; ``m_i = 1`` means every symbol of it is
   ``0`` and nothing of it is coded). When ``m_i >= 2``, the counts ``q_0..q_{m_i-1}`` (``q_{m_i-1} > 0``,
   ``0 < Q = Σq <= 2^32``) follow in one of three forms, after a form byte ``f``: ``f = 0``, dense: ``m_i`` varints
   ``q_j``; ``f = 1``, sparse: a varint ``u`` (``1..m_i``), ``u`` varint gaps giving the positions of the non-zero
   counts (the first gap is the first position, each next one the distance to the previous position minus one;
   the last position must be ``m_i − 1``), then those ``u`` counts (each ``> 0``); ``f = 1 + w`` with ``w`` in
   ``1..32``, packed: ``m_i`` fields of ``w`` bits, least significant bit first, in ``ceil(m_i·w/8)`` bytes whose
   padding bits are zero;
4. ``W`` (varint) then ``W`` little-endian 32-bit words: one ``constriction.stream.stack.AnsCoder`` stream (32-bit
   words, 24-bit precision), ending exactly at the end of the payload.

The model of a bin with ``m >= 2`` is pure integer arithmetic (``T = 2^24``, ``F = T − m``, ``C_j = Σ_{l<j} q_l``):
``left_j = floor(C_j · F / Q) + j`` for ``j = 0..m`` (so ``left_m = T``), symbol ``j`` has probability
``(left_{j+1} − left_j) / T >= 1/T``. It is handed to constriction as ``Categorical(left_{j+1} − left_j − 1,
perfect=False)``, whose fast quantization reproduces exactly these integers (its scale is ``(T − m) / F = 1``).

**Order.** The ``R`` row labels come first (when the label table has ``m >= 2``; ``m = 1``: every label is 0).
Then the symbols, in segments of ``2^16`` consecutive stream positions; within a segment, context by context in
ascending order, and within a context in stream order. The ANS stream is a stack: the writer pushes the segments
and contexts in reverse (``encode_reverse``), the labels last, so the reader pops them in that order. After the
last symbol the reader's coder must be empty (the payload was consumed exactly).

Bad payloads raise :class:`~udnc_fx.errors.FormatError` before anything large is allocated: a bad mode byte,
``L``, ``C`` or label table, ``m_i > K``, a table for an empty context or none for a full one, non-canonical or out-of-range tables, a stream
claiming more symbols than its words can hold (each symbol of a bin costs at least ``−log2(max_j p_j)`` bits),
words missing or trailing, a coder not empty at the end.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from udnc_fx import dither as _dither
from udnc_fx.coding.coder_base import (
    Coder,
    as_format_error,
    check_decode_args,
    check_symbols,
    read_varint,
    read_varints,
    register,
    varint,
    varints,
)
from udnc_fx.errors import ConfigError, FormatError

__all__ = ["AnsDitherCoder", "CONTEXT_BITS", "SEGMENT", "dither_codes", "table_bytes", "table_model"]

#: Bits of dither context per symbol (the code is in ``[0, 2**CONTEXT_BITS)``); a stream uses its top ``b <= 4``.
CONTEXT_BITS = 4
#: Stream positions per segment (a format constant: it fixes the coding order).
SEGMENT = 1 << 16
_PRECISION = 24
_TOTAL = 1 << _PRECISION
_MAX_Q = 1 << 32
# Table precisions the writer tries (bits of the largest quantized count); None = exact counts.
# Bit widths the writer tries for quantized tables (the largest count becomes 2**w - 1); None = exact counts.
_TABLE_WIDTHS = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, None)
_DENSE, _SPARSE = 0, 1  # table form tags; 2 + w - 1 for bit-packed counts of width w in 1..32
_MAX_WIDTH = 32
_HASH_CHUNK = 1 << 16  # elements per hashing step: the temporaries stay in cache
_DECODE_CHUNK = 1 << 20
# What an ANS stream costs beyond its symbols' ideal bits: constriction's final 64-bit state, less what the first
# symbols' bits fill of it, plus padding to a 32-bit word: 36 bits on average, within ±24 per stream (measured on
# random streams of 10 to 10^5 symbols, tests/format/test_rate_estimate.py).
_STREAM_OVERHEAD_BITS = 36.0  # symbols per decode call of a single-context stream: bounds the int32 temporary
_COUNT_CHUNK = 1 << 20  # symbols per counting step of the writer's table choice: bounds its int32 temporaries


def dither_codes(key: int, count: int, n: int) -> np.ndarray:
    """The 4-bit dither code of each of ``count`` lattice vectors of dimension ``n`` under dither ``key``.

    ``code_j = h(key, j·n) >> 28``: the top bits of the hash behind the first coordinate of vector ``j``'s dither
    (``udnc_fx.dither``'s generator, bit-exact everywhere). Computed in chunks so the hash's temporaries stay small.

    Raises:
        ConfigError: if ``count · n`` exceeds the dither's 32-bit counter.
    """
    count, n = int(count), int(n)
    if count < 0 or n < 1 or count * n > _dither.MAX_COUNT:
        raise ConfigError(f"dither codes for {count} vectors of dimension {n} exceed the 32-bit counter")
    a, b = _dither.key_words(key)
    out = np.empty(count, np.uint8)
    ua, ub, shift = np.uint32(a), np.uint32(b), np.uint32(32 - CONTEXT_BITS)
    step = _HASH_CHUNK * n
    base = np.arange(0, step, n, dtype=np.uint64).astype(np.uint32)  # j·n < 2**32: exact
    h = np.empty_like(base)
    for start in range(0, count, _HASH_CHUNK):
        size = min(count - start, _HASH_CHUNK)
        hv = h[:size]
        np.add(base[:size], np.uint32((start * n) & 0xFFFFFFFF), out=hv)
        hv ^= ua
        _dither.fmix32_np(hv)
        hv ^= ub
        _dither.fmix32_np(hv)
        np.right_shift(hv, shift, out=hv)
        out[start : start + size] = hv
    return out


def table_model(q: np.ndarray, precision: int = _PRECISION, sparse: bool = False) -> np.ndarray:
    """The integer model of a table ``q`` (length ``m >= 2``): the ``m`` probabilities out of ``T = 2**precision``.

    ``left_j = floor(C_j · (T − m) / Q) + j`` with ``C_j`` the prefix sums of ``q`` and ``Q`` their total (every
    symbol >= 1: ``ans-dither-v1``, 24 bits); with ``sparse``, ``left_j = floor(C_j · (T − u) / Q) + U_j`` where
    ``U_j`` counts the non-zero ``q_l`` with ``l < j`` and ``u = U_m`` (a symbol of count 0 gets probability 0, every
    other >= 1: ``ans-dither-v2``; needs ``u <= T``). Exact in int64 because ``Q <= 2**32`` and ``T <= 2^24``.
    """
    q = np.asarray(q, np.int64)
    m = q.size
    cum = np.zeros(m + 1, np.int64)
    np.cumsum(q, out=cum[1:])
    if sparse:
        floor = np.zeros(m + 1, np.int64)
        np.cumsum(q > 0, out=floor[1:])
    else:
        floor = np.arange(m + 1, dtype=np.int64)
    free = (1 << precision) - int(floor[-1])
    left = cum * free // int(cum[-1]) + floor
    return np.diff(left)


def _constriction():
    import constriction  # noqa: PLC0415 -- optional at import time: only this coder needs it

    return constriction


def _categorical(weights: np.ndarray):
    # weights - 1 sum to exactly 2**24 - m, so constriction's fast rule has scale 1 and keeps them (module doc).
    return _constriction().stream.model.Categorical((weights - 1).astype(np.float64), perfect=False)


def _quantize_counts(counts: np.ndarray, width: int | None) -> np.ndarray:
    """Counts scaled so the largest is ``2**width - 1`` (non-zero counts stay non-zero); exact when they fit."""
    top = int(counts.max())
    if width is None or top < 1 << width:
        return counts.astype(np.int64)
    scaled = np.floor(counts * (((1 << width) - 1) / top) + 0.5).astype(np.int64)
    return np.where(counts > 0, np.maximum(scaled, 1), 0)


def _varint_bytes(values: np.ndarray) -> int:
    v = np.asarray(values, np.int64)
    nbytes = v.size
    top = int(v.max()) if v.size else 0
    for j in range(1, 10):
        if top < 1 << (7 * j):
            break  # no value needs another byte
        nbytes += int(np.count_nonzero(v >= (1 << (7 * j))))
    return nbytes


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    """``values`` (each < 2**width) as ``width``-bit fields, least significant bit first, zero-padded to a byte."""
    bits = (values[:, None].astype(np.uint64) >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _table_forms(q: np.ndarray) -> list[tuple[int, int]]:
    """``(tag, byte cost)`` of each form that can hold ``q`` (``m >= 2``), the tag byte included."""
    pos = np.flatnonzero(q)
    gaps = np.diff(pos, prepend=-1) - 1
    width = max(1, int(q.max()).bit_length())
    forms = [(_DENSE, 1 + _varint_bytes(q)),
             (_SPARSE, 1 + _varint_bytes(np.array([pos.size])) + _varint_bytes(gaps) + _varint_bytes(q[pos]))]
    if width <= _MAX_WIDTH:
        forms.append((1 + width, 1 + -(-q.size * width // 8)))
    return forms


def table_bytes(q: np.ndarray) -> bytes:
    """A table's bytes: ``m``, then for ``m >= 2`` the shortest form (the first on a tie)."""
    head = varint(q.size)
    if q.size < 2:
        return head
    tag = min(_table_forms(q), key=lambda f: f[1])[0]
    if tag == _DENSE:
        return head + bytes([tag]) + varints(q)
    if tag == _SPARSE:
        pos = np.flatnonzero(q)
        gaps = np.diff(pos, prepend=-1) - 1
        return head + bytes([tag]) + varint(pos.size) + varints(gaps) + varints(q[pos])
    return head + bytes([tag]) + _pack_bits(q, tag - 1)


def _table_cost(q: np.ndarray) -> int:
    """``len(table_bytes(q))`` without building the bytes."""
    return _varint_bytes(np.array([q.size])) + min(c for _, c in _table_forms(q))


def _best_table(counts: np.ndarray, precision: int = _PRECISION, sparse: bool = False) -> tuple[np.ndarray, float]:
    """The table of a bin (``q``, trailing zeros trimmed) minimising table bytes + coded bits/8, and that cost."""
    used = np.flatnonzero(counts)
    if used.size == 0:
        return np.zeros(0, np.int64), 1.0  # m = 0: one byte
    m = int(used[-1]) + 1
    if m == 1:
        return np.ones(1, np.int64), 1.0
    # The one-row case of _best_tables, on the trimmed counts: the same widths in the same order, the same integer
    # form costs and the same bits (a sum over the same m values), so the same table and cost as trying each width
    # with _quantize_counts, table_model and _table_cost (tests/unit/test_ans.py holds the two against each other).
    tables, cost = _best_tables(np.asarray(counts[:m], np.int64)[None, :], precision, sparse)
    return tables[0], cost


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of each value's varint, element-wise (values >= 0)."""
    out = np.ones(values.shape, np.int64)
    top = int(values.max()) if values.size else 0
    for j in range(1, 10):
        if top < 1 << (7 * j):
            break
        out += values >= (1 << (7 * j))
    return out


def _best_tables(counts: np.ndarray, precision: int = _PRECISION, sparse: bool = False
                 ) -> tuple[list[np.ndarray], float]:
    """:func:`_best_table` for every row of ``counts`` (contexts × symbols) at once: the tables and their total cost.

    Vectorised over contexts and table widths: a stream with row classes and dither bins weighs hundreds of candidate
    tables of a few dozen symbols each, so what costs is the number of NumPy calls, not the arithmetic. The widths
    are evaluated in blocks of ``(widths, rows, m)`` (all twelve at once unless that array would be large), and for
    each row only up to the first width its counts fit: every wider one keeps the same exact counts, so the same
    cost, which cannot be strictly better. Each row's cost is computed element-wise and summed along its own
    C-contiguous row, so it is the same number whatever else shares the block; ties keep the narrower width.
    """
    counts = counts.astype(np.int64)
    rows, m = counts.shape
    nonzero = counts > 0
    used = np.where(nonzero.any(axis=1), m - np.argmax(nonzero[:, ::-1], axis=1), 0)  # m_i: trailing zeros trimmed
    top = counts.max(axis=1)
    positions = np.arange(m)
    # sparse form: each non-zero count's distance to the previous one, minus one
    last_before = np.maximum.accumulate(np.where(nonzero, positions, -1), axis=1)
    gaps = positions - np.concatenate([np.full((rows, 1), -1), last_before[:, :-1]], axis=1) - 1
    gap_bytes = np.where(nonzero, _varint_lengths(gaps), 0).sum(axis=1)
    nnz = nonzero.sum(axis=1)
    head = _varint_lengths(used) + 1 + 0.0  # m and the form byte
    sparse_head = _varint_lengths(nnz) + gap_bytes
    # the model of table_model(q, precision, sparse): every symbol up to m_i >= 1, or (sparse) every used one
    floor = np.zeros((rows, m + 1), np.int64)
    if sparse:
        np.cumsum(nonzero, axis=1, out=floor[:, 1:])
        free = ((1 << precision) - nnz)[:, None]
    else:
        floor[:] = np.arange(m + 1)
        free = ((1 << precision) - used)[:, None]
    # The first width each row's counts fit (the exact table; None fits every row): its last candidate.
    fits = np.array([w is None for w in _TABLE_WIDTHS])[:, None] | (
        top[None, :] < np.array([1 << (w or 0) for w in _TABLE_WIDTHS])[:, None]
    )
    last = np.argmax(fits, axis=0)
    best_cost = np.full(rows, np.inf)
    best_q = np.zeros_like(counts)
    block = max(1, (1 << 16) // max(1, rows * (m + 1)))
    for start in range(0, int(last.max()) + 1, block):
        idx = np.arange(start, min(start + block, int(last.max()) + 1))
        exact = fits[idx]  # (widths, rows): these keep the counts as they are
        maxima = np.array([(1 << w) - 1 if w is not None else 0 for w in (_TABLE_WIDTHS[i] for i in idx)])
        scale = maxima[:, None] / np.maximum(top, 1)[None, :]
        scaled = np.floor(counts[None] * scale[:, :, None] + 0.5).astype(np.int64)
        # non-zero counts stay non-zero (>= 1), zero ones stay zero (they scale to floor(0.5) = 0)
        q = np.where(exact[:, :, None], counts[None], np.maximum(scaled, nonzero[None]))
        cum = np.zeros((idx.size, rows, m + 1), np.int64)
        np.cumsum(q, axis=2, out=cum[:, :, 1:])
        left = cum * free[None] // np.maximum(cum[:, :, -1:], 1) + floor[None]
        # every difference is >= 1 (for totals within the format's 2**32) and exactly 1 past the last used symbol
        probs = np.diff(left, axis=2)
        bits = (counts[None] * (precision - np.log2(np.maximum(probs, 1)))).sum(axis=2)
        q_lengths = _varint_lengths(q).sum(axis=2)  # zeros cost one byte each in the dense form
        dense = q_lengths - (m - used)[None]
        sparse = sparse_head[None] + q_lengths - (m - nnz)[None]
        bit_width = np.maximum(1, np.floor(np.log2(np.maximum(q.max(axis=2), 1))).astype(np.int64) + 1)
        packed = np.where(bit_width <= _MAX_WIDTH, (used[None] * bit_width + 7) // 8, np.inf)
        cost = head[None] + np.minimum(np.minimum(dense, sparse), packed) + bits / 8
        cost = np.where(idx[:, None] <= last[None, :], cost, np.inf)
        pick = np.argmin(cost, axis=0)  # the first of equal costs: the narrower width
        block_cost = cost[pick, np.arange(rows)]
        better = block_cost < best_cost
        best_cost = np.where(better, block_cost, best_cost)
        best_q[better] = q[pick[better], np.flatnonzero(better)]
    best_cost = np.where(used <= 1, 1.0, best_cost)  # m = 0 or 1: the m varint alone
    tables = [best_q[i, : used[i]] if used[i] >= 2 else np.ones(int(used[i]), np.int64) for i in range(rows)]
    return tables, float(best_cost.sum())


def _group(symbols: np.ndarray, bins: np.ndarray | None, nbins: int) -> tuple[np.ndarray, np.ndarray]:
    """Symbols of one segment sorted by bin (stable) and each bin's count."""
    if bins is None or nbins == 1:
        return symbols, np.array([symbols.size], np.int64)
    order = np.argsort(bins, kind="stable")  # radix sort on uint8
    return symbols[order], np.bincount(bins, minlength=nbins)


def _row_density(arr: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's count of symbols other than the most frequent one, and each row's length (the last row may be
    shorter): what :func:`_row_labels` needs, computed once for every class count the writer tries. Counted chunk by
    chunk (chunks of whole rows): no temporary the size of the stream."""
    step = max(1, _COUNT_CHUNK // row_length) * row_length
    hist = np.zeros(0, np.int64)
    for lo in range(0, arr.size, step):
        part = np.bincount(arr[lo : lo + step])
        if part.size > hist.size:
            hist = np.concatenate([hist, np.zeros(part.size - hist.size, np.int64)])
        hist[: part.size] += part
    zero = int(np.argmax(hist))
    rows = -(-arr.size // row_length)
    nonzero = np.empty(rows, np.int64)
    for lo in range(0, arr.size, step):  # lo is a multiple of row_length; the last row may be shorter
        part = arr[lo : lo + step] != zero
        full = part.size // row_length
        r0 = lo // row_length
        nonzero[r0 : r0 + full] = np.count_nonzero(part[: full * row_length].reshape(full, row_length), axis=1)
        if full * row_length < part.size:
            nonzero[r0 + full] = np.count_nonzero(part[full * row_length :])
    lengths = np.full(rows, row_length, np.int64)
    if arr.size % row_length:
        lengths[-1] = arr.size % row_length
    return nonzero, lengths


def _ideal_bits(counts: np.ndarray) -> float:
    """The bits of the symbols counted in ``counts`` (contexts × symbols) at each context's own empirical
    probabilities, no table: a lower bound of what any table model of these contexts costs."""
    counts = counts.astype(np.float64)
    totals = counts.sum(axis=1)
    nz = counts[counts > 0]
    tz = totals[totals > 0]
    return float((tz * np.log2(tz)).sum() - (nz * np.log2(nz)).sum())


def _row_scale(arr: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The scale labelling's statistic in :func:`_labels_from_density`'s form: each row's rank by its mean symbol
    (ties by row order) over ``R − 1`` for every row, so that ``C`` classes are ``C`` equal quantiles of the rows and
    a coarser ``C`` divides a finer one's labels exactly. Summed chunk by chunk (whole rows): no stream-sized
    temporary."""
    rows = -(-arr.size // row_length)
    sums = np.empty(rows, np.float64)
    step = max(1, _COUNT_CHUNK // row_length) * row_length
    for lo in range(0, arr.size, step):
        part = arr[lo : lo + step]
        full = part.size // row_length
        r0 = lo // row_length
        sums[r0 : r0 + full] = part[: full * row_length].reshape(full, row_length).sum(axis=1, dtype=np.float64)
        if full * row_length < part.size:
            tail = part[full * row_length :]
            sums[r0 + full] = tail.sum(dtype=np.float64) * row_length / tail.size  # the mean, scaled to a full row
    rank = np.empty(rows, np.int64)
    rank[np.argsort(sums, kind="stable")] = np.arange(rows)
    return rank, np.full(rows, rows - 1, np.int64)


def _labels_from_density(density: tuple[np.ndarray, np.ndarray], classes: int) -> np.ndarray:
    nonzero, lengths = density
    return (classes * nonzero // (lengths + 1)).astype(np.uint8)


def _row_labels(arr: np.ndarray, row_length: int, classes: int) -> np.ndarray:
    """The writer's row classes: each row's density of symbols other than the most frequent one, in ``classes``
    equal steps (``floor(classes · k / (len + 1))``), so empty and full rows land in the first and last class."""
    return _labels_from_density(_row_density(arr, row_length), classes)


def _label_cost(labels: np.ndarray, classes: int, precision: int = _PRECISION, sparse: bool = False
                ) -> tuple[np.ndarray, float]:
    return _best_table(np.bincount(labels, minlength=classes), precision, sparse)


class AnsDitherCoder(Coder):
    """Static two-pass ANS with per-context tables (the format is in this module's docstring).

    Contexts are the dither bin of each index and, optionally, a class label of its row (row density: pruning leaves
    output units of very different density). ``encode(symbols, K, context=codes, row_length=L)`` and
    ``decode(data, n, K, context=codes)`` take the 4-bit dither codes of :func:`dither_codes` (``None`` for an
    undithered tensor: then only one bin), or a function of no arguments that returns them: the decoder calls it
    only when the stream is conditioned on the dither (``b > 0``), so other streams never pay for hashing it. The
    row length is a writer's hint (the payload records it). Supports ``1 <= K <= 2**24 - 2``.
    """

    name = "ans-dither-v1"
    max_alphabet_size = _TOTAL - 2
    #: ``encode``/``decode`` take ``context=`` (the container passes the tensor's dither codes).
    accepts_context = True
    #: ``encode`` takes ``row_length=`` (the container passes the weight's index symbols per row).
    accepts_row_length = True
    #: ``decode`` takes ``dtype=`` (the container passes the narrow index dtype it keeps).
    accepts_dtype = True
    #: ``encode`` takes narrow integer streams as they are (``coder_base.encode_stream``: no int64 copy).
    accepts_narrow = True
    _ROW_FLAG = 0x08
    _ROW_CLASSES = (2, 4, 8)
    _MAX_ROW = (1 << 32) - 1

    # -- encode ------------------------------------------------------------------------------------------------

    def _stream_inputs(self, symbols: np.ndarray, alphabet_size: int, context: Any, row_length: int | None, *,
                       widen: bool) -> tuple[np.ndarray, int, np.ndarray | None, int | None] | None:
        """``(symbols, alphabet size, dither codes, row length)`` of an encode or cost call, validated; ``None`` for a stream that
        codes to nothing (no symbols, or an alphabet of one). A row length that cannot help (rows of one symbol or
        of the whole stream) is a hint and is dropped."""
        arr, k = check_symbols(symbols, alphabet_size, self.max_alphabet_size, widen=widen)
        n = arr.size
        if n == 0 or k == 1:
            return None
        codes = self._check_context(context, n, ConfigError)
        if row_length is not None and not (isinstance(row_length, (int, np.integer)) and 1 <= row_length < n):
            row_length = None
        return arr, k, codes, row_length

    def encode(self, symbols: np.ndarray, alphabet_size: int, *, context: Any = None,
               row_length: int | None = None) -> bytes:
        # narrow streams stay narrow (accepts_narrow): every step below reads values, never the dtype
        inputs = self._stream_inputs(symbols, alphabet_size, context, row_length, widen=False)
        if inputs is None:
            return b""
        arr, k, codes, row_length = inputs
        n = arr.size
        bits, classes, labels, tables, label_q, _ = self._choose(arr, codes, row_length)
        ctx = self._contexts(codes, bits, labels, row_length, n)
        out = bytearray([bits | (self._ROW_FLAG if classes else 0)])
        if classes:
            out += varint(row_length) + varint(classes) + table_bytes(label_q)
        models: list[Any] = []
        for q in tables:
            out += table_bytes(q)
            models.append(_categorical(table_model(q)) if q.size >= 2 else None)
        encoder = _constriction().stream.stack.AnsCoder()
        nctx = len(tables)
        for start in reversed(range(0, n, SEGMENT)):
            stop = min(n, start + SEGMENT)
            sym32 = arr[start:stop].astype(np.int32)  # one segment at a time: no int32 copy of the whole stream
            grouped, per_ctx = _group(sym32, None if ctx is None else ctx[start:stop], nctx)
            ends = np.cumsum(per_ctx)
            for i in reversed(range(nctx)):
                if models[i] is not None and per_ctx[i]:
                    encoder.encode_reverse(grouped[ends[i] - per_ctx[i] : ends[i]], models[i])
        if classes and label_q.size >= 2:  # pushed last: the reader pops the row labels first
            encoder.encode_reverse(labels.astype(np.int32), _categorical(table_model(label_q)))
        words = np.asarray(encoder.get_compressed(), dtype="<u4")
        out += varint(words.size)
        out += words.tobytes()
        return bytes(out)

    def cost_bits(self, symbols: np.ndarray, alphabet_size: int, *, context: Any = None,
                  row_length: int | None = None) -> float:
        """The bits :meth:`encode` would write for these arguments, without coding: the mode byte, row labels and
        tables exactly, the symbols at their ideal cost under the quantized tables (``−log2`` of each symbol's
        probability), plus the ANS stream's final state and word padding (:data:`_STREAM_OVERHEAD_BITS`) and its
        word-count varint. Within a few bytes of ``8·len(encode(...))`` per stream (tests/format)."""
        inputs = self._stream_inputs(symbols, alphabet_size, context, row_length, widen=True)
        if inputs is None:
            return 0.0
        arr, k, codes, row_length = inputs
        n = arr.size
        cost, _, classes, _, tables, label_q, _ = self._choose_costed(arr, codes, row_length)
        if all(q.size < 2 for q in tables) and not (classes and label_q.size >= 2):
            return 8.0 * cost + 8.0  # nothing to code: the word count 0 alone
        words = max(1, math.ceil((8.0 * cost) / 32.0))
        return 8.0 * cost + _STREAM_OVERHEAD_BITS + 8.0 * len(varint(words))

    @staticmethod
    def _contexts(codes, bits: int, labels, row_length, n: int) -> np.ndarray | None:
        """Each symbol's context ``label · 2^b + bin`` (uint8), or None for a single context."""
        if bits == 0 and labels is None:
            return None
        ctx = np.zeros(n, np.uint8) if bits == 0 else codes >> np.uint8(CONTEXT_BITS - bits)
        if labels is not None:
            ctx = ctx + (np.repeat(labels, row_length)[:n] << np.uint8(bits))
        return ctx

    #: Bytes of the payload's head beyond the mode byte (none here; ``ans-dither-v2`` adds its precision byte).
    _extra_bytes = 0

    def _table_args(self, nctx: int, n: int, m: int) -> tuple[int, bool]:
        """The table model of a stream of ``n`` symbols (largest ``m - 1``) with ``nctx`` contexts: ``(precision,
        sparse)`` for :func:`table_model` (24-bit, every symbol up to ``m_i`` >= 1 here)."""
        return _PRECISION, False

    def _joint_counts(self, arr: np.ndarray, codes: np.ndarray | None, labels: np.ndarray | None,
                      row_length: int | None, finest: int, m: int) -> np.ndarray:
        """The ``(finest, 2^4, m)`` counts of (row label, dither code, symbol) over the stream (label 0 without
        ``labels``, code 0 without ``codes``)."""
        key_dtype = np.int32 if (finest << CONTEXT_BITS) * m <= np.iinfo(np.int32).max else np.int64
        # Counted chunk by chunk (chunks of whole rows): only one chunk's keys exist at a time, and the counts are
        # those of the whole stream.
        shift = None
        if labels is not None:
            shift = labels.astype(key_dtype) * key_dtype(m << CONTEXT_BITS)
        fine = np.zeros((finest << CONTEXT_BITS) * m, np.int64)
        step = max(1, _COUNT_CHUNK // row_length) * row_length if labels is not None else _COUNT_CHUNK
        for lo in range(0, arr.size, step):
            hi = min(arr.size, lo + step)
            index = arr[lo:hi].astype(key_dtype)
            if codes is not None:
                shifted = codes[lo:hi].astype(key_dtype)
                shifted *= key_dtype(m)
                index += shifted
                del shifted
            if shift is not None:  # element i of the stream is in row i // row_length (lo is a multiple of it)
                r0 = lo // row_length
                full = (hi - lo) // row_length
                index[: full * row_length].reshape(full, row_length)[...] += shift[r0 : r0 + full, None]
                index[full * row_length :] += shift[r0 + full : r0 + full + 1]
            fine += np.bincount(index, minlength=fine.size)
            del index
        return fine.reshape(finest, 1 << CONTEXT_BITS, m)

    def _choose(self, arr: np.ndarray, codes: np.ndarray | None, row_length: int | None):
        """``(b, classes, labels, tables, label table, precision)`` of least total cost; ties keep fewer contexts."""
        return self._choose_costed(arr, codes, row_length)[1:]

    def _choose_costed(self, arr: np.ndarray, codes: np.ndarray | None, row_length: int | None):
        """:meth:`_choose`'s choice with its cost first, in bytes (the mode byte, labels and tables exactly, the
        symbols' ideal bits / 8)."""
        m = int(arr.max()) + 1
        room = 4 * arr.size + (1 << 16)
        max_bits = CONTEXT_BITS if codes is not None and m << CONTEXT_BITS <= room else 0
        row_classes = [c for c in self._ROW_CLASSES if (m * c) << max_bits <= room] if row_length is not None else []
        # One joint count (label · 2^4 + code) · m + symbol, at the finest row classes tried: a row's label for
        # C classes is floor(C·k / (len + 1)), and for C dividing the finest F it is floor(label_F / (F / C)), so
        # each coarser option's counts are sums of the finest ones (integers: exactly the counts of its own pass).
        # The key is built in the narrowest integer that holds it (int32 almost always: half the memory traffic of
        # intp), the labels added row by row through a broadcast view instead of repeated to the stream's length.
        # Two labellings (row density, the rank of a row's mean symbol), each counted once at its finest classes.
        finest = max(row_classes, default=1)
        families = []
        for stat in ((_row_density(arr, row_length), _row_scale(arr, row_length)) if row_classes else ()):
            labels = _labels_from_density(stat, finest)
            families.append((stat, self._joint_counts(arr, codes if max_bits else None, labels, row_length, finest, m)))
        if not families:
            families.append((None, self._joint_counts(arr, codes if max_bits else None, None, row_length, 1, m)))
        label_costs: dict = {}  # (id(labels), precision) -> the label table and its cost

        def costed(classes: int, labels: np.ndarray | None, fine: np.ndarray, bits: int) -> tuple:
            if labels is None:
                joint = fine.sum(axis=0, keepdims=True)
            else:
                joint = fine.reshape(classes, finest // classes, 1 << CONTEXT_BITS, m).sum(axis=1)
            precision, sparse = self._table_args(max(classes, 1) << bits, arr.size, m)
            label_cost = 0.0
            label_q = None
            if labels is not None:
                key = (id(labels), precision)
                if key not in label_costs:
                    label_costs[key] = _label_cost(labels, classes, precision, sparse)
                label_q, label_cost = label_costs[key]
                label_cost += 2  # row length and class count varints, about
            merged = joint.reshape(max(classes, 1), 1 << bits, -1, m).sum(axis=2).reshape(-1, m)
            tables, tables_cost = _best_tables(merged, precision, sparse)
            return (1 + label_cost + tables_cost + self._extra_bytes, bits, classes, labels, tables, label_q, precision)

        def best_bits(classes: int, labels: np.ndarray | None, fine: np.ndarray, first: tuple) -> tuple:
            """From ``first`` (this option at some bin count), more bins, or else fewer, while the cost falls (the
            gain of a bin shrinks and its tables grow with every bit)."""
            best = first
            for direction in (1, -1):
                bits = first[1] + direction
                while 0 <= bits <= max_bits:
                    option = costed(classes, labels, fine, bits)
                    if option[0] >= best[0]:
                        break
                    best, bits = option, bits + direction
                if best is not first:
                    break
            return best

        # Without classes, the bins from 0 up. Then, at that bin count (classes rarely move the best one by more
        # than a bit), the row-class options ranked by what they could save at best, the symbols' ideal bits plus
        # the labels' (tables not counted: an option that cannot save even so is never costed); the two most
        # promising costed exactly and the better one's bins refined as above: a few table searches per stream
        # instead of one per (option, bins).
        best = best_bits(0, None, families[0][1], costed(0, None, families[0][1], 0))
        if row_classes:
            bins = 1 << best[1]
            plain = _ideal_bits(families[0][1].sum(axis=0).reshape(bins, -1, m).sum(axis=1))
            ranked = []
            for stat, fine in families:
                for c in row_classes:
                    labels = _labels_from_density(stat, c)
                    joint = fine.reshape(c, finest // c, 1 << CONTEXT_BITS, m).sum(axis=1)
                    joint = joint.reshape(c, bins, -1, m).sum(axis=2).reshape(-1, m)
                    saving = plain - _ideal_bits(joint) - _ideal_bits(np.bincount(labels, minlength=c)[None])
                    if saving > 0:
                        ranked.append((-saving, len(ranked), c, labels, fine))
            ranked.sort(key=lambda r: r[:2])  # the largest saving first; ties: density, fewer classes
            options = [costed(c, labels, fine, best[1]) + (fine,) for _, _, c, labels, fine in ranked[:2]]
            if options:
                top = min(options, key=lambda o: o[0])
                if top[0] < best[0]:
                    best = best_bits(top[2], top[3], top[7], top[:7])
        assert best is not None
        return best

    # -- decode ------------------------------------------------------------------------------------------------

    def decode(self, data: bytes, count: int, alphabet_size: int, *, context: Any = None,
               dtype: Any = np.int64) -> np.ndarray:
        """Decode ``count`` symbols with the same dither ``context`` the writer had; see :meth:`Coder.decode`.

        ``dtype`` is the integer dtype of the result (int64 by default, as every coder returns); it must hold
        ``alphabet_size - 1``. The container asks for the narrow dtype it keeps, which saves a wide copy and makes
        the reordering scatter write a byte per symbol instead of eight.

        Raises:
            ConfigError: if ``dtype`` is not an integer dtype that holds ``alphabet_size - 1``.
        """
        view, n, k = check_decode_args(data, count, alphabet_size, self.max_alphabet_size)
        out_dtype = np.dtype(dtype)
        if out_dtype.kind not in "iu" or np.iinfo(out_dtype).max < k - 1:
            raise ConfigError(f"{self.name}: cannot decode an alphabet of {k} into {out_dtype}")
        try:
            out = self._decode_with(view, n, k, context, out_dtype)
        except MemoryError as exc:
            raise FormatError("bad_value", f"{self.name}: cannot allocate {n} symbols") from exc
        except BaseException as exc:  # noqa: BLE001 -- constriction raises assorted types; see as_format_error
            raise as_format_error(exc, self.name)
        if out.shape != (n,) or (n and (int(out.min()) < 0 or int(out.max()) >= k)):
            raise FormatError("corrupt_payload", f"{self.name}: decoded symbols outside [0, {k})")
        return out

    def _decode(self, view: memoryview, n: int, k: int) -> np.ndarray:
        return self._decode_with(view, n, k, None, np.dtype(np.int64))

    def _check_context(self, context: Any, n: int, error: type) -> np.ndarray | None:
        if context is None:
            return None
        codes = np.asarray(context() if callable(context) else context)
        if codes.shape != (n,) or codes.dtype.kind not in "iu":
            message = f"{self.name}: context must be {n} integer dither codes, got {codes.dtype} {codes.shape}"
            raise (FormatError("bad_value", message) if error is FormatError else ConfigError(message))
        if n and (int(codes.min()) < 0 or int(codes.max()) >= 1 << CONTEXT_BITS):
            message = f"{self.name}: dither codes must be in [0, {1 << CONTEXT_BITS})"
            raise (FormatError("bad_value", message) if error is FormatError else ConfigError(message))
        return codes.astype(np.uint8, copy=False)

    def _decode_with(self, view: memoryview, n: int, k: int, context: Any, out_dtype: np.dtype) -> np.ndarray:
        if n == 0 or k == 1:
            if len(view):
                raise FormatError("corrupt_payload", f"{self.name}: {len(view)} bytes for a stream that needs none")
            return np.zeros(n, out_dtype)
        if not len(view):
            raise FormatError("truncated", f"{self.name}: empty payload for {n} symbols")
        mode = view[0]
        bits, rows_mode = mode & 0x07, bool(mode & self._ROW_FLAG)
        if bits > CONTEXT_BITS or mode & ~(0x07 | self._ROW_FLAG):
            raise FormatError("corrupt_payload", f"{self.name}: mode byte {mode:#x} (at most {CONTEXT_BITS} bits)")
        if bits and context is None:
            raise FormatError("bad_value", f"{self.name}: the stream is dither-conditioned but the tensor has no dither")
        pos = 1
        classes, row_length, rows, label_probs = 1, n, 1, None
        min_bits = 0.0
        if rows_mode:
            row_length, pos = read_varint(view, pos)
            classes, pos = read_varint(view, pos)
            if not 1 <= row_length < n or not 2 <= classes <= 16 or classes << bits > 256:
                raise FormatError("corrupt_payload", f"{self.name}: row length {row_length} / {classes} row classes")
            rows = -(-n // row_length)
            label_m, pos = read_varint(view, pos)
            if not 1 <= label_m <= classes:
                raise FormatError("corrupt_payload", f"{self.name}: row label table of {label_m} symbols")
            if label_m >= 2:
                label_q, pos = self._read_table(view, pos, label_m, -1)
                label_probs = table_model(label_q)
                min_bits += rows * (_PRECISION - math.log2(int(label_probs.max())))
        nctx = classes << bits
        tables: list[np.ndarray | None] = []
        sizes = []
        for i in range(nctx):
            m, pos = read_varint(view, pos)
            if m > k:
                raise FormatError("corrupt_payload", f"{self.name}: context {i} table has {m} symbols (alphabet {k})")
            sizes.append(m)
            if m < 2:
                tables.append(None)
                continue
            q, pos = self._read_table(view, pos, m, i)
            tables.append(table_model(q))
        words, pos = read_varint(view, pos)
        if len(view) - pos != 4 * words:
            raise FormatError(
                "truncated" if len(view) - pos < 4 * words else "corrupt_payload",
                f"{self.name}: {len(view) - pos} bytes after the tables, {4 * words} expected",
            )
        # Every symbol costs at least -log2(max p) bits of its context; checked against the words (an ANS stream
        # holds at most 32 bits per word plus the two words of its initial state) before anything sized by n.
        # Without row labels the per-context counts are known now; with them, after the labels are decoded.
        coder = None
        if words:
            coder = _constriction().stream.stack.AnsCoder(np.frombuffer(view[pos:], dtype="<u4").astype(np.uint32))
        if min_bits * (1 - 1e-9) > 32 * words + 64:
            raise FormatError("corrupt_payload", f"{self.name}: {rows} row labels cannot fit in {words} words")
        labels = None
        if rows_mode:
            if label_probs is None:
                labels = np.zeros(rows, np.uint8)
            else:
                if coder is None:
                    raise FormatError("truncated", f"{self.name}: no coded words for the row labels")
                labels = np.asarray(coder.decode(_categorical(label_probs), rows), np.uint8)
        codes = None if bits == 0 else self._check_context(context, n, FormatError)
        ctx = self._contexts(codes, bits, labels, row_length, n)
        if ctx is not None and int(ctx.max()) >= nctx:
            raise FormatError("corrupt_payload", f"{self.name}: row label outside its {classes} classes")
        # Symbols per (segment, context): the decode calls' sizes, counted once; their column sums are the totals.
        seg_counts = None if ctx is None else np.stack(
            [np.bincount(ctx[start : start + SEGMENT], minlength=nctx) for start in range(0, n, SEGMENT)]
        )
        totals = np.array([n], np.int64) if seg_counts is None else seg_counts.sum(axis=0, dtype=np.int64)
        for i, (m, probs) in enumerate(zip(sizes, tables)):
            if (m == 0) != (totals[i] == 0):
                raise FormatError("corrupt_payload", f"{self.name}: context {i} table does not match its symbols")
            if probs is not None:
                min_bits += float(totals[i]) * (_PRECISION - math.log2(int(probs.max())))
        if min_bits * (1 - 1e-9) > 32 * words + 64:
            raise FormatError("corrupt_payload", f"{self.name}: {n} symbols cannot fit in {words} words")
        models = [None if probs is None else _categorical(probs) for probs in tables]
        out = self._decode_symbols(coder, models, ctx, seg_counts, n, out_dtype)
        if coder is not None and not coder.is_empty():
            raise FormatError("corrupt_payload", f"{self.name}: words left over after the last symbol")
        return out

    def _decode_symbols(self, coder, models: list, ctx: np.ndarray | None, seg_counts: np.ndarray | None, n: int,
                        dtype: np.dtype) -> np.ndarray:
        """Pop the ``n`` symbols (module doc, *Order*) into stream order, as ``dtype``.

        Why this shape: the decode calls return int32; each segment's are copied once into a context-grouped buffer
        of the output dtype (narrow: the container keeps uint8 for K <= 256), then one scatter through the segment's
        stable uint8 argsort (NumPy radix-sorts 8-bit keys: O(segment)) puts them in stream order.
        """
        out = np.empty(n, dtype)
        if ctx is None:  # one context: consecutive segments use one model, so chunked calls pop the same symbols
            if models[0] is None:
                out[:] = 0
                return out
            if coder is None:
                raise FormatError("truncated", f"{self.name}: no coded words for context 0")
            for start in range(0, n, _DECODE_CHUNK):
                stop = min(n, start + _DECODE_CHUNK)
                out[start:stop] = coder.decode(models[0], stop - start)
            return out
        grouped = np.empty(min(n, SEGMENT), dtype)
        for s, row in enumerate(seg_counts.tolist()):
            start = s * SEGMENT
            stop = min(n, start + SEGMENT)
            pos = 0
            for i, c in enumerate(row):
                if not c:
                    continue
                if models[i] is None:
                    grouped[pos : pos + c] = 0  # m = 1: all zeros
                elif coder is None:
                    raise FormatError("truncated", f"{self.name}: no coded words for context {i}")
                else:
                    grouped[pos : pos + c] = coder.decode(models[i], c)  # values < m <= K: the cast is exact
                pos += c
            if pos == row[int(ctx[start])]:  # a single context in this segment: already in stream order
                out[start:stop] = grouped[:pos]
            else:
                out[start:stop][np.argsort(ctx[start:stop], kind="stable")] = grouped[:pos]
        return out

    def _read_table(self, view: memoryview, pos: int, m: int, i: int) -> tuple[np.ndarray, int]:
        """The counts of bin ``i`` (``m >= 2`` entries), validated; allocates at most ``m <= K`` entries."""
        if pos >= len(view):
            raise FormatError("truncated", f"{self.name}: payload ends before bin {i}'s table")
        tag = view[pos]
        pos += 1
        if tag == _DENSE:
            q, pos = read_varints(view, pos, m)
        elif tag == _SPARSE:
            u, pos = read_varint(view, pos)
            if not 1 <= u <= m:
                raise FormatError("corrupt_payload", f"{self.name}: bin {i} table lists {u} of its {m} counts")
            gaps, pos = read_varints(view, pos, u)
            values, pos = read_varints(view, pos, u)
            if int(values.min()) <= 0 or int(gaps.min()) < 0 or int(gaps.max()) >= m:
                raise FormatError("corrupt_payload", f"{self.name}: bin {i} sparse table out of range")
            where = np.cumsum(gaps + 1) - 1
            if int(where[-1]) != m - 1:
                raise FormatError("corrupt_payload", f"{self.name}: bin {i} sparse table does not end at {m - 1}")
            q = np.zeros(m, np.int64)
            q[where] = values
        elif tag <= 1 + _MAX_WIDTH:
            width = tag - 1
            nbytes = -(-m * width // 8)
            if pos + nbytes > len(view):
                raise FormatError("truncated", f"{self.name}: payload ends inside bin {i}'s table")
            bits = np.unpackbits(np.frombuffer(view[pos : pos + nbytes], np.uint8), bitorder="little")
            if bits[m * width :].any():
                raise FormatError("corrupt_payload", f"{self.name}: bin {i} table has non-zero padding bits")
            fields = bits[: m * width].reshape(m, width).astype(np.int64)
            q = fields @ (np.int64(1) << np.arange(width, dtype=np.int64))
            pos += nbytes
        else:
            raise FormatError("corrupt_payload", f"{self.name}: bin {i} table has unknown form {tag}")
        # Values are < 2**63 (varints), so the int64 sum can only overflow past 2**32 with many entries: check both.
        if int(q.min()) < 0 or q[-1] == 0 or int(q.max()) > _MAX_Q or int(q.sum()) > _MAX_Q:
            raise FormatError("corrupt_payload", f"{self.name}: bin {i} table is not canonical or sums past 2**32")
        return q, pos



register(AnsDitherCoder())

"""``ans-dither-v2``: static interleaved rANS of index streams, conditioned on the dither, at native speed (numba).

The modelling is ``ans-dither-v1``'s (:mod:`udnc_fx.coding.ans`: ``B = 2^b`` dither bins chosen by exact byte cost,
optional row classes, the same compact table forms); what changes is the entropy coder. v1 hands each context's
symbols to constriction's Python API, which regroups them by context (an argsort per segment) and searches its
categorical models; v2 codes the stream in stream order with a rANS coder compiled by numba
(:mod:`udnc_fx.coding.rans_kernels`): each symbol's context is computed as it is read, a slot → symbol table decodes
in one lookup, and ``S`` interleaved states keep the CPU's pipelines busy. The kernels release the GIL, so
independent tensors code in parallel threads.

**Model.** Each context's table ``q`` (the v1 forms) becomes integer frequencies at the stream's precision ``P``
(``1 <= P <= 16``, ``T = 2^P``) by :func:`~udnc_fx.coding.ans.table_model` with ``sparse``: ``left_j = floor(C_j ·
(T − u) / Q) + U_j`` (``C_j`` the prefix sums of ``q``, ``Q`` their total, ``U_j`` the number of non-zero ``q_l``
with ``l < j``, ``u`` the non-zero count, which must be ``<= T``), ``f_j = left_{j+1} − left_j``: a symbol of count 0
has frequency 0, every other at least 1, and they sum to ``T``. A context whose table has ``m = 1`` (every symbol 0)
is the table ``f_0 = T``: its symbols cost nothing and leave the coder's state as it is.

**Precision.** The writer takes ``P = min(16, max(ceil(log2 m), P_lut))`` where ``m`` is the largest table size and
``P_lut`` the largest ``p <= 16`` with ``N_ctx · 2^p <= max(2^16, 4n)`` (the decoder's slot tables stay within a
few entries per symbol); a reader refuses a larger ``P``. Alphabets up to ``2^16`` symbols; larger ones are
refused by this coder (writers use ``ans-dither-v1`` for them: :func:`coder_for_alphabet`).

**Payload** (``count == 0`` or ``alphabet_size == 1``: zero bytes):

1. the mode byte as in v1 (bits 0–2 ``b``, bit 3 the row flag, other bits zero);
2. a byte: bits 0–3 ``P − 1``, bits 4–5 ``log2 S`` with ``S`` in ``{1, 2, 4}`` interleaved states (the writer uses
   4 from 2^16 symbols on, 1 below), bits 6–7 zero;
3. with the row flag, ``L``, ``C`` and the label table exactly as in v1 (``1 <= L < count``, ``2 <= C <= 16``,
   ``C · 2^b <= 256``);
4. the ``C · 2^b`` context tables exactly as in v1 (``m_i`` varint, form byte, counts), with ``u_i <= 2^P``;
5. ``W`` (varint), then, when anything is coded (a table with two non-zero counts: a context's or the labels'), the
   ``S`` final coder states as little-endian u64 (each in ``[2^31, 2^63)``) and ``W`` little-endian u32 words,
   ending exactly at the end of the payload; when nothing is coded, ``W = 0`` and the payload ends.

**Coding order.** The coded sequence is the ``R`` row labels (with the row flag; their table is context ``N_ctx``)
then the ``count`` symbols, in stream order; position ``i`` of the sequence uses state ``i mod S``; symbol ``i``'s
context is ``label(i // L) · 2^b + (code_i >> (4 − b))`` (``code_i`` the 4-bit dither code of
:func:`~udnc_fx.coding.ans.dither_codes`). The writer starts every state at ``2^31`` and pushes the sequence last
position first (the arithmetic is in :mod:`~udnc_fx.coding.rans_kernels`), emitting words backwards; the payload
holds the final states and the words in the order the reader pops them. After the last symbol every state must be
``2^31`` again and every word consumed.

Bad payloads raise :class:`~udnc_fx.errors.FormatError` before anything sized by them is allocated: a bad mode or
precision byte, ``P`` above the rule, tables as v1 checks them or with more used symbols than ``2^P``, a stream
claiming more symbols than its words can hold (each symbol of a context costs at least ``P − log2 max f`` bits,
less a bit of slack per symbol for the state's rounding, against ``32 W + 32 S`` bits), states out of range, words
missing or trailing, final states wrong.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from udnc_fx.coding.ans import CONTEXT_BITS, AnsDitherCoder, table_bytes, table_model
from udnc_fx.coding.coder_base import (
    as_format_error,
    check_decode_args,
    check_symbols,
    read_varint,
    register,
    varint,
)
from udnc_fx.errors import ConfigError, FormatError

__all__ = ["AnsNativeCoder", "MAX_PRECISION", "coder_for_alphabet", "precision_for"]

#: Largest table precision (bits): the slot tables are ``2^P`` entries per context.
MAX_PRECISION = 16
#: Streams from this many symbols on use 4 interleaved states (shorter ones 1: each state costs ~6 bytes, 0.2 % of a
#: 2^16-symbol stream at 1 bit/symbol).
_INTERLEAVE_FROM = 1 << 16
_EMPTY = np.zeros(0, np.uint8)
_LOW = 1 << 31  # the coder states' lower bound (rans_kernels.LOW)


def _kernels():
    """The numba kernels, imported on first use (numba's import costs ~0.3 s; a file without v2 streams never pays)."""
    import numba  # noqa: F401,PLC0415 -- a missing numba is an ImportError naming it, even once the kernels loaded
    from udnc_fx.coding import rans_kernels  # noqa: PLC0415

    return rans_kernels
#: What a stream costs beyond its symbols' ideal bits, per state: a final state of 64 bits carries ``log2 x − 31``
#: of them, 47 on average, which leaves 48 (measured, tests/format/test_rate_estimate.py).
_STATE_OVERHEAD_BITS = 48.0


def precision_for(nctx: int, n: int, m: int) -> int:
    """The writer's table precision for ``nctx`` contexts, ``n`` symbols and tables of up to ``m`` symbols (module
    doc, *Precision*); the reader accepts this or less."""
    room = max(1 << 16, 4 * n)
    lut = MAX_PRECISION
    while lut > 1 and nctx << lut > room:
        lut -= 1
    return min(MAX_PRECISION, max(max(1, (m - 1).bit_length()), lut))


def coder_for_alphabet(name: str, alphabet_size: int) -> str:
    """``name``, or ``ans-dither-v1`` when ``name`` is this coder and the alphabet is larger than it takes."""
    if name == AnsNativeCoder.name and alphabet_size > AnsNativeCoder.max_alphabet_size:
        return AnsDitherCoder.name
    return name


def _stream_contexts(kernels, n: int, codes: np.ndarray, bits: int, labels: np.ndarray, row_length: int | None):
    """``(ctx, shift)`` for the 4-state kernels: the dither codes themselves (shifted in the kernel) without row
    labels, every symbol's context with them, an empty array for a single context."""
    if labels.size:
        return kernels.contexts(n, codes, CONTEXT_BITS - bits, labels, row_length, bits), 0
    if bits:
        return codes, CONTEXT_BITS - bits
    return _EMPTY, 0


def _coded(tables: list[np.ndarray]) -> bool:
    """Whether any symbol costs bits: a table with two used symbols or more (else the payload has no states)."""
    return any(q.size >= 2 and int(np.count_nonzero(q)) >= 2 for q in tables)


def _narrow(width: int) -> np.dtype:
    return np.dtype(np.uint8 if width <= 256 else np.uint16)


def _freq_tables(tables: list[np.ndarray], label_q: np.ndarray | None, precision: int):
    """``(freq, cum)``: int64 ``(rows, width)`` frequency and exclusive prefix tables, one row per context and, with
    row labels, a last row for them; rows of ``m = 0`` are zeros, ``m = 1`` rows are ``[2^P]``."""
    rows = tables + ([] if label_q is None else [label_q])
    width = max(1, max(q.size for q in rows))
    freq = np.zeros((len(rows), width), np.int64)
    for i, q in enumerate(rows):
        if q.size == 1:
            freq[i, 0] = 1 << precision
        elif q.size >= 2:
            freq[i, : q.size] = table_model(q, precision, sparse=True)
    cum = np.zeros_like(freq)
    np.cumsum(freq[:, :-1], axis=1, out=cum[:, 1:])
    return freq, cum


class AnsNativeCoder(AnsDitherCoder):
    """Static interleaved rANS with v1's per-context tables, compiled by numba (the format is in the module doc).

    ``encode``/``decode`` take the same ``context=`` (dither codes or a function returning them), ``row_length=``
    and ``dtype=`` as :class:`~udnc_fx.coding.ans.AnsDitherCoder`. Supports ``1 <= K <= 2**16``.
    """

    name = "ans-dither-v2"
    max_alphabet_size = 1 << 16
    _extra_bytes = 1  # the precision byte

    def _table_args(self, nctx: int, n: int, m: int) -> tuple[int, bool]:
        return precision_for(nctx, n, m), True

    def _joint_counts(self, arr: np.ndarray, codes: np.ndarray | None, labels: np.ndarray | None,
                      row_length: int | None, finest: int, m: int) -> np.ndarray:
        # v1's counts in one compiled pass (no keys array); the same integers
        sym = arr if arr.dtype in (np.uint8, np.uint16) else arr.astype(_narrow(m))
        return _kernels().joint_counts(sym, _EMPTY if codes is None else codes, codes is not None,
                                       _EMPTY if labels is None else labels.astype(np.uint8, copy=False),
                                       row_length or 1, finest, m)

    # -- encode ------------------------------------------------------------------------------------------------

    def encode(self, symbols: np.ndarray, alphabet_size: int, *, context: Any = None,
               row_length: int | None = None) -> bytes:
        inputs = self._stream_inputs(symbols, alphabet_size, context, row_length, widen=False)
        if inputs is None:
            return b""
        arr, k, codes, row_length = inputs
        n = arr.size
        cost, bits, classes, labels, tables, label_q, precision = self._choose_costed(arr, codes, row_length)
        nstates = 4 if n >= _INTERLEAVE_FROM else 1
        out = bytearray([bits | (self._ROW_FLAG if classes else 0), (precision - 1) | ((nstates >> 1) << 4)])
        if classes:
            out += varint(row_length) + varint(classes) + table_bytes(label_q)
        for q in tables:
            out += table_bytes(q)
        if not _coded(tables + ([label_q] if classes else [])):
            return bytes(out + varint(0))  # nothing to code: every context has one symbol at most
        _k = _kernels()
        freq, cum = _freq_tables(tables, label_q if classes else None, precision)
        sym = arr if arr.dtype in (np.uint8, np.uint16) else arr.astype(_narrow(k))
        rows = labels.size if classes else 0
        label_arr = labels.astype(np.uint8, copy=False) if classes else _EMPTY
        code_arr = codes if bits else _EMPTY
        ctx, shift = _stream_contexts(_k, n, code_arr, bits, label_arr, row_length) if nstates == 4 else (None, 0)
        rcp = 1.0 / np.maximum(freq, 1)
        # The words buffer is sized by the chosen tables' cost (it includes the tables' bytes: an overestimate of
        # the words by far more than rANS's rounding), not by the worst case of a word per symbol (4 bytes per
        # weight, the float tensor's size again); a stream that does not fit is coded again with the worst case.
        for room in (int(cost * 1.001 / 4) + 64, n + rows + 1):
            states = np.full(nstates, _LOW, np.int64)
            words = np.empty(room, np.uint32)
            if nstates == 4:
                turned = np.roll(states, -(rows % 4))  # symbol i is position rows + i: state (rows + i) mod 4
                opos = _k.encode4(sym, n, ctx, shift, ctx.size > 0, freq, cum, rcp, precision, turned, words,
                                  words.size)
                states = np.roll(turned, rows % 4)
            else:
                opos = _k.encode_symbols(sym, n, rows, code_arr, CONTEXT_BITS - bits, label_arr, row_length or 1,
                                         bits, 0, freq, cum, precision, states, words, words.size)
            if rows and opos >= 0:
                opos = _k.encode_symbols(label_arr, rows, 0, _EMPTY, 0, _EMPTY, 1, 0, len(tables), freq, cum,
                                         precision, states, words, opos)
            if opos >= 0:
                break
        coded = words[opos:]
        out += varint(coded.size)
        out += states.astype("<u8").tobytes()
        out += coded.astype("<u4").tobytes()
        return bytes(out)

    def cost_bits(self, symbols: np.ndarray, alphabet_size: int, *, context: Any = None,
                  row_length: int | None = None) -> float:
        """The bits :meth:`encode` would write, without coding: the head and tables exactly, the symbols at their
        ideal cost under the quantized tables, plus the final states (:data:`_STATE_OVERHEAD_BITS` each) and the
        word-count varint. Within a few bytes of ``8·len(encode(...))`` per stream (tests/format)."""
        inputs = self._stream_inputs(symbols, alphabet_size, context, row_length, widen=True)
        if inputs is None:
            return 0.0
        arr, k, codes, row_length = inputs
        n = arr.size
        cost, _, classes, _, tables, label_q, _ = self._choose_costed(arr, codes, row_length)
        if not _coded(tables + ([label_q] if classes else [])):
            return 8.0 * cost + 8.0  # nothing to code: the word count 0 alone
        nstates = 4 if n >= _INTERLEAVE_FROM else 1
        words = max(1, math.ceil((8.0 * cost) / 32.0))
        return 8.0 * cost + _STATE_OVERHEAD_BITS * nstates + 8.0 * len(varint(words))

    # -- decode ------------------------------------------------------------------------------------------------

    def _decode_with(self, view: memoryview, n: int, k: int, context: Any, out_dtype: np.dtype) -> np.ndarray:
        name = self.name
        if n == 0 or k == 1:
            if len(view):
                raise FormatError("corrupt_payload", f"{name}: {len(view)} bytes for a stream that needs none")
            return np.zeros(n, out_dtype)
        if len(view) < 2:
            raise FormatError("truncated", f"{name}: payload of {len(view)} bytes for {n} symbols")
        mode, head = view[0], view[1]
        bits, rows_mode = mode & 0x07, bool(mode & self._ROW_FLAG)
        if bits > CONTEXT_BITS or mode & ~(0x07 | self._ROW_FLAG):
            raise FormatError("corrupt_payload", f"{name}: mode byte {mode:#x} (at most {CONTEXT_BITS} bits)")
        precision, log_states = (head & 0x0F) + 1, head >> 4
        if log_states > 2:
            raise FormatError("corrupt_payload", f"{name}: head byte {head:#x} (at most 4 states)")
        nstates = 1 << log_states
        if bits and context is None:
            raise FormatError("bad_value", f"{name}: the stream is dither-conditioned but the tensor has no dither")
        pos = 2
        classes, row_length, rows, label_q = 1, n, 0, None
        if rows_mode:
            row_length, pos = read_varint(view, pos)
            classes, pos = read_varint(view, pos)
            if not 1 <= row_length < n or not 2 <= classes <= 16 or classes << bits > 256:
                raise FormatError("corrupt_payload", f"{name}: row length {row_length} / {classes} row classes")
            rows = -(-n // row_length)
            label_m, pos = read_varint(view, pos)
            if not 1 <= label_m <= classes:
                raise FormatError("corrupt_payload", f"{name}: row label table of {label_m} symbols")
            label_q = np.ones(1, np.int64) if label_m == 1 else None
            if label_m >= 2:
                label_q, pos = self._read_table(view, pos, label_m, -1)
        nctx = classes << bits
        tables: list[np.ndarray] = []
        for i in range(nctx):
            m, pos = read_varint(view, pos)
            if m > k:
                raise FormatError("corrupt_payload", f"{name}: context {i} table has {m} symbols (alphabet {k})")
            if m < 2:
                tables.append(np.ones(m, np.int64))
                continue
            q, pos = self._read_table(view, pos, m, i)
            tables.append(q)
        every = tables + ([] if label_q is None else [label_q])
        width = max(q.size for q in every)
        if precision > precision_for(nctx, n, width):
            raise FormatError("corrupt_payload", f"{name}: precision {precision} above the rule's "
                              f"{precision_for(nctx, n, width)}")
        if any(int(np.count_nonzero(q)) > 1 << precision for q in every):
            raise FormatError("corrupt_payload", f"{name}: a table uses more symbols than 2^{precision}")
        words_n, pos = read_varint(view, pos)
        coded = _coded(every)
        need = (8 * nstates + 4 * words_n) if coded else 0
        if not coded and words_n:
            raise FormatError("corrupt_payload", f"{name}: {words_n} words for a stream with nothing coded")
        if len(view) - pos != need:
            raise FormatError("truncated" if len(view) - pos < need else "corrupt_payload",
                              f"{name}: {len(view) - pos} bytes after the tables, {need} expected")
        freq, cum = _freq_tables(tables, label_q, precision)
        # Each pop consumes log2(x / x') >= P − log2 f − log2(1 + 2^P / x) bits of its state (x >= 2^31), and a
        # refill adds at most 32 + 2^-14 bits (x' >= 2^15 before it); the states start below 2^63 and end at 2^31.
        # So the symbols' least costs must fit in 32 S + (32 + 2^-14) W bits: checked before anything sized by n.
        budget = (32.0 + 2.0 ** -14) * words_n + 32.0 * nstates
        min_bits = np.maximum(precision - np.log2(np.maximum(freq.max(axis=1), 1)) - 2.0 ** (precision - 29), 0.0)
        label_bits = rows * float(min_bits[-1]) if rows and label_q.size >= 2 else 0.0
        if label_bits * (1 - 1e-9) > budget:
            raise FormatError("corrupt_payload", f"{name}: {rows} row labels cannot fit in {words_n} words")
        states = np.full(nstates, _LOW, np.int64)  # nothing coded: every pop leaves the states as they are
        words = np.zeros(0, np.uint32)
        if coded:
            states = np.frombuffer(view[pos : pos + 8 * nstates], "<u8").astype(np.int64)
            if int(states.min()) < _LOW:  # u64 >= 2^63 became negative
                raise FormatError("corrupt_payload", f"{name}: a coder state outside [2^31, 2^63)")
            words = np.frombuffer(view[pos + 8 * nstates :], "<u4").astype(np.uint32)
        _k = _kernels()
        # The slot tables: zeros (untouched pages cost nothing), filled row by row only for the row labels, then
        # for the contexts that hold symbols, once the counts have been checked against the tables.
        lut = np.zeros(freq.shape[0] << precision, _narrow(width))
        wpos = 0
        labels = _EMPTY
        if rows:
            only_labels = np.zeros(freq.shape[0], np.bool_)
            only_labels[-1] = True
            _k.build_lut(freq, cum, only_labels, precision, lut)
            label_out = np.zeros(rows, lut.dtype)
            if label_q.size >= 2:
                err, wpos = _k.decode_symbols(words, wpos, rows, 0, _EMPTY, 0, _EMPTY, 1, 0, nctx, freq, cum, lut,
                                              precision, states, label_out)
                if err:
                    raise FormatError("truncated", f"{name}: the words end inside the row labels")
            labels = label_out.astype(np.uint8)
            if int(labels.max()) >= classes:
                raise FormatError("corrupt_payload", f"{name}: row label outside its {classes} classes")
        codes = _EMPTY
        if bits:
            codes = self._check_context(context, n, FormatError)
        counts = _k.context_counts(n, codes, CONTEXT_BITS - bits, labels, row_length, bits, nctx)
        for i, q in enumerate(tables):
            if (q.size == 0) != (counts[i] == 0):
                raise FormatError("corrupt_payload", f"{name}: context {i} table does not match its symbols")
        if (float(counts @ min_bits[:nctx]) + label_bits) * (1 - 1e-9) > budget:
            raise FormatError("corrupt_payload", f"{name}: {n} symbols cannot fit in {words_n} words")
        used = np.zeros(freq.shape[0], np.bool_)
        used[:nctx] = counts > 0
        _k.build_lut(freq, cum, used, precision, lut)
        out = np.zeros(n, lut.dtype)
        if nstates == 4:
            ctx, shift = _stream_contexts(_k, n, codes, bits, labels, row_length)
            turned = np.roll(states, -(rows % 4))  # symbol i is position rows + i: state (rows + i) mod 4
            err, wpos = _k.decode4(words, wpos, n, ctx, shift, ctx.size > 0, freq, cum, lut, precision, turned, out)
            states = np.roll(turned, rows % 4)
        else:
            err, wpos = _k.decode_symbols(words, wpos, n, rows, codes, CONTEXT_BITS - bits, labels, row_length, bits,
                                          0, freq, cum, lut, precision, states, out)
        if err:
            raise FormatError("truncated", f"{name}: the words end before symbol {n}")
        if wpos != words.size or int(states.min()) != _LOW or int(states.max()) != _LOW:
            raise FormatError("corrupt_payload", f"{name}: the coder does not end where it started (corrupt words)")
        return out.astype(out_dtype, copy=False)

    def decode(self, data: bytes, count: int, alphabet_size: int, *, context: Any = None,
               dtype: Any = np.int64) -> np.ndarray:
        """Decode ``count`` symbols with the writer's dither ``context``; see :meth:`AnsDitherCoder.decode`."""
        view, n, k = check_decode_args(data, count, alphabet_size, self.max_alphabet_size)
        out_dtype = np.dtype(dtype)
        if out_dtype.kind not in "iu" or np.iinfo(out_dtype).max < k - 1:
            raise ConfigError(f"{self.name}: cannot decode an alphabet of {k} into {out_dtype}")
        try:
            out = self._decode_with(view, n, k, context, out_dtype)
        except MemoryError as exc:
            raise FormatError("bad_value", f"{self.name}: cannot allocate {n} symbols") from exc
        except BaseException as exc:  # noqa: BLE001 -- see as_format_error
            raise as_format_error(exc, self.name)
        if out.shape != (n,) or (n and int(out.max()) >= k):
            raise FormatError("corrupt_payload", f"{self.name}: decoded symbols outside [0, {k})")
        return out


register(AnsNativeCoder())

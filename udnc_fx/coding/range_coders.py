"""Range coders (constriction): the backward-adaptive ``range-adaptive-v1`` and the per-row density context
``range-context-v1`` for pruned weights, behind the one :class:`~udnc_fx.coding.coder_base.Coder` interface."""

from __future__ import annotations

import math

import numpy as np

from udnc_fx.coding.coder_base import Coder, check_symbols, get_coder, read_varint, register, varint
from udnc_fx.errors import ConfigError, FormatError

__all__ = ["RangeAdaptiveCoder", "RangeContextCoder"]


def _check_consumed(mirror, words: np.ndarray, name: str) -> None:
    """Insist that the decoded symbols are exactly what ``words`` encode: re-encoding them (``mirror`` was fed every
    block with the model it was decoded with) must give the same words back.

    A range decoder reading past its input pretends the missing words are zeros, and one that stops early leaves
    words unread: without this check a payload decoded for more or fewer symbols than it holds, or with its last
    word dropped, "succeeds" with wrong symbols. Re-encoding costs one native call per block, next to nothing
    beside the model updates.
    """
    again = mirror.get_compressed()
    if again.shape != words.shape or not np.array_equal(again.astype(np.uint32, copy=False), words):
        raise FormatError(
            "corrupt_payload", f"{name}: the stream does not hold exactly the declared symbols (not consumed exactly)"
        )


# --------------------------------------------------------------------------------------------------------------
# Backward-adaptive range coder (the default)
# --------------------------------------------------------------------------------------------------------------


def _cost_fixed_point(weights: np.ndarray) -> np.ndarray:
    """Approximate code length, in bits * 2**16, of symbols with integer weights in [1, 2**24] out of 2**24.

    Integer only: ``24 - log2(w)`` with log2 by Mitchell's approximation ``e + (w - 2**e) / 2**e``, ``e`` =
    floor(log2 w); i.e. ``((25 - e) << 16) - ((w << 16) >> e)``. (``e`` comes from ``frexp``, which is exact for
    integers below 2**53.) Within 0.09 bit of the exact length, and bit-identical everywhere: the model choice it
    drives must be.
    """
    e = np.frexp(weights)[1] - 1
    return ((25 - e).astype(np.int64) << 16) - ((weights << 16) >> e)


class _AdaptiveModel:
    """The block-adaptive frequency model shared, code path for code path, by the range encoder and decoder.

    Two count sets over the same stream -- a slow one that remembers everything and a fast one that forgets (halved
    whenever it holds more than FAST_LIMIT symbols) -- and, for each block, the one that would have coded the recent
    blocks more cheaply. Integer arithmetic only (int64 NumPy), so the encoder and any decoder rebuild bit-identical
    weights and make the same choices. Row 0 of the arrays is the slow model, row 1 the fast one.
    """

    PRECISION = 24  # constriction's default range coder: probabilities are integers out of 2**24
    INCREMENT = 1024  # weight of one observed symbol
    PRIOR_MASS = 32 * 1024  # total prior weight spread over the alphabet (32 pseudo-observations) ...
    PRIOR_MAX = 512  # ... but at most half an observation per symbol (Krichevsky-Trofimov) for small alphabets
    FIRST_BLOCK = 16
    MAX_BLOCK = 256
    SLOW_LIMIT = 1 << 28  # keeps weight * free below 2**63
    FAST_LIMIT = 1 << 11

    def __init__(self, alphabet_size: int):
        k = alphabet_size
        self.k = k
        self.free = (1 << self.PRECISION) - k
        self.prior = min(self.PRIOR_MAX, max(1, self.PRIOR_MASS // k))
        self.limits = (self.SLOW_LIMIT, self.FAST_LIMIT)
        self.counts = np.zeros((2, k), np.int64)
        self.totals = [0, 0]
        # weights = prior + INCREMENT * counts and masses = their row sums, kept up to date incrementally
        self.weights = np.full((2, k), self.prior, np.int64)
        self.masses = np.full((2, 1), self.prior * k, np.int64)
        self.scores = [0, 0]  # decayed cost (bits * 2**16) each model would have spent on the recent blocks
        self.max_block = max(self.MAX_BLOCK, k)
        self.block = self.FIRST_BLOCK
        self._free = np.zeros((2, k), np.int64)
        self._rows = np.arange(2)

    def next_block_length(self) -> int:
        length = self.block
        self.block = min(2 * self.block, self.max_block)
        return length

    def probabilities(self) -> np.ndarray:
        """The next block's free weights f_i (sum exactly 2**24 - K) as float64; symbol i gets f_i + 1."""
        free = self.weights * self.free
        free //= self.masses
        free[self._rows, np.argmax(self.weights, axis=1)] += self.free - free.sum(axis=1)
        self._free = free
        return free[1 if self.scores[1] < self.scores[0] else 0].astype(np.float64)

    def update(self, block: np.ndarray) -> None:
        """Account for the block just coded with the weights ``probabilities`` returned."""
        histogram = np.bincount(block, minlength=self.k)
        costs = (_cost_fixed_point(self._free + 1) @ histogram).tolist()
        size = int(block.size)
        self.counts += histogram
        self.weights += self.INCREMENT * histogram
        self.masses += self.INCREMENT * size
        for row in (0, 1):
            self.scores[row] = self.scores[row] - (self.scores[row] >> 1) + costs[row]
            self.totals[row] += size
            if self.totals[row] > self.limits[row]:
                counts = self.counts[row]
                while self.totals[row] > self.limits[row]:
                    counts >>= 1
                    self.totals[row] = int(counts.sum())
                self.weights[row] = self.prior + self.INCREMENT * counts
                self.masses[row] = self.prior * self.k + self.INCREMENT * self.totals[row]


class RangeAdaptiveCoder(Coder):
    """Range coding with a backward-adaptive model: universal (no table stored), within a fraction of a percent of
    the empirical order-0 entropy on long stationary streams, and below it on streams whose statistics drift.

    Payload (``count == 0`` or ``alphabet_size == 1``: zero bytes): ``W`` (varint) then ``W`` 32-bit words,
    little-endian, as produced by constriction's ``stream.queue.RangeEncoder`` (``DefaultRangeEncoder``: 32-bit
    words, 64-bit state, 24-bit probability precision) coding every symbol in order with the model below. The
    payload length must be exactly ``len(varint(W)) + 4 W``.

    The model (integer arithmetic throughout; ``K`` = alphabet size, ``F = 2**24 - K``,
    ``a = min(512, max(1, 32768 // K))`` the prior weight of every symbol):

    - Two count vectors, *slow* ``s`` and *fast* ``q`` (all zero at the start, totals ``S`` and ``Q``), and two
      scores ``σ_s = σ_q = 0``.
    - The stream is cut into blocks of 16, 32, 64, ... symbols, doubling up to ``max(256, K)`` and constant from
      then on (the last block may be shorter).
    - Before each block, each count vector ``c`` (total ``C``) gives weights ``m_i = a + 1024 c_i``,
      ``M = a K + 1024 C`` and free weights ``f_i = floor(m_i F / M)``, then ``F - sum f_i`` added to ``f_j`` for
      the first ``j`` with the largest ``m_j``. The block is coded with the fast model's weights if ``σ_q < σ_s``,
      else the slow model's: symbol ``i`` has probability ``(f_i + 1) / 2**24`` (cdf
      ``cum_i = i + sum_{j<i} f_j``). (constriction's ``Categorical(f, perfect=False)`` is handed the ``f_i`` as
      float64; as they are integers summing to ``F``, its fixed-point conversion yields exactly these weights.)
    - After the block, with ``h_i`` its histogram: each model's score becomes ``σ - (σ >> 1) + sum_i h_i L(f_i + 1)``
      with that model's ``f`` for the block, where ``L(w) = ((25 - e) << 16) - ((w << 16) >> e)``,
      ``e = floor(log2 w)`` (Mitchell's approximation of ``2**16 (24 - log2 w)``, the symbol's cost in bits).
      Then ``s += h``, ``q += h``; while ``S > 2**28``: ``s_i >>= 1`` for all ``i``; while ``Q > 2048``:
      ``q_i >>= 1`` for all ``i`` (totals recomputed after each halving).

    The fast model remembers about the last 2048 symbols, so it follows runs such as the rows of dead units or
    pruned channels (8-10 % below the order-0 entropy on such a layer), while the choice by recent cost keeps
    stationary streams on the slow model (within 0.1 % of the entropy from 10**5 symbols). Small first blocks let
    the model learn quickly; blocks of at most 256 symbols (or ``K``) react to drift, and at least ``K`` symbols
    keep the O(K) rebuild of the model per block at O(1) per symbol. Supports ``2 <= K <= 2**24 - 2``
    (``K = 1`` costs nothing).
    """

    name = "range-adaptive-v1"
    max_alphabet_size = (1 << _AdaptiveModel.PRECISION) - 2
    #: Streams up to this many symbols are costed exactly (coded); longer ones by :meth:`cost_bits`'s formula.
    EXACT_COST_SYMBOLS = 1 << 15

    def cost_bits(self, symbols: np.ndarray, alphabet_size: int, **hints) -> float:
        """The bits :meth:`encode` writes: exact (coded) up to :attr:`EXACT_COST_SYMBOLS` symbols; above, the
        stream's order-0 entropy plus ``½·log2(n)`` bits per used symbol but one (the adaptive model's learning cost)
        and 40 bits of words and varint, which the coder beats by 0-9 % on long streams whose statistics drift
        (lattice codebooks sorted by frequency: measured on Gaussian A2/D4/E8 codebooks of 10^4 to 7·10^5 symbols).
        Why: the adaptive model is rebuilt per block in Python, 0.8 s per 7·10^5 symbols, too slow for a step solve
        that costs every layer's table several times."""
        arr, k = check_symbols(symbols, alphabet_size, self.max_alphabet_size)
        n = arr.size
        if n == 0 or k == 1:
            return 0.0
        if n <= self.EXACT_COST_SYMBOLS:
            return 8.0 * len(self.encode(arr, k))
        counts = np.bincount(arr)
        counts = counts[counts > 0]
        p = counts / n
        entropy = float(-(p * np.log2(p)).sum()) * n
        return entropy + 0.5 * (counts.size - 1) * math.log2(n) + 40.0

    def encode(self, symbols: np.ndarray, alphabet_size: int) -> bytes:
        arr, k = check_symbols(symbols, alphabet_size, self.max_alphabet_size)
        n = arr.size
        if n == 0 or k == 1:
            return b""
        import constriction

        categorical = constriction.stream.model.Categorical
        encoder = constriction.stream.queue.RangeEncoder()
        model = _AdaptiveModel(k)
        sym32 = arr.astype(np.int32)
        pos = 0
        while pos < n:
            end = min(n, pos + model.next_block_length())
            encoder.encode(sym32[pos:end], categorical(model.probabilities(), perfect=False))
            model.update(arr[pos:end])
            pos = end
        words = encoder.get_compressed().astype("<u4", copy=False)
        return varint(int(words.size)) + words.tobytes()

    def _decode(self, view: memoryview, n: int, k: int) -> np.ndarray:
        if n == 0 or k == 1:
            if len(view):
                raise FormatError("corrupt_payload", f"{self.name}: expected an empty payload, got {len(view)} bytes")
            return np.zeros(n, np.int64)
        nwords, pos = read_varint(view, 0)
        if len(view) - pos != 4 * nwords:
            kind = "truncated" if len(view) - pos < 4 * nwords else "corrupt_payload"
            raise FormatError(kind, f"{self.name}: {len(view) - pos} payload bytes, header says {4 * nwords}")
        import constriction

        categorical = constriction.stream.model.Categorical
        out = np.empty(n, np.int64)
        model = _AdaptiveModel(k)
        words = np.frombuffer(view[pos:], "<u4").astype(np.uint32)
        decoder = constriction.stream.queue.RangeDecoder(words)
        mirror = constriction.stream.queue.RangeEncoder()
        start = 0
        while start < n:
            end = min(n, start + model.next_block_length())
            probabilities = categorical(model.probabilities(), perfect=False)
            block = decoder.decode(probabilities, end - start)
            block = np.asarray(block, np.int64)
            if block.shape != (end - start,) or (block.size and (block.min() < 0 or block.max() >= k)):
                raise FormatError("corrupt_payload", f"{self.name}: decoder returned invalid symbols")
            mirror.encode(block.astype(np.int32), probabilities)
            out[start:end] = block
            model.update(block)
            start = end
        _check_consumed(mirror, words, self.name)
        return out


# --------------------------------------------------------------------------------------------------------------
# Range coding with a per-row density context (pruned weights)
# --------------------------------------------------------------------------------------------------------------


def _bit_lengths(values: np.ndarray) -> np.ndarray:
    """``int.bit_length`` of non-negative int64 values below 2**53, vectorised (0 -> 0)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


class RangeContextCoder(Coder):
    """Range coding of pruned streams with a per-row context: the density of non-zero symbols in each row.

    Magnitude pruning leaves some output units nearly dead and others dense (on the demo CNN's ``fc1`` at 80 %
    sparsity, half the rows keep under 6 % of their weights, the rest about 33 %); an order-0 model pays the
    average density's price on every row. This coder sends each row's count of non-zero symbols, then the zero /
    non-zero mask of the row with that row's density as its probability, then the non-zero symbols with the
    backward-adaptive model of ``range-adaptive-v1``. Every part is coded in whole arrays (no per-symbol Python
    loop), so it scales like ``range-adaptive-v1``. When the row model does not pay (no row structure, a flat
    stream, short rows), the payload is ``range-adaptive-v1``'s behind one mode byte.

    ``encode(symbols, K, row_length=L)`` takes the row length as a hint (``udnc_fx``'s container passes the
    weight's elements per output unit, over ``n``); without it only the flat mode is tried.

    Payload (``count == 0`` or ``alphabet_size == 1``: zero bytes), a mode byte then:

    - mode ``0``: a ``range-adaptive-v1`` payload of the same symbols.
    - mode ``1``: ``L`` (varint, ``1 <= L < 2**24``: the row length; rows are ``L`` symbols, the last one
      possibly shorter), ``z`` (varint, ``< K``: the *zero* symbol, the writer's most frequent one), ``W``
      (varint) and ``W`` 32-bit little-endian words of one constriction ``stream.queue.RangeEncoder`` stream
      holding, in order (probabilities are integer weights out of ``2**24`` as in ``range-adaptive-v1``):

      a. for each row, ``b = bit_length(k)`` where ``k`` is the row's count of symbols ``!= z``, with the
         ``range-adaptive-v1`` model (blocks and all) over the alphabet ``bit_length(L) + 1``;
      b. for each row with ``b >= 2``, the ``b - 1`` low bits of ``k``, most significant first, each with
         probability 1/2 (``k = 2**(b-1) + those bits``; ``b`` in {0, 1} means ``k = b``); a ``k`` larger than
         the row is invalid;
      c. for each row with ``0 < k < len`` (``len`` the row's length), its mask, one symbol per position (``1``
         where the symbol is ``!= z``) with weights ``w1 = 1 + floor(k (2**24 - 2) / len)`` for ``1`` and
         ``2**24 - w1`` for ``0``; rows with ``k = 0`` or ``k = len`` have no mask. The decoded mask of a row must
         hold exactly ``k`` ones;
      d. the symbols ``!= z`` in stream order, each ``s`` mapped to ``s - (s > z)``, with the
         ``range-adaptive-v1`` model over the alphabet ``K - 1`` (nothing when ``K = 2``).

    The writer picks mode 1 only when it is smaller (a tie keeps mode 0). Supports ``2 <= K <= 2**24 - 2``.
    """

    name = "range-context-v1"
    max_alphabet_size = (1 << _AdaptiveModel.PRECISION) - 2
    #: ``encode`` takes ``row_length=``; the container hands it the weight's row length.
    accepts_row_length = True
    _MAX_ROW = (1 << 24) - 1
    _CHUNK = 1 << 18  # mask symbols per constriction call (bounds the per-symbol weight arrays)
    _HALF = np.array([(1 << 23) - 1, (1 << 23) - 1], np.float64)
    _FLAT, _ROWS = 0, 1

    def encode(self, symbols: np.ndarray, alphabet_size: int, *, row_length: int | None = None) -> bytes:
        arr, k = check_symbols(symbols, alphabet_size, self.max_alphabet_size)
        n = arr.size
        if n == 0 or k == 1:
            return b""
        flat = bytes([self._FLAT]) + get_coder("range-adaptive-v1").encode(arr, k)
        if row_length is None:
            return flat
        if isinstance(row_length, (bool, np.bool_)) or not isinstance(row_length, (int, np.integer)):
            raise ConfigError(f"row_length must be an integer, got {type(row_length).__name__}")
        length = int(row_length)
        if not 1 <= length <= self._MAX_ROW:
            raise ConfigError(f"row_length must be in [1, {self._MAX_ROW}], got {length}")
        rows = self._encode_rows(arr, k, min(length, n))
        return rows if len(rows) < len(flat) else flat

    # -- mode 1 --

    @staticmethod
    def _row_layout(n: int, length: int) -> tuple[int, np.ndarray]:
        rows = -(-n // length)
        lens = np.full(rows, length, np.int64)
        lens[-1] = n - length * (rows - 1)
        return rows, lens

    @staticmethod
    def _code_adaptive(encoder, symbols: np.ndarray, k: int) -> None:
        import constriction

        categorical = constriction.stream.model.Categorical
        model = _AdaptiveModel(k)
        sym32 = symbols.astype(np.int32)
        pos = 0
        while pos < symbols.size:
            end = min(symbols.size, pos + model.next_block_length())
            encoder.encode(sym32[pos:end], categorical(model.probabilities(), perfect=False))
            model.update(symbols[pos:end])
            pos = end

    @staticmethod
    def _decode_adaptive(decoder, n: int, k: int, what: str, mirror) -> np.ndarray:
        """Decode ``n`` symbols with the adaptive model, re-encoding each block into ``mirror`` (exactness check)."""
        import constriction

        categorical = constriction.stream.model.Categorical
        out = np.empty(n, np.int64)
        model = _AdaptiveModel(k)
        start = 0
        while start < n:
            end = min(n, start + model.next_block_length())
            probabilities = categorical(model.probabilities(), perfect=False)
            block = np.asarray(decoder.decode(probabilities, end - start), np.int64)
            if block.shape != (end - start,) or (block.size and (block.min() < 0 or block.max() >= k)):
                raise FormatError("corrupt_payload", f"range-context-v1: {what}: invalid symbols")
            mirror.encode(block.astype(np.int32), probabilities)
            out[start:end] = block
            model.update(block)
            start = end
        return out

    @classmethod
    def _mask_weights(cls, counts: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """Free weights ``(f0, f1)`` per masked row (they sum to 2**24 - 2; symbol i has weight f_i + 1)."""
        w1 = 1 + (counts * ((1 << 24) - 2)) // lens
        return np.stack([(1 << 24) - w1 - 1, w1 - 1], axis=1).astype(np.float64)

    @classmethod
    def _mask_chunks(cls, weights: np.ndarray, lens: np.ndarray):
        """Per-symbol weight arrays of the masked rows, in chunks of at most about _CHUNK symbols."""
        start = 0
        while start < lens.size:
            stop, total = start, 0
            while stop < lens.size and (total == 0 or total + int(lens[stop]) <= cls._CHUNK):
                total += int(lens[stop])
                stop += 1
            yield total, np.repeat(weights[start:stop], lens[start:stop], axis=0)
            start = stop

    def _encode_rows(self, arr: np.ndarray, k: int, length: int) -> bytes:
        import constriction

        categorical = constriction.stream.model.Categorical
        n = arr.size
        zero = int(np.argmax(np.bincount(arr, minlength=k)))  # the most frequent symbol, smallest on a tie
        rows, lens = self._row_layout(n, length)
        nonzero = arr != zero
        padded = np.zeros(rows * length, bool)
        padded[:n] = nonzero
        counts = padded.reshape(rows, length).sum(axis=1).astype(np.int64)
        encoder = constriction.stream.queue.RangeEncoder()
        # a. bit lengths of the counts
        bits = _bit_lengths(counts)
        self._code_adaptive(encoder, bits, length.bit_length() + 1)
        # b. the counts' low bits
        nlow = np.maximum(bits - 1, 0)
        if int(nlow.sum()):
            owner = np.repeat(np.arange(rows), nlow)
            j = np.arange(owner.size) - np.repeat(np.cumsum(nlow) - nlow, nlow)
            low = (counts[owner] >> (nlow[owner] - 1 - j)) & 1
            encoder.encode(low.astype(np.int32), categorical(self._HALF, perfect=False))
        # c. masks of the mixed rows
        mixed = (counts > 0) & (counts < lens)
        if mixed.any():
            weights = self._mask_weights(counts[mixed], lens[mixed])
            in_mixed = np.repeat(mixed, lens)
            mask = nonzero[in_mixed].astype(np.int32)
            family = categorical(perfect=False)
            pos = 0
            for total, probs in self._mask_chunks(weights, lens[mixed]):
                encoder.encode(mask[pos : pos + total], family, probs)
                pos += total
        # d. the non-zero symbols
        if k > 2:
            rest = arr[nonzero]
            self._code_adaptive(encoder, rest - (rest > zero), k - 1)
        words = encoder.get_compressed().astype("<u4", copy=False)
        head = bytes([self._ROWS]) + varint(length) + varint(zero)
        return head + varint(int(words.size)) + words.tobytes()

    def _decode(self, view: memoryview, n: int, k: int) -> np.ndarray:
        if n == 0 or k == 1:
            if len(view):
                raise FormatError("corrupt_payload", f"{self.name}: expected an empty payload, got {len(view)} bytes")
            return np.zeros(n, np.int64)
        if len(view) < 1:
            raise FormatError("truncated", f"{self.name}: empty payload")
        mode = view[0]
        if mode == self._FLAT:
            return get_coder("range-adaptive-v1")._decode(view[1:], n, k)
        if mode != self._ROWS:
            raise FormatError("corrupt_payload", f"{self.name}: unknown mode {mode}")
        length, pos = read_varint(view, 1)
        zero, pos = read_varint(view, pos)
        if not 1 <= length <= self._MAX_ROW:
            raise FormatError("corrupt_payload", f"{self.name}: row length {length} outside [1, {self._MAX_ROW}]")
        if zero >= k:
            raise FormatError("corrupt_payload", f"{self.name}: zero symbol {zero} >= alphabet_size {k}")
        nwords, pos = read_varint(view, pos)
        if len(view) - pos != 4 * nwords:
            kind = "truncated" if len(view) - pos < 4 * nwords else "corrupt_payload"
            raise FormatError(kind, f"{self.name}: {len(view) - pos} payload bytes, header says {4 * nwords}")
        import constriction

        categorical = constriction.stream.model.Categorical
        rows, lens = self._row_layout(n, min(length, n))
        words = np.frombuffer(view[pos:], "<u4").astype(np.uint32)
        decoder = constriction.stream.queue.RangeDecoder(words)
        mirror = constriction.stream.queue.RangeEncoder()
        bits = self._decode_adaptive(decoder, rows, length.bit_length() + 1, "row counts", mirror)
        nlow = np.maximum(bits - 1, 0)
        counts = np.where(bits > 0, np.left_shift(1, np.maximum(bits - 1, 0)), 0).astype(np.int64)
        total_low = int(nlow.sum())
        if total_low:
            half = categorical(self._HALF, perfect=False)
            low = np.asarray(decoder.decode(half, total_low), np.int64)
            if low.shape != (total_low,) or int(low.min()) < 0 or int(low.max()) > 1:
                raise FormatError("corrupt_payload", f"{self.name}: invalid count bits")
            mirror.encode(low.astype(np.int32), half)
            owner = np.repeat(np.arange(rows), nlow)
            j = np.arange(total_low) - np.repeat(np.cumsum(nlow) - nlow, nlow)
            counts += np.bincount(owner, weights=low << (nlow[owner] - 1 - j), minlength=rows).astype(np.int64)
        if np.any(counts > lens):
            raise FormatError("corrupt_payload", f"{self.name}: a row count exceeds the row length")
        nonzero = np.zeros(n, bool)
        full = np.repeat(counts == lens, lens)
        nonzero[full] = True
        mixed = (counts > 0) & (counts < lens)
        if mixed.any():
            weights = self._mask_weights(counts[mixed], lens[mixed])
            family = categorical(perfect=False)
            parts = []
            for total, probs in self._mask_chunks(weights, lens[mixed]):
                part = np.asarray(decoder.decode(family, probs), np.int64)
                if part.shape != (total,) or int(part.min()) < 0 or int(part.max()) > 1:
                    raise FormatError("corrupt_payload", f"{self.name}: invalid mask symbols")
                mirror.encode(part.astype(np.int32), family, probs)
                parts.append(part)
            mask = np.concatenate(parts)
            ones = np.add.reduceat(mask, np.cumsum(lens[mixed]) - lens[mixed])
            if not np.array_equal(ones, counts[mixed]):
                raise FormatError("corrupt_payload", f"{self.name}: a row mask disagrees with its count")
            nonzero[np.repeat(mixed, lens)] = mask.astype(bool)
        out = np.full(n, zero, np.int64)
        m = int(counts.sum())
        if m:
            if k == 2:
                out[nonzero] = 1 - zero
            else:
                rest = self._decode_adaptive(decoder, m, k - 1, "non-zero symbols", mirror)
                out[nonzero] = rest + (rest >= zero)
        _check_consumed(mirror, words, self.name)
        return out


for _coder in (RangeAdaptiveCoder(), RangeContextCoder()):
    register(_coder)
del _coder

"""Static canonical Huffman (``huffman-static-v1``), the paper's non-universal baseline, behind the one
:class:`~udnc_fx.coding.coder_base.Coder` interface."""

from __future__ import annotations

import numpy as np

from udnc_fx.coding.coder_base import (
    Coder, check_symbols, histogram, read_varint, read_varints, register, varint, varints,
)
from udnc_fx.errors import ConfigError, FormatError

__all__ = ["HuffmanStaticCoder"]


def _huffman_code_lengths(weights: list[int]) -> list[int]:
    """Optimal prefix-code lengths for ``weights`` sorted ascending (len >= 2), in the same order.

    Moffat & Katajainen's in-place O(n) algorithm ("In-place calculation of minimum-redundancy codes", 1995).
    """
    a = list(weights)
    n = len(a)
    # Phase 1: combine, leaving parent pointers.
    leaf = 0
    root = 0
    for nxt in range(n - 1):
        # first child
        if leaf >= n or (root < nxt and a[root] < a[leaf]):
            a[nxt] = a[root]
            a[root] = nxt
            root += 1
        else:
            a[nxt] = a[leaf]
            leaf += 1
        # second child
        if leaf >= n or (root < nxt and a[root] < a[leaf]):
            a[nxt] += a[root]
            a[root] = nxt
            root += 1
        else:
            a[nxt] += a[leaf]
            leaf += 1
    # Phase 2: internal node depths.
    a[n - 2] = 0
    for nxt in range(n - 3, -1, -1):
        a[nxt] = a[a[nxt]] + 1
    # Phase 3: leaf depths.
    avail, used, depth = 1, 0, 0
    root = n - 2
    nxt = n - 1
    while avail > 0:
        while root >= 0 and a[root] == depth:
            used += 1
            root -= 1
        while avail > used:
            a[nxt] = depth
            nxt -= 1
            avail -= 1
        avail = 2 * used
        depth += 1
        used = 0
    return a


class HuffmanStaticCoder(Coder):
    """Static canonical Huffman code with its table stored: the paper's non-universal baseline.

    Payload::

        U                         varint: number of distinct symbols in the stream (0 iff count == 0)
        U entries                 varint each: (gap << 6) | length, symbols in increasing order;
                                  gap = symbol - previous symbol - 1 (previous = -1 before the first),
                                  length = code length in bits, 1..56 (0 when U == 1: the body is then empty)
        body                      the codes of the symbols in order, most significant bit first, packed MSB-first
                                  into bytes, the last byte padded with zero bits

    Codes are canonical (as in DEFLATE): sort the symbols by (length, symbol); the first gets code 0 and each next
    one the previous code plus one, shifted left by the increase in length. For U >= 2 the lengths must satisfy
    Kraft's equality exactly. The body must be exactly ``ceil(total bits / 8)`` bytes with zero padding.
    """

    name = "huffman-static-v1"
    _MAX_LENGTH = 56  # a code must fit the 57 bits a 64-bit window read at any bit offset provides
    _SEGMENT_BYTES = 1 << 13
    _HOPS = 4
    _ENCODE_CHUNK = 1 << 18

    # -- encoding --

    def encode(self, symbols: np.ndarray, alphabet_size: int) -> bytes:
        arr, k = check_symbols(symbols, alphabet_size, self.max_alphabet_size)
        if arr.size == 0:
            return varint(0)
        used, counts, rank = histogram(arr, k, with_rank=True)
        if used.size == 1:
            return varint(1) + varint(int(used[0]) << 6)
        order = np.lexsort((used, counts))  # ascending count, ties by symbol
        lengths = np.zeros(used.size, np.int64)
        lengths[order] = _huffman_code_lengths(counts[order].tolist())
        if int(lengths.max()) > self._MAX_LENGTH:
            raise ConfigError(f"{self.name}: code length {int(lengths.max())} exceeds {self._MAX_LENGTH}")
        gaps = np.diff(used, prepend=-1) - 1
        table = varint(int(used.size)) + varints((gaps << 6) | lengths)
        codes = self._canonical_codes(used, lengths)
        return table + self._pack(codes[rank], lengths[rank])

    @staticmethod
    def _canonical_codes(used: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Canonical codes (uint64) for ``used`` symbols (ascending) with the given lengths, in the same order."""
        order = np.lexsort((used, lengths))
        ls = lengths[order]
        codes_sorted = np.zeros(ls.size, np.uint64)
        code = 0
        for i in range(1, ls.size):  # U iterations; U is the number of distinct symbols, small next to the stream
            code = (code + 1) << int(ls[i] - ls[i - 1])
            codes_sorted[i] = code
        codes = np.empty_like(codes_sorted)
        codes[order] = codes_sorted
        return codes

    def _pack(self, codes: np.ndarray, lengths: np.ndarray) -> bytes:
        pieces: list[bytes] = []
        carry = np.zeros(0, np.uint8)
        for lo in range(0, codes.size, self._ENCODE_CHUNK):
            c = codes[lo : lo + self._ENCODE_CHUNK]
            ln = lengths[lo : lo + self._ENCODE_CHUNK]
            owner = np.repeat(np.arange(c.size), ln)
            # bit j of a code (0 = most significant) is (code >> (len - 1 - j)) & 1
            ends = np.cumsum(ln)
            shift = (ends[owner] - 1 - np.arange(owner.size)).astype(np.uint64)
            bits = ((c[owner] >> shift) & np.uint64(1)).astype(np.uint8)
            bits = np.concatenate([carry, bits])
            whole = bits.size - bits.size % 8
            pieces.append(np.packbits(bits[:whole]).tobytes())
            carry = bits[whole:]
        pieces.append(np.packbits(carry).tobytes())
        return b"".join(pieces)

    # -- decoding --

    def _decode(self, view: memoryview, n: int, k: int) -> np.ndarray:
        n_used, pos = read_varint(view, 0)
        if n == 0:
            if n_used != 0 or pos != len(view):
                raise FormatError("corrupt_payload", f"{self.name}: empty stream with a non-empty payload")
            return np.zeros(0, np.int64)
        if not 1 <= n_used <= min(n, k):
            raise FormatError("corrupt_payload", f"{self.name}: {n_used} distinct symbols for {n} of {k}")
        entries, pos = read_varints(view, pos, n_used)
        lengths = entries & 0x3F
        gaps = entries >> 6
        if int(gaps.max()) >= k:  # also keeps the cumulative sum below 2**63: n_used <= len(data)
            raise FormatError("corrupt_payload", f"{self.name}: table names a symbol >= alphabet_size {k}")
        used = np.cumsum(gaps + 1) - 1
        if int(used[-1]) >= k:
            raise FormatError("corrupt_payload", f"{self.name}: table names a symbol >= alphabet_size {k}")
        body = view[pos:]
        if n_used == 1:
            if int(lengths[0]) != 0 or len(body):
                raise FormatError("corrupt_payload", f"{self.name}: a one-symbol table must have length 0, no body")
            return np.full(n, int(used[0]), np.int64)
        top = self._MAX_LENGTH
        if int(lengths.min()) < 1 or int(lengths.max()) > top:
            raise FormatError("corrupt_payload", f"{self.name}: code length outside [1, {top}]")
        per_length = np.bincount(lengths, minlength=top + 1)
        if sum(int(c) << (top - length) for length, c in enumerate(per_length)) != 1 << top:
            raise FormatError("corrupt_payload", f"{self.name}: code lengths violate Kraft's equality")
        nbits = 8 * len(body)
        if n > nbits:  # every code is at least one bit
            raise FormatError("truncated", f"{self.name}: {nbits} bits cannot hold {n} symbols")
        return self._decode_body(body, n, used, lengths)

    def _decode_body(self, body: memoryview, n: int, used: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        maxlen = int(lengths.max())
        order = np.lexsort((used, lengths))
        sorted_symbols = used[order]
        bl_count = np.bincount(lengths, minlength=maxlen + 1)
        # first[l]: canonical code of the first symbol of length l; offset[l]: its index in sorted_symbols.
        first = np.zeros(maxlen + 1, np.int64)
        offset = np.zeros(maxlen + 1, np.int64)
        code = 0
        for length in range(1, maxlen + 1):
            code = (code + int(bl_count[length - 1])) << 1
            first[length] = code
            offset[length] = offset[length - 1] + bl_count[length - 1]
        # limits[l-1]: left-aligned (to maxlen bits) end of the codes of length l: a window v starts a code of
        # length l for the smallest l with v < limits[l-1].
        limits = np.array(
            [(int(first[ln]) + int(bl_count[ln])) << (maxlen - ln) for ln in range(1, maxlen + 1)], np.uint64
        )
        nbits = 8 * len(body)
        padded = np.frombuffer(bytes(body) + bytes(8), np.uint8)
        # Big-endian 64-bit word starting at every byte: a code starting at bit p is in the top of
        # word[p >> 3] << (p & 7), which holds at least 57 valid bits.
        words = np.ndarray((len(body) + 1,), dtype=">u8", buffer=padded, strides=(1,)).astype(np.uint64)
        out = np.empty(n, np.int64)
        done = 0
        p = 0
        drop = np.uint64(64 - maxlen)
        bit_shifts = np.arange(8, dtype=np.uint64)
        while done < n:
            if p >= nbits:
                raise FormatError("truncated", f"{self.name}: bit stream ends after {done} of {n} symbols")
            # A segment: every bit position of whole bytes [base, base + nbytes); the next code starts at p.
            base = p >> 3
            nbytes = min(self._SEGMENT_BYTES, len(body) - base)
            width = 8 * nbytes
            window = ((words[base : base + nbytes, None] << bit_shifts) >> drop).ravel()
            code_len = np.searchsorted(limits, window, side="right").astype(np.int32) + 1
            # Where the code starting at each bit position ends. The codes of the stream form the orbit of p
            # under this map; find it with pointer jumping: jumps[h] skips 2**h codes (capped at a sink, width),
            # a short Python walk over the 2**HOPS-code jumps, then vectorised fill-in of the codes in between.
            ends = np.arange(width, dtype=np.int32) + code_len
            jump = np.append(np.minimum(ends, width), np.int32(width))
            jumps = [jump]
            for _ in range(self._HOPS):
                jump = jump[jump]
                jumps.append(jump)
            groups = -(-(n - done) // (1 << self._HOPS))
            heads: list[int] = []
            i = p & 7
            while i < width and len(heads) < groups:
                heads.append(i)
                i = int(jump[i])
            idx = np.asarray(heads, np.int32)
            for level in reversed(range(self._HOPS)):
                idx = np.stack([idx, jumps[level][idx]], axis=1).ravel()
            # Positions past the sink only follow the last code inside the segment: the valid ones are a prefix.
            idx = idx[: min(n - done, int(np.count_nonzero(idx < width)))]
            ln = code_len[idx]
            value = (window[idx] >> (maxlen - ln).astype(np.uint64)).astype(np.int64)
            out[done : done + idx.size] = sorted_symbols[value - first[ln] + offset[ln]]
            done += idx.size
            p = 8 * base + int(ends[idx[-1]])
        if p > nbits:
            raise FormatError("truncated", f"{self.name}: last code runs past the end of the payload")
        if nbits - p >= 8:
            raise FormatError("corrupt_payload", f"{self.name}: {(nbits - p) // 8} trailing bytes")
        if p < nbits and int(padded[len(body) - 1]) & ((1 << (nbits - p)) - 1):
            raise FormatError("corrupt_payload", f"{self.name}: non-zero padding bits")
        return out


register(HuffmanStaticCoder())

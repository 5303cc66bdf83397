"""The numba kernels of ``ans-dither-v2``: interleaved rANS over 32-bit words (the format is in ``ans_native.py``).

Every kernel is ``@njit(cache=True, nogil=True)``: compiled once per argument types and cached on disk, and it
releases the GIL, so independent streams code in parallel threads. The kernels trust nothing they read from a
payload: every read of the word buffer is bounds-checked here, and every other index is bounded by the caller's
validation documented at each kernel (context counts, table sums). Every loop is bounded by its arguments.

Coder state: ``S`` states ``x_j`` in ``[2^31, 2^63)`` (int64); position ``i`` of the coded sequence uses state
``i mod S``. A symbol ``s`` of a table with frequencies ``f`` and cumulative frequencies ``c`` at precision ``P``
(``Σ f = 2^P``, ``P <= 16``) is pushed by ``x -> floor(x / f_s) · 2^P + (x mod f_s) + c_s`` after emitting the low 32
bits of ``x`` when ``x >= f_s · 2^(63 − P)`` (a symbol with ``f_s = 2^P`` leaves ``x`` as it is), and popped by
``slot = x mod 2^P``, ``s = lut[slot]``, ``x -> f_s · floor(x / 2^P) + slot − c_s``, then ``x -> x · 2^32 + next
word`` when ``x < 2^31``. Whatever the words, a popped state stays in ``[1, 2^63)`` and a refilled one in
``[2^31, 2^63)``: no overflow, no unbounded loop.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: The states' lower bound: 2^31 (32-bit words, states below 2^63).
LOW = 1 << 31

# Error codes of the decode kernel (0 = fine).
OK = 0
ERR_WORDS = 1  # the stream ran out of words


@njit(cache=True, nogil=True)
def context_counts(n, codes, shift, labels, row_length, bits, nctx):
    """Symbols per context of ``n`` stream positions: context ``(labels[i // L] << bits) + (codes[i] >> shift)``.

    ``codes`` is used only when ``bits > 0``, ``labels`` only when it is not empty. The caller guarantees ``codes``
    has ``n`` entries (when used), ``labels`` ``ceil(n / L)`` entries (when used), each below ``nctx >> bits``."""
    counts = np.zeros(nctx, np.int64)
    use_codes = bits > 0
    use_labels = labels.size > 0
    row = 0
    left = row_length
    base = 0
    if use_labels and n > 0:
        base = np.int64(labels[0]) << bits
    for i in range(n):
        c = base
        if use_codes:
            c += np.int64(codes[i]) >> shift
        counts[c] += 1
        if use_labels:
            left -= 1
            if left == 0 and i + 1 < n:
                row += 1
                left = row_length
                base = np.int64(labels[row]) << bits
    return counts


@njit(cache=True, nogil=True)
def build_lut(freq, cum, used, precision, lut):
    """Fill ``lut`` (``rows << P`` zeros on entry) so that slot ``cum[c, s] + r`` (``r < freq[c, s]``) of row ``c``
    holds ``s``, for the rows with ``used[c]``. The caller validated each used row: non-negative frequencies summing
    to exactly ``2^P`` (so every write is inside the row's ``2^P`` slots)."""
    rows, width = freq.shape
    for c in range(rows):
        if not used[c]:
            continue
        base = c << precision
        for s in range(1, width):  # symbol 0's slots are already 0
            start = base + cum[c, s]
            for r in range(freq[c, s]):
                lut[start + r] = s


@njit(cache=True, nogil=True)
def encode_symbols(sym, n, start, codes, shift, labels, row_length, bits, ctx_base, freq, cum, precision,
                   states, out, opos):
    """Push positions ``start + n − 1`` down to ``start`` of the coded sequence: ``sym[i]`` in context ``ctx_base
    + (labels[i // L] << bits) + (codes[i] >> shift)`` (each term present as in :func:`context_counts`).

    Words go downwards into ``out`` below ``opos``; returns the new ``opos``, or -1 when ``out`` runs out of room
    (at most one word per symbol is needed). The caller guarantees every symbol has a non-zero frequency in its
    context."""
    if n == 0:
        return opos
    use_codes = bits > 0
    use_labels = labels.size > 0
    smask = states.size - 1  # a power of two
    top = np.int64(1) << precision
    hi_shift = 63 - precision
    row = 0
    left = 1
    base = ctx_base
    if use_labels:
        row = (n - 1) // row_length
        left = (n - 1) - row * row_length + 1  # positions of this row still to push, this one included
        base = ctx_base + (np.int64(labels[row]) << bits)
    for i in range(n - 1, -1, -1):
        c = base
        if use_codes:
            c += np.int64(codes[i]) >> shift
        s = np.int64(sym[i])
        f = freq[c, s]
        if f != top:  # a certain symbol costs nothing and leaves the state as it is
            j = (start + i) & smask
            x = states[j]
            if x >= (f << hi_shift):
                if opos == 0:
                    return -1  # out of room: the caller retries with a larger buffer
                opos -= 1
                out[opos] = x & 0xFFFFFFFF
                x >>= 32
            q = x // f
            states[j] = (q << precision) + (x - q * f) + cum[c, s]
        if use_labels:
            left -= 1
            if left == 0 and i > 0:
                row -= 1
                left = row_length
                base = ctx_base + (np.int64(labels[row]) << bits)
    return opos


@njit(cache=True, nogil=True)
def decode_symbols(words, wpos, n, start, codes, shift, labels, row_length, bits, ctx_base, freq, cum, lut,
                   precision, states, out):
    """Pop ``n`` symbols into ``out`` (positions ``start ..`` of the coded sequence), reading ``words`` from
    ``wpos``; contexts as in :func:`encode_symbols`. Returns ``(error code, new wpos)``.

    Safe on any words and any states in ``[2^31, 2^63)``: every word read is bounds-checked, and ``lut`` names only
    symbols with ``freq >= 1`` and ``cum <= slot`` (:func:`build_lut`). The caller guarantees the contexts are in
    range and that every context met has a built ``lut`` row (from the counts of :func:`context_counts`)."""
    use_codes = bits > 0
    use_labels = labels.size > 0
    smask = states.size - 1  # a power of two
    mask = (np.int64(1) << precision) - 1
    nwords = words.size
    row = 0
    left = row_length
    base = ctx_base
    if use_labels and n > 0:
        base = ctx_base + (np.int64(labels[0]) << bits)
    for i in range(n):
        c = base
        if use_codes:
            c += np.int64(codes[i]) >> shift
        j = (start + i) & smask
        x = states[j]
        slot = x & mask
        s = np.int64(lut[(c << precision) + slot])
        x = freq[c, s] * (x >> precision) + slot - cum[c, s]
        if x < LOW:
            if wpos >= nwords:
                return ERR_WORDS, wpos
            x = (x << 32) | np.int64(words[wpos])
            wpos += 1
        states[j] = x
        out[i] = s
        if use_labels:
            left -= 1
            if left == 0 and i + 1 < n:
                row += 1
                left = row_length
                base = ctx_base + (np.int64(labels[row]) << bits)
    return OK, wpos


@njit(cache=True, nogil=True)
def contexts(n, codes, shift, labels, row_length, bits):
    """Each position's context as uint8 (:func:`context_counts`'s rule; contexts are below 256)."""
    out = np.empty(n, np.uint8)
    use_codes = bits > 0
    row = 0
    left = row_length
    base = np.int64(labels[0]) << bits if n > 0 else 0
    for i in range(n):
        c = base
        if use_codes:
            c += np.int64(codes[i]) >> shift
        out[i] = c
        left -= 1
        if left == 0 and i + 1 < n:
            row += 1
            left = row_length
            base = np.int64(labels[row]) << bits
    return out


@njit(cache=True, nogil=True)
def decode4(words, wpos, n, ctx, shift, use_ctx, freq, cum, lut, precision, states, out):
    """:func:`decode_symbols` for 4 states (``states[j]`` serves positions ``i`` with ``i mod 4 = j``), contexts
    ``ctx[i] >> shift`` (or 0 without ``use_ctx``), four positions per step with the states in registers: the same
    pops and the same words consumed in the same order. The same safety and caller guarantees."""
    mask = (np.int64(1) << precision) - 1
    nwords = words.size
    x0 = states[0]
    x1 = states[1]
    x2 = states[2]
    x3 = states[3]
    c0 = c1 = c2 = c3 = 0
    i = 0
    while i + 4 <= n:
        if use_ctx:
            c0 = np.int64(ctx[i]) >> shift
            c1 = np.int64(ctx[i + 1]) >> shift
            c2 = np.int64(ctx[i + 2]) >> shift
            c3 = np.int64(ctx[i + 3]) >> shift
        slot = x0 & mask
        s = np.int64(lut[(c0 << precision) + slot])
        x0 = freq[c0, s] * (x0 >> precision) + slot - cum[c0, s]
        out[i] = s
        slot = x1 & mask
        s = np.int64(lut[(c1 << precision) + slot])
        x1 = freq[c1, s] * (x1 >> precision) + slot - cum[c1, s]
        out[i + 1] = s
        slot = x2 & mask
        s = np.int64(lut[(c2 << precision) + slot])
        x2 = freq[c2, s] * (x2 >> precision) + slot - cum[c2, s]
        out[i + 2] = s
        slot = x3 & mask
        s = np.int64(lut[(c3 << precision) + slot])
        x3 = freq[c3, s] * (x3 >> precision) + slot - cum[c3, s]
        out[i + 3] = s
        if x0 < LOW:
            if wpos >= nwords:
                return ERR_WORDS, wpos
            x0 = (x0 << 32) | np.int64(words[wpos])
            wpos += 1
        if x1 < LOW:
            if wpos >= nwords:
                return ERR_WORDS, wpos
            x1 = (x1 << 32) | np.int64(words[wpos])
            wpos += 1
        if x2 < LOW:
            if wpos >= nwords:
                return ERR_WORDS, wpos
            x2 = (x2 << 32) | np.int64(words[wpos])
            wpos += 1
        if x3 < LOW:
            if wpos >= nwords:
                return ERR_WORDS, wpos
            x3 = (x3 << 32) | np.int64(words[wpos])
            wpos += 1
        i += 4
    states[0] = x0
    states[1] = x1
    states[2] = x2
    states[3] = x3
    for i in range(i, n):  # the last n mod 4 positions (states 0 .. n mod 4 − 1)
        c = np.int64(ctx[i]) >> shift if use_ctx else 0
        j = i & 3
        x = states[j]
        slot = x & mask
        s = np.int64(lut[(c << precision) + slot])
        x = freq[c, s] * (x >> precision) + slot - cum[c, s]
        if x < LOW:
            if wpos >= nwords:
                return ERR_WORDS, wpos
            x = (x << 32) | np.int64(words[wpos])
            wpos += 1
        states[j] = x
        out[i] = s
    return OK, wpos


@njit(cache=True, nogil=True, inline="always")
def _push(x, f, rcp, cum, precision):
    """One rANS encode step of state ``x`` for a symbol of frequency ``f`` (``< 2**precision``) starting at ``cum``:
    ``(x // f) << precision | x mod f`` plus ``cum``, the quotient estimated as ``x · rcp`` (``rcp = 1 / f`` in
    float64) and corrected to the exact floor, so the result does not depend on how the float product rounds."""
    q = np.int64(np.float64(x) * rcp)
    r = x - q * f
    while r < 0:  # the estimate is within 1 of the floor for P >= 11, a few units for P >= 8
        q -= 1
        r += f
    while r >= f:
        q += 1
        r -= f
    return (q << precision) + r + cum


@njit(cache=True, nogil=True)
def encode4(sym, n, ctx, shift, use_ctx, freq, cum, rcp, precision, states, out, opos):
    """:func:`encode_symbols` for 4 states (``states[j]`` serves positions ``i`` with ``i mod 4 = j``), contexts
    ``ctx[i] >> shift`` (or 0 without ``use_ctx``), four positions per step with the states in registers: the
    mirror of :func:`decode4`. The same caller guarantees; ``rcp[c, s]`` is ``1 / freq[c, s]`` in float64 (the
    quotients are estimated by a multiplication and corrected to the exact integer floor: the result does not depend
    on how the float product rounds)."""
    top = np.int64(1) << precision
    hi_shift = 63 - precision
    full = n - (n & 3)
    for i in range(n - 1, full - 1, -1):  # the last n mod 4 positions first
        c = np.int64(ctx[i]) >> shift if use_ctx else 0
        s = np.int64(sym[i])
        f = freq[c, s]
        if f != top:
            j = i & 3
            x = states[j]
            if x >= (f << hi_shift):
                if opos == 0:
                    return -1  # out of room: the caller retries with a larger buffer
                opos -= 1
                out[opos] = x & 0xFFFFFFFF
                x >>= 32
            q = x // f
            states[j] = (q << precision) + (x - q * f) + cum[c, s]
    x0 = states[0]
    x1 = states[1]
    x2 = states[2]
    x3 = states[3]
    c0 = c1 = c2 = c3 = 0
    i = full - 4
    while i >= 0:
        if use_ctx:
            c0 = np.int64(ctx[i]) >> shift
            c1 = np.int64(ctx[i + 1]) >> shift
            c2 = np.int64(ctx[i + 2]) >> shift
            c3 = np.int64(ctx[i + 3]) >> shift
        s3 = np.int64(sym[i + 3])
        s2 = np.int64(sym[i + 2])
        s1 = np.int64(sym[i + 1])
        s0 = np.int64(sym[i])
        f3 = freq[c3, s3]
        f2 = freq[c2, s2]
        f1 = freq[c1, s1]
        f0 = freq[c0, s0]
        # renormalise in the order the reader refills (3, 2, 1, 0 pushed: words come out 3 first)
        if f3 != top and x3 >= (f3 << hi_shift):
            if opos == 0:
                return -1  # out of room: the caller retries with a larger buffer
            opos -= 1
            out[opos] = x3 & 0xFFFFFFFF
            x3 >>= 32
        if f2 != top and x2 >= (f2 << hi_shift):
            if opos == 0:
                return -1  # out of room: the caller retries with a larger buffer
            opos -= 1
            out[opos] = x2 & 0xFFFFFFFF
            x2 >>= 32
        if f1 != top and x1 >= (f1 << hi_shift):
            if opos == 0:
                return -1  # out of room: the caller retries with a larger buffer
            opos -= 1
            out[opos] = x1 & 0xFFFFFFFF
            x1 >>= 32
        if f0 != top and x0 >= (f0 << hi_shift):
            if opos == 0:
                return -1  # out of room: the caller retries with a larger buffer
            opos -= 1
            out[opos] = x0 & 0xFFFFFFFF
            x0 >>= 32
        if f3 != top:
            x3 = _push(x3, f3, rcp[c3, s3], cum[c3, s3], precision)
        if f2 != top:
            x2 = _push(x2, f2, rcp[c2, s2], cum[c2, s2], precision)
        if f1 != top:
            x1 = _push(x1, f1, rcp[c1, s1], cum[c1, s1], precision)
        if f0 != top:
            x0 = _push(x0, f0, rcp[c0, s0], cum[c0, s0], precision)
        i -= 4
    states[0] = x0
    states[1] = x1
    states[2] = x2
    states[3] = x3
    return opos


@njit(cache=True, nogil=True)
def joint_counts(sym, codes, use_codes, labels, row_length, nlabels, m):
    """The ``(nlabels, 16, m)`` counts of (row label, dither code, symbol): label ``labels[i // L]`` (0 when
    ``labels`` is empty), code ``codes[i]`` (0 without ``use_codes``). Four interleaved count tables, summed at the
    end, so that runs of one symbol do not serialise on one counter. The caller guarantees the ranges."""
    n = sym.size
    counts = np.zeros((4, nlabels, 16, m), np.int64)
    use_labels = labels.size > 0
    lab = np.int64(labels[0]) if use_labels and n > 0 else 0
    left = row_length
    row = 0
    for i in range(n):
        c = np.int64(codes[i]) if use_codes else 0
        counts[i & 3, lab, c, np.int64(sym[i])] += 1
        if use_labels:
            left -= 1
            if left == 0 and i + 1 < n:
                row += 1
                left = row_length
                lab = np.int64(labels[row])
    return counts[0] + counts[1] + counts[2] + counts[3]

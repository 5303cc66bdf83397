"""``lattice-coords``: lattice points coded by their integer coordinates, with no per-layer table of points.

Why: at 2+ bits/weight nearly every vector of an ``A2``/``D4``/``E8``/``Z^n`` (n > 1) tensor is its own codeword,
so an explicit codebook costs as much as the indices into it and ``Z¹`` wins everywhere. Coding each vector's
coordinates with models shared by all vectors (one table per coordinate, or one for all) costs no table of points
at all; the lattice structure is kept by taking the parity constraints out of the symbols (docs/FORMAT.md,
*lattice-coords*):

* ``Z^n``: ``n`` zigzagged coordinates; ``A2`` (``(a, b)`` in its basis): ``a + (b >> 1)`` and ``b``, zigzagged;
* ``D4``: the first three coordinates, then ``(c3 − p) >> 1`` with ``p`` the parity of ``c0 + c1 + c2`` (the
  last coordinate's parity is implied);
* ``E8 = D8 ∪ (D8 + ½)`` (stored doubled, ``c = 2x``): the coset bit ``p = c0 & 1``, then ``h = (c − p) >> 1``
  (a ``D8`` point) coded like ``D4``: seven free coordinates and the last one halved.

These are the symbol rows of ``lattice-int-coded`` codebooks (:func:`point_symbols`), applied to every vector
instead of every distinct point, except for ``A2`` (:func:`vector_symbols`: ``a + (b >> 1)`` instead of ``a``).

**Streams.** The ``(count, w)`` symbols are coded with the tensor's index coder as one stream in vector order
(``interleaved``: ``count·w`` symbols, one shared model) or as ``w`` streams, one per symbol column (``split``:
``w`` models; the payload starts with the byte lengths of the first ``w − 1`` streams as varints). The writer codes
both and keeps the smaller. A coder that conditions on the dither (``ans-dither-v1``, ``-v2``) gets, for the symbol of
coordinate ``i`` of vector ``j``, the 4-bit code of dither element ``j·n + i``
(``dither_codes(key, count·n, 1)``); the ``E8`` coset bit gets coordinate 0's. In ``split`` streams, the symbols
whose distribution shifts with a parity the reader already knows (``D4``'s halved last coordinate, ``E8``'s ``D8``
coordinates) take that parity in the context's top bits (:func:`_split_context`).

**Format 1.4** (:data:`OWN_DITHER_LAYOUTS`, docs/FORMAT.md): for ``A2``, ``D4`` and ``E8`` under a coder that
takes contexts and the hash dither, the contexts are bins of each coordinate's own dither ``u_i``
(:func:`own_dither_codes`) instead of the hash codes, ``A2`` codes ``b`` first, ``grouped-u`` puts the exchangeable
columns in one stream, and the column layouts may escape rare large symbols into one tail stream per stream
(:data:`ESCAPES`).

**Reading** rebuilds what the quantizer held in memory: the distinct points, most frequent first with ties broken
by the integer coordinates (:func:`index_points`, the order of :func:`udnc_fx.quantizer.quantize_array`), and each
vector's index into them; so a saved and loaded model has the same indices and codebook, and decodes bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from udnc_fx.coding.coder_base import decode_stream, encode_stream, read_varint, varint
from udnc_fx.coding.limits import max_index_alphabet

from udnc_fx.errors import ConfigError, FormatError

__all__ = [
    "ENCODING",
    "LAYOUTS",
    "point_symbols",
    "points_from_symbols",
    "symbol_width",
    "index_points",
    "encode_points",
    "decode_points",
    "coded_bits",
    "context_codes",
    "decode_point_parts",
]

ENCODING = "lattice-coords"
#: The two stream layouts (docs/FORMAT.md); the writer keeps the smaller. Their names (format 1.2) mean contexts from
#: the hash dither codes (``ans.dither_codes``); with ``-u`` appended (format 1.4), from bins of each
#: coordinate's own dither ``u_i`` (:func:`own_dither_codes`), which the writer uses where
#: :func:`own_dither_applies`.
LAYOUTS = ("interleaved", "split")
#: The layouts whose contexts are bins of each coordinate's own dither (format 1.4); ``grouped-u`` is ``split-u``
#: with the exchangeable columns in one stream each (one model per context instead of one per column: a seventh of
#: ``E8``'s tables), :data:`COLUMN_GROUPS`.
OWN_DITHER_LAYOUTS = frozenset({"interleaved-u", "split-u", "grouped-u"})
#: The escape thresholds ``T`` a writer tries for the ``split-u``/``grouped-u`` streams (``0``: no escape): symbols
#: ``>= T`` are coded as ``T`` in the stream, the excess ``s − T`` in a tail stream after it with one table and no
#: context (heavy tails: their rare large symbols cost table entries in every context; Student-t₃ at 3 bits/weight:
#: 0.008 bit/weight saved, benchmarks/theory_gap.py).
ESCAPES = (8, 16)
#: What :func:`encode_points` may try (``layouts=``): the stream layouts, each under the tensor's context rule.
STREAM_LAYOUTS = ("interleaved", "split", "grouped")
#: Every layout name a reader accepts.
ALL_LAYOUTS = LAYOUTS + ("interleaved-u", "split-u", "grouped-u")
#: The symbol columns of each stream of a ``grouped-u`` payload: ``E8``: the coset bit, the seven free ``D8``
#: coordinates, the halved last one; ``D4``: the three free coordinates, the halved last one.
COLUMN_GROUPS = {"E8": ((0,), (1, 2, 3, 4, 5, 6, 7), (8,)), "D4": ((0, 1, 2), (3,))}
#: The lattices whose coordinates are coded with :func:`own_dither_codes` contexts by a coder that takes contexts
#: (for ``Z^n`` the hash codes already are bins of each coordinate's dither, rotated by half a period).
OWN_DITHER_LATTICES = frozenset({"A2", "D4", "E8"})
#: ``s_i`` of :func:`own_dither_codes`, per raw coordinate: 16 bins cover ``|u_i| < 8 / s_i``. ``A2``: ``u_x`` in
#: ``[−½, ½]``, ``u_y`` in ``[−1/√3, 1/√3]`` (``8·√3`` as a float64); ``D4``, ``E8``: ``|u_i| <= 1``, but the
#: marginal is concentrated near 0, so the 16 bins cover ``|u_i| < 2/3`` and the two outermost take the rest.
OWN_DITHER_SCALE = {"A2": (16.0, 13.856406460551018), "D4": (12.0,) * 4, "E8": (12.0,) * 8}
#: Symbols per vector; ``None``: the dimension (``Z^n``).
_ROW_SYMBOLS = {"Z": None, "A2": 2, "D4": 4, "E8": 9}
#: Coordinates must stay below this in magnitude so no symbol transform overflows int64.
MAX_COORDINATE = 1 << 40


def zigzag_encode(x: np.ndarray) -> np.ndarray:
    """Signed integers to unsigned ones (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...), as uint64."""
    x = x.astype(np.int64, copy=False)
    return ((x << 1) ^ (x >> 63)).view(np.uint64)


def zigzag_decode(z: np.ndarray) -> np.ndarray:
    """The inverse of :func:`zigzag_encode`, as int64."""
    z = z.astype(np.uint64, copy=False)
    return ((z >> np.uint64(1)).view(np.int64)) ^ -((z & np.uint64(1)).view(np.int64))


def symbol_width(lattice: str, n: int) -> int:
    """Symbols per lattice vector (``w``): ``n`` for ``Z^n``, 2 for ``A2``, 4 for ``D4``, 9 for ``E8``."""
    return _ROW_SYMBOLS[lattice] or n


def dither_columns(lattice: str, n: int, own: bool = False) -> np.ndarray:
    """For each symbol column, the coordinate whose dither code is its context (``E8``'s coset bit: coordinate 0;
    ``own`` (the ``-u`` layouts) ``A2``: ``b`` first, coordinate 1, then the first coordinate, coordinate 0)."""
    if lattice == "E8":
        return np.array([0, *range(8)], dtype=np.intp)
    if own and lattice == "A2":
        return np.array([1, 0], dtype=np.intp)
    return np.arange(n, dtype=np.intp)


def uses_own_dither(layout: str) -> bool:
    """Whether ``layout`` conditions on the bins of each coordinate's own dither (format 1.4)."""
    return layout in OWN_DITHER_LAYOUTS


def own_layout(layout: str, own: bool) -> str:
    """The layout name of stream layout ``layout`` (``interleaved``/``split``) under the context rule ``own``."""
    return f"{layout}-u" if own else layout


def own_dither_codes(key: int, count: int, lattice: str, n: int) -> np.ndarray:
    """``(count, n)`` uint8: the 4-bit bin of each coordinate's own raw dither ``u_i`` (what the reader regenerates,
    :func:`udnc_fx.record.raw_dither`): ``min(15, max(0, floor(u_i · s_i + 8)))`` in float64, ``s_i`` from
    :data:`OWN_DITHER_SCALE`. The top ``b`` bits of the code are ``2^b`` equal bins. Computed in chunks of vectors so
    the float64 dither never exists for the whole tensor.

    Why: a symbol's distribution shifts with the dither of the coordinate it codes; the hash codes bin the uniform
    variate ``r_i`` behind the dither, which for ``A2``, ``D4`` and ``E8`` (``u = x − Q(x)``, ``x = r ⊙ box``) follows
    ``u_i`` only loosely (benchmarks/theory_gap.py: the ideal rate of the contexts 0.011-0.023 bit/weight lower at 3
    bits/weight on Gaussian, Laplacian and Student-t₃ sources).
    """
    from udnc_fx.lattice import get_lattice  # lazy: only the -u layouts need it
    from udnc_fx.record import DITHER_CHUNK_ELEMENTS, raw_dither

    lat = get_lattice(lattice, n)
    scale = np.asarray(OWN_DITHER_SCALE[lattice], dtype=np.float64)
    out = np.empty((count, n), np.uint8)
    chunk = max(1, DITHER_CHUNK_ELEMENTS // n)
    for v0 in range(0, count, chunk):
        v1 = min(v0 + chunk, count)
        u = raw_dither(key, v1 - v0, lat, v0)
        u *= scale
        u += 8.0
        np.floor(u, out=u)
        np.clip(u, 0.0, 15.0, out=u)
        out[v0:v1] = u
    return out


def point_symbols(lattice: str, c: np.ndarray) -> np.ndarray:
    """The ``(m, w)`` int64 symbol rows of integer lattice points ``c`` (``(m, n)``, ``|c| < 2**40``).

    The parity constraints of ``D4`` and ``E8`` are taken out of the stream: they would cost an order-0 coder a bit
    or more per row, and mixing ``E8``'s two cosets in one alphabet costs it about a third of the stream.
    """
    c = c.astype(np.int64, copy=False)
    if lattice == "D4":
        s = c.copy()
        p = (c[:, 0] + c[:, 1] + c[:, 2]) & 1
        s[:, 3] = (c[:, 3] - p) >> 1
        return zigzag_encode(s).astype(np.int64)
    if lattice == "E8":
        p = c[:, 0] & 1
        h = (c - p[:, None]) >> 1
        q = np.sum(h[:, :7], axis=1) & 1
        h[:, 7] = (h[:, 7] - q) >> 1
        return np.concatenate([p[:, None], zigzag_encode(h).astype(np.int64)], axis=1)
    return zigzag_encode(c).astype(np.int64)


def points_from_symbols(lattice: str, s: np.ndarray, where: str) -> np.ndarray:
    """Inverse of :func:`point_symbols`; ``s`` is ``(m, w)`` with every symbol below ``2**32``.

    Raises:
        FormatError: (``bad_value``) an ``E8`` coset symbol other than 0 or 1.
    """
    s = s.astype(np.uint64, copy=False)
    if lattice == "D4":
        c = zigzag_decode(s)
        p = (c[:, 0] + c[:, 1] + c[:, 2]) & 1
        c[:, 3] = 2 * c[:, 3] + p
        return c
    if lattice == "E8":
        p = s[:, 0].astype(np.int64)
        if p.size and int(p.max()) > 1:
            raise FormatError("bad_value", f"{where}: an E8 coset (row parity) symbol is not 0 or 1")
        h = zigzag_decode(s[:, 1:])
        q = np.sum(h[:, :7], axis=1) & 1
        h[:, 7] = 2 * h[:, 7] + q
        return 2 * h + p[:, None]
    return zigzag_decode(s)


def vector_symbols(lattice: str, c: np.ndarray, own: bool = False) -> np.ndarray:
    """The ``(m, w)`` symbols ``lattice-coords`` codes for points ``c``: :func:`point_symbols`, except ``A2``, whose
    ``(a, b)`` (point ``(a + b/2, b·√3/2)``) becomes ``(zz(a + (b >> 1)), zz(b))``: ``a + (b >> 1)`` is the point's
    first coordinate rounded down, nearly independent of ``b``, where ``a`` itself is not (measured on a Gaussian
    source at 3 bits/weight: the two marginal entropies sum to 3.137 bits/weight with ``a``, 3.039 with
    ``a + (b >> 1)``, against a joint entropy of 3.032). ``own`` (the ``-u`` layouts): ``A2``'s two columns
    swapped, ``zz(b)`` first, so ``a + (b >> 1)`` is coded knowing ``b``'s parity (the half-step offset of the
    first coordinate's grid)."""
    if lattice == "A2":
        c = c.astype(np.int64, copy=False)
        cols = [c[:, 1], c[:, 0] + (c[:, 1] >> 1)] if own else [c[:, 0] + (c[:, 1] >> 1), c[:, 1]]
        return zigzag_encode(np.stack(cols, axis=1)).astype(np.int64)
    return point_symbols(lattice, c)


def points_from_vector_symbols(lattice: str, s: np.ndarray, where: str, own: bool = False) -> np.ndarray:
    """Inverse of :func:`vector_symbols` (symbols below ``2**32``)."""
    if lattice == "A2":
        c = zigzag_decode(s.astype(np.uint64, copy=False))
        if own:
            c = c[:, ::-1].copy()
        c[:, 0] -= c[:, 1] >> 1
        return c
    return points_from_symbols(lattice, s, where)


def index_points(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indices, codebook_int, counts)`` of integer points ``(m, n)``: the distinct points most frequent first,
    ties broken by the coordinates (lexicographically), as :func:`udnc_fx.quantizer.quantize_array` orders them
    (:func:`udnc_fx.quantizer.rank_rows`, chunk by chunk; the indices in the smallest dtype that holds them)."""
    from udnc_fx.quantizer import QUANTIZE_CHUNK_ELEMENTS, rank_rows  # lazy: not needed to read other encodings

    points = np.asarray(points)
    m, n = points.shape
    chunk = max(1, QUANTIZE_CHUNK_ELEMENTS // n)
    return rank_rows([points[v0 : v0 + chunk] for v0 in range(0, m, chunk)], n)


def own_dither_applies(coder: Any, lattice: str, dither_ok: bool) -> bool:
    """Whether the writer codes this tensor's coordinates in a ``-u`` layout: a coder that takes contexts, the
    hash dither, and a lattice of :data:`OWN_DITHER_LATTICES`."""
    return bool(getattr(coder, "accepts_context", False)) and dither_ok and lattice in OWN_DITHER_LATTICES


def _context_codes(coder: Any, key: int, dither_ok: bool, count: int, n: int, lattice: str, own: bool = False):
    """A function giving the ``(count, w)`` dither codes of the symbols, or ``None`` (no conditioning); ``own``:
    the bins of each coordinate's own dither (:func:`own_dither_codes`), else the hash codes."""
    if not getattr(coder, "accepts_context", False) or not dither_ok:
        return None
    from udnc_fx.coding.ans import dither_codes

    cols = dither_columns(lattice, n, own)

    def codes() -> np.ndarray:
        if own:
            return np.ascontiguousarray(own_dither_codes(key, count, lattice, n)[:, cols])
        return dither_codes(key, count * n, 1).reshape(count, n)[:, cols]

    return codes


def _parity_bits(lattice: str, i: int, symbols: np.ndarray, own: bool = False) -> tuple[np.ndarray, ...]:
    """The parity bits column ``i`` of a ``split`` stream is conditioned on, from columns ``< i`` only (so the
    reader has them): ``D4`` column 3: ``p = (c_0 + c_1 + c_2) & 1``; ``E8`` columns 1-7: the coset bit ``p``;
    ``E8`` column 8: ``p`` and ``q = (h_0 + … + h_6) & 1``; ``own`` (``-u`` layouts) ``A2`` column 1: ``b & 1``.
    Other columns: none. Why: the halved last coordinate, the ``D8`` coordinates of the two ``E8`` cosets and
    ``A2``'s first coordinate are shifted by half a step depending on these bits, which costs order-0 models
    ~0.01-0.03 bit/weight at 3 bits/weight."""
    if own and lattice == "A2" and i == 1:
        return ((zigzag_decode(symbols[:, 0]) & 1).astype(np.uint8),)
    if lattice == "D4" and i == 3:
        return ((zigzag_decode(symbols[:, :3]).sum(axis=1) & 1).astype(np.uint8),)
    if lattice == "E8" and 1 <= i <= 7:
        return (symbols[:, 0].astype(np.uint8),)
    if lattice == "E8" and i == 8:
        q = (zigzag_decode(symbols[:, 1:8]).sum(axis=1) & 1).astype(np.uint8)
        return symbols[:, 0].astype(np.uint8), q
    return ()


def _split_context(
    lattice: str, i: int, symbols: np.ndarray, dither: np.ndarray | None, own: bool = False
) -> np.ndarray | None:
    """The 4-bit context codes of column ``i`` of a ``split`` stream: its parity bits (:func:`_parity_bits`) in the
    top bits, then the top bits of the symbol's dither code (0 for an undithered tensor); ``None`` when there is
    neither (the stream is then unconditioned)."""
    bits = _parity_bits(lattice, i, symbols, own)
    if not bits:
        return None if dither is None else np.ascontiguousarray(dither[:, i])
    code = np.zeros(symbols.shape[0], np.uint8) if dither is None else dither[:, i] >> np.uint8(len(bits))
    for k, b in enumerate(bits):
        code = code | (b << np.uint8(3 - k))
    return np.ascontiguousarray(code, dtype=np.uint8)


def stream_rows(coder: Any, row_vectors: int | None, width: int) -> int | None:
    """The row length of a stream holding ``width`` symbols of each vector, for a weight of ``row_vectors`` vectors
    per row: ``None`` when the coder does not model rows or there are no rows."""
    if not row_vectors or not getattr(coder, "accepts_row_length", False):
        return None
    return int(row_vectors) * width


def _hints(context: Any, row_length: int | None) -> dict:
    hints: dict = {} if context is None else {"context": context}
    if row_length is not None:
        hints["row_length"] = row_length
    return hints


def _call_encode(coder: Any, symbols: np.ndarray, alphabet: int, context: Any, what: str,
                 row_length: int | None = None) -> bytes:
    return encode_stream(coder, symbols, alphabet, what, **_hints(context, row_length))


def _narrow_symbols(symbols: np.ndarray) -> np.ndarray:
    """Symbols (non-negative, below ``2**32``) in the narrowest unsigned dtype that holds them."""
    top = int(symbols.max()) if symbols.size else 0
    for dt in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dt).max:
            return symbols.astype(dt)
    return symbols


def encode_points(
    coder: Any, points: np.ndarray, lattice: str, n: int, key: int, dither_ok: bool, what: str,
    layouts: tuple[str, ...] = STREAM_LAYOUTS, *, rows: np.ndarray | None = None, row_vectors: int | None = None,
) -> tuple[int, str, bytes] | None:
    """Code the ``(count, n)`` integer lattice points of a tensor; returns ``(alphabet_size, layout, payload)`` of
    the smaller layout, or ``None`` when the symbols do not fit the coder's alphabet (then use a codebook).

    Args:
        coder: the index coder (a registered :class:`~udnc_fx.coding.coders.Coder`).
        points: int64 ``(count, n)``, lattice points (membership is the caller's check).
        lattice, n: the lattice.
        key, dither_ok: the dither key and whether it is the hash dither (the coder may condition on it).
        what: names the tensor in errors.
        layouts: the stream layouts to try, of :data:`STREAM_LAYOUTS` (default all; the smallest wins, ties keep
            the first; ``grouped`` applies only to ``E8``/``D4`` under the ``-u`` rule). The context rule follows :func:`own_dither_applies`: where it holds, the layout
            returned is the ``-u`` one.
        rows: when given, ``points`` is a table of points (every row used) and the tensor's points are
            ``points[rows]``: the symbols are then computed once per table row and gathered in a narrow dtype (the
            same bytes, without an int64 copy of every vector's coordinates).
        row_vectors: vectors per row of the weight (output unit), or ``None``: each stream is then handed the row
            length of its own symbols (``row_vectors`` times the columns it holds), for coders that model rows
            (:func:`stream_rows`).
    """
    own = own_dither_applies(coder, lattice, dither_ok)
    prepared = _prepare(coder, points, lattice, n, key, dither_ok, rows=rows, own=own)
    if prepared is None:
        return None
    symbols, alphabet, ctx = prepared
    w = symbols.shape[1]
    best: tuple[int, str, bytes] | None = None
    if "interleaved" in layouts:
        data = _call_encode(coder, symbols.ravel(), alphabet, None if ctx is None else ctx.ravel(), what,
                            stream_rows(coder, row_vectors, w))
        best = (alphabet, own_layout("interleaved", own), data)
    # With one symbol per vector (Z^1) the split layout is the interleaved stream again: code it once.
    for kind in _column_layouts(layouts, lattice, own, w, best is None):
        parts = _column_streams(coder, symbols, kind, lattice, ctx, own, row_vectors)
        escape = _choose_escape(coder, parts, alphabet) if uses_own_dither(kind) else 0
        streams = []
        for col, c, rl in parts:
            for sym, alpha, cx, r in _escaped(col, c, alphabet, escape, rl):
                streams.append(_call_encode(coder, sym, alpha, cx, what, r))
        head = varint(escape) if uses_own_dither(kind) else b""
        data = head + b"".join(varint(len(s)) for s in streams[:-1]) + b"".join(streams)
        if best is None or len(data) < len(best[2]):  # ties keep the earlier layout
            best = (alphabet, kind, data)
    return best


def _column_streams(coder: Any, symbols: np.ndarray, kind: str, lattice: str, ctx: np.ndarray | None, own: bool,
                    row_vectors: int | None = None):
    """``[(symbols, context or None, row length or None)]`` of each stream of column layout ``kind``, before any
    escape."""
    conditioned = getattr(coder, "accepts_context", False)
    return [
        (np.ascontiguousarray(symbols[:, list(g)]).ravel(),
         _group_context(lattice, g, symbols, ctx, own) if conditioned else None,
         stream_rows(coder, row_vectors, len(g)))
        for g in column_groups(kind, lattice, symbols.shape[1])
    ]


def _escaped(col: np.ndarray, ctx: np.ndarray | None, alphabet: int, escape: int, row_length: int | None = None):
    """The ``(symbols, alphabet, context, row length)`` streams one column stream becomes under escape threshold
    ``escape``: itself (``0``), or ``min(s, T)`` (alphabet ``T + 1``, its context and rows) then the tail ``s − T``
    of the symbols ``>= T`` in stream order (alphabet ``S − T``, no context, no rows)."""
    if not escape:
        return [(col, alphabet, ctx, row_length)]
    hit = col >= escape
    return [(np.minimum(col, escape), escape + 1, ctx, row_length),
            ((col[hit] - escape).astype(col.dtype, copy=False), alphabet - escape, None, None)]


def _streams_bits(coder: Any, parts, alphabet: int, escape: int) -> float:
    """What the streams of ``parts`` cost under ``escape`` (:meth:`Coder.cost_bits`), with their length prefixes."""
    total, prefixes = 0.0, []
    for col, c, rl in parts:
        for sym, alpha, cx, r in _escaped(col, c, alphabet, escape, rl):
            bits = coder.cost_bits(sym, alpha, **_hints(cx, r)) if sym.size else 0.0
            total += bits
            prefixes.append(8.0 * len(varint(int(math.ceil(bits / 8)))))
    return total + sum(prefixes[:-1])


def _choose_escape(coder: Any, parts, alphabet: int) -> int:
    """The escape threshold of a ``-u`` column layout: the one of ``0`` and :data:`ESCAPES` (those with
    ``T + 1 < S``) whose streams cost the fewest bits (:meth:`Coder.cost_bits`; the smaller ``T`` on a tie,
    ``0`` first)."""
    best_t, best = 0, _streams_bits(coder, parts, alphabet, 0)
    for t in ESCAPES:
        if t + 1 < alphabet:
            bits = _streams_bits(coder, parts, alphabet, t)
            if bits < best:
                best_t, best = t, bits
    return best_t


def _column_layouts(layouts: tuple[str, ...], lattice: str, own: bool, w: int, nothing_yet: bool) -> list[str]:
    """The column-stream layouts :func:`encode_points` tries after ``interleaved``: ``split`` (``split-u``), or under
    ``own`` for ``E8``/``D4`` with ``grouped`` asked for, ``grouped-u`` instead. With one symbol per vector (``Z^1``)
    the split layout is the interleaved stream again: coded only when nothing else is."""
    if "grouped" in layouts and own and lattice in COLUMN_GROUPS:
        # grouped-u only: it beat split-u on every E8/D4 tensor measured (the demo CNN's 32 at 1-4 bits/weight,
        # the synthetic sources of theory_gap.py), and split-u would cost the writer 9 more streams and their escapes
        return ["grouped-u"]
    return [own_layout("split", own)] if "split" in layouts and (w > 1 or nothing_yet) else []


def column_groups(layout: str, lattice: str, w: int) -> tuple[tuple[int, ...], ...]:
    """The symbol columns of each stream of a ``split``/``split-u`` (one column each) or ``grouped-u`` payload."""
    if layout == "grouped-u":
        return COLUMN_GROUPS[lattice]
    return tuple((i,) for i in range(w))


def _group_context(
    lattice: str, group: tuple[int, ...], symbols: np.ndarray, dither: np.ndarray | None, own: bool
) -> np.ndarray | None:
    """The context codes of a stream holding columns ``group`` in vector order: each column's
    :func:`_split_context`, interleaved as the symbols are; ``None`` when no column has one."""
    parts = [_split_context(lattice, i, symbols, dither, own) for i in group]
    if len(parts) == 1 or all(p is None for p in parts):
        return parts[0] if len(parts) == 1 else None
    rows = symbols.shape[0]
    return np.stack([np.zeros(rows, np.uint8) if p is None else p for p in parts], axis=1).ravel()


def _prepare(
    coder: Any, points: np.ndarray, lattice: str, n: int, key: int, dither_ok: bool, codes: Any = None,
    rows: np.ndarray | None = None, own: bool = False,
):
    """``(symbols, alphabet, dither codes or None)`` of points :func:`encode_points` can code, else ``None``.
    ``codes``: the ``(count, w)`` dither codes when the caller has them (the rate estimate caches them).
    ``rows``: ``points`` is a table and the tensor's points are ``points[rows]`` (:func:`encode_points`)."""
    if points.size and (int(points.min()) <= -MAX_COORDINATE or int(points.max()) >= MAX_COORDINATE):
        return None
    if rows is None:
        count = points.shape[0]
        symbols = vector_symbols(lattice, points, own)
    else:  # symbols once per table row, gathered in a narrow dtype: no int64 copy of every vector's coordinates
        count = rows.shape[0]
        symbols = _narrow_symbols(vector_symbols(lattice, points, own))[np.asarray(rows)]
    alphabet = int(symbols.max()) + 1 if symbols.size else 1
    if alphabet > int(getattr(coder, "max_alphabet_size", 0) or 0):
        return None
    if alphabet > max_index_alphabet(symbols.size):  # readers refuse it (coding.limits): use a codebook instead
        return None
    if codes is None:
        make = _context_codes(coder, key, dither_ok, count, n, lattice, own)
        codes = None if make is None else make()
    elif not getattr(coder, "accepts_context", False):
        codes = None
    return symbols, alphabet, codes


def context_codes(coder: Any, key: int, dither_ok: bool, count: int, n: int, lattice: str) -> np.ndarray | None:
    """The ``(count, w)`` dither codes :func:`encode_points` conditions the symbols on, or ``None`` (a coder
    without contexts, or no hash dither)."""
    make = _context_codes(coder, key, dither_ok, count, n, lattice, own_dither_applies(coder, lattice, dither_ok))
    return None if make is None else make()


def coded_bits(
    coder: Any, points: np.ndarray, lattice: str, n: int, key: int, dither_ok: bool,
    layouts: tuple[str, ...] = STREAM_LAYOUTS, codes: np.ndarray | None = None, row_vectors: int | None = None,
) -> tuple[float, str] | None:
    """``(bits, layout)`` of the payload :func:`encode_points` would write (the smaller layout), from the coder's
    :meth:`~udnc_fx.coding.coder_base.Coder.cost_bits` instead of coding; ``None`` where it would return ``None``.
    ``codes``: :func:`context_codes` for these arguments, when the caller already has them."""
    own = own_dither_applies(coder, lattice, dither_ok)
    prepared = _prepare(coder, points, lattice, n, key, dither_ok, codes, own=own)
    if prepared is None:
        return None
    symbols, alphabet, ctx = prepared
    w = symbols.shape[1]
    best, layout = math.inf, own_layout("interleaved", own)
    if "interleaved" in layouts:
        hint = _hints(None if ctx is None else np.ascontiguousarray(ctx).ravel(), stream_rows(coder, row_vectors, w))
        best = coder.cost_bits(symbols.ravel(), alphabet, **hint)
    for kind in _column_layouts(layouts, lattice, own, w, best == math.inf):
        parts = _column_streams(coder, symbols, kind, lattice, ctx, own, row_vectors)
        if uses_own_dither(kind):
            escape = _choose_escape(coder, parts, alphabet)
            total = _streams_bits(coder, parts, alphabet, escape) + 8.0 * len(varint(escape))
        else:
            total = _streams_bits(coder, parts, alphabet, 0)
        if total < best:
            best, layout = total, kind
    return float(best), layout


def decode_points(
    coder: Any, data: bytes, count: int, alphabet: int, layout: str, lattice: str, n: int, key: int,
    dither_ok: bool, what: str,
) -> np.ndarray:
    """Inverse of :func:`encode_points`: the int64 ``(count, n)`` points (:func:`decode_point_parts` joined)."""
    parts = decode_point_parts(coder, data, count, alphabet, layout, lattice, n, key, dither_ok, what)
    return np.concatenate([p.astype(np.int64) for p in parts]) if parts else np.zeros((0, n), np.int64)


def _symbol_dtype(alphabet: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if alphabet - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def decode_point_parts(
    coder: Any, data: bytes, count: int, alphabet: int, layout: str, lattice: str, n: int, key: int,
    dither_ok: bool, what: str,
) -> list[np.ndarray]:
    """Inverse of :func:`encode_points`, as consecutive chunks of the ``(count, n)`` points, each in the narrowest
    signed dtype that holds it: the symbols are decoded into the narrowest unsigned dtype of the alphabet and turned
    into points chunk by chunk, so no int64 array of every vector's coordinates is built
    (:func:`index_points`' :func:`udnc_fx.quantizer.rank_rows` takes the chunks).

    The caller has checked ``layout`` and bounded ``count`` and ``alphabet``; every failure here is a
    :class:`~udnc_fx.errors.FormatError` (``bad_value`` for streams that do not decode, ``truncated`` /
    ``corrupt_payload`` for a damaged ``split`` length prefix).
    """
    w = symbol_width(lattice, n)
    own = uses_own_dither(layout)
    codes = _context_codes(coder, key, dither_ok, count, n, lattice, own)
    sym_dtype = _symbol_dtype(alphabet)
    if layout in ("interleaved", "interleaved-u"):
        ctx = None if codes is None else (lambda: codes().ravel())
        flat = decode_stream(coder, data, count * w, alphabet, what, context=ctx, dtype=sym_dtype)
        symbols = flat.astype(sym_dtype, copy=False).reshape(count, w)
    elif layout in ("split", "split-u", "grouped-u"):
        groups = column_groups(layout, lattice, w)
        view = memoryview(data)
        pos, lengths, escape = 0, [], 0
        if own:
            escape, pos = read_varint(view, pos)
            if escape and not 1 <= escape < alphabet - 1:
                raise FormatError("bad_value", f"{what}: escape threshold {escape} outside [1, {alphabet - 1})")
        for _ in range(len(groups) * (2 if escape else 1) - 1):
            length, pos = read_varint(view, pos)
            lengths.append(length)
        rest = len(view) - pos
        if sum(lengths) > rest:
            raise FormatError("truncated", f"{what}: split streams claim {sum(lengths)} bytes, {rest} present")
        lengths.append(rest - sum(lengths))
        symbols = np.zeros((count, w), dtype=sym_dtype)
        cache: list[np.ndarray] = []
        conditioned = getattr(coder, "accepts_context", False)

        def column(g: tuple[int, ...]):
            # A function: the coder hashes the dither only for streams that use their context.
            def ctx() -> np.ndarray | None:
                if codes is not None and not cache:
                    cache.append(codes())
                return _group_context(lattice, g, symbols, cache[0] if cache else None, own)

            if not conditioned or (codes is None and not any(_parity_bits(lattice, i, symbols[:0], own) for i in g)):
                return None
            return ctx

        lengths_left = iter(lengths)

        def take() -> bytes:
            nonlocal pos
            length = next(lengths_left)
            stream = bytes(view[pos : pos + length])
            pos += length
            return stream

        for g in groups:
            main = alphabet if not escape else escape + 1
            out = decode_stream(coder, take(), count * len(g), main, what, context=column(g), dtype=sym_dtype)
            out = np.asarray(out).astype(sym_dtype, copy=False)
            if escape:  # the tail: s − T of every symbol coded as T, in stream order, no context
                hit = out == escape
                tail = decode_stream(coder, take(), int(hit.sum()), alphabet - escape, what, dtype=sym_dtype)
                out = out.copy() if not out.flags.writeable else out
                out[hit] += np.asarray(tail).astype(sym_dtype, copy=False)
            symbols[:, list(g)] = out.reshape(count, len(g))
            if lattice == "E8" and g[0] == 0 and count and int(symbols[:, 0].max()) > 1:  # before it is a context
                raise FormatError("bad_value", f"{what}: an E8 coset (row parity) symbol is not 0 or 1")
    else:  # pragma: no cover - the header check rejects other layouts first
        raise FormatError("unknown_codec", f"{what}: unknown layout {layout[:40]!r}")
    from udnc_fx.quantizer import QUANTIZE_CHUNK_ELEMENTS  # lazy, as in index_points

    chunk = max(1, QUANTIZE_CHUNK_ELEMENTS // n)
    return [
        _narrow_points(points_from_vector_symbols(lattice, symbols[v0 : v0 + chunk], what, own))
        for v0 in range(0, count, chunk)
    ]


def _narrow_points(c: np.ndarray) -> np.ndarray:
    """Integer points (int64) in the narrowest signed dtype that holds them."""
    if c.size == 0:
        return c
    lo, hi = int(c.min()), int(c.max())
    for dt in (np.int8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return c.astype(dt)
    return c


def check_layout(layout: Any, what: str) -> str:
    """``layout`` if it is one of :data:`ALL_LAYOUTS`, else ``FormatError('unknown_codec')``."""
    if layout not in ALL_LAYOUTS:
        raise FormatError("unknown_codec", f"{what}: unknown lattice-coords layout {str(layout)[:40]!r}")
    return layout


def coordinate_entropy_bits(points: np.ndarray, lattice: str) -> float:
    """Sum over symbol columns of the columns' empirical order-0 entropies, in bits per vector: the rate a
    ``split`` ``lattice-coords`` stream approaches without dither conditioning (the solver's estimate)."""
    if points.shape[0] == 0:
        return 0.0
    symbols = vector_symbols(lattice, points)
    total = 0.0
    m = symbols.shape[0]
    for i in range(symbols.shape[1]):
        col = symbols[:, i]
        if int(col.max()) >= 1 << 26:
            raise ConfigError("coordinates too large for the entropy estimate (step far too small)")
        c = np.bincount(col)
        p = c[c > 0] / m
        total -= float((p * np.log2(p)).sum())
    return total

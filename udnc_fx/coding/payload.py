"""The ``.udnc`` payload: each tensor's sections (index streams, codebooks, coordinates, raw bytes), coded and decoded.

Writing: :func:`encode_quantized` checks a :class:`~udnc_fx.coding.header.QuantizedTensor` and returns its resolved
header entry and its two sections, choosing the smallest of the codebook encodings the format offers (float,
``lattice-int``, ``lattice-int-coded``, or ``lattice-coords`` instead of indices and codebook); :func:`encode_raw`
does the same for a raw tensor. Reading: :func:`decode_payload` checks the payload digest and decodes every section
of a validated :class:`~udnc_fx.coding.header.Header`; :func:`decode_sections` does the same one tensor at a time,
for readers that fetch each section from the file as it is needed. Streams go through the coder registry's one
``encode_stream``/``decode_stream`` pair.
"""

from __future__ import annotations

import hashlib
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from udnc_fx.coding import lattice_coords as _lc
from udnc_fx.coding.ans_native import coder_for_alphabet
from udnc_fx.coding.coder_base import DEFAULT_CODER, decode_stream, encode_stream
from udnc_fx.coding.format import (
    CODEBOOK_FLOAT_ENCODINGS, FORMAT_DEFAULT_CODEBOOK_CODER, FORMAT_DEFAULT_DITHER, INT_WIDTHS, LATTICE_DIMENSIONS,
    LATTICE_INT, LATTICE_INT_CODED, MAX_CODED_ALPHABET, MAX_NDIM, RAW_DTYPES, as_int, canonical_json,
    check_json_object, coded_row_symbols, lookup_coder, narrow_index_dtype, non_members, prod,
)
from udnc_fx.coding.header import (
    Container, Header, Preamble, QEntry, QuantizedTensor, RawTensor, Section, compact_codebook,
)
from udnc_fx.coding.limits import max_index_alphabet
from udnc_fx.errors import ConfigError, FormatError
from udnc_fx.record import check_affine, float32_json

__all__ = [
    "weights_bar",
    "encode_quantized",
    "estimate_points_bits",
    "points_bound",
    "encode_raw",
    "check_payload_digest",
    "decode_sections",
    "decode_payload",
    "check_threads",
    "in_threads",
]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def weights_bar(entries: list, desc: str, progress: bool | None):
    """A terminal-only bar over the weights of ``entries`` (tqdm is imported only when one is drawn)."""
    from udnc_fx.progress import progress_enabled

    if not entries or not progress_enabled(progress):
        return _NoBar()
    from udnc_fx.progress import progress_bar

    total = 0
    for e in entries:
        count = getattr(e, "count", None)
        total += int(np.size(getattr(e, "indices", ())) if count is None else count) * int(getattr(e, "n", 1) or 1)
    return progress_bar(total=total or None, desc=desc, unit="w", unit_scale=True, progress=True)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


# The symbol rows are those of lattice-coords (one row per distinct point here, one per vector there).
_codebook_symbols = _lc.point_symbols
_codebook_from_symbols = _lc.points_from_symbols


def _stream_context(coder: Any, key: int, dither: str, count: int, n: int) -> dict:
    """``{"context": dither codes}`` for coders that condition on the dither (docs/FORMAT.md, *Dither context*);
    ``{}`` for other coders and for tensors without the hash dither."""
    if not getattr(coder, "accepts_context", False) or dither != FORMAT_DEFAULT_DITHER:
        return {}
    from udnc_fx.coding.ans import dither_codes

    # A function, not the codes: a decoder hashes the dither only for streams that use it.
    return {"context": lambda: dither_codes(key, count, n)}


def _encode_stream(
    coder_name: str, symbols: np.ndarray, alphabet_size: int, what: str, row_length: int | None = None,
    dither: tuple[int, str, int] | None = None,
) -> bytes:
    """Code a stream; ``row_length`` (symbols per row of the weight) is handed to coders that model rows, the
    dither ``(key, generator id, n)`` to coders that condition on it."""
    coder = lookup_coder(coder_name)
    hint = {"row_length": row_length} if row_length and getattr(coder, "accepts_row_length", False) else {}
    if dither is not None:
        hint.update(_stream_context(coder, dither[0], dither[1], len(symbols), dither[2]))
    return encode_stream(coder, symbols, alphabet_size, what, **hint)


def _row_length(shape: list[int], n: int, count: int) -> int | None:
    """Index symbols per row of the weight (elements per output unit over ``n``): the hint for row-modelling coders."""
    if len(shape) < 2 or shape[0] < 2 or count < 2:
        return None
    per_row = max(1, count // shape[0])
    return per_row if per_row < count else None


def _encode_int_codebook(q: QuantizedTensor, n: int, where: str) -> tuple[int, dict, bytes]:
    """``lattice-int`` (fixed width) or ``lattice-int-coded``, whichever makes the smaller file."""
    cb_int = np.asarray(q.codebook_int)
    if cb_int.dtype.kind not in "iu" or cb_int.ndim != 2 or cb_int.shape[1] != n:
        raise FormatError("bad_value", f"{where}: codebook_int must be an integer (K, {n}) array")
    if cb_int.dtype.kind == "u" and cb_int.size and int(cb_int.max()) > np.iinfo(np.int64).max:
        raise FormatError("bad_value", f"{where}: codebook_int values must fit in int64")
    c = cb_int.astype(np.int64)
    bad = non_members(q.lattice, c)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise FormatError("bad_value", f"{where}: codebook_int row {row} {c[row].tolist()} is not a {q.lattice} point")
    alphabet_size = c.shape[0]
    z = _lc.zigzag_encode(c)
    zmax = int(z.max()) if z.size else 0
    width = next(w for w in (1, 2, 4, 8) if zmax < 1 << (8 * w))
    best = ({"encoding": LATTICE_INT, "width": width}, z.astype(INT_WIDTHS[width]).tobytes())
    if c.size and -(1 << 40) < int(c.min()) and int(c.max()) < 1 << 40:
        symbols = _codebook_symbols(q.lattice, c)
        symbol_alphabet = int(symbols.max()) + 1
        # An adaptive coder's model grows with its alphabet: past 2^16 symbols, and more than the stream holds,
        # coding costs memory and time for next to no gain over the fixed width (its symbols are all but unique).
        limit = min(
            MAX_CODED_ALPHABET,
            getattr(lookup_coder(FORMAT_DEFAULT_CODEBOOK_CODER), "max_alphabet_size", 0),
            max(1 << 16, symbols.size),
        )
        if symbol_alphabet <= limit:
            data = _encode_stream(FORMAT_DEFAULT_CODEBOOK_CODER, symbols.ravel(), symbol_alphabet, f"{where} codebook")
            coded = {"encoding": LATTICE_INT_CODED, "alphabet_size": symbol_alphabet, "length": len(data)}

            def cost(candidate: tuple[dict, bytes]) -> int:
                return len(candidate[1]) + len(canonical_json(compact_codebook(candidate[0])))

            if cost((coded, data)) < cost(best):  # ties keep the fixed width: no coder needed to read it
                best = (coded, data)
    return alphabet_size, dict(best[0]), best[1]


#: ``QuantizedTensor.coder`` (and ``udnc_fx.save``'s default): per tensor, the smaller of ``ans-dither-v2`` and, for
#: streams of at most :data:`AUTO_TRY_LIMIT` vectors, ``range-context-v1``. The entry records the coder it got.
AUTO_CODER = "auto"
#: Where ``auto`` also tries ``range-context-v1``: its adaptive model needs no tables, which wins on small streams
#: (the demo CNN's four layers, 144-32768 weights, all; by 4-30 % on a pruned one) but loses to the dither-conditioned
#: tables on large ones, where its Python-level block loop is also slow. 2^17 vectors: no transformer matrix.
AUTO_TRY_LIMIT = 1 << 17
#: The coders ``auto`` chooses between, the first on a tie.
AUTO_CANDIDATES = (DEFAULT_CODER, "range-context-v1")


def encode_quantized(q: QuantizedTensor, codebook_float_dtype: str, max_elements: int) -> tuple[dict, bytes, bytes]:
    """Checks ``q``; returns its header entry in resolved form (every key present) and its two sections.

    ``q.coder == "auto"`` (:data:`AUTO_CODER`): the sections of the candidate coder that gives the fewest bytes
    (both are deterministic, so the choice and the bytes are too)."""
    if isinstance(q, QuantizedTensor) and q.coder == AUTO_CODER:
        best = None
        for coder in AUTO_CANDIDATES:
            coded = _encode_quantized(dataclasses.replace(q, coder=coder), codebook_float_dtype, max_elements)
            if best is None or len(coded[1]) + len(coded[2]) < len(best[1]) + len(best[2]):
                best = coded
            if coded[0]["indices"]["count"] > AUTO_TRY_LIMIT:
                break
        return best
    return _encode_quantized(q, codebook_float_dtype, max_elements)


def _encode_quantized(q: QuantizedTensor, codebook_float_dtype: str, max_elements: int) -> tuple[dict, bytes, bytes]:
    where = f"quantized tensor {getattr(q, 'fqn', '?')!r}"
    if not isinstance(q, QuantizedTensor):
        raise FormatError("bad_value", f"expected QuantizedTensor, got {type(q).__name__}")
    if not isinstance(q.fqn, str) or not q.fqn:
        raise FormatError("bad_value", f"{where}: fqn must be a non-empty string")
    shape = [as_int(d, f"{where}: shape entry") for d in q.shape]
    if any(d < 0 for d in shape) or len(shape) > MAX_NDIM:
        raise FormatError("bad_value", f"{where}: bad shape {tuple(q.shape)}")
    if q.lattice not in LATTICE_DIMENSIONS:
        raise FormatError("bad_value", f"{where}: unknown lattice {q.lattice!r}")
    n = as_int(q.n, f"{where}: n")
    if n not in LATTICE_DIMENSIONS[q.lattice]:
        raise FormatError("bad_value", f"{where}: lattice {q.lattice} has no dimension {n}")
    try:
        step = float(q.step)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FormatError("bad_value", f"{where}: step must be a float, got {q.step!r}") from exc
    if not (math.isfinite(step) and step > 0):
        raise FormatError("bad_value", f"{where}: step must be finite and > 0, got {step!r}")
    key = as_int(q.key, f"{where}: key")
    if not 0 <= key < 1 << 64:
        raise FormatError("bad_value", f"{where}: key must fit in 64 unsigned bits, got {key}")
    if not isinstance(q.dither, str) or not q.dither:
        raise FormatError("bad_value", f"{where}: dither must be a non-empty string")
    if not isinstance(q.coder, str) or not q.coder:
        raise FormatError("unknown_codec", f"{where}: coder must be a non-empty string")

    numel = prod(shape, max_elements)
    if numel > max_elements:
        raise FormatError("bad_value", f"{where}: {tuple(shape)} has more than {max_elements} elements")
    count = -(-numel // n)

    affine = getattr(q, "affine", None)
    if affine is not None:
        if q.codebook_int is None:
            raise FormatError("bad_value", f"{where}: an affine correction needs codebook_int (integer points)")
        try:
            affine = check_affine(affine)
        except ConfigError as exc:
            raise FormatError("bad_value", f"{where}: {exc}") from None

    # Codebook.
    if q.codebook_int is not None:
        alphabet_size, codebook_entry, codebook_bytes = _encode_int_codebook(q, n, where)
    else:
        if q.codebook is None:
            raise FormatError("bad_value", f"{where}: needs a codebook or codebook_int")
        cb = np.asarray(q.codebook)
        if cb.dtype.kind != "f" or cb.ndim != 2 or cb.shape[1] != n:
            raise FormatError(
                "bad_value", f"{where}: codebook must be a float (K, {n}) array, got {cb.dtype} {cb.shape}"
            )
        cb32 = cb.astype(np.float32)
        if cb.dtype != np.float32 and not np.array_equal(cb32.astype(cb.dtype), cb, equal_nan=True):
            raise FormatError("bad_value", f"{where}: {cb.dtype} codebook is not exactly representable in float32")
        alphabet_size = cb.shape[0]
        encoding = "f16" if codebook_float_dtype == "float16" else "f32"
        with np.errstate(over="ignore"):  # overflow is detected just below, with a better message
            stored = cb32.astype(CODEBOOK_FLOAT_ENCODINGS[encoding])
        if encoding == "f16" and not np.array_equal(np.isfinite(stored), np.isfinite(cb32)):
            raise FormatError("bad_value", f"{where}: codebook overflows float16")
        codebook_bytes = stored.tobytes()
        codebook_entry = {"encoding": encoding, "length": len(codebook_bytes)}
    if alphabet_size < 1:
        raise FormatError("bad_value", f"{where}: the codebook is empty (K = 0)")
    if alphabet_size > max_index_alphabet(count):
        raise FormatError(
            "bad_value", f"{where}: {alphabet_size} codewords for {count} indices (at most {max_index_alphabet(count)})"
        )
    if numel + alphabet_size * n > max_elements:
        raise FormatError("bad_value", f"{where}: the tensor and its codebook hold more than {max_elements} elements")

    # Indices.
    indices = np.asarray(q.indices)
    if indices.dtype.kind not in "iu" or indices.ndim != 1:
        raise FormatError(
            "bad_value", f"{where}: indices must be a 1-D integer array, got {indices.dtype} {indices.shape}"
        )
    if indices.shape[0] != count:
        raise FormatError(
            "bad_value", f"{where}: {indices.shape[0]} indices for shape {tuple(shape)} and n={n} (need {count})"
        )
    if count and (int(indices.min()) < 0 or int(indices.max()) >= alphabet_size):
        raise FormatError("bad_value", f"{where}: indices outside [0, {alphabet_size})")
    zero_index = None
    if q.zero_index is not None:
        zero_index = as_int(q.zero_index, f"{where}: zero_index")
        if not 0 <= zero_index < alphabet_size:
            raise FormatError("bad_value", f"{where}: zero_index {zero_index} outside [0, {alphabet_size})")
    check_json_object(q.meta, f"{where}: meta")
    index_coder = coder_for_alphabet(q.coder, alphabet_size)  # ans-dither-v2 takes alphabets up to 2^16
    indices_bytes = _encode_stream(
        index_coder, indices, alphabet_size, where, _row_length(shape, n, count), (key, q.dither, n)
    )

    entry: dict[str, Any] = {
        "fqn": q.fqn,
        "shape": shape,
        "lattice": q.lattice,
        "n": n,
        "step": step,
        "key": f"{key:016x}",
        "dither": q.dither,
        "zero_index": zero_index,
        "meta": q.meta,
        "indices": {"coder": index_coder, "alphabet_size": alphabet_size, "count": count, "length": len(indices_bytes)},
        "codebook": codebook_entry,
    }
    if q.codebook_int is not None:
        coords = _encode_coords(q, indices, zero_index, key, n, where)
        if coords is not None:
            symbol_alphabet, coords_entry, coords_bytes = coords

            def cost(cb: dict, payload: int) -> int:
                return payload + len(canonical_json(compact_codebook(cb)))

            # Measured, not guessed: the table of points is dropped only where that makes the file smaller.
            if cost(coords_entry, len(coords_bytes)) < cost(codebook_entry, len(indices_bytes) + len(codebook_bytes)):
                entry["zero_index"] = None
                entry["indices"] = {
                    "coder": q.coder, "alphabet_size": symbol_alphabet, "count": count, "length": len(coords_bytes)
                }
                entry["codebook"] = coords_entry
                if affine is not None:
                    coords_entry["affine"] = [float32_json(v) for v in affine]
                return entry, coords_bytes, b""
    if affine is not None:
        codebook_entry["affine"] = [float32_json(v) for v in affine]
    return entry, indices_bytes, codebook_bytes


# The dither codes the estimate conditions on, by (key, count, n): a step solve evaluates every layer several times
# at the same key. Least recently used first out, past this many bytes.
_CODES_CACHE: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_CODES_CACHE_BYTES = 1 << 28


def _cached_codes(key: int, count: int, n: int, own: str | None = None) -> np.ndarray:
    """The hash dither codes ``dither_codes(key, count, n)``, or with ``own`` (a lattice name) the ``(count, n)``
    bins of each coordinate's own dither (``lattice_coords.own_dither_codes``)."""
    from udnc_fx.coding.ans import dither_codes

    cache_key = (int(key), int(count), int(n), own)
    codes = _CODES_CACHE.get(cache_key)
    if codes is None:
        codes = dither_codes(key, count, n) if own is None else _lc.own_dither_codes(key, count, own, n)
        codes.flags.writeable = False
        _CODES_CACHE[cache_key] = codes
        while sum(c.nbytes for c in _CODES_CACHE.values()) > _CODES_CACHE_BYTES and len(_CODES_CACHE) > 1:
            _CODES_CACHE.popitem(last=False)
    else:
        _CODES_CACHE.move_to_end(cache_key)
    return codes


def estimate_points_bits(
    points: np.ndarray, lattice: str, n: int, key: int | None, shape: tuple[int, ...] | None = None,
    coder: str = DEFAULT_CODER, exact_zero: bool = False,
) -> float:
    """The bits of a tensor's two payload sections as :func:`encode_quantized` writes them for the integer lattice
    points ``points`` (``(count, n)``, one per vector, in vector order), without coding the
    large streams.

    The writer's choice is followed: indices (ranks of the distinct points, most frequent first) plus the smaller
    of a fixed-width ``lattice-int`` and a ``lattice-int-coded`` table, or ``lattice-coords`` in its smaller
    layout, whichever is smaller; every stream with the contexts the writer gives it (the dither codes when ``key``
    is not ``None``, the row length of ``shape``; ``exact_zero``: the record keeps the point 0 exact). Index and
    coordinate streams are costed by the coder's
    :meth:`~udnc_fx.coding.coder_base.Coder.cost_bits` (for ``ans-dither-v1``: tables exact, symbols at their ideal
    cost, a few bytes per stream of ANS overhead); the coded table is coded (small where the table form can win).
    The form is chosen as the writer chooses it, by sections plus the codebook's header entry (the JSON that differs
    between the forms, 20-80 bytes); the result counts the sections only (the header entry, ~150 bytes of JSON per
    tensor, does not depend on the step).
    """
    points = np.ascontiguousarray(points, dtype=np.int64)
    count = points.shape[0]
    if count == 0:
        return 0.0
    index_coder = lookup_coder(coder)
    dithered = key is not None and getattr(index_coder, "accepts_context", False)
    coords_codes = None
    if dithered and n > 1:
        if _lc.own_dither_applies(index_coder, lattice, True):  # the writer's -u layouts
            coords_codes = _cached_codes(key, count, n, own=lattice)[:, _lc.dither_columns(lattice, n, True)]
        else:
            coords_codes = _cached_codes(key, count * n, 1).reshape(count, n)[:, _lc.dither_columns(lattice, n)]
    coords = None
    if n > 1:
        rows = _row_length(list(shape), n, count) if shape is not None else None
        coded = _lc.coded_bits(index_coder, points, lattice, n, 0 if key is None else key, key is not None,
                               codes=coords_codes, row_vectors=rows)
        if coded is not None:
            # the record's zero_index (exact_zero and the point 0 used) is stored in the entry: 17 bytes more
            zero = exact_zero and bool((~points.any(axis=1)).any())
            entry = {"encoding": _lc.ENCODING, "layout": coded[1], "exact_zero": zero, "length": 0}
            coords = (coded[0] + _entry_bits(entry), coded[0])  # (what the writer compares, the sections)
    # The writer's order (most frequent first, ties by coordinates: lattice_coords.index_points) up to the order of
    # ties, which changes the coded sizes by a few bytes at most and saves a sort of the points.
    from udnc_fx.quantizer import unique_rows

    uniq, inverse, counts = unique_rows(points)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    indices = rank[inverse.reshape(-1)]
    codebook_int = uniq[order]
    k = codebook_int.shape[0]
    hint: dict[str, Any] = {}
    row_length = _row_length(list(shape), n, count) if shape is not None else None
    if row_length and getattr(index_coder, "accepts_row_length", False):
        hint["row_length"] = row_length
    if dithered:
        hint["context"] = _cached_codes(key, count, n)
    index_bits = lookup_coder(coder_for_alphabet(coder, k)).cost_bits(indices, k, **hint)
    if coords is not None and index_bits >= coords[0]:
        return float(coords[1])  # the table form cannot win: no need to cost the table
    z = _lc.zigzag_encode(codebook_int)
    zmax = int(z.max()) if z.size else 0
    width = next(w for w in (1, 2, 4, 8) if zmax < 1 << (8 * w))
    fixed = 8.0 * width * codebook_int.size
    table = (fixed + _entry_bits({"encoding": LATTICE_INT, "width": width}), fixed)
    if -(1 << 40) < int(codebook_int.min()) and int(codebook_int.max()) < 1 << 40:
        symbols = _codebook_symbols(lattice, codebook_int)
        alphabet = int(symbols.max()) + 1
        cb_coder = lookup_coder(FORMAT_DEFAULT_CODEBOOK_CODER)
        limit = min(MAX_CODED_ALPHABET, getattr(cb_coder, "max_alphabet_size", 0), max(1 << 16, symbols.size))
        if alphabet <= limit:
            bits = cb_coder.cost_bits(symbols.ravel(), alphabet)
            entry = {"encoding": LATTICE_INT_CODED, "alphabet_size": alphabet, "length": int(math.ceil(bits / 8))}
            if bits + _entry_bits(entry) < table[0]:
                table = (bits + _entry_bits(entry), bits)
    total = (index_bits + table[0], index_bits + table[1])
    return float(total[1] if coords is None or total[0] <= coords[0] else coords[1])


def _entry_bits(codebook_entry: dict) -> float:
    """Bits of a codebook entry's stored JSON: the part of the header entry that differs between the forms."""
    return 8.0 * len(canonical_json(compact_codebook(codebook_entry)))


def _encode_coords(
    q: QuantizedTensor, indices: np.ndarray, zero_index: int | None, key: int, n: int, where: str
) -> tuple[int, dict, bytes] | None:
    """The ``lattice-coords`` form of a tensor whose (already validated) ``codebook_int`` holds lattice points:
    ``(symbol alphabet, codebook entry, payload)``, or ``None`` where it cannot represent the tensor (a
    ``zero_index`` that is not the point 0, symbols past the coder's alphabet)."""
    cb_int = np.asarray(q.codebook_int).astype(np.int64)
    exact_zero = zero_index is not None
    if exact_zero:
        if cb_int[zero_index].any():
            return None
        # Only the point 0 may decode to exact zeros, and the reader makes every vector at 0 do so: equal only if
        # no other row is 0 (rows are distinct in a quantizer's codebook, but a caller's need not be).
        if int((~cb_int.any(axis=1)).sum()) != 1:
            return None
    if cb_int.size and (int(cb_int.min()) <= -_lc.MAX_COORDINATE or int(cb_int.max()) >= _lc.MAX_COORDINATE):
        return None  # far outside any quantizer's range; the symbol transforms would overflow
    # The reader rebuilds indices and codebook in the quantizer's order; use lattice-coords only where that gives
    # back exactly these (a codebook with unused, repeated or reordered rows would come back different).
    if not _in_reader_order(cb_int, indices):
        return None
    coded = _lc.encode_points(
        lookup_coder(q.coder), cb_int, q.lattice, n, key, q.dither == FORMAT_DEFAULT_DITHER, f"{where} coordinates",
        rows=indices, row_vectors=_row_length(list(q.shape), n, indices.shape[0]),
    )
    if coded is None:
        return None
    alphabet, layout, payload = coded
    cb_entry: dict[str, Any] = {"encoding": _lc.ENCODING, "layout": layout, "exact_zero": exact_zero, "length": 0}
    return alphabet, cb_entry, payload


_BINCOUNT_CHUNK = 1 << 20  # indices counted per np.bincount call (it copies its input to intp)


def _in_reader_order(cb_int: np.ndarray, indices: np.ndarray) -> bool:
    """Whether ``lattice_coords.index_points(cb_int[indices])`` gives back exactly ``(indices, cb_int)``.

    It does exactly when every row is used, the rows are distinct, and they are sorted by falling count, ties by
    the coordinates (the order ``index_points`` builds): then the distinct points of the vectors are the rows, in
    the same order, and each vector's rebuilt index is its own. Checked on the ``K`` rows and one count of the
    indices (a chunk at a time), instead of rebuilding both from every vector (``tests/unit/test_payload_order.py``
    holds the two rules against each other).
    """
    k = cb_int.shape[0]
    indices = np.asarray(indices)
    counts = np.zeros(k, np.int64)
    for lo in range(0, indices.size, _BINCOUNT_CHUNK):  # np.bincount copies its input to intp: a chunk at a time
        part = np.bincount(indices[lo : lo + _BINCOUNT_CHUNK], minlength=k)
        if part.size != k:
            return False
        counts += part
    if k and int(counts.min()) == 0:
        return False
    if k > 1 and _lc.index_points(cb_int)[1].shape[0] != k:  # repeated rows (each row once: distinct points)
        return False
    order = np.lexsort(tuple(cb_int[:, j] for j in range(cb_int.shape[1] - 1, -1, -1)) + (-counts,))
    return bool(np.array_equal(order, np.arange(k)))


def points_bound(entry: dict) -> int:
    """At most how many codebook rows an entry decodes to: K, or for ``lattice-coords`` one per vector."""
    if entry["codebook"]["encoding"] == _lc.ENCODING:
        return entry["indices"]["count"]
    return entry["indices"]["alphabet_size"]


def encode_raw(r: RawTensor, raw_float_dtype: str) -> tuple[dict, bytes]:
    """Checks ``r``; returns its resolved header entry and its data section."""
    if not isinstance(r, RawTensor):
        raise FormatError("bad_value", f"expected RawTensor, got {type(r).__name__}")
    where = f"raw tensor {r.name!r}"
    if not isinstance(r.name, str) or not r.name:
        raise FormatError("bad_value", f"{where}: name must be a non-empty string")
    array = np.asarray(r.array)
    if array.ndim > MAX_NDIM:
        raise FormatError("bad_value", f"{where}: more than {MAX_NDIM} dimensions")
    name = array.dtype.name if array.dtype.name in RAW_DTYPES else None
    if name is None or array.dtype.kind not in "fiub":
        raise FormatError("unknown_codec", f"{where}: dtype {array.dtype} cannot be stored")
    entry: dict[str, Any] = {"name": r.name, "shape": list(array.shape)}
    if name == "float32" and raw_float_dtype == "float16":  # flagged once for the file: top-level raw_float16
        with np.errstate(over="ignore"):
            stored = array.astype(RAW_DTYPES["float16"])
        if not np.array_equal(np.isfinite(stored), np.isfinite(array)):
            raise FormatError("bad_value", f"{where}: values overflow float16 (store it as float32)")
        entry["dtype"] = "float16"
        entry["source_dtype"] = "float32"
    else:
        stored = array.astype(RAW_DTYPES[name])
        entry["dtype"] = name
    data = np.ascontiguousarray(stored).tobytes()
    entry["data"] = {"length": len(data)}
    return entry, data


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def _decode_stream(
    coder_name: str, data: bytes, count: int, alphabet_size: int, where: str, context: dict | None = None,
    dtype: Any = None,
) -> np.ndarray:
    """:func:`~udnc_fx.coding.coder_base.decode_stream` with the coder named as the header names it."""
    return decode_stream(lookup_coder(coder_name), data, count, alphabet_size, where, dtype=dtype, **(context or {}))


def _decode_codebook(q: QEntry, data: bytes) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Returns ``(codebook, codebook_int)``, one of them ``None``."""
    where = f"quantized tensor {q.fqn!r} codebook"
    k, n = q.alphabet_size, q.n
    if q.encoding in CODEBOOK_FLOAT_ENCODINGS:
        codebook = np.frombuffer(data, dtype=CODEBOOK_FLOAT_ENCODINGS[q.encoding]).astype(np.float32)
        return codebook.reshape(k, n), None
    if q.encoding == LATTICE_INT:
        c = _lc.zigzag_decode(np.frombuffer(data, dtype=INT_WIDTHS[q.width])).reshape(k, n)
    else:
        w = coded_row_symbols(q.lattice, n)
        symbols = _decode_stream(q.codebook_coder, data, k * w, q.codebook_alphabet_size, where)
        c = _codebook_from_symbols(q.lattice, symbols.astype(np.uint64).reshape(k, w), where)
    bad = non_members(q.lattice, c)
    if bad.any():  # lattice-int rows come from the file as they are; coded ones are lattice points by construction
        raise FormatError("bad_value", f"{where}: row {int(np.flatnonzero(bad)[0])} is not a {q.lattice} point")
    return None, c


def _decode_coords(q: QEntry, data: bytes) -> QuantizedTensor:
    """A ``lattice-coords`` tensor: decode every vector's point, then rebuild indices and ``codebook_int`` in the
    quantizer's order (``lattice_coords.index_points``)."""
    parts = _lc.decode_point_parts(
        lookup_coder(q.coder), data, q.count, q.alphabet_size, q.layout, q.lattice, q.n, q.key,
        q.dither == FORMAT_DEFAULT_DITHER, f"quantized tensor {q.fqn!r} coordinates",
    )
    if q.count == 0:
        indices, codebook_int = np.zeros(0, np.int64), np.zeros((1, q.n), np.int64)
    else:
        from udnc_fx.quantizer import rank_rows  # lazy, as in lattice_coords.index_points

        indices, codebook_int, _ = rank_rows(parts, q.n)
        del parts
    zero_index = None
    if q.exact_zero:
        hits = np.flatnonzero(~codebook_int.any(axis=1))
        zero_index = int(hits[0]) if hits.size else None
    k = codebook_int.shape[0]
    return QuantizedTensor(
        fqn=q.fqn, shape=q.shape, lattice=q.lattice, n=q.n, step=q.step, key=q.key, dither=q.dither,
        indices=indices.astype(narrow_index_dtype(k), copy=False), codebook=None, codebook_int=codebook_int, coder=q.coder,
        zero_index=zero_index, meta=q.meta, affine=q.affine,
    )


def check_payload_digest(preamble: Preamble, digest: bytes) -> None:
    """``checksum_mismatch`` unless ``digest`` (the SHA-256 of the payload as read) is the preamble's."""
    if digest != preamble.payload_sha256:
        raise FormatError("checksum_mismatch", "the payload digest does not match (payload damaged)")


def check_workers(workers: Any) -> int:
    """``workers`` as a count of processes (>= 1), or ConfigError."""
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be an integer in [1, {MAX_WORKERS}], got {workers!r}")
    if workers > 1:
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():
            raise ConfigError("workers > 1 needs processes started by fork (Linux, macOS); use workers=1 here")
    return int(workers)


#: The most decoding processes :func:`decode_sections` starts.
MAX_WORKERS = 256
def _quantized_sections(q: QEntry) -> list[Section]:
    return [q.indices] if q.encoding == _lc.ENCODING else [q.indices, q.codebook]


def _decode_in_worker(q: QEntry, data: dict) -> tuple[QuantizedTensor | None, tuple[str, str] | None]:
    """A worker's task: ``q`` decoded from its sections' bytes (``data``, keyed by ``(offset, length)``), or the
    error's ``(kind, message)`` (a FormatError's constructor does not survive pickling)."""
    try:
        return _decode_quantized(q, lambda s: data[(s.offset, s.length)]), None
    except FormatError as exc:
        return None, (exc.kind, exc.message)
    except Exception as exc:  # noqa: BLE001 -- a decoder's bug is a FormatError, as in the reader's _guarded
        return None, ("bad_value", f"unexpected {type(exc).__name__} while reading: {exc}")


def _decode_parallel(
    quantized: list[QEntry], section_bytes: Callable[[Section], bytes], workers: int, bar: Any
) -> Iterator[QuantizedTensor]:
    """The quantized tensors decoded by ``workers`` forked processes, yielded in file order. At most ``workers``
    tensors are in flight (their sections' bytes sent, their decoded arrays not yet yielded): memory stays at one
    tensor's working set per worker. The work is a pure function of each entry and its bytes, so the result is
    the same for every worker count."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # fork: a worker starts in milliseconds with everything imported (spawn would import torch again, ~1 s each)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pending: deque = deque()
        entries = iter(quantized)
        try:
            while True:
                while len(pending) < workers and (q := next(entries, None)) is not None:
                    data = {(s.offset, s.length): section_bytes(s) for s in _quantized_sections(q)}
                    pending.append((q, pool.submit(_decode_in_worker, q, data)))
                    del data
                if not pending:
                    return
                q, future = pending.popleft()
                try:
                    tensor, error = future.result()
                except BrokenProcessPool as exc:
                    raise FormatError("bad_value", f"{q.fqn!r}: a decoding process died ({exc})") from None
                if error is not None:
                    raise FormatError(*error)
                bar.update(q.count * q.n)
                yield tensor
        finally:
            for _, future in pending:
                future.cancel()


def check_threads(threads: Any) -> int:
    """``threads`` as a count of threads (>= 1), or ConfigError."""
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= MAX_WORKERS:
        raise ConfigError(f"threads must be an integer in [1, {MAX_WORKERS}], got {threads!r}")
    return int(threads)


def in_threads(items: list, work: Callable[[Any], Any], threads: int, prepare: Callable[[Any], Any] | None = None
               ) -> Iterator[tuple[Any, Any]]:
    """``(item, work(prepare(item)))`` for each item, in order, computed by ``threads`` threads with at most
    ``threads`` items in flight (``prepare``, e.g. reading an item's bytes from a file, runs in the caller's thread).
    The coders' compiled kernels release the GIL, so independent tensors code side by side; each result is a pure
    function of its item, so the results are the same for every thread count. An exception is raised when its
    item's turn comes, after the items before it."""
    if threads <= 1:
        for item in items:
            yield item, work(item if prepare is None else prepare(item))
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="udnc-coding") as pool:
        pending: deque = deque()
        entries = iter(items)
        try:
            while True:
                while len(pending) < threads and (item := next(entries, None)) is not None:
                    arg = item if prepare is None else prepare(item)
                    pending.append((item, pool.submit(work, arg)))
                    del arg
                if not pending:
                    return
                item, future = pending.popleft()
                yield item, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def decode_sections(
    header: Header, section_bytes: Callable[[Section], bytes], progress: bool | None = None, workers: int = 1,
    threads: int = 1,
) -> Iterator[QuantizedTensor | RawTensor]:
    """Decodes the sections of a validated ``header`` one tensor at a time, in file order: every quantized tensor,
    then every raw tensor. ``section_bytes`` returns a section's bytes (from memory or read from the file), so a
    reader holds one tensor's sections and its decoded arrays at a time (``workers`` of them with ``workers > 1``
    processes, or ``threads`` of them with ``threads > 1`` threads, decoding the quantized tensors side by side;
    same results, in the same order). The caller checks the payload digest first (:func:`check_payload_digest`)."""
    workers = min(check_workers(workers), len(header.quantized))
    threads = min(check_threads(threads), len(header.quantized))
    bar = weights_bar(header.quantized, "decoding", progress)
    try:
        if workers > 1:
            yield from _decode_parallel(header.quantized, section_bytes, workers, bar)
        elif threads > 1:

            def sections(q: QEntry) -> dict:
                return {(s.offset, s.length): section_bytes(s) for s in _quantized_sections(q)}

            def work(arg: tuple) -> QuantizedTensor:
                return _decode_quantized(arg[0], lambda s: arg[1][(s.offset, s.length)])

            for q, tensor in in_threads(header.quantized, work, threads, lambda q: (q, sections(q))):
                bar.update(q.count * q.n)
                yield tensor
        else:
            for q in header.quantized:
                bar.update(q.count * q.n)
                yield _decode_quantized(q, section_bytes)
    finally:
        bar.close()
    for r in header.raws:
        stored = np.frombuffer(section_bytes(r.data), dtype=RAW_DTYPES[r.dtype])
        if r.dtype == "bool" and stored.size and int(stored.view(np.uint8).max()) > 1:
            raise FormatError("bad_value", f"raw tensor {r.name!r}: bool bytes other than 0 and 1")
        target = np.dtype(r.source_dtype or r.dtype).newbyteorder("=")
        yield RawTensor(name=r.name, array=stored.astype(target).reshape(r.shape))


def _decode_quantized(q: QEntry, section_bytes: Callable[[Section], bytes]) -> QuantizedTensor:
    if q.encoding == _lc.ENCODING:
        return _decode_coords(q, section_bytes(q.indices))
    context = _stream_context(lookup_coder(q.coder), q.key, q.dither, q.count, q.n)
    index_dtype = narrow_index_dtype(q.alphabet_size)
    indices = _decode_stream(
        q.coder, section_bytes(q.indices), q.count, q.alphabet_size, f"{q.fqn!r} indices", context, index_dtype
    )
    codebook, codebook_int = _decode_codebook(q, section_bytes(q.codebook))
    return QuantizedTensor(
        fqn=q.fqn, shape=q.shape, lattice=q.lattice, n=q.n, step=q.step, key=q.key, dither=q.dither,
        indices=indices.astype(index_dtype, copy=False), codebook=codebook,
        codebook_int=codebook_int, coder=q.coder, zero_index=q.zero_index, meta=q.meta, affine=q.affine,
    )


def decode_payload(
    preamble: Preamble, header: Header, payload: memoryview, progress: bool | None = None
) -> Container:
    """Checks the payload digest, then decodes every section of a validated ``header`` into a :class:`Container`."""
    check_payload_digest(preamble, hashlib.sha256(payload).digest())

    def section_bytes(s: Section) -> bytes:
        return bytes(payload[s.offset : s.offset + s.length])

    quantized, raws = [], []
    for tensor in decode_sections(header, section_bytes, progress):
        (quantized if isinstance(tensor, QuantizedTensor) else raws).append(tensor)
    return Container(quantized=quantized, raw=raws, config=header.config, metadata=header.metadata, seed=header.seed)

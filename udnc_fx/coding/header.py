"""The ``.udnc`` header: the records a file holds, their compact stored form, and parsing and validation.

Writing: :func:`compact_header` turns a resolved header (every key present) into the stored JSON object, omitting
every key that holds its default or that a reader derives. Reading: :func:`parse_preamble` and
:func:`read_header_from` check the preamble and the header digest, then :func:`validate_header` checks types
(``bad_header``), values (``bad_value``/``unknown_codec``) and the layout (``bad_offsets``) and gives back a
:class:`Header` whose entries (:class:`QEntry`, :class:`REntry`) carry every derived field and section offset.
:class:`QuantizedTensor`, :class:`RawTensor` and :class:`Container` are the caller-facing records (re-exported by
:mod:`udnc_fx.coding.container`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from udnc_fx.coding import lattice_coords as _lc
from udnc_fx.coding.header_codec import decompress_header
from udnc_fx.coding.coder_base import DEFAULT_CODER
from udnc_fx.coding.format import (
    AFFINE, CODEBOOK_FLOAT_ENCODINGS, DEFAULT_CODEBOOK_ENCODING, DEFAULT_LATTICE, DEFAULT_RAW_DTYPE, DIGESTED_PREAMBLE,
    FORMAT_DEFAULT_CODEBOOK_CODER, FORMAT_DEFAULT_CODER, FORMAT_DEFAULT_DITHER, FORMAT_VERSION, HEX_DIGITS,
    INT_WIDTHS, LATTICE_DIMENSIONS, LATTICE_INT, LATTICE_INT_CODED, MAGIC, MAX_CODED_ALPHABET, MAX_NDIM, MAX_SEED,
    PREAMBLE, PREAMBLE_SIZE, RAW_DTYPES, coded_row_symbols, default_key, default_n, lookup_coder, prod,
)
from udnc_fx.coding.limits import (
    DEFAULT_MAX_HEADER_LENGTH, MAX_HEADER_LENGTH, max_codebook_alphabet, max_index_alphabet,
)
from udnc_fx.errors import ConfigError, FormatError
from udnc_fx.record import check_affine

__all__ = [
    "QuantizedTensor",
    "RawTensor",
    "Container",
    "compact_codebook",
    "compact_raw",
    "compact_header",
    "RESOLVED_ONLY",
    "pick_file_codebook",
    "pick_file_coder",
    "Section",
    "QEntry",
    "REntry",
    "Header",
    "bad_header",
    "validate_header",
    "Preamble",
    "parse_preamble",
    "read_header_from",
    "resolved_header",
]


# ---------------------------------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)  # eq=False: a generated __eq__ would compare arrays element-wise and raise
class QuantizedTensor:
    """One compressed weight: lattice-quantizer parameters, codeword indices and codebook.

    Attributes:
        fqn: the parameter's qualified name, e.g. ``"conv1.weight"``.
        shape: the weight's shape.
        lattice: ``"Z"``, ``"A2"``, ``"D4"`` or ``"E8"``.
        n: the lattice dimension (the vector length).
        step: the quantizer step Δ (float64, stored bit-exact).
        key: the per-tensor dither key, an unsigned 64-bit integer.
        dither: the dither generator's id, e.g. ``"udnc-hash32-v1"``.
        indices: ``ceil(numel / n)`` integers in ``[0, K)``. Read back as the narrowest unsigned dtype holding K.
        codebook: float32 ``(K, n)``; ``None`` when read from a ``lattice-int`` codebook.
        codebook_int: optional int64 ``(K, n)`` integer lattice coordinates (``docs/FORMAT.md``, *Lattices*: D4
            rows have an even sum, E8 rows are twice a point: one parity, sum divisible by 4). When given, the
            writer stores these (entropy-coded when that is smaller) instead of ``codebook`` and the reader returns
            them with ``codebook=None``; the caller rebuilds the floats. The writer checks that every row is a
            lattice point but cannot check that ``codebook`` still equals them (it does not know the lattice's
            generator), so pass them only for codebooks that were not fine-tuned: build entries from a
            :class:`udnc_fx.record.CompressedWeight` with :func:`udnc_fx.coding.entries.entry_from_record`, and read
            them back with :func:`~udnc_fx.coding.entries.record_from_entry` (the one mapping each way).
        coder: the index coder's registered name.
        zero_index: the index that decodes to exactly 0 whatever the dither (pruned weights), or ``None``.
        meta: JSON-able per-tensor facts (e.g. ``sqnr_db``), stored in the header.
        affine: ``(a, b)``, float32 numbers, or ``None``: the codebook is ``codebook_int``'s points under the
            per-layer affine correction of :func:`udnc_fx.record.codebook_from_int` (needs ``codebook_int``; stored
            as an ``affine`` codebook wrapping the integer one, format 1.3). The reader returns it as it is.
    """

    fqn: str
    shape: tuple[int, ...]
    lattice: str
    n: int
    step: float
    key: int
    dither: str
    indices: np.ndarray
    codebook: np.ndarray | None
    codebook_int: np.ndarray | None = None
    coder: str = DEFAULT_CODER
    zero_index: int | None = None
    meta: dict = field(default_factory=dict)
    affine: tuple[float, float] | None = None


@dataclass(eq=False)
class RawTensor:
    """A tensor stored uncompressed (biases, normalisation parameters, buffers)."""

    name: str
    array: np.ndarray


@dataclass(eq=False)
class Container:
    """Everything a ``.udnc`` file holds. ``config`` and ``metadata`` are JSON objects (tuples come back as lists)."""

    quantized: list[QuantizedTensor] = field(default_factory=list)
    raw: list[RawTensor] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    #: The seed the dither keys were derived from (``derived_key``); entries whose key is the derived one do not
    #: store it. Any other key is stored, so this only shortens the header: a wrong seed costs bytes, never data.
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Compaction: the stored form of a header
# ---------------------------------------------------------------------------------------------------------------


# The compact (stored) form: a resolved header minus every key that holds its default or that a reader derives.
# The writer stores exactly compact_header(resolved); section_sizes measures the same form, so its per-entry
# shares are exact for files this module wrote.


def compact_codebook(cb: dict) -> dict:
    """A codebook entry's stored form: offsets and derivable lengths dropped, defaults omitted; a resolved codebook
    with an ``affine`` correction ``[a, b]`` is stored as ``{"encoding": "affine", "a": a, "b": b, "points": <the
    integer codebook>}`` (format 1.3), or, in a ``lattice-coords`` entry of a ``-u`` layout (format 1.4), flat
    as ``"affine": [a, b]`` in the entry (about 30 bytes less)."""
    out = dict(cb)
    affine = out.pop("affine", None)
    if affine is not None and not (out.get("encoding") == _lc.ENCODING and _lc.uses_own_dither(out.get("layout"))):
        return {"encoding": AFFINE, "a": affine[0], "b": affine[1], "points": compact_codebook(out)}
    if affine is not None:  # format 1.4: flat in a lattice-coords entry of a -u layout (old readers refuse it)
        out["affine"] = [affine[0], affine[1]]
    out.pop("offset", None)
    encoding = out.get("encoding")
    if encoding in CODEBOOK_FLOAT_ENCODINGS or encoding == LATTICE_INT or encoding == _lc.ENCODING:
        out.pop("length", None)
    if encoding == _lc.ENCODING and out.get("exact_zero") is False:
        del out["exact_zero"]
    if encoding == LATTICE_INT and out.get("width") == 1:
        del out["width"]
    if encoding == LATTICE_INT_CODED and out.get("coder") == FORMAT_DEFAULT_CODEBOOK_CODER:
        del out["coder"]
    return out


def _compact_quantized(
    entry: dict, file_coder: str, seed: int, file_codebook: str = DEFAULT_CODEBOOK_ENCODING
) -> dict:
    out = dict(entry)
    lattice = out.get("lattice")
    if lattice in LATTICE_DIMENSIONS and out.get("n") == default_n(lattice):
        del out["n"]
    if lattice == DEFAULT_LATTICE:
        del out["lattice"]
    dither = out.get("dither", FORMAT_DEFAULT_DITHER)
    if isinstance(out.get("fqn"), str) and isinstance(dither, str) and isinstance(seed, int) and 0 <= seed < MAX_SEED:
        if out.get("key") == f"{default_key(seed, out['fqn'], dither):016x}":
            del out["key"]
    for key, default in (("dither", FORMAT_DEFAULT_DITHER), ("zero_index", None), ("meta", {})):
        if key in out and out[key] == default and type(out[key]) is type(default):
            del out[key]
    indices = dict(out["indices"])
    for key in ("offset", "count"):
        indices.pop(key, None)
    if indices.get("coder") == file_coder:
        del indices["coder"]
    out["indices"] = indices
    codebook = compact_codebook(out["codebook"])
    if codebook == {"encoding": file_codebook}:
        del out["codebook"]
    else:
        out["codebook"] = codebook
    return out


def compact_raw(entry: dict) -> list:
    """A raw entry's stored form: ``[name, shape]``, or ``[name, shape, dtype]`` when it is not float32."""
    dtype = entry.get("dtype", DEFAULT_RAW_DTYPE)
    if entry.get("source_dtype") == DEFAULT_RAW_DTYPE:  # narrowed to float16 under the file's raw_float16
        dtype = DEFAULT_RAW_DTYPE
    out = [entry["name"], list(entry["shape"])]
    return out if dtype == DEFAULT_RAW_DTYPE else out + [dtype]


def compact_header(header: dict) -> dict:
    """The stored JSON object of a resolved header (what the writer writes and ``section_sizes`` measures)."""
    out = dict(header)
    for key in RESOLVED_ONLY:
        out.pop(key, None)
    file_coder = out.get("coder", FORMAT_DEFAULT_CODER)
    if file_coder == FORMAT_DEFAULT_CODER:
        out.pop("coder", None)
    seed = out.get("seed", 0)
    file_codebook = out.get("codebook_encoding", DEFAULT_CODEBOOK_ENCODING)
    out["quantized"] = [_compact_quantized(q, file_coder, seed, file_codebook) for q in out.get("quantized", [])]
    out["raw"] = [compact_raw(r) for r in out.get("raw", [])]
    for key, empty in (("quantized", []), ("raw", []), ("config", {}), ("metadata", {})):
        if key in out and out[key] == empty:
            del out[key]
    for key, default in (("seed", 0), ("raw_float16", False), ("codebook_encoding", DEFAULT_CODEBOOK_ENCODING)):
        if key in out and out[key] == default and type(out[key]) is type(default):
            del out[key]
    return out


#: Top-level keys that read_header adds from the preamble and the file's layout; never stored in the JSON.
#: ``header_json_length``: the JSON's length, which is ``header_length`` unless the header is stored compressed.
RESOLVED_ONLY = ("header_length", "header_json_length", "payload_length", "payload_sha256")


def pick_file_codebook(codebooks: list[dict]) -> str:
    """The header's default codebook encoding: the most used one among codebooks that need no other key (``f32``
    when it is among the most used, else the smallest name)."""
    counts = Counter(c["encoding"] for c in map(compact_codebook, codebooks) if set(c) == {"encoding"})
    if not counts:
        return DEFAULT_CODEBOOK_ENCODING
    top = max(counts.values())
    best = sorted(name for name, c in counts.items() if c == top)
    return DEFAULT_CODEBOOK_ENCODING if DEFAULT_CODEBOOK_ENCODING in best else best[0]


def pick_file_coder(coders: list[str]) -> str:
    """The header's default index coder: the most used one (the format's default when it is among them)."""
    counts = Counter(coders)
    if not counts:
        return FORMAT_DEFAULT_CODER
    top = max(counts.values())
    best = sorted(name for name, c in counts.items() if c == top)
    return FORMAT_DEFAULT_CODER if FORMAT_DEFAULT_CODER in best else best[0]


# ---------------------------------------------------------------------------------------------------------------
# Reading: header entries
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Section:
    """One payload section: where it is named in errors, its length, and its offset once the layout is known."""
    where: str
    length: int
    offset: int = -1  # set once every length is known


@dataclass
class QEntry:
    """A parsed quantized entry: types checked by the parser, values and derived fields by ``validate_header``."""
    raw: dict
    fqn: str
    shape: tuple[int, ...]
    lattice: str
    n: int | None  # None: omitted (the lattice's default, once the lattice is known to be valid)
    step: float | None  # None: out of float64's range (a bad_value once the entry's values are checked)
    key: int | None  # None: omitted (derived from the file's seed once that is known to be valid)
    dither: str
    zero_index: int | None
    meta: dict
    coder: str
    alphabet_size: int
    encoding: str
    width: int | None
    codebook_alphabet_size: int | None
    codebook_coder: str | None
    indices: Section
    codebook: Section
    count: int = 0
    layout: str | None = None  # lattice-coords only
    exact_zero: bool = False  # lattice-coords only
    affine: tuple[Any, Any] | None = None  # an affine codebook: (a, b) as stored until checked, then floats

    def resolved(self) -> dict:
        out = dict(self.raw)
        out.update(fqn=self.fqn, lattice=self.lattice, n=self.n, dither=self.dither, zero_index=self.zero_index)
        out["key"] = f"{self.key:016x}"
        out.setdefault("meta", {})
        indices = dict(self.raw["indices"])
        indices.update(coder=self.coder, count=self.count, offset=self.indices.offset, length=self.indices.length)
        codebook = self.raw.get("codebook", {"encoding": self.encoding})
        affine = None
        if codebook.get("encoding") == AFFINE:  # the numbers as stored (readers take float32 of them)
            affine = [codebook["a"], codebook["b"]]
            codebook = codebook["points"]
        codebook = dict(codebook)
        codebook.update(offset=self.codebook.offset, length=self.codebook.length)
        if affine is not None:
            codebook["affine"] = affine
        elif "affine" in codebook:  # the flat form (format 1.4): the numbers as stored
            codebook["affine"] = list(codebook["affine"])
        if self.encoding == LATTICE_INT:
            codebook["width"] = self.width
        elif self.encoding == LATTICE_INT_CODED:
            codebook["coder"] = self.codebook_coder
        elif self.encoding == _lc.ENCODING:
            codebook.update(layout=self.layout, exact_zero=self.exact_zero)
        out["indices"], out["codebook"] = indices, codebook
        return out


@dataclass
class REntry:
    """A parsed raw entry (``[name, shape]`` or ``[name, shape, dtype]``)."""
    name: str
    dtype: str  # as stored
    shape: tuple[int, ...]
    source_dtype: str | None  # "float32" when stored as float16 under the file's raw_float16
    data: Section

    def resolved(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.source_dtype is not None:
            out["source_dtype"] = self.source_dtype
        out["data"] = {"offset": self.data.offset, "length": self.data.length}
        return out


@dataclass
class Header:
    """A validated header: the file-level defaults, the entries in payload order, config and metadata."""
    raw: dict
    coder: str
    codebook_encoding: str
    seed: int
    raw_float16: bool
    quantized: list[QEntry]
    raws: list[REntry]
    config: dict
    metadata: dict
    payload_length: int = 0
    json_length: int | None = None  # the JSON's length (set by read_header_from; differs from H when compressed)

    def sections(self) -> list[Section]:
        out = []
        for q in self.quantized:
            out += [q.indices, q.codebook]
        out += [r.data for r in self.raws]
        return out

    def resolved(self) -> dict:
        out = dict(self.raw)
        out.update(
            coder=self.coder,
            codebook_encoding=self.codebook_encoding,
            seed=self.seed,
            raw_float16=self.raw_float16,
            quantized=[q.resolved() for q in self.quantized],
            raw=[r.resolved() for r in self.raws],
            config=self.config,
            metadata=self.metadata,
        )
        return out


def bad_header(message: str) -> FormatError:
    """A ``bad_header`` error (a header whose JSON or types are wrong)."""
    return FormatError("bad_header", message)


def _get(obj: dict, key: str, types: type | tuple[type, ...], where: str, default: Any = ..., nullable: bool = False):
    if key not in obj:
        if default is ...:
            raise bad_header(f"{where}: missing key {key!r}")
        return default
    value = obj[key]
    if value is None and nullable:
        return None
    # JSON true/false are Python bools, which are ints too: never accept them as numbers.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad_header(f"{where}: {key!r} must be {_type_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise bad_header(f"{where}: {key!r} must be {_type_names(types)}, got {type(value).__name__}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types)




def _parse_shape(obj: dict, where: str) -> tuple[int, ...]:
    shape = _get(obj, "shape", list, where)
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            raise bad_header(f"{where}: shape entries must be integers, got {d!r}")
    return tuple(shape)


def _parse_quantized(obj: Any, i: int, file_coder: str, file_codebook: str) -> QEntry:
    """Types only (``bad_header``); values are checked later."""
    where = f"quantized[{i}]"
    if not isinstance(obj, dict):
        raise bad_header(f"{where} must be an object")
    fqn = _get(obj, "fqn", str, where)
    where = f"quantized tensor {fqn!r}"
    shape = _parse_shape(obj, where)
    lattice = _get(obj, "lattice", str, where, default=DEFAULT_LATTICE)
    n = _get(obj, "n", int, where, default=None)
    step_value = _get(obj, "step", (int, float), where)
    try:
        step: float | None = float(step_value)
    except OverflowError:
        step = None
    key_text = _get(obj, "key", str, where, default=None)
    if key_text is not None and (len(key_text) != 16 or not set(key_text) <= HEX_DIGITS):
        raise bad_header(f"{where}: key must be 16 lowercase hex digits, got {key_text[:40]!r}")
    dither = _get(obj, "dither", str, where, default=FORMAT_DEFAULT_DITHER)
    zero_index = _get(obj, "zero_index", int, where, default=None, nullable=True)
    meta = _get(obj, "meta", dict, where, default={})
    ind = _get(obj, "indices", dict, where)
    cb = _get(obj, "codebook", dict, where, default={"encoding": file_codebook})
    coder = _get(ind, "coder", str, f"{where} indices", default=file_coder)
    alphabet_size = _get(ind, "alphabet_size", int, f"{where} indices")
    indices = Section(f"{where} indices", _get(ind, "length", int, f"{where} indices"))
    encoding = _get(cb, "encoding", str, f"{where} codebook")
    affine = None
    if encoding == AFFINE:
        affine = (
            _get(cb, "a", (int, float), f"{where} codebook"),
            _get(cb, "b", (int, float), f"{where} codebook"),
        )
        cb = _get(cb, "points", dict, f"{where} codebook")
        encoding = _get(cb, "encoding", str, f"{where} codebook points")
    width = cb_alphabet = cb_coder = layout = None
    exact_zero = False
    codebook = Section(f"{where} codebook", 0)  # a derived length, set with the values
    if encoding == LATTICE_INT:
        width = _get(cb, "width", int, f"{where} codebook", default=1)
    elif encoding == LATTICE_INT_CODED:
        cb_alphabet = _get(cb, "alphabet_size", int, f"{where} codebook")
        cb_coder = _get(cb, "coder", str, f"{where} codebook", default=FORMAT_DEFAULT_CODEBOOK_CODER)
        codebook.length = _get(cb, "length", int, f"{where} codebook")
    elif encoding == _lc.ENCODING:
        layout = _get(cb, "layout", str, f"{where} codebook")
        exact_zero = _get(cb, "exact_zero", bool, f"{where} codebook", default=False)
    if "affine" in cb:  # the flat form (format 1.4); its place (a -u layout, no wrapper) is checked with values
        flat = _get(cb, "affine", list, f"{where} codebook")
        if affine is not None or encoding != _lc.ENCODING or not _lc.uses_own_dither(layout):
            raise FormatError(
                "bad_value", f"{where}: an 'affine' array belongs only in a lattice-coords entry of a -u layout"
            )
        if len(flat) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in flat):
            raise bad_header(f"{where} codebook: 'affine' must be an array of two numbers")
        affine = (flat[0], flat[1])
    return QEntry(
        raw=obj, fqn=fqn, shape=shape, lattice=lattice, n=n, step=step,
        key=None if key_text is None else int(key_text, 16), dither=dither,
        zero_index=zero_index, meta=meta, coder=coder, alphabet_size=alphabet_size, encoding=encoding,
        width=width, codebook_alphabet_size=cb_alphabet, codebook_coder=cb_coder, indices=indices, codebook=codebook,
        layout=layout, exact_zero=exact_zero, affine=affine,
    )


def _parse_raw(obj: Any, i: int, raw_float16: bool) -> REntry:
    """``[name, shape]`` or ``[name, shape, dtype]``."""
    where = f"raw[{i}]"
    if not isinstance(obj, list) or len(obj) not in (2, 3):
        raise bad_header(f"{where} must be an array [name, shape] or [name, shape, dtype]")
    name = obj[0]
    if not isinstance(name, str):
        raise bad_header(f"{where}: the name must be a string, got {type(name).__name__}")
    where = f"raw tensor {name!r}"
    shape = _parse_shape({"shape": obj[1]}, where)
    dtype = obj[2] if len(obj) == 3 else DEFAULT_RAW_DTYPE
    if not isinstance(dtype, str):
        raise bad_header(f"{where}: the dtype must be a string, got {type(dtype).__name__}")
    source = None
    if raw_float16 and dtype == DEFAULT_RAW_DTYPE:
        dtype, source = "float16", DEFAULT_RAW_DTYPE
    return REntry(name=name, dtype=dtype, shape=shape, source_dtype=source, data=Section(f"{where} data", 0))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON syntax but no float64: Python reads it as inf, which nothing downstream can print back
    # as JSON (``udnc inspect --json`` wrote ``Infinity``). The writer never produces one (allow_nan=False).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is outside float64's range")
    return value


def _parse_header_json(header_bytes: bytes) -> dict:
    try:
        text = header_bytes.decode("utf-8")
        obj = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except Exception as exc:  # UnicodeDecodeError, JSONDecodeError, ValueError, RecursionError
        raise bad_header(f"the header is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise bad_header(f"the header must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_shape(shape: tuple[int, ...], where: str) -> None:
    if len(shape) > MAX_NDIM:
        raise FormatError("bad_value", f"{where}: {len(shape)} dimensions (at most {MAX_NDIM})")
    if any(d < 0 for d in shape):
        raise FormatError("bad_value", f"{where}: negative dimension in shape {list(shape)}")


def _check_quantized_values(q: QEntry, max_elements: int) -> int:
    """Value checks (``bad_value``) and codec checks (``unknown_codec``) of one entry; sets its derived fields.

    Returns the elements it decodes to (tensor and codebook)."""
    where = f"quantized tensor {q.fqn!r}"
    _check_shape(q.shape, where)
    if q.lattice not in LATTICE_DIMENSIONS:
        raise FormatError("bad_value", f"{where}: unknown lattice {q.lattice[:40]!r}")
    if q.n is None:
        q.n = default_n(q.lattice)
    if q.n not in LATTICE_DIMENSIONS[q.lattice]:
        raise FormatError("bad_value", f"{where}: lattice {q.lattice} has no dimension n={q.n}")
    if q.step is None or not (math.isfinite(q.step) and q.step > 0):
        raise FormatError("bad_value", f"{where}: step {q.step!r} is not finite and > 0")
    numel = prod(q.shape, max_elements)
    q.count = -(-numel // q.n)
    if q.affine is not None:
        if q.encoding in CODEBOOK_FLOAT_ENCODINGS or q.encoding == AFFINE:
            raise FormatError("bad_value", f"{where}: an affine codebook wraps integer points, not {q.encoding!r}")
        try:
            with np.errstate(over="ignore"):  # a number past float32's range becomes inf: refused just below
                q.affine = check_affine(tuple(float(np.float32(float(v))) for v in q.affine))
        except (ConfigError, OverflowError) as exc:
            raise FormatError("bad_value", f"{where}: {exc}") from None
    k = q.alphabet_size
    if k < 1:
        raise FormatError("bad_value", f"{where}: alphabet_size {k} (K must be >= 1)")
    # an adaptive model's work grows with its alphabet whatever the stream holds; lattice-coords streams hold w
    # symbols per vector
    symbols = q.count * coded_row_symbols(q.lattice, q.n) if q.encoding == _lc.ENCODING else q.count
    if k > max_index_alphabet(symbols):
        raise FormatError(
            "bad_value",
            f"{where}: alphabet_size {k} is more than the {max_index_alphabet(symbols)} allowed for {symbols} symbols",
        )
    if q.zero_index is not None and not 0 <= q.zero_index < k:
        raise FormatError("bad_value", f"{where}: zero_index {q.zero_index} outside [0, {k})")
    if q.encoding == _lc.ENCODING:
        # K is not stored: the reader rebuilds the distinct points, at most one per vector.
        if q.zero_index is not None:
            raise FormatError("bad_value", f"{where}: lattice-coords stores exact zeros as exact_zero, not zero_index")
        _lc.check_layout(q.layout, where)
        if _lc.uses_own_dither(q.layout):
            coder = lookup_coder(q.coder)
            if (q.lattice not in _lc.OWN_DITHER_LATTICES or q.dither != FORMAT_DEFAULT_DITHER
                    or not getattr(coder, "accepts_context", False)
                    or (q.layout == "grouped-u" and q.lattice not in _lc.COLUMN_GROUPS)):
                raise FormatError(
                    "bad_value",
                    f"{where}: layout {q.layout!r} needs lattice A2, D4 or E8 (grouped-u: D4 or E8), the "
                    f"{FORMAT_DEFAULT_DITHER} dither and a coder that takes contexts",
                )
        k = q.count
    elements = numel + k * q.n  # K·n can be far more than a coded codebook's bytes
    if elements > max_elements:
        raise FormatError("bad_value", f"{where}: decodes to more than {max_elements} elements")
    if q.encoding in CODEBOOK_FLOAT_ENCODINGS:
        q.codebook.length = k * q.n * CODEBOOK_FLOAT_ENCODINGS[q.encoding].itemsize
    elif q.encoding == LATTICE_INT:
        if q.width not in INT_WIDTHS:
            raise FormatError("bad_value", f"{where}: codebook width {q.width} not in (1, 2, 4, 8)")
        q.codebook.length = k * q.n * q.width
    elif q.encoding == LATTICE_INT_CODED:
        if not 1 <= q.codebook_alphabet_size <= MAX_CODED_ALPHABET:
            raise FormatError(
                "bad_value", f"{where}: codebook alphabet_size {q.codebook_alphabet_size} outside [1, 2^32]"
            )
        symbols = k * coded_row_symbols(q.lattice, q.n)
        if q.codebook_alphabet_size > max_codebook_alphabet(symbols):  # the writer's own limit
            raise FormatError(
                "bad_value",
                f"{where}: codebook alphabet_size {q.codebook_alphabet_size} is more than the "
                f"{max_codebook_alphabet(symbols)} allowed for {symbols} symbols",
            )
        lookup_coder(q.codebook_coder)
    elif q.encoding == _lc.ENCODING:
        q.codebook.length = 0
    else:
        raise FormatError("unknown_codec", f"{where}: unknown codebook encoding {q.encoding[:40]!r}")
    lookup_coder(q.coder)
    return elements


def validate_header(obj: dict, max_elements: int, payload_length: int | None = None) -> Header:
    """Checks types (``bad_header``), values (``bad_value``/``unknown_codec``) and the layout (``bad_offsets``).

    ``payload_length`` is the preamble's P (``None``: not checked); the sections' lengths must add up to it.
    """
    file_coder = _get(obj, "coder", str, "header", default=FORMAT_DEFAULT_CODER)
    seed = _get(obj, "seed", int, "header", default=0)
    raw_float16 = _get(obj, "raw_float16", bool, "header", default=False)
    file_codebook = _get(obj, "codebook_encoding", str, "header", default=DEFAULT_CODEBOOK_ENCODING)
    entries = _get(obj, "quantized", list, "header", [])
    quantized = [_parse_quantized(q, i, file_coder, file_codebook) for i, q in enumerate(entries)]
    raws = [_parse_raw(r, i, raw_float16) for i, r in enumerate(_get(obj, "raw", list, "header", []))]
    header = Header(
        raw=obj, coder=file_coder, codebook_encoding=file_codebook, seed=seed, raw_float16=raw_float16,
        quantized=quantized, raws=raws,
        config=_get(obj, "config", dict, "header", {}), metadata=_get(obj, "metadata", dict, "header", {}),
    )

    for s in header.sections():  # only the stored lengths are set yet; the derived ones are 0
        if s.length < 0:
            raise FormatError("bad_offsets", f"{s.where}: negative length {s.length}")

    if not 0 <= seed < MAX_SEED:
        raise FormatError("bad_value", f"seed {seed} outside [0, 2^64)")
    names: set[str] = set()
    total = 0
    for q in quantized:
        if q.key is None:
            q.key = default_key(seed, q.fqn, q.dither)
        if not q.fqn or q.fqn in names:
            raise FormatError("bad_value", f"quantized tensor {q.fqn!r}: empty or duplicate name")
        names.add(q.fqn)
        total += _check_quantized_values(q, max_elements)
        if total > max_elements:
            raise FormatError("bad_value", f"the tensors decode to more than {max_elements} elements")
    for r in raws:
        where = f"raw tensor {r.name!r}"
        if not r.name or r.name in names:
            raise FormatError("bad_value", f"{where}: empty or duplicate name")
        names.add(r.name)
        _check_shape(r.shape, where)
        if r.dtype not in RAW_DTYPES:
            raise FormatError("unknown_codec", f"{where}: unknown dtype {r.dtype[:40]!r}")
        if r.source_dtype is not None and (r.source_dtype, r.dtype) != ("float32", "float16"):
            raise FormatError("unknown_codec", f"{where}: cannot widen {r.dtype} to {r.source_dtype[:40]!r}")
        numel = prod(r.shape, max_elements)
        total += numel
        if total > max_elements:
            raise FormatError("bad_value", f"the tensors decode to more than {max_elements} elements")
        r.data.length = numel * RAW_DTYPES[r.dtype].itemsize

    # Layout: the sections follow each other in entry order and fill the payload exactly.
    position = 0
    for s in header.sections():
        s.offset = position
        position += s.length
    header.payload_length = position
    if payload_length is not None and position != payload_length:
        raise FormatError(
            "bad_offsets", f"the sections add up to {position} bytes, the preamble says the payload is {payload_length}"
        )
    return header


@dataclass
class Preamble:
    """The preamble's lengths and payload digest (magic, version and header digest are checked, not kept)."""
    header_length: int
    payload_length: int
    payload_sha256: bytes


def parse_preamble(prefix: bytes, file_size: int, max_header_length: int = DEFAULT_MAX_HEADER_LENGTH) -> Preamble:
    """Checks the preamble up to the header's presence in the file (the header digest comes next)."""
    if prefix[: len(MAGIC)] != MAGIC[: len(prefix)]:
        raise FormatError("bad_magic", "not a .udnc file (bad magic bytes)")
    if len(prefix) < PREAMBLE_SIZE:
        raise FormatError("truncated", f"the file is {file_size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
    _, major, minor, header_length, payload_length, payload_sha256, _ = PREAMBLE.unpack(prefix[:PREAMBLE_SIZE])
    if major != FORMAT_VERSION[0]:
        raise FormatError(
            "unsupported_version",
            f"format version {major}.{minor}; this reader reads major version {FORMAT_VERSION[0]}",
        )
    if not 1 <= header_length <= MAX_HEADER_LENGTH:
        raise bad_header(f"header length {header_length} outside [1, {MAX_HEADER_LENGTH}]")
    if header_length > max_header_length:
        raise FormatError(
            "bad_value",
            f"the header is {header_length} bytes, more than this reader's limit of {max_header_length} "
            "(max_header_length)",
        )
    if PREAMBLE_SIZE + header_length > file_size:
        raise FormatError(
            "truncated", f"the file is {file_size} bytes; its header needs {PREAMBLE_SIZE + header_length}"
        )
    return Preamble(header_length, payload_length, payload_sha256)


def read_header_from(
    prefix: bytes, header_bytes: bytes, file_size: int, max_elements: int, max_header_length: int = MAX_HEADER_LENGTH
) -> tuple[Preamble, Header]:
    """Checks the preamble, the header digest and the file's length, then parses and validates the header."""
    preamble = parse_preamble(prefix, file_size, max_header_length)
    if hashlib.sha256(prefix[:DIGESTED_PREAMBLE] + header_bytes).digest() != prefix[DIGESTED_PREAMBLE:PREAMBLE_SIZE]:
        raise FormatError("checksum_mismatch", "the header digest does not match (header or preamble damaged)")
    available = file_size - PREAMBLE_SIZE - len(header_bytes)
    if available < preamble.payload_length:
        raise FormatError("truncated", f"the payload is {preamble.payload_length} bytes, the file holds {available}")
    if available > preamble.payload_length:
        raise FormatError("bad_offsets", f"{available - preamble.payload_length} trailing bytes after the payload")
    json_bytes = decompress_header(header_bytes, max_header_length)  # as is unless stored compressed (1.5)
    header = validate_header(_parse_header_json(json_bytes), max_elements, preamble.payload_length)
    header.json_length = len(json_bytes)
    return preamble, header


def resolved_header(preamble: Preamble, header: Header) -> dict:
    """The header as :func:`~udnc_fx.coding.container.read_header` returns it: resolved, plus the preamble's keys."""
    out = header.resolved()
    out["header_length"] = preamble.header_length
    out["header_json_length"] = preamble.header_length if header.json_length is None else header.json_length
    out["payload_length"] = preamble.payload_length
    out["payload_sha256"] = preamble.payload_sha256.hex()
    return out

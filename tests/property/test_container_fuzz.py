"""Damaged and hostile .udnc files: only FormatError escapes, and nothing damaged ever decodes silently.

Two kinds of damage. Blind damage (flipped bytes, truncation) must always be detected: every byte of a file is
covered by the header digest, the payload digest or both. Crafted damage (header or payload altered and every
checksum recomputed, as an attacker would) reaches the parser, the validator, the index coders and the coded
codebooks: it may decode to something else, but must never raise anything but FormatError.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udnc_fx.coding import container as C
from udnc_fx.coding.coders import available_coders
from udnc_fx.coding.format import non_members
from udnc_fx.coding.header_codec import decompress_header
from udnc_fx.coding.container import (
    PREAMBLE_SIZE,
    Container,
    QuantizedTensor,
    RawTensor,
    encode_container,
    read_container,
    read_header,
)
from udnc_fx.errors import FormatError
from udnc_fx.lattice import get_lattice
from udnc_fx.quantizer import quantize_array

KINDS = {
    "bad_magic", "unsupported_version", "truncated", "bad_header", "bad_offsets", "checksum_mismatch", "bad_value",
    "unknown_codec",
}
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


CODERS = available_coders()


def _e8_points(rng, k: int) -> np.ndarray:
    """E8 points in integer coordinates (twice the point): one parity per row, sum divisible by 4."""
    r = rng.integers(-25, 26, (k, 8))
    r[:, 7] += r.sum(axis=1) % 2
    return 2 * r + rng.integers(0, 2, (k, 1))


def _d4_points(rng, k: int) -> np.ndarray:
    c = rng.integers(-2, 3, (k, 4))
    c[:, 3] += c.sum(axis=1) % 2
    return c


def _build(coders: list[str], *, lattice_int: bool, seed: int, affine: bool = False, **options) -> bytes:
    rng = np.random.default_rng(seed)
    pick = lambda i: coders[i % len(coders)]  # noqa: E731
    laplace = np.clip(np.round(rng.laplace(0, 1.5, 96)), -6, 6).astype(np.int64) + 6
    quantized = [
        QuantizedTensor(
            "conv1.weight", (6, 2, 2, 4), "Z", 1, 0.03125, 99, "udnc-hash32-v1", laplace,
            (np.arange(-6, 7, dtype=np.float32) * np.float32(0.03125))[:, None],
            codebook_int=np.arange(-6, 7)[:, None] if lattice_int else None, coder=pick(0), zero_index=6,
            meta={"sqnr_db": 21.25},
        ),
        QuantizedTensor(
            "fc.weight", (4, 10), "E8", 8, 0.1, 2**63 + 5, "udnc-hash32-v1", rng.integers(0, 4, 5),
            rng.standard_normal((4, 8)).astype(np.float32),
            codebook_int=_e8_points(rng, 4) if lattice_int else None, coder=pick(1),
        ),
        QuantizedTensor(
            "head.weight", (3, 3), "A2", 2, 0.5, 3, "udnc-hash32-v1", np.array([0, 1, 1, 0, 2]),
            rng.standard_normal((3, 2)).astype(np.float32),
            codebook_int=rng.integers(-3, 3, (3, 2)) if lattice_int else None, coder=pick(2),
        ),
        QuantizedTensor(  # a codebook large enough to be entropy-coded when integer
            "proj.weight", (60, 8), "D4", 4, 0.25, 11, "none", rng.integers(0, 24, 120),
            rng.standard_normal((24, 4)).astype(np.float32),
            codebook_int=_d4_points(rng, 24) if lattice_int else None, coder=pick(3),
        ),
    ]
    if lattice_int:  # fine E8 points, nearly all distinct: stored as lattice-coords (no table of points)
        qa = quantize_array(rng.standard_normal((32, 64)), lattice="E8", n=8, step=0.05, key=7)
        quantized.append(QuantizedTensor(
            "emb.weight", (32, 64), "E8", 8, 0.05, 7, "udnc-hash32-v1", qa.indices, qa.codebook,
            codebook_int=qa.codebook_int, coder=pick(4),
        ))
    if affine:  # fine-tuned codewords kept as integer points under a per-layer correction (format 1.3)
        for i, q in enumerate(quantized):
            q.affine = (float(np.float32(1.0 + 0.03 * i)), float(np.float32(-0.002 * i)))
    raw = [
        RawTensor("conv1.bias", rng.standard_normal(6).astype(np.float32)),
        RawTensor("bn.num_batches_tracked", np.array(5, np.int64)),
        RawTensor("mask", rng.random(7) > 0.5),
    ]
    container = Container(quantized, raw, {"version": 1, "lattice": "Z"}, {"model": "fuzz", "seed": seed})
    return encode_container(container, **options)


def _build_u(seed: int) -> bytes:
    """Format 1.4: heavy-tailed A2/D4/E8 weights under ans-dither-v1, coded in the -u layouts (contexts from each
    coordinate's own dither, grouped streams, escape thresholds), one with a flat affine correction."""
    rng = np.random.default_rng(seed)
    quantized = []
    for i, (lattice, n, shape) in enumerate((("A2", 2, (8, 64)), ("D4", 4, (12, 64)), ("E8", 8, (16, 64)))):
        qa = quantize_array(rng.standard_t(3, shape), lattice=lattice, n=n, step=0.08, key=40 + i)
        quantized.append(QuantizedTensor(
            f"l{i}.weight", shape, lattice, n, 0.08, 40 + i, "udnc-hash32-v1", qa.indices, None,
            codebook_int=qa.codebook_int, coder="ans-dither-v1",
        ))
    quantized[2].affine = (float(np.float32(1.03)), float(np.float32(-0.002)))
    return encode_container(Container(quantized, [RawTensor("b", rng.standard_normal(3).astype(np.float32))]))


FILES = [
    _build(["range-adaptive-v1"], lattice_int=False, seed=0),
    _build(CODERS, lattice_int=True, seed=1, raw_float_dtype="float16"),
    _build(list(reversed(CODERS)), lattice_int=False, seed=2, codebook_float_dtype="float16"),
    _build(CODERS, lattice_int=True, seed=3, affine=True),
    _build_u(4),
    # format 1.5: the header stored compressed (udnc-hcm-v1); crafted header bytes reach its decoder
    _build(CODERS, lattice_int=True, seed=5, affine=True, compress_header=True),
]
COMPRESSED = len(FILES) - 1


def fingerprint(c: Container) -> list:
    """Everything a container holds, in a form == can compare (arrays by dtype, shape and bytes)."""

    def arr(a):
        return None if a is None else (a.dtype.str, a.shape, a.tobytes())

    out = [json.dumps([c.config, c.metadata], sort_keys=True)]
    for q in c.quantized:
        out.append((q.fqn, q.shape, q.lattice, q.n, struct.pack("<d", q.step), q.key, q.dither, q.coder, q.zero_index,
                    json.dumps(q.meta, sort_keys=True), arr(q.indices), arr(q.codebook), arr(q.codebook_int), q.affine))
    out += [(r.name, arr(r.array)) for r in c.raw]
    return out


REFERENCE = [fingerprint(read_container(f)) for f in FILES]


def outcome(data: bytes):
    """Reads ``data`` fully and header-only; returns the decoded container or the FormatError, nothing else."""
    for read in (read_header, read_container):
        try:
            result = read(data)
        except FormatError as exc:
            assert exc.kind in KINDS, exc
            # container.py turns any stray exception into FormatError("... unexpected ..."): that is a bug here
            # (its message starts "unexpected <ExceptionType> while reading"; a JSON decoder's own "unexpected end of
            # data" is an ordinary bad_header)
            assert not exc.message.startswith("unexpected "), exc
            return exc
    return result


def check_crafted(data: bytes, which: int) -> None:
    """A crafted file (checksums recomputed) raises FormatError, or decodes to exactly what its own header promises:
    every tensor named, shaped and typed as the header says, one index per vector, indices inside the codebook,
    integer codebooks on the lattice; and a header that still means what the original meant gives its tensors."""
    result = outcome(data)
    if isinstance(result, FormatError):
        return
    header = read_header(data)
    assert [q.fqn for q in result.quantized] == [e["fqn"] for e in header["quantized"]]
    assert [r.name for r in result.raw] == [e["name"] for e in header["raw"]]
    for q, entry in zip(result.quantized, header["quantized"]):
        assert (tuple(q.shape), q.lattice, q.n) == (tuple(entry["shape"]), entry["lattice"], entry["n"])
        vectors = -(-int(np.prod(q.shape, dtype=object)) // q.n)
        assert q.indices.shape == (entry["indices"]["count"],) == (vectors,)
        assert q.indices.dtype.kind in "iu"
        table = q.codebook_int if q.codebook is None else q.codebook
        assert table is not None and table.ndim == 2 and table.shape[1] == q.n
        assert q.indices.size == 0 or 0 <= int(q.indices.min()) <= int(q.indices.max()) < table.shape[0]
        assert q.zero_index is None or 0 <= q.zero_index < table.shape[0]
        if q.codebook is None:  # integer coordinates: every row a point of the lattice (raises ConfigError if not)
            get_lattice(q.lattice, q.n).from_int(q.codebook_int)
        else:
            assert q.codebook.dtype == np.float32
        if q.affine is not None:  # a correction only over integer points, two finite float32 numbers, a != 0
            a, b = q.affine
            assert q.codebook is None and np.isfinite([a, b]).all() and a != 0
            assert float(np.float32(a)) == a and float(np.float32(b)) == b
    for r, entry in zip(result.raw, header["raw"]):
        assert r.array.shape == tuple(entry["shape"])
        assert r.array.dtype == np.dtype(entry.get("source_dtype") or entry["dtype"])
    if _canonical(parts(data)[0]) == _canonical(parts(FILES[which])[0]) and parts(data)[1] == parts(FILES[which])[1]:
        assert fingerprint(result) == REFERENCE[which]


def _canonical(header_bytes: bytes) -> str:
    # json.dumps, not ==: Python's True == 1 and 1 == 1.0, but a header holding true where it held 1 means another
    # thing (and may decode to another value)
    return json.dumps(json.loads(decompress_header(header_bytes, C.MAX_HEADER_LENGTH)), sort_keys=True)


def check_blind_damage(data: bytes, which: int) -> None:
    result = outcome(data)
    if data == FILES[which]:
        assert not isinstance(result, FormatError)
        assert fingerprint(result) == REFERENCE[which]
    else:  # every byte is covered by a digest: damage can never pass silently
        assert isinstance(result, FormatError), "damaged file decoded without an error"


def reassemble(header_bytes: bytes, payload: bytes, prefix: bytes) -> bytes:
    """A file with every checksum and length of the preamble recomputed (the version fields taken from prefix)."""
    head = prefix[:12] + struct.pack("<IQ32s", len(header_bytes), len(payload), hashlib.sha256(payload).digest())
    return head + hashlib.sha256(head + header_bytes).digest() + header_bytes + payload


def parts(data: bytes) -> tuple[bytes, bytes]:
    header_length = struct.unpack_from("<I", data, 12)[0]
    return data[PREAMBLE_SIZE : PREAMBLE_SIZE + header_length], data[PREAMBLE_SIZE + header_length :]


# ------------------------------------------------------------------------------------------------------------------
# Blind damage: exhaustive on one file, random on all
# ------------------------------------------------------------------------------------------------------------------


def test_every_truncation_is_detected():
    for which, data in enumerate(FILES):
        for cut in range(len(data)):
            result = outcome(data[:cut])
            assert isinstance(result, FormatError), cut


def test_every_single_byte_flip_is_detected():
    data = FILES[0]
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        assert isinstance(outcome(bytes(damaged)), FormatError), position


@st.composite
def edits_of(draw, length: int, *, min_size: int, max_size: int, replacement=st.integers(0, 255)):
    """Positions anywhere in ``[0, length)`` (drawn as integers: floats in [0, 1) cluster at 0) and new values."""
    if length == 0:
        return []
    return draw(st.lists(st.tuples(st.integers(0, length - 1), replacement), min_size=min_size, max_size=max_size))


@fuzz(1200)
@given(data=st.data(), which=st.integers(0, len(FILES) - 1))
def test_random_byte_replacements(data, which):
    damaged = bytearray(FILES[which])
    for where, value in data.draw(edits_of(len(damaged), min_size=1, max_size=8)):
        damaged[where] = value
    check_blind_damage(bytes(damaged), which)


@fuzz(400)
@given(data=st.data(), which=st.integers(0, len(FILES) - 1), tail=st.binary(max_size=16))
def test_truncation_with_damage_and_garbage_tails(data, which, tail):
    damaged = bytearray(FILES[which][: data.draw(st.integers(0, len(FILES[which]) - 1))])
    for where, value in data.draw(edits_of(len(damaged), min_size=0, max_size=4)):
        damaged[where] = value
    check_blind_damage(bytes(damaged) + tail, which)


# ------------------------------------------------------------------------------------------------------------------
# Crafted damage: checksums recomputed, so the parser, validator and coders see it
# ------------------------------------------------------------------------------------------------------------------


@fuzz(800)
@given(data=st.data(), which=st.integers(0, len(FILES) - 1))
def test_crafted_header_bytes(data, which):
    header, payload = parts(FILES[which])
    header = bytearray(header)
    edits = data.draw(edits_of(len(header), min_size=1, max_size=4, replacement=st.binary(max_size=3)))
    for i, replacement in sorted(edits, reverse=True):  # one byte -> 0..3 bytes: shifts lengths and offsets too
        header[i : i + 1] = replacement
    check_crafted(reassemble(bytes(header), payload, FILES[which]), which)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.sampled_from(["Z", "E8", "f16", "lattice-int", "float16", "bz2-v1", "0" * 16]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


@fuzz(600)
@given(data=st.data(), which=st.integers(0, len(FILES) - 1), value=json_values, delete=st.booleans())
def test_crafted_header_values(data, which, value, delete):
    header_bytes, payload = parts(FILES[which])
    header = json.loads(decompress_header(header_bytes, C.MAX_HEADER_LENGTH))  # written back as plain JSON
    paths = list(_paths(header))[1:]
    path = paths[data.draw(st.integers(0, len(paths) - 1))]
    parent = header
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    check_crafted(reassemble(json.dumps(header).encode(), payload, FILES[which]), which)


@fuzz(600)
@given(data=st.data(), which=st.integers(0, len(FILES) - 1))
def test_crafted_payload_bytes(data, which):
    """Garbage inside sections with every checksum fixed up: the index coders and codebook decoders must contain it."""
    header_bytes, payload = parts(FILES[which])
    payload = bytearray(payload)
    for where, value in data.draw(edits_of(len(payload), min_size=1, max_size=6)):
        payload[where] = value
    result = outcome(reassemble(header_bytes, bytes(payload), FILES[which]))
    if not isinstance(result, FormatError):
        for q, entry in zip(result.quantized, read_header(FILES[which])["quantized"]):
            assert q.indices.shape == (entry["indices"]["count"],)
            # lattice-coords stores no K: at most one distinct point per vector
            k = entry["indices"]["count"] if entry["codebook"]["encoding"] == "lattice-coords" else entry["indices"]["alphabet_size"]
            assert q.indices.size == 0 or int(q.indices.max()) < max(k, 1)
            if q.codebook_int is not None:  # integer codebooks are always lattice points
                assert not non_members(q.lattice, q.codebook_int).any()


@pytest.mark.parametrize("which", range(len(FILES)))
def test_pristine_files_decode(which):
    assert fingerprint(read_container(FILES[which])) == REFERENCE[which]
    assert len(set(FILES)) == len(FILES)


def test_the_corpus_holds_the_1_4_layouts_and_a_flat_correction():
    entries = read_header(FILES[4])["quantized"]
    assert struct.unpack_from("<H", FILES[4], 10)[0] == 4
    assert all(q["codebook"]["layout"].endswith("-u") for q in entries)
    assert entries[2]["codebook"]["affine"] and b'"affine":[' in FILES[4]  # stored flat


def test_the_corpus_holds_a_compressed_header():
    header, _ = parts(FILES[COMPRESSED])
    assert struct.unpack_from("<H", FILES[COMPRESSED], 10)[0] == 5 and header[:2] == b"\x00\x01"
    assert read_header(FILES[COMPRESSED])["header_json_length"] > len(header)


def test_the_files_cover_every_codebook_encoding():
    encodings = {q["codebook"]["encoding"] for f in FILES for q in read_header(f)["quantized"]}
    assert encodings == {"f32", "f16", "lattice-int", "lattice-int-coded", "lattice-coords"}
    # and the affine correction over each integer encoding
    wrapped = {q["codebook"]["encoding"] for q in read_header(FILES[3])["quantized"] if q["codebook"].get("affine")}
    assert wrapped == {"lattice-int", "lattice-int-coded", "lattice-coords"}

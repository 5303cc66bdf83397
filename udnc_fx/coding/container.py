"""The ``.udnc`` container: compressed tensors, raw tensors and the config in one checksummed file.

NumPy only (no torch), so a deployment can decode a model without PyTorch. The byte-level specification is
``docs/FORMAT.md``; this module is its reference implementation. In short::

    magic(8) | major u16 | minor u16 | header length u32 | payload length u64 | payload SHA-256 (32)
    | header SHA-256 (32) | compact JSON header | payload (index streams, codebooks, raw tensors, back to back)

(format 1.5: the header may be stored compressed by ``udnc-hcm-v1``, :mod:`~udnc_fx.coding.header_codec`)

The header is kept small because on small models it is a visible part of the file: writers omit every key that
holds its default, section offsets are never stored (sections are contiguous, in entry order) and lengths only
where they cannot be derived (coded streams). :func:`read_header` gives the header back *resolved*: defaults,
offsets and lengths filled in, so callers never need to know the defaults.

Reading never unpickles and never trusts a number from the file before checking it: every failure raises
:class:`~udnc_fx.errors.FormatError` with a ``kind`` (``bad_magic``, ``unsupported_version``, ``truncated``,
``bad_header``, ``bad_offsets``, ``checksum_mismatch``, ``bad_value``, ``unknown_codec``), and nothing else.

This module keeps the file I/O and the public entry points; the format's constants and shared rules are in
:mod:`~udnc_fx.coding.format`, the header (records, compaction, parsing, validation) in
:mod:`~udnc_fx.coding.header`, the tensor sections in :mod:`~udnc_fx.coding.payload`.

Example:
    >>> c = Container(quantized=[QuantizedTensor(...)], raw=[RawTensor("fc.bias", bias)], config={}, metadata={})
    >>> write_container("model.udnc", c)          # atomic, deterministic
    >>> read_container("model.udnc").quantized[0].indices
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

from udnc_fx.coding import lattice_coords as _lc
from udnc_fx.coding.coder_base import DEFAULT_CODER
from udnc_fx.coding.format import (
    AFFINE,
    CODERS_SINCE_MINOR_1,
    CODERS_SINCE_MINOR_4,
    COMPRESSED_HEADER_MINOR,
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_RAW_DTYPE,
    DIGESTED,
    ENCODINGS_SINCE_MINOR_2,
    FORMAT_DEFAULT_CODEBOOK_CODER,
    FORMAT_DEFAULT_CODER,
    FORMAT_DEFAULT_DITHER,
    FORMAT_VERSION,
    LATTICE_DIMENSIONS,
    MAGIC,
    MAX_SEED,
    PREAMBLE_SIZE,
    as_int,
    canonical_json,
    check_json_object,
    derived_key,
    prod,
)
from udnc_fx.coding.header import (
    Container,
    QEntry,
    QuantizedTensor,
    RawTensor,
    bad_header,
    compact_header,
    compact_raw,
    parse_preamble,
    pick_file_codebook,
    pick_file_coder,
    read_header_from,
    resolved_header,
    validate_header,
)
from udnc_fx.coding.header_codec import compress_header as _compress_header
from udnc_fx.coding.limits import DEFAULT_MAX_HEADER_LENGTH, MAX_HEADER_LENGTH
from udnc_fx.coding.payload import (
    check_payload_digest, check_threads, check_workers, decode_payload, decode_sections, encode_quantized, encode_raw,
    in_threads, points_bound,
    weights_bar,
)
from udnc_fx.coding.tempfiles import create_temp, fsync_dir, remove_stale_temps
from udnc_fx.errors import FormatError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "PREAMBLE_SIZE",
    "MAX_HEADER_LENGTH",
    "DEFAULT_MAX_HEADER_LENGTH",
    "DEFAULT_MAX_ELEMENTS",
    "LATTICE_DIMENSIONS",
    "DEFAULT_CODER",
    "FORMAT_DEFAULT_CODER",
    "FORMAT_DEFAULT_CODEBOOK_CODER",
    "FORMAT_DEFAULT_DITHER",
    "derived_key",
    "QuantizedTensor",
    "RawTensor",
    "Container",
    "encode_container",
    "write_container",
    "decode_container",
    "read_container",
    "iter_container",
    "read_header",
    "section_sizes",
]


def encode_container(
    container: Container,
    *,
    raw_float_dtype: str = "float32",
    codebook_float_dtype: str = "float32",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    progress: bool | None = None,
    threads: int = 1,
    compress_header: bool = False,
) -> bytes:
    """Serialises ``container`` to the ``.udnc`` bytes (see ``docs/FORMAT.md``). Identical inputs give identical bytes.

    Integer codebooks (``codebook_int``) are stored in fixed-width bytes or entropy-coded, whichever is smaller.

    Args:
        container: what to store.
        raw_float_dtype: ``"float32"`` keeps every raw tensor's dtype; ``"float16"`` stores float32 raw tensors as
            float16 (recorded; the reader returns them as float32 holding the float16 values). Other dtypes are
            always stored as they are.
        codebook_float_dtype: ``"float32"`` or ``"float16"`` for float codebooks (``codebook_int`` overrides it).
        max_elements: refuse to write what a default reader would refuse to read.
        progress: a bar over the coded weights (``udnc_fx.progress``: ``None`` draws it on a terminal only).
        threads: quantized tensors coded side by side by this many threads (at most this many in flight); the bytes
            are the same for every count.
        compress_header: store the header compressed (``udnc-hcm-v1``, format 1.5) when that makes it shorter
            (what :func:`udnc_fx.save` does). ``False`` (default) writes the plain JSON header and the lowest minor
            version that reads the file, byte for byte as before 1.5.

    Returns:
        The file's bytes.

    Raises:
        FormatError: ``bad_value`` for an inconsistent or out-of-range field, ``unknown_codec`` for an unknown
            coder or a dtype the format cannot hold.
    """
    parts: list[bytes] = []
    prefix, _ = _encode_to(
        container, parts.append, raw_float_dtype=raw_float_dtype, codebook_float_dtype=codebook_float_dtype,
        max_elements=max_elements, progress=progress, threads=threads, compress_header=compress_header,
    )
    return prefix + b"".join(parts)


def _encode_to(
    container: Container,
    write: Callable[[bytes], Any],
    *,
    raw_float_dtype: str,
    codebook_float_dtype: str,
    max_elements: int,
    progress: bool | None,
    threads: int = 1,
    compress_header: bool = False,
) -> tuple[bytes, int]:
    """Encodes ``container`` one tensor at a time, handing each section to ``write`` as soon as it is coded (the
    payload, in file order), and returns ``(prefix, payload length)``: the preamble and header, which precede the
    payload in the file but depend on all of it (lengths, digest). :func:`encode_container` and
    :func:`write_container` share it, so bytes in memory and bytes on disk are the same bytes."""
    if raw_float_dtype not in ("float32", "float16"):
        raise FormatError("bad_value", f"raw_float_dtype must be 'float32' or 'float16', got {raw_float_dtype!r}")
    if codebook_float_dtype not in ("float32", "float16"):
        raise FormatError(
            "bad_value", f"codebook_float_dtype must be 'float32' or 'float16', got {codebook_float_dtype!r}"
        )
    if not isinstance(container, Container):
        raise FormatError("bad_value", f"expected a Container, got {type(container).__name__}")
    check_json_object(container.config, "config")
    check_json_object(container.metadata, "metadata")
    seed = as_int(container.seed, "seed")
    if not 0 <= seed < MAX_SEED:
        raise FormatError("bad_value", f"seed must be in [0, 2^64), got {seed}")

    digest = hashlib.sha256()
    payload_length = 0

    def emit(data: bytes) -> None:
        nonlocal payload_length
        if data:
            digest.update(data)
            write(data)
            payload_length += len(data)

    names: set[str] = set()
    total_elements = 0
    quantized_entries = []
    bar = weights_bar(container.quantized, "coding", progress)
    # ``threads`` tensors coded side by side (their sections emitted in file order: the same bytes for every count)
    coded = in_threads(list(container.quantized), lambda q: encode_quantized(q, codebook_float_dtype, max_elements),
                       min(check_threads(threads), max(1, len(container.quantized))))
    for _, (entry, indices_bytes, codebook_bytes) in coded:
        bar.update(entry["indices"]["count"] * entry["n"])
        total_elements += prod(entry["shape"], max_elements) + points_bound(entry) * entry["n"]
        if entry["fqn"] in names:
            raise FormatError("bad_value", f"duplicate tensor name {entry['fqn']!r}")
        names.add(entry["fqn"])
        emit(indices_bytes)
        emit(codebook_bytes)
        del indices_bytes, codebook_bytes  # one tensor's sections at a time
        quantized_entries.append(entry)
    raw_entries = []
    for r in container.raw:
        entry, data = encode_raw(r, raw_float_dtype)
        total_elements += prod(entry["shape"], max_elements)
        if entry["name"] in names:
            raise FormatError("bad_value", f"duplicate tensor name {entry['name']!r}")
        names.add(entry["name"])
        emit(data)
        del data
        raw_entries.append(entry)
    bar.close()
    if total_elements > max_elements:
        raise FormatError("bad_value", f"the container holds more than {max_elements} elements")

    header = {
        "coder": pick_file_coder([e["indices"]["coder"] for e in quantized_entries]),
        "codebook_encoding": pick_file_codebook([e["codebook"] for e in quantized_entries]),
        "seed": seed,
        "raw_float16": any(e.get("source_dtype") == DEFAULT_RAW_DTYPE for e in raw_entries),
        "quantized": quantized_entries,
        "raw": raw_entries,
        "config": container.config,
        "metadata": container.metadata,
    }
    header_bytes = canonical_json(compact_header(header))
    if len(header_bytes) > MAX_HEADER_LENGTH:
        raise FormatError("bad_header", f"the header would be {len(header_bytes)} bytes (limit {MAX_HEADER_LENGTH})")
    compressed = _compress_header(header_bytes) if compress_header else header_bytes
    if len(compressed) < len(header_bytes):
        header_bytes = compressed
    else:
        compressed = None
    if any(e["indices"]["coder"] in CODERS_SINCE_MINOR_4 for e in quantized_entries) or any(
        e["codebook"]["encoding"] == _lc.ENCODING and _lc.uses_own_dither(e["codebook"].get("layout"))
        for e in quantized_entries
    ):
        minor = 4
    elif any(e["codebook"].get("affine") is not None for e in quantized_entries):
        minor = 3
    elif any(e["codebook"]["encoding"] in ENCODINGS_SINCE_MINOR_2 for e in quantized_entries):
        minor = 2
    else:
        minor = 1 if any(e["indices"]["coder"] in CODERS_SINCE_MINOR_1 for e in quantized_entries) else 0
    if compressed is not None:
        minor = COMPRESSED_HEADER_MINOR
    head = DIGESTED.pack(MAGIC, FORMAT_VERSION[0], minor, len(header_bytes), payload_length, digest.digest())
    head_digest = hashlib.sha256(head + header_bytes).digest()
    return head + head_digest + header_bytes, payload_length


#: Bytes per read when a streamed payload is copied or hashed: large enough for full-speed I/O, small next to a model.
_IO_CHUNK = 1 << 20


def _chunks(handle: Any, length: int) -> Iterator[memoryview]:
    """The next ``length`` bytes of ``handle`` in chunks of at most :data:`_IO_CHUNK`, read into one reused buffer
    (a plain ``read(n)`` allocates ``n`` bytes each time). Each chunk is valid until the next one is read.

    Raises:
        FormatError: ``truncated`` when the file ends first.
    """
    buffer = bytearray(min(length, _IO_CHUNK))
    view = memoryview(buffer)
    left = length
    while left:
        got = handle.readinto(view[: min(left, len(buffer))])
        if not got:
            raise FormatError("truncated", f"the payload is {length} bytes, read {length - left}")
        left -= got
        yield view[:got]


def write_container(
    path_or_file: Any,
    container: Container,
    *,
    raw_float_dtype: str = "float32",
    codebook_float_dtype: str = "float32",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    progress: bool | None = None,
    threads: int = 1,
    compress_header: bool = False,
) -> int:
    """Writes ``container`` to a path (atomically) or to a binary file object.

    A path is written without ever holding the payload in memory: each tensor's sections go to a temporary file as
    they are coded; the preamble and header (which hold the payload's length and digest) then go to a second
    temporary file, followed by a copy of the payload; that one is flushed to disk and renamed over the target
    (``os.replace``), so readers see the old file or the new one, never a partial one. Both temporary files live
    in the target's directory (hidden names, removed on failure; ones a killed writer left are removed by the
    next write of the same target). A file object is written as is. Options are those of
    :func:`encode_container`; the bytes are the same.

    Returns:
        The number of bytes written.
    """
    options = dict(
        raw_float_dtype=raw_float_dtype, codebook_float_dtype=codebook_float_dtype, max_elements=max_elements,
        progress=progress, threads=threads, compress_header=compress_header,
    )
    if hasattr(path_or_file, "write") and not isinstance(path_or_file, (str, bytes, os.PathLike)):
        data = encode_container(container, **options)
        path_or_file.write(data)
        return len(data)
    path = os.fspath(path_or_file)
    directory, base = os.path.split(os.path.abspath(path))
    remove_stale_temps(directory, base)  # full-size leftovers of a save that was killed before its rename
    payload_fd, payload_tmp = create_temp(directory, base)
    tmp = None
    try:
        with os.fdopen(payload_fd, "wb") as payload_file:  # holds the temp file's writer lock until closed
            prefix, payload_length = _encode_to(container, payload_file.write, **options)
            payload_file.flush()
            fd, tmp = create_temp(directory, base)
            with os.fdopen(fd, "wb") as out, open(payload_tmp, "rb", buffering=0) as payload_in:
                out.write(prefix)
                for chunk in _chunks(payload_in, payload_length):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
        tmp = None
    finally:
        for leftover in (payload_tmp, tmp):
            if leftover is not None:
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
    fsync_dir(directory)  # make the rename itself durable
    return len(prefix) + payload_length


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def _guarded(fn, *args):
    """Runs a parsing step; any exception that is not a FormatError is a bug, reported as one."""
    try:
        return fn(*args)
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError("bad_value", f"unexpected {type(exc).__name__} while reading: {exc}") from exc


def _checked_header(prefix: bytes, read_header_bytes, size: int, max_elements: int, max_header_length: int,
                    check_header: Any):
    """The preamble (from ``prefix``), the header (``read_header_bytes(length)``), every header check, then
    ``check_header`` on the resolved header: the steps every reader takes before it reads any payload."""
    preamble = _guarded(parse_preamble, prefix, size, max_header_length)
    header_bytes = read_header_bytes(preamble.header_length)
    _, header = _guarded(read_header_from, prefix, header_bytes, size, max_elements, max_header_length)
    if check_header is not None:  # outside _guarded: the caller's own errors (model_mismatch...) pass as they are
        check_header(_guarded(resolved_header, preamble, header))
    return preamble, header


def _read(
    source: Any, max_elements: int, max_header_length: int, check_header: Any, progress: bool | None = None
) -> Container:
    """Preamble and header first (bounded by ``max_header_length``), then ``check_header`` on the resolved header,
    and only then the payload: a caller that knows what the file must hold refuses it before anything is decoded
    (or, for a path, before the payload is even read)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        size = len(view)
        prefix = bytes(view[:PREAMBLE_SIZE])
        read_header_bytes = lambda length: bytes(view[PREAMBLE_SIZE : PREAMBLE_SIZE + length])  # noqa: E731
        read_payload = lambda preamble: view[PREAMBLE_SIZE + preamble.header_length :]  # noqa: E731
        handle = None
    else:
        handle = _open_regular(source) if isinstance(source, (str, os.PathLike)) else source
        if not hasattr(handle, "read"):
            raise TypeError(f"read_container needs a path, bytes or a binary file, got {type(source).__name__}")
        try:
            size = os.fstat(handle.fileno()).st_size - handle.tell()
        except (AttributeError, OSError, ValueError):  # a file object without a descriptor: read it whole
            data = handle.read()
            return _read(data, max_elements, max_header_length, check_header, progress)
        prefix = handle.read(PREAMBLE_SIZE)
        read_header_bytes = handle.read
        read_payload = lambda pre: memoryview(handle.read(size - PREAMBLE_SIZE - pre.header_length))  # noqa: E731
    try:
        preamble, header = _checked_header(prefix, read_header_bytes, size, max_elements, max_header_length,
                                           check_header)
        payload = read_payload(preamble)
        if len(payload) != preamble.payload_length:
            raise FormatError("truncated", f"the payload is {preamble.payload_length} bytes, read {len(payload)}")
        return _guarded(decode_payload, preamble, header, payload, progress)
    finally:
        if handle is not None and handle is not source:
            handle.close()


def decode_container(
    data: bytes | bytearray | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_header_length: int = DEFAULT_MAX_HEADER_LENGTH,
    check_header: Any = None,
    progress: bool | None = None,
) -> Container:
    """Decodes ``.udnc`` bytes, with every check of ``docs/FORMAT.md``. Arguments as :func:`read_container`.

    Raises:
        FormatError: and no other exception, whatever the bytes.
    """
    return _read(data, max_elements, max_header_length, check_header, progress)


def read_container(
    path_or_bytes: Any,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_header_length: int = DEFAULT_MAX_HEADER_LENGTH,
    check_header: Any = None,
    progress: bool | None = None,
) -> Container:
    """Reads a ``.udnc`` file (a path, bytes, or a binary file object) and decodes everything.

    Quantized tensors come back with ``indices`` in the narrowest unsigned dtype that holds K; float codebooks as
    float32 (``f16`` widened exactly); integer codebooks (``lattice-int``, ``lattice-int-coded``) as
    ``codebook_int`` (int64) with ``codebook=None``. Raw tensors come back in their stored dtype, except float32
    tensors stored as float16, which come back as float32. Arrays are writable copies.

    An entropy-coded stream can legitimately be far smaller than what it decodes to (a constant stream costs a few
    bytes), so the file's size cannot bound the work; a caller that knows what the file must hold (a model) passes
    ``check_header`` and tight limits, and the payload is neither read nor decoded unless the header passes.

    Args:
        path_or_bytes: a path (str or ``os.PathLike``), ``bytes``/``bytearray``/``memoryview``, or a binary file.
        max_elements: refuse a file whose tensors and codebooks decode to more elements than this, in all
            (``bad_value``).
        max_header_length: refuse a header longer than this many bytes (``bad_value``); the format allows up to
            ``MAX_HEADER_LENGTH``.
        check_header: called with the resolved header (as :func:`read_header` returns it) after every header check
            and before the payload is read; it raises to refuse the file. Its exceptions propagate unchanged.
        progress: a bar over the decoded weights (``udnc_fx.progress``: ``None`` draws it on a terminal only).

    Raises:
        FormatError: for any defect of the content (never another exception type for bad bytes). ``OSError``
            for a file that cannot be opened.
    """
    return _read(path_or_bytes, max_elements, max_header_length, check_header, progress)


def iter_container(
    path: Any,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_header_length: int = DEFAULT_MAX_HEADER_LENGTH,
    check_header: Any = None,
    progress: bool | None = None,
    workers: int = 1,
    threads: int = 1,
) -> Iterator[QuantizedTensor | RawTensor]:
    """Reads a ``.udnc`` file tensor by tensor: the quantized tensors, then the raw ones, each decoded as it is
    needed, so a caller that puts each one where it belongs (``udnc_fx.load``) never holds the payload or a list
    of decoded arrays. Same checks, in the same order, as :func:`read_container`: the preamble and header (then
    ``check_header``) before anything else, and the payload's digest, computed over the file in chunks, before the
    first tensor is decoded. Config, metadata and seed are in the header ``check_header`` receives.

    Args:
        path: a path (str or ``os.PathLike``) to a regular file.
        max_elements, max_header_length, check_header, progress: as for :func:`read_container`.
        workers: processes decoding the quantized tensors side by side (1: in this process); at most ``workers``
            tensors are in flight. The tensors and their order are the same for every count.
        threads: threads decoding the quantized tensors side by side (with ``workers == 1``); at most ``threads``
            tensors in flight; the same tensors in the same order for every count.

    Yields:
        :class:`QuantizedTensor` and :class:`RawTensor` objects, in file order, as :func:`read_container` gives them.

    Raises:
        FormatError: for any defect of the content; ``truncated`` if the file shrinks while it is read. ``OSError``
            for a file that cannot be opened.
    """
    check_workers(workers)
    check_threads(threads)
    with _open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        preamble, header = _checked_header(handle.read(PREAMBLE_SIZE), handle.read, size, max_elements,
                                           max_header_length, check_header)
        start = PREAMBLE_SIZE + preamble.header_length
        digest = hashlib.sha256()
        for chunk in _chunks(handle, preamble.payload_length):
            digest.update(chunk)
        _guarded(check_payload_digest, preamble, digest.digest())

        def section_bytes(section) -> bytes:
            handle.seek(start + section.offset)
            data = handle.read(section.length)
            if len(data) != section.length:
                raise FormatError("truncated", f"{section.where}: read {len(data)} of its {section.length} bytes")
            return data

        tensors = decode_sections(header, section_bytes, progress, workers, threads)
        while (tensor := _guarded(next, tensors, None)) is not None:  # a decoder's bug is a FormatError, as in _read
            yield tensor


def read_header(
    path_or_bytes: Any, *, max_elements: int = DEFAULT_MAX_ELEMENTS, max_header_length: int = DEFAULT_MAX_HEADER_LENGTH
) -> dict:
    """Reads and checks the preamble and the header only; the payload is neither read nor decoded.

    Every header-level check of ``docs/FORMAT.md`` is made (digest, types, values, layout, that the file is as
    long as the preamble says); the payload digest and the decoding of streams are not. The work is linear in the
    header's length, which ``max_header_length`` caps (default 4 MiB; ``bad_value`` beyond).

    Returns:
        The header *resolved*: the stored JSON (unknown keys kept) with every omitted key filled with its default
        (``coder``, ``n``, ``key``, ``dither``, ``zero_index``, ``meta``, raw ``dtype``, ...), each section's
        ``offset`` and ``length`` (``indices``, ``codebook``, a raw entry's ``data``), each index stream's
        ``count``, and three keys from the preamble: ``header_length``, ``payload_length`` and ``payload_sha256``
        (hex). :func:`section_sizes` takes it as it is.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        view = memoryview(path_or_bytes).cast("B")
        return _guarded(_header_from_buffer, view, max_elements, max_header_length)
    with _open_regular(path_or_bytes) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(PREAMBLE_SIZE)
        preamble = _guarded(parse_preamble, prefix, size, max_header_length)
        header_bytes = f.read(preamble.header_length)
    return _guarded(
        lambda: resolved_header(*read_header_from(prefix, header_bytes, size, max_elements, max_header_length))
    )


def _open_regular(path: Any):
    """Opens ``path`` for reading only if it is a regular file: a FIFO would block the reader forever and a device
    (``/dev/zero``) never ends. Opened non-blocking, checked, then switched back to blocking reads."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError("bad_value", f"{os.fspath(path)!s}: not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _header_from_buffer(view: memoryview, max_elements: int, max_header_length: int) -> dict:
    prefix = bytes(view[:PREAMBLE_SIZE])
    preamble = parse_preamble(prefix, len(view), max_header_length)
    header_bytes = bytes(view[PREAMBLE_SIZE : PREAMBLE_SIZE + preamble.header_length])
    return resolved_header(*read_header_from(prefix, header_bytes, len(view), max_elements, max_header_length))


def _unresolve_raw(header: dict) -> dict:
    """``header`` with resolved raw entries (objects, from :func:`read_header`) back in their stored array form."""
    raws = header.get("raw")
    if not isinstance(raws, list) or not any(isinstance(r, dict) for r in raws):
        return header
    out = dict(header)
    out["raw"] = [
        compact_raw(r) if isinstance(r, dict) and "name" in r and "shape" in r else r for r in raws
    ]
    return out


def _unresolve_affine(header: dict) -> dict:
    """``header`` with each resolved ``affine`` correction back in the place the file stores it: read_header puts
    ``[a, b]`` in every codebook, but only a lattice-coords entry of a ``-u`` layout keeps it flat (format 1.4);
    every other entry stores the 1.3 wrapper ``{"encoding": "affine", "a", "b", "points"}``. A malformed value is
    left as it is, for the validation to refuse."""
    entries = header.get("quantized")
    if not isinstance(entries, list):
        return header
    unresolved = []
    for q in entries:
        cb = q.get("codebook") if isinstance(q, dict) else None
        affine = cb.get("affine") if isinstance(cb, dict) else None
        flat = isinstance(cb, dict) and cb.get("encoding") == _lc.ENCODING and _lc.uses_own_dither(cb.get("layout"))
        if not isinstance(affine, list) or len(affine) != 2 or flat:
            unresolved.append(q)
            continue
        points = {k: v for k, v in cb.items() if k != "affine"}
        unresolved.append({**q, "codebook": {"encoding": AFFINE, "a": affine[0], "b": affine[1], "points": points}})
    return {**header, "quantized": unresolved}


def section_sizes(header: dict) -> dict:
    """Attributes every byte of a file to a tensor or to the shared overhead, for honest compression ratios.

    Each tensor's header share is the compact JSON of its entry (as the writer stores it) plus the comma that
    separates it from the previous one (for a compressed header, format 1.5: that JSON's share of the header's JSON,
    times the stored header's length, rounded down); a quantized tensor also owns its index and codebook sections, a raw tensor
    its data. The shared overhead is the preamble plus the rest of the header (config, metadata, top-level keys).
    ``shared.total + sum(t.total) == file`` always; for a file this module wrote, every share is exact.

    Args:
        header: a header as returned by :func:`read_header` (a stored, unresolved header works too).

    Returns:
        ``{"tensors": {name: {"kind": "quantized", "indices": b, "codebook": b, "header": b, "total": b} or
        {"kind": "raw", "data": b, "header": b, "total": b}}, "shared": {"preamble": 88, "header": b, "total": b},
        "file": b}``.
    """
    if not isinstance(header, dict):
        raise bad_header("section_sizes needs a header dict")
    return _guarded(_section_sizes, header)


def _section_sizes(header: dict) -> dict:
    parsed = validate_header(_unresolve_affine(_unresolve_raw(header)), DEFAULT_MAX_ELEMENTS)
    stored = compact_header(parsed.resolved())
    header_length = header.get("header_length")
    if isinstance(header_length, bool) or not isinstance(header_length, int):
        header_length = len(canonical_json(stored))
    json_length = header.get("header_json_length", header_length)
    if isinstance(json_length, bool) or not isinstance(json_length, int) or json_length <= 0:
        json_length = header_length
    tensors: dict[str, dict[str, Any]] = {}
    attributed = 0
    for entries, compact in ((parsed.quantized, stored.get("quantized", [])), (parsed.raws, stored.get("raw", []))):
        for i, (e, c) in enumerate(zip(entries, compact)):
            share = len(canonical_json(c)) + (1 if i else 0)
            if json_length != header_length:  # a compressed header: each entry's share of the stored bytes
                share = share * header_length // json_length
            attributed += share
            if isinstance(e, QEntry):
                sizes: dict[str, Any] = {"kind": "quantized", "indices": e.indices.length}
                sizes["codebook"] = e.codebook.length
                name = e.fqn
            else:
                sizes = {"kind": "raw", "data": e.data.length}
                name = e.name
            sizes["header"] = share
            sizes["total"] = sum(v for k, v in sizes.items() if k != "kind")
            tensors[name] = sizes
    shared_header = header_length - attributed
    return {
        "tensors": tensors,
        "shared": {"preamble": PREAMBLE_SIZE, "header": shared_header, "total": PREAMBLE_SIZE + shared_header},
        "file": PREAMBLE_SIZE + header_length + parsed.payload_length,
    }

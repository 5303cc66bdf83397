"""The files of an ONNX export: the sidecar's name, reading files named by an untrusted ONNX file, and writing the
ONNX file and its sidecar as one atomic pair.

The sidecar is named after the ONNX file and its own content: ``model.onnx`` → ``model.onnx.<16 hex>.udnc``, the hex
being the start of the sidecar's SHA-256 (which the ONNX file records in full). So

* it never takes the name a user gives a model container (``model.udnc``), and ``to_onnx`` never replaces a file it
  did not write;
* a new export writes its sidecar under a new name, then renames the new ONNX file over the old one (one atomic
  step that switches from the old pair to the new pair), then removes the old sidecar: a kill at any moment leaves
  the old pair or the new pair on disk, both loadable;
* exporting the same model twice gives the same names and bytes.

A name recorded in an ONNX file is only trusted as a plain file name beside it (:func:`check_sidecar_name`), and a
file read on an ONNX file's say is opened without blocking, must be a regular file, and must fit a size bound the
caller computes from the tensor table before anything is read (:func:`read_regular_file`).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat

from ..coding.tempfiles import fsync_dir, write_temp
from ..errors import ExportError, FormatError

__all__ = ["sidecar_name", "check_sidecar_name", "read_regular_file", "write_pair", "check_replaceable"]

#: Hex digits of the sidecar's SHA-256 in its name: 64 bits, enough that two exports never collide by chance.
NAME_HASH_HEX = 16
SIDECAR_SUFFIX = ".udnc"
#: Largest file this module reads: protobuf cannot hold more than 2 GiB, a sidecar is smaller than its ONNX model.
MAX_FILE_BYTES = 2**31


def sidecar_name(onnx_path, sidecar_sha256: str) -> str:
    """``model.onnx`` and the sidecar's SHA-256 → ``model.onnx.<first 16 hex digits>.udnc`` (a plain file name)."""
    return f"{os.path.basename(os.fspath(onnx_path))}.{sidecar_sha256[:NAME_HASH_HEX]}{SIDECAR_SUFFIX}"


def check_sidecar_name(name, onnx_path) -> str:
    """``name`` if it is a plain file name (no directory part, not ``.``/``..``, no NUL, at most 255 characters).

    Raises:
        FormatError: ``bad_header``, naming the ONNX file that recorded it.
    """
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and name not in (".", "..")
        and not any(c in name for c in ("/", "\\", "\0", ":"))
        and not os.path.isabs(name)
        and os.path.basename(name) == name
    )
    if not ok:
        raise FormatError(
            "bad_header",
            f"{os.fspath(onnx_path)}: the recorded sidecar name {str(name)[:80]!r} is not a plain file name "
            "beside the ONNX file (no directories, no '..'): refusing to read it",
        )
    return name


def read_regular_file(path, max_bytes: int, what: str, *, missing_kind: str = "missing_file") -> bytes:
    """The bytes of ``path`` if it is a regular file (symbolic links to one included) of at most ``max_bytes``.

    The file is opened non-blocking (a FIFO named by a hostile file neither hangs nor is read) and checked with
    ``fstat`` on the open descriptor before a byte is read.

    Raises:
        FormatError: ``missing_kind`` when it does not exist or cannot be opened; ``bad_value`` when it is not a
            regular file or is larger than ``max_bytes``.
    """
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FormatError(missing_kind, f"{what} {path} does not exist") from None
    except OSError as exc:
        raise FormatError(missing_kind, f"cannot open {what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError("bad_value", f"{what} {path} is not a regular file: refusing to read it")
        if st.st_size > max_bytes:
            raise FormatError(
                "bad_value", f"{what} {path} has {st.st_size} bytes, more than the {max_bytes} it can need"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise FormatError(missing_kind, f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while we read it
        raise FormatError("bad_value", f"{what} {path} is larger than the {max_bytes} bytes it can need")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _checkpoint(step: str) -> None:
    """Called between the steps of :func:`write_pair`; the tests replace it to kill the writer at each step."""


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _onnx_props(data: bytes) -> dict[str, str] | None:
    """The ``metadata_props`` of ONNX bytes, or ``None`` when they are not an ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError, TypeError):
        return None
    return {p.key: p.value for p in model.metadata_props}


def check_replaceable(path) -> str | None:
    """Refuse to export onto ``path`` unless nothing is there or it is an ONNX file ``to_onnx`` wrote.

    Returns:
        The path of that earlier export's sidecar when it is still the one the earlier ONNX file recorded (same
        SHA-256), so that :func:`write_pair` removes it once the new pair is in place; else ``None``.

    Raises:
        ExportError: ``path`` is a directory, not a regular file, or a file ``to_onnx`` did not write.
    """
    from .runtime import KEY_FORMAT, KEY_SIDECAR, KEY_SIDECAR_SHA

    path = os.fspath(path)
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path):
        raise ExportError(f"{path} is a directory: give the ONNX file's path (e.g. {os.path.join(path, 'model.onnx')})")
    try:
        data = read_regular_file(path, MAX_FILE_BYTES, "existing file")
    except FormatError:
        data = None
    props = _onnx_props(data) if data is not None else None
    if props is None or not props.get(KEY_FORMAT, "").startswith("udnc-onnx-"):
        raise ExportError(
            f"{path} exists and is not an ONNX file written by to_onnx: refusing to replace it "
            "(remove it or choose another path)"
        )
    name = props.get(KEY_SIDECAR)
    if name is None:
        return None
    try:
        check_sidecar_name(name, path)
    except FormatError:
        return None
    old = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    try:
        old_data = read_regular_file(old, MAX_FILE_BYTES, "old sidecar")
    except FormatError:
        return None
    return old if hashlib.sha256(old_data).hexdigest() == props.get(KEY_SIDECAR_SHA) else None


def _remove_leftovers(directory: str, onnx_base: str, keep: set[str]) -> None:
    """Remove what an export to ``onnx_base`` killed midway left behind: its temporary files, and sidecars named
    for this ONNX file whose header says they were written for it but that no ONNX file there names (``keep``)."""
    from ..coding.container import read_header
    from .runtime import SIDECAR_META_KEY

    temp = re.compile(r"\." + re.escape(onnx_base) + r"(\.[0-9a-f]{%d}\.udnc)?\.[0-9a-f]{12}\.tmp" % NAME_HASH_HEX)
    orphan = re.compile(re.escape(onnx_base) + r"\.[0-9a-f]{%d}\.udnc" % NAME_HASH_HEX)
    try:
        names = os.listdir(directory)
    except OSError:  # pragma: no cover
        return
    for name in names:
        full = os.path.join(directory, name)
        if temp.fullmatch(name) and os.path.isfile(full) and not os.path.islink(full):
            _unlink_quietly(full)
        elif orphan.fullmatch(name) and full not in keep and os.path.isfile(full) and not os.path.islink(full):
            try:
                meta = read_header(full).get("metadata", {}).get(SIDECAR_META_KEY)
            except Exception:  # not a container of ours: leave it alone
                continue
            if isinstance(meta, dict) and meta.get("onnx_file") == onnx_base:
                _unlink_quietly(full)


def write_pair(path, onnx_data: bytes, sidecar: tuple[str, bytes] | None, old_sidecar: str | None) -> str | None:
    """Write an export: ``sidecar`` (``(name, bytes)`` or ``None``) beside ``path``, then ``onnx_data`` at ``path``.

    Steps: the sidecar is written to a temporary file, flushed and renamed to its (new) content-addressed name;
    the ONNX file is written to a temporary file, flushed and renamed over ``path`` -- the one step that switches
    from the old pair to the new one --; then the old pair's sidecar ``old_sidecar`` (from
    :func:`check_replaceable`) is removed, with any leftovers of an earlier interrupted export.

    Returns:
        The sidecar's path, or ``None``.

    Raises:
        ExportError: a file cannot be written (nothing of the old pair is lost), or the sidecar's name is taken by a
            different file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    sidecar_path = created = None
    try:
        if sidecar is not None:
            name, data = sidecar
            sidecar_path = os.path.join(directory, name)
            if os.path.lexists(sidecar_path):
                try:
                    same = read_regular_file(sidecar_path, len(data), "file") == data
                except FormatError:
                    same = False
                if not same:
                    raise ExportError(f"{sidecar_path} exists and is not this export's sidecar: refusing to replace it")
            else:
                tmp = write_temp(directory, name, data)
                _checkpoint("sidecar-temp")
                try:
                    os.replace(tmp, sidecar_path)
                except BaseException:
                    _unlink_quietly(tmp)
                    raise
                created = sidecar_path
                fsync_dir(directory)
            _checkpoint("sidecar")
        tmp = write_temp(directory, base, onnx_data)
        _checkpoint("onnx-temp")
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        fsync_dir(directory)
        _checkpoint("onnx")
    except OSError as exc:
        if created is not None:  # the old ONNX file is still in place and does not name it
            _unlink_quietly(created)
        raise ExportError(f"cannot write the export {path}: {exc.strerror or exc}: {exc.filename or ''}") from exc
    if old_sidecar is not None and os.path.abspath(old_sidecar) != sidecar_path:
        _unlink_quietly(old_sidecar)
    _checkpoint("old-sidecar")
    _remove_leftovers(directory, base, {p for p in (sidecar_path,) if p})
    return sidecar_path

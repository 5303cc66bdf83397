"""The one mapping each way between a compressed weight and the container's entry for it (NumPy only).

:class:`udnc_fx.record.CompressedWeight` is what the rest of the package knows; the container's
:class:`~udnc_fx.coding.header.QuantizedTensor` is the file's view of it: the dither as a generator id plus a
key (:data:`~udnc_fx.coding.format.NO_DITHER` and key 0 when there is none, as ``docs/FORMAT.md`` writes it), the index coder and the per-tensor
``meta``. Save, load, the ONNX sidecar and ``load_onnx`` all go through these two functions, so "no dither" is
spelled ``key=None`` everywhere outside the file format.
"""

from __future__ import annotations

from typing import Any

from udnc_fx.dither import DITHER_ID
from udnc_fx.errors import ConfigError, FormatError
from udnc_fx.record import CompressedWeight

from .format import NO_DITHER
from .header import QuantizedTensor

__all__ = ["entry_from_record", "record_from_entry"]


def entry_from_record(
    record: CompressedWeight, *, fqn: str, coder: str | None = None, meta: dict[str, Any] | None = None
) -> QuantizedTensor:
    """The container entry of ``record``: its integer lattice coordinates when the record still has them (the
    writer then stores those, entropy-coded when smaller), else its float32 codebook.

    Args:
        record: the compressed weight.
        fqn: the parameter's qualified name.
        coder: the index coder's registered name (default: the container's default coder).
        meta: JSON-able per-tensor facts stored in the header (e.g. ``{"aliases": [...]}``).
    """
    kwargs = {} if coder is None else {"coder": coder}
    return QuantizedTensor(
        fqn=fqn,
        shape=record.shape,
        lattice=record.lattice,
        n=record.n,
        step=record.step,
        key=0 if record.key is None else record.key,
        dither=NO_DITHER if record.key is None else DITHER_ID,
        # the indices in their stored (narrow) dtype: the container widens one tensor at a time, so saving a large
        # model never holds 8 bytes per weight for all of them at once
        indices=record.indices,
        codebook=None if record.codebook_int is not None else record.codebook,
        codebook_int=record.codebook_int,
        zero_index=record.zero_index,
        meta=dict(meta or {}),
        affine=record.affine,
        **kwargs,
    )


def record_from_entry(q: QuantizedTensor, where: str | None = None) -> CompressedWeight:
    """The compressed weight a decoded container entry describes.

    Args:
        q: an entry as :func:`~udnc_fx.coding.container.read_container` returns it (codebook or ``codebook_int``).
        where: how error messages name the entry (default: its fqn).

    Raises:
        FormatError: ``unknown_codec`` for a dither generator this version does not know, ``bad_value`` for
            fields no compressed weight can have (an unknown lattice, integers that overflow float32 once scaled).
    """
    where = repr(q.fqn) if where is None else where
    if q.dither not in (DITHER_ID, NO_DITHER):
        raise FormatError("unknown_codec", f"{where}: unknown dither generator {str(q.dither)[:40]!r}")
    try:
        return CompressedWeight(
            indices=q.indices,
            codebook=q.codebook,
            codebook_int=q.codebook_int,  # the reader gives one of the two; both must agree bit for bit
            shape=tuple(q.shape),
            lattice=q.lattice,
            n=q.n,
            step=q.step,
            key=None if q.dither == NO_DITHER else q.key,
            zero_index=q.zero_index,
            affine=getattr(q, "affine", None),
        )
    except ConfigError as exc:
        raise FormatError("bad_value", f"{where}: {exc}") from None

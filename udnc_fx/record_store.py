"""The compression record: what a compressed model carries about how it was made, kept in one place.

A model from :func:`udnc_fx.compress` or :func:`udnc_fx.load` carries one record, a dict with

* ``"config"``: the :class:`~udnc_fx.config.CompressConfig` it was compressed with (``save`` stores from it),
* ``"changes"``: one :class:`~udnc_fx.passes.select.Change` per weight quantized, shared or skipped, and why,
* ``"trace"``: how the model was prepared (:func:`udnc_fx.passes.trace.prepare`'s note: the torch.fx trace, or the
  module-swap fallback and the reason), ``None`` when unknown,
* ``"calibration"`` (only when calibration batches or seed trials were used): what they were used for.

A ``GraphModule`` keeps it in ``gm.meta["udnc"]`` (``meta`` travels with the graph through deep copies); a model
compressed by module swap has no ``meta``, so it keeps it in the instance attribute ``_udnc_record``. Only this module
knows either place: everything else reads with :func:`compression_record` and writes with :func:`set_record`
(the whole record, once) or :func:`update_record` (a later step adding a field).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import fx, nn

from .errors import PassError

__all__ = ["compression_record", "set_record", "update_record", "clear_record", "RECORD_FIELDS"]

#: The fields a record may hold, in the order they are written.
RECORD_FIELDS = ("config", "changes", "trace", "calibration")
_META_KEY = "udnc"  # GraphModule.meta key
_ATTR = "_udnc_record"  # instance attribute of a module-swap model


def compression_record(model: nn.Module) -> dict[str, Any] | None:
    """The ``{"config", "changes", "trace"[, "calibration"]}`` record a compressed model carries, or None.

    Args:
        model: a model from :func:`udnc_fx.compress` or :func:`udnc_fx.load` (a ``GraphModule`` or, under the
            module-swap fallback, the model itself); any other module has no record.

    Returns:
        The record itself (not a copy), or ``None`` for a model that was not compressed (or was materialized).
    """
    if isinstance(model, fx.GraphModule):
        return model.meta.get(_META_KEY)
    return model.__dict__.get(_ATTR)


def set_record(
    model: nn.Module,
    *,
    config: Any,
    changes: Sequence[Any],
    trace: str | None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model``'s whole compression record (replacing any earlier one) and return it.

    Args:
        model: the compressed model (a ``GraphModule`` or a module-swap model).
        config: the ``CompressConfig`` it was compressed (or loaded) with.
        changes: the recorded decisions, one ``Change`` per weight.
        trace: how it was prepared (``prepare``'s note), or ``None`` when unknown.
        calibration: what calibration was used for; left out of the record when ``None``.
    """
    record: dict[str, Any] = {"config": config, "changes": list(changes), "trace": trace}
    if calibration is not None:
        record["calibration"] = calibration
    if isinstance(model, fx.GraphModule):
        model.meta[_META_KEY] = record
    else:
        # straight into __dict__: nn.Module.__setattr__ would do the same for a dict, but says so only implicitly
        model.__dict__[_ATTR] = record
    return record


def update_record(model: nn.Module, **fields: Any) -> dict[str, Any]:
    """Add or replace fields of ``model``'s record (a step after the pass, such as the seed choice) and return it.

    Raises:
        PassError: ``model`` has no record, or a field is not one of :data:`RECORD_FIELDS`.
    """
    record = compression_record(model)
    if record is None:
        raise PassError(f"{type(model).__name__} carries no compression record to update (compress it first)")
    unknown = sorted(set(fields) - set(RECORD_FIELDS))
    if unknown:
        raise PassError(f"unknown compression record field(s) {unknown}: the record holds {list(RECORD_FIELDS)}")
    record.update(fields)
    return record


def clear_record(model: nn.Module) -> None:
    """Remove ``model``'s record (a materialized model is plain float: nothing left to save or inspect)."""
    if isinstance(model, fx.GraphModule):
        model.meta.pop(_META_KEY, None)
    model.__dict__.pop(_ATTR, None)

"""Tests of the compression record store: one reader and one writer for graph and module-swap models alike, the
record written whole by the pass (and by load), one later addition through ``update_record``, and no record left on
a materialized model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import fx, nn

import udnc_fx
from udnc_fx import CompressConfig, PassError
from udnc_fx.api import compression_record as api_compression_record
from udnc_fx.passes.select import Change
from udnc_fx.passes.trace import FALLBACK_PREFIX, TRACED
from udnc_fx.record_store import RECORD_FIELDS, clear_record, compression_record, set_record, update_record


class Branchy(nn.Module):
    """torch.fx cannot trace it: compressed by module swap."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(-x)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def branchy() -> nn.Module:
    torch.manual_seed(0)
    return Branchy()


def both_kinds() -> list[nn.Module]:
    return [fx.symbolic_trace(mlp()), branchy()]


def test_the_public_reader_is_the_one_function():
    assert udnc_fx.compression_record is compression_record is api_compression_record


@pytest.mark.parametrize("model", both_kinds(), ids=["graph", "module"])
def test_set_then_read_back_on_either_kind_of_model(model):
    assert compression_record(model) is None
    config = CompressConfig(step=0.1)
    changes = (Change("fc.weight", "quantized", "why"),)
    record = set_record(model, config=config, changes=changes, trace="how")
    assert compression_record(model) is record
    assert list(record) == ["config", "changes", "trace"]  # no calibration field unless there is one
    assert record["config"] is config and record["changes"] == list(changes) and record["trace"] == "how"
    full = set_record(model, config=config, changes=[], trace=None, calibration={"batches": 2})
    assert compression_record(model) is full and list(full) == list(RECORD_FIELDS)


@pytest.mark.parametrize("model", both_kinds(), ids=["graph", "module"])
def test_update_adds_a_known_field_and_refuses_others(model):
    with pytest.raises(PassError, match="no compression record"):
        update_record(model, calibration={})
    set_record(model, config=CompressConfig(), changes=[], trace=TRACED)
    updated = update_record(model, calibration={"batches": 1})
    assert compression_record(model)["calibration"] == {"batches": 1} and updated is compression_record(model)
    with pytest.raises(PassError, match="unknown compression record field"):
        update_record(model, seed=3)
    assert "seed" not in compression_record(model)


@pytest.mark.parametrize("model", both_kinds(), ids=["graph", "module"])
def test_clear_removes_it(model):
    set_record(model, config=CompressConfig(), changes=[], trace=None)
    clear_record(model)
    assert compression_record(model) is None
    clear_record(model)  # nothing left: still fine


def test_compress_writes_the_whole_record_once():
    gm = udnc_fx.compress(mlp(), CompressConfig(step=0.05))
    record = compression_record(gm)
    assert isinstance(gm, fx.GraphModule) and gm.meta["udnc"] is record
    assert list(record) == ["config", "changes", "trace"] and record["trace"] == TRACED
    assert {c.fqn for c in record["changes"] if c.action == "quantized"} == {"0.weight", "2.weight"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swapped = udnc_fx.compress(branchy(), CompressConfig(step=0.05))
    record = compression_record(swapped)
    assert not isinstance(swapped, fx.GraphModule) and record["trace"].startswith(FALLBACK_PREFIX)
    assert record["config"].fallback == "auto"


def test_calibration_is_the_one_later_addition():
    x = torch.randn(16, 6)
    gm = udnc_fx.compress(mlp(), CompressConfig(target_bits=3.0), calibration=[x])
    record = compression_record(gm)
    assert list(record) == list(RECORD_FIELDS) and record["calibration"]["batches"] == 1


def test_the_record_travels_with_a_deep_copy_of_either_kind():
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = [udnc_fx.compress(make(), CompressConfig(step=0.05)) for make in (mlp, branchy)]
        for out in outs:
            twin = copy.deepcopy(out)
            assert compression_record(twin) is not None
            assert compression_record(twin)["trace"] == compression_record(out)["trace"]


@pytest.mark.parametrize("make", [mlp, branchy], ids=["graph", "module"])
def test_a_materialized_model_carries_no_record_and_the_compressed_one_keeps_its(make, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = udnc_fx.compress(make(), CompressConfig(step=0.05, fallback="auto"))
    plain = udnc_fx.materialize(out)
    assert compression_record(plain) is None
    assert compression_record(out) is not None
    with pytest.raises(udnc_fx.ConfigError, match="needs a model compressed"):
        udnc_fx.save(plain, tmp_path / "plain.udnc")
    assert not (tmp_path / "plain.udnc").exists()

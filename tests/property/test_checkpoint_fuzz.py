"""Hostile checkpoints for ``compress_checkpoint``: whatever the index or the shards hold, the answer is a
``ConfigError`` (or a good file), never another exception, and a refused checkpoint leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

safetensors_torch = pytest.importorskip("safetensors.torch")

from udnc_fx import CompressConfig, compress_checkpoint  # noqa: E402
from udnc_fx.errors import ConfigError  # noqa: E402

CONFIG = CompressConfig(relative_step=0.5)


def _checkpoint(root: Path) -> Path:
    ckpt = root / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(8, 6), "a.bias": torch.randn(8), "b.weight": torch.randn(4, 8)}
    safetensors_torch.save_file({k: state[k] for k in ("a.weight", "a.bias")}, ckpt / "s1.safetensors")
    safetensors_torch.save_file({"b.weight": state["b.weight"]}, ckpt / "s2.safetensors")
    index = {"weight_map": {"a.weight": "s1.safetensors", "a.bias": "s1.safetensors", "b.weight": "s2.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return ckpt


def _outcome(ckpt: Path, out: Path) -> None:
    try:
        compress_checkpoint(ckpt, out, CONFIG, progress=False)
    except ConfigError:
        assert sorted(os.listdir(out.parent)) == ["ckpt"]  # nothing written, no temporary file left
    else:
        assert out.stat().st_size > 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["a.weight", "a.bias", "b.weight", "c.weight", "../s1"]),
                       st.sampled_from(["s1.safetensors", "s2.safetensors", "s3.safetensors", "..", "", "/tmp/x"])
                       | json_values, max_size=4),
       st.booleans())
def test_any_weight_map_is_a_config_error_or_a_good_file(weight_map, wrap):
    root = Path(tempfile.mkdtemp(prefix="udnc-ckpt-fuzz-"))
    try:
        ckpt = _checkpoint(root)
        index = {"weight_map": weight_map} if wrap else weight_map
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        _outcome(ckpt, root / "out.udnc")
    finally:
        shutil.rmtree(root)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(["s1.safetensors", "s2.safetensors", "model.safetensors.index.json"]),
       st.integers(min_value=0, max_value=400), st.binary(min_size=0, max_size=16), st.booleans())
def test_a_damaged_shard_or_index_is_a_config_error_or_a_good_file(name, position, data, truncate):
    root = Path(tempfile.mkdtemp(prefix="udnc-ckpt-fuzz-"))
    try:
        ckpt = _checkpoint(root)
        raw = bytearray((ckpt / name).read_bytes())
        position = min(position, len(raw))
        raw = raw[:position] if truncate else raw[:position] + data + raw[position + len(data):]
        (ckpt / name).write_bytes(bytes(raw))
        _outcome(ckpt, root / "out.udnc")
    finally:
        shutil.rmtree(root)

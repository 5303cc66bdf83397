"""``udnc_fx.load(..., workers=N)``: index streams decoded by N processes give the model ``workers=1`` gives, bit for
bit; a stream that fails to decode in a worker is the same FormatError; bad counts are a ConfigError."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
from torch import nn

import udnc_fx
from udnc_fx.coding import container as C
from udnc_fx.coding import format as fmt
from udnc_fx.coding.container import iter_container
from udnc_fx.coding.header_codec import decompress_header
from udnc_fx.errors import ConfigError, FormatError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(48, 48) for _ in range(5))).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _net()
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(relative_step=0.25, seed=0))
    path = tmp_path_factory.mktemp("par") / "m.udnc"
    udnc_fx.save(gm, path, progress=False)
    return path, model, gm


def test_every_worker_count_loads_the_same_model(saved):
    path, model, gm = saved
    states = {}
    for workers in (1, 2, 3, 16):
        loaded = udnc_fx.load(path, model, progress=False, workers=workers)
        states[workers] = loaded.state_dict()
        x = torch.randn(4, 48, generator=torch.Generator().manual_seed(1))
        assert torch.equal(loaded(x), gm(x))
    for workers, state in states.items():
        assert state.keys() == states[1].keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, states[1][name]), (workers, name)


def test_iter_container_yields_the_same_tensors_in_the_same_order(saved):
    path, _, _ = saved
    one = list(iter_container(path, workers=1))
    three = list(iter_container(path, workers=3))
    assert [type(t).__name__ + getattr(t, "fqn", getattr(t, "name", "")) for t in three] == [
        type(t).__name__ + getattr(t, "fqn", getattr(t, "name", "")) for t in one
    ]
    for a, b in zip(one, three):  # every field, arrays with their dtypes and bytes
        assert pickle.dumps(a) == pickle.dumps(b)


def _with_broken_stream(data: bytes, which: int) -> bytes:
    """``data`` with the index stream of quantized entry ``which`` zeroed and every digest recomputed."""
    h_len = int.from_bytes(data[12:16], "little")
    header_bytes = data[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + h_len]
    payload = bytearray(data[C.PREAMBLE_SIZE + h_len :])
    section = udnc_fx.read_header(data)["quantized"][which]["indices"]
    payload[section["offset"] : section["offset"] + section["length"]] = bytes(section["length"])
    payload = bytes(payload)
    digested = fmt.DIGESTED.pack(C.MAGIC, 1, 0, len(header_bytes), len(payload), hashlib.sha256(payload).digest())
    assert data[: len(digested)][:8] == digested[:8] and json.loads(decompress_header(header_bytes, 1 << 26))
    return digested + hashlib.sha256(digested + header_bytes).digest() + header_bytes + payload


def test_a_stream_that_fails_in_a_worker_is_the_same_format_error(saved, tmp_path):
    path, model, _ = saved
    bad = tmp_path / "bad.udnc"
    bad.write_bytes(_with_broken_stream(path.read_bytes(), 3))
    errors = []
    for workers in (1, 2, 3):
        with pytest.raises(FormatError) as info:
            udnc_fx.load(bad, model, progress=False, workers=workers)
        errors.append((info.value.kind, str(info.value)))
    assert errors[0][0] != "checksum_mismatch"
    assert errors == [errors[0]] * 3


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2", None, 257])
def test_bad_worker_counts_are_a_config_error(saved, workers):
    path, model, _ = saved
    with pytest.raises(ConfigError):
        udnc_fx.load(path, model, progress=False, workers=workers)
    with pytest.raises(ConfigError):
        next(iter_container(path, workers=workers))


def test_workers_without_fork_are_a_config_error_and_one_worker_still_loads(saved, monkeypatch):
    import multiprocessing

    path, model, gm = saved
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(ConfigError, match="fork"):
        udnc_fx.load(path, model, progress=False, workers=2)
    x = torch.randn(2, 48)
    assert torch.equal(udnc_fx.load(path, model, progress=False, workers=1)(x), gm(x))

"""``udnc_fx.save(..., threads=N)`` and ``udnc_fx.load(..., threads=N)``: tensors coded by N threads (the default
coder's kernels release the GIL) give the same file bytes and the same model as one thread; a stream that fails to
decode is the same FormatError; bad counts are a ConfigError."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import udnc_fx
from udnc_fx.coding.container import iter_container
from udnc_fx.errors import ConfigError, FormatError

from test_parallel_load import _with_broken_stream  # noqa: E402 -- the same damaged-file helper


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(64, 64 + 16 * i) if i == 0 else nn.Linear(64 + 16 * (i - 1), 64 + 16 * i)
                           for i in range(5))).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _net()
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(relative_step=0.3, seed=3))
    folder = tmp_path_factory.mktemp("threads")
    paths = {}
    for threads in (1, 2, 3):
        paths[threads] = folder / f"m{threads}.udnc"
        udnc_fx.save(gm, paths[threads], progress=False, threads=threads)
    return paths, model, gm


def test_every_thread_count_writes_the_same_bytes(saved):
    paths, _, _ = saved
    data = paths[1].read_bytes()
    # save's "auto" coder: each thread codes its tensors with both candidates and keeps the smaller
    assert {q["indices"]["coder"] for q in udnc_fx.read_header(paths[1])["quantized"]} <= {
        "ans-dither-v2", "range-context-v1"}
    for path in paths.values():
        assert path.read_bytes() == data


def test_every_thread_count_loads_the_same_model(saved):
    paths, model, gm = saved
    one = udnc_fx.load(paths[1], model, progress=False).state_dict()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    for threads in (2, 4, 16):
        loaded = udnc_fx.load(paths[1], model, progress=False, threads=threads)
        assert torch.equal(loaded(x), gm(x))
        state = loaded.state_dict()
        assert state.keys() == one.keys() and all(torch.equal(state[k], one[k]) for k in one)


def test_a_stream_that_fails_in_a_thread_is_the_same_format_error(saved, tmp_path):
    paths, model, _ = saved
    bad = tmp_path / "bad.udnc"
    bad.write_bytes(_with_broken_stream(paths[1].read_bytes(), 2))
    errors = []
    for threads in (1, 2, 3):
        with pytest.raises(FormatError) as info:
            udnc_fx.load(bad, model, progress=False, threads=threads)
        errors.append((info.value.kind, str(info.value)))
    assert errors[0][0] != "checksum_mismatch" and errors == [errors[0]] * 3


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2", None, 257])
def test_bad_thread_counts_are_a_config_error(saved, threads, tmp_path):
    paths, model, gm = saved
    with pytest.raises(ConfigError):
        udnc_fx.load(paths[1], model, progress=False, threads=threads)
    with pytest.raises(ConfigError):
        next(iter_container(paths[1], threads=threads))
    with pytest.raises(ConfigError):
        udnc_fx.save(gm, tmp_path / "x.udnc", progress=False, threads=threads)
    assert not (tmp_path / "x.udnc").exists()

"""``udnc_fx.save`` streams each tensor's sections to disk and ``udnc_fx.load`` decodes tensor by tensor: memory
stays at one tensor's working set, whatever the number of tensors, and the bytes are those of ``encode_container``."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import udnc_fx
from udnc_fx.coding.container import (
    Container,
    RawTensor,
    encode_container,
    iter_container,
    read_container,
    write_container,
)
from udnc_fx.errors import FormatError

TABLES, TABLE_SIZE = 24, 1 << 16  # 24 float buffers of 256 KiB: 6 MiB stored raw, next to a small compressed part


class WithTables(nn.Module):
    """A small compressed layer next to many large raw tensors (buffers, or layers left float): the payload is
    then mostly raw bytes, which a writer or reader holding the whole payload would hold all at once."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 16)
        gen = torch.Generator().manual_seed(0)
        for i in range(TABLES):
            self.register_buffer(f"table{i}", torch.randn(TABLE_SIZE, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        for i in range(TABLES):
            # each table enters a traced op whole (a slice taken first would be traced as a constant)
            out = out + (out.new_zeros(()) + getattr(self, f"table{i}"))[:16]
        return out


@pytest.fixture(scope="module")
def compressed():
    model = WithTables().eval()
    return model, udnc_fx.compress(model, udnc_fx.CompressConfig(relative_step=0.25, seed=0))


def test_save_holds_one_tensor_at_a_time(compressed, tmp_path, traced_peak):
    _, gm = compressed
    path = tmp_path / "m.udnc"
    size, peak = traced_peak(lambda: udnc_fx.save(gm, path, progress=False))
    assert size == path.stat().st_size > TABLES * TABLE_SIZE * 4
    # Holding the payload (let alone joining it into the file's bytes) would cost its whole size; one table and
    # its stored copy are 2 × 256 KiB, the copy buffer 1 MiB (measured: 0.2x the file; before streaming, 3x).
    assert peak < 0.5 * size, f"save traced {peak} bytes for a {size}-byte file"
    assert sorted(os.listdir(tmp_path)) == ["m.udnc"]  # both temporary files are gone


def test_load_decodes_one_tensor_at_a_time(compressed, tmp_path, traced_peak):
    model, gm = compressed
    path = tmp_path / "m.udnc"
    size = udnc_fx.save(gm, path, progress=False)
    loaded, peak = traced_peak(lambda: udnc_fx.load(path, model, progress=False))
    assert peak < 0.5 * size, f"load traced {peak} bytes for a {size}-byte file"
    for name, tensor in gm.state_dict().items():
        if name.startswith("table"):
            assert torch.equal(loaded.get_buffer(name), tensor)
    x = torch.randn(3, 32)
    assert torch.equal(loaded(x), gm(x))


def test_written_file_is_encode_container_bytes(tmp_path):
    rng = np.random.default_rng(1)
    container = Container(
        raw=[RawTensor(f"t{i}", rng.standard_normal(1000 + i).astype(np.float32)) for i in range(5)],
        config={"a": 1}, metadata={"b": [1, 2]}, seed=7,
    )
    path = tmp_path / "c.udnc"
    assert write_container(path, container) == path.stat().st_size
    assert path.read_bytes() == encode_container(container)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "c.udnc"
    path.write_bytes(b"the user's file")
    bad = Container(raw=[RawTensor("x", np.zeros(3, np.float32)), RawTensor("x", np.ones(3, np.float32))])
    with pytest.raises(FormatError, match="duplicate"):  # found after the first section was already written
        write_container(path, bad)
    assert path.read_bytes() == b"the user's file"
    assert os.listdir(tmp_path) == ["c.udnc"]


def test_iter_container_gives_what_read_container_gives(compressed, tmp_path):
    _, gm = compressed
    path = tmp_path / "m.udnc"
    udnc_fx.save(gm, path, progress=False)
    whole = read_container(path)
    streamed = list(iter_container(path))
    assert [t.fqn for t in streamed if not isinstance(t, RawTensor)] == [q.fqn for q in whole.quantized]
    raws = [t for t in streamed if isinstance(t, RawTensor)]
    assert [r.name for r in raws] == [r.name for r in whole.raw]
    for a, b in zip(raws, whole.raw):
        assert np.array_equal(a.array, b.array)
    for a, b in zip(streamed, whole.quantized):
        assert np.array_equal(a.indices, b.indices) and a.indices.dtype == b.indices.dtype


def test_iter_container_checks_the_digest_before_the_first_tensor(compressed, tmp_path):
    _, gm = compressed
    path = tmp_path / "m.udnc"
    udnc_fx.save(gm, path, progress=False)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last raw tensor's last byte: every earlier section is intact
    path.write_bytes(bytes(data))
    stream = iter_container(path)
    with pytest.raises(FormatError) as info:
        next(stream)
    assert info.value.kind == "checksum_mismatch"


def test_load_leaves_the_model_alone_and_the_result_usable_on_the_fallback_path(tmp_path):
    class Untraceable(nn.Module):  # data-dependent control flow: torch.fx cannot trace it, module swap serves it
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 4)

        def forward(self, x):
            if x.sum() > 0:
                x = torch.relu(x)
            return self.b(self.a(x))

    torch.manual_seed(0)
    model = Untraceable().eval()
    before = copy.deepcopy(model.state_dict())
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(relative_step=0.25, seed=0, fallback="module_swap"))
    path = tmp_path / "u.udnc"
    udnc_fx.save(gm, path, progress=False)
    loaded = udnc_fx.load(path, model, progress=False)
    for name, tensor in model.state_dict().items():  # the weights the file replaces were not touched
        assert torch.equal(tensor, before[name])
    x = torch.randn(2, 16)
    assert torch.equal(loaded(x), gm(x))
    # the replaced weights' stand-ins are gone: the model moves and copies like any other
    double = copy.deepcopy(loaded).to(torch.float64)
    assert double(x.double()).dtype == torch.float64


def test_load_leaves_the_traced_model_alone_and_shares_no_storage_with_it(compressed, tmp_path):
    model, gm = compressed
    before = {name: t.clone() for name, t in model.state_dict().items()}
    modules_before = [(name, type(m)) for name, m in model.named_modules()]
    path = tmp_path / "m.udnc"
    udnc_fx.save(gm, path, progress=False)
    loaded = udnc_fx.load(path, model, progress=False)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules_before
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    # every tensor the file restores is the file's, in the loaded model's own storage
    mine = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    for name, tensor in loaded.state_dict().items():
        assert tensor.untyped_storage().data_ptr() not in mine, name
    with torch.no_grad():
        loaded.fc.bias.add_(1.0)
        loaded.get_buffer("table0").add_(1.0)
    assert torch.equal(model.fc.bias, before["fc.bias"]) and torch.equal(model.table0, before["table0"])
    x = torch.randn(3, 32)
    assert torch.equal(udnc_fx.load(path, model, progress=False)(x), gm(x))


def test_load_keeps_the_attributes_of_the_tensors_it_restores(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    model[0].bias.no_decay = True  # e.g. an optimizer's grouping mark
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(relative_step=0.25, seed=0))
    path = tmp_path / "a.udnc"
    udnc_fx.save(gm, path, progress=False)
    loaded = udnc_fx.load(path, model, progress=False)
    bias = loaded.get_parameter("0.bias")
    assert bias.no_decay is True and bias.requires_grad and torch.equal(bias, model[0].bias)

"""``passes.trace.hollow_copy``: the one copy ``compress`` and ``load`` make of the user's model. Placeholders for the
weights the caller replaces, uninitialised storage for the tensors it overwrites, everything else deep-copied; the
user's model untouched, ties and shared storage kept, and ``load`` built on it (a model whose tensors share storage
loads with the sharing of a deep copy)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import udnc_fx
from udnc_fx.passes.trace import hollow_copy, restore_hollow


class Shared(nn.Module):
    """Tied weights, buffers viewing one storage, a parameter sharing a storage with a buffer, attributes on a
    tensor, a non-persistent buffer and a parameter that does not require grad."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight  # tied: one object under two names
        base = torch.randn(20)
        self.register_buffer("lo", base[:8])  # two buffers on one storage
        self.register_buffer("hi", base[8:16])
        self.register_buffer("scratch", base[16:], persistent=False)  # on it too, not in the state dict
        self.gain = nn.Parameter(torch.randn(8), requires_grad=False)
        self.gain.no_decay = True
        mirror = torch.randn(8)
        self.offset = nn.Parameter(mirror)
        self.register_buffer("offset_copy", mirror)  # a buffer sharing the parameter's storage

    def forward(self, x):
        return self.b(self.a(x) + self.lo + self.hi) * self.gain + self.offset + self.offset_copy


def _sharing(model) -> set[frozenset[str]]:
    """The registered tensors grouped by the storage they use (what ``copy.deepcopy`` keeps)."""
    groups: dict[int, set[str]] = {}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for name, t in tensors.items():
        if t.numel() > 1 and 0 in t.stride():
            continue  # a placeholder: no storage of its own
        groups.setdefault(t.untyped_storage().data_ptr(), set()).add(name)
    return {frozenset(g) for g in groups.values()}


def _storages(model) -> set[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors if not (t.numel() > 1 and 0 in t.stride())}


def _snapshot(model):
    return {k: (v.clone(), v.data_ptr(), v.stride()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_untouched(model, before):
    for k, v in model.state_dict(keep_vars=True).items():
        ref, ptr, stride = before[k]
        assert v.data_ptr() == ptr and v.stride() == stride and torch.equal(v, ref), k


def test_default_hollows_the_unshared_float_parameters_and_restore_gives_their_values():
    model = Shared()
    before = _snapshot(model)
    work, sources = hollow_copy(model)
    _assert_untouched(model, before)
    # a placeholder: one element, stride 0; tied weights stay one object
    assert work.a.weight is work.b.weight and 0 in work.a.weight.stride()
    assert {id(e[1]) for e in sources.values()} >= {id(model.a.weight), id(model.gain)}
    assert not work.gain.requires_grad and work.gain.no_decay is True
    restore_hollow(work, sources)
    # storage shared as a deep copy shares it (each parameter its own, buffers' views of one storage)
    assert _sharing(work) == _sharing(copy.deepcopy(model)) and not _storages(work) & _storages(model)
    x = torch.randn(2, 8)
    assert torch.equal(work(x), model(x))
    assert work.a.weight.data_ptr() != model.a.weight.data_ptr()


def test_load_stand_ins_keep_shared_storage_and_attributes():
    model = Shared()
    before = _snapshot(model)
    raw = [k for k in model.state_dict() if k not in ("a.weight",)]
    work, sources = hollow_copy(model, replaced=["a.weight"], overwritten=raw)
    _assert_untouched(model, before)
    assert 0 in work.b.weight.stride() and len(sources) == 1
    # lo, hi share a storage with `scratch`, whose values the copy keeps: deep-copied together, values kept
    assert torch.equal(work.lo, model.lo) and torch.equal(work.scratch, model.scratch)
    assert work.lo.untyped_storage().data_ptr() == work.scratch.untyped_storage().data_ptr()
    assert work.lo.untyped_storage().data_ptr() != model.lo.untyped_storage().data_ptr()
    # offset (a parameter) and offset_copy (a buffer on its storage): apart, as a deep copy has them
    assert _sharing(work) == {g for g in _sharing(copy.deepcopy(model)) if not g & {"a.weight", "b.weight"}}
    assert not _storages(work) & _storages(model)
    # overwritten, unshared: storage of its own with the parameter's flags and attributes
    assert isinstance(work.gain, nn.Parameter) and not work.gain.requires_grad and work.gain.no_decay is True
    assert work.gain.data_ptr() != model.gain.data_ptr() and work.a.bias.requires_grad


def test_a_storage_all_overwritten_gets_one_fresh_storage_with_the_same_views():
    model = Shared()
    del model.scratch  # now only lo and hi use their storage: both overwritten
    work, _ = hollow_copy(model, overwritten=["lo", "hi"])
    assert work.lo.untyped_storage().data_ptr() == work.hi.untyped_storage().data_ptr()
    assert work.lo.untyped_storage().data_ptr() != model.lo.untyped_storage().data_ptr()
    assert (work.hi.storage_offset(), work.hi.stride()) == (model.hi.storage_offset(), model.hi.stride())
    work.lo.fill_(1.0)
    assert torch.equal(model.lo, model.lo.clone()) and not torch.equal(model.lo, work.lo)


@pytest.mark.parametrize("drop_scratch", [False, True])
def test_load_keeps_the_models_storage_sharing(drop_scratch, tmp_path):
    model = Shared().eval()
    if drop_scratch:
        del model.scratch  # forward never reads it
    gm = udnc_fx.compress(model, udnc_fx.CompressConfig(relative_step=0.3, seed=1), progress=False)
    path = tmp_path / "s.udnc"
    udnc_fx.save(gm, path, progress=False)
    before = _snapshot(model)
    full = copy.deepcopy(model)
    loaded = udnc_fx.load(path, model, progress=False)
    _assert_untouched(model, before)
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), gm(x))
    state = loaded.state_dict()
    for name in ("lo", "hi", "offset", "offset_copy", "gain"):
        assert torch.equal(state[name], full.state_dict()[name]), name
    # the sharing a deep copy gives, in storage of the loaded model's own
    assert not _storages(loaded) & _storages(model)
    # (the GraphModule holds only what its graph uses: not `scratch`)
    names = set().union(*_sharing(loaded))
    expected = {g & names for g in _sharing(full) if not g & {"a.weight", "b.weight"}} - {frozenset()}
    assert {g for g in _sharing(loaded) if g <= set().union(*expected)} == expected
    assert frozenset({"lo", "hi"}) in expected

"""The files of an ONNX export (issue 15): a user's container is never replaced, the pair is written atomically, a
sidecar is never mistaken for a model, ``load_onnx`` reads only a plain sidecar name beside the ONNX file, the
content hash covers the dither functions, the tensor table is validated, and a missing package is named."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import udnc_fx
from udnc_fx.demo import DigitsCNN
from udnc_fx.errors import ExportError, FormatError
from udnc_fx.export import load_onnx, to_onnx
from udnc_fx.export import runtime as rt

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _compressed(seed=0):
    torch.manual_seed(0)
    return udnc_fx.compress(DigitsCNN().eval(), udnc_fx.CompressConfig(lattice="E8", relative_step=0.5, seed=seed)).eval()


@pytest.fixture(scope="module")
def models():
    return {0: _compressed(0), 1: _compressed(1)}


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _side(path) -> Path | None:
    props = _props(path)
    return Path(path).parent / props["udnc.sidecar"] if "udnc.sidecar" in props else None


def _run(path, **kw) -> np.ndarray:
    session = load_onnx(path, **kw)
    return session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]


def _rehash(model: onnx.ModelProto) -> None:
    """Recompute udnc.content_sha256 after an edit, as a forger would (works with the old and new hash)."""
    props = {p.key: p for p in model.metadata_props}
    table = props["udnc.tensors"].value
    import inspect

    old = next(iter(inspect.signature(rt.content_sha256).parameters)) == "graph"  # the pre-issue-15 hash
    props["udnc.content_sha256"].value = rt.content_sha256(model.graph if old else model, table)


# ---------------------------------------------------------------------------------------------------------------
# Point 1: never overwrite or lose a user's file
# ---------------------------------------------------------------------------------------------------------------


def test_save_then_export_keeps_the_container(models, tmp_path, monkeypatch):
    """The README's sequence: save(gm, "model.udnc") then to_onnx(gm, x, "model.onnx") used to replace model.udnc
    with the sidecar."""
    monkeypatch.chdir(tmp_path)
    gm = models[0]
    udnc_fx.save(gm, "model.udnc")
    before = Path("model.udnc").read_bytes()
    result = to_onnx(gm, X, "model.onnx")
    assert Path("model.udnc").read_bytes() == before
    assert Path(result.sidecar_path).name != "model.udnc" and Path(result.sidecar_path).exists()
    loaded = udnc_fx.load("model.udnc", DigitsCNN().eval())
    with torch.no_grad():
        assert np.array_equal(loaded(X).numpy(), gm(X).numpy())
    np.testing.assert_allclose(_run("model.onnx"), gm(X).detach().numpy(), atol=1e-5)


def test_loading_a_sidecar_as_a_model_says_what_it_is(models, tmp_path):
    result = to_onnx(models[0], X, tmp_path / "net.onnx")
    with pytest.raises(FormatError) as info:
        udnc_fx.load(result.sidecar_path, DigitsCNN())
    assert info.value.kind == "onnx_sidecar"
    assert "sidecar" in str(info.value) and "net.onnx" in str(info.value)


@pytest.mark.parametrize("existing", ["container", "plain_onnx", "text", "directory"])
def test_to_onnx_refuses_to_replace_a_foreign_file(models, tmp_path, existing):
    target = tmp_path / ("model.udnc" if existing == "container" else "model.onnx")
    if existing == "container":
        udnc_fx.save(models[0], target)
    elif existing == "plain_onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(DigitsCNN().eval(), (X,), str(target), dynamo=False)
    elif existing == "text":
        target.write_text("my notes")
    else:
        target.mkdir()
    listing = {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()}
    with pytest.raises(ExportError, match="refusing to replace|is a directory"):
        to_onnx(models[0], X, target)
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()} == listing


def test_reexport_replaces_the_pair_and_removes_the_old_sidecar(models, tmp_path):
    path = tmp_path / "model.onnx"
    first = to_onnx(models[0], X, path)
    again = to_onnx(models[0], X, path)  # the same model: the same names and bytes
    assert again.sidecar_path == first.sidecar_path and again.content_sha256 == first.content_sha256
    second = to_onnx(models[1], X, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", Path(second.sidecar_path).name]
    with torch.no_grad():
        np.testing.assert_allclose(_run(path), models[1](X).numpy(), atol=1e-5)
    to_onnx(models[1], X, path, sidecar=False)  # a self-contained export replaces the pair: no sidecar left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_renamed_pair_still_loads(models, tmp_path):
    result = to_onnx(models[0], X, tmp_path / "a.onnx")
    side = Path(result.sidecar_path)
    (tmp_path / "a.onnx").rename(tmp_path / "b.onnx")
    assert np.isfinite(_run(tmp_path / "b.onnx")).all()  # the recorded name
    side.rename(tmp_path / side.name.replace("a.onnx.", "b.onnx.", 1))
    assert np.isfinite(_run(tmp_path / "b.onnx")).all()  # renamed together


_KILL_SCRIPT = r"""
import os, sys
import torch, udnc_fx
from udnc_fx.demo import DigitsCNN
from udnc_fx.export import to_onnx

kill_at, seed, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
gm = udnc_fx.compress(DigitsCNN().eval(), udnc_fx.CompressConfig(lattice="E8", relative_step=0.5, seed=seed)).eval()
x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
directory = os.path.dirname(os.path.abspath(path))
count = 0


def hook(event, args):
    # Die (no cleanup, no finally) just before the kill_at-th change to the export's directory.
    global count
    if event == "open":
        target, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    else:
        target, writing = args[0], event in ("os.rename", "os.remove", "os.link", "os.truncate")
    if writing and isinstance(target, (str, bytes, os.PathLike)) and \
            os.path.dirname(os.path.abspath(os.fsdecode(target))) == directory:
        count += 1
        if count == kill_at:
            os._exit(9)


sys.addaudithook(hook)
to_onnx(gm, x, path)
print("completed", count)
"""


@pytest.mark.slow
def test_killed_export_leaves_the_old_or_the_new_pair(models, tmp_path):
    """A fresh process exports over an earlier export and is killed (os._exit, no cleanup) before its 1st, 2nd, ...
    change to the directory; after each kill the ONNX file must load and give the old or the new model's outputs,
    and a finished export afterwards leaves only the new pair."""
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    path = work / "model.onnx"
    with torch.no_grad():
        old_out, new_out = models[0](X).numpy(), models[1](X).numpy()
    outcomes = []
    for kill_at in range(1, 20):
        for p in work.iterdir():
            p.unlink()
        to_onnx(models[0], X, path)  # the old pair
        proc = subprocess.run([sys.executable, str(script), str(kill_at), "1", str(path)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode in (0, 9), proc.stderr[-3000:]
        got = _run(path)
        which = "old" if np.allclose(got, old_out, atol=1e-5) else "new" if np.allclose(got, new_out, atol=1e-5) else "?"
        outcomes.append((kill_at, proc.returncode, which))
        assert which != "?", outcomes
        if proc.returncode == 0:
            assert which == "new"
            break
        # What the interrupted run left behind (temp files, a stray sidecar) goes with the next export.
        result = to_onnx(models[1], X, path)
        assert sorted(p.name for p in work.iterdir()) == ["model.onnx", Path(result.sidecar_path).name], outcomes
    assert outcomes[-1][1] == 0 and len(outcomes) >= 4, outcomes  # every step was interrupted once
    assert {w for _, rc, w in outcomes if rc == 9} == {"old", "new"}, outcomes
    print("kill outcomes (kill before change #, exit code, pair found):", outcomes)


@pytest.mark.parametrize("step", ["sidecar-temp", "sidecar", "onnx-temp", "onnx", "old-sidecar"])
def test_failure_between_steps_leaves_a_loadable_pair(models, tmp_path, monkeypatch, step):
    """Each step of the pair write fails in turn (in process, fast): the old or the new export loads."""
    from udnc_fx.export import files

    path = tmp_path / "model.onnx"
    to_onnx(models[0], X, path)

    class Interrupted(BaseException):
        pass

    def fail(name):
        if name == step:
            raise Interrupted(name)

    monkeypatch.setattr(files, "_checkpoint", fail)
    with pytest.raises(Interrupted):
        to_onnx(models[1], X, path)
    monkeypatch.undo()
    got = _run(path)
    with torch.no_grad():
        expected = models[1 if step in ("onnx", "old-sidecar") else 0](X).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    result = to_onnx(models[1], X, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", Path(result.sidecar_path).name]


def test_unwritable_directory_loses_nothing(models, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    path = tmp_path / "model.onnx"
    to_onnx(models[0], X, path)
    listing = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="cannot write"):
            to_onnx(models[1], X, path)
    finally:
        tmp_path.chmod(0o700)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == listing


# ---------------------------------------------------------------------------------------------------------------
# Point 3: load_onnx reads only what it should
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def pair(models, tmp_path):
    path = tmp_path / "model.onnx"
    to_onnx(models[0], X, path)
    return path


def _set_prop(path, key, value):
    model = onnx.load(str(path))
    next(p for p in model.metadata_props if p.key == key).value = value
    onnx.save(model, str(path))


@pytest.mark.parametrize("name", ["../model.udnc", "/dev/zero", "sub/x.udnc", "", "..", ".", "a\\b.udnc", "C:x"])
def test_recorded_sidecar_name_must_be_a_plain_name(pair, tmp_path, name):
    (tmp_path / "sub").mkdir()
    shutil.copy(_side(pair), tmp_path / "sub" / "x.udnc")
    shutil.copy(_side(pair), tmp_path.parent / "model.udnc")
    _set_prop(pair, "udnc.sidecar", name)  # metadata outside the content hash: no rehash needed
    with pytest.raises(FormatError) as info:
        load_onnx(pair)
    assert info.value.kind == "bad_header" and "plain file name" in str(info.value)


def _alarm(seconds):
    def boom(*_):
        raise TimeoutError("load_onnx blocked")

    signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)


def test_sidecar_that_is_a_fifo_is_refused_without_blocking(pair):
    side = _side(pair)
    side.unlink()
    os.mkfifo(side)
    _alarm(20)
    try:
        with pytest.raises(FormatError) as info:
            load_onnx(pair)
    finally:
        signal.alarm(0)
    assert info.value.kind == "bad_value" and "not a regular file" in str(info.value)


def test_oversized_sidecar_is_refused_unread(pair):
    side = _side(pair)
    with open(side, "r+b") as f:  # sparse: 4 GiB claimed, nothing to read before the size check
        f.truncate(1 << 32)
    with pytest.raises(FormatError) as info:
        load_onnx(pair)
    assert info.value.kind == "bad_value" and "more than the" in str(info.value)


def test_sidecar_symlink_to_a_regular_file_is_followed(pair, tmp_path):
    """A model cache (Hugging Face's) keeps files as symbolic links to blobs: that stays supported."""
    side = _side(pair)
    blob = tmp_path / "blob"
    side.rename(blob)
    side.symlink_to(blob)
    assert np.isfinite(_run(pair)).all()


def _edit_function_constant(model: onnx.ModelProto) -> None:
    """Change one constant of the Hash32 function (the dither generator) in place."""
    fn = next(f for f in model.functions if f.name == "Hash32")
    for node in fn.node:
        if node.op_type == "Constant":
            arr = numpy_helper.to_array(node.attribute[0].t)
            if arr.dtype == np.uint32 and int(arr) == 0x85EBCA6B:
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.asarray(0x85EBCA6D, np.uint32), node.output[0]))
                return
    raise AssertionError("constant not found")


@pytest.mark.parametrize("decode", ["ort", "numpy"])
def test_editing_the_dither_function_is_detected(models, tmp_path, decode):
    path = tmp_path / "self.onnx"
    to_onnx(models[0], X, path, sidecar=False)
    model = onnx.load(str(path))
    _edit_function_constant(model)
    onnx.save(model, str(path))
    with pytest.raises(FormatError) as info:
        load_onnx(path, decode=decode)
    assert info.value.kind == "checksum_mismatch"


TABLE_EDITS = {
    "nan_step": lambda e: e.update(step=float("nan")),
    "negative_step": lambda e: e.update(step=-0.1),
    "zero_step": lambda e: e.update(step=0.0),
    "inf_step": lambda e: e.update(step=1e400),
    "huge_int_step": lambda e: e.update(step=10**400),
    "string_step": lambda e: e.update(step="0.1"),
    "bad_lattice": lambda e: e.update(lattice="Q"),
    "lattice_dim": lambda e: e.update(n=3),
    "negative_dim": lambda e: e.update(shape=[-4, 2]),
    "huge_shape": lambda e: e.update(shape=[2**40, 2**40], num_vectors=2**77),
    "bool_dim": lambda e: e.update(shape=[True] * 8),
    "num_vectors": lambda e: e.update(num_vectors=e["num_vectors"] + 1),
    "zero_codewords": lambda e: e.update(num_codewords=0),
    "too_many_codewords": lambda e: e.update(num_codewords=10**6),
    "index_dtype": lambda e: e.update(index_dtype="float32"),
    "zero_index": lambda e: e.update(zero_index=10**6),
    "key_not_hex": lambda e: e.update(key="zzzz"),
    "key_int": lambda e: e.update(key=5),
    "aliases_int": lambda e: e.update(aliases=5),
    "aliases_null": lambda e: e.update(aliases=[None]),
    "missing_fqn": lambda e: e.pop("fqn"),
    "prefix": lambda e: e.update(prefix="other/"),
    "not_object": lambda e: e.clear() or e.update(x=1),
}


@pytest.mark.parametrize("edit", list(TABLE_EDITS))
def test_tensor_table_is_validated(models, tmp_path, edit):
    """Edits of the tensor table with the content hash recomputed (a forger's file): FormatError, never a load
    with NaN weights or another exception type."""
    path = tmp_path / "self.onnx"
    to_onnx(models[0], X, path, sidecar=False)
    model = onnx.load(str(path))
    prop = next(p for p in model.metadata_props if p.key == "udnc.tensors")
    table = json.loads(prop.value)
    TABLE_EDITS[edit](table[0])
    prop.value = json.dumps(table)
    _rehash(model)
    onnx.save(model, str(path))
    with pytest.raises(FormatError) as info:
        load_onnx(path)
    assert info.value.kind in ("bad_header", "bad_value", "model_mismatch", "unsupported_version")


def test_v1_export_asks_for_a_new_export(pair):
    _set_prop(pair, "udnc.format", "udnc-onnx-v1")
    with pytest.raises(FormatError, match="unsupported_version.*export the model again"):
        load_onnx(pair)


def test_external_data_initializer_is_refused(models, tmp_path):
    """A forged file whose initializer names an external data file: onnxruntime would read that path."""
    path = tmp_path / "self.onnx"
    to_onnx(models[0], X, path, sidecar=False)
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "fc2.bias")
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "../../../etc/hostname"
    _rehash(model)
    onnx.save(model, str(path))
    with pytest.raises(FormatError, match="external data"):
        load_onnx(path)


# ---------------------------------------------------------------------------------------------------------------
# Point 3 (issue 14 point 5): a missing package is named, never a corrupt file
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("package", ["numba", "onnxruntime", "onnx"])  # numba: the default coder's kernels
def test_missing_package_is_an_import_error_naming_it(pair, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(ImportError) as info:
        load_onnx(pair)
    assert package in str(info.value) and not isinstance(info.value, FormatError)


def test_sidecar_hash_is_checked_before_decoding(pair, monkeypatch):
    """An edited sidecar never reaches the decoder (which would then be fed bytes the exporter did not write)."""
    from udnc_fx.coding import container

    side = _side(pair)
    data = bytearray(side.read_bytes())
    data[-1] ^= 1
    side.write_bytes(bytes(data))
    calls = []
    monkeypatch.setattr(container, "decode_container", lambda *a, **k: calls.append(1))
    with pytest.raises(FormatError, match="checksum_mismatch"):
        load_onnx(pair)
    assert calls == []
    assert hashlib.sha256(bytes(data)).hexdigest() != _props(pair)["udnc.sidecar_sha256"]

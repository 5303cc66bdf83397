"""End to end: compress → to_onnx → onnxruntime, against the compressed PyTorch model.

onnxruntime runs with a pinned optimisation level (ENABLE_ALL) and one intra-op thread; outputs must match the
compressed model within 1e-5 relative error (max |diff| / max |reference|), for Z^1, D4 and E8, with and without
a sidecar, through both decode paths. The weights themselves are compared bit for bit.
"""

from __future__ import annotations

import os
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import udnc_fx
from udnc_fx.demo import DigitsCNN
from udnc_fx.export import load_onnx, prepare_model, to_onnx
from udnc_fx.passes.materialize import served_params

RTOL = 1e-5
LATTICES = [("Z", 1), ("D4", 4), ("E8", 8)]


class Bottleneck(nn.Module):
    """ResNeXt-style residual block: 1×1 → grouped 3×3 → 1×1, BatchNorm, identity shortcut."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        mid = channels // 2
        self.conv1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(x + self.bn3(self.conv3(y)))


class TinyResNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.block1 = Bottleneck(32, groups=4)
        self.block2 = Bottleneck(32, groups=8)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block2(self.block1(F.relu(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block written out by hand (traceable by torch.fx)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer: a torch.nn leaf for torch.fx, so its Linear weights are served by
    parametrizations. ``is_causal`` is passed explicitly: the TorchScript exporter fails on its default."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x, is_causal=False)


def _randomize_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


MODELS = {
    "digits_cnn": (lambda: DigitsCNN(), (2, 1, 8, 8)),
    "resnext": (lambda: _randomize_bn(TinyResNeXt()), (2, 3, 8, 8)),
    "attention": (lambda: AttentionBlock(), (2, 5, 32)),
}


def _session_kwargs():
    return dict(graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, intra_op_num_threads=1)


def _plain_session(path_or_bytes):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def _compress(name, lattice, n, **extra):
    torch.manual_seed(0)
    make, shape = MODELS[name] if name in MODELS else (lambda: EncoderLayer(), (2, 5, 32))
    model = make().eval()
    config = udnc_fx.CompressConfig(lattice=lattice, n=n, relative_step=0.5, **extra)
    gm = udnc_fx.compress(model, config).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    return gm, x


def _rel_err(y, ref):
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def _check_initializer_sizes(model: onnx.ModelProto, gm, sidecar: bool):
    """No dither, counter or other array of the weight's size is stored: only indices (small integers), codebooks
    and scalars/short vectors; with a sidecar, not even indices or codebooks."""
    specs = {dlp.fqn: dlp for dlp in served_params(gm)}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if not init.name.startswith("udnc/"):
            assert init.name not in specs, f"{init.name}: float copy of a compressed weight left in the file"
            continue
        if init.name.endswith("/indices"):
            assert not sidecar
            assert arr.dtype in (np.uint8, np.int16, np.int32), init.name
        elif init.name.endswith("/codebook"):
            assert not sidecar
            assert arr.dtype == np.float32 and arr.ndim == 2
        elif init.name.endswith("/codebook_int"):  # lattice coordinates of codewords that were not fine-tuned
            assert not sidecar
            assert arr.dtype in (np.int8, np.int16, np.int32) and arr.ndim == 2
        else:
            assert arr.size <= 8, f"{init.name}: {arr.dtype} array of {arr.size} elements"
            assert arr.dtype != np.int64 or arr.size <= 8
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    assert numpy_helper.to_array(attr.t).size <= 8, f"{fn.name}: large constant"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("lattice,n", LATTICES, ids=["Z1", "D4", "E8"])
@pytest.mark.parametrize("sidecar", [False, True], ids=["self-contained", "sidecar"])
def test_onnxruntime_matches_compressed_model(tmp_path, name, lattice, n, sidecar):
    gm, x = _compress(name, lattice, n)
    with torch.no_grad():
        ref = gm(x).numpy()
    path = tmp_path / "model.onnx"
    result = to_onnx(gm, (x,), path, sidecar=sidecar)
    assert sorted(result.tensors) == sorted(d.fqn for d in served_params(gm))
    assert result.skipped == []
    assert (result.sidecar_path is not None) == sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.onnx"] + ([os.path.basename(result.sidecar_path)] if sidecar else [])
    )

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in model.opset_import)
    _check_initializer_sizes(model, gm, sidecar)
    if sidecar:
        udnc_inputs = {i.name for i in model.graph.input if i.name.startswith("udnc/")}
        assert udnc_inputs == {f"udnc/{d.fqn}/{part}" for d in served_params(gm) for part in ("indices", "codebook")}

    for decode in ("numpy", "ort"):
        session = load_onnx(path, decode=decode, **_session_kwargs())
        y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert _rel_err(y, ref) <= RTOL, (decode, _rel_err(y, ref))
    if not sidecar:  # plain onnxruntime, without this package
        session = _plain_session(str(path))
        y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert _rel_err(y, ref) <= RTOL


def _weights_from_graph(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Run the dequantize subgraphs in onnxruntime by exposing the weights as graph outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = _plain_session(model.SerializeToString())
    feeds = {i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32)
             for i in model.graph.input}
    # Inputs other than the weights only matter for the model's own outputs; shapes come from the export.
    out = session.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})
    return dict(zip(names, out))


@pytest.mark.parametrize("lattice,n", LATTICES + [("A2", 2), ("Z", 3)], ids=["Z1", "D4", "E8", "A2", "Z3"])
@pytest.mark.parametrize("sidecar", [False, True], ids=["self-contained", "sidecar"])
def test_weights_bit_exact_on_both_paths(tmp_path, lattice, n, sidecar):
    gm, x = _compress("digits_cnn", lattice, n)
    path = tmp_path / "m.onnx"
    to_onnx(gm, (x,), path, sidecar=sidecar)
    expected = {d.fqn: d.materialize().numpy() for d in served_params(gm)}

    decoded = prepare_model(path, decode="numpy")
    inits = {i.name: numpy_helper.to_array(i) for i in decoded.graph.initializer}
    assert not any(name.startswith("udnc/") for name in inits)
    assert not any(i.name.startswith("udnc/") for i in decoded.graph.input)
    for fqn, w in expected.items():
        assert inits[fqn].dtype == np.float32
        np.testing.assert_array_equal(inits[fqn].view(np.uint32), w.view(np.uint32), err_msg=fqn)

    folded = _weights_from_graph(prepare_model(path, decode="ort"), list(expected))
    for fqn, w in expected.items():
        np.testing.assert_array_equal(folded[fqn].view(np.uint32), w.view(np.uint32), err_msg=fqn)


def test_module_swap_model_and_original_untouched(tmp_path):
    """nn.TransformerEncoderLayer is a leaf for torch.fx: its weights are parametrized. Exporting must not break
    the user's compressed model (materializing a deep copy of a parametrized module once did)."""
    gm, x = _compress("encoder_layer", "E8", 8)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with torch.no_grad():
        ref = gm(x).numpy()
    result = to_onnx(gm, (x,), tmp_path / "enc.onnx", sidecar=True)
    assert len(result.tensors) == 3
    with torch.no_grad():
        again = gm(x).numpy()
    np.testing.assert_array_equal(again, ref)
    after = gm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    session = load_onnx(tmp_path / "enc.onnx", **_session_kwargs())
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert _rel_err(y, ref) <= RTOL


def test_undithered_and_zero_index(tmp_path):
    gm, x = _compress("attention", "D4", 4, dithered=False)
    dlp = served_params(gm)[0]
    # Mark codeword 0 as the exact-zero codeword (what pruning does): those vectors must decode to +0.0.
    dlp.zero_index = 0
    with torch.no_grad():
        ref = gm(x).numpy()
    w = dlp.materialize().numpy()
    assert (w == 0).any()
    for sidecar in (False, True):
        path = tmp_path / f"m{int(sidecar)}.onnx"
        to_onnx(gm, (x,), path, sidecar=sidecar)
        for decode in ("numpy", "ort"):
            session = load_onnx(path, decode=decode, **_session_kwargs())
            y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            assert _rel_err(y, ref) <= RTOL
        got = {i.name: numpy_helper.to_array(i) for i in prepare_model(path, decode="numpy").graph.initializer}
        np.testing.assert_array_equal(got[dlp.fqn].view(np.uint32), w.view(np.uint32))
        folded = _weights_from_graph(prepare_model(path, decode="ort"), [dlp.fqn])
        np.testing.assert_array_equal(folded[dlp.fqn].view(np.uint32), w.view(np.uint32))


def test_float_model_loads_too(tmp_path):
    """A model without compressed weights exports as a plain graph and load_onnx opens any ONNX file."""
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(2, 1, 8, 8)
    result = to_onnx(model, (x,), tmp_path / "float.onnx")
    assert result.tensors == [] and result.sidecar_path is None
    session = load_onnx(tmp_path / "float.onnx", **_session_kwargs())
    with torch.no_grad():
        ref = model(x).numpy()
    assert _rel_err(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], ref) <= RTOL


def test_dynamic_batch_and_names(tmp_path):
    gm, x = _compress("digits_cnn", "E8", 8)
    path = tmp_path / "dyn.onnx"
    to_onnx(gm, (x,), path, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    session = load_onnx(path, **_session_kwargs())
    x5 = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        ref = gm(x5).numpy()
    (y,) = session.run(["logits"], {"images": x5.numpy()})
    assert y.shape == (5, 10) and _rel_err(y, ref) <= RTOL


def test_self_contained_codebooks_as_lattice_coordinates(tmp_path):
    """Untouched codebooks travel as int8 lattice coordinates (rebuilt exactly by the graph); a fine-tuned one as
    float32; both decode bit for bit."""
    gm, x = _compress("digits_cnn", "E8", 8)
    dlps = served_params(gm)
    with torch.no_grad():
        dlps[1].codebook.add_(1e-3)  # as fine-tuning would: no longer lattice points
        ref = gm(x).numpy()
    path = tmp_path / "m.onnx"
    to_onnx(gm, (x,), path, sidecar=False)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert inits[f"udnc/{dlps[0].fqn}/codebook_int"].dtype == np.int8
    assert f"udnc/{dlps[0].fqn}/codebook" not in inits
    assert inits[f"udnc/{dlps[1].fqn}/codebook"].dtype == np.float32
    assert f"udnc/{dlps[1].fqn}/codebook_int" not in inits
    expected = {d.fqn: d.materialize().numpy() for d in dlps}
    folded = _weights_from_graph(prepare_model(path, decode="ort"), list(expected))
    decoded = {i.name: numpy_helper.to_array(i) for i in prepare_model(path, decode="numpy").graph.initializer}
    for fqn, w in expected.items():
        np.testing.assert_array_equal(folded[fqn].view(np.uint32), w.view(np.uint32), err_msg=fqn)
        np.testing.assert_array_equal(decoded[fqn].view(np.uint32), w.view(np.uint32), err_msg=fqn)
    for sidecar in (False, True):
        to_onnx(gm, (x,), path, sidecar=sidecar)
        session = load_onnx(path, **_session_kwargs())
        assert _rel_err(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], ref) <= RTOL


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(16, 16)
        self.dec = nn.Linear(16, 16)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_tied_weights(tmp_path):
    torch.manual_seed(0)
    gm = udnc_fx.compress(_Tied().eval(), udnc_fx.CompressConfig(lattice="D4", relative_step=0.5)).eval()
    (dlp,) = served_params(gm)
    assert dlp.aliases
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = gm(x).numpy()
    for sidecar in (False, True):
        result = to_onnx(gm, (x,), tmp_path / "tied.onnx", sidecar=sidecar)
        assert result.tensors == [dlp.fqn]
        for decode in ("numpy", "ort"):
            session = load_onnx(tmp_path / "tied.onnx", decode=decode, **_session_kwargs())
            assert _rel_err(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], ref) <= RTOL


def test_runtime_needs_no_torch(tmp_path):
    """load_onnx (both paths, sidecar included) runs in a process where torch cannot be imported."""
    import subprocess
    import sys

    gm, x = _compress("digits_cnn", "E8", 8)
    to_onnx(gm, (x,), tmp_path / "side.onnx", sidecar=True)
    to_onnx(gm, (x,), tmp_path / "self.onnx", sidecar=False)
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        np.save(tmp_path / "ref.npy", gm(x).numpy())
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from udnc_fx.export import load_onnx
x, ref = np.load(r"{tmp_path / 'x.npy'}"), np.load(r"{tmp_path / 'ref.npy'}")
for name in ("side", "self"):
    for decode in ("numpy", "ort"):
        s = load_onnx(r"{tmp_path}/" + name + ".onnx", decode=decode, intra_op_num_threads=1)
        y = s.run(None, {{s.get_inputs()[0].name: x}})[0]
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), (name, decode)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

"""A zoo of architectures built here: each compresses, its outputs equal the materialized model's bit for bit,
and save/load round-trips onto a freshly initialised model of the same architecture.

What the pass does not compress (LSTM weights, MultiheadAttention's packed in_proj_weight) must show up as a
recorded skip with a reason, never be silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import udnc_fx
from udnc_fx import CompressConfig, UnsupportedModelError


# ----------------------------------------------------------------------------------------------------------------
# The architectures


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 10)
        )

    def forward(self, x):
        return self.net(x)


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for width in (16, "M", 32, 32, "M", 64):
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(Bottleneck(16, 8, 32, 1), Bottleneck(32, 8, 32, 1))
        self.layer2 = nn.Sequential(Bottleneck(32, 16, 64, 2), Bottleneck(64, 16, 64, 1))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MobileNet(nn.Module):
    """Depthwise-separable blocks (groups = channels) with ReLU6, as in MobileNet v1."""

    def __init__(self):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
            )

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(block(16, 32, 1), block(32, 64, 2), block(64, 64, 1))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()

        def double(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU()
            )

        self.enc1, self.enc2, self.mid = double(1, 8), double(8, 16), double(16, 32)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2 = double(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec1 = double(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


class LSTMLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 24)
        self.lstm = nn.LSTM(24, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 100)

    def forward(self, tokens):
        hidden, _ = self.lstm(self.embed(tokens))
        return self.head(hidden)


class TransformerEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.layer(self.proj(x)))


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight (as in many language models)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(80, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 80, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace ``if x.sum() > 0``."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Linear(16, 16)
        self.neg = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:
            return self.pos(x)
        return self.neg(x)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.gate = Gate()
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.gate(self.inp(x))))


class Audio1d(nn.Module):
    """1-D convolutions, one with reflect padding (a padding mode the graph rewrite keeps), dilation, stride."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 16, 5, padding=2, padding_mode="reflect")
        self.c2 = nn.Conv1d(16, 16, 3, dilation=2, padding=2, groups=4)
        self.c3 = nn.Conv1d(16, 32, 4, stride=2)
        self.up = nn.ConvTranspose1d(32, 8, 4, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(self.up(x).mean(-1))


class Video3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm3d(8)
        self.c2 = nn.Conv3d(8, 16, (1, 3, 3), stride=(1, 2, 2))
        self.up = nn.ConvTranspose3d(16, 4, 2, stride=2)
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
        return self.fc(self.up(x).mean(dim=(2, 3, 4)))


class FunctionalWeights(nn.Module):
    """Weights that are bare Parameters used through F.linear / F.conv2d (found in the graph, not by type)."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.w = nn.Parameter(torch.randn(10, 8) * 0.3)
        self.b = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.kernel, padding=1))
        return F.linear(x.mean(dim=(2, 3)), self.w, self.b)


# ----------------------------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    config: CompressConfig = field(default_factory=lambda: CompressConfig(target_bits=4.0))
    min_quantized: int = 1
    skipped: tuple[str, ...] = ()  # parameter fqns that must be recorded as skipped
    shared: tuple[str, ...] = ()  # parameter fqns that must be recorded as tied aliases
    trace: str = "torch.fx symbolic trace"  # how inspect() must say the model was handled (a prefix)


def _images(c, h):
    return lambda: (torch.randn(3, c, h, h),)


def _tokens(vocab, length=9):
    return lambda: (torch.randint(0, vocab, (2, length)),)


CASES = [
    Case("mlp", MLP, lambda: (torch.randn(5, 8, 8),), min_quantized=3),
    Case("lenet", LeNet, _images(1, 28), min_quantized=5),
    Case("vgg", VGG, _images(3, 16), min_quantized=5),
    Case("resnet_bottleneck", ResNet, _images(3, 16), min_quantized=16),
    Case("mobilenet_depthwise", MobileNet, _images(3, 32), min_quantized=8),
    Case("unet", UNet, _images(1, 16), min_quantized=13),
    Case(
        "lstm_lm",
        LSTMLanguageModel,
        _tokens(100),
        min_quantized=1,
        skipped=("lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1", "embed.weight"),
    ),
    Case(
        "transformer_encoder_layer",
        TransformerEncoder,
        lambda: (torch.randn(2, 7, 12),),
        min_quantized=5,  # proj, out_proj, linear1, linear2, head
        skipped=("layer.self_attn.in_proj_weight",),
    ),
    Case(
        "tied_embedding_head",
        TiedLM,
        _tokens(80),
        config=CompressConfig(target_bits=4.0, include_embeddings=True),
        min_quantized=2,
        shared=("head.weight",),
    ),
    Case(
        "control_flow_leaf",
        Branchy,
        lambda: (torch.randn(4, 8),),
        config=CompressConfig(target_bits=4.0, leaf_modules=(Gate,)),
        min_quantized=4,
    ),
    Case(
        "control_flow_module_swap",
        Branchy,
        lambda: (torch.randn(4, 8),),
        config=CompressConfig(target_bits=4.0, fallback="module_swap"),
        min_quantized=4,
        trace="module-swap fallback",
    ),
    Case("conv1d", Audio1d, lambda: (torch.randn(2, 2, 40),), min_quantized=5),
    Case("conv3d", Video3d, lambda: (torch.randn(2, 3, 4, 8, 8),), min_quantized=4),
    Case("functional_weights", FunctionalWeights, _images(3, 8), min_quantized=2),
]


def _fresh(case: Case, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = case.build()
    # Non-trivial BatchNorm statistics, so that a load that forgot them would show.
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(*case.inputs())
    return model.eval()


def _run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_zoo_compresses_materializes_and_round_trips(case: Case, tmp_path):
    model = _fresh(case, 0)
    torch.manual_seed(123)
    inputs = case.inputs()
    reference = _run(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    compressed = udnc_fx.compress(model, case.config, example_inputs=inputs)

    # The user's model is untouched.
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    report = udnc_fx.inspect(compressed)
    assert len(report.layers) >= case.min_quantized, str(report)
    assert report.trace and report.trace.startswith(case.trace), report.trace
    actions = {c["fqn"]: c for c in report.changes}
    for fqn in case.skipped:
        assert actions[fqn]["action"] == "skipped" and actions[fqn]["reason"], actions.get(fqn)
    for fqn in case.shared:
        assert actions[fqn]["action"] == "shared", actions.get(fqn)
    # Every multi-dimensional float parameter is accounted for: compressed, shared, or skipped with a reason.
    covered = {r.fqn for r in report.layers} | {f for f, c in actions.items() if c["action"] in ("shared", "skipped")}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.ndim >= 2:
            assert name in covered, f"{name} neither compressed nor recorded as skipped"

    out = _run(compressed, inputs)
    assert out.shape == reference.shape
    # Sanity, not exactness: 4 bits/weight keeps the outputs near the float model's.
    rel = (out - reference).norm() / reference.norm().clamp_min(1e-12)
    assert rel < 0.5, f"relative output error {rel:.3f}"

    # Folding the weights back to floats changes nothing.
    assert torch.equal(_run(udnc_fx.materialize(compressed), inputs), out)

    # The container round-trips onto a differently initialised model of the same architecture.
    path = tmp_path / f"{case.name}.udnc"
    udnc_fx.save(compressed, path)
    loaded = udnc_fx.load(path, _fresh(case, 1))
    assert torch.equal(_run(loaded, inputs), out)
    assert udnc_fx.inspect(loaded).trace.startswith(case.trace)
    sizes = udnc_fx.size_report(path)
    assert sizes["weights_ratio"] > 1.0 and sizes["file_bytes"] == path.stat().st_size


def test_control_flow_with_fallback_error_is_an_error_that_names_the_remedy():
    with pytest.raises(UnsupportedModelError) as info:
        udnc_fx.compress(Branchy(), CompressConfig(target_bits=4.0, fallback="error"))
    message = str(info.value)
    assert "gate" in message and "Gate" in message
    assert "leaf_modules" in message and "module_swap" in message


def test_leaf_module_weights_are_served_by_parametrization_and_recorded():
    compressed = udnc_fx.compress(Branchy(), CompressConfig(target_bits=4.0, leaf_modules=(Gate,)))
    reasons = {c["fqn"]: c["reason"] for c in udnc_fx.inspect(compressed).changes if c["action"] == "quantized"}
    assert "parametrized inside leaf" in reasons["gate.pos.weight"]
    assert "via graph" in reasons["inp.weight"]


def test_lstm_weights_are_left_float_and_the_head_is_compressed():
    model = _fresh(CASES[6], 0)
    compressed = udnc_fx.compress(model, CompressConfig(target_bits=4.0))
    lstm = compressed.get_submodule("lstm")
    assert isinstance(lstm, nn.LSTM)
    assert torch.equal(lstm.weight_ih_l0, model.lstm.weight_ih_l0)
    assert [r.fqn for r in udnc_fx.inspect(compressed).layers] == ["head.weight"]


def test_multihead_attention_is_a_leaf_out_proj_parametrized_in_proj_skipped():
    compressed = udnc_fx.compress(_fresh(CASES[7], 0), CompressConfig(target_bits=4.0))
    changes = {c["fqn"]: c for c in udnc_fx.inspect(compressed).changes}
    out_proj = changes["layer.self_attn.out_proj.weight"]["reason"]
    assert "parametrized inside leaf of 'layer.self_attn.out_proj'" in out_proj
    assert changes["layer.self_attn.in_proj_weight"]["action"] == "skipped"
    assert "MultiheadAttention.in_proj_weight" in changes["layer.self_attn.in_proj_weight"]["reason"]
    assert "via graph" in changes["proj.weight"]["reason"]

"""Tests of BatchNorm folding: outputs equal the unfolded eval-mode model, conv without bias, Linear → BatchNorm1d,
unmatched BatchNorms left alone with a reason, and the folded model compressing, saving and loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import udnc_fx
from udnc_fx.demo import DigitsCNN
from udnc_fx.passes.fold import fold_batchnorm, fold_report


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g))
                    m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model


def bn_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_digits_cnn_folds_and_matches():
    torch.manual_seed(0)
    model = randomise_bn(DigitsCNN()).eval()
    x = torch.rand(8, 1, 8, 8)
    gm = fold_batchnorm(model)
    assert isinstance(gm, fx.GraphModule)
    assert bn_modules(gm) == []
    assert [(r.bn, r.layer, r.folded) for r in fold_report(gm)] == [("bn1", "conv1", True), ("bn2", "conv2", True)]
    assert torch.allclose(gm(x), model(x), atol=1e-5, rtol=1e-5)
    # the input is untouched
    assert bn_modules(model) == ["bn1", "bn2"]
    params = sum(p.numel() for p in gm.parameters())
    assert params == sum(p.numel() for p in model.parameters()) - 2 * (16 + 32)


class ConvNoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False, groups=3)
        self.bn = nn.BatchNorm2d(6)
        self.conv1d = nn.Conv1d(6, 4, 1)
        self.bn1d = nn.BatchNorm1d(4, affine=False)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.bn1d(self.conv1d(y.flatten(2)))


def test_conv_without_bias_grouped_and_non_affine_bn():
    torch.manual_seed(1)
    model = randomise_bn(ConvNoBias()).eval()
    x = torch.randn(4, 3, 7, 7)
    gm = fold_batchnorm(model)
    assert bn_modules(gm) == []
    assert gm.conv.bias is not None and gm.conv.bias.shape == (6,)
    assert torch.allclose(gm(x), model(x), atol=1e-5, rtol=1e-5)


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_batchnorm1d_needs_and_uses_shapes():
    torch.manual_seed(2)
    model = randomise_bn(LinearBN()).eval()
    x = torch.randn(6, 10)
    left = fold_batchnorm(model)
    (rec,) = fold_report(left)
    assert not rec.folded and "example_inputs" in rec.reason
    assert bn_modules(left) == ["bn"]
    assert torch.equal(left(x), model(x))
    gm = fold_batchnorm(model, example_inputs=(x,))
    assert fold_report(gm)[0].folded and bn_modules(gm) == []
    assert torch.allclose(gm(x), model(x), atol=1e-5, rtol=1e-5)


class Linear3D(nn.Module):
    """BatchNorm1d over a (N, C, L) Linear output normalises C, not the Linear's features: must not fold."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_with_3d_output_is_left_alone():
    model = randomise_bn(Linear3D()).eval()
    x = torch.randn(2, 5, 5)
    gm = fold_batchnorm(model, example_inputs=x)
    (rec,) = fold_report(gm)
    assert not rec.folded and "rank 3" in rec.reason
    assert torch.equal(gm(x), model(x))


class Unmatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn_shared_input = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.bn_no_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn_twice = nn.BatchNorm2d(4)
        self.conv4 = nn.Conv2d(4, 4, 1)
        self.bn_input = nn.BatchNorm2d(3)

    def forward(self, x):
        x = self.bn_input(x)  # follows no layer
        a = self.conv(x)
        y = self.bn_shared_input(a) + a  # conv output used twice
        y = self.bn_after_relu(F.relu(self.conv2(y)))
        y = self.bn_no_stats(self.conv3(y))
        z = self.conv4(y)
        return self.bn_twice(self.bn_twice(z))


def test_unmatched_batchnorms_are_left_alone_with_reasons():
    torch.manual_seed(3)
    model = randomise_bn(Unmatched()).eval()
    x = torch.randn(2, 3, 9, 9)
    gm = fold_batchnorm(model)
    reasons = {r.bn: r.reason for r in fold_report(gm)}
    assert not any(r.folded for r in fold_report(gm))
    assert "placeholder" in reasons["bn_input"]
    assert "also used" in reasons["bn_shared_input"]
    assert "call_function" in reasons["bn_after_relu"]
    assert "running statistics" in reasons["bn_no_stats"]
    assert "called 2 times" in reasons["bn_twice"]
    assert set(bn_modules(gm)) == set(bn_modules(model))
    assert torch.equal(gm(x), model(x))


def test_train_mode_is_kept_and_eval_semantics_folded():
    torch.manual_seed(4)
    model = randomise_bn(DigitsCNN()).train()
    gm = fold_batchnorm(model)
    assert gm.training and model.training
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(gm.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_folded_model_compresses_saves_and_loads(tmp_path):
    torch.manual_seed(5)
    model = randomise_bn(DigitsCNN()).eval()
    folded = fold_batchnorm(model)
    gm = udnc_fx.compress(folded, udnc_fx.CompressConfig(target_bits=4.0))
    path = tmp_path / "f.udnc"
    udnc_fx.save(gm, path)
    names = {e["name"] for e in udnc_fx.read_header(path)["raw"]}
    assert names == {"conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"}
    # load() needs the folded architecture: fold a fresh model the same way
    loaded = udnc_fx.load(path, fold_batchnorm(DigitsCNN()).eval())
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), gm(x))


def test_not_a_module():
    with pytest.raises(udnc_fx.ConfigError, match=r"fold_batchnorm\(\) needs an nn.Module, got str"):
        fold_batchnorm("model")

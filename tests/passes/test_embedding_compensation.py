"""Error-compensating rounding of Embedding weights with an output-sensitivity ``H`` (``compensate_embeddings``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import udnc_fx
from udnc_fx import CompressConfig, ConfigError
from udnc_fx.api import _calibrate
from udnc_fx.passes.calibrate import as_batches
from udnc_fx.passes.compensate import output_error
from udnc_fx.passes.materialize import served_params

EMB = "emb.weight"


class Encoder(nn.Module):
    """Embedding → LayerNorm with uneven gains → Linear, per token (what a transformer's embedding block feeds)."""

    def __init__(self, vocab=200, d=32, out=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, out)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            self.norm.weight.copy_(torch.exp(1.5 * torch.randn(d, generator=g)))  # gains spread ~e^±3
            self.fc.weight.copy_(torch.randn(out, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5)

    def forward(self, input_ids, attention_mask=None):
        return self.fc(self.norm(self.emb(input_ids)))


def _batches(seed, n=8, b=16, t=24, vocab=200):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (b, t), generator=g)
        lengths = torch.randint(4, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _decoded(model) -> dict[str, np.ndarray]:
    return {dlp.fqn: dlp().detach().double().numpy() for dlp in served_params(model)}


def _output_mse(model, out, batches) -> float:
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            diff = (out(**batch) - model(**batch)).double()[batch["attention_mask"].bool()]
            total += float((diff**2).sum())
            count += diff.numel()
    return total / count


def test_sensitivity_h_matches_the_jacobian_of_a_linear_head():
    """For a model linear in the embedding output (y = A e per token), G = E[JᵀJ] = AᵀA exactly; the random
    projection estimate converges to it."""
    torch.manual_seed(0)

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 6)
            self.fc = nn.Linear(6, 5, bias=False)

        def forward(self, input_ids, attention_mask=None):
            return self.fc(self.emb(input_ids))

    model = Lin().eval()
    batches = _batches(0, n=12, b=64, t=16, vocab=50)
    calib = _calibrate(model, CompressConfig(target_bits=3.0, include_embeddings=True, allocate=False),
                       as_batches(batches))
    rec = calib.inputs[EMB]
    assert rec.source == "output"
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert rec.rows == real  # padded positions left out (mask_padding)
    A = model.fc.weight.detach().double().numpy()
    G = rec.hessian(0)
    assert np.allclose(G, A.T @ A, rtol=0, atol=0.06 * np.abs(A.T @ A).max()), (G, A.T @ A)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compensated_embedding_lowers_held_out_output_error_at_equal_rate(seed):
    torch.manual_seed(seed)
    model = Encoder().eval()
    calibration, held_out = _batches(seed, n=4), _batches(100 + seed, n=4)
    err, bits, reason = {}, {}, {}
    for on in (False, True):
        cfg = CompressConfig(target_bits=3.0, seed=seed, include_embeddings=True, allocate=False,
                             compensate_embeddings=on)
        out = udnc_fx.compress(model, cfg, calibration=calibration)
        err[on] = _output_mse(model, out, held_out)
        bits[on] = udnc_fx.inspect(out).mean_entropy_bits
        reason[on] = next(c.reason for c in udnc_fx.compression_record(out)["changes"] if c.fqn == EMB)
    assert "plain rounding" in reason[False] and "no input second moment" in reason[False]
    assert "compensated rounding (output-sensitivity H from" in reason[True]
    assert abs(bits[True] - bits[False]) < 0.03
    assert err[True] < 0.8 * err[False], err  # measured 0.59-0.65 (seeds 0-3)


def test_rows_no_calibration_token_reaches_are_compensated_too():
    """G is shared by every row: tokens absent from calibration get the same benefit (held-out tokens only)."""
    torch.manual_seed(0)
    model = Encoder().eval()
    calibration = [{k: v.clamp(max=99) if k == "input_ids" else v for k, v in b.items()} for b in _batches(0)]
    unseen = [{k: (v % 100) + 100 if k == "input_ids" else v for k, v in b.items()} for b in _batches(7)]
    errs = {}
    for on in (False, True):
        cfg = CompressConfig(target_bits=3.0, include_embeddings=True, allocate=False, compensate_embeddings=on)
        errs[on] = _output_mse(model, udnc_fx.compress(model, cfg, calibration=calibration), unseen)
    assert errs[True] < 0.8 * errs[False], errs


def test_embedding_compensation_bytes_reproducible(tmp_path):
    model = Encoder().eval()
    cfg = CompressConfig(target_bits=3.0, include_embeddings=True)
    paths = []
    for i in range(2):
        out = udnc_fx.compress(model, cfg, calibration=_batches(0))
        paths.append(tmp_path / f"{i}.udnc")
        udnc_fx.save(out, paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    loaded = udnc_fx.load(paths[0], Encoder())
    assert np.array_equal(_decoded(loaded)[EMB], _decoded(out)[EMB])


def test_embedding_of_the_decoded_weight_matches_the_output_error_model():
    """The compensated table's output error under G is what the rounding minimised: below plain rounding's."""
    torch.manual_seed(3)
    model = Encoder().eval()
    batches = _batches(3)
    calib = _calibrate(model, CompressConfig(target_bits=3.0, include_embeddings=True), as_batches(batches))
    G = calib.inputs[EMB].hessian(0)
    w = model.emb.weight.detach().double().numpy()
    errs = {}
    for on in (False, True):
        cfg = CompressConfig(target_bits=3.0, include_embeddings=True, allocate=False, compensate_embeddings=on)
        errs[on] = output_error(w, _decoded(udnc_fx.compress(model, cfg, calibration=batches))[EMB], G)
    assert errs[True] < 0.7 * errs[False], errs


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(60, 16)
        self.head = nn.Linear(16, 60, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids):
        return self.head(torch.tanh(self.emb(input_ids)))


def test_tied_head_keeps_plain_rounding_with_its_reason():
    model = TiedHead().eval()
    ids = [torch.randint(0, 60, (8, 12), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    out = udnc_fx.compress(model, CompressConfig(target_bits=3.0, include_embeddings=True), calibration=ids)
    reason = next(c.reason for c in udnc_fx.compression_record(out)["changes"] if c.action == "quantized")
    assert "plain rounding" in reason and "tied" in reason


class IntegerOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, input_ids):
        return self.fc(self.emb(input_ids)).argmax(-1)


def test_output_without_gradient_falls_back_to_plain_rounding_recorded():
    model = IntegerOut().eval()
    ids = [torch.randint(0, 40, (16, 8), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    out = udnc_fx.compress(model, CompressConfig(target_bits=3.0, include_embeddings=True, allocate=False,
                                                 compensate=True), calibration=ids)
    reason = next(c.reason for c in udnc_fx.compression_record(out)["changes"] if c.fqn == EMB)
    assert "plain rounding" in reason and "output sensitivity unavailable" in reason
    assert all(p.requires_grad for p in model.parameters())  # the user's model untouched


def test_switch_validated_and_round_trips():
    with pytest.raises(ConfigError):
        CompressConfig(compensate_embeddings=1)
    cfg = CompressConfig(compensate_embeddings=False)
    assert CompressConfig.from_dict(cfg.to_dict()).compensate_embeddings is False
    assert CompressConfig().compensate_embeddings is True


def test_sequential_mode_keeps_the_embedding_compensated():
    model = Encoder().eval()
    batches = _batches(0, n=4)
    cfg = CompressConfig(target_bits=3.0, include_embeddings=True, allocate=False, sequential=True)
    out = udnc_fx.compress(model, cfg, calibration=batches)
    reason = next(c.reason for c in udnc_fx.compression_record(out)["changes"] if c.fqn == EMB)
    assert "compensated rounding (float-model H: no stage re-measures it" in reason
    plain = udnc_fx.compress(model, cfg.replace(compensate_embeddings=False), calibration=batches)
    assert _output_mse(model, out, _batches(9, n=4)) < 0.8 * _output_mse(model, plain, _batches(9, n=4))

"""Distilling a compressed transformers encoder against its float model (``udnc_fx.hf.distill_encoder``), on a tiny
BERT with random weights: the output error on held-out inputs falls, pruned weights stay exactly 0, biases and
LayerNorm parameters are stored as trained, and the saved file reloads bit for bit."""

from __future__ import annotations

import pytest
import torch
import transformers

import udnc_fx
from udnc_fx import ConfigError, PassError, hf

transformers.logging.set_verbosity_error()

from transformers import BertConfig, BertModel  # noqa: E402

BERT = dict(
    vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
)


def _bert(seed=0):
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**BERT), add_pooling_layer=False).eval()
    with torch.no_grad():  # prune a third of the FFN weights so that the exact-zero codeword is in use
        w = model.encoder.layer[0].intermediate.dense.weight
        w.masked_fill_(w.abs() < w.abs().flatten().quantile(1 / 3), 0.0)
    return model


def _batches(seed, count, size=8, length=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, BERT["vocab_size"], (size, length), generator=g)
        mask = torch.ones_like(ids)
        lengths = torch.randint(3, length + 1, (size,), generator=g)
        mask[torch.arange(length)[None, :] >= lengths[:, None]] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def _token_error(model, teacher, batches):
    with torch.no_grad():
        return sum(
            float(hf.masked_token_mse(hf.TokenStates(model)(**b), hf.TokenStates(teacher)(**b))) for b in batches
        ) / len(batches)


def _compressed(teacher, bits=2.5):
    return udnc_fx.compress(teacher, hf.transformer_config(target_bits=bits, exact_zero=True, seed=3))


@pytest.mark.parametrize("loss", ["tokens", "cosine"])
def test_distillation_lowers_the_held_out_error_keeps_zeros_and_reloads_bit_exact(loss, tmp_path):
    teacher = _bert()
    student = _compressed(teacher)
    train, held = _batches(1, 16), _batches(2, 4)
    pruned = teacher.encoder.layer[0].intermediate.dense.weight == 0
    assert pruned.any()
    before = _token_error(student, teacher, held)
    norm_before = student.encoder.layer[1].output.LayerNorm.weight.detach().clone()
    dropout_rates = [m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)]

    result = hf.distill_encoder(student, teacher, train, loss=loss, epochs=6, lr=1e-3, progress=False)

    after = _token_error(student, teacher, held)
    assert after < 0.75 * before, (before, after)
    assert result.steps == 6 * len(train)
    assert not student.training and not any(m.training for m in teacher.modules())  # modes restored
    assert [m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)] == dropout_rates  # restored
    assert not torch.equal(student.encoder.layer[1].output.LayerNorm.weight, norm_before)  # norms trained
    served = dict(udnc_fx.materialize(student).named_parameters())
    assert torch.all(served["encoder.layer.0.intermediate.dense.weight"][pruned] == 0)  # exact zeros kept

    path = tmp_path / "distilled.udnc"
    udnc_fx.save(student, path)
    loaded = udnc_fx.load(path, _bert(seed=9))
    state, loaded_state = udnc_fx.materialize(student).state_dict(), udnc_fx.materialize(loaded).state_dict()
    assert state.keys() == loaded_state.keys()
    for k in state:  # trained codewords, biases and norms stored as trained: the same model, bit for bit
        assert torch.equal(state[k], loaded_state[k]), k
    for b in held:
        assert torch.equal(hf.encoder_output(loaded(**b)), hf.encoder_output(student(**b)))


def test_held_out_selection_never_leaves_the_model_worse_on_the_held_out_text():
    teacher = _bert()
    student = _compressed(teacher)
    held = _batches(2, 2)

    def cosine():
        return float(torch.cat([torch.nn.functional.cosine_similarity(
            hf.mean_pooled_embeddings(student, b).double(), hf.mean_pooled_embeddings(teacher, b).double(), dim=1)
            for b in held]).mean())

    start = cosine()
    # a far too high learning rate makes the epochs worse than the start: epoch 0 (as given) is kept
    result = hf.distill_encoder(student, teacher, _batches(1, 4), eval_batches=held, epochs=2, lr=0.5,
                                progress=False, codebook="table")
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.history[0]["metric"] == pytest.approx(start, abs=1e-12)
    assert result.best_metric == max(h["metric"] for h in result.history)
    assert cosine() == pytest.approx(result.best_metric, abs=1e-12)  # the kept state is the best epoch's


def test_bad_arguments_raise_typed_errors():
    teacher = _bert()
    student = _compressed(teacher)
    train = _batches(1, 1)
    with pytest.raises(ConfigError, match="loss must be one of"):
        hf.distill_encoder(student, teacher, train, loss="kl")
    with pytest.raises(ConfigError, match="sets 'distill' itself"):
        hf.distill_encoder(student, teacher, train, distill="mse")
    with pytest.raises(ConfigError, match="at least one"):
        hf.distill_encoder(student, teacher, [])
    with pytest.raises(ConfigError, match="input_ids and attention_mask"):
        hf.distill_encoder(student, teacher, [{"input_ids": train[0]["input_ids"]}])
    with pytest.raises(PassError, match="no DitheredLatticeParam"):
        hf.distill_encoder(_bert(), teacher, train, progress=False)

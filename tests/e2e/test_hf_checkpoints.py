"""Hugging Face checkpoints end to end, as a user has them: a ``save_pretrained`` directory (sharded too) goes
``udnc compress`` → ``.udnc`` → ``udnc decompress`` → ``from_pretrained`` → ``generate()``/forward.

GPT-2 and BERT are built from small configs with random weights (nothing is downloaded; ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import safetensors  # noqa: F401 -- installed with the test extra (transformers needs it): missing must fail
import transformers

import udnc_fx
from udnc_fx import hf_io

transformers.logging.set_verbosity_error()
from transformers import BertConfig, BertModel, BertTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

UDNC = [sys.executable, "-m", "udnc_fx.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
GPT2 = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=120, n_positions=32, bos_token_id=0, eos_token_id=0)
BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
WORDS = ("the a cat dog sat ran on under mat tree big small red blue quickly slowly and or is was "
         "house car bird sky river stone light dark happy sad").split()
SENTENCES = ["the cat sat on the mat", "a big dog ran under the tree", "the red car is small",
             "a blue bird and a dark sky", "the river was quickly dark", "a happy dog sat on a stone",
             "the small house is blue", "a sad bird ran slowly"]


def _udnc(args, cwd, expect=0):
    proc = subprocess.run(UDNC + args, cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2") / "ckpt"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2)).eval()
    model.save_pretrained(path, max_shard_size="40KB")  # sharded: model.safetensors.index.json + shards
    assert (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    path = root / "ckpt"
    torch.manual_seed(1)
    BertModel(BertConfig(**BERT)).eval().save_pretrained(path)
    BertTokenizer(str(vocab)).save_pretrained(path)
    return path


def _tokens(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, GPT2["vocab_size"], (2, 9), generator=g)


def test_gpt2_directory_compress_decompress_from_pretrained_generate(gpt2_dir, tmp_path):
    np.save(tmp_path / "ids.npy", _tokens(7).numpy())  # calibration: token ids (a tensor file)
    out, _ = _udnc(["compress", str(gpt2_dir), "--out", "g.udnc", "--bits", "6", "--calibration", "ids.npy"],
                   tmp_path)
    assert "transformer.h.0.attn.c_attn.weight" in out and "transformer.wte.weight" in out  # Conv1D, embeddings
    assert "module-swap fallback" in out
    header = udnc_fx.read_header(tmp_path / "g.udnc")
    assert header["metadata"]["huggingface"]["architecture"] == "GPT2LMHeadModel"
    _udnc(["decompress", "g.udnc", "--out", "decoded"], tmp_path)
    decoded = GPT2LMHeadModel.from_pretrained(tmp_path / "decoded").eval()
    assert decoded.lm_head.weight.data_ptr() == decoded.transformer.wte.weight.data_ptr()  # tied, as HF expects
    original = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    compressed = hf_io.from_udnc(tmp_path / "g.udnc", materialize=False)
    x = _tokens()
    with torch.no_grad():
        want, got, ref = compressed(x).logits, decoded(x).logits, original(x).logits
    assert torch.equal(got, want)  # the standard checkpoint holds exactly the compressed weights
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99, float(cos)
    gen = decoded.generate(x[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, compressed.generate(x[:1], max_new_tokens=6, do_sample=False, pad_token_id=0))
    # nothing is overwritten
    _, err = _udnc(["decompress", "g.udnc", "--out", "decoded"], tmp_path, expect=2)
    assert "not an empty directory" in err
    # ONNX straight from the .udnc (no --model: the architecture is in the file), dynamic batch and sequence
    _udnc(["export", "g.udnc", "--example-shape", "1x9", "--example-dtype", "int64", "--out", "g.onnx",
           "--self-contained", "--input-names", "input_ids", "--output-names", "logits",
           "--dynamic-axis", "input_ids:0=batch", "--dynamic-axis", "input_ids:1=sequence"], tmp_path)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    y = _tokens(11)[:, :6]
    with torch.no_grad():
        want = compressed(y).logits.numpy()
    assert np.abs(session.run(["logits"], {"input_ids": y.numpy()})[0] - want).max() < 1e-4


def test_bert_directory_with_sentences_calibration_and_finetune(bert_dir, tmp_path):
    (tmp_path / "calib.txt").write_text("\n".join(SENTENCES) + "\n")
    out, _ = _udnc(["compress", str(bert_dir), "--out", "b.udnc", "--bits", "5", "--calibration", "calib.txt",
                    "--finetune-epochs", "1", "--batch-size", "4"], tmp_path)
    assert "step allocation: probe" in out and "fine-tuned the codewords" in out
    assert "embeddings.word_embeddings.weight" in out
    _udnc(["decompress", "b.udnc", "--out", "decoded"], tmp_path)
    decoded = BertModel.from_pretrained(tmp_path / "decoded").eval()
    original = BertModel.from_pretrained(bert_dir).eval()
    tok = BertTokenizer.from_pretrained(bert_dir)
    batch = dict(tok(["the dog is happy", "a river under the dark sky"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        got, ref = decoded(**batch).last_hidden_state, original(**batch).last_hidden_state
        want = hf_io.from_udnc(tmp_path / "b.udnc")(**batch).last_hidden_state
    assert torch.equal(got, want)
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=1)
    assert cos.min() > 0.98, cos
    # ONNX with the entropy-coded sidecar, two named inputs
    _udnc(["export", "b.udnc", "--example-shape", "2x7", "2x7", "--example-dtype", "int64", "--out", "bert.onnx",
           "--input-names", "input_ids,attention_mask", "--output-names", "hidden", "--dynamic-batch",
           "--dynamic-axis", "input_ids:1=sequence", "--dynamic-axis", "attention_mask:1=sequence",
           "--dynamic-axis", "hidden:1=sequence"], tmp_path)
    from udnc_fx.export import load_onnx

    session = load_onnx(tmp_path / "bert.onnx")
    feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
    with torch.no_grad():
        want = decoded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert np.abs(session.run(["hidden"], feeds)[0] - want.numpy()).max() < 1e-4


def test_python_round_trip_and_save_pretrained_of_a_compressed_model(gpt2_dir, tmp_path):
    model = hf_io.load_checkpoint_dir(gpt2_dir)
    with pytest.warns(UserWarning, match="module swap"):
        gm = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=5.0))
    udnc_fx.save(gm, tmp_path / "g.udnc", metadata=hf_io.hf_metadata(model))
    back = udnc_fx.from_udnc(tmp_path / "g.udnc")  # one call, a plain transformers model
    assert type(back) is GPT2LMHeadModel and not udnc_fx.passes.materialize.served_params(back)
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(back(x).logits, gm(x).logits)
    with pytest.warns(UserWarning, match="udnc_fx.save"):
        gm.save_pretrained(tmp_path / "sp")  # works: the decoded float weights, with a pointer to udnc_fx.save
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "sp").eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, gm(x).logits)


def test_non_hf_model_decompresses_to_a_state_dict(tmp_path):
    from safetensors.torch import load_file

    from udnc_fx.demo import DigitsCNN

    _udnc(["compress", "udnc_fx.demo:DigitsCNN", "--out", "m.udnc", "--quiet"], tmp_path)
    _, err = _udnc(["decompress", "m.udnc", "--out", "decoded"], tmp_path, expect=2)
    assert ".safetensors" in err
    _udnc(["decompress", "m.udnc", "--out", "m.safetensors"], tmp_path)
    model = DigitsCNN().eval()
    model.load_state_dict(load_file(tmp_path / "m.safetensors"))
    loaded = udnc_fx.load(tmp_path / "m.udnc", DigitsCNN().eval())
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.slow
def test_factory_weights_with_a_tied_head_load(tmp_path):
    """save_pretrained stores GPT-2's tied lm_head once; --weights must accept that (strict loading did not)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "w.safetensors")
    (tmp_path / "gpt2_factory.py").write_text(
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        f"def make():\n    return GPT2LMHeadModel(GPT2Config(**{GPT2!r}))\n"
    )
    out, _ = _udnc(["compress", "gpt2_factory:make", "--weights", "w.safetensors", "--out", "g.udnc", "--bits", "5"],
                   tmp_path)
    assert "wrote g.udnc" in out
    loaded = hf_io.from_udnc(tmp_path / "g.udnc")
    assert torch.allclose(loaded.transformer.wte.weight, model.transformer.wte.weight, atol=0.05)


def test_exporting_a_raw_transformers_model_names_the_problem_and_the_fix(gpt2_dir, tmp_path):
    from udnc_fx.export import to_onnx

    model = hf_io.load_checkpoint_dir(gpt2_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=5.0))
    x = _tokens()
    with pytest.raises(udnc_fx.ExportError, match="tensor_io"):
        to_onnx(gm, x, tmp_path / "raw.onnx", sidecar=False)
    export = to_onnx(hf_io.tensor_io(gm), x, tmp_path / "ok.onnx", sidecar=False, decoded=True)
    import onnxruntime as ort

    got = ort.InferenceSession(export.onnx_path, providers=["CPUExecutionProvider"]).run(None, {
        ort.InferenceSession(export.onnx_path).get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - gm(x).numpy()).max() < 1e-4

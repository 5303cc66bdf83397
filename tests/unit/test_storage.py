"""``udnc_fx.save`` writes the short header: no derivable key, lattice, codebook encoding or config; the context
coder for index streams; and ``load`` gets back exactly what was saved."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import udnc_fx
from udnc_fx.coding.header_codec import decompress_header
from udnc_fx.demo import DigitsCNN
from udnc_fx.passes.fold import fold_batchnorm
from udnc_fx.passes.prune import prune


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stored_header(path) -> dict:
    data = path.read_bytes()
    length = struct.unpack_from("<I", data, 12)[0]
    return json.loads(decompress_header(data[88 : 88 + length], 1 << 26))  # save stores it compressed (1.5)


def pruned_model(seed: int = 0, unit_scales: bool = False):
    torch.manual_seed(seed)
    model = fold_batchnorm(DigitsCNN().eval())
    if unit_scales:  # as after training: some output units matter far more than others
        with torch.no_grad():
            model.fc1.weight.mul_(torch.tensor([0.2, 1.0, 2.0, 4.0]).repeat(16)[:, None])
    config = udnc_fx.CompressConfig(exact_zero=True, seed=seed, target_bits=1.2)
    pruned, _ = prune(model, 0.8, config=config)
    return pruned, config


@pytest.mark.parametrize("seed", [0, 7])
def test_save_writes_the_short_header_and_loads_bit_exact(tmp_path, seed):
    pruned, config = pruned_model(seed)
    gm = udnc_fx.compress(pruned, config)
    path = tmp_path / "m.udnc"
    size = udnc_fx.save(gm, path)
    header = stored_header(path)
    # no config; the untouched codebooks' integer coordinates are named once for the file, and so is the coder when
    # the most used one is not the format's default (range-context-v1)
    resolved = udnc_fx.read_header(path)
    coders = [q["indices"]["coder"] for q in resolved["quantized"]]
    file_coder = {"coder"} if coders.count("ans-dither-v2") > coders.count("range-context-v1") else set()
    assert set(header) == ({"quantized", "raw", "codebook_encoding"} | file_coder | ({"seed"} if seed else set()))
    assert header.get("seed", 0) == seed and header["codebook_encoding"] == "lattice-int"
    for entry in header["quantized"]:  # key, lattice, codebook: defaults; the coder only where it is not the file's
        assert set(entry) - {"fqn", "shape", "step", "indices", "zero_index"} == set()
        assert set(entry) >= {"fqn", "shape", "step", "indices", "zero_index"}
    assert header["raw"] == [["conv1.bias", [16]], ["conv2.bias", [32]], ["fc1.bias", [64]], ["fc2.bias", [10]]]
    # "auto" (save's default): per tensor, the smaller stream of ans-dither-v2 and range-context-v1
    assert udnc_fx.storage.SAVE_CODER == "auto"
    lengths = {}
    for coder in ("ans-dither-v2", "range-context-v1"):
        udnc_fx.save(gm, tmp_path / f"{coder}.udnc", coder=coder)
        lengths[coder] = [q["indices"]["length"] for q in udnc_fx.read_header(tmp_path / f"{coder}.udnc")["quantized"]]
    for i, q in enumerate(resolved["quantized"]):
        best = min(lengths, key=lambda c: (lengths[c][i], c != "ans-dither-v2"))  # a tie keeps ans-dither-v2
        assert (q["indices"]["coder"], q["indices"]["length"]) == (best, lengths[best][i])
    assert resolved["header_length"] < resolved["header_json_length"]  # stored compressed (format 1.5)
    loaded = udnc_fx.load(path, fold_batchnorm(DigitsCNN()).eval())
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(loaded(x), gm(x))
    assert size == path.stat().st_size


def test_context_coder_beats_the_flat_coder_on_a_pruned_model(tmp_path):
    pruned, config = pruned_model(unit_scales=True)
    gm = udnc_fx.compress(pruned, config)
    udnc_fx.save(gm, tmp_path / "a.udnc", coder="range-context-v1")
    udnc_fx.save(gm, tmp_path / "b.udnc", coder="range-adaptive-v1")
    assert stored_header(tmp_path / "b.udnc")["coder"] == "range-adaptive-v1"  # named once, for every entry
    context, flat = (
        {q["fqn"]: q["indices"]["length"] for q in stored_header(tmp_path / name)["quantized"]}
        for name in ("a.udnc", "b.udnc")
    )
    assert context["fc1.weight"] < 0.9 * flat["fc1.weight"]  # rows of different density: the row mode
    for fqn in ("conv1.weight", "conv2.weight", "fc2.weight"):
        assert context[fqn] <= flat[fqn] + 1  # otherwise the flat mode, one byte more


def test_full_config_and_float16_options(tmp_path):
    pruned, config = pruned_model()
    gm = udnc_fx.compress(pruned, config)
    plain = {"compress_header": False}  # the JSON's own bytes, as stored before format 1.5
    short = udnc_fx.save(gm, tmp_path / "s.udnc", **plain)
    full = udnc_fx.save(gm, tmp_path / "f.udnc", full_config=True, **plain)
    stored = stored_header(tmp_path / "f.udnc")["config"]
    assert stored["exact_zero"] is True and stored["target_bits"] == 1.2 and stored["version"] == 1
    assert full - short == len(json.dumps({"config": stored}, separators=(",", ":"))) - 1  # "," + "config":{...}
    half = udnc_fx.save(gm, tmp_path / "h.udnc", raw_float_dtype="float16", **plain)
    assert short - half == 2 * (16 + 32 + 64 + 10) - len(',"raw_float16":true')
    loaded = udnc_fx.load(tmp_path / "h.udnc", fold_batchnorm(DigitsCNN()).eval())
    assert torch.equal(loaded.fc1.bias, gm.fc1.bias.half().float())
    # a module-swap model records what load needs to rebuild it
    gm2 = udnc_fx.compress(pruned, config.replace(fallback="module_swap"))
    udnc_fx.save(gm2, tmp_path / "m.udnc")
    assert stored_header(tmp_path / "m.udnc")["config"] == {"fallback": "module_swap"}


def test_round_for_storage_makes_the_model_what_the_file_holds(tmp_path):
    from udnc_fx.storage import round_for_storage
    from udnc_fx.passes.finetune import finetune

    pruned, config = pruned_model()
    gm = udnc_fx.compress(pruned, config)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    finetune(gm, [(x, y)], torch.nn.functional.cross_entropy, epochs=1, lr=1e-2, train_bias=True, progress=False)
    with pytest.raises(udnc_fx.ConfigError):
        round_for_storage(gm, raw_float_dtype="bfloat16")
    round_for_storage(gm, raw_float_dtype="float16", codebook_float_dtype="float16")
    udnc_fx.save(gm, tmp_path / "h.udnc", raw_float_dtype="float16", codebook_float_dtype="float16")
    assert stored_header(tmp_path / "h.udnc")["codebook_encoding"] == "f16"
    loaded = udnc_fx.load(tmp_path / "h.udnc", fold_batchnorm(DigitsCNN()).eval())
    assert torch.equal(loaded(x), gm.eval()(x))  # bit for bit: the in-memory model holds the stored values


def test_a_loaded_model_saves_to_the_same_bytes(tmp_path):
    pruned, config = pruned_model(seed=7)
    gm = udnc_fx.compress(pruned, config)
    first = tmp_path / "a.udnc"
    udnc_fx.save(gm, first)
    loaded = udnc_fx.load(first, fold_batchnorm(DigitsCNN()).eval())
    udnc_fx.save(loaded, tmp_path / "b.udnc")
    assert (tmp_path / "b.udnc").read_bytes() == first.read_bytes()  # keys still derived from seed 7, not stored

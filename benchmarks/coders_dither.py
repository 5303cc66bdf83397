"""Dither-conditional coding on real index streams: bits/weight against order-0 entropy, and coder throughput.

For each model (the demo CNN, all-MiniLM-L6-v2), lattice and target rate: compress, then code every layer's index
stream on its own (as the container does) with each coder; the dithered coder gets the layer's dither codes (the
same ``dither_codes`` the container computes). Reported per setting:

- order-0 entropy ``H(K)`` of all streams (bits/weight), and the ideal conditional entropies (no table cost) of the
  contexts considered for point 3 of issue 11: the 8 dither bins ``H(K|U8)``, the previous index in the stream being
  the most frequent one ``H(K|P)`` (DeepCABAC's significance-by-previous-weight idea; the codebook is sorted most
  frequent first, so index 0 is the mode), and both ``H(K|U8,P)``;
- per coder: coded bits/weight (every byte of every payload, tables included) as a ratio of ``H(K)``, encode and
  decode throughput in million weights/s, and each time as a ratio of zlib level 1 compressing / decompressing the
  same layers' float32 bytes in the same run (a machine-independent yardstick).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/coders_dither.py [--models digits minilm] [--bits 1 1.5 2 3 4]
        [--coders ans-dither-v2 ans-dither-v1]
"""

from __future__ import annotations

import argparse
import math
import os
import time
import zlib

import numpy as np
import torch

import udnc_fx
from udnc_fx.coding.ans import dither_codes
from udnc_fx.coding.coders import empirical_entropy_bits, get_coder
from udnc_fx.passes.materialize import served_params

# "(no dither)": the same coder without the dither context (row classes still allowed), to isolate the dither's share
CODERS = ["ans-dither-v2", "ans-dither-v1", "ans-dither-v2 (no dither)", "range-adaptive-v1", "range-context-v1"]
_ANS = ("ans-dither-v1", "ans-dither-v2")


def layers_for(model_name: str, bits: float, lattice: str) -> list[dict]:
    if model_name == "digits":
        from udnc_fx.demo import load_digits_split, train_digits_cnn

        model = train_digits_cnn(load_digits_split(), progress=False)
        config = udnc_fx.CompressConfig(target_bits=bits, lattice=lattice)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from udnc_fx.hf import drop_pooler, load_minilm, transformer_config

        model = drop_pooler(load_minilm())
        config = transformer_config(target_bits=bits, lattice=lattice)
    gm = udnc_fx.compress(model, config)
    out = []
    for d in served_params(gm):
        stream = d.indices.numpy().astype(np.int64)
        rows = d.shape[0] if len(d.shape) >= 2 else 1
        out.append({
            "fqn": d.fqn, "stream": stream, "k": d.num_codewords, "key": d.key, "n": d.n, "numel": d.numel,
            "row_length": max(1, stream.size // rows) if rows > 1 else None,
            "weights": d.materialize().detach().numpy().astype(np.float32),
        })
    return out


def conditional_entropy_bits(stream: np.ndarray, k: int, context: np.ndarray, contexts: int) -> float:
    joint = np.bincount(context.astype(np.int64) * k + stream, minlength=contexts * k).reshape(contexts, k)
    total = 0.0
    for row in joint:
        n = row.sum()
        if n:
            c = row[row > 0].astype(np.float64)
            total += float(n * math.log2(n) - np.sum(c * np.log2(c)))
    return total


def measure(layers: list[dict], coders: list[str] = CODERS) -> dict:
    weights = sum(layer["numel"] for layer in layers)
    h0 = sum(empirical_entropy_bits(layer["stream"], layer["k"]) for layer in layers)
    h_u = h_p = h_up = 0.0
    for layer in layers:
        s, k = layer["stream"], layer["k"]
        u8 = dither_codes(layer["key"], s.size, layer["n"]) >> 1 if layer["key"] is not None else np.zeros(s.size, np.uint8)
        prev0 = np.concatenate([[1], (s[:-1] == 0)]).astype(np.uint8)
        h_u += conditional_entropy_bits(s, k, u8, 8)
        h_p += conditional_entropy_bits(s, k, prev0, 2)
        h_up += conditional_entropy_bits(s, k, u8 * 2 + prev0, 16)
    floats = [layer["weights"].tobytes() for layer in layers]
    start = time.perf_counter()
    packed = [zlib.compress(f, 1) for f in floats]
    t_zc = time.perf_counter() - start
    start = time.perf_counter()
    for p in packed:
        zlib.decompress(p)
    t_zd = time.perf_counter() - start
    result = {"weights": weights, "h0": h0, "h_u8": h_u, "h_prev": h_p, "h_u8_prev": h_up, "zlib_c": t_zc,
              "zlib_d": t_zd, "coders": {}}
    for name in coders:
        coder = get_coder(name.split()[0])
        size = t_enc = t_dec = 0.0
        for layer in layers:
            s, k = layer["stream"], layer["k"]
            kwargs: dict = {}
            # what the container hands each coder: the dither codes (lazily) and the row length
            if name in _ANS and layer["key"] is not None:
                key, count, n = layer["key"], s.size, layer["n"]
                kwargs = {"context": lambda key=key, count=count, n=n: dither_codes(key, count, n)}
            if (name.split()[0] in _ANS or name == "range-context-v1") and layer["row_length"]:
                kwargs["row_length"] = layer["row_length"]
            start = time.perf_counter()
            data = coder.encode(s, k, **kwargs)
            t_enc += time.perf_counter() - start
            dec_kwargs = {"context": kwargs["context"]} if "context" in kwargs else {}  # the payload holds the rest
            start = time.perf_counter()
            out = coder.decode(data, s.size, k, **dec_kwargs)
            t_dec += time.perf_counter() - start
            if not np.array_equal(out, s):
                raise AssertionError(f"{name} does not round-trip {layer['fqn']}")
            size += len(data)
        result["coders"][name] = {"bytes": size, "enc": t_enc, "dec": t_dec}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["digits", "minilm"])
    parser.add_argument("--bits", nargs="*", type=float, default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--lattices", nargs="*", default=["Z"])
    parser.add_argument("--coders", nargs="*", default=CODERS, help="a subset of " + ", ".join(CODERS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch threads 1, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    for model in args.models:
        for lattice in args.lattices:
            print(f"\n### {model}, lattice {lattice}\n")
            print("| target bits | H(K) b/w | H(K|U8)/H | H(K|P)/H | H(K|U8,P)/H | coder | coded/H | enc Mw/s | dec Mw/s "
                  "| enc / zlib-1 c | dec / zlib-1 d |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for bits in args.bits:
                r = measure(layers_for(model, bits, lattice), args.coders)
                w, h0 = r["weights"], r["h0"]
                for i, (name, c) in enumerate(r["coders"].items()):
                    lead = (f"| {bits} | {h0 / w:.4f} | {r['h_u8'] / h0:.4f} | {r['h_prev'] / h0:.4f} | "
                            f"{r['h_u8_prev'] / h0:.4f} " if i == 0 else "| | | | | ")
                    print(lead + f"| {name} | {8 * c['bytes'] / h0:.4f} | {w / c['enc'] / 1e6:.2f} | "
                          f"{w / c['dec'] / 1e6:.2f} | {c['enc'] / r['zlib_c']:.3f} | {c['dec'] / r['zlib_d']:.3f} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

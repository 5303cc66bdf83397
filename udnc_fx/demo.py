"""The demo (the main job): train a small CNN on scikit-learn's bundled digits, compress it, report.

Everything here is offline and seeded: ``load_digits`` ships with scikit-learn, the split and the training run are
fixed, so two runs print the same accuracies.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsCNN", "load_digits_split", "train_digits_cnn", "evaluate", "run_demo", "DEMO_KEPT_BITS"]


class DigitsCNN(nn.Module):
    """2 conv (BatchNorm, ReLU) + 2 linear layers for 8×8 digits: 38k parameters."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 16, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_fraction: float = 0.3, seed: int = 0) -> DigitsData:
    """The fixed, stratified train/test split of scikit-learn's digits (1797 8×8 images), scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsData(*(torch.from_numpy(a) for a in (xtr, ytr, xte, yte)))


def train_digits_cnn(data: DigitsData, *, epochs: int = 30, seed: int = 0, progress: bool = True) -> DigitsCNN:
    """Train :class:`DigitsCNN` (Adam, batch 64, cosine schedule), seeded: the same weights every run."""
    from .progress import progress_bar

    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    # progress=True means "on a terminal only" (logs and pipes get no redraws); False: never
    bar = progress_bar(range(epochs), desc="training digits CNN", unit="epoch", progress=None if progress else False)
    for _ in bar:
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean() * 100)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


#: Bits per *kept* weight of the demo's default rate after pruning: the target is the zero/non-zero choice (binary
#: entropy of the sparsity) plus this for each kept weight. 2.0 at 80 % is 1.12 bits/weight, which stayed within
#: 0.5 points of the float model for every dither seed in benchmarks/finetune_curve.py (BatchNorm folded).
DEMO_KEPT_BITS = 2.0


def _check_epochs(name: str, value, allow_none: bool = False) -> None:
    import udnc_fx

    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise udnc_fx.ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def run_demo(
    out_dir: str | Path = "udnc-out/demo",
    *,
    lattice: str = "Z",
    n: int | None = None,
    target_bits: float | None = None,
    seed: int = 0,
    epochs: int = 30,
    progress: bool = True,
    finetune_epochs: int = 8,
    sparsity: float = 0.8,
    fold_bn: bool = True,
    retrain_epochs: int | None = None,
    float16: bool = True,
) -> dict:
    """Train, [fold BatchNorm,] [prune and retrain,] compress, fine-tune the codewords, evaluate, save, reload;
    writes artefacts to ``out_dir`` and returns the figures printed.

    The default is the pipeline that compresses this model best within 0.5 points of its float accuracy
    (benchmarks/finetune_curve.py): fold BatchNorm into the convolutions (``fold_bn``), magnitude-prune 80 % of the
    Conv/Linear weights (``sparsity``, whole lattice vectors), retrain the kept float weights for ``retrain_epochs``
    epochs (default: ``epochs``), compress with ``exact_zero=True`` so pruned weights decode to exact zeros, at
    ``target_bits`` (default: binary entropy of the sparsity + ``DEMO_KEPT_BITS`` per kept weight; 3 bits/weight
    without pruning), then fine-tune the codewords (average gradient per codeword) with the biases for
    ``finetune_epochs`` epochs (the last epoch's parameters are kept: no selection on the test set). With
    ``float16`` the raw tensors (biases; BatchNorm too when not folded) and the fine-tuned codewords are stored as
    float16, and rounded so in memory first: the accuracies printed are those of exactly what the file holds.

    The printed ratio divides the float32 bytes of every parameter of the ORIGINAL model (BatchNorm included) by
    the file's bytes.
    """
    import udnc_fx
    from udnc_fx.storage import round_for_storage
    from udnc_fx.passes.finetune import finetune, finetune_float
    from udnc_fx.passes.fold import fold_batchnorm
    from udnc_fx.passes.prune import check_sparsity, mask_sparsity, prune

    sparsity = check_sparsity(sparsity)
    _check_epochs("finetune_epochs", finetune_epochs)
    _check_epochs("retrain_epochs", retrain_epochs, allow_none=True)
    raw_float_dtype = "float16" if float16 else "float32"
    retrain_epochs = epochs if retrain_epochs is None else retrain_epochs

    # One thread: this CNN is far too small to gain from more, and under contention extra threads cost 10x.
    torch.set_num_threads(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_digits_split()
    model = train_digits_cnn(data, epochs=epochs, seed=seed, progress=progress)
    t_train = time.perf_counter() - t0
    float_acc = evaluate(model, data.x_test, data.y_test)
    n_params = sum(p.numel() for p in model.parameters())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )

    base, folded_acc = model, None
    if fold_bn:
        base = fold_batchnorm(model)
        folded_acc = evaluate(base, data.x_test, data.y_test)
    if sparsity > 0 and target_bits is None:
        # Default rate after pruning: the zero/non-zero choice (binary entropy) plus DEMO_KEPT_BITS per kept weight;
        # the plain default would spend all of its bits on the few kept weights.
        h = -sparsity * np.log2(sparsity) - (1 - sparsity) * np.log2(1 - sparsity)
        target_bits = round(float(h) + (1 - sparsity) * DEMO_KEPT_BITS, 3)
    config = udnc_fx.CompressConfig(lattice=lattice, n=n, seed=seed, target_bits=target_bits, exact_zero=sparsity > 0)
    source, pruned_acc, retrained_acc, t_prune = base, None, None, 0.0
    if sparsity > 0:
        tp = time.perf_counter()
        source, masks = prune(base, sparsity, config=config)
        pruned_acc = evaluate(source, data.x_test, data.y_test)
        if retrain_epochs:
            finetune_float(source, masks, loader, F.cross_entropy, epochs=retrain_epochs, lr=3e-3, keep="last",
                           progress=progress)
        retrained_acc = evaluate(source, data.x_test, data.y_test)
        t_prune = time.perf_counter() - tp
    t1 = time.perf_counter()
    gm = udnc_fx.compress(source, config)
    t_compress = time.perf_counter() - t1
    comp_acc = evaluate(gm, data.x_test, data.y_test)
    t_finetune = 0.0
    if finetune_epochs:
        t2 = time.perf_counter()
        finetune(gm, loader, F.cross_entropy, epochs=finetune_epochs, lr=3e-3, train_bias=True, train_norm=True,
                 keep="last", progress=progress)
        t_finetune = time.perf_counter() - t2
    # what the file will hold (float16 biases, float16 fine-tuned codewords): the accuracies below are the file's
    round_for_storage(gm, raw_float_dtype=raw_float_dtype, codebook_float_dtype=raw_float_dtype)
    tuned_acc = evaluate(gm, data.x_test, data.y_test)
    report = udnc_fx.inspect(gm)
    covered = report.total_weights
    bits = report.mean_entropy_bits
    udnc_path = out / "digits-cnn.udnc"
    file_bytes = udnc_fx.save(gm, udnc_path, raw_float_dtype=raw_float_dtype, codebook_float_dtype=raw_float_dtype)
    sizes = udnc_fx.size_report(udnc_path)
    # load() rebuilds onto the architecture the file was written for: the folded one when BatchNorm was folded
    reloaded = udnc_fx.load(udnc_path, fold_batchnorm(model) if fold_bn else model)
    reload_acc = evaluate(reloaded, data.x_test, data.y_test)
    ratio = 4 * n_params / file_bytes
    raw_bytes = sum(r["bytes"] for r in sizes["rows"] if r["kind"] == "raw")
    results = {
        "file_bytes": file_bytes,
        "ratio": ratio,
        "original_parameters": n_params,
        "file_ratio": sizes["file_ratio"],
        "weights_ratio": sizes["weights_ratio"],
        "reloaded_accuracy": reload_acc,
        "float_accuracy": float_acc,
        "folded_accuracy": folded_acc,
        "fold_bn": fold_bn,
        "compressed_accuracy": comp_acc,
        "finetuned_accuracy": tuned_acc if finetune_epochs else None,
        "finetune_epochs": finetune_epochs,
        "retrain_epochs": retrain_epochs if sparsity > 0 else 0,
        "sparsity": sparsity,
        "achieved_sparsity": mask_sparsity(masks) if sparsity > 0 else 0.0,
        "pruned_accuracy": pruned_acc,
        "retrained_accuracy": retrained_acc,
        "raw_float_dtype": raw_float_dtype,
        "finetune_seconds": t_finetune,
        "prune_seconds": t_prune,
        "entropy_bits_per_weight": bits,
        "estimated_ratio_weights": 32.0 / bits if bits > 0 else None,
        "covered_weights": covered,
        "train_seconds": t_train,
        "compress_seconds": t_compress,
        "config": config.to_dict(),
    }
    final = "fine-tuned" if finetune_epochs else "compressed"
    rows = [
        ("model", f"DigitsCNN, {n_params} parameters, digits test set ({len(data.y_test)} images)"),
        ("config", f"lattice {lattice}{'' if n is None else n}, target {config.effective_target_bits} bits/weight, "
                   f"seed {seed}"),
        ("float accuracy", f"{float_acc:.2f} %"),
        *(
            [("BatchNorm", f"folded into conv1/conv2 (eval-mode statistics): {folded_acc:.2f} %, "
                           f"{sum(p.numel() for p in base.parameters())} parameters")]
            if fold_bn
            else []
        ),
        *(
            [
                ("pruned", f"{100 * mask_sparsity(masks):.1f} % of the Conv/Linear weights (whole vectors): accuracy "
                           f"{pruned_acc:.2f} %, {retrained_acc:.2f} % after retraining the kept weights "
                           f"({retrain_epochs} epochs)"),
            ]
            if sparsity > 0
            else []
        ),
        ("compressed accuracy", f"{comp_acc:.2f} % (before fine-tuning)"),
        *(
            [("fine-tuned accuracy", f"{tuned_acc:.2f} % after {finetune_epochs} epochs of codeword fine-tuning"
                                     + (", biases and codewords rounded to float16 as stored" if float16 else ""))]
            if finetune_epochs
            else []
        ),
        ("entropy", f"{bits:.3f} bits/weight over {covered} Conv/Linear weights"),
        ("est. ratio", f"{32.0 / bits:.1f}x (32 bits / index entropy; codebooks and other tensors not counted)"),
        ("container", f"{udnc_path.name}: {file_bytes} bytes, of which {raw_bytes} for the raw tensors "
                      f"({raw_float_dtype}) and {sizes['shared_bytes']} preamble + shared header"),
        ("ratio", f"{ratio:.2f}x = {4 * n_params} float32 bytes of all {n_params} parameters of the original model"
                  f"{' (BatchNorm included)' if fold_bn else ''} / {file_bytes} file bytes; compressed weights "
                  f"alone {sizes['weights_ratio']:.2f}x"),
        ("reloaded accuracy", f"{reload_acc:.2f} % (load({udnc_path.name}) onto a fresh "
                              f"{'folded ' if fold_bn else ''}float model; {final} accuracy above)"),
        ("time", f"train {t_train:.1f} s, " + (f"prune+retrain {t_prune:.1f} s, " if sparsity > 0 else "")
                 + f"compress {t_compress:.2f} s, fine-tune {t_finetune:.1f} s"),
    ]
    text = _table(rows) + "\n\nper layer:\n" + str(report)
    print(text)
    (out / "report.json").write_text(json.dumps({"results": results, "inspect": report.to_dict()}, indent=2))
    (out / "report.txt").write_text(text + "\n")
    print(f"\nartefacts in {out}/ (report.txt, report.json, {udnc_path.name})")
    return results


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

__all__ = ["DigitsCNN", "load_digits_split", "train_digits_cnn", "evaluate", "run_demo"]


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
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    bar = tqdm(range(epochs), desc="training digits CNN", unit="epoch", disable=not progress)
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


def run_demo(
    out_dir: str | Path = "udnc-out/demo",
    *,
    lattice: str = "Z",
    n: int | None = None,
    target_bits: float | None = None,
    seed: int = 0,
    epochs: int = 30,
    progress: bool = True,
    finetune_epochs: int = 5,
    sparsity: float = 0.0,
) -> dict:
    """Train, [prune and retrain,] compress, fine-tune the codewords, evaluate, write artefacts to ``out_dir``;
    returns the figures printed.

    ``sparsity`` > 0 runs the paper's pipeline: magnitude-prune that fraction of the Conv/Linear weights (whole
    lattice vectors), retrain the kept float weights for ``finetune_epochs`` epochs, then compress with
    ``exact_zero=True`` so pruned weights decode to exact zeros. ``finetune_epochs`` > 0 then fine-tunes the
    codewords (average gradient per codeword) with biases and BatchNorm on the training set; the last epoch's
    parameters are kept (no selection on the test set).
    """
    import udnc_fx
    from udnc_fx.passes.finetune import finetune, finetune_float
    from udnc_fx.passes.prune import check_sparsity, mask_sparsity, prune

    sparsity = check_sparsity(sparsity)
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise udnc_fx.ConfigError(f"finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")

    # One thread: this CNN is far too small to gain from more, and under contention extra threads cost 10x.
    torch.set_num_threads(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_digits_split()
    model = train_digits_cnn(data, epochs=epochs, seed=seed, progress=progress)
    t_train = time.perf_counter() - t0
    float_acc = evaluate(model, data.x_test, data.y_test)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )

    if sparsity > 0 and target_bits is None:
        # Default rate after pruning: the zero/non-zero choice (binary entropy) plus the default rate for each kept
        # weight; the plain default would spend all of its bits on the few kept weights.
        h = -sparsity * np.log2(sparsity) - (1 - sparsity) * np.log2(1 - sparsity)
        target_bits = round(float(h) + (1 - sparsity) * udnc_fx.CompressConfig.DEFAULT_TARGET_BITS, 3)
    config = udnc_fx.CompressConfig(lattice=lattice, n=n, seed=seed, target_bits=target_bits, exact_zero=sparsity > 0)
    source, pruned_acc, retrained_acc, t_prune = model, None, None, 0.0
    if sparsity > 0:
        tp = time.perf_counter()
        source, masks = prune(model, sparsity, config=config)
        pruned_acc = evaluate(source, data.x_test, data.y_test)
        if finetune_epochs:
            finetune_float(source, masks, loader, F.cross_entropy, epochs=finetune_epochs, lr=3e-3, keep="last",
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
    tuned_acc = evaluate(gm, data.x_test, data.y_test)
    report = udnc_fx.inspect(gm)
    covered = report.total_weights
    bits = report.mean_entropy_bits
    udnc_path = out / "digits-cnn.udnc"
    file_bytes = udnc_fx.save(gm, udnc_path)
    sizes = udnc_fx.size_report(udnc_path)
    reloaded = udnc_fx.load(udnc_path, model)
    reload_acc = evaluate(reloaded, data.x_test, data.y_test)
    results = {
        "file_bytes": file_bytes,
        "file_ratio": sizes["file_ratio"],
        "weights_ratio": sizes["weights_ratio"],
        "reloaded_accuracy": reload_acc,
        "float_accuracy": float_acc,
        "compressed_accuracy": comp_acc,
        "finetuned_accuracy": tuned_acc if finetune_epochs else None,
        "finetune_epochs": finetune_epochs,
        "sparsity": sparsity,
        "achieved_sparsity": mask_sparsity(masks) if sparsity > 0 else 0.0,
        "pruned_accuracy": pruned_acc,
        "retrained_accuracy": retrained_acc,
        "finetune_seconds": t_finetune,
        "prune_seconds": t_prune,
        "entropy_bits_per_weight": bits,
        "estimated_ratio_weights": 32.0 / bits if bits > 0 else None,
        "covered_weights": covered,
        "train_seconds": t_train,
        "compress_seconds": t_compress,
        "config": config.to_dict(),
    }
    rows = [
        ("model", f"DigitsCNN, {sum(p.numel() for p in model.parameters())} parameters, digits test set ({len(data.y_test)} images)"),
        ("config", f"lattice {lattice}{'' if n is None else n}, target {config.effective_target_bits} bits/weight, seed {seed}"),
        ("float accuracy", f"{float_acc:.2f} %"),
        *(
            [
                ("pruned", f"{100 * mask_sparsity(masks):.1f} % of the Conv/Linear weights (whole vectors): accuracy "
                           f"{pruned_acc:.2f} %, {retrained_acc:.2f} % after retraining the kept weights"),
            ]
            if sparsity > 0
            else []
        ),
        ("compressed accuracy", f"{comp_acc:.2f} % (before fine-tuning)"),
        *(
            [("fine-tuned accuracy", f"{tuned_acc:.2f} % after {finetune_epochs} epochs of codeword fine-tuning")]
            if finetune_epochs
            else []
        ),
        ("entropy", f"{bits:.3f} bits/weight over {covered} Conv/Linear weights"),
        ("est. ratio", f"{32.0 / bits:.1f}x (32 bits / index entropy; codebooks and other tensors not counted)"),
        ("container", f"{udnc_path.name}: {file_bytes} bytes; every tensor of the model {sizes['file_ratio']:.2f}x, "
                      f"compressed weights only {sizes['weights_ratio']:.2f}x (true bytes)"),
        ("reloaded accuracy", f"{reload_acc:.2f} % (load({udnc_path.name}) onto a fresh float model)"),
        ("time", f"train {t_train:.1f} s, " + (f"prune+retrain {t_prune:.1f} s, " if sparsity > 0 else "")
                 + f"compress {t_compress:.2f} s, fine-tune {t_finetune:.1f} s"),
    ]
    text = _table(rows) + "\n\nper layer:\n" + str(report)
    print(text)
    (out / "report.json").write_text(json.dumps({"results": results, "inspect": report.to_dict()}, indent=2))
    (out / "report.txt").write_text(text + "\n")
    print(f"\nartefacts in {out}/ (report.txt, report.json, {udnc_path.name})")
    return results

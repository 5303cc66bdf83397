"""Shared pieces of the benchmarks: result points, the "robust best ratio" rule, Markdown tables, plots."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def log(*args) -> None:
    print(*args, flush=True)


class Stopwatch:
    """``with Stopwatch() as sw: ...``; ``sw.s`` is the wall time in seconds."""

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self._t
        return False


@dataclass
class Point:
    """One measured operating point of one method on one model.

    ``quality`` holds the figures of merit (``acc`` for the classifier; ``cos_mean``, ``cos_min``, ``spearman``
    for the sentence encoder); ``score`` is the one the quality bar is applied to; for several dither seeds every
    figure is the mean, ``score_worst`` the worst seed and ``passes`` says whether *every* seed met the bar.
    """

    method: str
    setting: str
    order: float  # sweep position: larger = coarser (higher ratio expected)
    bytes: float
    ratio: float
    score: float
    score_worst: float
    passes: bool
    quality: dict = field(default_factory=dict)
    encode_s: float | None = None
    decode_s: float | None = None
    seeds: int = 1
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def aggregate(method: str, setting: str, order: float, per_seed: list[dict], bar: Callable[[float], bool],
              score_key: str, numerator: int) -> Point:
    """Fold per-seed measurements (dicts with ``bytes``, ``quality``, ``encode_s``, ``decode_s``, ``extra``)."""
    nbytes = statistics.mean(r["bytes"] for r in per_seed)
    keys = per_seed[0]["quality"].keys()
    quality = {k: statistics.mean(r["quality"][k] for r in per_seed) for k in keys}
    scores = [r["quality"][score_key] for r in per_seed]

    def mean_of(key):
        vals = [r.get(key) for r in per_seed if r.get(key) is not None]
        return statistics.mean(vals) if vals else None

    extra = {}
    for r in per_seed:
        for k, v in (r.get("extra") or {}).items():
            extra.setdefault(k, []).append(v)
    extra = {k: (statistics.mean(v) if all(isinstance(x, (int, float)) for x in v) else v[0]) for k, v in extra.items()}
    if len(per_seed) > 1:
        extra["ratio_min_over_seeds"] = numerator / max(r["bytes"] for r in per_seed)
    return Point(
        method=method, setting=setting, order=order, bytes=nbytes, ratio=numerator / nbytes,
        score=statistics.mean(scores), score_worst=min(scores), passes=all(bar(s) for s in scores),
        quality=quality, encode_s=mean_of("encode_s"), decode_s=mean_of("decode_s"), seeds=len(per_seed),
        extra=extra,
    )


def robust_best(points: Iterable[Point]) -> Point | None:
    """The highest-ratio point of a sweep such that it and every finer point (smaller ``order``) pass.

    Sweeps are not always monotone near the bar (a dithered run can pass at a coarse step and fail at a finer one);
    the robust rule refuses to report such a lucky point.
    """
    best = None
    for p in sorted(points, key=lambda p: p.order):
        if not p.passes:
            break
        if best is None or p.ratio >= best.ratio:
            best = p
    return best


def best_any(points: Iterable[Point]) -> Point | None:
    ok = [p for p in points if p.passes]
    return max(ok, key=lambda p: p.ratio) if ok else None


def md_table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(x):
        if x is None:
            return "–"
        if isinstance(x, float):
            if math.isnan(x):
                return "–"
            return f"{x:.4g}"
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def machine_line() -> str:
    import numpy
    import torch

    cores = os.cpu_count()
    return (f"{platform.machine()} {cores} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"NumPy {numpy.__version__}, torch threads {torch.get_num_threads()}")


def plot_curves(path: Path, series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str, title: str,
                hline: float | None = None, hline_label: str | None = None, logx: bool = True,
                marks: dict[str, tuple[float, float]] | None = None, ylim: tuple[float, float] | None = None) -> bool:
    """One line per series; returns False (and draws nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(11, 5.5))
    markers = "osD^v<>pPX*h"
    colors = plt.get_cmap("tab20").colors
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        if not pts:
            continue
        xs, ys = zip(*pts)
        ours = name.startswith("udnc-fx")
        if ours:
            color = colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
        else:  # peers in dark, dashed, so they stand apart from the udnc-fx family
            color = {"NNCodec": "black", "float16": "dimgray", "torch.ao": "saddlebrown"}.get(name.split()[0], "k")
        ax.plot(xs, ys, marker=markers[i % len(markers)], ms=4, lw=1.4 if ours else 1.8, ls="-" if ours else "--",
                color=color, label=name)
        if marks and name in marks and marks[name] is not None:
            ax.plot(*marks[name], marker="o", ms=11, mfc="none", mec=ax.lines[-1].get_color(), mew=1.5)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=0.8, label=hline_label)
    if logx:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda x, _: f"{x:g}x" if round(x / 10 ** math.floor(math.log10(x))) in (2, 3, 5) else ""))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True

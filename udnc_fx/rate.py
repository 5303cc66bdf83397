"""Rate for a quality target: the smallest file whose quality stays within a bound.

``compress_to(model, quality_fn, threshold)`` searches ``target_bits`` by bisection. Per-layer sensitivities are
measured once (one allocation, probe or data-free) and reused at every rate tried, so each step of the search costs
one compression, one save to a scratch file (to count every byte) and one call of ``quality_fn``.

The dithered quantizer makes quality only roughly monotone in the rate; the search keeps every point it tried and
returns the smallest file among those that met the bound, so the answer always satisfies it.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import CompressConfig
from .errors import ConfigError, PassError

__all__ = ["compress_to", "RatePoint", "RateSearch"]


@dataclass(frozen=True)
class RatePoint:
    """One rate tried: the target, the mean index entropy reached, the file size and the measured quality."""

    target_bits: float
    file_bytes: int
    quality: float
    ok: bool


@dataclass
class RateSearch:
    """What :func:`compress_to` found: the chosen compressed ``model`` and its ``config``, and every point tried."""

    model: nn.Module
    config: CompressConfig
    best: RatePoint
    points: list[RatePoint] = field(default_factory=list)
    threshold: float = math.nan
    higher_is_better: bool = False

    def curve(self) -> list[RatePoint]:
        """The points tried, by file size."""
        return sorted(self.points, key=lambda p: p.file_bytes)

    def __str__(self) -> str:
        bound = ">=" if self.higher_is_better else "<="
        lines = [f"rate-quality curve explored (bound: quality {bound} {self.threshold:g})",
                 f"{'target bits':>11}  {'file bytes':>11}  {'quality':>12}  within bound"]
        for p in self.curve():
            mark = "yes" + ("  <- chosen" if p is self.best else "") if p.ok else "no"
            lines.append(f"{p.target_bits:11.4f}  {p.file_bytes:11d}  {p.quality:12.6g}  {mark}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> None:
        """Draw the explored curve (file size against quality) to a PNG with matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pts = self.curve()
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
        ax.plot([p.file_bytes / 1e3 for p in pts], [p.quality for p in pts], "-", color="0.6", zorder=1)
        for ok, colour, label in ((True, "tab:green", "within bound"), (False, "tab:red", "outside bound")):
            sel = [p for p in pts if p.ok == ok]
            if sel:
                ax.scatter([p.file_bytes / 1e3 for p in sel], [p.quality for p in sel], c=colour, label=label, zorder=2)
        ax.axhline(self.threshold, color="k", ls="--", lw=0.8, label="bound")
        ax.scatter([self.best.file_bytes / 1e3], [self.best.quality], s=120, facecolors="none", edgecolors="k",
                   label="chosen", zorder=3)
        ax.set_xlabel("file size (kB)")
        ax.set_ylabel("quality")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def compress_to(
    model: nn.Module,
    quality_fn: Callable[[nn.Module], float],
    threshold: float,
    config: CompressConfig | None = None,
    *,
    higher_is_better: bool = False,
    calibration_inputs: Any = None,
    output_fn: Callable | None = None,
    method: str | None = None,
    min_bits: float = 0.5,
    max_bits: float = 8.0,
    tolerance: float = 0.05,
    max_steps: int = 12,
    save_kwargs: dict[str, Any] | None = None,
    compress_kwargs: dict[str, Any] | None = None,
    on_point: Callable[[RatePoint], None] | None = None,
    progress: bool | None = None,
) -> RateSearch:
    """Compress ``model`` to the smallest file whose quality stays within ``threshold``.

    Args:
        model: the float model (never changed).
        quality_fn: ``quality_fn(compressed_model) -> float`` on the user's data, e.g. a loss against the float
            model's outputs (``higher_is_better=False``: the bound is ``quality <= threshold``) or an accuracy
            (``higher_is_better=True``: ``quality >= threshold``). Called in eval mode.
        threshold: the bound.
        config: the :class:`CompressConfig` to start from (lattice, selection...; its step fields are replaced).
        higher_is_better: the direction of ``quality_fn``.
        calibration_inputs, output_fn, method: passed to :func:`udnc_fx.allocate` once; its per-layer
            sensitivities are reused at every rate (``method`` defaults to ``"probe"`` with calibration inputs,
            ``"weights"`` without).
        min_bits, max_bits: the bracket of ``target_bits`` searched.
        tolerance: stop when the bracket is narrower than this many bits per weight.
        max_steps: at most this many rates are tried (including both ends).
        save_kwargs: options for :func:`udnc_fx.save` (coder, float dtypes) used to measure the file size.
        compress_kwargs: extra keyword arguments for :func:`udnc_fx.compress`.
        on_point: called with every :class:`RatePoint` as it is measured (progress reporting).
        progress: the allocation probe's bar (``None``: on a terminal only; ``False``: never).

    Returns:
        A :class:`RateSearch`; ``.model`` is the chosen compressed model, ``str()`` the explored curve.

    Raises:
        ConfigError: bad arguments.
        PassError: even ``max_bits`` does not meet the bound (the message gives the quality reached).
    """
    from .api import compress
    from .storage import save
    from .passes.allocate import allocate

    for name, value in (("min_bits", min_bits), ("max_bits", max_bits), ("tolerance", tolerance)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    if not min_bits < max_bits <= 32:
        raise ConfigError(f"need min_bits < max_bits <= 32, got {min_bits} and {max_bits}")
    if not callable(quality_fn):
        raise ConfigError("quality_fn must be callable as quality_fn(compressed_model) -> float")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 2:
        raise ConfigError(f"max_steps must be an integer >= 2, got {max_steps!r}")
    config = (CompressConfig() if config is None else config).replace(step=None, relative_step=None, target_bits=None)
    base = allocate(model, config, target_bits=max_bits, calibration_inputs=calibration_inputs,
                    output_fn=output_fn, method=method, progress=progress)
    points: list[RatePoint] = []
    kept: dict[RatePoint, tuple[nn.Module, CompressConfig]] = {}
    fd, scratch = tempfile.mkstemp(suffix=".udnc")
    os.close(fd)

    def measure(bits: float) -> RatePoint:
        cfg = allocate(model, config, target_bits=bits, reuse=base).config
        compressed = compress(model, cfg, **(compress_kwargs or {}))
        size = save(compressed, scratch, **(save_kwargs or {}))
        compressed.eval()
        quality = float(quality_fn(compressed))
        ok = math.isfinite(quality) and (quality >= threshold if higher_is_better else quality <= threshold)
        point = RatePoint(float(bits), int(size), quality, bool(ok))
        points.append(point)
        if ok and (not kept or point.file_bytes < min(p.file_bytes for p in kept)):
            kept.clear()  # only the smallest passing model is held (each one is a whole model)
            kept[point] = (compressed, cfg)
        if on_point is not None:
            on_point(point)
        return point

    try:
        top = measure(max_bits)
        if not top.ok:
            raise PassError(
                f"even {max_bits:g} bits/weight gives quality {top.quality:.6g}, outside the bound {threshold:g}: "
                "raise max_bits or relax the bound"
            )
        lo, hi = float(min_bits), float(max_bits)
        bottom = measure(lo)
        if not bottom.ok:
            while hi - lo > tolerance and len(points) < max_steps:
                mid = (lo + hi) / 2
                if measure(mid).ok:
                    hi = mid
                else:
                    lo = mid
    finally:
        os.unlink(scratch)
    (best, (chosen, cfg)), = kept.items()
    return RateSearch(model=chosen, config=cfg, best=best, points=points, threshold=float(threshold),
                      higher_is_better=higher_is_better)

"""Progress bars that appear only on a terminal.

Every long step (training, allocation, compress, save, load, export) reports progress through :func:`progress_bar`.
A bar is drawn on standard error only when standard error is a terminal, so logs and pipes stay clean
(``./dev.sh demo > log 2>&1`` writes no redraws); ``progress=False`` turns it off everywhere, ``progress=True``
forces it on.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to draw a bar: ``progress`` if given, else whether standard error is a terminal."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | float | None = None,
    desc: str | None = None,
    unit: str = "it",
    progress: bool | None = None,
    leave: bool = False,
    **kwargs: Any,
):
    """A ``tqdm`` bar on standard error, disabled unless :func:`progress_enabled` says otherwise.

    Args:
        iterable: what to iterate over (optional; use ``update`` on the bar otherwise).
        total: the number of steps (or bytes, weights...) when the iterable has no length.
        desc: the bar's label.
        unit: the unit of ``total``.
        progress: ``None`` (default): draw only on a terminal; ``False``: never; ``True``: always.
        leave: keep the finished bar on screen.
        **kwargs: passed to ``tqdm``.
    """
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        disable=not progress_enabled(progress),
        file=sys.stderr,
        dynamic_ncols=True,
        **kwargs,
    )

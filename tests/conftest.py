"""Markers that follow from what a test is, so they cannot be forgotten: ``property`` for every Hypothesis test and
everything in ``tests/property`` (``-m "property and not slow"`` runs the fast ones wherever they live,
``-m "not property and not slow"`` leaves them out: a ``-m`` given on the command line replaces the default
``not slow``). ``slow`` stays explicit. Shared fixtures: ``traced_peak`` (the memory-bound tests' measure)."""

from __future__ import annotations

import tracemalloc

import hypothesis
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        test = getattr(item, "obj", None)
        in_folder = item.path.parent.name == "property" and item.path.parent.parent.name == "tests"
        if in_folder or (test is not None and hypothesis.is_hypothesis_test(test)):
            item.add_marker(pytest.mark.property)


def _traced_peak(fn):
    """``(result, peak traced bytes)`` of ``fn()`` (NumPy arrays and Python objects; torch storage is not traced)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def traced_peak():
    """``traced_peak(fn) -> (fn(), peak bytes tracemalloc saw while it ran)``: the memory-bound tests' measure."""
    return _traced_peak

"""Markers that follow from what a test is, so they cannot be forgotten: ``property`` for every Hypothesis test and
everything in ``tests/property`` (``-m "property and not slow"`` runs the fast ones wherever they live,
``-m "not property and not slow"`` leaves them out: a ``-m`` given on the command line replaces the default
``not slow``). ``slow`` stays explicit."""

from __future__ import annotations

import hypothesis
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        test = getattr(item, "obj", None)
        in_folder = item.path.parent.name == "property" and item.path.parent.parent.name == "tests"
        if in_folder or (test is not None and hypothesis.is_hypothesis_test(test)):
            item.add_marker(pytest.mark.property)

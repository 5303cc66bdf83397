"""The top-level API (udnc_fx/__init__.py): verbs, configs, the result types they return, errors — nothing else."""

from __future__ import annotations

import ast
import importlib
import inspect
import typing
from pathlib import Path

import pytest

import udnc_fx

INIT = Path(udnc_fx.__file__)

VERBS = {
    "compress", "inspect", "compression_record", "materialize", "save", "load", "read_header", "size_report", "allocate", "compress_to",
    "prune", "fold_batchnorm", "finetune", "finetune_float", "from_udnc", "compress_checkpoint",
}
CONFIGS = {"CompressConfig", "LayerConfig", "TrainOptions"}
RESULTS = {"InspectReport", "Allocation", "FinetuneResult", "RateSearch", "DitheredLatticeParam"}
ERRORS = {"UdncError", "ConfigError", "UnsupportedModelError", "PassError", "ExportError", "FormatError"}


def test_all_is_the_verbs_configs_results_and_errors():
    assert set(udnc_fx.__all__) == VERBS | CONFIGS | RESULTS | ERRORS
    assert len(udnc_fx.__all__) == len(set(udnc_fx.__all__))


@pytest.mark.parametrize("name", sorted(VERBS | CONFIGS | RESULTS | ERRORS))
def test_every_public_name_resolves_and_is_documented(name):
    value = getattr(udnc_fx, name)
    assert inspect.getdoc(value), f"udnc_fx.{name} has no docstring"
    assert name in dir(udnc_fx)


def _verb_return_names(verb) -> set[str]:
    hints = typing.get_type_hints(verb)
    ret = hints.get("return")
    names = {getattr(ret, "__name__", "")}
    names |= {getattr(a, "__name__", "") for a in typing.get_args(ret)}
    return names


@pytest.mark.parametrize(
    "verb, result",
    [("inspect", "InspectReport"), ("allocate", "Allocation"), ("finetune", "FinetuneResult"),
     ("finetune_float", "FinetuneResult"), ("compress_to", "RateSearch")],
)
def test_a_result_type_is_exported_beside_the_verb_that_returns_it(verb, result):
    assert result in _verb_return_names(getattr(udnc_fx, verb))
    assert getattr(udnc_fx, result) is getattr(importlib.import_module(getattr(udnc_fx, verb).__module__), result)


@pytest.mark.parametrize(
    "name, module",
    [("average_codeword_gradients", "udnc_fx.passes.finetune"), ("mask_sparsity", "udnc_fx.passes.prune"),
     ("allocate_steps", "udnc_fx.passes.allocate"), ("round_for_storage", "udnc_fx.storage"),
     ("LayerReport", "udnc_fx.api")],
)
def test_workflow_helpers_live_in_their_modules(name, module):
    with pytest.raises(AttributeError, match=f"import it from {module}"):
        getattr(udnc_fx, name)
    assert hasattr(importlib.import_module(module), name)


def test_type_checking_imports_match_the_lazy_table():
    """The ``if TYPE_CHECKING`` block (what type checkers and IDEs see) names exactly the lazy names."""
    tree = ast.parse(INIT.read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            seen[alias.name] = "udnc_fx." + node.module
    assert seen == udnc_fx._LAZY

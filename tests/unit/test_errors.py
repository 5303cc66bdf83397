"""The error hierarchy (udnc_fx/errors.py) and its one rule per kind of failure."""

from __future__ import annotations

import numpy as np
import pytest

import udnc_fx
from udnc_fx.errors import ConfigError, ExportError, FormatError, PassError, UdncError, UnsupportedModelError
from udnc_fx.lattice import get_lattice


def test_every_error_is_a_udnc_error_and_config_error_is_a_value_error():
    for cls in (ConfigError, UnsupportedModelError, PassError, ExportError, FormatError):
        assert issubclass(cls, UdncError)
    assert issubclass(ConfigError, ValueError)  # code that caught ValueError keeps working
    error = FormatError("truncated", "ends early")
    assert (error.kind, error.message, str(error)) == ("truncated", "ends early", "[truncated] ends early")


# The same bad input (a "model" that is not an nn.Module) gets the same error type from every verb.
VERBS = {
    "compress": lambda m: udnc_fx.compress(m),
    "allocate": lambda m: udnc_fx.allocate(m, method="weights"),
    "prune": lambda m: udnc_fx.prune(m, 0.5),
    "fold_batchnorm": lambda m: udnc_fx.fold_batchnorm(m),
    "finetune": lambda m: udnc_fx.finetune(m, [None]),
    "materialize": lambda m: udnc_fx.materialize(m),
    "inspect": lambda m: udnc_fx.inspect(m),
    "load": lambda m: udnc_fx.load("unused.udnc", m),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_a_model_that_is_not_a_module_is_a_config_error(verb):
    with pytest.raises(ConfigError, match=rf"{verb}\(\) needs (an|a compressed|the float model to load onto, an) "
                       r"nn\.Module"):
        VERBS[verb]({"weight": np.zeros(3)})


@pytest.mark.parametrize(
    "call",
    [
        lambda: get_lattice("E8").nearest(np.zeros((2, 4))),
        lambda: get_lattice("D4").to_int(np.array([0.5, 0.0, 0.0, 0.0])),
        lambda: get_lattice("Z", 2).from_int(np.zeros(2)),
        lambda: get_lattice("Q"),
    ],
)
def test_lattice_argument_errors_are_config_errors(call):
    with pytest.raises(ConfigError):
        call()

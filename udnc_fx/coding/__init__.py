"""Coding: lossless coders for codeword-index streams (and, later, the container). NumPy only: no torch import."""

from udnc_fx.coding.coders import (
    DEFAULT_CODER,
    Coder,
    available_coders,
    empirical_entropy_bits,
    get_coder,
)
from udnc_fx.coding import ans as _ans  # noqa: E402,F401 -- registers ans-dither-v1
from udnc_fx.coding import ans_native as _ans_native  # noqa: E402,F401 -- registers ans-dither-v2

__all__ = ["Coder", "DEFAULT_CODER", "available_coders", "empirical_entropy_bits", "get_coder"]

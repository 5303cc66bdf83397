"""Quickstart: compress a model, look at what happened, fold it back to float weights.

    .venv/bin/python examples/quickstart.py [--smoke]
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
    args = parser.parse_args(argv)

    # --8<-- [start:quickstart]
    import torch
    import udnc_fx

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 30 * 30, 10)
    )
    config = udnc_fx.CompressConfig(lattice="Z", target_bits=4.0, seed=0)
    gm = udnc_fx.compress(model, config)  # an fx.GraphModule; `model` is untouched
    print(udnc_fx.inspect(gm))  # per layer: lattice, step, codewords, bits/weight, SQNR
    x = torch.randn(2, 3, 32, 32)
    print("max |compressed - float|:", (gm(x) - model(x)).abs().max().item())
    plain = udnc_fx.materialize(gm)  # float weights, bit-identical outputs
    assert torch.equal(plain(x), gm(x))
    # --8<-- [end:quickstart]
    if not args.smoke:
        print(gm.code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

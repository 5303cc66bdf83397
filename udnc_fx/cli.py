"""The ``udnc`` command line."""

from __future__ import annotations

import argparse
import sys

from .errors import UdncError

__all__ = ["main"]


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(
        args.out,
        lattice=args.lattice,
        n=args.n,
        target_bits=args.bits,
        seed=args.seed,
        epochs=args.epochs,
        progress=not args.no_progress,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="udnc", description="Universal DNN compression as a torch.fx pass")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a CNN on scikit-learn's digits, compress it, report")
    demo.add_argument("--out", default="udnc-out/demo", help="artefact folder (default: udnc-out/demo)")
    demo.add_argument("--lattice", default="Z", help="Z, A2, D4 or E8 (default Z)")
    demo.add_argument("--n", type=int, default=None, help="lattice dimension (Z only; default 1)")
    demo.add_argument("--bits", type=float, default=None, help="target entropy in bits/weight (default 3)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UdncError as exc:
        print(f"udnc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

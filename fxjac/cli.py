"""The ``fxjac`` command: ``fxjac demo`` (the main job) and ``--version``."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _demo(args) -> int:
    from . import demo, zoo

    names = args.models.split(",") if args.models else None
    if args.quick:
        names = names or ["mlp", "cnn", "resnet", "transformer_explicit", "two_input"]
    unknown = [n for n in names or [] if n not in zoo.ZOO]
    if unknown:
        print(f"fxjac demo: unknown model(s) {unknown}; the zoo has {sorted(zoo.ZOO)}", file=sys.stderr)
        return 2
    rows = demo.run(names, batch=args.batch, repeat=1 if args.quick else 5)
    return 0 if all(r.ok for r in rows) else 1


def main(argv=None) -> int:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="fxjac", description="Jacobian products of PyTorch modules.")
    parser.add_argument("--version", action="version", version=f"fxjac {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="every product on every zoo model, checked against torch.func and timed")
    d.add_argument("--quick", action="store_true", help="fewer models, one timing repeat")
    d.add_argument("--models", default="", help="comma-separated zoo names")
    d.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _demo(args)
    except Exception as err:  # one line for users; --debug shows the traceback
        if args.debug:
            raise
        print(f"fxjac {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

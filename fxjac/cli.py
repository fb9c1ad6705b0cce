"""The ``fxjac`` command: ``fxjac demo`` (the main job), ``fxjac draw`` (a product-flow picture) and ``--version``."""

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
    rows = demo.run(names, batch=args.batch, repeat=1 if args.quick else 5, pictures=args.out or None)
    return 0 if all(r.ok for r in rows) else 1


class CliError(Exception):
    """A user mistake on the command line: printed as one line, exit status 2."""


def _load_factory(spec: str):
    """``MODULE:FACTORY`` -> the factory; MODULE is a dotted module path or a ``.py`` file."""
    import importlib
    import importlib.util
    from pathlib import Path

    if ":" not in spec:
        raise CliError(f"expected MODULE:FACTORY (e.g. fxjac.zoo:CNN or ./model.py:Net), got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise CliError(f"no such file: {mod_name}")
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(path.resolve().parent))
        try:
            loader_spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as err:
            raise CliError(f"cannot import module {mod_name!r}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec} is not a class or function")
    return obj


def _parse_shapes(text: str) -> list:
    """``1,3,32,32`` or ``4,5;4,3`` (one shape per model input) -> a list of tuples of positive ints."""
    shapes = []
    for part in text.split(";"):
        try:
            shape = tuple(int(s) for s in part.split(",") if s.strip())
        except ValueError:
            shape = ()
        if not shape or any(s < 1 for s in shape):
            raise CliError(f"bad --input-shape {text!r}: expected positive ints like 1,3,32,32 (';' between inputs)")
        shapes.append(shape)
    return shapes


def _draw(args) -> int:
    import warnings

    import torch

    from .draw import draw

    factory = _load_factory(args.model)
    shapes = _parse_shapes(args.input_shape)
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{args.model} returned a {type(model).__name__}, not an nn.Module")
    model.eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    inputs = tuple(torch.randn(s, dtype=dtype) for s in shapes)
    wrt = args.wrt
    if wrt not in ("params", "input") and not wrt.startswith("input:"):
        wrt = [w for w in wrt.split(",") if w]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fxjac: these ops have no structured rule")
        draw(model, args.output, product=args.product, wrt=wrt, example_inputs=inputs, depth=args.depth,
             collapse=not args.no_collapse)
    print(f"fxjac draw: wrote {args.output}")
    return 0


def _one_line(err: Exception) -> str:
    """An error's first line, with the user's source line (``at file:line: code``) where it names one."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [""]
    where = next((ln for ln in lines[1:] if ln.startswith("at ")), None)
    text = lines[0] + (f" ({where})" if where else "")
    return text + (" [--debug shows more]" if len(lines) > 1 else "")


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def main(argv=None) -> int:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="fxjac", description="Jacobian products of PyTorch modules.")
    parser.add_argument("--version", action="version", version=f"fxjac {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="every product on every zoo model, checked against torch.func and timed")
    d.add_argument("--quick", action="store_true", help="fewer models, one timing repeat")
    d.add_argument("--models", default="", help="comma-separated zoo names")
    d.add_argument("--batch", type=_positive_int, default=4)
    d.add_argument("--out", default="fxjac-demo", help="folder for the product-flow pictures ('' for none)")
    w = sub.add_parser("draw", help="draw the flow of a product of a model (SVG, PNG, PDF or DOT)")
    w.add_argument("model", metavar="MODULE:FACTORY",
                   help="a class or function returning the model, e.g. fxjac.zoo:CNN or ./net.py:make_net")
    w.add_argument("--input-shape", required=True, help="input shape with the batch, e.g. 1,3,32,32 "
                   "(';' between the shapes of several inputs)")
    w.add_argument("--product", default="vjp",
                   choices=["jvp", "vjp", "jmp", "mjp", "jacobian", "jtmjp", "jmjtp", "ggn"])
    w.add_argument("--wrt", default="params", help="params, input, input:N, or comma-separated parameter names")
    w.add_argument("--depth", type=int, default=1, help="levels of sub-module clusters")
    w.add_argument("--no-collapse", action="store_true", help="draw every repeated block")
    w.add_argument("-o", "--output", default="flow.svg", help="file to write; the suffix picks the format "
                   "(.svg, .png, .pdf, .dot)")
    w.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _draw(args) if args.command == "draw" else _demo(args)
    except CliError as err:
        if args.debug:
            raise
        print(f"fxjac {args.command}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # one line for users; --debug shows the traceback
        if args.debug:
            raise
        if args.command == "draw":
            print(f"fxjac draw: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
            return 1
        print(f"fxjac {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

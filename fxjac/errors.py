"""The errors fxjac raises; every one is a :class:`FxJacError` and names the node and the user's source line."""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
import torch.fx as fx


class FxJacError(Exception):
    """Base of every fxjac error."""


class TraceError(FxJacError):
    """torch.fx cannot trace the model, or traced it wrongly (checked at a product's first call)."""


class ShapeError(FxJacError, ValueError):
    """An operand of the wrong shape, rank, dtype or device; a non-symmetric full matrix."""


class ModeError(FxJacError):
    """Training-mode BatchNorm or active Dropout on the differentiated path: call ``model.eval()``."""


class OptionError(FxJacError, ValueError):
    """An unknown or contradictory option, or a ``wrt`` naming no parameter."""


class UnsupportedOpError(FxJacError, NotImplementedError):
    """``strict=True`` and some ops have no structured rule."""


class StaleProductError(FxJacError):
    """The model's structure changed since the product was built."""


_INTERNAL = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, fx)) + (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "passes") + os.sep)


def source_line(node: fx.Node) -> Optional[str]:
    """The user's source line that created ``node``: the innermost frame of its recorded stack trace outside
    torch and fxjac (torch.fx records its own frames after the user's), else the innermost outside torch.fx and
    fxjac (a model made of torch.nn modules only: the innermost module ``forward``'s line, not fxjac's tracer).
    """
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    files = [i for i, ln in enumerate(lines) if ln.startswith("File ")]
    if not files:
        return lines[-1]

    def path(i):
        return lines[i].split('"')[1] if lines[i].count('"') >= 2 else ""

    user = [i for i in files if not path(i).startswith(_INTERNAL)]
    outside_fx = [i for i in files if not path(i).startswith(_INTERNAL[1:])]
    forwards = [i for i in outside_fx if lines[i].endswith("in forward")]
    i = (user or forwards or outside_fx or files)[-1]
    where = lines[i]
    code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
    return f"{where}: {code}" if code else where


def describe(nodes: Iterable[fx.Node]) -> str:
    """One line per node: ``format_node()`` and, where known, the user's source line."""
    out = []
    for n in nodes:
        line = f"  {n.format_node()}"
        if n.meta.get("module_type") is not None:
            line += f"\n      (the leaf module {n.meta['module_type'].__name__})"
        src = source_line(n)
        if src:
            line += f"\n      at {src}"
        out.append(line)
    return "\n".join(out)

"""Ops that are constants for differentiation: shape queries, comparisons, argmax, integer casts, masks,
tensor factories. Autograd gives them a zero derivative (or none); so does fxjac, emitting nothing.
"""

from __future__ import annotations

import builtins
import operator

import torch

from passes.protocol import ZERO, Decline

from .base import NonDifferentiable
from .registry import register

# Spellings a traced model can apply to a value that carries a derivative. Random factories are left out: they
# cannot pass the first-call output check.
_METHODS = (
    "size", "dim", "ndimension", "numel", "argmax", "argmin", "eq", "ne", "lt", "le", "gt", "ge", "long", "int",
    "bool", "short", "byte", "sign", "nonzero", "isnan", "isinf", "isfinite", "any", "all", "detach", "new_zeros",
    "new_ones", "new_full", "new_empty", "new_tensor", "floor", "ceil", "round", "trunc", "logical_not",
    "logical_and", "logical_or", "argsort", "item",
)
_FUNCTIONS = (
    torch.argmax, torch.argmin, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, operator.eq,
    operator.ne, operator.lt, operator.le, operator.gt, operator.ge, torch.isnan, torch.isinf, torch.isfinite,
    torch.sign, torch.floor, torch.ceil, torch.round, torch.trunc, torch.zeros_like, torch.ones_like,
    torch.full_like, torch.detach, torch.floor_divide, operator.floordiv, torch.logical_not, torch.logical_and,
    torch.logical_or, torch.argsort, torch.bucketize,
    torch.searchsorted, torch.nonzero, torch.numel,
)
# Tensor factories whose sizes are read from a value (``torch.full((T, T), -inf)`` with ``T = x.shape[1]``). The
# passes never visit them: derivatives follow floating values only (``differentiable_between`` in passes/dag.py),
# and sizes and dtypes are none. They are registered so that strict mode's list of ops without rules leaves them out.
SIZED_FACTORIES = (torch.full, torch.zeros, torch.ones, torch.arange, torch.eye, torch.linspace, torch.logspace,
                   torch.tensor)


@register(*_METHODS, *_FUNCTIONS, *SIZED_FACTORIES)
class Constant(NonDifferentiable):
    """A zero derivative: integer-, boolean- or shape-valued results, detached values, tensor factories."""


def _cast_dtype(site):
    out = site.out_val
    return out.dtype if isinstance(out, torch.Tensor) else None


@register("to", "type", "type_as", "float", "double", "half", "bfloat16")
class Cast(NonDifferentiable):
    """A dtype (or device) cast: floating casts pass the stack through cast alike; integer casts are constant."""

    kind = "structured"

    def jvp(self, e, site, tangents):  # noqa: D102
        dtype = _cast_dtype(site)
        t = tangents.get("0", ZERO)
        if t is ZERO or dtype is None or not dtype.is_floating_point:
            return ZERO
        return e.method("to", t, dtype)

    def vjp(self, e, site, ct):  # noqa: D102
        dtype = _cast_dtype(site)
        x = site.val("0")
        if dtype is None or not dtype.is_floating_point or not x.dtype.is_floating_point:
            return {}
        return {"0": e.method("to", ct, x.dtype)}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)


@register(builtins.getattr)
class GetAttr(NonDifferentiable):
    """``x.shape``, ``x.dtype``, ``x.device``…: constants; ``x.data``: the values without their derivative, as
    ``x.detach()``. ``x.T``/``x.mT`` are rewritten to transposes when
    the graph is normalised; anything else is left to the fallback.
    """

    def jvp(self, e, site, tangents):  # noqa: D102
        self._check(site)
        return ZERO

    def vjp(self, e, site, ct):  # noqa: D102
        self._check(site)
        return {}

    @staticmethod
    def _check(site):
        if site.args.get("1") not in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout",
                                      "data"):
            raise Decline

"""fxjac: Jacobian products of any PyTorch module, generated as torch.fx GraphModules.

Trace a model once, get a GraphModule that propagates vectors or matrices forward or backward through it with
per-operation rules that never build a Jacobian nobody asked for.
"""

from __future__ import annotations

from .curvature import accumulate, ggn_vp, linear_operator
from .direction import jacobian, jmp, jvp, mjp, vjp
from .draw import draw
from .errors import (
    FxJacError,
    ModeError,
    OptionError,
    ShapeError,
    StaleProductError,
    TraceError,
    UnsupportedOpError,
)
from .metric import ggn, jmjtp, jtmjp
from .product import Product
from .util import compile, unflatten

__version__ = "0.1.0"

__all__ = [
    "FxJacError",
    "accumulate",
    "ggn_vp",
    "linear_operator",
    "ModeError",
    "OptionError",
    "Product",
    "ShapeError",
    "StaleProductError",
    "TraceError",
    "UnsupportedOpError",
    "compile",
    "draw",
    "ggn",
    "jacobian",
    "jmjtp",
    "jtmjp",
    "jmp",
    "jvp",
    "mjp",
    "unflatten",
    "vjp",
]

"""The per-operation rules, one file per op family, gathered into one default table.

Importing a family module registers its rules in :data:`fxjac.rules.registry.RULES`.
"""

from __future__ import annotations

from passes.protocol import RuleTable

from .. import decompositions  # noqa: F401  (registration of module decompositions)
from . import constant, elementwise, linear, reduce, shape  # noqa: F401  (registration)
from .fallback import Fallback
from .registry import RULES, register

_OPTIONAL_FAMILIES = ("conv", "norm", "attention", "embedding")

for _name in _OPTIONAL_FAMILIES:
    try:
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as _err:  # a family not written yet in this checkout
        if _err.name != f"{__name__}.{_name}":
            raise


def default_rules() -> RuleTable:
    """The table every product uses unless given another: all registered rules plus the autograd fallback."""
    return RuleTable(RULES, fallback=Fallback())


__all__ = ["RULES", "default_rules", "register"]

"""The one table of rules, keyed as ``passes.protocol.rule_key`` normalises a node's target."""

from __future__ import annotations

import inspect
from typing import Callable

RULES: dict = {}
NONDIFF: set = set()


def register(*keys, signature: Callable = None) -> Callable:
    """Class decorator: instantiate the rule and register it under every spelling in ``keys``.

    Args:
        keys: functions (``torch.tanh``), method names (``"tanh"``) and module classes a user may write.
        signature: a function whose parameters name the op's arguments (the first one is the tensor, also
            for methods); defaults to the class attribute ``signature``.

    Raises:
        KeyError: a key is registered twice.
    """

    def deco(cls):
        rule = cls()
        sig = signature if signature is not None else getattr(cls, "signature", None)
        if callable(sig):  # a plain function whose parameters name the op's arguments
            rule.signature = inspect.signature(sig)
        rule.name = cls.__name__
        rule.keys = keys
        for k in keys:
            if k in RULES:
                raise KeyError(f"a rule for {k!r} is registered twice ({RULES[k].name} and {cls.__name__})")
            RULES[k] = rule
        return cls

    return deco

"""einops under torch.fx: ``rearrange``, ``reduce``, ``repeat`` and ``einsum`` traced into the torch ops they run.

Note [einops]
~~~~~~~~~~~~~
einops picks a backend by the tensor's type and reads its shape, so a torch.fx Proxy stops it ("Tensor type
unknown to einops"). While a model is traced, the names through which its code reaches einops (``einops``
itself, or ``rearrange`` imported from it) see the functions below instead (:meth:`Tracer._see_globals`): on a
traced tensor they run einops' own recipe with the Proxy as a tensor of a backend of ours, whose shape is one
traced ``x.size(i)`` per axis of the pattern's left side. The graph then holds the reshapes, permutes,
reductions and expands that einops would have run, each with its structured rule, and sizes stay traced (the
batch size is free). A pattern with an ellipsis has no rank while tracing: such a call is one node of the graph,
differentiated by the autograd fallback. einops' ``Rearrange`` and ``Reduce`` layers are traced as the same
calls (their ``forward`` reads ``input.ndim``); ``EinMix`` is traced into. ``pack`` and ``unpack`` are not
wrapped: they read shapes as numbers, a TraceError.

einops is never imported here: only a model that imported it can call it.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

_FUNCTIONS = ("rearrange", "reduce", "repeat", "einsum")


def einops_module() -> Optional[types.ModuleType]:
    """The einops package where the process has imported it, else ``None``."""
    return sys.modules.get("einops")


class _Ranked(fx.Proxy):
    """A traced tensor of known rank, which einops hands to :class:`_backend`."""

    def __init__(self, proxy: fx.Proxy, rank: int):
        super().__init__(proxy.node, proxy.tracer)
        self.rank = rank


_BACKEND: list = []


def _backend() -> type:
    """The einops backend for :class:`_Ranked` tensors, a subclass of its torch backend (made once, at the first
    traced call). einops finds it among its backends' subclasses by its framework's module name, which must be
    imported: ``torch.fx``.
    """
    if not _BACKEND:
        from einops._backends import TorchBackend

        class TracedBackend(TorchBackend):
            framework_name = "torch.fx"

            def is_appropriate_type(self, tensor):
                return isinstance(tensor, _Ranked)

            def shape(self, x):
                # a list: einops' shape cache then skips it (a tuple would keep the traced graph alive)
                return [x.size(i) for i in range(x.rank)]

            def is_float_type(self, x):  # asked before a mean: torch's mean says so at run time otherwise
                return True

        _BACKEND.append(TracedBackend)
    return _BACKEND[0]


def _rank(pattern: str) -> Optional[int]:
    """The rank of the input that ``pattern``'s left side describes; ``None`` with an ellipsis."""
    from einops.parsing import ParsedExpression

    left = pattern.split("->")[0]
    try:
        parsed = ParsedExpression(left)
    except Exception:  # noqa: BLE001 (einops raises its own error for a bad pattern when called)
        return None
    return None if parsed.has_ellipsis else len(parsed.composition)


def _traced(name: str, original: Callable) -> Callable:
    """``original`` (an einops function) as a traced forward calls it (Note [einops])."""

    def call(*args, **kwargs):
        proxies = _proxies(args, kwargs)
        if not proxies:
            return original(*args, **kwargs)
        _backend()
        tracer = proxies[0].tracer
        if name == "einsum":  # einsum(*tensors, pattern): einops rewrites the pattern for torch.einsum
            *tensors, pattern = args
            first = tensors[0] if isinstance(tensors[0], fx.Proxy) else None
            if first is None:
                return tracer.create_proxy("call_function", original, args, kwargs)
            return original(_Ranked(first, 0), *tensors[1:], pattern, **kwargs)
        tensor, rest = args[0], args[1:]
        if isinstance(tensor, (list, tuple)):  # einops stacks a list along a new first axis
            tensor = torch.stack(list(tensor))
        pattern = rest[0] if rest else kwargs.get("pattern")
        rank = _rank(pattern) if isinstance(pattern, str) and isinstance(tensor, fx.Proxy) else None
        if rank is None:
            return tracer.create_proxy("call_function", original, (tensor,) + rest, kwargs)
        return original(_Ranked(tensor, rank), *rest, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__wrapped__ = original
    return call


def _proxies(args, kwargs) -> list:
    found: list = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return found


class TracedEinops(types.ModuleType):
    """``einops`` as a traced forward sees it: the same module, with :func:`traced` functions."""

    def __init__(self, module: types.ModuleType):
        super().__init__("einops")
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        return traced(value) or value


def traced(value: Any) -> Optional[Callable]:
    """The traced version of ``value`` if it is one of einops' functions (Note [einops]), else ``None``."""
    module = einops_module()
    if module is None or not callable(value):
        return None
    for name in _FUNCTIONS:
        if getattr(module, name, None) is value:
            return _traced(name, value)
    return None


def layer_call(m: torch.nn.Module) -> Optional[Callable]:
    """For einops' ``Rearrange`` / ``Reduce`` layers, ``fn(input)`` calling the traced function with the layer's
    pattern; else ``None``.
    """
    module = einops_module()
    if module is None or type(m).__module__ != "einops.layers.torch":
        return None
    if type(m).__name__ == "Rearrange":
        return lambda x: _traced("rearrange", module.rearrange)(x, m.pattern, **m.axes_lengths)
    if type(m).__name__ == "Reduce":
        return lambda x: _traced("reduce", module.reduce)(x, m.pattern, m.reduction, **m.axes_lengths)
    return None


__all__ = ["TracedEinops", "einops_module", "layer_call", "traced"]

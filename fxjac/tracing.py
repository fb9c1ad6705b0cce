"""Tracing any ``nn.Module`` into a normalised primal graph that the passes can differentiate.

The tracer keeps as leaves only the modules that must stay whole (the user's ``leaf_modules`` and the torch.nn
built-ins torch.fx cannot trace into, such as RNNs); every other module, torch.nn built-ins included, is traced
into, so the rules see ``F.linear``, ``F.conv2d``… with their parameters as ``get_attr`` nodes. Modules with a
decomposition (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) are traced through it.

After tracing the graph is normalised: leaf modules become :func:`passes.module_call` calls with their
parameters as explicit inputs, in-place ops become out-of-place ones (later uses of the mutated value follow the
new node), ``x.T`` becomes a transpose, and functions with a decomposition (fused attention) are expanded.
"""

from __future__ import annotations

import builtins
import collections.abc
import contextlib
import copy
import dataclasses
import itertools
import math
import operator
import re
import string
import threading
import types
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_aggregate, map_arg
from torch.utils._pytree import tree_flatten, tree_map

from passes.dag import any_tensor
from passes.protocol import as_tuples, fields_of, module_call

from . import traced_einops
from .errors import ModeError, TraceError, describe, source_line

AUTO_LEAVES: tuple = (nn.RNNBase, nn.RNNCellBase)
"""torch.nn built-ins that torch.fx cannot trace into and that fxjac has no decomposition for."""

MODULE_DECOMPOSITIONS: dict = {}
"""Module class -> ``fn(module, *args, **kwargs)`` traced in place of the module's own forward."""

FUNCTION_DECOMPOSITIONS: dict = {}
"""Function -> an equivalent traceable function of simpler ops, expanded after tracing."""


def decomposition_for(cls: type) -> Optional[Callable]:
    """The module decomposition registered for ``cls`` or its nearest base class, where ``cls`` runs that base's
    code; a subclass with a ``forward`` of its own (timm's ``BatchNormAct2d``: batch norm, then an activation) or
    another method of its own that forward runs (``_sa_block``) is traced into, its ``super().forward(x)`` too (the
    decomposition dropped what it changes).
    """
    for base in cls.__mro__:
        if base in MODULE_DECOMPOSITIONS:
            return None if _overrides(cls, base) else MODULE_DECOMPOSITIONS[base]
    return None


def _overrides(cls: type, base: type) -> bool:
    """Whether a class of the user's between ``cls`` and ``base`` redefines ``forward`` or a method that
    ``base``'s forward calls, at any depth (TransformerEncoderLayer's ``_sa_block``; not ``_reset_parameters``,
    which only the constructor runs). torch's own subclasses (InstanceNorm2d of _InstanceNorm) are the base's forms.
    """
    if base not in _FORWARD_METHODS:
        import inspect
        import textwrap

        called, todo = {"forward"}, ["forward"]
        while todo:
            fn = getattr(base, todo.pop(), None)
            try:
                source = textwrap.dedent(inspect.getsource(fn))
            except (TypeError, OSError):
                continue
            for name in re.findall(r"\b(?:self|super\(\))\.(\w+)\s*\(", source):
                if name not in called and callable(getattr(base, name, None)):
                    called.add(name)
                    todo.append(name)
        _FORWARD_METHODS[base] = frozenset(called)
    names = _FORWARD_METHODS[base]
    for c in cls.__mro__:
        if c is base:
            return False
        if not c.__module__.startswith("torch.nn.") and any(k in names for k in vars(c)):
            return True
    return False


_FORWARD_METHODS: dict = {}  # a decomposed built-in -> the methods its forward runs


def decomposes(target) -> Callable:
    """Register a decomposition for a module class or a function (used by the rule families)."""

    def deco(fn):
        table = MODULE_DECOMPOSITIONS if isinstance(target, type) else FUNCTION_DECOMPOSITIONS
        table[target] = fn
        return fn

    return deco


def emit_op(fn, *args):
    """Inside a decomposition: record ``fn(*args)`` as one graph op (a run-time kernel with a rule of its own)
    instead of tracing into it; on constants only (a mask held as a buffer) it is computed now.
    """
    tracer = next((a.tracer for a in args if isinstance(a, fx.Proxy)), None)
    return fn(*args) if tracer is None else tracer.create_proxy("call_function", fn, args, {})


_PROXY_INPLACE = {"__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
                  "__itruediv__": operator.itruediv, "__ipow__": operator.ipow, "__imod__": operator.imod,
                  "__ifloordiv__": operator.ifloordiv, "__imatmul__": operator.imatmul,
                  "__setitem__": operator.setitem}


def _attribute(root: nn.Module, target: str) -> Any:
    """The value at a dotted ``target`` under ``root``, read past torch.fx's tracing hooks (which hand out
    Proxies for parameters while tracing).
    """
    *path, name = target.split(".")
    mod = root
    for atom in path:
        mod = mod._modules[atom]
    for store in (mod._parameters, mod._buffers, mod.__dict__):
        if name in store:
            return store[name]
    return object.__getattribute__(mod, name)


_UNKNOWN = object()
"""A value the runs on meta tensors cannot compute, nor anything computed from it (Note [dtypes while tracing])."""


def _to_meta(v):
    return torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v


def _map_tensors(fn: Callable, v: Any, depth: int = 0) -> Any:
    """``v`` with ``fn`` applied to each tensor in it: inside tuples, lists and dicts (as torch's pytree), and also
    inside mappings, dataclasses and objects that pytree does not reach (a ``UserDict`` such as Hugging Face's
    ``BatchEncoding``), copied shallowly, so the runs on meta tensors grow their batch too.
    """
    if isinstance(v, torch.Tensor):
        return fn(v)
    if depth > 4 or isinstance(v, (str, bytes, int, float, bool, type, types.ModuleType, types.FunctionType,
                                   nn.Module, torch.dtype, torch.device)) or v is None:
        return v
    if type(v) in (tuple, list):
        return type(v)(_map_tensors(fn, a, depth + 1) for a in v)
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return type(v)(*(_map_tensors(fn, a, depth + 1) for a in v))
    if type(v) is dict:
        return {k: _map_tensors(fn, a, depth + 1) for k, a in v.items()}
    if isinstance(v, collections.abc.MutableMapping):
        new = copy.copy(v)
        for k in list(v.keys()):
            new[k] = _map_tensors(fn, v[k], depth + 1)
        return new
    if hasattr(v, "__dict__"):
        new = copy.copy(v)
        for k, a in vars(v).items():
            object.__setattr__(new, k, _map_tensors(fn, a, depth + 1))
        return new
    return v


_GROWN = (1, 1031)
"""Note [sizes while tracing]: the runs that tell sizes following the batch, with this many samples more."""


def _to_grown_meta(v, extra: int):
    """An example input with ``extra`` samples more, on meta tensors (Note [sizes while tracing])."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return _to_meta(v)
    return torch.empty((v.shape[0] + extra,) + tuple(v.shape[1:]), dtype=v.dtype, device="meta")


def _proxy_dtype(proxy: fx.Proxy):
    """``proxy.dtype`` while tracing: the value's dtype (Note [dtypes while tracing]), else a traced attribute."""
    tracer = proxy.tracer
    dtype = tracer.dtype_of(proxy.node) if isinstance(tracer, Tracer) else None
    return fx.proxy.Attribute(proxy, "dtype") if dtype is None else dtype


def _proxy_ndim(proxy: fx.Proxy):
    """``proxy.ndim`` while tracing: the value's rank (a product is built for one rank of each input: Note [dtypes
    while tracing]), else a traced attribute.
    """
    ndim = proxy.tracer.ndim_of(proxy.node) if isinstance(proxy.tracer, Tracer) else None
    return fx.proxy.Attribute(proxy, "ndim") if ndim is None else ndim


def _proxy_dim(proxy: fx.Proxy):
    """``proxy.dim()`` while tracing, as :func:`_proxy_ndim`."""
    ndim = proxy.tracer.ndim_of(proxy.node) if isinstance(proxy.tracer, Tracer) else None
    return proxy.tracer.create_proxy("call_method", "dim", (proxy,), {}) if ndim is None else ndim


class _TracedSize(tuple):
    """``x.shape`` while tracing (Note [sizes while tracing]): numbers for the axes that do not follow the batch,
    traced ``x.size(i)`` for those that do; slices and sums stay sizes, as torch.Size's do.
    """

    def numel(self):  # noqa: D102 - torch.Size's
        return math.prod(self)

    def __getitem__(self, index):
        got = tuple.__getitem__(self, index)
        return _TracedSize(got) if isinstance(index, slice) else got

    def __add__(self, other):
        return _TracedSize(tuple.__add__(self, tuple(other)))


def _proxy_shape(proxy: fx.Proxy):
    """``proxy.shape`` while tracing: :class:`_TracedSize`, or torch.fx's traced attribute where the sizes are not
    known (Note [sizes while tracing]).
    """
    sizes = proxy.tracer.sizes_of(proxy.node) if isinstance(proxy.tracer, Tracer) else None
    if sizes is None:
        return fx.proxy.Attribute(proxy, "shape")
    return _TracedSize(proxy.tracer.create_proxy("call_method", "size", (proxy, i), {}) if s is None else s
                       for i, s in enumerate(sizes))


def _proxy_size(proxy: fx.Proxy, dim=None):
    """``proxy.size()`` / ``proxy.size(i)`` while tracing, as :func:`_proxy_shape`."""
    sizes = proxy.tracer.sizes_of(proxy.node) if isinstance(proxy.tracer, Tracer) else None
    if sizes is None or dim is not None and not (isinstance(dim, int) and -len(sizes) <= dim < len(sizes)):
        args = (proxy,) if dim is None else (proxy, dim)
        return proxy.tracer.create_proxy("call_method", "size", args, {})
    if dim is None:
        return _proxy_shape(proxy)
    return proxy.tracer.create_proxy("call_method", "size", (proxy, dim), {}) if sizes[dim] is None else sizes[dim]


_PROXY_LEN = fx.Proxy.__len__


def _proxy_len(proxy: fx.Proxy) -> int:
    """``len(proxy)`` while tracing: a tuple's length where :meth:`Tracer.iter` would iterate it (star-unpacking
    ``f(*torch.linalg.slogdet(a))`` asks for it first), else torch.fx's error.
    """
    n = proxy.tracer.tuple_length(proxy.node) if isinstance(proxy.tracer, Tracer) else None
    return _PROXY_LEN(proxy) if n is None else n


def _inplace_method(op):
    def method(self, *args):
        return self.tracer.create_proxy("call_function", op, (self, *args), {})

    return method


_FACTORIES = ("zeros", "ones", "full", "empty", "arange", "eye", "linspace", "tril_indices", "triu_indices",
              "tensor")
"""torch tensor factories a model may call with sizes read off its input (``torch.zeros(x.shape[0], d)``)."""


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


_LIBRARIES = frozenset(("torch", "fxjac", "passes", "einops", "numpy", "builtins", "functools", "typing", "math"))
"""Top-level packages whose modules' globals the tracer leaves alone (their code is not the user's)."""


class _TracedTorch(types.ModuleType):
    """``torch`` as a traced forward sees it: the same module, except that a factory called with a traced size
    is recorded as a graph call.
    """

    def __init__(self, tracer):
        super().__init__("torch")
        self._tracer = tracer

    def __getattr__(self, name):
        value = getattr(torch, name)
        tracer = self._tracer
        if name == "is_tensor":  # a traced tensor is one (diffusers: if not torch.is_tensor(timesteps): ...)
            return lambda obj: tracer.is_traced_tensor(obj) if isinstance(obj, fx.Proxy) else value(obj)
        if name not in _FACTORIES:
            return value

        def factory(*args, **kwargs):
            traced = []
            map_aggregate((args, kwargs), lambda a: traced.append(a) if isinstance(a, fx.Proxy) else None)
            if traced:
                return tracer.create_proxy("call_function", value, args, kwargs)
            return value(*args, **kwargs)

        return factory


_TUPLE_RESULTS = frozenset({
    "chunk", "split", "unbind", "tensor_split", "split_with_sizes", "hsplit", "vsplit", "dsplit", "slogdet",
    "topk", "sort", "var_mean", "std_mean", "aminmax", "max", "min", "median", "nanmedian", "mode", "kthvalue",
    "cummax", "cummin", "qr", "svd", "eigh", "eig", "lu", "lu_factor", "frexp", "broadcast_tensors",
    "meshgrid", "getitem"})


def _returns_tensor(node: fx.Node) -> bool:
    """Whether ``node`` is a tensor op's result, as far as its name tells (not a size, not a tuple)."""
    return node.op in ("call_function", "call_method", "call_module") and not _returns_tuple(node) and \
        not (node.op == "call_function" and node.target in (operator.getitem, builtins.getattr)) and \
        node.target not in ("size", "dim", "numel", "tolist", "item")


def _sizes(node: fx.Node) -> bool:
    """Whether ``node`` reads a value's sizes (``x.shape``, ``x.size()``): how many, its rank, is known with
    examples (``len(t.shape) == 0``, diffusers' timestep check).
    """
    return node.op == "call_function" and node.target is builtins.getattr and node.args[1] == "shape" or \
        node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs


def _returns_tuple(node: fx.Node) -> bool:
    """Whether ``node`` is an op that returns a tuple of tensors (iterating its value traces with examples)."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_function", "call_method") and target.removeprefix("linalg_") in _TUPLE_RESULTS


class Tracer(fx.Tracer):
    """torch.fx tracer that traces into torch.nn built-ins and honours ``leaf_modules``."""

    proxy_buffer_attributes = True  # ``self.mask[:, :T]`` with a traced ``T``: the buffer must be a graph value

    def __init__(self, leaf_modules: Sequence = (), example_inputs: Optional[Sequence] = None):
        super().__init__()
        self.record_stack_traces = True
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_instances = [m for m in leaf_modules if isinstance(m, nn.Module)]
        self.untraceable: list = []  # torch.nn built-ins whose forward torch.fx could not trace: leaves
        self.example_inputs = None if example_inputs is None else list(example_inputs)
        self._values: dict = {}  # Note [dtypes while tracing]: node -> value on the example inputs
        self._grown: dict = {}  # Note [sizes while tracing]: samples more -> node -> value
        self._unknown: dict = {}  # node -> why its value on meta tensors could not be computed
        self.guessed = False  # a dtype or a tuple's length was needed without examples: guessed
        self._thread = threading.get_ident()  # the tracing thread (Note [tracing and threads])
        self._running = False  # a leaf module runs on meta tensors (_run_leaf)
        self.root_model: Optional[nn.Module] = None  # the model, where a holder's forward calls it (_trace)

    def dtype_of(self, node: fx.Node) -> Optional[torch.dtype]:
        """Note [dtypes while tracing]: the dtype of ``node``'s value, or None (a traced attribute, as before).

        Note [dtypes while tracing]
        ~~~~~~~~~~~~~~~~~~~~~~~~~~~
        torch.fx records ``x.dtype`` as a traced attribute, so ``torch.finfo(x.dtype).min`` (the mask value of
        HuggingFace's attention) and ``if x.dtype == torch.float16:`` cannot be traced. A product is built for
        one dtype (another is a ShapeError), so while tracing ``x.dtype`` is read as a value: the graph so far
        runs up to ``x`` on meta tensors shaped like the example inputs and the parameters (no arithmetic, and no
        in-place op reaches a real buffer; once per node, kept until the trace ends). Without examples (the
        options' check when a product builds at its first call) it reads the model's floating dtype; a trace
        that fails after that guess (forward checks an integer input's dtype) is left to the first call. A value
        that cannot be computed on meta tensors keeps torch.fx's traced attribute.
        """
        if self.example_inputs is None:
            self.guessed = True
            return next((t.dtype for t in self.root.parameters() if t.is_floating_point()), torch.get_default_dtype())
        try:
            value = self._value(node)
        except Exception:  # noqa: BLE001 - a value this cannot compute: torch.fx's traced attribute
            return None
        return value.dtype if isinstance(value, torch.Tensor) else None

    def is_traced_tensor(self, proxy: fx.Proxy) -> bool:
        """``torch.is_tensor(proxy)`` while tracing: whether its value is a tensor (Note [dtypes while tracing]);
        an input is one where there are no examples to tell.
        """
        if self.example_inputs is not None:
            try:
                return isinstance(self._value(proxy.node), torch.Tensor)
            except Exception:  # noqa: BLE001 - not computable on meta tensors: as without examples
                pass
        return proxy.node.op == "placeholder" or _returns_tensor(proxy.node)

    def ndim_of(self, node: fx.Node) -> Optional[int]:
        """The rank of ``node``'s value (Note [dtypes while tracing]: ranks too are fixed for a product, and
        ``if attention_mask.ndim == 2:`` then traces), or None: not computable, or no examples (then the trace
        is left to the first call, if it fails). Not inside torch.nn's own modules: as for a parameter's shape
        (:meth:`getattr`), their forward branching on a rank keeps them whole (spectral norm's parametrization:
        one leaf, one local Jacobian, also for diagonal back-propagation).
        """
        values = None if self._in_builtin() else self._example_values(node)
        return values[0].dim() if values and isinstance(values[0], torch.Tensor) else None

    def sizes_of(self, node: fx.Node) -> Optional[tuple]:
        """Note [sizes while tracing]: the sizes of ``node``'s value, a number for each axis that keeps its size
        with more samples and None for the others, or None (not computable, no examples, or inside a ``torch.nn``
        built-in, as :meth:`ndim_of`).

        Note [sizes while tracing]
        ~~~~~~~~~~~~~~~~~~~~~~~~~~
        A product is built for one sample shape (another is a ShapeError), so every size but the batch's is a
        number for it. While tracing, ``x.shape`` and ``x.size()`` are therefore numbers on the axes that do not
        follow the batch, and traced ``x.size(i)`` on those that do: Hugging Face's masks
        (``kv_length + kv_offset - mask.shape[-1]``), ``if q_len > 1:`` and channel checks then trace, and
        ``torch.arange(x.shape[1])`` is a constant. Which axes follow the batch is read from three runs of the
        graph so far on meta tensors (Note [dtypes while tracing]): on the example inputs, and with 1 and 1,031
        samples more in each (dim 0 of every input is the batch; the far one catches sizes rounded to a
        multiple, as a flattened batch padded to 16 rows is 16 rows at two and at three samples); an axis of
        equal size in all three is a number. A value that a run cannot compute (a selection by values, a leaf that
        needs real values) keeps torch.fx's traced sizes, as do a value whose rank changes with the batch and
        code without examples (the lazy build's options check, which then leaves a failure to the first call).
        The grown runs make tensor factories on meta tensors (``torch.zeros(b, d)`` with no device).
        """
        values = None if self._in_builtin() else self._example_values(node, _GROWN)
        if not values or not all(isinstance(v, torch.Tensor) and v.dim() == values[0].dim() for v in values):
            return None
        return tuple(int(s[0]) if len(set(s)) == 1 else None for s in zip(*(v.shape for v in values)))

    def _example_values(self, node: fx.Node, extras: tuple = ()) -> Optional[list]:
        """``node``'s value on meta tensors, and with each of ``extras`` samples more (Note [sizes while tracing]),
        or None: not computable (torch.fx's traced attribute then), or no examples (a guess: the lazy build
        leaves a failed trace to the first call).
        """
        if self.example_inputs is None:
            self.guessed = True
            return None
        try:
            return [self._value(node, extra) for extra in (0, *extras)]
        except Exception:  # noqa: BLE001 - a value this cannot compute
            return None

    def _value(self, node: fx.Node, extra: int = 0) -> Any:
        env = self._grown.setdefault(extra, {}) if extra else self._values
        if node not in env:
            run = fx.Interpreter(self.root, garbage_collect_values=False, graph=self.graph)
            run.env = env
            concrete = self._concrete_args
            inputs = [n for n in self.graph.nodes if n.op == "placeholder"
                      and re.sub(r"_\d+$", "", str(n.target)) not in concrete]
            examples = dict(zip(inputs, self.example_inputs))  # (by position: a later read resumes midway)
            with torch.no_grad(), torch.device("meta") if extra else contextlib.nullcontext():
                for n in self.graph.nodes:
                    if n in env:
                        pass
                    elif n.op == "placeholder":  # an input, or a concrete argument
                        name = re.sub(r"_\d+$", "", str(n.target))
                        env[n] = concrete[name] if name in concrete else \
                            _map_tensors(lambda v: _to_grown_meta(v, extra), examples[n]) if extra and n in examples \
                            else _map_tensors(_to_meta, examples.get(n, n.args[0] if n.args else None))
                    elif any(env.get(a) is _UNKNOWN for a in n.all_input_nodes):
                        env[n] = _UNKNOWN  # (only what depends on a value meta tensors cannot give is unknown)
                    else:
                        try:
                            env[n] = self._run_on_meta(run, n)
                        except Exception as err:  # noqa: BLE001 - .item(), a selection by values, a leaf's own
                            env[n], self._unknown[n] = _UNKNOWN, err
                    if n is node:
                        break
        if env[node] is _UNKNOWN:
            raise self._unknown.get(node, RuntimeError("computed from a value meta tensors cannot give"))
        return env[node]

    def _run_on_meta(self, run: fx.Interpreter, n: fx.Node) -> Any:
        if n.op == "get_attr":
            return tree_map(_to_meta, _attribute(self.root, n.target))
        if n.op == "call_module":
            return tree_map(_to_meta, self._run_leaf(run, n))
        return tree_map(_to_meta, run.run_node(n))  # (a factory sized by a traced size makes a real tensor)

    def _run_leaf(self, run: fx.Interpreter, node: fx.Node) -> Any:
        """A leaf module's value on meta tensors (its parameters and buffers as meta copies), so that ranks, dtypes
        and tuple lengths after it are known too: run as plain code, its submodules called, not traced
        (:meth:`call_module`, :meth:`getattr`).
        """
        from torch.nn.utils.stateless import _reparametrize_module

        mod = self.root.get_submodule(node.target)
        args, kwargs = run.fetch_args_kwargs_from_env(node)
        state = {k: _to_meta(v) for k, v in itertools.chain(mod.named_parameters(remove_duplicate=False),
                                                            mod.named_buffers(remove_duplicate=False))}
        self._running = True
        try:  # its forward and its submodules', without hooks (a user's hook would keep meta tensors)
            with _reparametrize_module(mod, state):
                return mod.forward(*args, **kwargs)
        finally:
            self._running = False

    def iter(self, obj: fx.Proxy):
        """``for t in torch.chunk(h, 2, 1)``: a tuple's entries, as many as its value on meta tensors has (fixed
        for a product, which is built for one sample shape); a tensor is not iterated (its first axis is the
        batch's). Without examples (the lazy build's options check) the trace is left to the first call.
        """
        n = self.tuple_length(obj.node)
        return super().iter(obj) if n is None else iter([obj[i] for i in range(n)])

    def keys(self, obj: fx.Proxy):
        """``**batch`` and ``batch.keys()`` on a dict input: its keys, from its value on meta tensors (fixed for a
        product, as a tuple's length is); without examples, torch.fx's traced keys (the lazy build's options
        check then leaves a failure to the first call).
        """
        values = self._example_values(obj.node)
        return list(values[0].keys()) if values and isinstance(values[0], dict) else super().keys(obj)

    def tuple_length(self, node: fx.Node) -> Optional[int]:
        """How many tensors ``node``'s value holds, from its value on meta tensors, or None: not a tuple, not
        computable, or no examples (then, for an op that returns a tuple, a guess the lazy build leaves to the
        first call).
        """
        if self.example_inputs is None:
            self.guessed |= _returns_tuple(node) or _sizes(node)
            return None
        try:
            value = self._value(node)
        except Exception:  # noqa: BLE001 - not computable on meta tensors: torch.fx's error
            return None
        return len(value) if isinstance(value, (tuple, list)) else None

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # noqa: D102
        if threading.get_ident() != self._thread or self._running:  # Note [tracing and threads]; _run_leaf
            return attr_val
        # A parameter's shape, size(), dim() and numel() are its own numbers, not traced values (a product is
        # built for the model's parameter shapes): ``self.W.view(*self.W.shape, 1, 1)`` traces. So for the
        # parameters that the user's code reads (first): not for buffers (torch.fx would make theirs a
        # ParameterProxy too, then assert it is a Parameter; a buffer may be replaced by one of another shape),
        # nor inside torch.nn's own modules, whose forward branching on a shape keeps them whole as before
        # (spectral norm's and orthogonal's parametrizations: one leaf, one local Jacobian, their own power
        # iteration in training mode).
        self.param_shapes_constant = isinstance(attr_val, nn.Parameter) and not self._in_builtin()
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _in_builtin(self) -> bool:
        """Whether the code being traced is a ``torch.nn`` built-in's forward."""
        scope = next(reversed(self.module_stack.values()), None) if self.module_stack else None
        return scope is not None and getattr(scope[1], "__module__", "").startswith("torch.nn.")

    def create_arg(self, a: Any):  # noqa: D102
        # Inside torch.func.functional_call a module's parameters are swapped for plain tensors, which torch.fx
        # would keep as constants (``_tensor_constant0``): a product built there computed with the swapped values
        # for good. They are read as the attributes they are (the product reads whatever sits there at a call).
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and \
                threading.get_ident() == self._thread:
            if self._swapped is None:
                self._swapped = {id(t): name for name, t in self.root.named_parameters(remove_duplicate=False)
                                 if not isinstance(t, nn.Parameter)}
            name = self._swapped.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D102
        if m is self.root_model:  # the model itself, called by the holder: traced into, as a root (_trace)
            return False
        if any(m is inst for inst in self.leaf_instances) or any(m is u for u in self.untraceable):
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if decomposition_for(type(m)) is not None:
            return False
        return isinstance(m, AUTO_LEAVES)

    def trace(self, root, concrete_args=None):  # noqa: D102
        # torch.fx's Proxy has no in-place operators, so ``h += x`` would be recorded as ``h = h + x`` and a
        # second name for ``h`` (a saved skip connection) would silently miss the mutation. Record them as
        # ``operator.iadd``…; normalisation then rewrites them with aliases followed (Note [in-place ops]).
        # Grad mode on while tracing, whatever the caller's (a first call under ``torch.no_grad()``): a ``with
        # torch.no_grad():`` block in forward is then seen, and left out of every derivative (create_node).
        saved = {name: fx.Proxy.__dict__.get(name) for name in (*_PROXY_INPLACE, "dtype", "ndim", "dim", "__len__",
                                                             "shape", "size")}
        for name, op in _PROXY_INPLACE.items():
            setattr(fx.Proxy, name, _inplace_method(op))
        fx.Proxy.dtype = property(_proxy_dtype)
        fx.Proxy.ndim = property(_proxy_ndim)
        fx.Proxy.dim = _proxy_dim
        fx.Proxy.__len__ = _proxy_len
        fx.Proxy.shape = property(_proxy_shape)
        fx.Proxy.size = _proxy_size
        self._values, self._grown, self._unknown = {}, {}, {}
        self._concrete_args, self._swapped = dict(concrete_args or {}), None
        self._thread = threading.get_ident()
        self._autocast = _autocast_state()
        state = module_state(root)
        self._torch_view, self._globals_seen = _TracedTorch(self), []
        self._see_forwards(type(root))
        torch.autograd.Function.apply = classmethod(_traced_apply)
        try:
            with torch.enable_grad():
                return super().trace(root, concrete_args)
        finally:
            torch.autograd.Function.apply = _FUNCTION_APPLY
            for name, old in saved.items():
                if old is None:
                    delattr(fx.Proxy, name)
                else:
                    setattr(fx.Proxy, name, old)
            for g, name, view, value in self._globals_seen:
                if g.get(name) is view:
                    g[name] = value
            self._values = {}
            restore_module_state(state)

    def _see_forwards(self, cls: type) -> None:
        """:meth:`_see_globals` of every ``forward`` a module class defines or inherits (``super().forward(x)``)."""
        for c in cls.__mro__:
            forward = vars(c).get("forward")
            while forward is not None:  # a decorated forward: the decorator's function, then the one it wraps
                self._see_globals(forward)
                forward = getattr(getattr(forward, "__func__", forward), "__wrapped__", None)

    def _see_globals(self, forward):
        """Tensor factories given a traced size (``torch.zeros(x.shape[0], d)``) must be recorded as calls, where
        torch would reject the Proxy: the name ``torch`` in the forward's module reads a view of torch whose
        factories record them. Likewise the names that reach einops read its traced functions (Note [einops] in
        fxjac/traced_einops.py). So do the globals of the user's modules that forward's module imports or imports
        functions from (a helper ``causal_mask(x)`` in another file), one step deep. The modules torch and
        einops themselves are never modified.
        """
        fn = getattr(forward, "__func__", forward)
        g = getattr(fn, "__globals__", None)
        if not isinstance(g, dict) or (g.get("__name__") or "").split(".")[0] in _LIBRARIES:
            return  # (torch.nn's modules, fxjac's holder: the user's module they call is seen when it is called)
        self._see_names(g)
        cells = [c.cell_contents for c in getattr(fn, "__closure__", None) or () if _filled(c)]
        for value in list(g.values()) + cells:  # and one step further: the user's helpers from their modules
            other = value.__globals__ if isinstance(value, types.FunctionType) else \
                value.__dict__ if isinstance(value, types.ModuleType) else None
            name = (other or {}).get("__name__") or ""
            if other is not None and other is not g and name.split(".")[0] not in _LIBRARIES:
                self._see_names(other)

    def _see_names(self, g: dict) -> None:
        """:meth:`_see_globals` for one module's globals ``g``."""
        if g.get("torch") is torch:
            self._swap(g, "torch", self._torch_view)
        einops = traced_einops.einops_module()
        if einops is not None:
            for name, value in list(g.items()):
                if value is einops:
                    self._swap(g, name, traced_einops.TracedEinops(einops))
                elif not name.startswith("__") and (view := traced_einops.traced(value)) is not None:
                    self._swap(g, name, view)

    def _swap(self, g: dict, name: str, view: Any) -> None:
        """``g[name] = view`` while tracing (put back by :meth:`trace`)."""
        self._globals_seen.append((g, name, view, g[name]))
        g[name] = view

    def create_node(self, *args, **kwargs):  # noqa: D102
        node = super().create_node(*args, **kwargs)
        if not torch.is_grad_enabled() and node.op not in ("get_attr", "placeholder"):
            # Inside ``with torch.no_grad():`` in forward (trace() turns grad mode on, so off here only there):
            # autograd gives the result no derivative, nor do the passes (they leave nodes marked ``no_grad`` out
            # of every derivative path). Not a parameter's or buffer's node: torch.fx makes one per attribute and
            # every later read shares it, also outside the block.
            node.meta["no_grad"] = True
        if node.op != "placeholder" and _autocast_state() != self._autocast:
            where = source_line(node)
            raise TraceError(
                "forward turns torch.autocast on or off" + (f" (at {where})" if where else "") + ": torch.fx does not "
                "record it, so a product would run these ops in the model's dtype where the model runs them in "
                "another. Remove the autocast block: a product computes in the model's dtype (to compute in "
                "bfloat16, cast the model and inputs: model.to(torch.bfloat16))")
        return node

    def call_module(self, m, forward, args, kwargs):  # noqa: D102
        if threading.get_ident() != self._thread:  # Note [tracing and threads]
            return forward(*args, **kwargs)
        if self._running:  # _run_leaf: plain code on meta tensors, without the modules' hooks
            return m.forward(*args, **kwargs)
        inner = _compiled_inner(m)
        if inner is not None:  # torch.compile's wrapper: the module it compiles (a submodule of it), traced
            return inner(*args, **kwargs)
        self._see_forwards(type(m))  # (``forward`` here is torch.fx's wrapper, defined in torch.fx)
        try:
            self.path_of_module(m)
        except NameError:  # a module made inside forward (``nn.AdaptiveAvgPool2d(1)(x)``): not in the model
            if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
                raise TraceError(f"forward calls a {type(m).__name__} with parameters or buffers that is not a "
                                 "submodule of the model: made in forward (new values each call, never trained), "
                                 "or kept in a plain Python list, dict or tuple, which nn.Module does not "
                                 "register. Make it a submodule in __init__ (nn.ModuleList or nn.ModuleDict for "
                                 "several)") from None
            return forward(*args, **kwargs)  # parameter-free: its forward is traced as the model's own code
        layer = traced_einops.layer_call(m)
        if layer is not None and not self.is_leaf_module(m, ""):
            return layer(*args, **kwargs)
        decomp = decomposition_for(type(m))
        if decomp is not None and not self.is_leaf_module(m, ""):
            return decomp(m, *args, **kwargs)
        if not _builtin(m) or self.is_leaf_module(m, ""):
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception as err:
                if not hasattr(err, "fxjac_traced_into") and not self.is_leaf_module(m, ""):
                    try:  # the innermost module traced into where tracing failed, for the message's hint
                        err.fxjac_traced_into = (self.path_of_module(m), type(m))
                    except (NameError, AttributeError):
                        pass
                raise
        # A torch.nn built-in whose forward branches on its input (``nn.Softmax2d`` checks ``input.dim()``,
        # spectral norm's parametrisation ``weight.ndim``) cannot be traced into: it becomes a leaf, which the
        # autograd fallback differentiates. The nodes of the failed attempt are removed first.
        last, stack, calls = self.graph._root.prev, list(self.module_stack.items()), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _UNTRACEABLE:
            while self.graph._root.prev is not last:
                self.graph.erase_node(self.graph._root.prev)
            self.module_stack.clear()  # the failed calls' scopes were never closed
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            self.untraceable.append(m)
            return super().call_module(m, forward, args, kwargs)


_UNTRACEABLE = (fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError, AttributeError)

_FUNCTION_APPLY = torch.autograd.Function.__dict__["apply"]


def _autocast_state() -> tuple:
    """Whether torch.autocast is on, and in which dtype, for the CPU and CUDA."""
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


def _traced_apply(cls, *args, **kwargs):
    """``torch.autograd.Function.apply`` while tracing (Note [custom autograd Functions]).

    Note [custom autograd Functions]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    torch.fx would trace into a custom Function's ``forward``, which autograd runs without recording: its ops
    would be constants, the Function's ``backward`` never used, and every derivative through it silently zero (a
    straight-through estimator, a stable softplus). A Function applied to traced values is one node instead,
    differentiated by the autograd fallback through torch.func, which runs the Function's own backward; that
    needs the style torch.func supports (``forward`` without ``ctx``, ``setup_context``, and
    ``generate_vmap_rule = True`` or a ``vmap`` rule), and other Functions are a TraceError. Activation
    checkpointing (``torch.utils.checkpoint``'s reentrant Function) only saves memory: the checkpointed function
    is traced as it is.
    """
    proxies = [a for a in list(args) + list(kwargs.values()) if isinstance(a, fx.Proxy)]
    if not proxies:
        return _FUNCTION_APPLY.__func__(cls, *args, **kwargs)
    from torch.utils.checkpoint import CheckpointFunction

    if cls is CheckpointFunction:  # (function, preserve_rng_state, *args)
        return args[0](*args[2:])
    if cls.setup_context is torch.autograd.Function.setup_context:
        tracer = proxies[0].tracer
        path, (_, holder) = next(reversed((getattr(tracer, "module_stack", None) or {}).items()), ("", (None, None)))
        inner = path and getattr(tracer, "root_model", None) is not tracer.root.get_submodule(path)
        keep = f"keep the module that applies it whole, leaf_modules=[{holder.__name__}] ({path}), or " \
            if isinstance(holder, type) and inner else "name the module that applies it in leaf_modules=[...], or "
        raise TraceError(
            f"the custom torch.autograd.Function {cls.__qualname__} takes forward(ctx, ...): fxjac differentiates it "
            "through torch.func, which needs forward without ctx, a setup_context staticmethod and "
            "generate_vmap_rule = True (see torch.func's 'Extending torch.func with autograd.Function'); its ops "
            f"traced one by one would ignore its backward. {keep[0].upper() + keep[1:]}write the Function in that "
            "style")
    return proxies[0].tracer.create_proxy("call_function", _applier(cls), args, kwargs)


_APPLIERS: dict = {}


def _applier(cls) -> Callable:
    """One plain function per custom Function class that applies it: a node's target that generated code can hold
    (torch.fx would name a bound ``cls.apply`` by its module, ``torch.autograd.function.apply``).
    """
    if cls not in _APPLIERS:
        def apply(*args, **kwargs):
            return _FUNCTION_APPLY.__get__(None, cls)(*args, **kwargs)

        apply.__name__ = apply.__qualname__ = f"apply_{cls.__name__}"
        apply.function_class = cls  # read by the fallback (a backward it cannot differentiate again)
        _APPLIERS[cls] = apply
    return _APPLIERS[cls]


def _builtin(m: nn.Module) -> bool:
    """A module class of torch.nn itself (not a container, whose forward calls the user's modules)."""
    return type(m).__module__.startswith("torch.nn.") and not isinstance(
        m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def forward_parameters(model: nn.Module) -> Optional[list]:
    """``model.forward``'s parameters (those of the module torch.compile wrapped), or None where inspect cannot
    read the signature.
    """
    import inspect

    try:
        return list(inspect.signature((_compiled_inner(model) or model).forward).parameters.values())
    except (TypeError, ValueError):
        return None


def _default_args(model: nn.Module, n_inputs: Optional[int], given: dict) -> dict:
    """``given`` (the user's ``concrete_args``) and ``forward``'s parameters that have defaults and come after the
    inputs, counted without those ``given`` fixes: traced as constants (an optional ``output_size=None`` must not
    become a graph input the product would then require).
    """
    params = forward_parameters(model)
    if params is None:
        return dict(given)
    out, i = {}, 0
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            break
        if p.name in given:
            continue
        if p.default is not p.empty and (n_inputs is None or i >= n_inputs):
            out[p.name] = p.default
        i += 1
    return {**out, **given}


def trace(model: nn.Module, leaf_modules: Sequence = (), concrete_args: Optional[dict] = None,
          n_inputs: Optional[int] = None, example_inputs: Optional[Sequence] = None) -> fx.GraphModule:
    """Trace ``model`` (or re-trace a GraphModule) into a normalised GraphModule rooted at ``model``.

    ``forward`` parameters with defaults beyond the first ``n_inputs`` are traced as their defaults unless
    ``concrete_args`` says otherwise.

    Raises:
        TraceError: torch.fx cannot trace the model; the message names the user's line and suggests
            ``leaf_modules``.

    Note [tracing and threads]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~
    Tracing patches process-wide state for its duration: torch.fx replaces ``nn.Module.__call__`` and
    ``__getattr__``, fxjac replaces ``Function.apply`` and a few Proxy attributes and the name ``torch`` in the
    forward's globals. Two traces at once would interleave these patches (one thread's restore undoing the
    other's, or restoring the other's patch for good), so traces take :data:`BUILD_LOCK` in turn. Meanwhile other
    threads run the model or built products as usual: the patched module calls and attribute reads pass
    straight through outside the tracing thread, and fxjac's patches act on traced values only.
    """
    with BUILD_LOCK, parametrizations_uncached():
        return _trace(model, leaf_modules, concrete_args, n_inputs, example_inputs)


BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def parametrizations_uncached():
    """Tracing with torch.nn.utils.parametrize's cache off (and left as it was): inside ``parametrize.cached()``
    a parametrized weight is a tensor computed before, which the trace would take as a constant (no derivative for
    the originals), and a traced weight would be left in the cache for the model's own calls.
    """
    from torch.nn.utils import parametrize

    enabled, cache = parametrize._cache_enabled, parametrize._cache
    parametrize._cache_enabled, parametrize._cache = 0, {}
    try:
        yield
    finally:
        parametrize._cache_enabled, parametrize._cache = enabled, cache


def _trace(model, leaf_modules, concrete_args, n_inputs, example_inputs) -> fx.GraphModule:
    for m in model.modules():
        _check_traceable(m)
    tracer = Tracer(leaf_modules, example_inputs)
    inner = _compiled_inner(model) or model
    if not isinstance(model, fx.GraphModule):
        given = dict(concrete_args or {})
        concrete_args = _default_args(inner, n_inputs, given) or None
        defaulted = [k for k in concrete_args or () if k not in given]
    root = model
    # A root module is never "called", so neither its hooks nor torch.compile's wrapper nor a decomposition would
    # be seen: trace a call of it instead.
    # A forward with *args or **kwargs is called the same way, with its named parameters, and *args gets the
    # example inputs beyond them (one name each): a product passes its inputs one by one and no keyword
    # arguments, so kwargs is {} while tracing, as in the call, and args () where no example inputs are given.
    variadic = _variadic(inner) if not isinstance(model, fx.GraphModule) else None
    if (decomposition_for(type(model)) is not None and not tracer.is_leaf_module(model, "")) or \
            inner is not model or model._forward_hooks or model._forward_pre_hooks or variadic or \
            type(inner).__call__ is not nn.Module.__call__:  # (a __call__ of its own runs too)
        root = _holder(model, inner, n_inputs)
        if not _builtin(inner):  # named in leaf_modules, the model itself is traced into, holder or not
            tracer.root_model = inner
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except (fx.proxy.TraceError, TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError,
            IndexError, KeyError, AssertionError) as err:
        builtin = type(model).__module__.startswith("torch.nn.") and \
            not isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict))  # (its contents failed)
        if root is model and not isinstance(model, fx.GraphModule) and (builtin or tracer.is_leaf_module(model, "")):
            # a built-in kept whole inside a net (nn.LSTM, nn.RNNCell, nn.Softmax2d) is traced into as the root
            raise TraceError(f"the model is a {type(model).__name__}, which fxjac keeps whole inside a net but "
                             f"cannot trace into as the model itself ({err}). Wrap it: nn.Sequential(model) (its "
                             "parameters are then named '0.<name>')") from err
        error = TraceError(_trace_message(err, type(inner)) + ("" if not variadic else (
            f"\nNote: {type(inner).__name__}.forward takes {variadic}, which is empty while tracing, as in every "
            "call of a product: it passes the model's inputs one by one to forward's named parameters, and no "
            "keyword arguments. If forward reads them, name the inputs (def forward(self, x, z))" + (
                ", or build the product with example_inputs=(...): *args then takes the inputs beyond the named "
                "ones" if variadic.startswith("*") and not variadic.startswith("**") and n_inputs is None
                else ""))))
        if not isinstance(model, fx.GraphModule) and defaulted and n_inputs is None:
            error.args = (error.args[0] + f"\nNote: forward's {defaulted} were traced as their defaults: a product "
                          "built without example_inputs= takes forward's parameters without defaults only. To "
                          "make them inputs, build it with example_inputs=(...) that include them",)
        error.guessed = tracer.guessed  # the lazy build's options check defers such a failure
        raise error from err
    _drop_concrete_placeholders(graph, concrete_args or (), n_inputs)
    if root is not model:  # paths under the holder, ``inner.…``, become the model's own
        def own(path: str) -> str:
            return "" if path == "inner" else path[len("inner."):] if path.startswith("inner.") else path

        for n in graph.nodes:
            if n.op in ("get_attr", "call_module"):
                n.target = own(n.target)
            if n.meta.get("nn_module_stack"):  # read by the product's structure check
                n.meta["nn_module_stack"] = {k: (own(p), t) for k, (p, t) in n.meta["nn_module_stack"].items()}
    gm = fx.GraphModule(model if root is not model else tracer.root, graph,
                        class_name=type(model).__name__ + "Traced")
    normalise(gm)
    return gm


def module_state(root: nn.Module) -> list:
    """Each module's attributes, parameters and buffers, and the entries of its dict and list attributes (shallow
    copies), for :func:`restore_module_state`.
    """
    def contents(m):
        return {k: (v, copy.copy(v)) for k, v in m.__dict__.items() if type(v) in (dict, list)}

    return [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), contents(m)) for m in root.modules()]


def restore_module_state(state: list) -> None:
    """Undo the traced values that tracing ``forward`` assigned to the modules (``self.n += 1`` on a buffer,
    ``self.cache = h``), and the meta tensors a leaf's run on meta tensors assigned (:meth:`Tracer._run_leaf`):
    left in the model they would break it (its state_dict, its next call). Other changes stay (torch.fx keeps the
    constant tensors made in forward on the root, ``_tensor_constant0``; a Python counter's increments are the
    model's own side effects, which the first call's output check sees).
    """
    def made(k, v, saved):
        return isinstance(v, fx.Proxy) or isinstance(v, torch.Tensor) and v.is_meta and saved.get(k) is not v

    def traced(v):
        return any(isinstance(a, fx.Proxy) or isinstance(a, torch.Tensor) and a.is_meta
                   for a in tree_flatten(v)[0])

    for m, attrs, params, buffers, contents in state:
        for store, saved in ((m._parameters, params), (m._buffers, buffers), (m.__dict__, attrs)):
            for k in [k for k, v in store.items() if made(k, v, saved)]:
                if k in saved:
                    store[k] = saved[k]
                else:
                    del store[k]
        # a cache the forward fills while tracing (timm LeViT's attention biases: a dict keyed by device) would
        # hand the next trace a value of this one
        for held, before in contents.values():
            if traced(list(held.values()) if isinstance(held, dict) else held):
                held.clear()
                held.update(before) if isinstance(held, dict) else held.extend(before)


def _compiled_inner(m: nn.Module) -> Optional[nn.Module]:
    """The module that ``torch.compile(module)`` wrapped (an OptimizedModule's ``_orig_mod``), else None."""
    from torch._dynamo.eval_frame import OptimizedModule

    return m._orig_mod if isinstance(m, OptimizedModule) else None


def _check_traceable(m: nn.Module) -> None:
    """Raises TraceError for a TorchScript module: its parameters live inside the compiled code, where neither
    torch.fx nor torch.func reach them (traced into, its parameters would silently have no derivative).
    """
    if isinstance(m, torch.jit.ScriptModule):
        raise TraceError(
            f"{type(m).__name__} {getattr(m, 'original_name', '')} is a TorchScript module (torch.jit.script or "
            "torch.jit.trace): its parameters and ops live inside TorchScript's compiled code, which neither torch.fx "
            "nor torch.func can differentiate. Give fxjac the original nn.Module (a product is itself compiled "
            "once; fxjac.compile hands it to torch.compile)")


def input_names(model: nn.Module, concrete_args: Optional[dict] = None) -> Optional[list]:
    """The inputs a trace of ``model`` takes: ``forward``'s named parameters without a default that
    ``concrete_args`` does not fix (as :func:`trace` makes placeholders), or None where inspect cannot read the
    signature.
    """
    params = forward_parameters(model)
    return None if params is None else [
        p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is p.empty and p.name not in (concrete_args or {})]


def _variadic(model: nn.Module) -> Optional[str]:
    """``"*args"`` or ``"**kwargs"`` where ``model.forward`` takes one (the first), else None."""
    return next((("*" if p.kind is p.VAR_POSITIONAL else "**") + p.name for p in forward_parameters(model) or ()
                 if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)), None)


def _holder(model: nn.Module, inner: nn.Module, n_inputs: Optional[int] = None) -> nn.Module:
    """A module whose forward calls ``model`` with the parameters of ``inner.forward`` (``model`` itself, or the
    module torch.compile wrapped), so the tracer's module hook sees the call: ``model``'s hooks run, and its
    decomposition applies. A forward taking ``*args`` gets the inputs beyond its named ones there
    (``args_0, args_1``: ``n_inputs`` in all).
    """
    params = forward_parameters(inner)
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    star = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
    if star is not None and n_inputs is not None:
        names += [f"{star}_{i}" for i in range(n_inputs - len(names))]
    keywords = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    scope: dict = {}
    signature = ", ".join(names + (["*"] + keywords if keywords else []))
    call = ", ".join(names + [f"{k}={k}" for k in keywords])
    exec(f"def forward(self, {signature}):\n    return self.inner({call})\n", scope)  # noqa: S102
    holder_cls = type("Holder", (nn.Module,), {"forward": scope["forward"]})
    holder = holder_cls()
    holder.inner = model
    return holder


def _drop_concrete_placeholders(graph: fx.Graph, names=(), n_inputs: Optional[int] = None) -> None:
    """Concrete arguments are constants: remove torch.fx's placeholders and run-time checks for them, so the
    product's inputs are the model's tensor inputs only. The first ``n_inputs`` placeholders are inputs, also one
    with a default that forward ignores (``attention_mask=None``, given and unused).
    """
    names = set(names or ())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    given = [n for n in placeholders if re.sub(r"_\d+$", "", str(n.target)) not in names]
    inputs = set(given[:n_inputs]) if n_inputs is not None else set()
    concrete = [n for n in placeholders if re.sub(r"_\d+$", "", str(n.target)) in names
                or (n.args and n not in inputs)]
    if not concrete:
        return
    reach = set(concrete)
    for n in graph.nodes:
        if any(a in reach for a in n.all_input_nodes):
            reach.add(n)
    for n in reversed(list(graph.nodes)):
        if n in reach and n.op != "output" and not n.users:
            graph.erase_node(n)


def _unpacks_sizes(err: Exception, line: str) -> bool:
    """Whether the line that failed unpacks (``f(*name)``) a local variable holding traced sizes (``h.shape``,
    ``h.size()``, or a slice of them), read from the innermost frame of the user's code in ``err``'s traceback.
    """
    import traceback

    frames = [f for f, _ in traceback.walk_tb(err.__traceback__)
              if not any(lib in f.f_code.co_filename for lib in ("/torch/", "/fxjac/", "/einops/"))]
    names = re.findall(r"[(,]\s*\*(?!\*)\s*(\w+)\s*[,)]", line)
    if not frames or not names:
        return False
    for name in names:
        value = frames[-1].f_locals.get(name)
        node = value.node if isinstance(value, fx.Proxy) else None
        while node is not None and node.op == "call_function" and node.target is operator.getitem:
            node = node.args[0] if isinstance(node.args[0], fx.Node) else None
        if node is not None and _sizes(node):
            return True
    return False


def _trace_message(err: Exception, root: Optional[type] = None) -> str:
    """The TraceError's text: ``err``, the user's line and a hint for the likely cause (where the line is in a
    library's module that tracing entered, the hint is to keep that module whole: :func:`_library_hint`).
    """
    text = _trace_message_of(err)
    library = _library_hint(err, root) or _builtin_subclass_hint(err, root)
    return text if library is None else text.split("\nHint:")[0] + library


def _builtin_subclass_hint(err: Exception, root: Optional[type]) -> Optional[str]:
    """For a failure in a ``torch.nn`` built-in's code that a subclass of the user's runs (``super().forward``, or
    a method the subclass overrides, which keeps fxjac from decomposing the built-in: :func:`decomposition_for`):
    the hint to keep the subclass whole.
    """
    import inspect
    import os
    import traceback

    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/fx/" not in f.filename
              and "/fxjac/" not in f.filename]
    if not frames or "/torch/nn/" not in frames[-1].filename:
        return None
    path, cls = getattr(err, "fxjac_traced_into", None) or ("", root)
    if not isinstance(cls, type) or cls.__module__.startswith("torch."):
        return None
    base = next((b for b in cls.__mro__[1:] if b in MODULE_DECOMPOSITIONS), None)
    if base is None or os.path.abspath(frames[-1].filename) != os.path.abspath(inspect.getsourcefile(base) or ""):
        return None
    return (f"\nHint: the line is in torch.nn's {base.__name__}, which {cls.__name__} subclasses and runs (its "
            f"super().forward, or a method of it that {cls.__name__} overrides: fxjac's traceable form of "
            f"{base.__name__} holds only where a subclass changes none of its methods). Keep {cls.__name__} whole: "
            f"leaf_modules=[{cls.__name__}]" + (f" ({path})" if path else " (the model itself: wrap it, "
                                                "nn.Sequential(model))") + "; the exact autograd fallback then "
            "differentiates it.")


def _library_hint(err: Exception, root: Optional[type]) -> Optional[str]:
    """For a failure on a line of a library (torch_geometric's MessagePassing, diffusers' blocks: the line is in
    the package of the module that tracing entered, and the model's own class is not) inside a module that
    tracing entered: the hint to name that module in ``leaf_modules`` (editing the library's code, as other hints
    suggest for the user's own, is no option).
    """
    import os
    import sys
    import traceback

    where = getattr(err, "fxjac_traced_into", None)
    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if not any(lib in f.filename for lib in ("/torch/", "/fxjac/", "/einops/"))]
    if where is None or not user:
        return None
    path, cls = where
    top = cls.__module__.split(".")[0]
    package = getattr(sys.modules.get(top), "__file__", None)
    if top == "__main__" or package is None or root is not None and root.__module__.split(".")[0] == top:
        return None
    if not os.path.abspath(user[-1].filename).startswith(os.path.dirname(os.path.abspath(package)) + os.sep):
        return None
    return (f"\nHint: the line is in {cls.__module__.split('.')[0]}'s code, inside the submodule {path!r} "
            f"({cls.__name__}) that fxjac traced into. Keep it whole: leaf_modules=[{cls.__name__}] (imported "
            f"from {cls.__module__}); the exact autograd fallback then differentiates it.")


def _trace_message_of(err: Exception) -> str:
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if not any(lib in f.filename for lib in ("/torch/", "/fxjac/", "/einops/"))]
    where = f"\n  at {user[-1].filename}:{user[-1].lineno}: {user[-1].line}" if user else ""
    line = user[-1].line or "" if user else ""
    if "pack_padded_sequence" in line or "pack_sequence" in line or \
            ("__cuda_array_interface__" in str(err) and "pack" in line):
        return (f"torch.fx cannot trace this model: it packs sequences ({err}){where}\n"
                "A PackedSequence is made from the lengths' values, which tracing does not see, and torch.func "
                "(the autograd fallback) cannot differentiate an RNN over one either. Run the RNN on the padded "
                "batch instead and read each sequence's last valid step, out.gather(1, (lengths - 1).view(-1, 1, "
                "1).expand(-1, 1, out.shape[-1])).squeeze(1) (out[torch.arange(B), lengths - 1] too, but an index "
                "across the batch axis has no diagonal back-propagation): a forward-direction RNN's outputs there "
                "do not depend on the padding after them (a reverse direction's do).")
    if any("/torch/_functorch/" in f.filename for f in frames) or "functorch" in str(err):
        return (f"torch.fx cannot trace this model: {err}{where}\n"
                "Hint: forward takes a derivative itself (torch.func.grad, vmap, jacrev…), which torch.fx cannot "
                "trace. Put that part in a submodule and name its class in leaf_modules=[...]: fxjac then "
                "differentiates it with the autograd fallback (torch.func over torch.func: use torch.func.grad "
                "there, not torch.autograd.grad). A model that is itself such a module: nn.Sequential(model) with "
                "leaf_modules=[type(model)].")
    if "cannot be iterated" in str(err) and (re.search(r"[(,]\s*\*(?!\*)\s*[\w.]+\.(shape|size\(\))", line)
                                           or _unpacks_sizes(err, line)):
        return (f"torch.fx cannot trace this model: {err}{where}\n"
                "Hint: the sizes of a value computed in forward are traced, and torch.fx cannot unpack them into a "
                "call (f(*w.shape, 1, 1), shape = h.shape[:-1]; h.view(*shape, -1, 4)): how many there are is not "
                "known while tracing (also for the output of a module kept whole in leaf_modules). Add axes by "
                "indexing (w[:, :, None, None], w.unsqueeze(-1)) or name each size (w.view(w.shape[0], "
                "w.shape[1], 1, 1)); a parameter's own shape is concrete (self.weight.view(*self.weight.shape, 1) "
                "traces).")
    if "cannot be iterated" in str(err) and re.search(r"[(,]\s*\*(?!\*)\s*[\w.]", line):  # f(*value)
        return (f"torch.fx cannot trace this model: {err}{where}\n"
                "Hint: a tensor cannot be unpacked into a call (f(*h) iterates over its first axis, the batch's; a "
                "tuple of tensors can: f(*torch.linalg.slogdet(a))): split it along another axis (f(*h.unbind(1))) "
                "or index its parts (h[:, 0], h[:, 1]).")
    if any("/torch/distributions/" in f.filename for f in frames):
        return (f"torch.fx cannot trace this model: {err}{where}\n"
                "Hint: torch.distributions checks its arguments' values (a support or constraint check), which "
                "tracing cannot run. Build the distribution with validate_args=False (or call "
                "torch.distributions.Distribution.set_default_validate_args(False) once); log_prob, entropy and "
                "a sample from a fixed noise input (mu + sigma * eps) then trace.")
    if "unknown to einops" in str(err):  # the traced einops was not the one forward called
        return (f"torch.fx cannot trace this model: {err}{where}\n"
                "Hint: fxjac traces einops where forward's module reaches it through a global name (import einops, "
                "from einops import rearrange, at the top of the file): a name bound inside forward (an import "
                "there) reads the untraced einops. Move the import to the module's top level.")
    if user and frames[-1] is user[-1] and re.match(r"\s*(raise|assert)\b", line):
        return (f"torch.fx cannot trace this model: forward's own check raised {type(err).__name__}: {err}{where}\n"
                "Hint: while torch.fx traces forward, its inputs are torch.fx Proxies, not tensors "
                "(isinstance(x, torch.Tensor) is False for them) and their batch size is a traced value (a dtype and "
                "the other sizes are read from example_inputs=, without them a dtype from the model's parameters). "
                "Skip such a check while tracing: if not torch.fx._symbolic_trace.is_fx_symbolic_tracing(): ...")
    if isinstance(err, NotImplementedError) and str(err).startswith("argument of type"):
        return (f"torch.fx cannot trace this model: {err}{where}\n"
                "Hint: a graph holds tensors, numbers, strings and tuples, lists and dicts of them; the model's "
                "output (or a call's argument) holds another object. Return tensors only: a Hugging Face model's "
                "output holds its key/value cache (a Cache object) unless it is built with use_cache=False "
                "(concrete_args={'use_cache': False}, or model.config.use_cache = False).")
    if isinstance(err, TypeError) and "torch.Size() takes an iterable" in str(err):
        return (f"torch.fx cannot trace this model: {err}{where}\n"
                "Hint: while tracing, x.shape is a tuple whose batch entry is a traced value (Note [sizes while "
                "tracing]), which torch.Size cannot hold: pass the tuple itself (x.new_zeros(x.shape), "
                "x.view(x.shape[:-1] + (h, d))).")
    if isinstance(err, TypeError) and user and frames[-1] is user[-1] and "interpreted as an integer" not in \
            str(err) and not re.match(r"(int|float|bool|complex)\(\) argument", str(err)):
        # A tensor's own method (a C function) refused a traced size: the tensor itself is a real one, made from
        # constants while tracing, so torch.fx never saw the call.
        return (f"torch.fx cannot trace this model: {err}{where}\n"
                "Hint: a tensor made in forward from constant values (torch.tensor([...]), torch.arange(3)) is a "
                "real tensor while tracing, and its methods cannot take traced sizes (x.shape[0]) as numbers. "
                "Register it as a buffer in __init__ (self.register_buffer('idx', torch.tensor([...]))) and call "
                "the method on the buffer (self.idx.expand(x.shape[0], -1)); idx.repeat(x.shape[0], 1) also traces.")
    return (f"torch.fx cannot trace this model: {err}{where}\n"
            "Hint: torch.fx traces sizes symbolically (with example inputs, every size but the batch's is a "
            "number while tracing: not inside torch.nn's own modules, nor where a size depends on values), so the "
            "batch size used as a Python number (range(x.shape[0]), int(x.shape[0] / n), len(x), a branch or "
            "assert on it), data-dependent control flow, .item() and iterating over a tensor (for row in x) cannot "
            "be traced. Keep the batch size in tensor ops (x.flatten(1), x.reshape(x.shape[0], -1)), or name the "
            "submodule "
            "that does it in leaf_modules=[...] (fxjac then differentiates it with the autograd fallback; the "
            "model itself cannot be its own leaf), or pass concrete_args=.")


# --- normalisation ---------------------------------------------------------------------------------------

_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ipow: operator.pow, operator.imatmul: operator.matmul,
    operator.imod: operator.mod, operator.ifloordiv: operator.floordiv,
}
_INPLACE_FUNCTIONS = {
    torch.relu_: torch.relu, torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh, torch.exp_: torch.exp,
    F.relu_: F.relu, F.elu_: F.elu, F.leaky_relu_: F.leaky_relu, torch.clamp_: torch.clamp,
}
_INPLACE_KWARG_FUNCTIONS = {F.relu, F.elu, F.leaky_relu, F.hardtanh, F.relu6, F.silu, F.dropout, F.dropout1d,
                            F.dropout2d, F.dropout3d, F.alpha_dropout, F.selu, F.celu, F.rrelu, F.hardswish,
                            F.hardsigmoid, F.mish, F.threshold}


def _mutated(node: fx.Node) -> Optional[tuple]:
    """If ``node`` mutates its first argument, the out-of-place (op, target, kwargs) to use instead."""
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return "call_function", _INPLACE_OPERATORS[node.target], dict(node.kwargs)
        if node.target in _INPLACE_FUNCTIONS:
            return "call_function", _INPLACE_FUNCTIONS[node.target], dict(node.kwargs)
        if node.target in _INPLACE_KWARG_FUNCTIONS and node.kwargs.get("inplace"):
            return "call_function", node.target, {**node.kwargs, "inplace": False}
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and name[:-1] not in _METADATA and any(
                getattr(space, name, None) is node.target for space in (torch, F, torch._C._nn)):
            base = getattr(F, name[:-1], None) or getattr(torch, name[:-1], None)  # F.hardtanh_, torch.neg_
            if callable(base):
                return "call_function", base, dict(node.kwargs)
    if node.op == "call_method" and isinstance(node.target, str):
        name = node.target
        if name in _FILLS:
            return "call_function", _FILLS[name], {}
        if name.endswith("_") and not name.endswith("__") and name != "requires_grad_":
            base = _METADATA.get(name[:-1], name[:-1])
            if hasattr(torch.Tensor, base):
                return "call_method", base, dict(node.kwargs)
    return None


_METADATA = {"t": "t", "transpose": "transpose", "swapdims": "transpose", "swapaxes": "transpose",
             "unsqueeze": "unsqueeze", "squeeze": "squeeze", "as_strided": "as_strided"}
"""In-place ops that change a tensor's shape or strides, not its values (``b.unsqueeze_(1)``): their result is a
new view of the same values, and a view taken before them still reads the old shape."""


def zeroed(x):
    """``x.zero_()`` out of place."""
    return torch.zeros_like(x)


def filled(x, value):
    """``x.fill_(value)`` out of place (a 0-dim tensor value keeps its derivative)."""
    return torch.zeros_like(x) + value


def copied(x, src, non_blocking=False):
    """``x.copy_(src)`` out of place: ``src`` broadcast to ``x``'s shape, cast to its dtype."""
    return torch.zeros_like(x) + src.type_as(x)


_FILLS = {"zero_": zeroed, "fill_": filled, "copy_": copied}
FUNCTION_DECOMPOSITIONS.update({f: f for f in _FILLS.values()})  # traced into zeros_like, add, type_as


def straight_through(old, new):
    """``new``'s values with ``old``'s derivative: an in-place write autograd does not record (under
    ``torch.no_grad()``, or through ``.data`` / ``.detach()``) changes a value but not its history.
    """
    if not torch.is_grad_enabled() and not transformed():
        return new
    # ``old - old.detach()`` is 0 with old's derivative (autograd, forward mode, torch.func and torch.compile
    # alike; dynamo takes no autograd.Function with a custom jvp); where old is not finite it would be NaN.
    return new.detach() + torch.where(torch.isfinite(old), old - old.detach(), 0.0)


def transformed() -> bool:
    """Whether a torch.func transform or a forward-mode AD level is active (a ``jacfwd`` or ``dual_level`` around
    the product): an ``out=`` kernel refuses their wrapped tensors, a copy carries the tangents into the stack
    (and :func:`fxjac.rules._rt.records_grad` holds), and a write autograd does not record stays straight-through.
    """
    return torch._C._functorch.maybe_current_level() is not None or torch.autograd.forward_ad._current_level >= 0


def setitem(base, index, value):
    """``base[index] = value`` out of place: a new tensor (the derivative flows to both ``base`` and ``value``)."""
    out = base.clone()
    out[index] = value
    return out


_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "squeeze", "unsqueeze",
                 "expand", "expand_as", "narrow", "select", "flatten", "unflatten", "diagonal", "as_strided",
                 "swapaxes", "movedim", "unfold", "split", "chunk", "unbind"}
_VIEW_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.narrow,
                   torch.select, torch.flatten, torch.diagonal, torch.movedim, torch.t, torch.split, torch.chunk,
                   torch.unbind}


def _view_of(node: fx.Node):
    """``(base, index)`` when ``node`` is basic/advanced indexing of a tensor, ``(base, None)`` for another view
    op, ``None`` when it is no view.
    """
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        if src.op == "call_method" and src.target in ("split", "chunk", "unbind") or \
                src.op == "call_function" and src.target in (torch.split, torch.chunk, torch.unbind):
            return src.args[0], None  # a piece of a split: a view of the split's input
        if src.target is not operator.getitem and _returns_tuple(src):
            return None  # an entry of topk's, sort's, max's... tuple: a tensor of its own
        if not _basic(node.args[1]):
            return None  # indexing by a list, a mask or an index tensor copies
        return src, node.args[1]
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1] == "data" or \
            node.op == "call_method" and node.target == "detach" or \
            node.op == "call_function" and node.target is torch.detach:
        return node.args[0], None  # the same values without their history
    if node.op == "call_method" and node.target in _VIEW_METHODS:
        return node.args[0], None
    if node.op == "call_function" and node.target in _VIEW_FUNCTIONS:
        return node.args[0], None
    return None


def _basic(index) -> bool:
    """Whether ``index`` is basic indexing (a view): integers, slices, None, Ellipsis, and traced sizes."""
    for part in index if isinstance(index, tuple) else (index,):
        if part is None or part is Ellipsis or isinstance(part, slice) or \
                isinstance(part, int) and not isinstance(part, bool):
            continue
        if not (isinstance(part, fx.Node) and _is_size(part)):
            return False
    return True


def _is_size(node: fx.Node) -> bool:
    """Whether a traced value is a size (``x.shape[1]``, ``x.size(0) // 2``), not a tensor."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    if node.op != "call_function":
        return False
    if node.target is builtins.getattr:
        return node.args[1] in ("shape", "ndim")
    if node.target is builtins.len:
        return True
    if node.target in (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
                       operator.neg, builtins.int, builtins.max, builtins.min):
        return bool(node.all_input_nodes) and all(_is_size(a) for a in node.all_input_nodes)
    return False


def _redirect_later_uses(victim: fx.Node, new: fx.Node, pos: int, order: dict, skip=()) -> None:
    for user in list(victim.users):
        if user is not new and user not in skip and order.get(user, -1) > pos:
            user.replace_input_with(victim, new)


def _functionalise(gm: fx.GraphModule) -> None:
    """Rewrite in-place ops out of place; later readers of the mutated value (and of its aliases) read the result.

    Note [in-place ops]
        ``x += y`` traces to ``iadd(x, y)`` whose result the Python code usually rebinds, but any other name
        still bound to the old value (an alias, a captured skip connection read after the mutation) would see
        the mutation at run time. So every use of the mutated node that comes after the in-place op is
        redirected to the new out-of-place node: the mutated value gets a new *version*. A version of a view
        writes back into its base: a slice (``x[:, :2].relu_()``, ``x[idx] = v``) with :func:`setitem`, a
        ``narrow`` or ``select`` too, and a reshaped or transposed view is reshaped or transposed back
        (:func:`_undo_view`); the base's new version goes on up. Every view of a base that gets a new version,
        taken before the mutation and read after it, is taken again from the new version, so a second in-place
        op on a slice (``x2 = x[:, 3:]; x2.mul_(s); x2.add_(t)``) and a view read after its base was mutated see
        the mutation. A mutation through another kind of view (``diagonal``, ``as_strided``) whose base is read
        again is refused (TraceError), never silently dropped.
    """
    _Versions(gm).run()


class _Versions:
    """The walk of :func:`_functionalise`: which node each version stands for, and each node's latest version."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.views: dict = {}  # a node -> the views of it the forward takes, in graph order
        for n in gm.graph.nodes:
            view = _view_of(n)
            if view is not None:
                self.views.setdefault(view[0], []).append(n)
        self.original: dict = {}  # a version -> the node of the traced forward it is a new value of
        self.latest: dict = {}  # a node of the traced forward -> its latest version

    def run(self) -> None:
        graph = self.gm.graph
        for node in list(graph.nodes):
            pos = self.order[node]
            if node.op == "call_function" and node.target is operator.setitem and isinstance(node.args[0], fx.Node):
                base, index, value = node.args
                with graph.inserting_after(node):
                    new = graph.call_function(setitem, (base, index, value))
                new.meta = dict(node.meta)
                self.order[new] = pos
                graph.erase_node(node)
                self.cursor = new
                self.update(base, self._unrecorded(node, base, new, pos), pos,
                            unrecorded=bool(node.meta.get("no_grad")))
                continue
            out = node.kwargs.get("out") if node.op in ("call_function", "call_method") else None
            if isinstance(out, fx.Node):  # torch.mul(a, b, out=buf): a new version of buf
                op, target, kwargs, args, victim = node.op, node.target, dict(node.kwargs), node.args, out
                del kwargs["out"]
            else:
                rewrite = _mutated(node)
                if rewrite is None or not node.args or not isinstance(node.args[0], fx.Node):
                    continue
                (op, target, kwargs), args, victim = rewrite, node.args, node.args[0]
            with graph.inserting_after(node):
                new = graph.create_node(op, target, args, kwargs, name=node.name + "_")
            new.meta = dict(node.meta)
            self.order[new] = pos
            self.cursor = new
            if op == "call_method" and isinstance(node.target, str) and node.target[:-1] in _METADATA:
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                self._reshaped(victim, new, pos)
                continue
            version = self._unrecorded(node, victim, new, pos)
            node.replace_all_uses_with(version)  # the op's result is its first argument, mutated
            self.views.setdefault(self.original.get(victim, victim), []).extend(self.views.pop(node, ()))
            unrecorded = bool(node.meta.get("no_grad"))
            graph.erase_node(node)
            self.update(victim, version, pos, unrecorded=unrecorded)

    def _unrecorded(self, node: fx.Node, victim: fx.Node, new: fx.Node, pos: int) -> fx.Node:
        """``new``, or where autograd does not record the write (under ``torch.no_grad()`` in forward) the
        straight-through version: ``new``'s values, ``victim``'s derivative (a clipped activation, a max-norm
        clipped weight keep their gradient, as autograd gives it).
        """
        if not node.meta.get("no_grad"):
            return new
        through = self._insert("call_function", straight_through, (victim, new))
        through.meta = {k: v for k, v in new.meta.items() if k != "no_grad"}
        self.order[through] = pos
        return through

    def _reshaped(self, victim: fx.Node, new: fx.Node, pos: int) -> None:
        """``victim.unsqueeze_(1)`` and its kin: ``new`` is a view of the same values with another shape, read
        from here on where ``victim`` was; views taken before keep their shape (their values did not change).
        """
        _redirect_later_uses(victim, new, pos, self.order, skip=(new,))
        self.views.setdefault(self.original.get(victim, victim), []).append(new)

    def update(self, victim: fx.Node, new: fx.Node, pos: int, came_from: Optional[fx.Node] = None,
               unrecorded: bool = False) -> None:
        """From position ``pos`` on, ``victim`` (a version of a node of the forward) has the value ``new``: later
        readers of it read ``new``, views of it are taken again, and a view writes back into its base (except
        into ``came_from``, the neighbour whose new version caused this one); an ``unrecorded`` write (under
        ``torch.no_grad()``) keeps each base's derivative (straight through).
        """
        orig = self.original.get(victim, victim)
        self.original[new] = orig
        self.latest[orig] = new
        _redirect_later_uses(victim, new, pos, self.order, skip=(new,))
        splits: dict = {}
        for view in self.views.get(orig, ()):
            if view is came_from or self.order[view] >= pos or not self._family_read_later(view, pos, None):
                continue
            again = self._take_again(view, new, splits, pos)
            self.update(self.latest.get(view, view), again, pos, came_from=orig)
        up = _view_of(orig)
        if up is None:
            return
        outer = self.original.get(up[0], up[0])
        if outer is came_from or not self._read_later(outer, pos, skip=orig):
            return
        current = self.latest.get(outer, outer)
        if up[1] is not None:
            back = self._insert("call_function", setitem, (current, up[1], new))
        else:
            with self.gm.graph.inserting_after(self.cursor):
                back = _undo_view(self.gm, orig, current, new)
            if back is None:
                where = source_line(new)
                raise TraceError("an in-place op writes through a view (" + orig.format_node() + ") whose base is "
                                 "read afterwards; fxjac cannot follow that alias: write the op out of place"
                                 + (f"\n  at {where}" if where else ""))
            self.cursor = back
        back.meta = {k: v for k, v in new.meta.items() if k != "no_grad"}
        self.order[back] = pos
        if unrecorded:
            written = back
            back = self._insert("call_function", straight_through, (current, written))
            back.meta = dict(written.meta)
            self.order[back] = pos
        self.update(current, back, pos, came_from=orig, unrecorded=unrecorded)

    def _read_later(self, node: fx.Node, pos: int, skip: Optional[fx.Node] = None) -> bool:
        """Whether ``node`` (of the traced forward), a view of it, or a base it is a view of, has a reader after
        position ``pos``; the views of ``skip`` do not count.
        """
        while True:
            if self._family_read_later(node, pos, skip):
                return True
            up = _view_of(node)
            if up is None:
                return False
            skip, node = node, self.original.get(up[0], up[0])

    def _family_read_later(self, node: fx.Node, pos: int, skip: Optional[fx.Node]) -> bool:
        current = self.latest.get(node, node)
        if any(self.order.get(u, -1) > pos for u in current.users):
            return True
        return any(self._family_read_later(v, pos, skip) for v in self.views.get(node, ())
                   if v is not skip and self.order[v] < pos)

    def _take_again(self, view: fx.Node, base: fx.Node, splits: dict, pos: int) -> fx.Node:
        """``view`` taken again from ``base``'s new version (a piece of a split: the split again, once)."""
        src = view.args[0]
        if view.op == "call_function" and view.target is operator.getitem and _splits(src):
            if src not in splits:  # a piece of a split: split the new version once
                splits[src] = self._insert(src.op, src.target, (base,) + tuple(src.args[1:]), dict(src.kwargs))
                self.order[splits[src]] = pos
            args = (splits[src],) + tuple(view.args[1:])
        else:
            args = (base,) + tuple(view.args[1:])
        again = self._insert(view.op, view.target, args, dict(view.kwargs))
        again.meta = dict(view.meta)
        self.order[again] = pos
        return again

    def _insert(self, op, target, args, kwargs=None) -> fx.Node:
        with self.gm.graph.inserting_after(self.cursor):
            node = self.gm.graph.create_node(op, target, args, kwargs or {})
        self.cursor = node
        return node


def _splits(node: fx.Node) -> bool:
    """Whether ``node`` is a split, chunk or unbind (its pieces are views of its input)."""
    return node.op == "call_method" and node.target in ("split", "chunk", "unbind") or \
        node.op == "call_function" and node.target in (torch.split, torch.chunk, torch.unbind)


_RESHAPES = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze"}
_TRANSPOSES = {"transpose", "swapaxes", "t"}


def _undo_view(gm: fx.GraphModule, view: fx.Node, outer: fx.Node, new: fx.Node):
    """The base ``outer`` after an in-place op wrote ``new`` through ``view``, a non-indexing view of it (Note
    [in-place ops]): ``new`` reshaped or transposed back, or written into ``outer`` where the view is a
    ``narrow`` or ``select``; ``None`` for another view (``diagonal``, ``as_strided``, ``expand``...).
    """
    name = view.target if view.op == "call_method" else getattr(view.target, "__name__", None)
    if name in ("detach", "getattr"):  # .detach(), .data: the values change, the derivative stays the base's
        return gm.graph.call_function(straight_through, (outer, new))
    args = list(view.args[1:])
    for key in ("dim", "dim0", "dim1", "dims", "start", "length", "index", "source", "destination"):
        if key in view.kwargs:
            args.append(view.kwargs[key])
    if name in _RESHAPES:
        return gm.graph.call_method("reshape_as", (new, outer))
    if name in _TRANSPOSES:
        return gm.graph.call_method("t", (new,)) if name == "t" else gm.graph.call_method("transpose", (new, *args))
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if all(isinstance(d, int) for d in dims):  # permute names every axis
            inverse = sorted(range(len(dims)), key=lambda i: dims[i] % len(dims))
            return gm.graph.call_method("permute", (new, *inverse))
    if name == "movedim" and len(args) == 2:
        return gm.graph.call_method("movedim", (new, args[1], args[0]))
    if name in ("narrow", "select") and len(args) == (3 if name == "narrow" else 2) and \
            all(isinstance(a, int) for a in args):
        dim, start = args[0], args[1]
        if name == "select":
            pick = start
        else:
            end = start + args[2]
            pick = slice(start, None if start < 0 <= end else end)
        index = (slice(None),) * dim + (pick,) if dim >= 0 else (Ellipsis, pick) + (slice(None),) * (-dim - 1)
        return gm.graph.call_function(setitem, (outer, index, new))
    return None


def _leaf_calls(gm: fx.GraphModule) -> None:
    """Leaf modules become ``module_call(mod, names, params, *args)`` with their parameters as graph inputs."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        names = tuple(n for n, p in mod.named_parameters())
        with gm.graph.inserting_before(node):
            mod_node = gm.graph.get_attr(node.target)
            params = tuple(gm.graph.get_attr(f"{node.target}.{n}") for n in names)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(module_call, (mod_node, names, params) + tuple(node.args),
                                         dict(node.kwargs))
        new.meta = dict(node.meta)
        new.meta["module_type"] = type(mod)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        new.name = node.name


def _attributes(gm: fx.GraphModule) -> None:
    """``x.T`` and ``x.mT`` become explicit transposes."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is builtins.getattr and node.args[1] in ("T", "mT"):
            with gm.graph.inserting_before(node):
                if node.args[1] == "mT":
                    new = gm.graph.call_method("transpose", (node.args[0], -2, -1))
                else:
                    new = gm.graph.call_method("t", (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)


def _decompose(gm: fx.GraphModule) -> None:
    """Expand calls of functions with a decomposition into the simpler ops it is written in."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in FUNCTION_DECOMPOSITIONS:
            continue
        fn = FUNCTION_DECOMPOSITIONS[node.target]
        tracer = fx.proxy.GraphAppendingTracer(gm.graph)
        with gm.graph.inserting_before(node):
            args = map_arg(node.args, lambda n: fx.Proxy(n, tracer))
            kwargs = map_arg(node.kwargs, lambda n: fx.Proxy(n, tracer))
            out = fn(*args, **kwargs)
        for n in gm.graph.nodes:
            if "stack_trace" not in n.meta and "stack_trace" in node.meta:
                n.meta["stack_trace"] = node.meta["stack_trace"]
        node.replace_all_uses_with(out.node)
        gm.graph.erase_node(node)


# Note [ReLU after max pooling]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# ``max_pool(relu(x)) == relu(max_pool(x))`` exactly: ReLU is monotone, so the window's maximum is the same
# entry either way, and every derivative agrees too (at ties the routed cotangent is masked to zero in both
# orders). ReLU after the pooling touches a quarter of the entries (2x2 windows), in the forward and in every
# product: the backward mask of a K-column stack then runs on the pooled stack (cnn exact GGN diagonal: the
# two masks over 9 columns took 6 of 84 ms). Rewritten only where the pooling is the ReLU's one user and the
# ReLU is not in place.

_RELUS = (torch.relu, F.relu)
_MAX_POOLS = {F.max_pool1d: 6, F.max_pool2d: 6, F.max_pool3d: 6, torch.max_pool1d: None, torch.max_pool2d: None,
              torch.max_pool3d: None, F.adaptive_max_pool1d: 2, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 2}


def _plain_relu(node) -> bool:
    if not isinstance(node, fx.Node) or len(node.users) != 1 or len(node.args) != 1:
        return False
    if node.op == "call_method":
        return node.target == "relu" and not node.kwargs
    return node.op == "call_function" and node.target in _RELUS and not node.kwargs.get("inplace", False) and \
        set(node.kwargs) <= {"inplace"}


def _relu_after_max_pool(gm: fx.GraphModule) -> None:
    """Note [ReLU after max pooling]: ``max_pool(relu(x))`` becomes ``relu(max_pool(x))``."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MAX_POOLS or not node.args:
            continue
        at = _MAX_POOLS[node.target]
        with_indices = node.kwargs.get("return_indices", at is not None and len(node.args) > at and node.args[at])
        relu = node.args[0]
        if with_indices or not _plain_relu(relu):
            continue
        node.args = (relu.args[0],) + tuple(node.args[1:])
        with gm.graph.inserting_after(node):
            after = gm.graph.call_function(F.relu, (node,))
        after.meta = {k: v for k, v in relu.meta.items() if k in ("stack_trace", "nn_module_stack")}
        node.replace_all_uses_with(after, delete_user_cb=lambda user: user is not after)
        gm.graph.erase_node(relu)


def _einsum_equations(gm: fx.GraphModule) -> None:
    """``torch.einsum`` in its other spellings, operands in one list (``einsum("ij,jk", [a, b])``) or the
    sublist form (``einsum(a, [0, 1], b, [1, 2], [0, 2])``), becomes ``einsum(equation, *operands)``: the form
    its rule reads.
    """
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.einsum or node.kwargs or not node.args:
            continue
        args = node.args
        if isinstance(args[0], str):
            if len(args) == 2 and isinstance(args[1], (list, tuple)):
                node.args = (args[0],) + tuple(args[1])
            continue
        if len(args) % 2 == 1:  # the output's sublist ends the arguments
            operands, subs, out = args[0:-1:2], args[1:-1:2], args[-1]
        else:  # torch's implicit output: the ellipsis, then the indices that appear once, ascending
            operands, subs = args[0::2], args[1::2]
            seen = [i for sub in subs for i in sub if i is not Ellipsis]
            out = ([Ellipsis] if any(i is Ellipsis for sub in subs for i in sub) else []) + \
                sorted(i for i in set(seen) if seen.count(i) == 1)

        def spell(sub):
            return "".join("..." if i is Ellipsis else string.ascii_letters[i] for i in sub)

        equation = ",".join(spell(sub) for sub in subs) + "->" + spell(out)
        node.args = (equation,) + tuple(operands)


def normalise(gm: fx.GraphModule) -> fx.GraphModule:
    """All normalisations, in place; returns ``gm`` recompiled."""
    _leaf_calls(gm)
    _attributes(gm)  # first: a write through x.T is a write through a transpose
    _functionalise(gm)
    _decompose(gm)
    _relu_after_max_pool(gm)
    _einsum_equations(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def fields_as_tuples(gm: fx.GraphModule) -> None:
    """A leaf module that returns a dict or a dataclass (a Hugging Face ``ModelOutput``), at any depth of its
    output, returns each as the tuple of its fields instead (``module_call(..., _fields=True)``, :func:`as_tuples`),
    and each ``out["h"]`` / ``out.h`` / ``out[0]`` reads its field by position: the passes differentiate a tuple
    field by field, and torch.func differentiates through no dataclass (read by name, the field was a constant:
    zero derivatives, silently).

    Needs ``meta["val"]``, which becomes the value with tuples for dicts and dataclasses.

    Raises:
        TraceError: such a value is used other than by reading a field (handed whole to another call).
    """
    changed = False
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is module_call):
            continue
        val = node.meta.get("val")
        if as_tuples(val) is val or not any_tensor(as_tuples(val)):
            continue
        _read_by_position(node, val, type(node.args[0].meta.get("module")).__name__)
        node.kwargs = {**node.kwargs, "_fields": True}
        changed = True
    if changed:
        gm.recompile()


def _read_by_position(node: fx.Node, val: Any, leaf: str) -> None:
    """:func:`fields_as_tuples` for ``node``, whose value was ``val``: its reads by key, attribute or index become
    reads by position, down every level that held a dict or dataclass.
    """
    node.meta["val"] = as_tuples(val)
    names = list(val.keys()) if isinstance(val, dict) else [f.name for f in dataclasses.fields(val)] \
        if fields_of(val) is not None else None
    parts = fields_of(val) if names is not None else val
    for user in list(node.users):
        key = user.args[1] if user.op == "call_function" and len(user.args) == 2 and user.args[0] is node \
            and user.target in (operator.getitem, builtins.getattr) else None
        if names is not None and key in names:
            index = names.index(key)
        elif isinstance(key, int) and not isinstance(key, bool) and -len(parts) <= key < len(parts) and (
                names is None or isinstance(val, dict) and type(val) is not dict):
            index = key % len(parts)  # a tuple's entry, or a ModelOutput indexed as its tuple of fields
        else:
            raise TraceError(f"the leaf module {leaf} returns a {type(val).__name__}, which fxjac differentiates "
                             "field by field; it is used here other than by reading one field (out['h'], out.h):\n"
                             + describe([user]) + "\nRead the fields where the value is used, or leave the module "
                             "out of leaf_modules")
        user.target, user.args, user.kwargs = operator.getitem, (node, index), {}
        if as_tuples(parts[index]) is not parts[index]:
            _read_by_position(user, parts[index], leaf)


def unpack_sequence_arguments(gm: fx.GraphModule) -> None:
    """A tuple-valued node handed whole to another op (``torch.stack(x.chunk(2))``, an LSTM's ``(h, c)``) is
    replaced there by a tuple (or list) of ``getitem`` nodes, so every rule sees one node per tensor.

    Needs ``meta["val"]`` (shape propagation); the new nodes get their piece of it.
    """
    pieces: dict = {}  # node -> its tuple of getitem nodes

    def unpack(node: fx.Node):
        val = node.meta.get("val")
        if not isinstance(val, (tuple, list)) or isinstance(val, torch.Size) or not any_tensor(val):
            return node
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
            return unpack(node.args[0])[node.args[1]]  # a slice of the pieces: ``x.split(2)[1:]``
        if node not in pieces:
            with gm.graph.inserting_after(node):
                items = []
                for i, v in enumerate(val):
                    item = gm.graph.call_function(operator.getitem, (node, i))
                    item.meta = {k: m for k, m in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
                    item.meta["val"] = v
                    items.append(item)
            pieces[node] = (list if isinstance(val, list) else tuple)(unpack(item) for item in items)
        return pieces[node]

    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "get_attr", "output") or node in pieces or \
                (node.op == "call_function" and node.target in (operator.getitem, builtins.getattr)):
            continue
        args, kwargs = map_arg((node.args, node.kwargs), unpack)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
    gm.graph.eliminate_dead_code()  # slices of pieces nobody reads any more
    gm.graph.lint()
    gm.recompile()


# --- mode checks -----------------------------------------------------------------------------------------

_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[i] if len(node.args) > i else default


def _drops_out(leaf: nn.Module) -> bool:
    """A leaf module (kept whole) in training mode with active dropout inside: an RNN's between its layers, or a
    Dropout submodule.
    """
    return any(m.training and (isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1
                               or isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) for m in leaf.modules())


def check_modes(gm: fx.GraphModule, model: nn.Module) -> None:
    """Refuse training-mode BatchNorm and active Dropout (their outputs are not functions of one sample), and
    random draws in the forward.

    Raises:
        ModeError: listing every offending node with the user's source line.
    """
    bad = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _DROPOUTS and _arg(n, 2, "training", True) and _arg(n, 1, "p", 0.5) > 0:
            bad.append(n)
        elif n.target is torch.dropout and _arg(n, 2, "train", True) and _arg(n, 1, "p", 0.5) > 0:
            bad.append(n)
        elif n.target is F.batch_norm and _arg(n, 5, "training", False):
            bad.append(n)
        elif n.target in (F.rrelu, torch.rrelu) and _arg(n, 3, "training", False):
            bad.append(n)
        elif n.target is module_call and isinstance(n.args[0], fx.Node) and _drops_out(
                gm.get_submodule(n.args[0].target)):
            bad.append(n)
    training = any(m.training for m in model.modules())
    if bad and not training and all(n.target is F.batch_norm for n in bad):
        raise ModeError("BatchNorm with track_running_stats=False normalises with the batch's statistics in eval "
                        "mode too, so samples depend on each other: build the product on a model whose BatchNorm "
                        "layers keep running statistics (track_running_stats=True, trained), or use a per-sample "
                        "norm (nn.GroupNorm, nn.LayerNorm):\n" + describe(bad))
    if bad:
        raise ModeError("the model is in training mode: active Dropout, RReLU's random slopes or BatchNorm "
                        "using batch statistics make samples depend on each other or on chance; call "
                        "model.eval() before building the product (BatchNorm also needs "
                        "track_running_stats=True):\n" + describe(bad))
    random = [n for n in gm.graph.nodes if (n.op == "call_function" and n.target in _RANDOM_FUNCTIONS)
              or (n.op == "call_method" and n.target in _RANDOM_METHODS)]
    if random:
        raise ModeError("the forward draws random numbers" + (
            " in a module in training mode (stochastic depth, drop-path: call model.eval() before building the "
            "product); otherwise" if training else " (a VAE's reparameterisation noise?):") + " its output is a "
                        "function of chance, not of the input alone; pass the noise in as an input (then it is "
                        "a constant of the product), or build the product on the deterministic part:\n"
                        + describe(random))


_RANDOM_FUNCTIONS = (torch.randn_like, torch.rand_like, torch.randint_like, torch.randn, torch.rand, torch.randint,
                     torch.randperm, torch.normal, torch.bernoulli, torch.multinomial, torch.poisson)
_RANDOM_METHODS = ("normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_",
                   "random_", "bernoulli", "multinomial")


__all__ = ["AUTO_LEAVES", "Tracer", "check_modes", "decomposes", "normalise", "source_line", "trace",
           "unpack_sequence_arguments"]

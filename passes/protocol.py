"""The small contract between the graph passes and the per-operation rules.

Note [stacked columns]
    Everything that flows along a product edge carries one leading *column* axis: a tangent or cotangent of a
    primal value of shape ``S`` has shape ``[K, *S]``. A single vector product uses ``K = 1``. Broadcasting is
    right-aligned, so ``f'(x)`` of shape ``S`` multiplies a stack ``[K, *S]`` as it is.

Note [per-sample stacks]
    A value that does not depend on the batch (a parameter, or something computed from parameters only) is
    *unbatched*. When a product wants per-sample parameter results, the cotangent (or tangent) of an unbatched
    value carries a stack of ``K * B`` columns, column-major in K: index ``k * B + b``. Only a rule at the
    boundary, whose output is batched while an input is unbatched, sees the difference: it receives or returns
    ``[K, B, *S]`` for that input (the pass reshapes between the two forms).

A rule is an object with up to four methods, each a pure function of fx nodes to emitted fx nodes::

    jvp(e, site, tangents)   -> output tangent (a Node, a tuple for tuple outputs, or ZERO)
    vjp(e, site, ct)         -> {argument name: cotangent or ZERO}
    diag_vjp(e, site, d)     -> {argument name: (A∘A)ᵀ d}   (optional; diagonal back-propagation)
    diag_jvp(e, site, ds)    -> Σ_i (A_i∘A_i) d_i             (optional; diagonal forward propagation)

and may emit its primal call itself (``primal``), to save what those methods reuse.
``tangents`` maps each bound argument name to its tangent (ZERO where the argument carries none; a list for
list arguments such as ``torch.cat``'s tensors).
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

ZERO = None
"""The symbolic zero: no tangent or cotangent flows on this edge, and nothing is emitted for it."""


class Decline(Exception):
    """Raised by a rule that does not handle this particular call (a layout, an argument kind): the pass then
    applies the fallback rule to the node instead, so the result stays exact.
    """


def module_call(mod: torch.nn.Module, names: tuple, params: tuple, *args, _fields: bool = False, **kwargs):
    """Call a leaf module with its parameters given explicitly (so they are graph inputs like any other).
    ``_fields``: return the fields of the module's dict or dataclass output as a tuple (:func:`fields_of`).
    """
    if not names:
        out = mod(*args, **kwargs)
    else:
        out = torch.func.functional_call(mod, dict(zip(names, params)), args, kwargs)
    return as_tuples(out) if _fields else out


def fields_of(value: Any) -> Optional[tuple]:
    """The fields of a dict (its values, in order) or of a dataclass instance, as a tuple; ``None`` for
    anything else (a Hugging Face ``ModelOutput`` is a dict of its fields that are not None).
    """
    if isinstance(value, dict):
        return tuple(value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple(getattr(value, f.name) for f in dataclasses.fields(value))
    return None


def as_tuples(value: Any) -> Any:
    """``value`` with every dict and dataclass in it, at any depth, as the tuple of its fields (:func:`fields_of`);
    tuples and lists holding one become tuples.
    """
    fields = fields_of(value)
    if fields is not None:
        return tuple(as_tuples(f) for f in fields)
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size) and any(
            fields_of(v) is not None or isinstance(v, (tuple, list)) for v in value):
        parts = [as_tuples(v) for v in value]
        return value if all(a is b for a, b in zip(parts, value)) else tuple(parts)
    return value


def rule_key(node: fx.Node, modules: Optional[dict] = None) -> Any:
    """The one place that says what a node calls: the key of its rule.

    Returns the function for ``call_function``, the method name for ``call_method`` and the module class for a
    leaf module (``call_module`` or a :func:`module_call` node).
    """
    if node.op == "call_function":
        if node.target is module_call:
            return type(node.args[0].meta.get("module")) if isinstance(node.args[0], fx.Node) else None
        return node.target
    if node.op == "call_method":
        return node.target
    if node.op == "call_module":
        return type(modules[node.target]) if modules is not None else None
    return None


class RuleTable:
    """Rules keyed by :func:`rule_key`, plus the fallback used for every op without one."""

    def __init__(self, rules: dict, fallback: Any = None):
        self.rules = dict(rules)
        self.fallback = fallback

    def lookup(self, node: fx.Node) -> Any:
        """The structured rule for ``node``, or ``None`` where it has none."""
        key = rule_key(node)
        try:
            return self.rules.get(key)
        except TypeError:  # unhashable target
            return None



def bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Bind a call's arguments to names, filling defaults (``inspect.BoundArguments.arguments``)."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    # Flatten **kwargs catch-alls so rules see plain names.
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
    return out


@dataclass
class Site:
    """Everything a rule may read about one primal call.

    Attributes:
        node: the original node (for names, metadata and the user's source line).
        args: bound arguments, mapped into the new graph (nodes or Python values).
        vals: the same arguments' propagated values (meta tensors, Python numbers) from shape propagation.
        out: the new-graph primal output.
        out_val: its propagated value.
        ps: names of inputs whose (co)tangent is per-sample (see Note [per-sample stacks]).
        batch: a new-graph node holding the batch size at run time (``None`` when the model has no input).
    """

    node: fx.Node
    args: dict
    vals: dict
    out: Any
    out_val: Any
    ps: frozenset = frozenset()
    batch: Any = None
    extra: dict = field(default_factory=dict)

    def needs(self, name: str) -> bool:
        """Whether the backward pass wants the cotangent of argument ``name`` (always true going forward)."""
        need = self.extra.get("need")
        return need is None or name in need

    def val(self, name: str) -> Any:
        """Propagated value (a meta tensor or a Python value) of argument ``name``."""
        return self.vals.get(name)

    def ndim(self, name: Optional[str] = None) -> int:
        """Rank of an argument, or of the output when ``name`` is ``None``."""
        v = self.out_val if name is None else self.vals[name]
        return v.dim()


class Emitter:
    """Adds nodes to the graph being built, named after the primal they serve and tagged with their role."""

    def __init__(self, graph: fx.Graph, role: str, primal: Optional[fx.Node] = None, prefix: str = ""):
        self.graph = graph
        self.role = role
        self.primal = primal
        self.prefix = prefix

    def _tag(self, node: fx.Node) -> fx.Node:
        node.meta["fxjac"] = {"role": self.role, "primal": self.primal.name if self.primal is not None else None}
        if self.primal is not None and "stack_trace" in self.primal.meta:
            node.meta["stack_trace"] = self.primal.meta["stack_trace"]
        return node

    def _name(self) -> Optional[str]:
        if self.primal is None:
            return None
        return f"{self.prefix}{self.primal.name}"

    def __call__(self, fn: Callable, *args, **kwargs) -> fx.Node:
        """Emit ``fn(*args, **kwargs)`` as a ``call_function`` node."""
        return self._tag(self.graph.create_node("call_function", fn, args, kwargs, name=self._name()))

    def method(self, name: str, obj: fx.Node, *args, **kwargs) -> fx.Node:
        """Emit ``obj.name(*args, **kwargs)`` as a ``call_method`` node."""
        return self._tag(self.graph.create_node("call_method", name, (obj,) + args, kwargs, name=self._name()))

    def module(self, target: str, *args) -> fx.Node:
        """Emit ``self.<target>(*args)`` as a ``call_module`` node (a submodule the product will hold)."""
        return self._tag(self.graph.create_node("call_module", target, args, {}, name=self._name()))

    def add(self, a, b):
        """``a + b`` where either may be ZERO; (co)tangents of a tuple value, tuples of stacks, add entry by entry
        (two reads of a nested tuple, ``o[1][0] + o[1][1]``, each give its read's entry).
        """
        if a is ZERO:
            return b
        if b is ZERO:
            return a
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return tuple(self.add(x, y) for x, y in zip(a, b))
        return self(operator.add, a, b)

    def mul(self, a, b):
        """``a * b`` where either may be ZERO."""
        if a is ZERO or b is ZERO:
            return ZERO
        return self(operator.mul, a, b)

    def sum(self, terms: list):
        """The sum of the non-ZERO terms, or ZERO."""
        out = ZERO
        for t in terms:
            out = self.add(out, t)
        return out



class Rule:
    """Base of every rule; ``signature`` names the arguments of the call the rule is registered for.

    ``diff`` lists the argument names whose derivatives the rule computes (``None``: every tensor argument). The
    passes hand a node to the fallback when a (co)tangent flows through an argument outside ``diff``, so a rule
    never drops one silently (``max(a, b)`` binds ``b`` as ``dim``; ``clamp`` may get tensor bounds).
    """

    signature: inspect.Signature = None
    diff: Optional[tuple] = None
    name: str = "rule"
    kind: str = "structured"

    def ignores(self, names) -> bool:
        """Whether a derivative through one of the argument ``names`` would be outside :attr:`diff`."""
        return self.diff is not None and not set(names) <= set(self.diff)

    def jvp(self, e: Emitter, site: Site, tangents: dict):  # pragma: no cover - interface
        """Push a stack of tangents through the op."""
        raise NotImplementedError

    def vjp(self, e: Emitter, site: Site, ct):  # pragma: no cover - interface
        """Pull a stack of cotangents back through the op."""
        raise NotImplementedError

    def diag_vjp(self, e: Emitter, site: Site, d):
        """Pull a stack of diagonals back: ``(A∘A)ᵀ d``; without a closed form the fallback computes it."""
        raise Decline

    def primal(self, e: Emitter, site: Site):
        """Emit the primal call itself, or return ``None`` (the default) to have it copied as it is.

        A rule overrides this to emit a richer call that also returns what its derivative reuses, so the product
        does not compute it twice (max pooling's argmax indices, layer norm's statistics). It returns
        ``(output node, saved)``; every later method of the same node finds the dict ``saved`` in
        ``site.extra["saved"]`` (empty where the primal was copied, e.g. when the call could not be bound).
        """
        return None

    batch_anywhere: bool = False
    """True for rules whose per-sample stacks follow ``site.extra["ps_batch_dim"]``, the batch axis of every
    value at the site (0 unless the values are sequence-first); other rules see per-sample stacks only where
    the batch leads (else the builder hands the node to the fallback).
    """

    square_is_self: bool = False
    """True for ops whose Jacobian holds only zeros and ones (views, copies, slicing): ``A∘A = A``."""

    # Note [one node in two slots]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # Where one node fills two slots of an op (``x * x``, ``h @ h``), the op's Jacobian w.r.t. it is the sum of
    # the slots' Jacobians, A = A1 + A2, and a diagonal method must square that sum: (A∘A) = A1∘A1 + A2∘A2 +
    # 2 A1∘A2. Adding the slots' squares (as the passes add the contributions of two users of a node) misses the
    # cross term: ``x * x`` gave half of ``x ** 2``'s diagonal, ``x - x`` three times ``0``'s. So the passes hand
    # such a node to the fallback (one slot per node) unless its rule says the slots combine: a 0/1 op, where each
    # output entry reads one slot (A1∘A2 = 0), or one that adds the slots' partials first (element-wise ops).
    @property
    def combines_slots(self) -> bool:
        """Whether the diagonal methods hold where one node fills two slots (Note [one node in two slots])."""
        return self.square_is_self

    def diag_jvp(self, e: Emitter, site: Site, tangents: dict):
        """Push a stack of diagonals forward: ``Σ_i (A_i∘A_i) d_i``; 0/1 ops push them as tangents."""
        if self.square_is_self:
            return self.jvp(e, site, tangents)
        raise Decline

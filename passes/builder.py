"""The builder that every product pass writes into: a NEW graph, an env from old nodes to new ones.

The source graph is never modified. A product is assembled in one builder: placeholders first, then the primal
copy interleaved with (or followed by) the nodes a pass emits, then the output; :meth:`Builder.finish` lints and
returns a fresh GraphModule.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.node import map_arg

from passes.dag import any_tensor, batched_nodes, to_networkx
from passes.protocol import ZERO, Emitter, Rule, RuleTable, Site, bind, module_call

_NO_DEFAULT = object()


class MissingRulesError(Exception):
    """Raised by a pass (with ``strict``) listing every node that has no structured rule."""

    def __init__(self, nodes: list):
        self.nodes = nodes
        super().__init__(f"{len(nodes)} op(s) without a rule")


class BatchLayoutError(Exception):
    """Raised where per-sample stacks meet a batch axis whose rows cannot be assigned to samples."""

    def __init__(self, node: fx.Node, message: str):
        self.node = node
        super().__init__(message)


def nodes_in(v) -> list:
    """The nodes of one bound argument: the node itself, or those of a list or tuple argument."""
    if isinstance(v, fx.Node):
        return [v]
    if isinstance(v, (list, tuple)):
        return [a for a in v if isinstance(a, fx.Node)]
    return []


def shares_a_slot(old_args: dict, names) -> bool:
    """Whether one node is the argument of two of ``names`` (``x * x``, ``h @ h``) or twice in one list argument.

    A diagonal method (Note [one node in two slots] in passes/protocol.py) must square the op's Jacobian w.r.t.
    that node, the sum of the slots' Jacobians, not add the slots' squares.
    """
    seen = [a for k in names for a in nodes_in(old_args.get(k))]
    return len(seen) != len(set(seen))


def is_structural(node: fx.Node) -> bool:
    """``getitem`` (or a named field, ``.values``) on a tuple or list value: plumbing the passes handle."""
    if node.op == "call_function" and node.target in (operator.getitem, builtins.getattr):
        src = node.args[0]
        return isinstance(src, fx.Node) and isinstance(src.meta.get("val"), (tuple, list))
    return False


def _has_batch(bd) -> bool:
    if isinstance(bd, tuple):
        return any(_has_batch(b) for b in bd)
    return bd is not None


def batch_dim(node: fx.Node):
    """The batch axis of ``node``'s value (0 where it was not measured), ``None`` without one."""
    return node.meta.get("batch_dim", 0)


def _touches_complex(node: fx.Node) -> bool:
    """Whether ``node`` reads or returns a complex tensor (``torch.fft.rfft(x).abs()``)."""
    return any(any_tensor(n.meta.get("val"), torch.Tensor.is_complex) for n in (node, *node.all_input_nodes))


def batch_factor(node: fx.Node) -> int:
    """Rows per sample along ``node``'s batch axis (Note [merged batch]); 1 where each row is a sample."""
    return node.meta.get("batch_factor", 1)


def rows_by_sample(t: torch.Tensor, factor: int, axis: int) -> torch.Tensor:
    """A batch axis holding T = ``|factor|`` rows per sample split into ``[B, T]`` (Note [merged batch]): each
    sample's rows together (``factor > 0``) or interleaved (``factor < 0``).
    """
    if factor > 0:
        return t.unflatten(axis, (-1, factor))
    return t.unflatten(axis, (-factor, -1)).transpose(axis, axis + 1)


def leading_batch(node: fx.Node) -> bool:
    """Whether every batched part of ``node``'s value has the batch as its first axis."""
    bd = node.meta.get("batch_dim", 0)
    flat = list(bd) if isinstance(bd, tuple) else [bd]
    return all(b in (0, None) for b in flat)


def _one_batch_axis(node: fx.Node):
    """The batch axis that ``node``'s value and every batched input share, with one row per sample (a
    sequence-first ``[T, B, d]``), or ``None``.
    """
    values = [node] + [a for a in node.all_input_nodes if _has_batch(a.meta.get("batch_dim", 0))]
    axes = {a.meta.get("batch_dim", 0) for a in values}
    if len(axes) != 1 or any(batch_factor(a) != 1 for a in values):
        return None
    axis = axes.pop()
    return axis if isinstance(axis, int) else None


def structural_index(node: fx.Node) -> int:
    """The element a structural node selects (a named field of a torch return type mapped to its index)."""
    key = node.args[1]
    if node.target is operator.getitem:
        return key
    val = node.args[0].meta["val"]
    field = getattr(val, key)
    return next(i for i, v in enumerate(val) if v is field)


class Builder:
    """Builds one product graph from a source GraphModule whose nodes carry ``meta["val"]``."""

    def __init__(self, src: fx.GraphModule, rules: RuleTable, strict: bool = False):
        self.src = src
        self.rules = rules
        self.strict = strict
        self.graph = fx.Graph()
        self.env: dict = {}
        self.nx = to_networkx(src.graph)
        self.batched = batched_nodes(self.nx, src.graph)
        if any("batch_dim" in n.meta for n in src.graph.nodes):  # measured axes: see propagate_batch_dims
            self.batched = {n for n in src.graph.nodes if _has_batch(n.meta.get("batch_dim"))}
        self.batch: Optional[fx.Node] = None
        self._rows: dict = {}  # rows per sample -> node holding batch size × rows
        self.fallback_nodes: list = []
        self.saved: dict = {}
        self.modules: dict = {}  # submodules the product graph calls (column loops), by attribute name

    # --- primal copy ---------------------------------------------------------------------------------
    def placeholder(self, name: str, default: Any = _NO_DEFAULT) -> fx.Node:
        """Add a placeholder of the product's signature."""
        if default is _NO_DEFAULT:
            return self.graph.placeholder(name)
        return self.graph.placeholder(name, default_value=default)

    def copy(self, node: fx.Node) -> fx.Node:
        """Copy one primal node into the new graph (idempotent).

        A node whose rule emits its own primal (:meth:`Rule.primal`: a richer call that also returns what the
        derivative reuses) is emitted by the rule; what it saves is kept for :meth:`site`.
        """
        if node in self.env:
            return self.env[node]
        rule = self.rules.lookup(node) if node.op in ("call_function", "call_method") else None
        emitted = None
        if getattr(type(rule), "primal", Rule.primal) is not Rule.primal:
            try:
                site = self.site(node, rule)
            except TypeError:
                site = None
            if site is not None:
                emitted = rule.primal(Emitter(self.graph, "primal", node), site)
        if emitted is None:
            new = self.graph.node_copy(node, lambda a: self.env[a])
        else:
            new, self.saved[node] = emitted
            new.meta.update({k: v for k, v in node.meta.items() if k != "fxjac"})
        self.env[node] = new
        return new

    def copy_all(self) -> None:
        """Copy every primal node except the output."""
        for n in self.src.graph.nodes:
            if n.op not in ("placeholder", "output"):
                self.copy(n)

    def mapped(self, v: Any) -> Any:
        """``v`` (an old-graph argument structure) with its nodes replaced by new-graph nodes."""
        return map_arg(v, lambda a: self.env[a])

    def output_node(self) -> fx.Node:
        """The source graph's output node."""
        return next(n for n in reversed(self.src.graph.nodes) if n.op == "output")

    def batch_size(self) -> Optional[fx.Node]:
        """A new-graph node holding the batch size (dim 0 of the first tensor input), emitted once."""
        if self.batch is None:
            inputs = [n for n in self.src.graph.nodes if n.op == "placeholder"]
            first = next((n for n in inputs if isinstance(n.meta.get("val"), torch.Tensor)
                          and n.meta["val"].dim() > 0), inputs[0] if inputs else None)
            if first is None:
                return None
            if isinstance(first.meta.get("val"), (dict, list, tuple)):
                raise BatchLayoutError(first, "per-sample results take the batch size from a tensor input, and the "
                                              "model's inputs are containers (a dict or tuple of tensors): give "
                                              "the model its tensors as separate arguments (a wrapper whose "
                                              "forward(x, z) calls model({'x': x, 'z': z}))")
            self.batch = self.graph.create_node("call_method", "size", (self.env[first], 0), name="batch_size")
        return self.batch

    def rows(self, factor: int) -> Optional[fx.Node]:
        """A new-graph node holding ``factor`` rows per sample: the batch size times ``factor``."""
        batch = self.batch_size()
        if factor == 1 or batch is None:
            return batch
        if factor not in self._rows:
            with self.graph.inserting_after(batch):
                self._rows[factor] = self.graph.call_function(operator.mul, (batch, factor))
        return self._rows[factor]

    # --- rule application ----------------------------------------------------------------------------
    def structured(self, node: fx.Node) -> Optional[Rule]:
        """``node``'s structured rule, or None: what :meth:`rule` applies, and strict mode lists ops by."""
        return self.rules.lookup(node)

    def rule(self, node: fx.Node) -> Rule:
        """The rule for ``node``: structured, or the fallback (recorded, so the caller can warn)."""
        rule = self.structured(node)
        if rule is None:
            if self.strict:
                raise MissingRulesError([node])
            rule = self.rules.fallback
            if node not in self.fallback_nodes:
                self.fallback_nodes.append(node)
        return rule

    def decline(self, node: fx.Node) -> Rule:
        """The fallback for a node whose structured rule declined this call (recorded like a missing rule)."""
        if self.strict:
            raise MissingRulesError([node])
        if node not in self.fallback_nodes:
            self.fallback_nodes.append(node)
        return self.rules.fallback

    def prepare(self, node: fx.Node, ps: bool, rule: Optional[Rule] = None) -> Site:
        """The site where ``rule`` (default: the node's own) meets ``node``: arguments bound, per-sample inputs
        named (Note [per-sample stacks]). Per-sample stacks at a node whose values do not all lead with the batch
        go to the fallback, which slices each value along its own batch axis. ``site.extra["rule"]`` is the rule.
        """
        rule = self.rule(node) if rule is None else rule
        if rule is not self.rules.fallback and _touches_complex(node):
            rule = self.decline(node)  # structured rules are written for real values; autograd's conventions
        ps_names = self._ps_inputs(node, self.site(node, rule).extra["old_args"], ps, rule)
        moved = 0
        if ps_names and rule is not self.rules.fallback and not (
                leading_batch(node) and all(leading_batch(a) for a in node.all_input_nodes)):
            moved = _one_batch_axis(node) if getattr(rule, "batch_anywhere", False) else None
            if moved is None:
                rule = self.decline(node)
                ps_names = self._ps_inputs(node, self.site(node, rule).extra["old_args"], ps, rule)
        if ps_names:
            self.batch_size()
        site = self.site(node, rule, ps_names)
        site.extra["rule"] = rule
        site.extra["ps_batch_dim"] = moved or 0
        if ps_names:
            # Note [merged batch]: where the batch axis holds T rows per sample (``x.view(-1, d)``), the rule
            # treats rows as samples: per-sample stacks are repeated to rows going in, summed back coming out.
            # ``batch_factor`` is T where each sample's rows are together, -T where the samples interleave
            # (``x.transpose(0, 1).reshape(-1, d)``), 1 where a row is a sample.
            merged = list(site.extra["batched_old"]) + [node]
            if any(self._sized_by_values(a) for a in node.all_input_nodes + [node]):
                raise BatchLayoutError(
                    node, "per-sample results need to know which rows of the batch axis belong to which sample; "
                    "here how many rows each sample has depends on the values (rows picked by nonzero, a boolean "
                    "mask or indices made from them: routed tokens), so no layout holds for every batch. Route "
                    "without changing the batch axis (multiply by a 0/1 gate, torch.where), or take the summed "
                    "vjp")
            held = [a for name in ps_names for a in nodes_in(site.extra["old_args"][name])]
            if any(a.meta.get("part_of_batch") for a in merged + held):
                raise BatchLayoutError(
                    node, "per-sample results need every sample's rows where a parameter meets the batch; here a "
                    "value holds part of the batch (h[:1], h[1:], a tensor_split of the batch axis). Apply the "
                    "layer to the whole batch and select afterwards, or take the summed vjp")
            layouts = {(batch_factor(a), a.meta.get("sample_major") if batch_factor(a) > 1 else True)
                       for a in merged}
            if len(layouts) > 1 or None in next(iter(layouts)):
                raise BatchLayoutError(
                    node, "per-sample results need to know which rows of the batch axis belong to which sample; "
                    "at this op values with different row layouts meet, or the layout could not be measured. "
                    "Keep the batch axis apart (a Linear takes [B, T, d] as it is)")
            factor, sample_major = layouts.pop()
            site.extra["batch_factor"] = factor if sample_major else -factor
            site.batch = self.rows(factor)
        return site

    def _sized_by_values(self, node: fx.Node) -> bool:
        """Whether ``node`` holds rows of several samples in an axis whose length depends on the values
        (``meta["data_sized"]``, see passes/shape_prop.py): its batch axis, or, where no batch axis was measured
        (sample 0 selected nothing), any such axis of a value computed from the batch.
        """
        axes, bd = node.meta.get("data_sized"), node.meta.get("batch_dim")
        if not axes:
            return False
        if isinstance(bd, int) and axes != "unknown":
            return bd in axes
        return node in self.batched or any(a in self.batched for a in nx.ancestors(self.nx, node))

    def _ps_inputs(self, node: fx.Node, old_args: dict, ps: bool, rule: Optional[Rule] = None) -> frozenset:
        """Names of ``node``'s unbatched inputs whose stack is per-sample (Note [per-sample stacks]); not those
        outside the rule's ``diff`` (a constant sparse operator): no derivative reaches them there, or the node
        would have gone to the fallback.
        """
        if not ps or node not in self.batched:
            return frozenset()
        diff = None if rule is None or rule is self.rules.fallback else rule.diff
        names = set()
        for k, v in old_args.items():
            nodes = [v] if isinstance(v, fx.Node) else [a for a in v if isinstance(a, fx.Node)] \
                if isinstance(v, (list, tuple)) else []
            if any(a not in self.batched and isinstance(a.meta.get("val"), torch.Tensor) for a in nodes) and \
                    (diff is None or k in diff):
                names.add(k)
        return frozenset(names)

    def site(self, node: fx.Node, rule: Rule, ps: frozenset = frozenset()) -> Site:
        """Bind ``node``'s arguments by ``rule.signature`` (positional names ``"0"``, ``"1"``… without one)."""
        args, kwargs = node.args, node.kwargs
        if node.op == "call_function" and node.target is module_call and rule.signature is not None:
            args = node.args[3:]
        if rule.signature is not None:
            try:
                old = bind(rule.signature, args, kwargs)
            except TypeError as err:
                raise TypeError(f"cannot bind the arguments of {node.format_node()}: {err}") from err
        else:
            old = {str(i): a for i, a in enumerate(args)}
            old.update(kwargs)
        new = {k: self.mapped(v) for k, v in old.items()}
        vals = {k: map_arg(v, lambda a: a.meta.get("val")) for k, v in old.items()}
        return Site(node=node, args=new, vals=vals, out=self.env.get(node), out_val=node.meta.get("val"),
                    ps=ps, batch=self.batch,
                    extra={"old_args": old,
                           "batched": {self.env[a]: batch_dim(a) for a in node.all_input_nodes if a in self.batched},
                           "batched_old": {a for a in node.all_input_nodes if a in self.batched},
                           "out_batch_dim": batch_dim(node),
                           "saved": self.saved.get(node, {})})



def structure_of(v: Any, lookup) -> Any:
    """Map an argument structure to the (co)tangents of its nodes: ZERO for constants and empty structures."""
    if isinstance(v, fx.Node):
        return lookup(v)
    if isinstance(v, (list, tuple)):
        items = [structure_of(a, lookup) for a in v]
        if all(i is ZERO for i in items):
            return ZERO
        return items
    return ZERO


def real_dtype(node: Any) -> Optional[torch.dtype]:
    """The floating dtype of a node's tensor value, else None (not a tensor, integer, complex)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) and val.dtype.is_floating_point else None


def in_dtype_of(e: Emitter, stack: Any, value: fx.Node, promoted: fx.Node) -> Any:
    """``stack``, a tangent or cotangent stack computed at ``promoted``, in ``value``'s dtype where the two differ.

    Note [mixed dtypes]
    ~~~~~~~~~~~~~~~~~~~
    Where an op promotes (float32 activations times a float64 buffer), its rule computes in the promoted dtype.
    As autograd does, a cotangent flowing back to a float32 operand is cast to float32 and a tangent flowing out
    of the op has the result's dtype (``a + c`` with a float64 constant ``c``: the rule passes ``a``'s float32
    tangent through). Otherwise the next op's rule would meet a float64 stack and a float32 weight and fail
    (``mm``), or a parameter-space result would change dtype. Only emitted where the dtypes differ.
    """
    want, have = real_dtype(value), real_dtype(promoted)
    if want is None or have is None or want == have or not isinstance(stack, fx.Node):
        return stack
    return e.method("to", stack, want)


def new_emitter(b: Builder, node: fx.Node, role: str, prefix: str) -> Emitter:
    """An emitter that names its nodes after ``node``."""
    return Emitter(b.graph, role, node, prefix)

"""Graph questions answered once, in networkx: which nodes need work, which values are batched."""

from __future__ import annotations

from typing import Iterable

import networkx as nx
import torch
import torch.fx as fx


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data-flow DAG of ``graph``: an edge ``a -> b`` for every input ``a`` of ``b``."""
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for a in n.all_input_nodes:
            g.add_edge(a, n)
    return g


def between(g: nx.DiGraph, sources: Iterable[fx.Node], sinks: Iterable[fx.Node]) -> set:
    """Nodes on some path from a source to a sink, both ends included."""
    down = set()
    for s in sources:
        down |= nx.descendants(g, s) | {s}
    up = set()
    for t in sinks:
        up |= nx.ancestors(g, t) | {t}
    return down & up


def differentiable_between(g: nx.DiGraph, sources: Iterable[fx.Node], sinks: Iterable[fx.Node]) -> set:
    """Nodes on some path from a source to a sink along which every node can carry a derivative: a value made from
    a source only through integers, sizes or dtypes (``torch.ones(n, dtype=x.dtype)``) has none.
    """
    down, todo = set(), [s for s in sources if differentiable(s)]
    while todo:
        n = todo.pop()
        if n in down:
            continue
        down.add(n)
        todo.extend(m for m in g.successors(n) if m not in down and differentiable(m))
    up = set()
    for t in sinks:
        up |= nx.ancestors(g, t) | {t}
    return down & up


def any_tensor(v, pred=lambda t: True) -> bool:
    """Whether ``v`` (a propagated value: a tensor, or nested tuples and lists) holds a tensor ``t`` with
    ``pred(t)``.
    """
    if isinstance(v, torch.Tensor):
        return bool(pred(v))
    return isinstance(v, (tuple, list)) and any(any_tensor(x, pred) for x in v)


def differentiable(node: fx.Node) -> bool:
    """Whether ``node``'s value can carry a derivative: a floating or complex tensor, or a tuple holding one."""
    return any_tensor(node.meta.get("val"), lambda t: t.is_floating_point() or t.is_complex())


def batched_nodes(g: nx.DiGraph, graph: fx.Graph) -> set:
    """Nodes whose value depends on a placeholder (an input), i.e. carries the batch."""
    out = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            out |= nx.descendants(g, n) | {n}
    return out

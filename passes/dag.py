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


def differentiable(node: fx.Node) -> bool:
    """Whether ``node``'s value can carry a derivative: a floating or complex tensor, or a tuple holding one."""
    def carries(v) -> bool:
        if isinstance(v, torch.Tensor):
            return v.is_floating_point() or v.is_complex()
        return isinstance(v, (tuple, list)) and any(carries(x) for x in v)

    return carries(node.meta.get("val"))


def batched_nodes(g: nx.DiGraph, graph: fx.Graph) -> set:
    """Nodes whose value depends on a placeholder (an input), i.e. carries the batch."""
    out = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            out |= nx.descendants(g, n) | {n}
    return out

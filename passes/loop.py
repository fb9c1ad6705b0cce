"""Column loops: the part of a product graph that one chunk of stacked columns flows through, moved into a body
GraphModule that a :class:`ColumnLoop` calls once per chunk.

A product whose K seed columns are fixed at build time (a GGN's loss-Hessian factor, an output-space metric)
used to unroll its chunks: one copy of the backward pass per chunk in one static graph. Large chunks are slow on
a CPU (a U-Net's 1,024 MSE columns in two chunks of about 1 GB per stack: 18 s, against 6.3-6.8 s in chunks
of 8, for the same arithmetic), and small ones unrolled cost build time (128 copies: 3 s). So the passes emit the
chunk once, with K' columns, and this pass outlines it (Note [column loops]).

Note [column loops]
~~~~~~~~~~~~~~~~~~~
The region is every node emitted for the chunk: from the column slices (the roots) to the chunk's result. Its
*variant* nodes are the roots, whatever depends on them, and every node with a side effect (a fresh result stack
that the chunk writes into), closed under "writes into": a node that writes into an argument makes that argument
variant too, so a value computed once is never overwritten by the first chunk and read by the second. Variant
nodes move into the body; the region's other nodes (masks, batch sizes, reshaped weights) stay in the product
graph and are computed once, as the body's extra inputs. Outlining is refused (``None``) where the chunk would
write into a value computed before it, or where its result does not depend on the columns; the caller then
unrolls as before.

The loop slices the seed (and its column weights) K' columns at a time, pads the last chunk with zero columns
(they add nothing: every result is a sum over columns of a product that is linear in each column), and adds the
chunks' results, or, for a Jacobian's rows or columns, concatenates them and cuts the padding off.

Under torch.compile dynamo unrolls the loop, one copy of the body per chunk: nine one-column chunks of the cnn's
GGN diagonal compiled for 23 s and ran at 105 ms, against 3-8 s and 84-90 ms for one chunk of nine. So a loop
may hold a second body, emitted for wider chunks, that runs only under torch.compile.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from passes.clean import clean


def _impure(node: fx.Node) -> bool:
    """A side-effecting function call (fx cannot ask a ``call_module`` before the graph has its module; the
    product's own calls of modules are the user's leaf modules in the forward pass, not writes).
    """
    return node.op == "call_function" and node.is_impure()


def _writes(node: fx.Node) -> list:
    """The argument nodes ``node`` may write into: ``meta["writes_arg"]``'s, and a side-effecting call's first."""
    i = node.meta.get("writes_arg")
    if i is None and _impure(node) and node.args:
        i = 0
    arg = node.args[i] if i is not None and i < len(node.args) else None
    return [arg] if isinstance(arg, fx.Node) else []


def _flat_nodes(v: Any) -> list:
    out: list = []
    fx.node.map_arg(v, out.append)
    return out


def outline(graph: fx.Graph, start: fx.Node, roots: list, result: Any) -> Optional[tuple]:
    """Move the variant part of the region after ``start`` (Note [column loops]) into a new graph.

    Args:
        graph: the product graph being built.
        start: the graph's last node before the region.
        roots: the region's column slices (``None`` for an absent one): they become the body's first inputs.
        result: the chunk's result, a node or a list of nodes.

    Returns:
        ``(body, externals)``: the body graph (inputs: the roots, then ``externals``; output: ``result``'s
        structure) and the product-graph nodes it reads, or ``None`` where the region cannot be outlined. The
        region's variant nodes are erased from ``graph``.
    """
    region, seen = [], False
    for n in graph.nodes:
        if seen:
            region.append(n)
        seen = seen or n is start
    in_region = set(region)
    present = [r for r in roots if r is not None]
    variant = set(present)
    changed = True
    while changed:
        changed = False
        for n in region:
            if n not in variant and (_impure(n) or any(a in variant for a in n.all_input_nodes)):
                variant.add(n)
                changed = True
        for n in list(variant):
            for a in _writes(n):
                if a not in variant:
                    if a not in in_region:
                        return None  # would write into a value the product computed before the chunk
                    variant.add(a)
                    changed = True
    # Every reader of a variant node is variant (the region runs to the graph's end), so nothing outside the body
    # reads into it; only a result that does not depend on the columns cannot be looped.
    if not set(_flat_nodes(result)) <= variant:
        return None
    body = fx.Graph()
    env: dict = {}
    for r in roots:
        if r is not None:
            env[r] = body.placeholder(r.name)
    externals: list = []

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            externals.append(a)
            env[a] = body.placeholder(a.name)
            env[a].meta = dict(a.meta)
        return env[a]

    ordered = [n for n in region if n in variant]
    for n in ordered:
        if n not in env:
            for a in n.all_input_nodes:
                if a not in variant:
                    arg(a)
            env[n] = body.node_copy(n, lambda a: env[a])
    body.output(fx.node.map_arg(result, lambda a: env[a]))
    _placeholders_first(body)  # externals were met while copying
    for n in reversed(ordered):
        graph.erase_node(n)
    return body, externals


def _placeholders_first(graph: fx.Graph) -> None:
    """Move every placeholder before the first other node, keeping their order."""
    others = [n for n in graph.nodes if n.op != "placeholder"]
    if not others:
        return
    for n in [n for n in graph.nodes if n.op == "placeholder"]:
        others[0].prepend(n)


class ColumnLoop(nn.Module):
    """Calls a body ``body(columns, weights, *extra)`` on the ``k`` seed columns ``width`` at a time (the last
    chunk padded with zero columns) and returns the sum of the results (Note [column loops]). ``weights`` may be
    ``None``; a result may be a tensor or a list of tensors. ``k=None``: as many columns as ``columns`` has at
    run time (an operand's K).

    ``variants`` holds ``(body, width, n_extra)``: the first runs eagerly; a second, where given, under
    torch.compile, whose dynamo unrolls the loop (fewer, wider chunks there: each is a copy of the body in the
    compiled graph). The extra arguments are the variants' own, one after the other. With ``cat_dim`` the
    chunks' results are concatenated along it instead (a Jacobian's rows or columns), the padding cut off.
    """

    def __init__(self, k: Optional[int], has_weights: bool, variants: list, cat_dim: Optional[int] = None):
        super().__init__()
        self.k, self.has_weights, self.cat_dim = k, has_weights, cat_dim
        self.bodies = nn.ModuleList([v[0] for v in variants])
        self.widths = [v[1] for v in variants]
        self.n_extra = [v[2] for v in variants]

    def extra_repr(self) -> str:
        """The column count and the chunk widths, for printing."""
        return f"k={self.k}, widths={self.widths}"

    @staticmethod
    def _chunk(t: Optional[torch.Tensor], lo: int, width: int) -> Optional[torch.Tensor]:
        if t is None:  # weights the seed's maker left out at run time
            return None
        part = t[lo:lo + width]
        short = width - part.shape[0]
        if short:
            part = torch.cat([part, part.new_zeros((short,) + tuple(part.shape[1:]))])
        return part

    def forward(self, columns, weights, *extra):
        """The sum over chunks of the body's results; ``columns`` and ``weights`` ``[k, ...]``."""
        i = 1 if len(self.bodies) > 1 and torch.compiler.is_compiling() else 0
        body, width, at = self.bodies[i], self.widths[i], sum(self.n_extra[:i])
        extra = extra[at:at + self.n_extra[i]]
        k = columns.shape[0] if self.k is None else self.k
        total, parts = None, []
        for lo in range(0, max(k, 1), width):  # K = 0: one chunk of zero columns, for the results' shapes
            args = (self._chunk(columns, lo, width),) + \
                ((self._chunk(weights, lo, width),) if self.has_weights else ())
            out = body(*args, *extra)
            if self.cat_dim is not None:
                parts.append(out)
            elif total is None:
                total = out
            elif isinstance(out, (list, tuple)):
                total = [operator.add(a, b) for a, b in zip(total, out)]
            else:
                total = total + out
        if self.cat_dim is not None:
            return torch.cat(parts, self.cat_dim).narrow(self.cat_dim, 0, k)
        return total


def chunk_body(graph: fx.Graph, start: fx.Node, roots: list, result: Any) -> Optional[tuple]:
    """:func:`outline` as a cleaned body GraphModule: ``(body, externals)``, or ``None`` where refused."""
    got = outline(graph, start, roots, result)
    if got is None:
        return None
    body, externals = got
    return clean(fx.GraphModule(nn.Module(), body, class_name="ChunkOfColumns")), externals


def column_loop(e, modules: dict, seed: fx.Node, weights: Optional[fx.Node], k: Optional[int], variants: list,
                result: Any, cat_dim: Optional[int] = None) -> Any:
    """Emit a :class:`ColumnLoop` over the ``k`` columns of ``seed`` (and ``weights``, ``None`` when there are
    none), held in ``modules`` under a new name. ``variants``: ``(body, externals, width)`` from
    :func:`chunk_body`, the eager one first; ``result`` is one chunk's result, whose structure (a node or a list
    of nodes) the loop's returns; ``cat_dim``: concatenate the chunks' results along it instead of adding them.
    """
    name = f"column_loop_{len(modules)}"
    modules[name] = ColumnLoop(k, weights is not None, [(b, w, len(x)) for b, x, w in variants], cat_dim)
    extra = [a for _, x, _ in variants for a in x]
    out = e.module(name, seed, weights, *extra)
    if isinstance(result, (list, tuple)):
        return [e(operator.getitem, out, i) for i in range(len(result))]
    return out

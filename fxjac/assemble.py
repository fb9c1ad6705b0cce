"""Pieces every product assembly uses: placeholders, seeds, parameter stacks in the flat layout.

Note [flat layout]
    Parameter-space vectors follow ``Source.params``: each selected parameter flattened, concatenated in
    ``named_parameters()`` order (a tied parameter once). A stack of such vectors is ``[S, P]`` with the column
    axis first; per-sample stacks have ``S = K * B`` (Note [per-sample stacks]).

Note [flat writes]
    A parameter-space result ``[S, P]`` of the backward pass is allocated once, uninitialised, and each block of
    columns is written once (:class:`FlatWriter`): a parameter read at one place only, by a rule that can write its
    cotangent straight into the block (``rule.param_into``, asked through the ``sinks`` of
    ``backward_cotangents``: a Linear's per-sample weight cotangent is an outer product written with ``out=``),
    never forms a cotangent of its own; every other parameter's complete cotangent is copied into its block (a
    tied parameter's get_attr nodes add theirs there), and blocks nothing reached are zeroed. Nothing is
    concatenated. Filling a large fresh stack is then bound by page faults; on Linux it asks for transparent huge
    pages (``advise_huge_pages`` in fxjac/rules/_rt.py). Under torch.compile the same writes are custom ops
    (Note [flat writes under torch.compile], there).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from passes import ZERO, Builder, Emitter, backward_cotangents
from passes.builder import real_dtype
from passes.protocol import Decline

from . import checks
from .rules import _rt
from .source import Source


def api_emitter(b: Builder) -> Emitter:
    """An emitter for the product's own plumbing (operand reshapes, results)."""
    return Emitter(b.graph, "api")


OPERAND_NAMES = frozenset({"v", "w", "M", "target", "operands"})
"""The products' own arguments after the inputs: a model input of the same name is renamed."""


def input_name(name: str) -> str:
    """A model input's name in a product's signature (``forward(q, k, v)``: ``v`` is a product's operand)."""
    return f"{name}_input" if name in OPERAND_NAMES else name


def input_placeholders(b: Builder, src: Source) -> list:
    """One placeholder per model input, mapped in the builder's env; returns the new nodes."""
    out = []
    for n in src.inputs:
        new = b.graph.placeholder(input_name(n.name))
        new.meta = dict(n.meta)
        out.append(new)
    e = api_emitter(b)
    first = None
    for i, (n, new) in enumerate(zip(src.inputs, out)):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0:
            dtype = val.dtype if val.is_floating_point() else None  # (integer ids: any integer dtype)
            ids = not (val.is_floating_point() or val.is_complex() or val.dtype == torch.bool)
            checked = e(checks.check_input, new, tuple(val.shape[1:]), f"input {i}", first, dtype, ids)
            checked.meta = dict(n.meta)
            b.env[n] = checked
            first = checked if first is None else first
        elif val is not None and (layout := checks.nested_layout(val))[0] != "other":
            b.env[n] = e(checks.check_nested, new, layout, f"input {i}")
            b.env[n].meta = dict(n.meta)
        else:
            b.env[n] = new
    return [b.env[n] for n in src.inputs]


# --- run-time helpers ------------------------------------------------------------------------------------


def param_slice(stack, offset, numel, shape, dtype=None):
    """Columns ``offset:offset+numel`` of a flat stack ``[S, P]`` as ``[S, *shape]`` (in ``dtype``: a parameter
    of another dtype than the first, Note [mixed dtypes] in passes/builder.py).
    """
    block = stack[:, offset:offset + numel].reshape((stack.shape[0],) + tuple(shape))
    return block if dtype is None else block.to(dtype)


def flat_cat(parts, numels, rows, like):
    """``[rows, P]`` from per-parameter stacks ``[rows, *shape]`` (``None``: zeros) in the flat layout."""
    cols = [p.reshape(rows, n).to(like.dtype) if p is not None else like.new_zeros((rows, n))
            for p, n in zip(parts, numels)]
    return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]


@fx.node.has_side_effect  # never merged with another allocation of the same size by the clean-up's CSE
def flat_empty(rows, numel, like):
    """An uninitialised flat stack ``[rows, numel]`` with ``like``'s dtype and device (Note [flat writes]); under
    torch.compile a custom op, so that it too gets huge pages (Note [flat writes under torch.compile] in
    fxjac/rules/_rt.py).
    """
    if torch.compiler.is_compiling():
        return _flat_empty(rows, numel, like.dtype, like.device)
    return _rt.advise_huge_pages(torch.empty((rows, numel), dtype=like.dtype, device=like.device))


@_rt.opaque_op(lambda rows, numel, dtype, device: torch.empty((rows, numel), dtype=dtype, device=device))
def _flat_empty(rows: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _rt.advise_huge_pages(torch.empty((rows, numel), dtype=dtype, device=device))


def flat_block(stack, offset, numel):
    """Columns ``offset:offset+numel`` of a flat stack: the ``[rows, numel]`` view a parameter's stack goes to."""
    return stack[:, offset:offset + numel]


@fx.node.has_side_effect
def flat_store(block, ct, prev=None):
    """Copy a parameter's stack ``[rows, *shape]`` into its block, or add it to ``prev``, what an earlier store
    left there (a tied parameter's second get_attr); returns the block.
    """
    _rt.write(block.view(ct.shape), "copy" if prev is None else "add", ct)
    return block


@fx.node.has_side_effect
def flat_zero(block):
    """Zero a block nothing reached; returns it."""
    return _rt.write(block, "zero")


def flat_done(stack, *blocks):
    """The stack once its blocks (arguments, in the flat layout's order: so every write runs first and stays in
    the graph) are written.
    """
    return stack


def stack_to_shape(m, like):
    """A ``[B, I, K]`` operand as a tangent stack ``[K, *like.shape]``."""
    return m.permute(2, 0, 1).reshape((m.shape[2],) + tuple(like.shape))


def stack_to_rows(t, batch):
    """A stack ``[K, B, ...]`` as ``[B, N, K]`` (N the per-sample numel)."""
    return t.reshape(t.shape[0], batch, math.prod(t.shape[2:])).permute(1, 2, 0)


def stack_to_batch_rows(t, batch):
    """A stack ``[K, B, ...]`` as ``[B, K, N]``."""
    return t.reshape(t.shape[0], batch, math.prod(t.shape[2:])).transpose(0, 1)


def eye_stack(like, n):
    """The identity as a stack ``[n, B, *sample]`` over a batched value ``like`` (n = per-sample numel)."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    return eye.reshape((n, 1) + tuple(like.shape[1:])).expand((n,) + tuple(like.shape))


def reshape_like_batch(m, like):
    """A per-sample ``[B, N]`` operand reshaped like the batched value ``like``."""
    return m.reshape(like.shape)


def param_rows(m, offset, numel, dtype=None):
    """Rows ``offset:offset+numel`` of a parameter-space operand ``[P]`` or ``[P, K]`` (in ``dtype``: see
    :func:`param_dtype`).
    """
    rows = m[offset:offset + numel]
    return rows if dtype is None else rows.to(dtype)


def param_sigma(m, offset, numel, shape, dtype=None):
    """A parameter's slice of a diagonal ``[P]`` shaped like the parameter (in ``dtype``: see :func:`param_dtype`)."""
    sigma = m[offset:offset + numel].reshape(shape)
    return sigma if dtype is None else sigma.to(dtype)


def eye_like(like, n):
    """``eye(n)`` with ``like``'s dtype and device."""
    return torch.eye(n, dtype=like.dtype, device=like.device)


def zeros_stack(like, k=1):
    """A zero stack ``[k, *like.shape]``."""
    return like.new_zeros((k,) + tuple(like.shape))


# --- graph pieces ----------------------------------------------------------------------------------------


def param_like(b: Builder, src: Source) -> fx.Node:
    """A selected parameter's node in the product: parameter-space operands take its dtype and device (not the
    first input's, which may be integer token ids).
    """
    first = src.params[0].name if src.params else None  # the flat layout's first (Note [mixed dtypes])
    node = next((n for n, info in src.param_nodes.items() if info.name == first), next(iter(src.param_nodes), None))
    if node is None:  # no selected parameter is read (the model ignores them): a floating input, else the output
        node = next((x for x in src.inputs if isinstance(x.meta.get("val"), torch.Tensor)
                     and x.meta["val"].is_floating_point()), None)
    if node is None:
        b.copy_all()
        return b.env[src.output]
    return b.copy(node)


def param_seeds(e: Emitter, src: Source, stack: fx.Node) -> dict:
    """Seeds for every get_attr node of a selected parameter from a flat stack ``[S, P]``."""
    seeds, per_param = {}, {}
    for node, info in src.param_nodes.items():
        if info.name not in per_param:
            per_param[info.name] = e(param_slice, stack, info.offset, info.numel, info.shape, param_dtype(src, info))
        seeds[node] = per_param[info.name]
    return seeds


def param_dtype(src: Source, info) -> Optional[torch.dtype]:
    """Where the selected parameters are of several dtypes, ``info``'s: a parameter-space operand, in the first
    parameter's dtype, is sliced into each parameter's (Note [mixed dtypes] in passes/builder.py); else None.
    """
    return info.param.dtype if len({p.param.dtype for p in src.params}) > 1 else None


def param_results(e: Emitter, src: Source, cts: dict, rows: fx.Node, like: fx.Node) -> fx.Node:
    """The flat ``[rows, P]`` stack from the cotangents of the parameters' get_attr nodes."""
    by_name: dict = {}
    for node, ct in cts.items():
        info = src.param_nodes.get(node)
        if info is not None:
            by_name[info.name] = e.add(by_name.get(info.name, ZERO), ct)
    parts = [by_name.get(p.name, ZERO) for p in src.params]
    return e(flat_cat, parts, [p.numel for p in src.params], rows, like)


def param_uses(src: Source) -> dict:
    """How many places read each selected parameter (over all its get_attr nodes), by name."""
    uses: dict = {}
    for node, info in src.param_nodes.items():
        uses[info.name] = uses.get(info.name, 0) + len(node.users)
    return uses


class FlatWriter:
    """Writes the parameters' cotangents into one flat stack ``[rows, P]``, each block once (Note [flat writes]).

    Pass :meth:`sink` and :meth:`reduce` to ``backward_cotangents`` (the stack is allocated before the walk, so
    its node precedes every write), then take :meth:`result`.
    """

    def __init__(self, e: Emitter, src: Source, rows, like: fx.Node):
        self.src = src
        self.stack = e(flat_empty, rows, src.P, like)
        self.last: dict = {}  # parameter name -> the node of the latest write into its block
        self.uses = param_uses(src)

    def sink(self, e: Emitter, rule, site, name: str, ct: fx.Node, node: fx.Node) -> bool:
        """Let the rule write the cotangent of a parameter read at this one place straight into its block."""
        info = self.src.param_nodes.get(node)
        into = getattr(rule, "param_into", None)
        if info is None or into is None or self.uses[info.name] != 1:
            return False
        block = e(flat_block, self.stack, info.offset, info.numel)
        try:
            self.last[info.name] = into(e, site, name, ct, block)
        except Decline:
            e.graph.erase_node(block)
            return False
        return True

    def reduce(self, e: Emitter, node: fx.Node, ct: fx.Node):
        """Copy a parameter's complete cotangent into its block (add it, for a second get_attr of a tied one)."""
        info = self.src.param_nodes.get(node)
        if info is None:
            return ct
        block = e(flat_block, self.stack, info.offset, info.numel)
        self.last[info.name] = e(flat_store, block, ct, self.last.get(info.name))
        return ZERO

    def result(self, e: Emitter) -> fx.Node:
        """The stack, with the blocks of the parameters nothing reached zeroed."""
        for info in self.src.params:
            if info.name not in self.last:
                self.last[info.name] = e(flat_zero, e(flat_block, self.stack, info.offset, info.numel))
        return e(flat_done, self.stack, *(self.last[info.name] for info in self.src.params))


def param_stack(b: Builder, e: Emitter, src: Source, seeds: dict, rows, like: fx.Node, ps: bool) -> fx.Node:
    """The flat ``[rows, P]`` stack of the parameters' cotangents pulled back from ``seeds`` (``ps``: per-sample,
    ``rows = K * B``; else summed over the batch, ``rows = K``), written once (Note [flat writes]).
    """
    w = FlatWriter(e, src, rows, like)
    backward_cotangents(b, seeds, list(src.param_nodes), ps=ps, sinks=w.sink, reduce=w.reduce)
    return w.result(e)


def mixed_dtypes(src: Source) -> bool:
    """Whether the model output, the input ``wrt`` names and the selected parameters are of several floating
    dtypes (Note [mixed dtypes] in passes/builder.py): then a result is cast to the dtype of its space.
    """
    space = [real_dtype(src.inputs[src.wrt_index])] if src.wrt_kind == "input" else [p.param.dtype for p in src.params]
    return len({real_dtype(src.output), *space} - {None}) > 1


def space_like(b: Builder, src: Source) -> fx.Node:
    """The node whose dtype the ``wrt`` space has: the input's, or (parameters) the first parameter's."""
    return b.env[src.inputs[src.wrt_index]] if src.wrt_kind == "input" else param_like(b, src)


def cast_like(t, like):
    """``t`` in ``like``'s dtype (a list: each block; None stays None)."""
    if isinstance(t, (list, tuple)):
        return [cast_like(ti, like) for ti in t]
    return None if t is None else t.to(like.dtype)


def in_dtype(e: Emitter, src: Source, result, like: fx.Node):
    """``result`` in ``like``'s dtype where the model mixes dtypes (:func:`mixed_dtypes`), else as it is."""
    return e(cast_like, result, like) if mixed_dtypes(src) else result


def size(e: Emitter, t: fx.Node, dim: int) -> fx.Node:
    """``t.size(dim)`` as a node."""
    return e.method("size", t, dim)


def numel_per_sample(node: fx.Node) -> int:
    """Per-sample number of elements of a batched value, from its propagated shape."""
    n = 1
    for s in node.meta["val"].shape[1:]:
        n *= s
    return n


__all__ = [
    "FlatWriter", "param_uses", "api_emitter", "checks", "eye_stack", "flat_cat", "input_placeholders", "param_results",
    "param_stack",
    "param_seeds", "param_slice", "size", "stack_to_batch_rows", "stack_to_rows",
    "stack_to_shape", "zeros_stack", "reshape_like_batch", "param_rows", "param_sigma", "numel_per_sample",
    "eye_like",
]

"""Forward propagation of tangents (for jvp, jmp and the forward metric products).

What flows: each primal value ``x`` of shape ``S`` gets a tangent stack ``[K, *S]`` (see Note [stacked columns]
in ``passes/protocol.py``), or ZERO where it does not depend on the seeds. Tangents are emitted right after their
primal, so a tangent dies as soon as its last consumer ran (fx frees values after their last use).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes.builder import Builder, is_structural, leading_batch, new_emitter, structural_index, structure_of
from passes.dag import between
from passes.protocol import ZERO, Decline


def _needs_fallback(b: Builder, node: fx.Node, ps_names) -> bool:
    """Per-sample stacks at a node whose values do not all lead with the batch: only the fallback, which
    slices each value along its own batch axis, handles that (structured rules assume the batch leads).
    """
    return bool(ps_names) and not (leading_batch(node) and all(leading_batch(a) for a in node.all_input_nodes))


def _ps_inputs(b: Builder, node: fx.Node, old_args: dict, ps: bool) -> frozenset:
    """Names of ``node``'s unbatched inputs whose stack is per-sample (Note [per-sample stacks])."""
    if not ps or node not in b.batched:
        return frozenset()
    names = set()
    for k, v in old_args.items():
        nodes = [v] if isinstance(v, fx.Node) else [a for a in v if isinstance(a, fx.Node)] \
            if isinstance(v, (list, tuple)) else []
        if any(a not in b.batched and isinstance(a.meta.get("val"), torch.Tensor) for a in nodes):
            names.add(k)
    return frozenset(names)


def forward_tangents(b: Builder, seeds: dict, ps: bool = False, method: str = "jvp") -> dict:
    """Copy the primal graph into ``b`` and emit the tangent of every node downstream of ``seeds``.

    Args:
        b: the builder; the source graph's placeholders must already be mapped in ``b.env``.
        seeds: old-graph node -> its tangent stack (a new-graph node).
        ps: unbatched values carry per-sample stacks of ``K * B`` columns (Note [per-sample stacks]).
        method: the rule method that pushes a stack: ``"jvp"`` (tangents) or ``"diag_jvp"`` (nnj's diagonal
            forward propagation: ``(A∘A) d`` through each op, diagonals added at fan-in).

    Returns:
        old-graph node -> tangent (a node, a tuple of them for tuple values, or ZERO), for every node reached.
    """
    out_node = b.output_node()
    active = between(b.nx, seeds, [out_node])
    tan = dict(seeds)
    look = lambda a: tan.get(a, ZERO)  # noqa: E731
    for node in b.src.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        b.copy(node)
        if node in tan or node not in active:
            continue
        if is_structural(node):
            src_t = look(node.args[0])
            if src_t is ZERO:
                continue
            if isinstance(src_t, (tuple, list)):
                tan[node] = src_t[structural_index(node)]
            else:
                e = new_emitter(b, node, "tangent", "t_")
                tan[node] = e(operator.getitem, src_t, structural_index(node))
            continue
        if all(look(a) is ZERO for a in node.all_input_nodes):
            continue
        rule = b.rule(node)
        pre = b.site(node, rule)
        old_args = pre.extra["old_args"]
        ps_names = _ps_inputs(b, node, old_args, ps)
        if _needs_fallback(b, node, ps_names) and rule is not b.rules.fallback:
            rule = b.decline(node)
            old_args = b.site(node, rule).extra["old_args"]
            ps_names = _ps_inputs(b, node, old_args, ps)
        if ps_names:
            b.batch_size()
        site = b.site(node, rule, ps_names)
        tangents = {k: structure_of(v, look) for k, v in old_args.items()}
        e = new_emitter(b, node, "tangent", "t_")
        for k in ps_names:
            if tangents[k] is not ZERO:
                tangents[k] = e.method("unflatten", tangents[k], 0, (-1, site.batch))
        try:
            tan[node] = getattr(rule, method)(e, site, tangents)
        except Decline:
            rule = b.decline(node)
            ps_names = _ps_inputs(b, node, b.site(node, rule).extra["old_args"], ps)
            site = b.site(node, rule, ps_names)
            tangents = {k: structure_of(v, look) for k, v in site.extra["old_args"].items()}
            for k in ps_names & set(tangents):
                if tangents[k] is not ZERO:
                    tangents[k] = e.method("unflatten", tangents[k], 0, (-1, site.batch))
            tan[node] = getattr(rule, method)(e, site, tangents)
    return tan

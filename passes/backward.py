"""Backward propagation of cotangents (for vjp, mjp and the backward metric products).

What flows: each primal value ``x`` of shape ``S`` gets a cotangent stack ``[K, *S]`` (Note [stacked columns]);
at fan-out the consumers' contributions are summed when the walk reaches the value. With ``ps=True`` unbatched
values (parameters and what is computed from them alone) receive per-sample stacks of ``K * B`` columns
(Note [per-sample stacks]). The primal graph is copied whole first; the cotangent nodes follow in reverse order.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.fx as fx

from passes.builder import (
    Builder,
    in_dtype_of,
    is_structural,
    new_emitter,
    nodes_in,
    rows_by_sample,
    shares_a_slot,
    structural_index,
)
from passes.dag import differentiable_between
from passes.protocol import ZERO, Decline


def _accumulate(e, parts: list, val):
    """Sum the contributions to one value; a tuple value's parts arrive as ``(index, ct)`` pairs."""
    if isinstance(val, (tuple, list)):
        out = [ZERO] * len(val)
        for part in parts:
            if isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], int):
                i, c = part
                out[i] = e.add(out[i], c)
            else:  # a whole tuple of cotangents
                for i, c in enumerate(part):
                    out[i] = e.add(out[i], c)
        return ZERO if all(c is ZERO for c in out) else tuple(out)
    return e.sum(parts)


def rows_to_samples(ct, factor):
    """Per-row stacks ``[K, B·T, *s]`` summed to per-sample ``[K, B, *s]`` (Note [merged batch] in
    passes/builder.py).
    """
    return rows_by_sample(ct, factor, 1).sum(2)


def _needed(old_args: dict, active: set) -> frozenset:
    """Argument names through which a cotangent must flow (some input node on the active path)."""
    return frozenset(k for k, v in old_args.items() if any(a in active for a in nodes_in(v)))


def backward_cotangents(b: Builder, seeds: dict, wanted, ps: bool = False, method: str = "vjp",
                        sinks: Optional[Callable] = None, reduce: Optional[Callable] = None) -> dict:
    """Emit the cotangents of ``wanted`` nodes given cotangent stacks at ``seeds``.

    Args:
        b: the builder; the primal graph must already be copied into it.
        seeds: old-graph node -> cotangent stack (a new-graph node) at that node.
        wanted: old-graph nodes (placeholders, parameters) whose cotangents are returned.
        ps: per-sample stacks for unbatched values.
        method: the rule method that pulls a stack back: ``"vjp"`` (cotangents) or ``"diag_vjp"`` (nnj's
            diagonal back-propagation: ``(A∘A)ᵀ d`` through each op, diagonals added at fan-out).
        sinks: optional ``sinks(e, rule, site, name, ct, param_node) -> bool``, asked at an op for each wanted
            input that has no other consumer (with ``ps``: at a batched op, for its unbatched inputs, whose stacks
            are per-sample): returning True means the caller consumed the op's output cotangent for that input
            itself (a closed-form reduction such as a parameter diagonal that never forms per-sample cotangents,
            or a cotangent written straight into a result), so no cotangent flows to it.
        reduce: optional ``reduce(e, node, ct) -> value`` applied to a wanted node's cotangent as soon as it is
            complete, so large per-sample stacks die right away (the value is returned instead of ``ct``).

    Returns:
        old-graph node -> cotangent for each wanted node reached (ZERO-free).
    """
    wanted = set(wanted)
    active = {n for n in differentiable_between(b.nx, wanted, seeds) if not n.meta.get("no_grad")}
    pending: dict = {n: [c] for n, c in seeds.items()}
    result = {}
    for node in reversed(list(b.src.graph.nodes)):
        if node not in active or node not in pending:
            continue
        e = new_emitter(b, node, "cotangent", "ct_")
        ct = _accumulate(e, pending.pop(node), node.meta.get("val"))
        if ct is ZERO:
            continue
        if node in wanted:
            result[node] = ct if reduce is None else reduce(e, node, ct)
        if node.op in ("placeholder", "get_attr"):
            continue
        if is_structural(node):
            src = node.args[0]
            if src in active:
                pending.setdefault(src, []).append((structural_index(node), ct))
            continue
        site = b.prepare(node, ps)
        if site.extra["rule"].ignores(_needed(site.extra["old_args"], active)):
            site = b.prepare(node, ps, b.decline(node))
        rule, old_args, ps_names = site.extra["rule"], site.extra["old_args"], site.ps
        site.extra["need"] = _needed(old_args, active)
        sunk = set()
        if sinks is not None and site.extra.get("batch_factor", 1) == 1:  # closed forms see one row per sample
            for name in sorted(ps_names & site.extra["need"] if ps else site.extra["need"]):
                old = old_args[name]
                if isinstance(old, fx.Node) and old in wanted and len(old.users) == 1 and \
                        sinks(e, rule, site, name, ct, old):
                    sunk.add(name)
            site.extra["need"] = site.extra["need"] - sunk
        if method != "vjp" and not rule.combines_slots and shares_a_slot(old_args, site.extra["need"]):
            site = b.prepare(node, ps, b.decline(node))  # to the fallback (Note [one node in two slots])
            rule, old_args, ps_names = site.extra["rule"], site.extra["old_args"], site.ps
            site.extra["need"] = _needed(old_args, active) - sunk
        try:
            in_cts = getattr(rule, method)(e, site, ct)
        except Decline:
            site = b.prepare(node, ps, b.decline(node))
            rule, old_args, ps_names = site.extra["rule"], site.extra["old_args"], site.ps
            site.extra["need"] = _needed(old_args, active) - sunk
            in_cts = getattr(rule, method)(e, site, ct)
        for name, c in in_cts.items():
            if c is ZERO:
                continue
            old = old_args[name]
            if isinstance(old, fx.Node):
                targets, cts = [old], [c]
            elif isinstance(old, (list, tuple)):
                targets, cts = list(old), list(c)
            else:
                continue
            for t, ci in zip(targets, cts):
                if ci is ZERO or not isinstance(t, fx.Node) or t not in active:
                    continue
                if name in ps_names and t not in b.batched:
                    if site.extra.get("batch_factor", 1) != 1 and name not in site.extra.get("rows_summed", ()):
                        ci = e(rows_to_samples, ci, site.extra["batch_factor"])  # Note [merged batch]
                    ci = e.method("flatten", ci, 0, 1)
                pending.setdefault(t, []).append(in_dtype_of(e, ci, t, node))  # Note [mixed dtypes]
    return result

"""Forward propagation of tangents (for jvp, jmp and the forward metric products).

What flows: each primal value ``x`` of shape ``S`` gets a tangent stack ``[K, *S]`` (see Note [stacked columns]
in ``passes/protocol.py``), or ZERO where it does not depend on the seeds. Tangents are emitted right after their
primal, so a tangent dies as soon as its last consumer ran (fx frees values after their last use).
"""

from __future__ import annotations

import operator

import torch.fx as fx

from passes.builder import (
    Builder,
    is_structural,
    new_emitter,
    nodes_in,
    real_dtype,
    shares_a_slot,
    structural_index,
    structure_of,
)
from passes.dag import between, differentiable
from passes.protocol import ZERO, Decline


def samples_to_rows(t, rows, factor):
    """Per-sample stacks ``[K·B, *s]`` as per-row ``[K, B·T, *s]``: T = ``factor`` rows per sample, each sample's
    together, or T = ``-factor`` interleaved (Note [merged batch] in passes/builder.py).
    """
    per_sample = t.unflatten(0, (-1, rows // abs(factor)))
    if factor > 0:
        return per_sample.repeat_interleave(factor, dim=1)
    return per_sample.repeat((1, -factor) + (1,) * (per_sample.dim() - 2))


def _tangents(e, site, look) -> dict:
    """The tangents of ``site``'s arguments, per-sample stacks of unbatched inputs as ``[K, B, *s]``."""
    tangents = {k: structure_of(v, look) for k, v in site.extra["old_args"].items()}

    def per_sample(t, old):
        if isinstance(t, list):  # a list argument (a leaf module's parameters): element by element
            return [per_sample(ti, oi) for ti, oi in zip(t, old)]
        if t is ZERO or old in site.extra["batched_old"]:
            return t
        factor = site.extra.get("batch_factor", 1)
        if factor != 1:  # Note [merged batch]: each sample's tangent repeated to its rows
            return e(samples_to_rows, t, site.batch, factor)
        return e.method("unflatten", t, 0, (-1, site.batch))

    for k in site.ps:
        if tangents.get(k, ZERO) is not ZERO:
            tangents[k] = per_sample(tangents[k], site.extra["old_args"][k])
    return tangents


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
    active = {n for n in between(b.nx, seeds, [out_node]) if not n.meta.get("no_grad")}
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
            if src_t is ZERO or not differentiable(node):  # e.g. the indices of ``topk``: no tangent
                continue
            if isinstance(src_t, (tuple, list)):
                tan[node] = src_t[structural_index(node)]
            else:
                e = new_emitter(b, node, "tangent", "t_")
                tan[node] = e(operator.getitem, src_t, structural_index(node))
            continue
        if all(look(a) is ZERO for a in node.all_input_nodes):
            continue
        e = new_emitter(b, node, "tangent", "t_")
        site = b.prepare(node, ps)
        carried = [k for k, v in site.extra["old_args"].items() if any(look(a) is not ZERO for a in nodes_in(v))]
        if site.extra["rule"].ignores(carried):
            site = b.prepare(node, ps, b.decline(node))
        elif method != "jvp" and not site.extra["rule"].combines_slots and \
                shares_a_slot(site.extra["old_args"], carried):
            site = b.prepare(node, ps, b.decline(node))  # to the fallback (Note [one node in two slots])
        try:
            tan[node] = getattr(site.extra["rule"], method)(e, site, _tangents(e, site, look))
        except Decline:
            site = b.prepare(node, ps, b.decline(node))
            tan[node] = getattr(site.extra["rule"], method)(e, site, _tangents(e, site, look))
        want = real_dtype(node)  # Note [mixed dtypes]
        if want is not None and isinstance(tan[node], fx.Node) and \
                any(real_dtype(a) not in (None, want) for a in node.all_input_nodes if look(a) is not ZERO):
            tan[node] = e.method("to", tan[node], want)
    return tan

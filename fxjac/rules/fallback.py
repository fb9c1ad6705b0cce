"""The autograd fallback: exact derivatives of any op without a structured rule, node-local, via torch.func.

The op is called on the differentiable inputs as a small function ``g``. Tangents: ``torch.func.jvp`` with the
K columns batched by ``vmap``; where forward mode has no formula (fused kernels) the linear map is obtained from
reverse mode (the vjp of the vjp). Cotangents: ``torch.func.vjp``, K columns batched by ``vmap``. Per-sample
stacks (Note [per-sample stacks]) add a ``vmap`` over the batch; where vmap has no batching rule (RNNs) a loop over
the batch is the one Python loop fxjac allows, and the fallback warning names it.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from passes.protocol import ZERO, Rule, module_call

_SLOT = "__fxjac_slot_{}__"
_NO_FORWARD_AD: set = set()
_NO_VMAP: set = set()


def _fill(template, primals):
    """Put the differentiable values back into their slots of the call's argument structure."""

    def fill(v):
        if isinstance(v, str) and v.startswith("__fxjac_slot_") and v.endswith("__"):
            return primals[int(v[len("__fxjac_slot_"):-2])]
        return v

    return tree_map(fill, template)


def _call(fn, args, kwargs):
    if isinstance(fn, str):
        return getattr(args[0], fn)(*args[1:], **kwargs)
    return fn(*args, **kwargs)


def _op(fn, args, kwargs):
    def g(*primals):
        a, k = _fill((args, kwargs), primals)
        return _call(fn, a, k)

    return g


def _key(fn):
    return fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))


def _jvp_columns(g, primals, tangents, fn):
    """``J t`` for a stack of tangent columns (dimension 0 of every tangent)."""
    key = _key(fn)
    if key not in _NO_FORWARD_AD:
        try:
            return torch.vmap(lambda *ts: torch.func.jvp(g, primals, ts)[1])(*tangents)
        except (RuntimeError, NotImplementedError) as err:
            if "forward" not in str(err).lower() and "jvp" not in str(err).lower():
                raise
            _NO_FORWARD_AD.add(key)
    # Reverse mode only: the vjp is linear in the cotangent, so its own vjp is the jvp.
    out, vjp_fn = torch.func.vjp(g, *primals)
    zeros = tree_map(torch.zeros_like, out)
    _, vjp2 = torch.func.vjp(lambda u: vjp_fn(u), zeros)
    return torch.vmap(lambda *ts: vjp2(ts)[0])(*tangents)


def _fill_zero_cts(ct, out):
    """A tuple cotangent with holes (ZERO) gets zero stacks shaped like the primal outputs."""
    leaves, spec = tree_flatten(ct)
    k = next(c.shape[0] for c in leaves if isinstance(c, torch.Tensor))
    outs = tree_flatten(out)[0]
    filled = [c if isinstance(c, torch.Tensor) else o.new_zeros((k,) + tuple(o.shape))
              for c, o in zip(leaves, outs)]
    return tree_unflatten(filled, spec)


def fallback_jvp(fn, args, kwargs, primals, tangents, batched, batch=None):
    """Tangent stack of ``fn(*args, **kwargs)`` for the given tangent stacks of ``primals``.

    ``batched[i]`` says whether primal i carries the batch; with ``batch`` given, the tangents of unbatched
    primals are per-sample stacks ``[K, B, *s]`` and the op is differentiated sample by sample.
    """
    g = _op(fn, args, kwargs)
    if batch is None or all(batched):
        return _jvp_columns(g, tuple(primals), tuple(tangents), fn)

    def one_sample(*xs_ts):
        n = len(primals)
        xs, ts = xs_ts[:n], xs_ts[n:]
        xs = tuple(x.unsqueeze(0) if b else x for x, b in zip(xs, batched))
        ts = tuple(t.unsqueeze(1) if b else t for t, b in zip(ts, batched))
        out = _jvp_columns(g, xs, ts, fn)
        return tree_map(lambda o: o.squeeze(1), out)

    in_dims = tuple(0 if b else None for b in batched) + tuple(1 for _ in batched)
    out = torch.vmap(one_sample, in_dims=in_dims, out_dims=1)(*primals, *tangents)
    return out


def fallback_vjp(fn, args, kwargs, primals, ct, batched, ps=None):
    """Cotangent stacks of ``primals`` (a tuple) given the output cotangent stack ``ct``.

    With ``ps`` (a tuple of flags), the cotangents of unbatched primals flagged there are per-sample stacks
    ``[K, B, *s]``.
    """
    g = _op(fn, args, kwargs)
    if ps is None or not any(ps):
        out, vjp_fn = torch.func.vjp(g, *primals)
        if isinstance(ct, (tuple, list)):
            ct = _fill_zero_cts(ct, out)
        return torch.vmap(vjp_fn)(ct)

    def one_sample(*xs_c):
        xs, c = xs_c[:-1], xs_c[-1]
        xs = tuple(x.unsqueeze(0) if b else x for x, b in zip(xs, batched))
        out, vjp_fn = torch.func.vjp(g, *xs)
        c = tree_map(lambda t: t.unsqueeze(1), c)
        if isinstance(c, (tuple, list)):
            c = _fill_zero_cts(c, out)
        res = torch.vmap(vjp_fn)(c)
        return tuple(r.squeeze(1) if b else r for r, b in zip(res, batched))

    if isinstance(ct, (tuple, list)):
        raise NotImplementedError("per-sample cotangents through a tuple-valued op without a rule")
    in_dims = tuple(0 if b else None for b in batched) + (1,)
    key = _key(fn)
    if key not in _NO_VMAP:
        try:
            return torch.vmap(one_sample, in_dims=in_dims, out_dims=1)(*primals, ct)
        except (RuntimeError, NotImplementedError):
            _NO_VMAP.add(key)
    # No batching rule for this op (RNN kernels): the allowed loop over the batch.
    cols = []
    for i in range(ct.shape[1]):
        xs = tuple(x[i] if b else x for x, b in zip(primals, batched))
        cols.append(one_sample(*xs, ct[:, i]))
    return tuple(torch.stack([c[j] for c in cols], dim=1) for j in range(len(primals)))


def fallback_diag_vjp(fn, args, kwargs, primals, d, batched, ps=None):
    """``(A∘A)ᵀ d`` for each primal from the op's dense per-sample local Jacobian (exact, costly).

    Samples are independent, so the op is differentiated on one sample at a time (``vmap`` over the batch).
    """
    g = _op(fn, args, kwargs)
    n = len(primals)

    def one_sample(*xs_d):
        xs, dd = xs_d[:n], xs_d[n]
        xs = tuple(x.unsqueeze(0) if b else x for x, b in zip(xs, batched))
        jacs = torch.func.jacrev(g, argnums=tuple(range(n)))(*xs)
        n_out = math.prod(dd.shape[1:])  # dd: [K, *out_sample]
        res = []
        for j, x, b in zip(jacs, xs, batched):
            j = j.reshape(dd.shape[1:] + x.shape)  # [*out_sample(with unit batch), *x]
            flat = (j * j).reshape(n_out, -1)
            r = dd.reshape(dd.shape[0], -1) @ flat
            r = r.reshape((dd.shape[0],) + tuple(x.shape))
            res.append(r.squeeze(1) if b else r)
        return tuple(res)

    in_dims = tuple(0 if b else None for b in batched) + (1,)
    res = torch.vmap(one_sample, in_dims=in_dims, out_dims=1)(*primals, d.unsqueeze(2))
    out = []
    for r, b, i in zip(res, batched, range(n)):
        if b or (ps is not None and ps[i]):
            out.append(r)  # [K, B, ...]
        else:
            out.append(r.sum(1))
    return tuple(out)


class Fallback(Rule):
    """Any op: node-local torch.func derivatives (exact; slower than a structured rule)."""

    signature = None
    kind = "fallback"

    @staticmethod
    def _template(site, pick):
        """The call's (fn, args, kwargs) with the chosen input nodes replaced by slots, and those nodes."""
        node = site.node
        n_pos = sum(1 for k in site.args if k.isdigit())
        args = [site.args[str(i)] for i in range(n_pos)]
        kwargs = {k: v for k, v in site.args.items() if not k.isdigit()}
        old = site.extra["old_args"]
        old_args = [old[str(i)] for i in range(n_pos)]
        old_kwargs = {k: v for k, v in old.items() if not k.isdigit()}
        chosen = []

        def mark(new, old_v):
            if isinstance(new, fx.Node):
                for i, (o, _) in enumerate(chosen):
                    if o is old_v:  # the same value at two places: one slot, so contributions add
                        return _SLOT.format(i)
                if pick(old_v, new):
                    chosen.append((old_v, new))
                    return _SLOT.format(len(chosen) - 1)
                return new
            if isinstance(new, (list, tuple)):
                return type(new)(mark(a, b) for a, b in zip(new, old_v))
            if isinstance(new, dict):
                return {k: mark(new[k], old_v[k]) for k in new}
            return new

        t_args = tuple(mark(a, b) for a, b in zip(args, old_args))
        t_kwargs = {k: mark(v, old_kwargs[k]) for k, v in kwargs.items()}
        return node.target, t_args, t_kwargs, chosen

    def jvp(self, e, site, tangents):  # noqa: D102
        tan_of = {}

        def collect(t, old_v):
            if isinstance(old_v, fx.Node):
                if t is not ZERO:
                    tan_of[old_v] = t
            elif isinstance(old_v, (list, tuple)) and t is not ZERO:
                for ti, oi in zip(t, old_v):
                    collect(ti, oi)

        for k, t in tangents.items():
            collect(t, site.extra["old_args"][k])
        fn, t_args, t_kwargs, chosen = self._template(site, lambda old_v, new: old_v in tan_of)
        primals = tuple(new for _, new in chosen)
        tans = tuple(tan_of[old_v] for old_v, _ in chosen)
        batched = tuple(new in site.extra["batched"] for new in primals)
        batch = site.batch if site.ps else None
        return e.with_role("tangent", "t_")(fallback_jvp, fn, t_args, t_kwargs, primals, tans, batched, batch)

    def vjp(self, e, site, ct):  # noqa: D102
        return self._pull(e, site, ct, fallback_vjp)

    def diag_vjp(self, e, site, d):  # noqa: D102
        if isinstance(d, (tuple, list)):
            raise NotImplementedError("diagonal back-propagation through a tuple-valued op without a rule")
        return self._pull(e, site, d, fallback_diag_vjp)

    def _pull(self, e, site, ct, kernel):
        need = site.extra.get("need")

        def pick(old_v, new):
            val = old_v.meta.get("val")
            if not (isinstance(val, torch.Tensor) and val.is_floating_point()):
                return False
            return need is None or any(old_v is a or (isinstance(a, (list, tuple)) and old_v in a)
                                       for k, a in site.extra["old_args"].items() if k in need)

        fn, t_args, t_kwargs, chosen = self._template(site, pick)
        if not chosen:
            return {}
        primals = tuple(new for _, new in chosen)
        batched = tuple(new in site.extra["batched"] for new in primals)
        ps = None
        if site.ps:
            ps = tuple(not b for b in batched)
        res = e(kernel, fn, t_args, t_kwargs, primals, ct, batched, ps)
        # Hand each chosen input its cotangent, in the argument structure the pass expects.
        per_node = {}
        for i, (old_v, _) in enumerate(chosen):
            per_node[old_v] = e(_getitem, res, i)
        out = {}
        for k, old_v in site.extra["old_args"].items():
            if isinstance(old_v, fx.Node) and old_v in per_node:
                out[k] = per_node[old_v]
            elif isinstance(old_v, (list, tuple)) and any(isinstance(a, fx.Node) and a in per_node for a in old_v):
                out[k] = [per_node.get(a, ZERO) if isinstance(a, fx.Node) else ZERO for a in old_v]
        return out


def _getitem(seq, i):
    """``seq[i]`` (a named function so generated code reads clearly)."""
    return seq[i]


__all__ = ["Fallback", "fallback_diag_vjp", "fallback_jvp", "fallback_vjp", "module_call"]

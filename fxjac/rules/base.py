"""Rule families: the helpers that turn a little op-specific math into every product.

- :class:`Elementwise`: a unary element-wise op gives ``f'(x)``.
- :class:`Broadcasting`: a binary (or n-ary) element-wise op gives one partial per input.
- :class:`LinearOp`: an op linear in its tensor input gives its application to a stack and its transpose.
- :class:`NonDifferentiable`: shape queries, comparisons, argmax…: zero derivative, nothing emitted.
"""

from __future__ import annotations

import operator

import torch

from passes.builder import BatchLayoutError
from passes.protocol import ZERO, Decline, Emitter, Rule, Site

from . import _rt

PARTS = ("input", "weight", "bias")
"""The arguments of a layer whose fused ATen backward returns one result for each (convolution, norms)."""


def parts_of(e: Emitter, parts, mask) -> dict:
    """The results of such a fused kernel's node ``parts`` that ``mask`` asked for, by argument name."""
    return {k: e(operator.getitem, parts, i) for i, k in enumerate(PARTS) if mask[i]}


def batch_first(e: Emitter, site, t, stacked: int = 1):
    """A per-sample operand with the site's batch axis (``site.extra["ps_batch_dim"]``: a sequence-first
    ``[T, B, d]`` has 1) moved first, after the column axis where ``t`` is a stack (``stacked=1``); ``t`` itself
    where the batch leads.
    """
    bd = site.extra.get("ps_batch_dim", 0)
    return t if bd == 0 else e.method("movedim", t, bd + stacked, stacked)


def batch_back(e: Emitter, site, t):
    """A stack ``[K, B, ...]`` with its batch axis moved back to the site's (the inverse of :func:`batch_first`)."""
    bd = site.extra.get("ps_batch_dim", 0)
    return t if bd == 0 else e.method("movedim", t, 1, bd + 1)


class NonDifferentiable(Rule):
    """An op whose output is constant for differentiation (integer, boolean or shape-valued)."""

    signature = None
    kind = "constant"

    def jvp(self, e, site, tangents):
        """No tangent flows out."""
        return ZERO

    def vjp(self, e, site, ct):
        """No cotangent flows back."""
        return {}

    def diag_vjp(self, e, site, d):
        """No diagonal flows back."""
        return {}

    def diag_jvp(self, e, site, tangents):
        """No diagonal flows out (the subclass's ``jvp``: its checks, and a cast's floating stack)."""
        return self.jvp(e, site, tangents)


class SquaredPush(Rule):
    """A rule whose tangent and forward diagonal are one computation, ``_push(e, site, tangents, square)``: the
    diagonal ``(A∘A) d`` is the jvp with the Jacobian's entries squared (weights, scales, the other operand).
    Per-sample diagonals are not propagated forward.
    """

    def _push(self, e: Emitter, site: Site, tangents: dict, square: bool):
        raise NotImplementedError

    def jvp(self, e, site, tangents):  # noqa: D102
        return self._push(e, site, tangents, square=False)

    def diag_jvp(self, e, site, tangents):  # noqa: D102
        if site.ps:
            raise Decline
        return self._push(e, site, tangents, square=True)


class Elementwise(Rule):
    """``y = f(x)`` applied element by element; subclasses give ``f'(x)`` (broadcastable to ``x``)."""

    diff = ("input",)

    def signature(input):  # noqa: D103, N805
        ...

    def derivative(self, e: Emitter, site: Site):
        """``f'(x)``, as a node or a Python number."""
        raise NotImplementedError

    def fused(self, e: Emitter, site: Site, t):
        """``f'(x) * t`` as ONE kernel (the op's own ATen backward, which broadcasts a stack against the primal), or
        ``None`` (the default) to multiply by :meth:`derivative`.
        """
        return None

    def _times_derivative(self, e, site, t):
        out = self.fused(e, site, t)
        return e(operator.mul, t, self.derivative(e, site)) if out is None else out

    def jvp(self, e, site, tangents):
        """``f'(x) * t``."""
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        return self._times_derivative(e, site, t)

    def vjp(self, e, site, ct):
        """``f'(x) * ct``, written into ``ct`` where that is memory no one else reads (Note [reused cotangents]
        in fxjac/rules/_rt.py).
        """
        out = self._times_derivative(e, site, ct)
        _rt.reuse_cotangent(out, ct)
        return {"input": out}

    def diag_vjp(self, e, site, d):
        """``f'(x)² * d``."""
        g = self.derivative(e, site)
        return {"input": e(operator.mul, d, e(operator.mul, g, g))}

    def diag_jvp(self, e, site, tangents):
        """``f'(x)² * d`` (an element-wise Jacobian is diagonal: forward and backward agree)."""
        d = tangents["input"]
        return ZERO if d is ZERO else self.diag_vjp(e, site, d)["input"]


class Broadcasting(Rule):
    """An element-wise op of several broadcast inputs; subclasses give ``∂y/∂input`` for each input name.

    A partial may be a node, a Python number, or ZERO. Lower-rank inputs are aligned with the output and
    cotangents are summed back to each input's shape; per-sample stacks of unbatched inputs are handled here.
    """

    inputs: tuple = ("input", "other")
    # Partials that are 0/1 masks select the (co)tangent, as autograd's ``where`` does: a NaN or inf where the mask
    # is 0 stays out (a product with the mask would give NaN there).
    selects = False

    def partial(self, e: Emitter, site: Site, name: str):
        """``∂y/∂name``, broadcastable to the output."""
        raise NotImplementedError

    def scale(self, e: Emitter, site: Site, name: str, t, p, square: bool = False):
        """``t · ∂y/∂name`` (``(∂y/∂name)²`` with ``square``) for the partial ``p``; a subclass may compute it
        otherwise, as autograd does (a division instead of a product with a reciprocal).
        """
        if square and p is not ZERO:
            p = e(operator.mul, p, p) if isinstance(p, torch.fx.Node) else p * p
        return self._times(e, t, p)

    def tangent(self, e: Emitter, site: Site, name: str, t, p):
        """The tangent ``t · ∂y/∂name`` (:meth:`scale`; a subclass may order it as torch's forward mode does)."""
        return self.scale(e, site, name, t, p)

    def _times(self, e, t, p):
        if p is ZERO:
            return ZERO
        if isinstance(p, (int, float)):
            if p == 1:
                return t
            if p == -1:
                return e(operator.neg, t)
        if self.selects and isinstance(p, torch.fx.Node):
            return e(_rt.select, p, t)
        return e(operator.mul, t, p)

    def jvp(self, e, site, tangents):
        """``Σ_i ∂y/∂x_i · t_i`` with each tangent aligned to the output's rank."""
        out_ndim = site.ndim()
        out_shape = tuple(site.out_val.shape)
        terms, full = [], False
        for name in self.inputs:
            t = tangents.get(name, ZERO)
            if t is ZERO:
                continue
            if not isinstance(site.val(name), torch.Tensor):  # a number computed in the graph: a constant
                continue
            p = self.partial(e, site, name)
            if p is ZERO:
                continue
            if name in site.ps:
                _check_rows(site, name)
                t = e(_rt.align_ps, t, out_ndim)
            elif site.val(name).dim() < out_ndim:
                t = e(_rt.align, t, out_ndim)
            full = full or tuple(site.val(name).shape) == out_shape and name not in site.ps
            if isinstance(p, torch.fx.Node) and isinstance(p.meta.get("val"), torch.Tensor):
                full = full or tuple(p.meta["val"].shape) == out_shape
            terms.append(self.tangent(e, site, name, t, p))
        out = e.sum(terms)
        if out is not ZERO and not full:  # only broadcast inputs moved: give the tangent the output's shape
            out = e(_rt.expand_like, out, site.out)
        return out

    combines_slots = True  # the partials of the slots that read one node are added first (:meth:`_squared`)

    def diag_jvp(self, e, site, tangents):
        """``Σ_i (∂y/∂x_i)² d_i`` with each diagonal aligned to the output's rank."""
        out_ndim = site.ndim()
        terms = []
        for names in self._by_node(site, self.inputs):
            d = tangents.get(names[0], ZERO)
            if d is ZERO or names[0] in site.ps:
                if d is not ZERO:
                    raise Decline
                continue
            if site.val(names[0]).dim() < out_ndim:
                d = e(_rt.align, d, out_ndim)
            terms.append(self._squared(e, site, names, d))
        out = e.sum(terms)
        return ZERO if out is ZERO else e(_rt.expand_like, out, site.out)

    @staticmethod
    def _by_node(site, names) -> list:
        """``names`` grouped by the node they read (one group per slot, but for ``x * x``)."""
        groups: dict = {}
        for name in names:
            old = site.extra["old_args"].get(name)
            groups.setdefault(old if isinstance(old, torch.fx.Node) else name, []).append(name)
        return list(groups.values())

    def _squared(self, e, site, names, t):
        """``t · (∂y/∂x)²`` for the node ``x`` in slots ``names``: its partial is the sum of theirs (Note [one
        node in two slots] in passes/protocol.py).
        """
        if len(names) == 1:
            return self.scale(e, site, names[0], t, self.partial(e, site, names[0]), square=True)
        p = ZERO
        for name in names:
            q = self.partial(e, site, name)
            if q is ZERO:
                continue
            if p is ZERO:
                p = q
            elif isinstance(p, (int, float)) and isinstance(q, (int, float)):
                p = p + q
            else:
                p = e(operator.add, p, q)
        if p is ZERO or (isinstance(p, (int, float)) and p == 0):
            return ZERO
        return e(operator.mul, t, e(operator.mul, p, p) if isinstance(p, torch.fx.Node) else p * p)

    def vjp(self, e, site, ct):
        """``sum_to(ct · ∂y/∂x_i, shape of x_i)`` for each input."""
        return self._pull(e, site, ct, square=False)

    def diag_vjp(self, e, site, d):
        """``sum_to(d · (∂y/∂x_i)², shape of x_i)``."""
        return self._pull(e, site, d, square=True)

    def _pull(self, e, site, ct, square):
        out = {}
        needed = [name for name in self.inputs if isinstance(site.args.get(name), torch.fx.Node) and
                  site.needs(name) and isinstance(site.val(name), torch.Tensor)]  # (not a size computed in the graph)
        for names in self._by_node(site, needed) if square else [[name] for name in needed]:
            name, x = names[0], site.args[names[0]]
            if square:
                c = self._squared(e, site, names, ct)
            else:
                p = self.partial(e, site, name)
                c = ZERO if p is ZERO else self.scale(e, site, name, ct, p)
            if c is ZERO:
                continue
            if name in site.ps:
                _check_rows(site, name)
                c = e(_rt.sum_to_ps, c, x)
            elif tuple(site.val(name).shape) != tuple(site.out_val.shape) or _meets_batch(site, x):
                c = e(_rt.sum_to, c, x)
            out[name] = c
        return out


def _check_rows(site, name) -> None:
    """An unbatched operand with a per-sample (co)tangent must broadcast over the samples (size 1 or no axis at the
    batch's): one with a row per sample (a ``[B, ...]`` buffer read through a Linear: a decoder's fixed memory) is
    read row by row, which a stack that every sample reads whole cannot express.

    Raises:
        BatchLayoutError: naming the value and the way out (pass it as an input).
    """
    v, out, bd = site.val(name), site.out_val, site.node.meta.get("batch_dim", 0)  # unmeasured: the leading axis
    if not (isinstance(v, torch.Tensor) and isinstance(out, torch.Tensor) and isinstance(bd, int)):
        return
    if out.shape[bd] > 1 and v.dim() == out.dim() and v.shape[bd] == out.shape[bd]:
        a = site.extra["old_args"][name]
        raise BatchLayoutError(
            site.node, f"{getattr(a, 'name', name)} (shape {list(v.shape)}) is not computed from the model's inputs "
            f"but meets the batch element-wise with one row per sample (axis {bd}, size {out.shape[bd]}): fxjac "
            "treats it as one value that every sample reads whole, and cannot split it into samples. Pass it to the "
            "model as an input (forward(x, c)) to have it split, or give it a size-1 batch axis if every sample "
            "shares it")


def _meets_batch(site, x) -> bool:
    """Whether an unbatched ``x`` broadcasts against a batched output (a ``[1, T, d]`` position embedding: built
    at batch 1 its shape is the output's, but at any other batch its cotangent sums over the samples).
    """
    batched = site.extra.get("batched")
    return batched is not None and x not in batched and site.extra.get("out_batch_dim") is not None


def _own_batch(site: Site) -> None:
    """Declines where the input is unbatched and the output batched: the op made the batch axis itself
    (``p.repeat_interleave(x.shape[0], 0)``), so the input's per-sample stacks (Note [per-sample stacks]) would
    meet ``apply`` and ``transpose``, which take one stack for the whole batch. The fallback differentiates it per
    sample; ``expand`` and ``repeat`` have rules of their own for it.
    """
    if site.ps:
        raise Decline


class LinearOp(Rule):
    """An op that is linear in its one tensor input ``input`` (views, reductions, pooling, interpolation…).

    Subclasses give ``apply(e, site, t)``: the op on a stack ``[K, *in]`` -> ``[K, *out]``, and
    ``transpose(e, site, ct)``: its adjoint ``[K, *out]`` -> ``[K, *in]``. The diagonal rules square the op's
    entries, which for a 0/1 or permutation op (most views) is the op itself; an average, whose row holds one value
    ``w``, gives it (:meth:`row_value`): ``(A∘A) d = w A d``, ``(A∘A)ᵀ d = Aᵀ (w d)``; others override both.
    """

    diff = ("input",)

    square_is_self = True

    def row_value(self, e: Emitter, site: Site):
        """The one value of the nonzero entries of each row of A (a node or number broadcasting against the
        output, such as an average's ``1/count``), or None (the default) where they differ. Only asked where
        ``square_is_self`` is false.
        """
        return None

    def diag_jvp(self, e, site, tangents):
        """``(A∘A) d``; ``A d`` where A holds only zeros and ones, ``w A d`` where each row holds one value ``w``."""
        if self.square_is_self:
            return self.jvp(e, site, tangents)
        w = self.row_value(e, site)
        if w is None:
            raise Decline
        _own_batch(site)
        t = tangents["input"]
        return ZERO if t is ZERO else e(operator.mul, self.apply(e, site, t), w)

    def apply(self, e: Emitter, site: Site, t):
        """The op applied to a stack."""
        raise NotImplementedError

    def transpose(self, e: Emitter, site: Site, ct):
        """The adjoint of the op applied to a stack."""
        raise NotImplementedError

    def jvp(self, e, site, tangents):
        """The op itself on the tangent stack."""
        t = tangents["input"]
        _own_batch(site)
        return ZERO if t is ZERO else self.apply(e, site, t)

    def vjp(self, e, site, ct):
        """The op's adjoint on the cotangent stack."""
        _own_batch(site)
        return {"input": self.transpose(e, site, ct)}

    def diag_vjp(self, e, site, d):
        """``(A∘A)ᵀ d``; ``Aᵀ d`` where A holds only zeros and ones, ``Aᵀ (w d)`` where each row holds one ``w``."""
        _own_batch(site)
        if self.square_is_self:
            return {"input": self.transpose(e, site, d)}
        w = self.row_value(e, site)
        if w is None:
            raise Decline  # no closed form: the fallback forms the exact squared local Jacobian
        return {"input": self.transpose(e, site, e(operator.mul, d, w))}

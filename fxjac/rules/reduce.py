"""Reductions: sum, mean, prod, amax/amin, max/min with a dim, logsumexp, var/std, vector norms, cumsum, cumprod;
the decompositions of cdist, cosine_similarity and pairwise_distance into norms.

At ties ``amax``/``amin`` (and ``max``/``min`` without a dim) split the derivative evenly among the maxima,
while ``max(x, dim)`` sends it to the index it returns, as autograd does.
"""

from __future__ import annotations

import math

import torch

from passes.protocol import ZERO, Decline, Rule

from ..tracing import decomposes, emit_op
from .base import LinearOp, NonDifferentiable
from .registry import register
from .shape import stack_sum, unreduce

# --- kernels ---------------------------------------------------------------------------------------------


def _dims(dim, ndim):
    if dim is None or dim == () or dim == []:
        return tuple(range(ndim))
    return tuple(d % ndim for d in ([dim] if isinstance(dim, int) else dim))


def mean_scale(like, dim):
    """1 / (number of elements averaged)."""
    n = 1
    for d in _dims(dim, like.dim()):
        n *= like.shape[d]
    return 1.0 / n


def tie_weights(x, y, dim, keepdim, nan_ties=False):
    """Even split among the extrema: ``[x == y] / count`` with ``y`` the reduction's result; with ``nan_ties``, a
    NaN result's derivative goes to the NaN entries (autograd's reverse mode of the full ``max``/``min``:
    evenly_distribute_backward; its forward mode and ``amax`` give NaN).
    """
    dims = _dims(dim, x.dim())
    yk = y
    if not keepdim:
        for d in sorted(dims):
            yk = yk.unsqueeze(d)
    mask = (x == yk) | (x.isnan() & yk.isnan()) if nan_ties else x == yk
    mask = mask.to(x.dtype)
    return mask / mask.sum(dims, keepdim=True)


def weighted_reduce(t, w, dim, keepdim):
    """``Σ_dim w · t`` on a stack."""
    return stack_sum(t * w, None if dim is None else _dims(dim, w.dim()), keepdim)


def index_weights(x, idx, dim, keepdim):
    """One-hot weights at the returned index of ``max(x, dim)``."""
    d = dim % x.dim()
    if not keepdim:
        idx = idx.unsqueeze(d)
    return torch.zeros_like(x).scatter_(d, idx, 1.0)


def logsumexp_weights(x, y, dim, keepdim):
    """Softmax weights ``exp(x - y)`` of ``logsumexp``."""
    dims = _dims(dim, x.dim())
    if not keepdim:
        for d in sorted(dims):
            y = y.unsqueeze(d)
    return torch.exp(x - y)


def prod_weights(x, dim):
    """∂(Π x)/∂x_i = Π_{j≠i} x_j over ``dim`` (None: all axes), the products before and after i: exact where x
    holds zeros (no division), as autograd.
    """
    if dim is None:
        return prod_weights(x.reshape(-1), 0).reshape(x.shape)
    d, n = dim % x.dim(), x.shape[dim]
    one = torch.ones_like(x.narrow(d, 0, 1))
    before = torch.cat([one, x.narrow(d, 0, n - 1)], d).cumprod(d)
    after = torch.cat([x.narrow(d, 1, n - 1), one], d).flip(d).cumprod(d).flip(d)
    return before * after


def norm_weights(x, y, p, dim, keepdim):
    """∂‖x‖_p/∂x over ``dim`` (None: all axes), ``y`` the norm, as autograd's ``norm_backward``: sgn(x) for p = 1;
    x / y for p = 2; for p = ±∞, sgn(x) split evenly among the entries with |x| = y (ties); sgn(x) |x|^(p-1) / y^(p-1)
    otherwise (for p < 1, 0 where x = 0); 0 for p = 0. At a zero vector (y = 0) the subgradient is 0, as autograd's
    (its mask where y = 0, or sgn(0) = 0).
    """
    if p == 0:
        return torch.zeros_like(x)
    if p == 1:
        return x.sgn()
    dims = _dims(dim, x.dim())
    if not keepdim:
        for d in sorted(dims):
            y = y.unsqueeze(d)
    if math.isinf(p):
        mask = (x.abs() == y) | x.isnan()
        return x.sgn() * mask / mask.sum(dims, keepdim=True)
    if p == 2:
        return (x / y).masked_fill(y == 0, 0)
    if p < 1:
        return x.sgn() * x.abs().pow(p - 1).masked_fill(x == 0, 0) * y.pow(1 - p)
    scaled = x.sgn() * x.abs().pow(p - 1) if p < 2 else x * x.abs().pow(p - 2)
    return (scaled / y.pow(p - 1)).masked_fill(y == 0, 0)


def _cumprod_zeros(x, d):
    """``(live, first, past)`` of ``cumprod`` along axis ``d``: ``live`` marks the entries before their line's
    first zero, ``first`` that zero, and ``past`` (from it on, else 0) the cumulative product with that one zero
    replaced by 1: ``Π_{j≤i, j≠z} x_j = ∂y_i/∂x_z`` for ``i ≥ z``, without a division.
    """
    zero = x == 0
    seen = zero.cumsum(d)
    live, first = seen == 0, zero & (seen == 1)
    past = torch.where(first, torch.ones_like(x), x).cumprod(d)
    return live, first, past.masked_fill(live, 0)


def cumprod_tangent(t, x, y, dim):
    """Tangent of ``y = cumprod(x, dim)``: ``dy_i = y_i Σ_{k≤i} t_k / x_k`` before the line's first zero ``z``;
    from it on only ``x_z`` counts, ``dy_i = (Π_{j≤i, j≠z} x_j) t_z`` (exact at zeros, as autograd).
    """
    d = dim % x.dim() - x.dim()
    live, first, past = _cumprod_zeros(x, d)
    ones = torch.ones_like(x)
    before = y * (t / torch.where(live, x, ones)).cumsum(d)
    return torch.where(live, before, past * (t * first).sum(d, keepdim=True))


def cumprod_ct(ct, x, y, dim, square=False):
    """Cotangent of ``cumprod``: ``Σ_{k≤i<z} c_i y_i / x_k`` before the first zero ``z``, ``Σ_{i≥z} c_i ∂y_i/∂x_z``
    at it, 0 past it (every derivative there holds ``x_z = 0``); with ``square``, ``(A∘A)ᵀ c``: each entry of
    the Jacobian squared, ``y_i² / x_k²`` and ``(∂y_i/∂x_z)²``.
    """
    d = dim % x.dim() - x.dim()
    live, first, past = _cumprod_zeros(x, d)
    xs = torch.where(live, x, torch.ones_like(x))
    y = y.masked_fill(~live, 0)
    if square:
        y, xs, past = y * y, xs * xs, past * past
    before = (ct * y).flip(d).cumsum(d).flip(d) / xs
    return torch.where(live, before, first * (ct * past).sum(d, keepdim=True))


def var_slope(x, dims, correction, power=1):
    """``(2 (x - mean) / (n - correction))^power``: the entries of var's Jacobian row (``power=2``: squared)."""
    n = 1
    for d in dims:
        n *= x.shape[d]
    xc = x - x.mean(dims, keepdim=True)
    dof = n - correction  # no degrees of freedom left: var is inf or NaN, and autograd's slope inf (not an error)
    return (xc * (2.0 / dof if dof > 0 else math.inf)) ** power


def var_tangent(t, x, dim, correction, keepdim, power=1):
    """Tangent of ``var``: ``2 Σ (x - mean) t / (n - correction)`` (``power=2``: the squared Jacobian's)."""
    dims = _dims(dim, x.dim())
    return stack_sum(t * var_slope(x, dims, correction, power), dims, keepdim)


def var_ct(ct, x, dim, correction, keepdim, power=1):
    """Cotangent of ``var`` (``power=2``: the squared Jacobian's)."""
    dims = _dims(dim, x.dim())
    return unreduce(ct, x, dims, keepdim) * var_slope(x, dims, correction, power)


def _correction(site):
    if site.args.get("correction") is not None:
        return site.args["correction"]
    unbiased = site.args.get("unbiased")
    return 0 if unbiased is False else 1


# --- rules -----------------------------------------------------------------------------------------------


@register(torch.sum, "sum")
class Sum(LinearOp):
    """y = Σ_dim x; the adjoint broadcasts the cotangent back."""

    def signature(input, dim=None, keepdim=False, *, dtype=None):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(stack_sum, t, site.args["dim"], site.args["keepdim"])

    def transpose(self, e, site, ct):  # noqa: D102
        return e(unreduce, ct, site.args["input"], site.args["dim"], site.args["keepdim"])


@register(torch.mean, "mean")
class Mean(LinearOp):
    """y = mean_dim x; the adjoint broadcasts the cotangent back, divided by the count."""

    square_is_self = False

    def signature(input, dim=None, keepdim=False, *, dtype=None):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        s = e(stack_sum, t, site.args["dim"], site.args["keepdim"])
        return e(torch.mul, s, e(mean_scale, site.args["input"], site.args["dim"]))

    def transpose(self, e, site, ct):  # noqa: D102
        u = e(unreduce, ct, site.args["input"], site.args["dim"], site.args["keepdim"])
        return e(torch.mul, u, e(mean_scale, site.args["input"], site.args["dim"]))

    def row_value(self, e, site):
        """``1/n``: an output entry averages n entries."""
        return e(mean_scale, site.args["input"], site.args["dim"])


class _Weighted(Rule):
    """A reduction whose derivative is a weighted sum over the reduced axes with weights ``w(x, y)``."""

    diff = ("input",)

    def weights(self, e, site):
        """The weights, shaped like the input."""
        raise NotImplementedError

    def _out(self, site):
        return site.out

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        return e(weighted_reduce, t, self.weights(e, site), site.args["dim"], site.args["keepdim"])

    def vjp(self, e, site, ct):  # noqa: D102
        u = e(unreduce, ct, site.args["input"], site.args["dim"], site.args["keepdim"])
        return {"input": e(torch.mul, u, self.weights(e, site))}

    def diag_vjp(self, e, site, d):  # noqa: D102
        w = self.weights(e, site)
        u = e(unreduce, d, site.args["input"], site.args["dim"], site.args["keepdim"])
        return {"input": e(torch.mul, u, e(torch.mul, w, w))}

    def diag_jvp(self, e, site, tangents):
        """(A∘A) d: the diagonal reduced with the weights squared."""
        d = tangents["input"]
        if d is ZERO:
            return ZERO
        w = self.weights(e, site)
        return e(weighted_reduce, d, e(torch.mul, w, w), site.args["dim"], site.args["keepdim"])


@register(torch.amax, "amax", torch.amin, "amin")
class Amax(_Weighted):
    """y = amax/amin over dim; ties share the derivative evenly."""

    def signature(input, dim=(), keepdim=False):  # noqa: D103
        ...

    def weights(self, e, site):  # noqa: D102
        return e(tie_weights, site.args["input"], site.out, site.args["dim"], site.args["keepdim"])


@register(torch.logsumexp, "logsumexp")
class LogSumExp(_Weighted):
    """y = log Σ exp x; dy = Σ softmax(x) dx."""

    def signature(input, dim, keepdim=False):  # noqa: D103
        ...

    def weights(self, e, site):  # noqa: D102
        return e(logsumexp_weights, site.args["input"], site.out, site.args["dim"], site.args["keepdim"])


@register(torch.max, "max", torch.min, "min")
class Max(Rule):
    """max/min: the full reduction splits ties evenly; with a dim the returned index gets the derivative;
    the binary form (``max(a, b)``) goes to the fallback.
    """

    diff = ("input",)

    def signature(input, dim=None, keepdim=False):  # noqa: D103
        ...

    def _weights(self, e, site, reverse=False):
        dim, keepdim = site.args["dim"], site.args["keepdim"]
        x = site.args["input"]
        if isinstance(dim, torch.fx.Node):
            raise Decline  # max(a, b): element-wise
        if dim is None:
            return e(tie_weights, x, site.out, None, False, reverse), None, False
        idx = e(_rt_getitem, site.out, 1)
        return e(index_weights, x, idx, dim, keepdim), dim, keepdim

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        w, dim, keepdim = self._weights(e, site)
        val = e(weighted_reduce, t, w, dim, keepdim)
        return val if dim is None else (val, ZERO)

    def diag_jvp(self, e, site, tangents):
        """(A∘A) d: the diagonal reduced with the weights squared (ties of a full reduction share 1/n each)."""
        d = tangents["input"]
        if d is ZERO:
            return ZERO
        w, dim, keepdim = self._weights(e, site)
        val = e(weighted_reduce, d, e(torch.mul, w, w), dim, keepdim)
        return val if dim is None else (val, ZERO)

    def vjp(self, e, site, ct):  # noqa: D102
        return self._pull(e, site, ct, square=False)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self._pull(e, site, d, square=True)

    def _pull(self, e, site, ct, square):
        w, dim, keepdim = self._weights(e, site, reverse=True)
        if dim is not None:
            ct = ct[0]
            if ct is ZERO:
                return {}
        u = e(unreduce, ct, site.args["input"], dim, keepdim)
        return {"input": e(torch.mul, u, e(torch.mul, w, w) if square else w)}


@register(torch.prod, "prod")
class Prod(_Weighted):
    """y = Π_dim x; dy = Σ (Π_{j≠i} x_j) dx_i."""

    def signature(input, dim=None, keepdim=False, *, dtype=None):  # noqa: D103
        ...

    def weights(self, e, site):  # noqa: D102
        return e(prod_weights, site.args["input"], site.args["dim"])


class _Norm(_Weighted):
    """A vector norm ``y = ‖x‖_p`` over ``dim``; ``dy = Σ w dx`` with autograd's (sub)gradient ``w``
    (:func:`norm_weights`).
    """

    def order(self, site):
        """``p`` as a Python number, or Decline (a matrix norm, a dtype or ``out=`` argument, a traced order)."""
        raise NotImplementedError

    def weights(self, e, site):  # noqa: D102
        return e(norm_weights, site.args["input"], site.out, self.order(site), site.args["dim"], site.args["keepdim"])


def _number(p):
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise Decline  # a string (a matrix norm) or an order computed in the graph
    return float(p)


@register(torch.linalg.vector_norm)
class VectorNorm(_Norm):
    """y = ‖x‖_ord over dim (None: all axes)."""

    def signature(input, ord=2, dim=None, keepdim=False, *, dtype=None, out=None):  # noqa: D103
        ...

    def order(self, site):  # noqa: D102
        if site.args["dtype"] is not None or site.args["out"] is not None:
            raise Decline
        return _number(site.args["ord"])


@register(torch.norm, "norm")
class Norm(_Norm):
    """torch.norm / Tensor.norm: the vector norm of order p over dim, 'fro' (over at most two axes) the 2-norm;
    matrix norms ('nuc') go to the fallback.
    """

    def signature(input, p="fro", dim=None, keepdim=False, out=None, dtype=None):  # noqa: D103
        ...  # Tensor.norm's fourth argument is dtype, bound here as ``out``: declined

    def order(self, site):  # noqa: D102
        p, dim = site.args["p"], site.args["dim"]
        if site.args["dtype"] is not None or site.args["out"] is not None:
            raise Decline
        if p == "fro" and (dim is None or isinstance(dim, int) or len(dim) <= 2):
            return 2.0
        return 2.0 if p is None else _number(p)


@register(torch.linalg.norm)
class LinalgNorm(_Norm):
    """torch.linalg.norm: a vector norm (an int dim, or no dim and no ord), or the Frobenius norm (the 2-norm of
    the entries) of matrices; other matrix norms go to the fallback.
    """

    def signature(input, ord=None, dim=None, keepdim=False, *, out=None, dtype=None):  # noqa: D103
        ...

    def order(self, site):  # noqa: D102
        ord, dim = site.args["ord"], site.args["dim"]
        if site.args["dtype"] is not None or site.args["out"] is not None:
            raise Decline
        vector = isinstance(dim, int) or (dim is None and (ord is None or site.ndim("input") == 1)) or \
            (isinstance(dim, (tuple, list)) and len(dim) == 1)
        if ord is None or (ord == "fro" and not vector):
            return 2.0
        if not vector:
            raise Decline  # a matrix norm other than Frobenius
        return _number(ord)


@register(torch.cumprod, "cumprod")
class Cumprod(Rule):
    """y_i = Π_{j≤i} x_j along dim: a lower-triangular Jacobian ``y_i / x_k``, where x holds zeros the division-free
    products autograd also takes (:func:`cumprod_tangent`, :func:`cumprod_ct`).
    """

    diff = ("input",)

    def signature(input, dim, *, dtype=None):  # noqa: D103
        ...

    @staticmethod
    def _dim(site):
        if site.args["dtype"] is not None or site.ndim("input") == 0:
            raise Decline
        return site.args["dim"]

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        return e(cumprod_tangent, t, site.args["input"], site.out, self._dim(site))

    def vjp(self, e, site, ct):  # noqa: D102
        return {"input": e(cumprod_ct, ct, site.args["input"], site.out, self._dim(site))}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return {"input": e(cumprod_ct, d, site.args["input"], site.out, self._dim(site), True)}


@decomposes(torch.cdist)
def cdist(x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """Pairwise distances as the norms of all differences, ``[*, P, R]``.

    ATen's cdist has neither a forward-mode formula nor a second derivative, which the fallback's tangents need.
    ``compute_mode`` only picks ATen's kernel; the values are the same.
    """
    return _distance(x1.unsqueeze(-2) - x2.unsqueeze(-3), p)


def _distance(diff, p):
    return emit_op(chebyshev, diff) if math.isinf(p) and p > 0 else torch.linalg.vector_norm(diff, p, -1)


@decomposes(torch.pdist)
def pdist(input, p=2.0):
    """The distances between the rows of ``[N, M]``, pairs ``i < j`` in row-major order: :func:`cdist`'s upper
    triangle (ATen's pdist has no forward-mode formula).
    """
    i, j = emit_op(pair_indices, input)
    return _distance(input[i] - input[j], p)


def pair_indices(x):
    """The row indices ``(i, j)`` of :func:`pdist`'s pairs ``i < j``."""
    return tuple(torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device))


@register(pair_indices)
class PairIndices(NonDifferentiable):
    """Indices: constants."""

    def signature(x):  # noqa: D103
        ...


def chebyshev(diff, dim=-1, keepdim=False):
    """``max |diff|`` over the last axis, cdist's distance for ``p = ∞`` (``dim`` and ``keepdim`` fixed)."""
    return torch.linalg.vector_norm(diff, math.inf, dim, keepdim)


def chebyshev_weights(x, y):
    """∂ max|x| / ∂x over the last axis as ATen's cdist backward gives it: sgn(x) at every entry with |x| = y (not
    split among ties, as vector_norm's is).
    """
    return x.sgn() * ((x.abs() == y.unsqueeze(-1)) | x.isnan())


@register(chebyshev)
class Chebyshev(_Weighted):
    """y = max |x| over the last axis, each tied entry with the full derivative (:func:`chebyshev_weights`)."""

    def signature(input, dim=-1, keepdim=False):  # noqa: D103
        ...

    def weights(self, e, site):  # noqa: D102
        return e(chebyshev_weights, site.args["input"], site.out)


def norm_floor(norm, eps):
    """``max(norm, eps)``, a clamp autograd does not see: ATen's ``cosine_similarity`` clamps its norms in place
    under ``no_grad``, so its derivative is the unclamped norm's.
    """
    return norm.clamp_min(eps)


@register(norm_floor)
class NormFloor(LinearOp):
    """y = max(x, eps) with the derivative of y = x (:func:`norm_floor`)."""

    def signature(input, eps):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return t

    transpose = apply


def broadcast_shape(x1, x2):
    """The shape ``x1`` and ``x2`` broadcast to."""
    return torch.broadcast_shapes(x1.shape, x2.shape)


@register(broadcast_shape)
class BroadcastShape(NonDifferentiable):
    """A shape: a constant."""

    def signature(x1, x2):  # noqa: D103
        ...


@decomposes(torch.cosine_similarity)  # F.cosine_similarity
def cosine_similarity(x1, x2, dim=1, eps=1e-8):
    """ATen's computation: both operands broadcast, each divided by its 2-norm along ``dim`` (raised to ``eps``
    unseen by autograd, :func:`norm_floor`), the products summed. The same values, and autograd's derivatives also
    where a norm is below ``eps`` (a zero vector: ``∂y/∂x1 = x2 / (‖x2‖ eps)``).
    """
    shape = emit_op(broadcast_shape, x1, x2)
    x1, x2 = torch.broadcast_to(x1, shape), torch.broadcast_to(x2, shape)
    n1 = emit_op(norm_floor, torch.linalg.vector_norm(x1, 2, dim, keepdim=True), eps)
    n2 = emit_op(norm_floor, torch.linalg.vector_norm(x2, 2, dim, keepdim=True), eps)
    return ((x1 / n1) * (x2 / n2)).sum(dim)


@decomposes(torch.pairwise_distance)  # F.pairwise_distance
def pairwise_distance(x1, x2, p=2.0, eps=1e-6, keepdim=False):
    """ATen's computation, ``‖x1 - x2 + eps‖_p`` over the last axis of the broadcast operands."""
    return torch.linalg.vector_norm(x1 - x2 + eps, p, -1, keepdim)


def _rt_getitem(seq, i):
    """``seq[i]``."""
    return seq[i]


def over_std(t, std):
    """``t / (2 std)``, 0 where ``std`` is 0 (autograd's choice for a constant row, where the variance's own
    derivative is 0 too: ``0 / 0`` would be NaN).
    """
    return torch.where(std == 0, 0.0, t / (2 * std))


@register(torch.var, "var", torch.std, "std")
class Var(Rule):
    """y = var(x) (or std = sqrt(var)); dy = 2 Σ (x - mean) dx / (n - correction) (÷ 2 std for std)."""

    diff = ("input",)

    def signature(input, dim=None, unbiased=None, keepdim=False, *, correction=None):  # noqa: D103
        ...

    def _std(self, site):
        return site.node.target in (torch.std, "std")

    def jvp(self, e, site, tangents):  # noqa: D102
        return self._push(e, site, tangents["input"], 1)

    def diag_jvp(self, e, site, tangents):
        """(A∘A) d: the slopes squared (and std's ``1/(2 std)``)."""
        return self._push(e, site, tangents["input"], 2)

    def _push(self, e, site, t, power):
        if t is ZERO:
            return ZERO
        if isinstance(site.args["dim"], bool):
            raise Decline
        out = e(var_tangent, t, site.args["input"], site.args["dim"], _correction(site), site.args["keepdim"], power)
        return self._over_std(e, site, out, power)

    def _over_std(self, e, site, t, power):
        for _ in range(power if self._std(site) else 0):
            t = e(over_std, t, site.out)
        return t

    def vjp(self, e, site, ct):  # noqa: D102
        return self._pull(e, site, ct, 1)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self._pull(e, site, d, 2)

    def _pull(self, e, site, ct, power):
        if isinstance(site.args["dim"], bool):
            raise Decline
        ct = self._over_std(e, site, ct, power)
        return {"input": e(var_ct, ct, site.args["input"], site.args["dim"], _correction(site),
                           site.args["keepdim"], power)}


@register(torch.cumsum, "cumsum")
class Cumsum(LinearOp):
    """y = cumsum(x, dim); the adjoint is the reversed cumulative sum (0/1 entries: its own square)."""

    def signature(input, dim, *, dtype=None):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(torch.cumsum, t, site.args["dim"] % site.ndim("input") + 1)

    def transpose(self, e, site, ct):  # noqa: D102
        d = site.args["dim"] % site.ndim("input") + 1
        return e(torch.flip, e(torch.cumsum, e(torch.flip, ct, [d]), d), [d])

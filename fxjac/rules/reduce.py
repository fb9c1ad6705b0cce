"""Reductions: sum, mean, prod, amax/amin, max/min with a dim, logsumexp, var/std, cumsum.

At ties ``amax``/``amin`` (and ``max``/``min`` without a dim) split the derivative evenly among the maxima,
while ``max(x, dim)`` sends it to the index it returns, as autograd does.
"""

from __future__ import annotations

import operator

import torch

from passes.protocol import ZERO, Decline, Rule

from ..tracing import decomposes
from .base import LinearOp
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


def tie_weights(x, y, dim, keepdim):
    """Even split among the extrema: ``[x == y] / count`` with ``y`` the reduction's result."""
    dims = _dims(dim, x.dim())
    yk = y
    if not keepdim:
        for d in sorted(dims):
            yk = yk.unsqueeze(d)
    mask = (x == yk).to(x.dtype)
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


def var_tangent(t, x, dim, correction, keepdim):
    """Tangent of ``var``: ``2 Σ (x - mean) t / (n - correction)``."""
    dims = _dims(dim, x.dim())
    n = 1
    for d in dims:
        n *= x.shape[d]
    xc = x - x.mean(dims, keepdim=True)
    return stack_sum(t * xc, dims, keepdim) * (2.0 / max(n - correction, 0))


def var_ct(ct, x, dim, correction, keepdim):
    """Cotangent of ``var``."""
    dims = _dims(dim, x.dim())
    n = 1
    for d in dims:
        n *= x.shape[d]
    xc = x - x.mean(dims, keepdim=True)
    return unreduce(ct, x, dims, keepdim) * xc * (2.0 / max(n - correction, 0))


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

    def diag_vjp(self, e, site, d):  # noqa: D102
        u = e(unreduce, d, site.args["input"], site.args["dim"], site.args["keepdim"])
        s = e(mean_scale, site.args["input"], site.args["dim"])
        return {"input": e(torch.mul, u, e(operator.mul, s, s))}


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

    def _weights(self, e, site):
        dim, keepdim = site.args["dim"], site.args["keepdim"]
        x = site.args["input"]
        if isinstance(dim, torch.fx.Node):
            raise Decline  # max(a, b): element-wise
        if dim is None:
            return e(tie_weights, x, site.out, None, False), None, False
        idx = e(_rt_getitem, site.out, 1)
        return e(index_weights, x, idx, dim, keepdim), dim, keepdim

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        w, dim, keepdim = self._weights(e, site)
        val = e(weighted_reduce, t, w, dim, keepdim)
        return val if dim is None else (val, ZERO)

    def vjp(self, e, site, ct):  # noqa: D102
        w, dim, keepdim = self._weights(e, site)
        if dim is not None:
            ct = ct[0]
            if ct is ZERO:
                return {}
        u = e(unreduce, ct, site.args["input"], dim, keepdim)
        return {"input": e(torch.mul, u, w)}


@register(torch.prod, "prod")
class Prod(_Weighted):
    """y = Π_dim x; dy = Σ (Π_{j≠i} x_j) dx_i."""

    def signature(input, dim=None, keepdim=False, *, dtype=None):  # noqa: D103
        ...

    def weights(self, e, site):  # noqa: D102
        return e(prod_weights, site.args["input"], site.args["dim"])


@decomposes(torch.cdist)
def cdist(x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """Pairwise distances as the norms of all differences, ``[*, P, R]``.

    ATen's cdist has neither a forward-mode formula nor a second derivative, which the fallback's tangents need.
    ``compute_mode`` only picks ATen's kernel; the values are the same.
    """
    return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), p, -1)


def _rt_getitem(seq, i):
    """``seq[i]``."""
    return seq[i]


@register(torch.var, "var", torch.std, "std")
class Var(Rule):
    """y = var(x) (or std = sqrt(var)); dy = 2 Σ (x - mean) dx / (n - correction) (÷ 2 std for std)."""

    diff = ("input",)

    def signature(input, dim=None, unbiased=None, keepdim=False, *, correction=None):  # noqa: D103
        ...

    def _std(self, site):
        return site.node.target in (torch.std, "std")

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        if isinstance(site.args["dim"], bool):
            raise Decline
        out = e(var_tangent, t, site.args["input"], site.args["dim"], _correction(site), site.args["keepdim"])
        if self._std(site):
            out = e(torch.div, out, e(torch.mul, site.out, 2.0))
        return out

    def vjp(self, e, site, ct):  # noqa: D102
        if isinstance(site.args["dim"], bool):
            raise Decline
        if self._std(site):
            ct = e(torch.div, ct, e(torch.mul, site.out, 2.0))
        return {"input": e(var_ct, ct, site.args["input"], site.args["dim"], _correction(site),
                           site.args["keepdim"])}


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

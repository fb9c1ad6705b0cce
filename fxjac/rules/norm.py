"""Normalisations and softmax: softmax, log_softmax, softmin, layer/group/instance/batch/RMS norm, normalize.

Note [normalisation Jacobians]
    Every normalisation here has, within one normalised group of ``n`` entries, the symmetric Jacobian

        J = r (I - α 1 1ᵀ - u uᵀ)

    with a per-group scale ``r`` and a per-group vector ``u``: layer and group norm have ``α = 1/n``,
    ``u = x̂/√n``, ``r = 1/σ``; RMS norm has ``α = 0``, ``u = x̃/√n`` (``x̃ = x r``), ``r = 1/rms``;
    ``normalize`` has ``α = 0``, ``u = y`` (zero where the norm is clamped at eps), ``r = 1/max(‖x‖, eps)``.
    So a tangent or cotangent costs two reductions over the group (:func:`normalise_apply`), and the
    diagonal rule ``(J∘J)ᵀ e = r² [e (1 - 2α - 2u²) + α² Σe + 2α u Σ(e u) + u² Σ(e u²)]`` three
    (:func:`normalise_diag`), with no ``[n, n]`` matrix formed; ``J`` is symmetric, so the same closed form
    pushes a diagonal forward (``(J∘J) e``, ``jmjtp``'s). An element-wise affine weight ``w`` after the
    normalisation multiplies the cotangent before ``J`` (``Aᵀ c = J (w c)``) and the diagonal by ``w²``.

Reductions address the normalised axes with negative indices, so one kernel serves a primal ``[*S]`` and a
stack ``[K, *S]`` alike. Layer norm's primal runs ATen's fused kernel, which also returns
the mean and ``1/σ``: the product keeps them (as autograd does); the other normalisations recompute their
statistics from the primal input. Softmax reuses its primal output.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from passes.protocol import ZERO, Decline, Rule

from . import _rt
from .base import PARTS, SquaredPush, batch_back, batch_first, parts_of
from .registry import register

# --- kernels ---------------------------------------------------------------------------------------------


def softmax_jvp(t, y, dim):
    """``y (t - Σ_dim y t)``: the softmax Jacobian ``diag(y) - y yᵀ`` (symmetric) on a stack."""
    return y * (t - (y * t).sum(dim, keepdim=True))


def softmax_diag(d, y, dim):
    """``(A∘A)ᵀ d`` for ``A = diag(y) - y yᵀ``: ``y² (Σ_dim y² d + d (1 - 2y))``."""
    y2 = y * y
    return y2 * ((y2 * d).sum(dim, keepdim=True) + d * (1 - 2 * y))


def log_softmax_jvp(t, y, dim):
    """``t - Σ_dim s t`` with ``s = exp(y)``: the log-softmax Jacobian ``I - 1 sᵀ``."""
    return t - (torch.exp(y) * t).sum(dim, keepdim=True)


def log_softmax_vjp(c, y, dim):
    """``c - s Σ_dim c``: the transpose ``I - s 1ᵀ``."""
    return c - torch.exp(y) * c.sum(dim, keepdim=True)


def log_softmax_diag(d, y, dim):
    """``(A∘A)ᵀ d`` for ``A = I - 1 sᵀ``: ``s² Σ_dim d + d (1 - 2s)``."""
    s = torch.exp(y)
    return s * s * d.sum(dim, keepdim=True) + d * (1 - 2 * s)


def log_softmax_diag_forward(d, y, dim):
    """``(A∘A) d`` for ``A = I - 1 sᵀ``: ``d (1 - 2s) + Σ_dim s² d``."""
    s = torch.exp(y)
    return d * (1 - 2 * s) + (s * s * d).sum(dim, keepdim=True)


def normalise_apply(t, r, u, dims, alpha):
    """``r (t - α Σ t - u Σ u t)`` over ``dims``; see Note [normalisation Jacobians]."""
    out = t - u * (u * t).sum(dims, keepdim=True)
    if alpha:
        out = out - alpha * t.sum(dims, keepdim=True)
    return out * r


def normalise_diag(e, r, u, dims, alpha):
    """``(J∘J)ᵀ e`` in closed form; see Note [normalisation Jacobians]."""
    u2 = u * u
    out = e * (1 - 2 * alpha - 2 * u2) + u2 * (e * u2).sum(dims, keepdim=True)
    if alpha:
        s0, s1 = e.sum(dims, keepdim=True), (e * u).sum(dims, keepdim=True)
        out = out + alpha * alpha * s0 + 2 * alpha * u * s1
    return out * (r * r)


def layer_norm_stats(x, n_dims, eps):
    """``(x̂, u = x̂/√n, r = 1/σ)`` over the last ``n_dims`` axes (biased variance, as layer_norm)."""
    dims = tuple(range(-n_dims, 0))
    n = math.prod(x.shape[-n_dims:]) if n_dims else 1
    mu = x.mean(dims, keepdim=True)
    r = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    xhat = (x - mu) * r
    return xhat, xhat * (1.0 / math.sqrt(n)), r


def layer_norm_with_stats(x, normalized_shape, weight, bias, eps):
    """``layer_norm`` with its per-group mean and ``1/σ`` (ATen's fused kernel, whose statistics autograd saves)."""
    return torch.ops.aten.native_layer_norm(x, list(normalized_shape), weight, bias, eps)


def layer_norm_saved_stats(x, mean, rstd, n_dims, eps=None):
    """:func:`layer_norm_stats` from the primal's saved mean and ``1/σ`` (which CUDA keeps in float32 for a half
    precision input: taken in the input's dtype, as autograd's results are). Where autograd records (a
    differentiable product) and ``eps`` is given, computed again from ``x``: ATen's saved statistics are constants
    to autograd, so their dependence on ``x`` would be lost.
    """
    if eps is not None and _rt.records_grad(x):
        return layer_norm_stats(x, n_dims, eps)
    mean, rstd = mean.to(x.dtype), rstd.to(x.dtype)
    xhat = (x - mean) * rstd
    return xhat, xhat * (1.0 / math.sqrt(math.prod(x.shape[-n_dims:]))), rstd


def layer_norm_cts(ct, x, normalized_shape, mean, rstd, weight, bias, mask, eps=None):
    """Cotangent stacks ``[K, *]`` of layer_norm's (input, weight, bias), summed over the batch, ``None`` where
    ``mask`` is false. One column goes through ATen's fused backward (autograd's kernel), a stack through Note
    [normalisation Jacobians] with the saved statistics.
    """
    if ct.shape[0] == 1:
        parts = torch.ops.aten.native_layer_norm_backward(ct[0], x, list(normalized_shape), mean, rstd, weight,
                                                           bias, list(mask))
        return _rt.one_column(parts, mask)
    n_dims = len(normalized_shape)
    dims, lead = tuple(range(-n_dims, 0)), tuple(range(1, ct.dim() - n_dims))
    xhat, u, r = layer_norm_saved_stats(x, mean, rstd, n_dims, eps)
    gx = normalise_apply(ct if weight is None else ct * weight, r, u, dims, 1.0 / math.prod(normalized_shape)) \
        if mask[0] else None
    gw = (ct * xhat).sum(lead) if mask[1] else None
    gb = ct.sum(lead) if mask[2] else None
    return gx, gw, gb


def rms_norm_stats(x, n_dims, eps):
    """``(x̃ = x r, u = x̃/√n, r = 1/√(mean x² + eps))`` over the last ``n_dims`` axes."""
    dims = tuple(range(-n_dims, 0))
    n = math.prod(x.shape[-n_dims:]) if n_dims else 1
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    r = torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)
    xt = x * r
    return xt, xt * (1.0 / math.sqrt(n)), r


def normalize_stats(x, dims, eps):
    """``(u, r)`` of ``x / max(‖x‖₂, eps)``: ``u = x/‖x‖`` past the clamp, else 0; ``r = 1/max(‖x‖, eps)``.

    At ``‖x‖ = eps`` the norm term counts, as autograd's ``clamp_min`` passes the gradient at its bound.
    """
    norm = torch.linalg.vector_norm(x, 2, dims, keepdim=True)
    live = norm >= eps
    r = 1.0 / norm.clamp_min(eps)
    u = torch.where(live, x * r, torch.zeros_like(x))
    return u, r


def to_groups(t, like, groups):
    """View a stack ``[K, N, C, *sp]`` (or a primal ``[N, C, *sp]``) as ``[..., N, groups, m]``."""
    lead = tuple(t.shape[: t.dim() - like.dim() + 1])
    return t.reshape(lead + (groups, -1))


def group_norm_stats(x, groups, eps):
    """``(x̂, u, r)`` of group norm: ``x̂`` shaped like ``x``; ``u = x̂/√m`` and ``r`` in group layout."""
    g = to_groups(x, x, groups)
    xhat, u, r = layer_norm_stats(g, 1, eps)
    return xhat.reshape(x.shape), u, r


def _n_c_positions(x) -> tuple:
    """``(N, C, positions per channel)`` of ``[N, C, *sp]``, as ATen's group norm kernels take them."""
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // max(n * c, 1)


def group_norm_with_stats(x, weight, bias, groups, eps):
    """``group_norm`` with its per-group mean and ``1/σ`` ``[N, groups]`` (ATen's fused kernel)."""
    x = x.contiguous()  # as torch.group_norm does
    return torch.ops.aten.native_group_norm(x, weight, bias, *_n_c_positions(x), groups, eps)


def group_norm_saved_stats(x, mean, rstd, groups):
    """:func:`group_norm_stats` from the primal's saved mean and ``1/σ`` (in the input's dtype, see
    :func:`layer_norm_saved_stats`).
    """
    mean, rstd = mean.to(x.dtype), rstd.to(x.dtype)
    g = to_groups(x, x, groups)
    r = rstd.unsqueeze(-1)
    xhat = (g - mean.unsqueeze(-1)) * r
    return xhat.reshape(x.shape), xhat * (1.0 / math.sqrt(g.shape[-1])), r


def group_norm_cts(ct, x, mean, rstd, weight, groups, mask):
    """Cotangent stacks ``[K, *]`` of group norm's (input, weight, bias), summed over the batch, ``None`` where
    ``mask`` is false: one column through ATen's fused backward (autograd's kernel), a stack by Note
    [normalisation Jacobians] with the saved statistics.
    """
    n, c, positions = _n_c_positions(x)
    if ct.shape[0] == 1 and not _rt.records_grad(ct, x, mean, weight):  # ATen has no double backward for it
        parts = torch.ops.aten.native_group_norm_backward(ct[0].contiguous(), x.contiguous(), mean, rstd, weight, n, c,
                                                          positions, groups, list(mask))
        return _rt.one_column(parts, mask)
    xhat, u, r = group_norm_saved_stats(x, mean, rstd, groups)
    gx = group_apply(ct if weight is None else ct * channel_view(weight, x), x, r, u, groups,
                     groups / max(x.numel() // n, 1)) if mask[0] else None
    gw = channel_sum(ct * xhat, False) if mask[1] else None
    gb = channel_sum(ct, False) if mask[2] else None
    return gx, gw, gb


def group_apply(t, x, r, u, groups, alpha):
    """:func:`normalise_apply` over each group of a stack shaped like ``[K, *x.shape]``."""
    return normalise_apply(to_groups(t, x, groups), r, u, (-1,), alpha).reshape(t.shape)


def group_diag(e, x, r, u, groups, alpha):
    """:func:`normalise_diag` over each group of a stack shaped like ``[K, *x.shape]``."""
    return normalise_diag(to_groups(e, x, groups), r, u, (-1,), alpha).reshape(e.shape)


def channel_view(w, x):
    """A per-channel vector ``[C]`` shaped to broadcast against ``x = [N, C, *sp]``: ``[C, 1, …]``."""
    return w.reshape((-1,) + (1,) * (x.dim() - 2))


def channel_tangent(tw, x, ps):
    """A channel-parameter stack ``[K, C]`` (per-sample ``[K, B, C]``) lined up with ``[K, *x.shape]``."""
    ones = (1,) * (x.dim() - 2)
    if ps:
        return tw.reshape(tuple(tw.shape) + ones)
    return tw.reshape((tw.shape[0], 1, tw.shape[1]) + ones)


def channel_sum(c, ps):
    """Sum a stack ``[K, N, C, *sp]`` to ``[K, C]`` (per-sample: ``[K, N, C]``) for a channel parameter."""
    dims = tuple(range(3, c.dim()))
    if not ps:
        dims = (1,) + dims
    return c.sum(dims) if dims else c


def batch_norm_scale(running_var, weight, eps):
    """``w / √(running_var + eps)``: the per-channel slope of eval batch norm (``w = 1`` without weight)."""
    r = torch.rsqrt(running_var + eps)
    return r if weight is None else r * weight


def batch_norm_xhat(x, running_mean, running_var, eps):
    """``(x - running_mean) / √(running_var + eps)`` per channel."""
    return (x - channel_view(running_mean, x)) * channel_view(torch.rsqrt(running_var + eps), x)


def batch_norm_cts(ct, x, running_mean, running_var, weight, eps, mask):
    """Cotangent stacks ``[K, *]`` of eval batch norm's (input, weight, bias), summed over the batch, ``None``
    where ``mask`` is false: one column through ATen's fused backward (autograd's kernel), a stack per part.
    """
    if ct.shape[0] == 1:
        # Eval mode reads the running statistics; CUDA's kernel asserts that the saved ones are defined, so they
        # are passed as the empty tensors the eval forward returns (the CPU kernel accepts either).
        unused = running_mean.new_empty(0)
        parts = torch.ops.aten.native_batch_norm_backward(ct[0], x, weight, running_mean, running_var, unused,
                                                          unused, False, eps, list(mask))
        return _rt.one_column(parts, mask)
    gx = ct * channel_view(batch_norm_scale(running_var, weight, eps), x) if mask[0] else None
    gw = channel_sum(ct * batch_norm_xhat(x, running_mean, running_var, eps), False) if mask[1] else None
    gb = channel_sum(ct, False) if mask[2] else None
    return gx, gw, gb


# --- softmax family --------------------------------------------------------------------------------------


def _implicit_softmax_dim(ndim: int) -> int:
    """The axis F.softmax picks when ``dim`` is None (a deprecated legacy rule)."""
    return 0 if ndim in (0, 1, 3) else 1


class _SoftmaxLike(Rule):
    """Shared plumbing of softmax-like ops along one axis: the axis, the optional dtype cast, the sign."""

    diff = ("input",)

    sign = 1.0

    def _dim(self, site):
        nd = site.ndim("input")
        if nd == 0:
            raise Decline
        dim = site.args["dim"]
        if dim is None:
            dim = _implicit_softmax_dim(nd)
        if not isinstance(dim, int):
            raise Decline
        return dim % nd - nd  # negative: addresses primal and stack alike

    def _in(self, e, site, t):
        """The tangent cast to the op's dtype and signed (softmin is softmax of -x)."""
        if site.args.get("dtype") is not None:
            t = e.method("to", t, site.args["dtype"])
        return e(torch.neg, t) if self.sign < 0 else t

    def _out(self, e, site, c):
        """A cotangent cast back to the input's dtype and signed."""
        if site.args.get("dtype") is not None:
            c = e.method("to", c, site.val("input").dtype)
        return e(torch.neg, c) if self.sign < 0 else c

    kernels: tuple = ()
    """(tangent, cotangent, squared-Jacobian transposed, squared-Jacobian) kernels, each ``kernel(stack, y, dim)``
    with ``y`` the output."""

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        return e(self.kernels[0], self._in(e, site, t), site.out, self._dim(site))

    def vjp(self, e, site, ct):  # noqa: D102
        return {"input": self._out(e, site, e(self.kernels[1], ct, site.out, self._dim(site)))}

    def diag_vjp(self, e, site, d):  # noqa: D102
        out = e(self.kernels[2], d, site.out, self._dim(site))  # squares: the sign drops out
        if site.args.get("dtype") is not None:
            out = e.method("to", out, site.val("input").dtype)
        return {"input": out}

    def diag_jvp(self, e, site, tangents):
        """(A∘A) d, the diagonal cast to the op's dtype (the sign squares away)."""
        d = tangents["input"]
        if d is ZERO:
            return ZERO
        if site.args.get("dtype") is not None:
            d = e.method("to", d, site.args["dtype"])
        return e(self.kernels[3], d, site.out, self._dim(site))


class _Softmax(_SoftmaxLike):
    """y = softmax(x); J = diag(y) - y yᵀ (symmetric), reusing the primal output."""

    kernels = (softmax_jvp, softmax_jvp, softmax_diag, softmax_diag)


@register(F.softmax)
class Softmax(_Softmax):
    """y = softmax(x, dim); dy = y (dx - Σ y dx), reusing the primal output."""

    def signature(input, dim=None, _stacklevel=3, dtype=None):  # noqa: D102
        ...


@register(torch.softmax, "softmax")
class TorchSoftmax(_Softmax):
    """y = torch.softmax(x, dim) / x.softmax(dim); dy = y (dx - Σ y dx), reusing the primal output."""

    def signature(input, dim=None, dtype=None):  # noqa: D102
        ...


@register(F.softmin)
class Softmin(_Softmax):
    """y = softmax(-x, dim); dy = -y (dx - Σ y dx), reusing the primal output."""

    sign = -1.0

    def signature(input, dim=None, _stacklevel=3, dtype=None):  # noqa: D102
        ...


class _LogSoftmax(_SoftmaxLike):
    """y = log_softmax(x); J = I - 1 sᵀ with s = exp(y), reusing the primal output."""

    kernels = (log_softmax_jvp, log_softmax_vjp, log_softmax_diag, log_softmax_diag_forward)


@register(F.log_softmax)
class LogSoftmax(_LogSoftmax):
    """y = log_softmax(x, dim); dy = dx - Σ exp(y) dx, reusing the primal output."""

    def signature(input, dim=None, _stacklevel=3, dtype=None):  # noqa: D102
        ...


@register(torch.log_softmax, "log_softmax")
class TorchLogSoftmax(_LogSoftmax):
    """y = torch.log_softmax(x, dim) or x.log_softmax(dim); dy = dx - Σ exp(y) dx, reusing the output."""

    def signature(input, dim=None, dtype=None):  # noqa: D102
        ...


# --- normalisations with statistics of the sample ----------------------------------------------------------


def _with_stats(e, both):
    """A fused normalisation's ``(output, mean, 1/σ)`` node as :meth:`Rule.primal`'s (output, saved statistics)."""
    return e(operator.getitem, both, 0), {"mean": e(operator.getitem, both, 1), "rstd": e(operator.getitem, both, 2)}


def _squared(e, v, square):
    """``v * v`` where a diagonal is pushed (the squared Jacobian's entries), else ``v``."""
    return e(torch.mul, v, v) if square else v


def _affine_param_tangent(e, site, name, t, ndim):
    """A trailing-axes parameter tangent (layer/RMS norm weight or bias) lined up with the output stack."""
    if name in site.ps:
        return batch_back(e, site, e(_rt.align_ps, t, ndim))
    return e(_rt.align, t, ndim)


def _affine_param_ct(e, site, name, c):
    """A trailing-axes parameter cotangent: summed over positions (and the batch unless per-sample)."""
    like = site.args[name]
    return e(_rt.sum_to_ps, batch_first(e, site, c), like) if name in site.ps else e(_rt.sum_to, c, like)


class _TrailingNorm(SquaredPush):
    """A normalisation over the trailing ``normalized_shape`` axes with an element-wise weight (and bias).

    Subclasses give the statistics kernel (returning ``(x̂, u, r)``) and ``α``; see Note [normalisation
    Jacobians].
    """

    diff = ("input", "weight", "bias")

    alpha_of_n = True  # α = 1/n (centred) or 0
    stats = staticmethod(layer_norm_stats)

    batch_anywhere = True  # a sequence-first input: per-sample parameter terms move the batch first

    def _setup(self, e, site):
        ns = tuple(site.val("normalized_shape"))
        n, moved = site.ndim("input"), site.extra.get("ps_batch_dim", 0)
        if n < len(ns) or not ns or (moved and moved >= n - len(ns)):
            raise Decline  # (a moved batch axis among the normalised ones would mix the samples)
        saved = site.extra.get("saved", {})
        if "rstd" in saved:
            s = e(layer_norm_saved_stats, site.args["input"], saved["mean"], saved["rstd"], len(ns), site.args["eps"])
        else:
            s = e(self.stats, site.args["input"], len(ns), site.args["eps"])
        xhat, u, r = (e(operator.getitem, s, i) for i in range(3))
        alpha = 1.0 / math.prod(ns) if self.alpha_of_n else 0.0
        return tuple(range(-len(ns), 0)), xhat, u, r, alpha

    def _push(self, e, site, tangents, square):
        """The tangent, or (``square``) the forward diagonal: the normalisation's Jacobian is symmetric, so its
        squares push forward by :func:`normalise_diag`; the weight and ``x̂`` squared.
        """
        dims, xhat, u, r, alpha = self._setup(e, site)
        w, ndim = site.args["weight"], site.ndim()
        terms = []
        t = tangents["input"]
        if t is not ZERO:
            tx = e(normalise_diag if square else normalise_apply, t, r, u, dims, alpha)
            terms.append(tx if w is None else e(torch.mul, tx, _squared(e, w, square)))
        tw = tangents.get("weight", ZERO)
        if tw is not ZERO:
            terms.append(e(torch.mul, _affine_param_tangent(e, site, "weight", tw, ndim), _squared(e, xhat, square)))
        tb = tangents.get("bias", ZERO)
        out = e.sum(terms)
        if tb is not ZERO:
            tb = _affine_param_tangent(e, site, "bias", tb, ndim)
            out = e(_rt.expand_like, tb, site.out) if out is ZERO else e.add(out, tb)
        return out

    def vjp(self, e, site, ct):  # noqa: D102
        dims, xhat, u, r, alpha = self._setup(e, site)
        w = site.args["weight"]
        out = {}
        if site.needs("input"):
            g = ct if w is None else e(torch.mul, ct, w)
            out["input"] = e(normalise_apply, g, r, u, dims, alpha)
        if w is not None and site.needs("weight"):
            out["weight"] = _affine_param_ct(e, site, "weight", e(torch.mul, ct, xhat))
        if site.args.get("bias") is not None and site.needs("bias"):
            out["bias"] = _affine_param_ct(e, site, "bias", ct)
        return out

    def diag_vjp(self, e, site, d):  # noqa: D102
        dims, xhat, u, r, alpha = self._setup(e, site)
        w = site.args["weight"]
        out = {}
        if site.needs("input"):
            g = d if w is None else e(torch.mul, d, e(torch.mul, w, w))
            out["input"] = e(normalise_diag, g, r, u, dims, alpha)
        if w is not None and site.needs("weight"):
            out["weight"] = _affine_param_ct(e, site, "weight", e(torch.mul, d, e(torch.mul, xhat, xhat)))
        if site.args.get("bias") is not None and site.needs("bias"):
            out["bias"] = _affine_param_ct(e, site, "bias", d)
        return out


@register(F.layer_norm)
class LayerNorm(_TrailingNorm):
    """y = x̂ w + b, x̂ = (x - μ)/σ over the trailing axes; dx̂ = (dx - mean dx - x̂ mean(x̂ dx))/σ.

    The primal runs ATen's fused kernel and keeps its statistics; the vjp of shared parameters uses the fused
    backward for a single column.
    """

    def signature(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: D102
        ...

    def primal(self, e, site):  # noqa: D102
        ns = site.val("normalized_shape")
        if not isinstance(ns, (tuple, list)) or not ns or site.ndim("input") < len(ns):
            return None
        a = site.args
        return _with_stats(e, e(layer_norm_with_stats, a["input"], a["normalized_shape"], a["weight"], a["bias"],
                                a["eps"]))

    def vjp(self, e, site, ct):  # noqa: D102
        saved = site.extra.get("saved", {})
        if "rstd" not in saved:
            return super().vjp(e, site, ct)
        a = site.args
        need = [site.needs("input")] + [a[n] is not None and site.needs(n) for n in PARTS[1:]]
        fused = [need[0]] + [need[i] and PARTS[i] not in site.ps for i in (1, 2)]
        out = parts_of(e, e(layer_norm_cts, ct, a["input"], a["normalized_shape"], saved["mean"], saved["rstd"],
                            a["weight"], a["bias"], fused, a["eps"]), fused)
        if need[1] and not fused[1]:
            xhat = e(operator.getitem, e(layer_norm_saved_stats, a["input"], saved["mean"], saved["rstd"],
                                         len(site.val("normalized_shape")), a["eps"]), 0)
            out["weight"] = _affine_param_ct(e, site, "weight", e(torch.mul, ct, xhat))
        if need[2] and not fused[2]:
            out["bias"] = _affine_param_ct(e, site, "bias", ct)
        return out


@register(F.rms_norm)
class RmsNorm(_TrailingNorm):
    """y = x̃ w, x̃ = x / rms(x) over the trailing axes; dx̃ = (dx - x̃ mean(x̃ dx)) / rms(x)."""

    alpha_of_n = False
    stats = staticmethod(rms_norm_stats)

    def signature(input, normalized_shape, weight=None, eps=None):  # noqa: D102
        ...


class _ChannelNorm(SquaredPush):
    """A normalisation of ``[N, C, *sp]`` over groups of channels and positions, with per-channel weight/bias.

    Subclasses say how many groups (``_groups``); see Note [normalisation Jacobians] (``α = 1/m``).
    """

    diff = ("input", "weight", "bias")

    def _groups(self, site) -> int:
        raise NotImplementedError

    def _setup(self, e, site):
        x = site.args["input"]
        if site.ndim("input") < 2:
            raise Decline
        groups = self._groups(site)
        shape = tuple(site.val("input").shape)
        m = math.prod(shape[1:]) // groups
        saved = site.extra.get("saved", {})
        if "rstd" in saved:
            s = e(group_norm_saved_stats, x, saved["mean"], saved["rstd"], groups)
        else:
            s = e(group_norm_stats, x, groups, site.args["eps"])
        xhat, u, r = (e(operator.getitem, s, i) for i in range(3))
        return x, groups, xhat, u, r, 1.0 / m

    def _push(self, e, site, tangents, square):
        """The tangent, or (``square``) the forward diagonal: each group's Jacobian is symmetric
        (:func:`group_diag`); the weight and ``x̂`` squared.
        """
        x, groups, xhat, u, r, alpha = self._setup(e, site)
        w = site.args["weight"]
        terms = []
        t = tangents["input"]
        if t is not ZERO:
            tx = e(group_diag if square else group_apply, t, x, r, u, groups, alpha)
            terms.append(tx if w is None else e(torch.mul, tx, e(channel_view, _squared(e, w, square), x)))
        tw = tangents.get("weight", ZERO)
        if tw is not ZERO:
            terms.append(e(torch.mul, e(channel_tangent, tw, x, "weight" in site.ps), _squared(e, xhat, square)))
        tb = tangents.get("bias", ZERO)
        out = e.sum(terms)
        if tb is not ZERO:
            tb = e(channel_tangent, tb, x, "bias" in site.ps)
            out = e(_rt.expand_like, tb, site.out) if out is ZERO else e.add(out, tb)
        return out

    def vjp(self, e, site, ct):  # noqa: D102
        x, groups, xhat, u, r, alpha = self._setup(e, site)
        w = site.args["weight"]
        out = {}
        if site.needs("input"):
            g = ct if w is None else e(torch.mul, ct, e(channel_view, w, x))
            out["input"] = e(group_apply, g, x, r, u, groups, alpha)
        if w is not None and site.needs("weight"):
            out["weight"] = e(channel_sum, e(torch.mul, ct, xhat), "weight" in site.ps)
        if site.args.get("bias") is not None and site.needs("bias"):
            out["bias"] = e(channel_sum, ct, "bias" in site.ps)
        return out

    def diag_vjp(self, e, site, d):  # noqa: D102
        x, groups, xhat, u, r, alpha = self._setup(e, site)
        w = site.args["weight"]
        out = {}
        if site.needs("input"):
            g = d if w is None else e(torch.mul, d, e(channel_view, e(torch.mul, w, w), x))
            out["input"] = e(group_diag, g, x, r, u, groups, alpha)
        if w is not None and site.needs("weight"):
            out["weight"] = e(channel_sum, e(torch.mul, d, e(torch.mul, xhat, xhat)), "weight" in site.ps)
        if site.args.get("bias") is not None and site.needs("bias"):
            out["bias"] = e(channel_sum, d, "bias" in site.ps)
        return out


@register(F.group_norm)
class GroupNorm(_ChannelNorm):
    """y = x̂ w_c + b_c, x̂ normalised per group of channels and positions (layer norm's Jacobian per group)."""

    def signature(input, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: D102
        ...

    def _groups(self, site):
        g = site.args["num_groups"]
        if not isinstance(g, int):
            raise Decline
        return g

    def primal(self, e, site):
        """ATen's fused kernel, keeping its statistics (as autograd does)."""
        a = site.args
        if not isinstance(a["num_groups"], int) or site.ndim("input") < 2 or isinstance(a["eps"], torch.fx.Node):
            return None
        return _with_stats(e, e(group_norm_with_stats, a["input"], a["weight"], a["bias"], a["num_groups"], a["eps"]))

    def vjp(self, e, site, ct):
        """Shared-parameter and input cotangents from :func:`group_norm_cts` (one column: autograd's kernel)."""
        saved = site.extra.get("saved", {})
        a = site.args
        need = [site.needs(k) and a.get(k) is not None for k in PARTS]
        if "rstd" not in saved or any(need[i] and PARTS[i] in site.ps for i in (1, 2)):
            return super().vjp(e, site, ct)
        return parts_of(e, e(group_norm_cts, ct, a["input"], saved["mean"], saved["rstd"], a["weight"],
                             self._groups(site), need), need)


class _EvalBatchNorm(SquaredPush):
    """y = (x - μ_run) w / √(σ²_run + eps) + b per channel, the running statistics constant (eval mode)."""

    diff = ("input", "weight", "bias")

    def _check(self, site, tangents=None):
        if isinstance(site.args.get("eps"), torch.fx.Node) or site.ndim("input") < 2:
            raise Decline
        for name in ("running_mean", "running_var"):
            if not isinstance(site.args.get(name), torch.fx.Node):
                raise Decline
            if tangents is not None and tangents.get(name, ZERO) is not ZERO:
                raise Decline  # statistics computed from parameters: leave them to the fallback
            if tangents is None and site.extra.get("need") is not None and site.needs(name):
                raise Decline

    def _push(self, e, site, tangents, square):
        """The tangent, or (``square``) the forward diagonal: each output entry reads one entry of x, w and b, so
        the jvp with the scale and x̂ squared.
        """
        self._check(site, tangents)
        x, rm, rv, w, eps = (site.args[k] for k in ("input", "running_mean", "running_var", "weight", "eps"))
        terms = []
        t = tangents["input"]
        if t is not ZERO:
            s = e(batch_norm_scale, rv, w, eps)
            terms.append(e(torch.mul, t, e(channel_view, e(torch.mul, s, s) if square else s, x)))
        tw = tangents.get("weight", ZERO)
        if tw is not ZERO:
            xhat = e(batch_norm_xhat, x, rm, rv, eps)
            if square:
                xhat = e(torch.mul, xhat, xhat)
            terms.append(e(torch.mul, e(channel_tangent, tw, x, "weight" in site.ps), xhat))
        tb = tangents.get("bias", ZERO)
        out = e.sum(terms)
        if tb is not ZERO:
            tb = e(channel_tangent, tb, x, "bias" in site.ps)
            out = e(_rt.expand_like, tb, site.out) if out is ZERO else e.add(out, tb)
        return out

    def _backward(self, e, site, c, square):
        self._check(site)
        x, rm, rv, w, eps = (site.args[k] for k in ("input", "running_mean", "running_var", "weight", "eps"))
        out = {}
        if site.needs("input"):
            s = e(batch_norm_scale, rv, w, eps)
            if square:
                s = e(torch.mul, s, s)
            out["input"] = e(torch.mul, c, e(channel_view, s, x))
        if w is not None and site.needs("weight"):
            xhat = e(batch_norm_xhat, x, rm, rv, eps)
            if square:
                xhat = e(torch.mul, xhat, xhat)
            out["weight"] = e(channel_sum, e(torch.mul, c, xhat), "weight" in site.ps)
        if site.args.get("bias") is not None and site.needs("bias"):
            out["bias"] = e(channel_sum, c, "bias" in site.ps)
        return out

    def vjp(self, e, site, ct):
        """Shared-parameter and input cotangents from :func:`batch_norm_cts` (one column: autograd's kernel)."""
        self._check(site)
        a = site.args
        mask = [site.needs(k) and a.get(k) is not None and k not in site.ps for k in PARTS]
        if not all(mask[i] or not site.needs(k) or a.get(k) is None for i, k in enumerate(PARTS)):
            return self._backward(e, site, ct, square=False)  # per-sample parameters
        return parts_of(e, e(batch_norm_cts, ct, a["input"], a["running_mean"], a["running_var"], a["weight"],
                             a["eps"], mask), mask)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self._backward(e, site, d, square=True)


@register(F.batch_norm)
class BatchNorm(_EvalBatchNorm):
    """Eval batch norm: y = x̂ w + b per channel, running statistics; dy/dx = w / √(σ²_run + eps).

    Training mode is refused before rules run (ModeError).
    """

    def signature(input, running_mean, running_var, weight=None, bias=None, training=False,  # noqa: D102
                  momentum=0.1, eps=1e-5):
        ...

    def _check(self, site, tangents=None):
        if site.args["training"] is not False:
            raise Decline
        super()._check(site, tangents)


class _InstanceNormStats(_ChannelNorm):
    """Instance norm with the sample's statistics: group norm with one group per channel.

    The running statistics, if given, are only updated in place and do not enter the output.
    """

    def _groups(self, site):
        return site.val("input").shape[1]


class _InstanceNormRunning(_EvalBatchNorm):
    """Instance norm with running statistics (eval mode, ``track_running_stats``): eval batch norm."""


_INSTANCE_STATS, _INSTANCE_RUNNING = _InstanceNormStats(), _InstanceNormRunning()


@register(F.instance_norm)
class InstanceNorm(Rule):
    """y = x̂ w_c + b_c, x̂ per sample and channel: the group-norm rule with C groups (or eval batch norm).

    ``use_input_stats=False`` (eval mode with ``track_running_stats``) normalises with the running statistics.
    """

    diff = ("input", "weight", "bias")

    def signature(input, running_mean=None, running_var=None, weight=None, bias=None,  # noqa: D102
                  use_input_stats=True, momentum=0.1, eps=1e-5):
        ...

    @staticmethod
    def _impl(site):
        stats = site.args["use_input_stats"]
        if stats is True:
            return _INSTANCE_STATS
        if stats is False:
            return _INSTANCE_RUNNING
        raise Decline

    def jvp(self, e, site, tangents):  # noqa: D102
        return self._impl(site).jvp(e, site, tangents)

    def vjp(self, e, site, ct):  # noqa: D102
        return self._impl(site).vjp(e, site, ct)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self._impl(site).diag_vjp(e, site, d)

    def diag_jvp(self, e, site, tangents):  # noqa: D102
        return self._impl(site).diag_jvp(e, site, tangents)


@register(F.normalize)
class Normalize(Rule):
    """y = x / max(‖x‖₂, eps) along dim; J = (I - y yᵀ) / ‖x‖ (I / eps where the norm is clamped)."""

    diff = ("input",)

    def signature(input, p=2.0, dim=1, eps=1e-12, out=None):  # noqa: D102
        ...

    def _setup(self, e, site):
        p, dim, eps = site.args["p"], site.args["dim"], site.args["eps"]
        if p != 2 or site.args["out"] is not None or isinstance(eps, torch.fx.Node):
            raise Decline
        nd = site.ndim("input")
        if nd == 0:
            raise Decline
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        if not all(isinstance(d, int) for d in dims):
            raise Decline
        dims = tuple(sorted({d % nd - nd for d in dims}))
        s = e(normalize_stats, site.args["input"], dims, eps)
        return dims, e(operator.getitem, s, 0), e(operator.getitem, s, 1)

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        dims, u, r = self._setup(e, site)
        return e(normalise_apply, t, r, u, dims, 0.0)

    def vjp(self, e, site, ct):  # noqa: D102
        dims, u, r = self._setup(e, site)
        return {"input": e(normalise_apply, ct, r, u, dims, 0.0)}

    def diag_vjp(self, e, site, d):  # noqa: D102
        dims, u, r = self._setup(e, site)
        return {"input": e(normalise_diag, d, r, u, dims, 0.0)}

    def diag_jvp(self, e, site, tangents):
        """(J∘J) d: ``J`` is symmetric, so forward and backward diagonals agree."""
        d = tangents["input"]
        return ZERO if d is ZERO else self.diag_vjp(e, site, d)["input"]

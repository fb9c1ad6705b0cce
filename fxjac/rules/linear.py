"""Linear and bilinear algebra: ``F.linear``, ``F.bilinear``, matmul (``@``, ``mm``, ``bmm``), ``einsum`` and ``outer``.

Weights used at several positions (a Linear on ``[B, T, d]``) get exact per-sample cotangents from one einsum
over the positions; nothing builds a Jacobian.
"""

from __future__ import annotations

import math
import operator
import string

import torch
import torch.fx as fx
import torch.nn.functional as F

from passes.builder import rows_by_sample
from passes.protocol import ZERO, Decline, Rule

from ..tracing import decomposes
from . import _rt
from .base import SquaredPush, batch_back, batch_first
from .registry import register

# --- kernels ---------------------------------------------------------------------------------------------
# Every einsum here contracts two operands: torch runs opt_einsum's path search on every call with three or more
# (about 0.1 ms each, more than the whole contraction on small nets).


def linear_weight_tangent(x, tw):
    """``x @ tWᵀ`` for a shared weight-tangent stack ``tw`` ``[K, out, in]`` -> ``[K, *x[:-1], out]``."""
    if tw.shape[0] == 1:  # a jvp: one GEMM (through oneDNN where that is faster, Note [GEMMs through oneDNN])
        return _rt.mm_t(x, tw[0]).unsqueeze(0)
    return torch.einsum("koi,...i->k...o", tw, x)


def linear_weight_tangent_ps(x, tw):
    """The same for per-sample weight tangents ``[K, B, out, in]``."""
    return torch.einsum("kboi,b...i->kb...o", tw, x)


def linear_weight_ct(ct, x):
    """``Σ_positions ct ⊗ x`` summed over the batch: ``[K, *, out]``, ``[*, in]`` -> ``[K, out, in]``."""
    if ct.shape[0] == 1:  # one column: one GEMM over the positions
        o, i = ct.shape[-1], x.shape[-1]
        n = math.prod(x.shape[:-1])
        return _rt.mm(ct.reshape(n, o).t(), x.reshape(n, i)).unsqueeze(0)
    return torch.einsum("k...o,...i->koi", ct, x)


def linear_weight_ct_ps(ct, x):
    """Per-sample weight cotangents: ``[K, B, *, out]``, ``[B, *, in]`` -> ``[K, B, out, in]``."""
    return torch.einsum("kb...o,b...i->kboi", ct, x)


def linear_weight_ct_into(out, ct, x, per_sample):
    """The weight cotangent written into ``out``, a ``[rows, out*in]`` block of a flat stack (Note [flat writes]
    in fxjac/assemble.py); returns the block (see :func:`fxjac.rules._rt.write`). Per-sample (``ct``
    ``[K, B, *, out]``, ``x`` ``[B, *, in]``, rows ``K*B``): one outer product per sample for ``[B, in]`` inputs,
    else a matrix product over the positions; or summed over the batch (rows ``K``).
    """
    k, o, i = ct.shape[0], ct.shape[-1], x.shape[-1]
    if not per_sample:  # sizes spelled out, not -1: a batch of zero leaves -1 ambiguous
        n = math.prod(x.shape[:-1])
        if k == 1:
            return _rt.write(out.view(o, i), "mm", ct.reshape(n, o).t(), x.reshape(n, i)).reshape(out.shape)
        x = x.reshape(1, n, i).expand(k, n, i)
        w = _rt.write(out.view(k, o, i), "bmm", ct.reshape(k, n, o).transpose(1, 2), x)
    elif x.dim() == 2:
        w = _rt.write(out.view(k, x.shape[0], o, i), "mul", ct.unsqueeze(-1), x.unsqueeze(-2))
    else:  # bmm, not matmul: matmul's out= folds the batch axes, which a strided block does not allow
        b, t = x.shape[0], math.prod(x.shape[1:-1])
        x = x.reshape(1, b, t, i).expand(k, b, t, i).reshape(k * b, t, i)
        w = _rt.write(out.view(k * b, o, i), "bmm", ct.reshape(k * b, t, o).transpose(1, 2), x)
    return w.reshape(out.shape)


def linear_bias_ct_into(out, ct, per_sample):
    """The bias cotangent (``ct`` summed over the positions, and over the batch unless ``per_sample``) written
    into ``out``, a ``[rows, out]`` block of a flat stack; returns the block (see :func:`fxjac.rules._rt.write`).
    """
    k, o = ct.shape[0], ct.shape[-1]
    if not per_sample:
        return _rt.write(out, "sum", ct.reshape(k, math.prod(ct.shape[1:-1]), o), 1)
    b = ct.shape[1]
    return _rt.write(out.view(k, b, o), "sum", ct.reshape(k, b, math.prod(ct.shape[2:-1]), o), 2).reshape(out.shape)


def linear_weight_gram_diag_into(out, ct, x, w, reduce_sum):
    """``Σ_k w_kb (ct_kb ⊗ x_b)²`` for a Linear without extra positions: the weight's GGN diagonal from squared
    cotangents and squared inputs, never forming per-sample gradients (``[O, I]``, per sample ``[B, O, I]``),
    written into ``out``, its ``[rows, out*in]`` block of a flat stack (Note [flat writes] in fxjac/assemble.py)
    by one ``mm`` (or an outer product per sample); returns the block.
    """
    c2 = ct * ct
    if w is not None:
        c2 = c2 * w.unsqueeze(-1)
    c2 = c2.sum(0)  # [B, O]: the columns summed first, a contiguous reduction
    o, i = ct.shape[-1], x.shape[-1]
    if reduce_sum:
        return _rt.write(out.view(o, i), "mm", c2.t(), x * x).reshape(out.shape)
    b = x.shape[0]
    return _rt.write(out.view(b, o, i), "mul", c2.unsqueeze(-1), (x * x).unsqueeze(-2)).reshape(out.shape)


# The per-sample cotangents of a shared weight are formed and contracted a few samples at a time, so that each
# piece stays in cache between the GEMM that forms it and the passes that contract it (eagerly on the CPU: under
# torch.compile in one piece, which inductor fuses; on a GPU in one piece, as launches cost more than the cache
# saves).
SHARED_CHUNK_BYTES = 1 << 20


def shared_weight_grads(ct, x):
    """Per-sample, per-column cotangents of a weight shared across positions, ``G_kb = Σ_t ct_kbt ⊗ x_bt``, as
    ``[B, K, out*in]`` pieces of consecutive samples: ``ct`` ``[K, B, *, out]``, ``x`` ``[B, *, in]``. One bmm
    per piece, sample-major, so the contractions after it (over the columns, the parameters or both) need no
    permuted copy of ``G``.
    """
    k, b, o, i = ct.shape[0], ct.shape[1], ct.shape[-1], x.shape[-1]
    t = math.prod(x.shape[1:-1])
    c = ct.reshape(k, b, t, o).permute(1, 0, 3, 2).reshape(b, k * o, t)
    xs = x.reshape(b, t, i)
    if torch.compiler.is_compiling() or ct.device.type != "cpu":
        return [torch.bmm(c, xs).view(b, k, o * i)]
    step = max(1, SHARED_CHUNK_BYTES // max(1, k * o * i * ct.element_size()))
    return [torch.bmm(c[lo:lo + step], xs[lo:lo + step]).view(min(step, b - lo), k, o * i)
            for lo in range(0, max(b, 1), step)]  # sizes spelled out: with a batch of zero, -1 is ambiguous


def _cat0(parts):
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def linear_weight_shared_gram_diag_into(out, ct, x, w, reduce_sum):
    """:func:`linear_weight_gram_diag_into` for a weight shared across positions: ``Σ_k w_kb G_kb²`` from
    :func:`shared_weight_grads`, summed over the batch unless per sample, written into ``out``.
    """
    wt = None if w is None else w.t().unsqueeze(-1)
    sums, lo = [], 0
    for g in shared_weight_grads(ct, x):
        g2 = g * g
        if wt is not None:
            g2 = g2 * wt[lo:lo + g.shape[0]]
        lo += g.shape[0]
        sums.append(g2.sum((0, 1)) if reduce_sum else g2.sum(1))
    if reduce_sum:
        return _rt.write(out.view(-1), "sum", torch.stack(sums), 0).reshape(out.shape)
    return _rt.write(out.view(ct.shape[1], -1), "cat", sums).reshape(out.shape)


def linear_weight_shared_sandwich(ct, x, sigma, out_diag):
    """:func:`linear_weight_sandwich` for a weight shared across positions: ``Σ_p G_ob,p σ_p G_qb,p`` from
    :func:`shared_weight_grads` -> ``[B, O, O]`` (or its diagonal ``[B, O]``).
    """
    s = sigma.reshape(-1)
    parts = []
    for g in shared_weight_grads(ct, x):
        gs = g * s
        parts.append((gs * g).sum(-1) if out_diag else torch.bmm(gs, g.transpose(1, 2)))
    return _cat0(parts)


def linear_weight_sandwich(ct, x, sigma, out_diag):
    """``J_W diag(σ) J_Wᵀ`` per sample for a Linear without extra positions, from O cotangent rows ``ct``
    ``[O, B, out]``: ``Σ_ij ct_oi ct_qi σ_ij x_j²`` -> ``[B, O, O]`` (or its diagonal ``[B, O]``).
    """
    s = torch.einsum("ij,bj->bi", sigma, x * x)
    if out_diag:
        return torch.einsum("obi,bi->bo", ct * ct, s)
    return torch.einsum("obi,qbi->boq", ct * s, ct)


def _promote(a, b):
    """Matmul operands as matrices (1-D operands get a unit axis) and how to undo it on the output."""
    squeeze = []
    if a.dim() == 1:
        a = a.unsqueeze(0)
        squeeze.append(-2)
    if b.dim() == 1:
        b = b.unsqueeze(-1)
        squeeze.append(-1)
    return a, b, squeeze


def _squeeze(t, squeeze):
    """Undo :func:`_promote` on a result: drop the unit axes the 1-D operands got."""
    if -1 in squeeze:
        t = t.squeeze(-1)
    if -2 in squeeze:
        t = t.squeeze(-1 if -1 in squeeze else -2)
    return t


def matmul_tangent(ta, tb, a, b, ps_a=False, ps_b=False):
    """Tangent of ``a @ b``: ``ta @ b + a @ tb`` on stacks (either tangent may be None)."""
    a2, b2, squeeze = _promote(a, b)
    rank = max(a2.dim(), b2.dim())
    out = None
    if ta is not None:
        ta2 = ta.unsqueeze(-2) if a.dim() == 1 else ta
        ta2 = _rt.align_ps(ta2, rank) if ps_a else _rt.align(ta2, rank)
        out = _rt.mm(ta2, b2)
    if tb is not None:
        tb2 = tb.unsqueeze(-1) if b.dim() == 1 else tb
        if ps_b and a2.dim() == 2:  # rows of a 2-D ``a`` are the samples, each with its own ``b``
            term = torch.einsum("bm,kbmp->kbp", a2, tb2)
        else:
            tb2 = _rt.align_ps(tb2, rank) if ps_b else _rt.align(tb2, rank)
            term = a2 @ tb2
        out = term if out is None else out + term
    out = _squeeze(out, squeeze)
    return out


def matmul_ct_left(ct, a, b, batch=None):
    """Cotangent of ``a`` in ``a @ b``: ``sum_to(ct @ bᵀ, a)`` (per-sample when ``batch`` is given)."""
    a2, b2, squeeze = _promote(a, b)
    if -1 in squeeze:
        ct = ct.unsqueeze(-1)
    if -2 in squeeze:
        ct = ct.unsqueeze(-2)
    c = _rt.mm(ct, b2.transpose(-1, -2))
    if batch is not None:
        return _rt.sum_to_ps(c, a2).reshape(c.shape[:2] + a.shape)
    return _rt.sum_to(c, a2).reshape((c.shape[0],) + a.shape)


def matmul_ct_right(ct, a, b, batch=None):
    """Cotangent of ``b`` in ``a @ b``: ``sum_to(aᵀ @ ct, b)`` (per-sample when ``batch`` is given)."""
    a2, b2, squeeze = _promote(a, b)
    if -1 in squeeze:
        ct = ct.unsqueeze(-1)
    if -2 in squeeze:
        ct = ct.unsqueeze(-2)
    if batch is not None and a.dim() == 2:
        # rows of a 2-D ``a`` are the samples: per-sample outer products, not one matrix product
        c = torch.einsum("kbp,bm->kbmp", ct, a2)
        return c.reshape(c.shape[:2] + b.shape)
    c = a2.transpose(-1, -2) @ ct
    if batch is not None:
        return _rt.sum_to_ps(c, b2).reshape(c.shape[:2] + b.shape)
    return _rt.sum_to(c, b2).reshape((c.shape[0],) + b.shape)


# --- rules -----------------------------------------------------------------------------------------------


@register(F.linear)
class Linear(Rule):
    """y = x Wᵀ + b; dy = dx Wᵀ + x dWᵀ + db, reusing the primal input for the weight terms."""

    batch_anywhere = True  # a sequence-first input's positions lead: per-sample terms move the batch first

    def signature(input, weight, bias=None):  # noqa: D103
        ...

    def jvp(self, e, site, tangents):  # noqa: D102
        x, w = site.args["input"], site.args["weight"]
        terms = []
        if tangents["input"] is not ZERO:
            terms.append(e(_rt.mm_t, tangents["input"], w))
        if tangents["weight"] is not ZERO:
            if "weight" in site.ps:
                terms.append(batch_back(e, site, e(linear_weight_tangent_ps, batch_first(e, site, x, 0),
                                                   tangents["weight"])))
            else:
                terms.append(e(linear_weight_tangent, x, tangents["weight"]))
        tb = tangents.get("bias", ZERO)
        if tb is not ZERO:
            if "bias" in site.ps:
                tb = batch_back(e, site, e(_rt.align_ps, tb, site.ndim()))
            else:
                tb = e(_rt.align, tb, site.ndim())
            terms.append(tb)
        out = e.sum(terms)
        if len(terms) == 1 and tb is not ZERO:
            out = e(_rt.expand_like, out, site.out)
        return out

    def vjp(self, e, site, ct):  # noqa: D102
        x, w, b = site.args["input"], site.args["weight"], site.args["bias"]
        out = {}
        if site.needs("input"):
            out["input"] = e(_rt.mm, ct, w)
        factor = site.extra.get("batch_factor", 1)
        merged = factor != 1 and bool(site.ps & {"weight", "bias"})
        ct_ps, x_ps = ct, x
        if site.ps & {"weight", "bias"}:
            ct_ps, x_ps = batch_first(e, site, ct), batch_first(e, site, x, 0)
        if merged:  # x.view(-1, d) before the Linear: each sample's rows contracted here, never per row
            ct_ps, x_ps = e(rows_by_sample, ct, factor, 1), e(rows_by_sample, x, factor, 0)
        if site.needs("weight"):
            if "weight" in site.ps:
                out["weight"] = e(linear_weight_ct_ps, ct_ps, x_ps)
            else:
                out["weight"] = e(linear_weight_ct, ct, x)
        if b is not None and site.needs("bias"):
            out["bias"] = e(_rt.sum_to_ps, ct_ps, b) if "bias" in site.ps else e(_rt.sum_to, ct, b)
        for name in (site.ps & {"weight", "bias"}) if merged else ():
            _rt.sum_rows_here(site, name)
        return out

    def param_reduce(self, e, site, name, ct, form, *args):
        """Parameter reductions for the weight of a Linear: ``form="gram_diag_into"`` (args: the flat block to
        write, weights, reduce_sum) or ``"sandwich"`` (args: σ shaped like W, out_diag). In closed form on
        ``[B, in]``; on ``[B, *, in]`` from per-sample cotangents formed sample-major and contracted at once.
        ``form="kron"`` (no args) hands back the factors of the per-sample cotangents for the product to contract
        itself (Note [Kronecker GGN] in fxjac/metric.py): ``(ct, x)`` for the weight (sample b, column k:
        ``ct_kb ⊗ x_b``), ``(ct, None)`` for the bias (``ct_kb``).
        """
        x = site.args["input"]
        if form == "kron":
            if site.val("input").dim() != 2 or "input" in site.ps:
                raise Decline
            return (ct, x if name == "weight" else None)
        if name != "weight" or form not in ("gram_diag_into", "sandwich"):
            raise Decline
        if site.val("input").dim() == 2:
            if form == "gram_diag_into":
                return e(linear_weight_gram_diag_into, *args[:1], ct, x, *args[1:])
            return e(linear_weight_sandwich, ct, x, *args)
        # positions share the weight: per-sample cotangents are formed, but sample-major and contracted at once
        if site.extra["batched"].get(x) != 0 or site.extra["out_batch_dim"] != 0:
            raise Decline
        if form == "gram_diag_into":
            return e(linear_weight_shared_gram_diag_into, *args[:1], ct, x, *args[1:])
        return e(linear_weight_shared_sandwich, ct, x, *args)

    def diag_jvp(self, e, site, tangents):  # noqa: D102
        """(A∘A) d: the jvp with the weight and the input squared."""
        if site.ps:
            raise Decline
        x, w = site.args["input"], site.args["weight"]
        terms = []
        if tangents["input"] is not ZERO:
            terms.append(e(_rt.mm_t, tangents["input"], e(torch.square, w)))
        if tangents["weight"] is not ZERO:
            terms.append(e(linear_weight_tangent, e(torch.square, x), tangents["weight"]))
        if tangents.get("bias", ZERO) is not ZERO:
            terms.append(e(_rt.align, tangents["bias"], site.ndim()))
        out = e.sum(terms)
        return ZERO if out is ZERO else e(_rt.expand_like, out, site.out)

    def diag_vjp(self, e, site, d):  # noqa: D102
        """(A∘A)ᵀ d: the vjp with the weight and the input squared."""
        x, w, b = site.args["input"], site.args["weight"], site.args["bias"]
        out = {}
        if site.needs("input"):
            out["input"] = e(_rt.mm, d, e(torch.square, w))
        if site.needs("weight"):
            if "weight" in site.ps:
                x2 = batch_first(e, site, e(torch.square, x), 0)
                out["weight"] = e(linear_weight_ct_ps, batch_first(e, site, d), x2)
            else:
                out["weight"] = e(linear_weight_ct, d, e(torch.square, x))
        if b is not None and site.needs("bias"):
            out["bias"] = e(_rt.sum_to_ps, batch_first(e, site, d), b) if "bias" in site.ps else e(_rt.sum_to, d, b)
        return out

    @staticmethod
    def diagonal_in_closed_form(node, param) -> bool:
        """Whether :meth:`param_reduce` (``"gram_diag_into"``) will take ``param`` at ``node``, known before the
        pass: it is the weight, of a call on ``[B, in]`` whose values lead with the batch (else the per-sample
        stacks go to the fallback), so its per-sample stacks are never formed.
        """
        args = node.args
        x = args[0] if args else None
        return len(args) > 1 and args[1] is param and isinstance(x, fx.Node) and \
            isinstance(x.meta.get("val"), torch.Tensor) and x.meta["val"].dim() == 2 and \
            x.meta.get("batch_dim", 0) == 0 and node.meta.get("batch_dim", 0) == 0

    def param_into(self, e, site, name, ct, block):
        """Write the weight's or the bias's cotangent, per-sample or summed as the site has it, straight into
        ``block``, a ``[rows, numel]`` view of a flat stack (Note [flat writes] in fxjac/assemble.py); returns the
        node of the written block.
        """
        per_sample = name in site.ps
        x = site.args["input"]
        if per_sample:
            ct, x = batch_first(e, site, ct), batch_first(e, site, x, 0)
        if name == "bias":
            return e(linear_bias_ct_into, block, ct, per_sample)
        if name != "weight" or (per_sample and site.args["input"] not in site.extra["batched"]):
            raise Decline
        return e(linear_weight_ct_into, block, ct, x, per_sample)


class _Matmul(Rule):
    """y = a @ b (broadcast batch axes, 1-D operands promoted); dy = da @ b + a @ db."""

    left, right = "input", "other"

    def _operands(self, site):
        """The operands ``(a, b)``: contiguous copies where the primal made them (:meth:`Matmul.primal`)."""
        saved = site.extra.get("saved", {}).get("operands", {})
        return tuple(saved.get(name, site.args[name]) for name in (self.left, self.right))

    def _sparse(self, site, left_moves: bool) -> bool:
        """Whether ``a`` is sparse (an adjacency built in forward: ``torch.bmm(A, h)``), which the dense products
        cannot multiply (``expand``): then only the dense ``b`` of as many axes (``mm``, ``bmm``) may carry a
        derivative (``left_moves``: ``a`` carries one), as :class:`SparseMm`; anything else goes to the fallback.
        """
        a, b = site.val(self.left), site.val(self.right)
        if not isinstance(a, torch.Tensor) or a.layout == torch.strided:
            return False
        if left_moves or site.ps or not isinstance(b, torch.Tensor) or \
                b.layout != torch.strided or a.dim() != b.dim():
            raise Decline
        return True

    def jvp(self, e, site, tangents):  # noqa: D102
        a, b = self._operands(site)
        ta, tb = tangents[self.left], tangents[self.right]
        if self._sparse(site, ta is not ZERO):
            return ZERO if tb is ZERO else e(sparse_left_tangent, a, tb)
        self._check_ps(site)
        return e(matmul_tangent, ta, tb, a, b, self.left in site.ps, self.right in site.ps)

    def _check_ps(self, site):
        """Per-sample stacks assume the batch leads the batched operand's broadcast axes, or is the row axis
        of a 2-D left operand; anything else goes to the fallback.
        """
        if self.left in site.ps and site.val(self.right).dim() < 3:
            raise Decline
        if self.right in site.ps and site.val(self.left).dim() == 1:
            raise Decline

    def vjp(self, e, site, ct):  # noqa: D102
        a, b = self._operands(site)
        if self._sparse(site, site.needs(self.left)):
            return {self.right: e(sparse_left_ct, a, ct)} if site.needs(self.right) else {}
        self._check_ps(site)
        out = {}
        if site.needs(self.left) and site.needs(self.right):
            ct = e.method("contiguous", ct)  # both products below would copy a strided cotangent to fold it
        if site.needs(self.left):
            out[self.left] = e(matmul_ct_left, ct, a, b, site.batch if self.left in site.ps else None)
        if site.needs(self.right):
            factor = site.extra.get("batch_factor", 1)
            if self.right in site.ps and factor != 1 and site.val(self.left).dim() == 2:
                # rows of ``a`` merged with the batch (GPT-2's Conv1D): each sample's rows contracted here
                ct_s, a_s = e(rows_by_sample, ct, factor, 1), e(rows_by_sample, a, factor, 0)
                out[self.right] = e(matmul_ct_right, ct_s, a_s, b, site.batch)
                _rt.sum_rows_here(site, self.right)
            else:
                out[self.right] = e(matmul_ct_right, ct, a, b, site.batch if self.right in site.ps else None)
        return out

    def diag_jvp(self, e, site, tangents):  # noqa: D102
        """(A∘A) d: the jvp with the other operand squared (see :meth:`diag_vjp`); both operands may carry one
        (attention's ``q @ kᵀ``).
        """
        if site.ps:
            raise Decline  # per-sample diagonals are not propagated forward
        a, b = self._operands(site)
        ta, tb = tangents[self.left], tangents[self.right]
        if self._sparse(site, ta is not ZERO):
            return ZERO if tb is ZERO else e(sparse_left_tangent, e(torch.square, a), tb)
        return e(matmul_tangent, ta, tb, a if tb is ZERO else e(torch.square, a),
                 b if ta is ZERO else e(torch.square, b))

    def diag_vjp(self, e, site, d):  # noqa: D102
        """(A∘A)ᵀ d: each entry of a @ b depends on a row of a through one product with b, so the squared
        Jacobian is the vjp's with the other operand squared.
        """
        a, b = self._operands(site)
        if self._sparse(site, site.needs(self.left)):
            return {self.right: e(sparse_left_ct, e(torch.square, a), d)} if site.needs(self.right) else {}
        self._check_ps(site)
        out = {}
        if site.needs(self.left):
            out[self.left] = e(matmul_ct_left, d, a, e(torch.square, b),
                               site.batch if self.left in site.ps else None)
        if site.needs(self.right):
            out[self.right] = e(matmul_ct_right, d, e(torch.square, a), b,
                                site.batch if self.right in site.ps else None)
        return out


# Note [contiguous matmul operands]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# ``torch.matmul`` folds batch axes into one batched GEMM, and copies an operand whose batch axes do not fold
# (attention's ``x.view(B, T, H, d).transpose(1, 2)``). Autograd saves that folded copy for its backward; the
# product graph multiplied the original views again, so the query, key and value of every attention layer were
# copied three times (once per product), and the strided output cotangent twice. Now the matmul rule emits its
# primal with such operands copied once (``contiguous``) and its derivatives read the copies; a cotangent needed
# by both operands' products is made contiguous once. The copies only move: the primal matmul no longer makes them.


def _copied_by_matmul(t, batch) -> bool:
    """Whether ``torch.matmul`` copies operand ``t`` (its propagated value, at least 3-D) to fold it for one batched
    GEMM: a view of a transpose over the batch axes (attention's heads, ``x.view(B, T, H, d).transpose(1, 2)``)
    does not fold. An operand broadcast over batch axes it lacks is left alone: copying it whole would cost more.
    """
    if tuple(t.shape[:-2]) != tuple(batch):
        return False
    try:
        s = t.view((-1,) + tuple(t.shape[-2:])).stride()
    except RuntimeError:
        return True
    return s[-1] != 1 and s[-2] != 1


@register(torch.matmul, operator.matmul, "matmul")
class Matmul(_Matmul):
    """y = a @ b."""

    def signature(input, other):  # noqa: D103
        ...

    def primal(self, e, site):
        """An operand that matmul would copy to fold its batch axes is copied once, before the primal call, and
        saved: the derivatives multiply it again (twice for a plain vjp), and each ``matmul`` on the original
        view would copy it again (Note [contiguous matmul operands]).
        """
        a, b = site.vals.get(self.left), site.vals.get(self.right)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or min(a.dim(), b.dim()) < 3:
            return None
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        saved = {name: e.method("contiguous", site.args[name]) for name, v in ((self.left, a), (self.right, b))
                 if _copied_by_matmul(v, batch)}
        if not saved:
            return None
        ops = [saved.get(name, site.args[name]) for name in (self.left, self.right)]
        return e(torch.matmul, *ops), {"operands": saved}


@register(torch.mm, "mm", torch.bmm, "bmm")
class Mm(_Matmul):
    """y = a @ b for ``mm`` and ``bmm`` (second argument ``mat2``)."""

    right = "mat2"

    def signature(input, mat2):  # noqa: D103
        ...


def sparse_left_tangent(a, t):
    """``a @ t_k`` for a sparse matrix ``a`` ``[N, M]`` and each column of a stack ``t`` ``[K, M, *p]`` -> ``[K, N,
    *p]``: the columns side by side, one sparse product (``torch.sparse.mm`` takes a dense matrix on the right); for
    a batch of sparse matrices ``[B, N, M]`` and ``t`` ``[K, B, M, *p]``, one ``bmm``.
    """
    if a.dim() == 3:
        k, b, m, rest = t.shape[0], t.shape[1], t.shape[2], tuple(t.shape[3:])
        wide = t.reshape(k, b, m, -1).permute(1, 2, 0, 3).reshape(b, m, -1)
        return torch.bmm(a, wide).reshape(b, a.shape[1], k, *rest).movedim(2, 0)
    k, m, rest = t.shape[0], t.shape[1], tuple(t.shape[2:])
    wide = t.reshape(k, m, -1).permute(1, 0, 2).reshape(m, -1)
    return torch.sparse.mm(a, wide).reshape(a.shape[0], k, *rest).movedim(1, 0)


def sparse_left_ct(a, ct):
    """``aᵀ @ ct_k`` for a sparse ``a``: the cotangent of the dense right operand."""
    return sparse_left_tangent(a.transpose(-2, -1), ct)


@register(torch.sparse.mm)
class SparseMm(Rule):
    """y = a @ b with a sparse ``a`` (a constant adjacency, a sparse operator) and a dense ``b``: dy = a db, and
    ``b``'s cotangent ``aᵀ ct``; a derivative through the sparse operand goes to the fallback.
    """

    diff = ("mat2",)
    # The batch lives in the dense operand's columns (the samples side by side), wherever it is: the constant
    # left operand never gets a derivative, so no per-sample stack is formed here.
    batch_anywhere = True

    def signature(mat1, mat2):  # noqa: D103
        ...

    def jvp(self, e, site, tangents):  # noqa: D102
        return e(sparse_left_tangent, site.args["mat1"], tangents["mat2"])

    def vjp(self, e, site, ct):  # noqa: D102
        return {"mat2": e(sparse_left_ct, site.args["mat1"], ct)} if site.needs("mat2") else {}

    def diag_jvp(self, e, site, tangents):  # noqa: D102
        return e(sparse_left_tangent, e(torch.square, site.args["mat1"]), tangents["mat2"])

    def diag_vjp(self, e, site, d):  # noqa: D102
        return {"mat2": e(sparse_left_ct, e(torch.square, site.args["mat1"]), d)} if site.needs("mat2") else {}


def affine_base(theta, size, align_corners):
    """``affine_grid``'s base grid ``[S, d + 1]``: each of the S positions' normalised coordinates and a 1, which
    the grid multiplies by θ (``grid[n, s, i] = Σ_k base[s, k] θ[n, i, k]``); ``size`` is ``[N, C, *spatial]``.
    """
    d = theta.shape[-2]
    eye = torch.eye(d, d + 1, dtype=theta.dtype, device=theta.device).unsqueeze(0)
    coords = F.affine_grid(eye, [1, 1, *size[2:]], align_corners=align_corners).reshape(-1, d)
    return torch.cat([coords, torch.ones_like(coords[:, :1])], -1)


def affine_grid_apply(t, base, grid):
    """A stack of θ tangents ``[K, N, d, d + 1]`` through affine_grid: ``[K, *grid.shape]``."""
    return torch.einsum("sk,bnik->bnsi", base, t).reshape((t.shape[0],) + tuple(grid.shape))


def affine_grid_transpose(ct, base):
    """The adjoint: grid cotangents ``[K, N, *spatial, d]`` to θ's ``[K, N, d, d + 1]``."""
    return torch.einsum("bnsi,sk->bnik", ct.flatten(2, -2), base)


@register(F.affine_grid)
class AffineGrid(Rule):
    """grid = base θᵀ per sample (a spatial transformer's sampling grid), linear in θ; the diagonals square the
    base coordinates. The fallback split the batch's size argument ``x.size()`` into samples as it was.
    """

    diff = ("theta",)

    def signature(theta, size, align_corners=None):  # noqa: D103
        ...

    @staticmethod
    def _base(e, site, square=False):
        if site.ps:
            raise Decline  # θ made from parameters alone, per sample: the fallback
        base = e(affine_base, site.args["theta"], site.args["size"], site.args["align_corners"])
        return e(torch.square, base) if square else base

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["theta"]
        return ZERO if t is ZERO else e(affine_grid_apply, t, self._base(e, site), site.out)

    def vjp(self, e, site, ct):  # noqa: D102
        return {"theta": e(affine_grid_transpose, ct, self._base(e, site))}

    def diag_jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["theta"]
        return ZERO if t is ZERO else e(affine_grid_apply, t, self._base(e, site, True), site.out)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return {"theta": e(affine_grid_transpose, d, self._base(e, site, True))}


def _einsum_parts(equation: str, n: int):
    eq = equation.replace(" ", "")
    if "->" in eq:
        lhs, rhs = eq.split("->")
    else:
        lhs = eq
        letters = [c for c in lhs if c.isalpha()]
        rhs = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    terms = lhs.split(",")
    if len(terms) != n:
        raise Decline
    used = set(eq)
    free = [c for c in string.ascii_letters if c not in used]
    return terms, rhs, free


def expand_summed(c, like, axes):
    """An operand's cotangent stack without its axes ``axes`` (indices summed in that operand only, along which every
    entry has the same derivative) broadcast back to ``[K, *like.shape]`` (``[K, B, *like.shape]`` per sample).
    """
    lead = c.dim() - (like.dim() - len(axes))
    for a in sorted(axes):
        c = c.unsqueeze(a + lead)
    return c.expand(tuple(c.shape[:lead]) + tuple(like.shape))


@register(torch.einsum)
class Einsum(Rule):
    """y = einsum(eq, *ops), any number of operands, linear in each: the tangent replaces one operand at a time;
    the cotangent of an operand is the einsum of the output cotangent with the others (broadcast along the indices
    summed in that operand only). A per-sample stack of an unbatched operand keeps the output's leading (batch)
    index.
    """

    signature = None

    @staticmethod
    def _operands(site):
        vals = [site.args[k] for k in sorted((k for k in site.args if k != "0"), key=int)]
        eq = site.args["0"]
        if len(vals) == 1 and isinstance(vals[0], (list, tuple)):
            return eq, list(vals[0]), "1", True
        return eq, vals, None, False

    @staticmethod
    def _batch(site, list_key, terms, rhs, i):
        """The batch index kept by operand ``i``'s per-sample stack, or ``""`` where it has none."""
        if not site.ps:
            return ""
        if list_key is not None:
            raise Decline  # which operand of the list is per-sample: the fallback's per-sample rule
        if str(i + 1) not in site.ps:
            return ""
        if not rhs[:1].isalpha() or rhs[0] in terms[i] or "..." in terms[i]:
            raise Decline  # the batch inside an ellipsis
        return rhs[0]

    def jvp(self, e, site, tangents):  # noqa: D102
        eq, ops, list_key, _ = self._operands(site)
        tans = tangents[list_key] if list_key else [tangents[str(i + 1)] for i in range(len(ops))]
        if tans is ZERO:
            return ZERO
        terms, rhs, free = _einsum_parts(eq, len(ops))
        z = free[0]
        out = []
        for i, t in enumerate(tans):
            if t is ZERO:
                continue
            ts = list(terms)
            ts[i] = z + self._batch(site, list_key, terms, rhs, i) + ts[i]
            args = list(ops)
            args[i] = t
            out.append(e(torch.einsum, f"{','.join(ts)}->{z}{rhs}", *args))
        return e.sum(out)

    def diag_jvp(self, e, site, tangents):
        """(A∘A) d: the jvp's einsum of each operand's diagonal with its partners' entries squared."""
        if site.ps:
            raise Decline  # per-sample diagonals are not propagated forward
        eq, ops, list_key, _ = self._operands(site)
        tans = tangents[list_key] if list_key else [tangents[str(i + 1)] for i in range(len(ops))]
        if tans is ZERO:
            return ZERO
        terms, rhs, free = _einsum_parts(eq, len(ops))
        z = free[0]
        out = []
        for i, t in enumerate(tans):
            if t is not ZERO:
                pterms, partners = self._partners(e, terms, rhs, ops, i, square=True)
                out.append(e(torch.einsum, f"{','.join([z + terms[i]] + pterms)}->{z}{rhs}", t, *partners))
        return e.sum(out)

    def vjp(self, e, site, ct):  # noqa: D102
        return self._pull(e, site, ct, square=False)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self._pull(e, site, d, square=True)

    @staticmethod
    def _partners(e, terms, rhs, ops, i, square):
        """The operands but ``i`` and their terms; with ``square``, the entries of ``∂y/∂ops[i]`` squared.

        An output entry depends on an entry of operand i through a sum over the partner indices in neither (``k``
        of x in ``ij,jk,kl->il``), and the square of a sum is not the sum of squares: the partners are contracted
        over those first, into one factor P, and the entries of P squared.
        """
        partners = [o for j, o in enumerate(ops) if j != i]
        pterms = [t for j, t in enumerate(terms) if j != i]
        if not square:
            return pterms, partners
        summed = {c for t in pterms for c in t if c.isalpha() and c not in terms[i] + rhs}
        if summed:
            if any("..." in t for t in pterms):
                raise Decline
            kept = "".join(dict.fromkeys(c for t in pterms for c in t if c not in summed))
            partners, pterms = [e(torch.einsum, f"{','.join(pterms)}->{kept}", *partners)], [kept]
        return pterms, [e(torch.square, o) if isinstance(o, torch.fx.Node) else o ** 2 for o in partners]

    def _pull(self, e, site, ct, square):
        eq, ops, list_key, _ = self._operands(site)
        terms, rhs, free = _einsum_parts(eq, len(ops))
        z = free[0]
        cts = []
        for i, op in enumerate(ops):
            if not isinstance(op, torch.fx.Node):
                cts.append(ZERO)
                continue
            ti = terms[i]
            letters = [c for c in ti if c.isalpha()]
            others = "".join(terms[:i] + terms[i + 1:]) + rhs
            if len(set(letters)) != len(letters):
                raise Decline  # a diagonal: the transpose is not one einsum
            alone = [k for k, c in enumerate(ti) if c.isalpha() and c not in others]
            if alone and "..." in ti:
                raise Decline
            pterms, partners = self._partners(e, terms, rhs, ops, i, square)
            ts = [z + rhs] + pterms
            batch = self._batch(site, list_key, terms, rhs, i)
            target = "".join(c for k, c in enumerate(ti) if k not in alone)
            c = e(torch.einsum, f"{','.join(ts)}->{z}{batch}{target}", ct, *partners)
            if alone:
                c = e(expand_summed, c, op, alone)
            elif "..." in ti:
                c = e(_rt.sum_to, c, op)
            cts.append(c)
        if list_key:
            return {list_key: cts}
        return {str(i + 1): c for i, c in enumerate(cts)}


def outer_tangent(ta, tb, a, b, ps_b=False):
    """Tangent of ``outer(a, b) = a bᵀ``: ``ta bᵀ + a tbᵀ`` on stacks ``[K, M]`` and ``[K, N]`` (None: no tangent);
    ``ps_b``: ``tb`` is a per-sample stack ``[K, B, N]`` of an unbatched ``b`` against a batch ``a`` of B numbers.
    """
    out = None if ta is None else ta.unsqueeze(-1) * b
    if tb is not None:
        term = a.unsqueeze(-1) * (tb if ps_b else tb.unsqueeze(-2))
        out = term if out is None else out + term
    return out


@register(torch.outer, "outer", torch.ger, "ger")
class Outer(SquaredPush):
    """y = outer(a, b) = a bᵀ (ger: the same); the cotangents are ``C b`` and ``Cᵀ a``, the diagonal ones ``D b²``
    and ``Dᵀ a²`` (each entry of y holds one product). Against a batch ``a`` of B numbers, ``b``'s per-sample
    cotangents are the rows ``a_b C_b``.
    """

    diff = ("input", "vec2")

    def signature(input, vec2):  # noqa: D103
        ...

    @staticmethod
    def _check(site):
        if "input" in site.ps:
            raise Decline  # the batch on the output's second axis

    def _push(self, e, site, tangents, square):
        """The tangent, or (``square``) the forward diagonal: each entry of y holds one product, so the jvp with
        both operands squared.
        """
        ta, tb = tangents.get("input", ZERO), tangents.get("vec2", ZERO)
        if ta is ZERO and tb is ZERO:
            return ZERO
        self._check(site)
        a, b = site.args["input"], site.args["vec2"]
        if square:
            a, b = e(torch.square, a), e(torch.square, b)
        return e(outer_tangent, ta, tb, a, b, "vec2" in site.ps)

    def vjp(self, e, site, ct):  # noqa: D102
        return self._pull(e, site, ct, square=False)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self._pull(e, site, d, square=True)

    def _pull(self, e, site, ct, square):
        self._check(site)
        a, b = site.args["input"], site.args["vec2"]
        if square:
            a, b = e(torch.square, a), e(torch.square, b)
        out = {}
        if isinstance(site.args["input"], fx.Node) and site.needs("input"):
            out["input"] = e(torch.matmul, ct, b)
        if isinstance(site.args["vec2"], fx.Node) and site.needs("vec2"):
            per_sample = "vec2" in site.ps
            out["vec2"] = e(operator.mul, ct, e.method("unsqueeze", a, -1)) if per_sample else e(torch.matmul, a, ct)
        return out


def bilinear_tangent(t1, t2, tw, x1, x2, w):
    """Tangent of ``F.bilinear`` without bias: the three product-rule terms as einsums."""
    out = None
    if t1 is not None:
        out = torch.einsum("k...i,...oi->k...o", t1, torch.einsum("oij,...j->...oi", w, x2))
    if t2 is not None:
        term = torch.einsum("...oj,k...j->k...o", torch.einsum("...i,oij->...oj", x1, w), t2)
        out = term if out is None else out + term
    if tw is not None:
        term = torch.einsum("k...oj,...j->k...o", torch.einsum("...i,koij->k...oj", x1, tw), x2)
        out = term if out is None else out + term
    return out


@register(F.bilinear)
class Bilinear(Rule):
    """y_o = x1ᵀ W_o x2 + b_o; linear in each of x1, x2, W."""

    def signature(input1, input2, weight, bias=None):  # noqa: D103
        ...

    def jvp(self, e, site, tangents):  # noqa: D102
        if site.ps:
            raise Decline
        x1, x2, w = site.args["input1"], site.args["input2"], site.args["weight"]
        t1, t2, tw = tangents["input1"], tangents["input2"], tangents["weight"]
        out = ZERO
        if not (t1 is ZERO and t2 is ZERO and tw is ZERO):
            out = e(bilinear_tangent, t1, t2, tw, x1, x2, w)
        tb = tangents.get("bias", ZERO)
        if tb is not ZERO:
            tb = e(_rt.expand_like, tb, site.out)
            out = e.add(out, tb)
        return out

    def vjp(self, e, site, ct):  # noqa: D102
        x1, x2, w, b = (site.args[k] for k in ("input1", "input2", "weight", "bias"))
        out = {}
        if site.needs("input1"):
            out["input1"] = e(torch.einsum, "k...o,oij,...j->k...i", ct, w, x2)
        if site.needs("input2"):
            out["input2"] = e(torch.einsum, "k...o,...i,oij->k...j", ct, x1, w)
        return self._weight_and_bias(e, site, ct, x1, x2, out)

    def diag_vjp(self, e, site, d):  # noqa: D102
        """(A∘A)ᵀ d: for x1 the per-sample Jacobian Σ_j W_oij x2_j is formed and squared (a sum inside)."""
        x1, x2, w, b = (site.args[k] for k in ("input1", "input2", "weight", "bias"))
        out = {}
        if site.needs("input1"):
            a1 = e(torch.einsum, "oij,...j->...oi", w, x2)
            out["input1"] = e(torch.einsum, "k...o,...oi->k...i", d, e(torch.square, a1))
        if site.needs("input2"):
            a2 = e(torch.einsum, "...i,oij->...oj", x1, w)
            out["input2"] = e(torch.einsum, "k...o,...oj->k...j", d, e(torch.square, a2))
        if site.needs("weight"):
            x1, x2 = e(torch.square, x1), e(torch.square, x2)
        return self._weight_and_bias(e, site, d, x1, x2, out)

    @staticmethod
    def _weight_and_bias(e, site, ct, x1, x2, out):
        """The weight's (summed or per-sample) and the bias's parts: ``ct ⊗ x1 ⊗ x2`` and ``ct`` summed; the
        diagonal rule passes squared inputs (each weight entry meets one product ``x1_i x2_j``).
        """
        b = site.args["bias"]
        if site.needs("weight"):
            if "weight" in site.ps:
                out["weight"] = e(torch.einsum, "kb...o,b...i,b...j->kboij", ct, x1, x2)
            else:
                out["weight"] = e(torch.einsum, "k...o,...i,...j->koij", ct, x1, x2)
        if b is not None and site.needs("bias"):
            out["bias"] = e(_rt.sum_to_ps, ct, b) if "bias" in site.ps else e(_rt.sum_to, ct, b)
        return out


@decomposes(torch.addmm)
def addmm(input, mat1, mat2, *, beta=1, alpha=1):
    """``beta·input + alpha·(mat1 @ mat2)`` (GPT-2's ``Conv1D``) as a matmul and an addition, which have rules.
    With ``beta=0`` ATen ignores ``input`` (the ``torch.empty`` bias pattern: its inf and NaN stay out).
    """
    out = mat1 @ mat2
    if alpha != 1:
        out = out * alpha
    if isinstance(beta, (int, float)) and beta == 0:
        return out
    return out + (input if beta == 1 else input * beta)


@decomposes(torch.baddbmm)
def baddbmm(input, batch1, batch2, *, beta=1, alpha=1):
    """``beta·input + alpha·(batch1 @ batch2)``, batched."""
    return addmm(input, batch1, batch2, beta=beta, alpha=alpha)

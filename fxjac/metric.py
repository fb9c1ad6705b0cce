"""The metric products: ``jtmjp`` (Jᵀ M J), ``jmjtp`` (J M Jᵀ) and ``ggn`` (Jᵀ H_loss J).

Note [metric factors]
    Exact metric products never form J. The metric is written as ``M = Σ_k λ_k s_k s_kᵀ`` — identity: unit
    columns; diagonal: unit columns weighted by its entries; a square root: its columns; full: its symmetric
    eigendecomposition, so an indefinite M works too — and the K columns travel through the graph as one stack.
    For parameters, the backward pass gives per-sample, per-column cotangents one parameter tensor at a time
    (``[K, B, n_p]``); each is reduced to the requested structure at once (diagonal: weighted squares; block: a
    Gram matrix per module), so only the full result ever needs all parameters together.

Note [Kronecker GGN]
    The full (or block) result summed over the batch is ``Σ_kb w_kb r_kb r_kbᵀ`` over per-sample rows ``r_kb``
    (``[K, B, P]``: K·B·P² multiply-adds). For a Linear on ``[B, in]`` read once, the rows factor: the weight's is
    ``g_kb ⊗ x_b`` and the bias's ``g_kb`` (g the cotangent ``[K, B, out]`` at the layer's output, x its input).
    The block between two such weights is then ``Σ_b (x_ℓb x_mbᵀ) ⊗ H_b`` with ``H_b = Σ_k w_kb g_ℓkb g_mkbᵀ``:
    one GEMM contracting the batch alone (B·P_ℓ·P_m) and one permuted copy into the flat layout; blocks with a
    bias contract H with one input or none. Only blocks ℓ <= m are formed, the others mirrored. The rule hands
    over the factors (``param_reduce`` form ``"kron"``) instead of per-sample cotangents; every other parameter
    keeps its rows, and its band of the result (against all parameters, the Linear ones' rows formed from their
    factors) is one Gram product.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch

from passes import ZERO, backward_cotangents, forward_tangents
from passes.protocol import Decline

from . import assemble as A
from . import checks
from .direction import _options, _reduce, add_all, through_chunks
from .errors import OptionError
from .losses import LOSSES, factor_width, loss_factor, loss_options
from .product import Product, make_product
from .rules import _rt
from .rules._rt import records_grad

_MATRICES = ("identity", "diag", "full", "sqrt", "block")


# --- run-time kernels ------------------------------------------------------------------------------------


def eigen_stack(m, like):
    """A symmetric per-sample ``[B, N, N]`` as (columns ``[N, *like.shape]``, weights ``[N, B]``). A sample with
    a NaN or infinity (where LAPACK's eigh fails) gets NaN weights: its result is NaN, as autograd's would be.
    """
    finite = torch.isfinite(m).all(-1).all(-1)
    dtype = m.dtype
    if dtype in (torch.float16, torch.bfloat16):  # LAPACK (and cuSOLVER) have no half precision: factor in float32
        m = m.float()
    lam, vec = torch.linalg.eigh(torch.where(finite[:, None, None], m, torch.zeros((), dtype=m.dtype, device=m.device)))
    lam, vec = lam.to(dtype), vec.to(dtype)
    lam = torch.where(finite[:, None], lam, torch.full((), math.nan, dtype=lam.dtype, device=lam.device))
    return vec.permute(2, 0, 1).reshape((m.shape[-1],) + tuple(like.shape)), lam.t()


def diag_weights(d):
    """A per-sample diagonal ``[B, N]`` as column weights ``[N, B]``."""
    return d.reshape(d.shape[0], math.prod(d.shape[1:])).t()


def gram(c, w, reduce_sum):
    """``Σ_k w_kb c_kb c_kbᵀ``: ``[K, B, N]`` -> ``[N, N]`` (summed over b) or ``[B, N, N]``."""
    cw = c if w is None else c * w.unsqueeze(-1).to(c.dtype)  # (Note [mixed dtypes]: w in the space's dtype)
    return torch.einsum("kbi,kbj->ij" if reduce_sum else "kbi,kbj->bij", cw, c)


def gram_diag(c, w, reduce_sum):
    """The diagonal of :func:`gram`: ``[N]`` or ``[B, N]``."""
    sq = c * c
    if w is not None:
        sq = sq * w.unsqueeze(-1)
    return sq.sum((0, 1)) if reduce_sum else sq.sum(0)


def kron_rows(g, x):
    """A Linear parameter's rows from its factors (Note [Kronecker GGN]): ``g ⊗ x`` ``[K, B, out*in]`` for the
    weight, ``g`` for the bias (``x`` None).
    """
    if x is None:
        return g
    return torch.einsum("kbo,bi->kboi", g, x).reshape(g.shape[0], g.shape[1], g.shape[2] * x.shape[1])


def kron_pair(ga, gc, w):
    """``H_b = Σ_k w_kb ga_kb gc_kbᵀ``: ``[K, B, O]``, ``[K, B, Q]`` -> ``[B, O, Q]``."""
    gw = ga if w is None else ga * w.unsqueeze(-1)
    return torch.bmm(gw.permute(1, 2, 0), gc.transpose(0, 1))


def kron_block(h, xa, xc):
    """The block between two Linear parameters (Note [Kronecker GGN]) from their ``H`` ``[B, O, Q]`` and inputs
    (``None`` for a bias): ``[O, I, Q, J]``, ``[O, I, Q]``, ``[O, Q, J]`` or ``[O, Q]``, the flat layout's order.
    """
    batch, o, q = h.shape
    if xa is not None and xc is not None:
        i, j = xa.shape[1], xc.shape[1]
        xx = (xa.unsqueeze(2) * xc.unsqueeze(1)).reshape(batch, i * j)
        return torch.mm(h.reshape(batch, o * q).t(), xx).view(o, q, i, j).permute(0, 2, 1, 3)
    if xa is not None:
        return torch.einsum("boq,bi->oiq", h, xa)
    if xc is not None:
        return torch.einsum("boq,bj->oqj", h, xc)
    return h.sum(0)


def kron_pays(k, batch, o, q, i, j):
    """Whether two Linear layers (outputs o, q; inputs i, j, 1 for a bias alone) take the Kronecker form:
    its intermediates (``H`` ``[B, o, q]``, ``x ⊗ x`` ``[B, i, j]``) are no larger than their block of the
    result or than the rows the generic form needs.
    """
    return batch * (o * q + i * j) <= max(o * q * i * j, k * batch * (o * i + q * j))


def wgram(ra, rc, w):
    """``Σ_kb w_kb ra_kb rc_kbᵀ``: ``[K, B, N]``, ``[K, B, M]`` -> ``[N, M]``."""
    return torch.einsum("kbi,kbj->ij", ra if w is None else ra * w.unsqueeze(-1).to(ra.dtype), rc)


def _spec_of(text: str) -> tuple:
    """:func:`kron_gram`'s ``spec`` from its text in the custom op's schema (``"w,0,1;b,0,"``)."""
    return tuple((kind, int(i), int(j) if j else None) for kind, i, j in (p.split(",") for p in text.split(";")))


def _kron_sizes(spec, gs, xs, rows) -> list:
    return [rows[i].shape[-1] if kind == "rows" else gs[i].shape[-1] * (1 if j is None else xs[j].shape[1])
            for kind, i, j in spec]


def kron_gram(spec, gs, xs, rows, w):
    """:func:`gram` summed over the batch, ``[N, N]``, for parameters (in ``spec`` order) some of which are a
    Linear's (Note [Kronecker GGN]): ``("w", i, j)`` the weight with factors ``gs[i]`` ``[K, B, out]`` and
    ``xs[j]`` ``[B, in]``, ``("b", i, None)`` the bias with ``gs[i]``, ``("rows", i, None)`` any parameter with
    rows ``rows[i]`` ``[K, B, n]``. The blocks are written into the result; under torch.compile this is one
    custom op (Note [eager kernels under torch.compile] in fxjac/rules/_rt.py): inductor's own code for the
    blocks' writes and permuted copies was up to 1.5x slower.
    """
    if torch.compiler.is_compiling() and not records_grad(*gs, *xs, *rows, w):
        spec_str = ";".join(f"{kind},{i},{'' if j is None else j}" for kind, i, j in spec)
        return _kron_gram_op(spec_str, list(gs), list(xs), list(rows), w)
    return _kron_gram(spec, gs, xs, rows, w)


def _kron_gram_like(spec, gs, xs, rows, w):
    n = sum(_kron_sizes(_spec_of(spec), gs, xs, rows))
    return gs[0].new_empty((n, n))


@_rt.opaque_op(_kron_gram_like)
def _kron_gram_op(spec: str, gs: list[torch.Tensor], xs: list[torch.Tensor], rows: list[torch.Tensor],
                  w: Optional[torch.Tensor]) -> torch.Tensor:
    return _kron_gram(_spec_of(spec), gs, xs, rows, w)


def _kron_gram(spec, gs, xs, rows, w):
    k, batch = gs[0].shape[:2]
    made: dict = {}

    def x_of(a):
        return None if spec[a][2] is None else xs[spec[a][2]]

    def rows_at(a):
        kind, i, _ = spec[a]
        if a not in made:
            made[a] = rows[i] if kind == "rows" else kron_rows(gs[i], x_of(a))
        return made[a]

    sizes = _kron_sizes(spec, gs, xs, rows)
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    n = len(spec)
    other = [a for a, s in enumerate(spec) if s[0] == "rows"]
    bands = {}
    if other:  # their bands against every parameter: one Gram product
        band = wgram(cat_rows([rows_at(a) for a in other]), cat_rows([rows_at(a) for a in range(n)]), w)
        lo = 0
        for a in other:
            bands[a] = band[lo:lo + sizes[a]]
            lo += sizes[a]
    hs: dict = {}

    def block(a, c):
        """Block (a, c) of two Linear parameters, a <= c, in a shape that reshapes to ``[n_a, n_c]``."""
        xa, xc = x_of(a), x_of(c)
        i, j = (1 if x is None else x.shape[1] for x in (xa, xc))
        ga, gc = gs[spec[a][1]], gs[spec[c][1]]
        key = (spec[a][1], spec[c][1])
        if key not in hs and not kron_pays(k, batch, ga.shape[-1], gc.shape[-1], i, j):
            return wgram(rows_at(a), rows_at(c), w)
        if key not in hs:
            hs[key] = kron_pair(ga, gc, w)
        return kron_block(hs[key], xa, xc)

    out = gs[0].new_empty((offs[-1], offs[-1]))
    for a, part in bands.items():
        out[:, offs[a]:offs[a + 1]].copy_(part.t())
        out[offs[a]:offs[a + 1]].copy_(part)
    linear = [a for a in range(n) if a not in bands]
    for m, a in enumerate(linear):
        for c in linear[m:]:
            t = block(a, c)
            blk = out[offs[a]:offs[a + 1], offs[c]:offs[c + 1]]
            blk.view(t.shape).copy_(t)
            if c != a:
                out[offs[c]:offs[c + 1], offs[a]:offs[a + 1]].copy_(blk.t())
    return out


def per_sample_rows(ct, k, batch):
    """A parameter's per-sample stack ``[K*B, *shape]`` as ``[K, B, n]``."""
    return ct.reshape(k, batch, math.prod(ct.shape[1:]))


def batched_rows(ct, k):
    """A batched stack ``[K, B, *s]`` as ``[K, B, n]``."""
    return ct.reshape(k, ct.shape[1], math.prod(ct.shape[2:]))


def zeros_rows(like, k, batch, n):
    """Zero per-sample rows ``[K, B, n]`` (a parameter the output does not depend on)."""
    return like.new_zeros((k, batch, n))


def cat_rows(parts):
    """Concatenate ``[K, B, n_i]`` pieces along the last axis."""
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


# Two operands per einsum, as in rules/linear.py: three or more run opt_einsum's path search at every call.


def sandwich(g, sigma, g2=None):
    """``Σ_pq G[o,b,p] Σ[p,q] G[o',b,q]`` -> ``[B, O, O]`` (Σ in G's dtype: rows of parameters of several dtypes
    are promoted, Note [mixed dtypes] in passes/builder.py).
    """
    return torch.einsum("obq,rbq->bor", g @ sigma.to(g.dtype), g if g2 is None else g2)


def sandwich_diag(g, sigma):
    """The diagonal of :func:`sandwich`: ``[B, O]``."""
    return torch.einsum("obq,obq->bo", g @ sigma.to(g.dtype), g)


def weighted_outer(g, sigma_diag):
    """``Σ_p G[o,b,p] σ_p G[o',b,p]`` -> ``[B, O, O]``."""
    return torch.einsum("obp,rbp->bor", g * sigma_diag, g)


def weighted_outer_diag(g, sigma_diag):
    """The diagonal of :func:`weighted_outer`: ``[B, O]``."""
    return torch.einsum("obp,p->bo", g * g, sigma_diag)


def project(g, s):
    """``G S``: ``[O, B, n]``, ``[n, K]`` -> ``[O, B, K]``."""
    return torch.einsum("obp,pk->obk", g, s)


def outer_cols(t, w, out_diag):
    """``Σ_k w_k t_k t_kᵀ`` per sample from columns ``[K, B, O]``: ``[B, O, O]``, or its diagonal ``[B, O]``."""
    tw = t if w is None else t * w.unsqueeze(-1)
    if out_diag:
        return (tw * t).sum(0)
    return torch.einsum("kbo,kbq->boq", tw, t)


def rows_outer(a, out_diag):
    """``A Aᵀ`` per sample for rows ``[O, B, K]``: ``[B, O, O]`` or its diagonal."""
    if out_diag:
        return (a * a).sum(-1).t()
    return torch.einsum("obk,qbk->boq", a, a)


def jac_sandwich(j, m, kind, out_diag):
    """``J M Jᵀ`` per sample from rows ``J`` ``[O, B, I]`` and a per-sample M (full ``[B, I, I]``, diagonal
    ``[B, I]``, square root ``[B, I, K]`` or ``None`` for the identity).
    """
    if kind == "identity":
        return rows_outer(j, out_diag)
    if kind == "diag":
        d = m.reshape(m.shape[0], math.prod(m.shape[1:]))
        if out_diag:
            return torch.einsum("obi,bi->bo", j * j, d)
        return torch.einsum("obi,qbi->boq", j * d, j)
    if kind == "sqrt":
        return rows_outer(torch.einsum("obi,bik->obk", j, m), out_diag)
    if out_diag:
        return torch.einsum("obj,obj->bo", torch.einsum("obi,bij->obj", j, m), j)
    return torch.einsum("obj,qbj->boq", torch.einsum("obi,bij->obj", j, m), j)


# --- option checks ---------------------------------------------------------------------------------------


def _check_options(product, wrt_kind, matrix, out, method):
    if matrix not in _MATRICES:
        raise OptionError(f"matrix must be one of {_MATRICES}, got {matrix!r}")
    outs = ("full", "diag", "block") if (product == "jtmjp" and wrt_kind == "params") else ("full", "diag")
    if out not in outs:
        raise OptionError(f"out={out!r} is not available here; choose one of {outs}")
    if matrix == "block" and wrt_kind == "input":
        raise OptionError("matrix='block' is for parameters; w.r.t. the input use full, diag, sqrt or identity")
    if matrix == "block" and product == "jtmjp":
        raise OptionError("jtmjp's M lives in output space: use full, diag, sqrt or identity")
    if method not in ("exact", "diag_backprop"):
        raise OptionError(f"method must be 'exact' or 'diag_backprop', got {method!r}")
    if method == "diag_backprop" and (out != "diag" or matrix not in ("diag", "identity")):
        raise OptionError("method='diag_backprop' propagates diagonals only: it needs out='diag' and a 'diag' "
                          "or 'identity' matrix")


def _wrt_kind(wrt) -> str:
    return "input" if isinstance(wrt, str) and wrt.startswith("input") else "params"


# --- J^T M J ---------------------------------------------------------------------------------------------


def _output_columns(e, src, b, y, matrix, m):
    """Seed columns for an output-space metric: (stack ``[K, *y.shape]``, weights ``[K, B]`` or None, K)."""
    n_out = A.numel_per_sample(src.output)
    batch = A.size(e, y, 0)
    if matrix == "identity":
        return e(A.eye_stack, y, n_out), None, n_out
    if matrix == "diag":
        m = e(checks.check_shape, m, (batch, n_out), y, "M")
        return e(A.eye_stack, y, n_out), e(diag_weights, m), n_out
    if matrix == "sqrt":
        m = e(checks.check_shape, m, (batch, n_out, -1), y, "M")
        return e(A.stack_to_shape, m, y), None, e.method("size", m, 2)
    m = e(checks.check_shape, m, (batch, n_out, n_out), y, "M")
    m = e(checks.check_symmetric, m, "M")
    pair = e(eigen_stack, m, y)
    return e(operator.getitem, pair, 0), e(operator.getitem, pair, 1), n_out


def _reduce_params(e, src, cts, k, batch, y, w, out, reduce_sum, direct):
    """Per-parameter per-sample rows -> blocks or the full ``[P, P]`` (``direct`` holds the factors of the Linear
    parameters a rule reduced in closed form; the diagonal is :func:`_diag_stack`).
    """
    rows_of = _rows_by_param(e, src, cts, y, k, batch)
    if out == "block":
        return [_gram_of(e, [p for p in src.params if p.module == module], rows_of, w, reduce_sum, direct)
                for module in _modules(src)]
    return _gram_of(e, src.params, rows_of, w, reduce_sum, direct)


def _gram_of(e, params, rows_of, w, reduce_sum, direct):
    """The Gram matrix over ``params``: in closed form for the Linear parameters whose factors are in ``direct``
    (Note [Kronecker GGN]), from per-sample rows for the others.
    """
    if not any(p.name in direct for p in params):
        return e(gram, e(cat_rows, [rows_of(p) for p in params]), w, reduce_sum)
    spec, gs, xs, rows = [], [], [], []

    def index(items, node):  # by identity: two layers summed share their output cotangent's node
        i = next((n for n, h in enumerate(items) if h is node), None)
        if i is None:
            items.append(node)
            i = len(items) - 1
        return i

    for p in params:
        if p.name not in direct:
            spec.append(("rows", len(rows), None))
            rows.append(rows_of(p))
            continue
        g, x = direct[p.name]
        spec.append(("b", index(gs, g), None) if x is None else ("w", index(gs, g), index(xs, x)))
    return e(kron_gram, tuple(spec), gs, xs, rows, w)


def _rows_by_param(e, src, cts: dict, y, k, batch):
    """``rows_of(info)``: a parameter's per-sample rows ``[K, B, n]``, its get_attr nodes' cotangents summed (a
    tied parameter has several), zeros where the output does not depend on it.
    """
    rows: dict = {}
    for node, ct in cts.items():
        info = src.param_nodes.get(node)
        if info is not None and ct is not ZERO:
            rows[info.name] = e.add(rows.get(info.name, ZERO), ct)

    def rows_of(info):
        c = rows.get(info.name, ZERO)
        if c is ZERO:
            return e(zeros_rows, y, k, batch, info.numel)
        return e(per_sample_rows, c, k, batch)

    return rows_of


def _modules(src) -> list:
    seen = []
    for p in src.params:
        if p.module not in seen:
            seen.append(p.module)
    return seen


def _diag_backprop_seed(e, src, y, matrix, m):
    n_out = A.numel_per_sample(src.output)
    if matrix == "identity":
        return e.method("unsqueeze", e(torch.ones_like, y), 0)
    m = e(checks.check_shape, m, (A.size(e, y, 0), n_out), y, "M")
    return e.method("unsqueeze", e(A.reshape_like_batch, m, y), 0)


def _backward_metric(src, b, e, y, seeds, w, k, out, reduce_sum, method):
    """Run the backward pass from output columns and reduce to the requested structure."""
    batch = A.size(e, y, 0)
    if w is not None:  # the output's weights meet the cotangents in the wrt space (Note [mixed dtypes])
        w = A.in_dtype(e, src, w, A.space_like(b, src))
    if src.wrt_kind == "input":
        x_old = src.inputs[src.wrt_index]
        x = b.env[x_old]
        cts = backward_cotangents(b, {src.output: seeds}, [x_old], method=_method(method))
        ct = cts.get(x_old, ZERO)
        n_in = A.numel_per_sample(x_old)
        if ct is ZERO:
            ct = e(A.zeros_stack, x, k)
        c = e(batched_rows, ct, k)
        if method == "diag_backprop":
            return e(operator.getitem, c, 0)
        if out == "diag":
            return e(gram_diag, c, w, False)
        del n_in
        return e(gram, c, w, False)
    ps = not reduce_sum or method != "diag_backprop"
    direct: dict = {}
    sinks, stack = None, None
    closed = not A.mixed_dtypes(src)  # the rules' closed forms take operands of one dtype (Note [mixed dtypes])
    if method == "exact" and out == "diag":  # the diagonal written once into its flat stack (Note [flat writes])
        stack = e(A.flat_empty, 1 if reduce_sum else batch, src.P, A.param_like(b, src))
        sinks = _sink(src, direct, "gram_diag_into", lambda info: (w, reduce_sum), stack) if closed else None
    elif method == "exact" and reduce_sum and closed:
        sinks = _sink(src, direct, "kron", lambda info: ())
    early = None
    if method == "exact" and out == "diag":
        early = _early_diag(src, direct, k, batch, w, reduce_sum, stack)
    cts = backward_cotangents(b, {src.output: seeds}, list(src.param_nodes), ps=ps, method=_method(method),
                              sinks=sinks, reduce=early)
    if method == "diag_backprop":
        rows = e(operator.mul, k, batch) if ps else k
        flat = A.param_results(e, src, cts, rows, A.param_like(b, src))
        return flat if ps else e.method("squeeze", flat, 0)
    if stack is not None:
        return _diag_stack(e, src, cts, k, batch, y, w, reduce_sum, direct, stack)
    return _reduce_params(e, src, cts, k, batch, y, w, out, reduce_sum, direct)


def _diag_stack(e, src, cts, k, batch, y, w, reduce_sum, direct, stack):
    """The diagonal ``[P]`` (per sample ``[B, P]``) in its flat stack: blocks ``direct`` holds are written; the
    others' diagonals are formed from their rows and stored.
    """
    rows_of = _rows_by_param(e, src, cts, y, k, batch)
    for p in src.params:
        if p.name not in direct:
            block = e(A.flat_block, stack, p.offset, p.numel)
            direct[p.name] = e(A.flat_store, block, e(gram_diag, rows_of(p), w, reduce_sum))
    flat = e(A.flat_done, stack, *(direct[p.name] for p in src.params))
    return e.method("squeeze", flat, 0) if reduce_sum else flat


def _early_diag(src, direct: dict, k, batch, w, reduce_sum, stack=None):
    """Reduce a parameter's per-sample cotangents to its diagonal as soon as they are complete (parameters
    read at one place only; a tied one needs its contributions summed first), stored in its block of ``stack``
    when given.
    """
    uses = A.param_uses(src)

    def reduce(e, node, ct):
        info = src.param_nodes.get(node)
        if info is None or uses[info.name] != 1:
            return ct
        d = e(gram_diag, e(per_sample_rows, ct, k, batch), w, reduce_sum)
        if stack is not None:
            d = e(A.flat_store, e(A.flat_block, stack, info.offset, info.numel), d)
        direct[info.name] = d
        return ZERO

    return reduce


def _sink(src, direct: dict, form: str, args_of, stack=None):
    """A backward-pass sink that lets a rule reduce a parameter's per-sample cotangents in closed form
    (``rule.param_reduce``), for parameters read at exactly one place; results land in ``direct``. With
    ``stack`` (form ``"gram_diag_into"``) the rule writes into the parameter's block of it.
    """
    uses = A.param_uses(src)

    def sink(e, rule, site, name, ct, node):
        info = src.param_nodes.get(node)
        reduce = getattr(rule, "param_reduce", None)
        if info is None or reduce is None or uses[info.name] != 1:
            return False
        block = None if stack is None else e(A.flat_block, stack, info.offset, info.numel)
        try:
            direct[info.name] = reduce(e, site, name, ct, form, *(() if block is None else (block,)), *args_of(info))
        except Decline:
            if block is not None:
                e.graph.erase_node(block)
            return False
        return True

    return sink


def _chunked_metric(src, b, e, y, seed, w, k, out, reduce_sum, chunk_size):
    """The exact backward metric over the K seed columns, chunk by chunk (Note [metric factors]): every
    reduction is a sum over columns, so the chunks' results add (:func:`through_chunks`; K may be a node, a
    factor's columns known at run time).
    """
    never = _never_stacked(src, b.rules) if out == "diag" and not A.mixed_dtypes(src) else frozenset()
    return through_chunks(e, b, src, k, chunk_size, seed, w, never=never,
                          emit=lambda s, wc, n: _backward_metric(src, b, e, y, s, wc, n, out, reduce_sum, "exact"))


def _never_stacked(src, rules) -> frozenset:
    """Parameter nodes, read at one place, whose exact diagonal their reader's rule forms in closed form and so
    never as per-sample stacks (``rule.diagonal_in_closed_form``, beside the rule's ``param_reduce``).
    """
    out = set()
    for node in src.param_nodes:
        users = list(node.users)
        closed = getattr(rules.lookup(users[0]), "diagonal_in_closed_form", None) if len(users) == 1 else None
        if closed is not None and closed(users[0], node):
            out.add(node)
    return frozenset(out)


def _method(method: str) -> str:
    return "diag_vjp" if method == "diag_backprop" else "vjp"


def jtmjp(model, wrt: Any = "input", matrix: str = "identity", out: str = "full", method: str = "exact",
          reduce: str = "sum", **options) -> Product:
    """The backward metric product ``Jᵀ M J`` (a pull-back metric; the GGN with M the loss Hessian).

    Args:
        model: any ``nn.Module``.
        wrt: ``"input"``, ``"input:N"``, ``"params"`` or parameter names.
        matrix: M's structure in output space: ``"identity"`` (no operand), ``"diag"`` ``[B, O]``, ``"sqrt"``
            ``[B, O, K]`` (M = S Sᵀ) or ``"full"`` ``[B, O, O]`` (symmetric, indefinite allowed).
        out: ``"full"``, ``"diag"``, or (parameters) ``"block"`` (one block per module owning parameters).
        method: ``"exact"`` or ``"diag_backprop"`` (nnj's approximation; diagonal/identity M, diagonal result).
        reduce: parameters: ``"sum"`` over the batch, or ``"none"`` for per-sample results (leading B).
        **options: the common options.

    Returns:
        ``p(*inputs[, M]) -> (y, Jᵀ M J)``: input: ``[B, I, I]`` / ``[B, I]``; parameters: ``[P, P]``, ``[P]`` or
        a list of ``[P_m, P_m]`` (with a leading B under ``reduce="none"``).
    """
    chunk_size = options.get("chunk_size")
    options = _options(options)
    reduce = _reduce(reduce)
    kind = _wrt_kind(wrt)
    _check_options("jtmjp", kind, matrix, out, method)

    def assemble(src, b, key):
        A.input_placeholders(b, src)
        m = b.graph.placeholder("M") if matrix != "identity" else None
        b.copy_all()
        e = A.api_emitter(b)
        y = b.env[src.output]
        if method == "diag_backprop":
            seed, w, k = _diag_backprop_seed(e, src, y, matrix, m), None, 1
            r = _backward_metric(src, b, e, y, seed, w, k, out, reduce == "sum", method)
        else:
            seed, w, k = _output_columns(e, src, b, y, matrix, m)
            r = _chunked_metric(src, b, e, y, seed, w, k, out, reduce == "sum", chunk_size)
        return (y, A.in_dtype(e, src, r, A.space_like(b, src)))

    return make_product(assemble, model, wrt, summed=kind != "input" and reduce == "sum",
                        no_operand=_identity(matrix, "output"), real_only="jtmjp", **options)


# --- J M J^T ---------------------------------------------------------------------------------------------


_ROWS_UNCHUNKED = ("chunk_size: J M Jᵀ from rows of J (w.r.t. parameters, or mode='reverse') pairs every row with "
                   "every other, so the rows cannot go through in chunks; chunk_size applies to jmjtp w.r.t. the "
                   "input in forward mode (M's columns)")


def jmjtp(model, wrt: Any = "input", matrix: str = "identity", out: str = "full", method: str = "exact",
          mode: str = "auto", **options) -> Product:
    """The forward metric product ``J M Jᵀ`` (e.g. the linearised-Laplace predictive covariance ``J Σ Jᵀ``).

    Args:
        model: any ``nn.Module``.
        wrt: as in :func:`jtmjp`.
        matrix: M's structure in input or parameter space. Input: ``"identity"``, ``"diag"`` ``[B, I]``,
            ``"sqrt"`` ``[B, I, K]``, ``"full"`` ``[B, I, I]``. Parameters (shared by the batch): ``"identity"``,
            ``"diag"`` ``[P]``, ``"block"`` (a list of ``[P_m, P_m]``), ``"sqrt"`` ``[P, K]``, ``"full"``
            ``[P, P]``.
        out: ``"full"`` ``[B, O, O]`` or ``"diag"`` ``[B, O]``.
        method: ``"exact"``, or ``"diag_backprop"`` (nnj's forward diagonal: ``(A∘A) d`` through each op;
            ``out="diag"`` with a diagonal or identity M).
        mode: ``"forward"`` (push M's columns), ``"reverse"`` (pull O rows of J), or ``"auto"``: the one with
            fewer columns, from the shapes known at build time; forward where ``chunk_size`` is given (only M's
            columns go through in chunks).
        **options: the common options.

    Returns:
        ``p(*inputs[, M]) -> (y, J M Jᵀ)``.
    """
    chunk_size = options.get("chunk_size")
    options = _options(options)
    kind = _wrt_kind(wrt)
    _check_options("jmjtp", kind, matrix, out, method)
    if chunk_size is not None and (kind != "input" or mode == "reverse" or method == "diag_backprop"):
        raise OptionError(_ROWS_UNCHUNKED)
    if mode not in ("auto", "forward", "reverse"):
        raise OptionError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}")

    def assemble(src, b, key):
        y, r = _assemble(src, b, key)
        return (y, A.in_dtype(A.api_emitter(b), src, r, y))  # Note [mixed dtypes]

    def _assemble(src, b, key):
        xs = A.input_placeholders(b, src)
        m = b.graph.placeholder("M") if matrix != "identity" else None
        e = A.api_emitter(b)
        if method == "diag_backprop":
            return _diag_forward(src, b, e, xs, m, matrix)
        out_diag = out == "diag"
        n_out = A.numel_per_sample(src.output)
        if src.wrt_kind == "input":
            x_old = src.inputs[src.wrt_index]
            x = xs[src.wrt_index]
            n_in = A.numel_per_sample(x_old)
            batch = A.size(e, x, 0)
            if matrix == "diag":
                m = e(checks.check_shape, m, (batch, n_in), x, "M")
            elif matrix == "sqrt":
                m = e(checks.check_shape, m, (batch, n_in, -1), x, "M")
            elif matrix == "full":
                m = e(checks.check_symmetric, e(checks.check_shape, m, (batch, n_in, n_in), x, "M"), "M")
            forward = mode == "forward" or (mode == "auto" and n_in <= n_out and matrix != "sqrt")
            if mode == "auto" and (matrix == "sqrt" or chunk_size is not None):
                forward = True  # K is known only at run time; its columns are what M gives (only they chunk)
            if forward:
                if matrix == "sqrt":
                    seeds, w, k = e(A.stack_to_shape, m, x), None, e.method("size", m, 2)
                elif matrix == "full":
                    pair = e(eigen_stack, m, x)
                    seeds, w, k = e(operator.getitem, pair, 0), e(operator.getitem, pair, 1), n_in
                elif matrix == "diag":
                    seeds, w, k = e(A.eye_stack, x, n_in), e(diag_weights, m), n_in
                else:
                    seeds, w, k = e(A.eye_stack, x, n_in), None, n_in
                if chunk_size is not None:  # the primal before the loop; else interleaved with the tangents
                    b.copy_all()

                def push(s, wc, n):  # each column's outer product: the chunks' results add
                    t = forward_tangents(b, {x_old: s}).get(src.output, ZERO)
                    t = e(A.zeros_stack, b.env[src.output], n) if t is ZERO else t
                    return e(outer_cols, e(batched_rows, t, n), wc, out_diag)

                r = through_chunks(e, b, src, k, chunk_size, seeds, w, push)
                return (b.env[src.output], r)
            if chunk_size is not None:
                raise OptionError(_ROWS_UNCHUNKED)
            b.copy_all()
            y = b.env[src.output]
            cts = backward_cotangents(b, {src.output: e(A.eye_stack, y, n_out)}, [x_old])
            ct = cts.get(x_old, ZERO)
            if ct is ZERO:
                ct = e(A.zeros_stack, x, n_out)
            return (y, e(jac_sandwich, e(batched_rows, ct, n_out), m, matrix, out_diag))
        # Parameters: O rows of the per-sample Jacobian, one parameter tensor at a time.
        b.copy_all()
        y = b.env[src.output]
        batch = A.size(e, y, 0)
        P, like = src.P, A.param_like(b, src)
        if matrix == "diag":
            m = e(checks.check_shape, m, (P,), like, "M")
        elif matrix == "sqrt":
            m = e(checks.check_shape, m, (P, -1), like, "M")
        elif matrix == "full":
            m = e(checks.check_symmetric, e(checks.check_shape, m, (P, P), like, "M"), "M")
        elif matrix == "block":
            sizes = [sum(p.numel for p in src.params if p.module == module) for module in _modules(src)]
            m = e(checks.check_blocks, m, sizes, like, "M")
        direct: dict = {}
        sinks = None
        if matrix == "diag":
            sinks = _sink(src, direct, "sandwich",
                          lambda info: (e(A.param_sigma, m, info.offset, info.numel, info.shape,
                                          A.param_dtype(src, info)), out_diag))
        cts = backward_cotangents(b, {src.output: e(A.eye_stack, y, n_out)}, list(src.param_nodes), ps=True,
                                  sinks=sinks)
        g_of = _rows_by_param(e, src, cts, y, n_out, batch)
        if matrix == "full":
            g = e(cat_rows, [g_of(p) for p in src.params])
            return (y, e(sandwich_diag if out_diag else sandwich, g, m))
        if matrix == "block":
            mods = _modules(src)
            parts = []
            for i, module in enumerate(mods):
                g = e(cat_rows, [g_of(p) for p in src.params if p.module == module])
                blk = e(operator.getitem, m, i)
                parts.append(e(sandwich_diag if out_diag else sandwich, g, blk))
            return (y, e(add_all, parts))
        if matrix == "sqrt":
            parts = [e(project, g_of(p), e(A.param_rows, m, p.offset, p.numel, A.param_dtype(src, p)))
                     for p in src.params]
            return (y, e(rows_outer, e(add_all, parts), out_diag))
        parts = []
        for p in src.params:
            if p.name in direct:
                parts.append(direct[p.name])
                continue
            g = g_of(p)
            if matrix == "diag":
                sig = e(A.param_rows, m, p.offset, p.numel, A.param_dtype(src, p))
                parts.append(e(weighted_outer_diag if out_diag else weighted_outer, g, sig))
            else:
                parts.append(e(rows_outer, g, out_diag))
        return (y, e(add_all, parts))

    space = "input" if kind == "input" else "parameter"
    return make_product(assemble, model, wrt, no_operand=_identity(matrix, space), real_only="jmjtp", **options)


def _identity(matrix: str, space: str) -> Optional[str]:
    """What a call passing M to a product built with ``matrix="identity"`` is told."""
    if matrix != "identity":
        return None
    kinds = "'diag', 'full', 'sqrt' or 'block'" if space == "parameter" else "'diag', 'full' or 'sqrt'"
    return (f"it was built with matrix='identity' (the default), which takes no M; to pass an M in {space} space, "
            f"build it with matrix={kinds}")


def _diag_forward(src, b, e, xs, m, matrix):
    """Nnj's forward diagonal propagation: only a diagonal flows, ``(A∘A) d`` through each op, summed at fan-in."""
    if src.wrt_kind == "input":
        x_old = src.inputs[src.wrt_index]
        x = xs[src.wrt_index]
        if matrix == "identity":
            d = e(torch.ones_like, x)
        else:
            d = e(A.reshape_like_batch, e(checks.check_shape, m, (A.size(e, x, 0), A.numel_per_sample(x_old)), x,
                                          "M"), x)
        seeds = {x_old: e.method("unsqueeze", d, 0)}
    else:
        if matrix == "identity":
            stack = e(_ones_row, A.param_like(b, src), src.P)
        else:
            stack = e.method("unsqueeze", e(checks.check_shape, m, (src.P,), A.param_like(b, src), "M"), 0)
        seeds = A.param_seeds(e, src, stack)
    tan = forward_tangents(b, seeds, method="diag_jvp")
    y = b.env[src.output]
    t = tan.get(src.output, ZERO)
    if t is ZERO:
        t = e(A.zeros_stack, y, 1)
    return (y, e(_first_rows, t))


def _ones_row(like, n):
    """A ``[1, n]`` row of ones (the identity's diagonal as a stack of one column)."""
    return like.new_ones((1, n))


def _first_rows(t):
    """The single diagonal column ``[1, B, *s]`` as ``[B, n]``."""
    return t[0].reshape(t.shape[1], math.prod(t.shape[2:]))


# --- GGN -------------------------------------------------------------------------------------------------


def ggn(model, loss: str = "cross_entropy", wrt: Any = "params", out: str = "diag", method: str = "exact",
        reduce: str = "sum", class_dim: int = 1, sigma: Any = 1.0, **options) -> Product:
    """The generalised Gauss-Newton ``Jᵀ H_loss J`` with the loss Hessian (or Fisher) formed in the graph.

    Args:
        model: any ``nn.Module``.
        loss: ``"mse"``, ``"cross_entropy"``, ``"bce"``, ``"gaussian"`` or ``"gaussian_nll"`` (see API.md).
        wrt: ``"params"`` (default), parameter names, or ``"input"``.
        out: ``"diag"`` (default), ``"full"`` or ``"block"``.
        method: ``"exact"`` or ``"diag_backprop"`` (starts from the diagonal of the loss Hessian).
        reduce: ``"sum"`` over the batch or ``"none"``.
        class_dim: the class axis of cross-entropy logits.
        sigma: the Gaussian likelihood's standard deviation (a float or a tensor shaped like one sample).
        **options: the common options.

    Returns:
        ``p(*inputs, target=None) -> (y, GGN)``; the target is accepted and ignored (these Hessians do not
        depend on it).
    """
    chunk_size = options.get("chunk_size")
    options = _options(options)
    reduce = _reduce(reduce)
    if loss not in LOSSES:
        raise OptionError(f"unknown loss {loss!r}; one of {sorted(LOSSES)}")
    loss_options(loss, class_dim, sigma)
    kind = _wrt_kind(wrt)
    _check_options("jtmjp", kind, "diag", out, method if method != "diag_backprop" else "exact")
    if method == "diag_backprop" and out != "diag":
        raise OptionError("method='diag_backprop' gives a diagonal: use out='diag'")

    def assemble(src, b, key):
        sigma_value = loss_options(loss, class_dim, sigma, src.output.meta["val"])
        A.input_placeholders(b, src)
        b.graph.placeholder("target", default_value=None)
        b.copy_all()
        e = A.api_emitter(b)
        y = b.env[src.output]
        if method == "diag_backprop":
            d = e(loss_factor, y, loss, "diag", class_dim, sigma_value)
            seed = e.method("unsqueeze", d, 0)
            r = _backward_metric(src, b, e, y, seed, None, 1, out, reduce == "sum", method)
        else:
            fac = e(loss_factor, y, loss, "factor", class_dim, sigma_value)
            seed, w = e(operator.getitem, fac, 0), e(operator.getitem, fac, 1)
            k = factor_width(loss, src.output.meta["val"], class_dim)
            r = _chunked_metric(src, b, e, y, seed, w, k, out, reduce == "sum", chunk_size)
        return (y, A.in_dtype(e, src, r, A.space_like(b, src)))

    return make_product(assemble, model, wrt, takes_target=True, summed=kind != "input" and reduce == "sum",
                        real_only="ggn", **options)


__all__ = ["ggn", "jmjtp", "jtmjp"]

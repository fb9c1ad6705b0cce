"""Embeddings: ``F.embedding`` and ``F.embedding_bag`` (2-D input; ``sum``, ``mean`` or ``max``).

They are differentiated with respect to the weight (the indices are constants) and the bag's per-sample
weights. An output row is a (weighted) copy of weight rows, so the weight's tangent is gathered at the
indices and its cotangent is scattered back with ``index_add`` — per sample into ``[K, B, num, dim]`` by
offsetting each sample's indices by ``b · num``; nothing builds a one-hot matrix. Rows at ``padding_idx`` get
no derivative, as in autograd. ``max_norm`` (which renormalises the weight in place) and
``scale_grad_by_freq`` (a gradient scaled by the batch's index counts, not a derivative) decline to the
fallback.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from passes.protocol import ZERO, Decline, Rule

from .registry import register

# --- kernels ---------------------------------------------------------------------------------------------


def _padding_row(padding_idx, num):
    return None if padding_idx is None else padding_idx % num


def _sample_offsets(idx, num):
    """``idx + b · num``: each sample's indices into its own block of a ``[B · num, dim]`` stack."""
    b = torch.arange(idx.shape[0], device=idx.device).reshape((-1,) + (1,) * (idx.dim() - 1))
    return idx + b * num


def not_padding(idx, padding_idx, num):
    """``idx != padding row`` (None without a padding index)."""
    pad = _padding_row(padding_idx, num)
    return None if pad is None else idx != pad


def embedding_tangent(idx, tw, padding_idx, ps):
    """Rows of a weight-tangent stack at ``idx``: ``[K, *idx.shape, dim]``, zero at padding positions.

    The stack is ``[K, num, dim]``, or per-sample ``[K, B, num, dim]`` with ``ps``.
    """
    num = tw.shape[-2]
    if ps:
        out = tw.flatten(1, 2)[:, _sample_offsets(idx, num)]
    else:
        out = tw[:, idx]
    keep = not_padding(idx, padding_idx, num)
    return out if keep is None else out * keep.unsqueeze(-1).to(out.dtype)


def embedding_weight_ct(ct, idx, weight, padding_idx, ps):
    """Scatter-add a cotangent stack ``[K, *idx.shape, dim]`` onto the weight rows; the padding row gets 0.

    Returns ``[K, num, dim]`` (summed over the batch) or, with ``ps``, per-sample ``[K, B, num, dim]``.
    """
    num, dim = weight.shape
    k = ct.shape[0]
    keep = not_padding(idx, padding_idx, num)
    if keep is not None:
        ct = ct * keep.unsqueeze(-1).to(ct.dtype)
    rows = _sample_offsets(idx, num) if ps else idx
    n_rows = idx.shape[0] * num if ps else num
    out = ct.new_zeros((k, n_rows, dim)).index_add_(1, rows.reshape(-1), ct.reshape(k, rows.numel(), dim))
    return out.reshape(k, idx.shape[0], num, dim) if ps else out


def bag_coefficients(idx, weight, psw, mode, padding_idx):
    """``a[b, l]``: the weight of row ``idx[b, l]`` in bag ``b``, 0 at padding positions.

    It is the per-sample weight (``sum``) or ``1/count`` (``mean``, padding excluded from the count).
    """
    keep = not_padding(idx, padding_idx, weight.shape[0])
    a = torch.ones(idx.shape, dtype=weight.dtype, device=idx.device) if psw is None else psw
    if keep is not None:
        a = a * keep.to(a.dtype)
    if mode == "mean":
        count = (keep.sum(-1, keepdim=True) if keep is not None
                 else torch.full_like(idx[:, :1], idx.shape[1])).to(a.dtype)
        a = a / count.clamp_min(1)
    return a


def bag_weight_tangent(idx, tw, a, ps):
    """``Σ_l a[b, l] tw[idx[b, l]]``: ``[K, B, dim]``."""
    rows = embedding_tangent(idx, tw, None, ps)  # [K, B, L, dim]
    return torch.einsum("kbld,bl->kbd", rows, a.to(rows.dtype))


def bag_weight_ct(ct, idx, weight, a, ps):
    """Scatter ``a[b, l] · ct[b]`` onto row ``idx[b, l]``: ``[K, num, dim]`` or ``[K, B, num, dim]``."""
    spread = ct.unsqueeze(2) * a.to(ct.dtype).unsqueeze(-1)  # [K, B, L, dim]
    return embedding_weight_ct(spread, idx, weight, None, ps)


def _squared_row_coefficients(idx, weight, a, dtype):
    """``c[b, r]²`` ``[B, num]``: a row repeated in a bag enters that bag's output with its summed coefficient
    ``c[b, r] = Σ_{l: idx[b, l] = r} a[b, l]``, so the squares are taken after summing.
    """
    c = a.new_zeros((idx.shape[0], weight.shape[0])).scatter_add_(1, idx, a)
    return (c * c).to(dtype)


def bag_weight_diag(d, idx, weight, a, ps):
    """``(A∘A)ᵀ d`` for the weight: ``Σ_b c[b, r]² d[b]``, ``[K, num, dim]`` (or ``[K, B, num, dim]``)."""
    return torch.einsum("kbd,br->kbrd" if ps else "kbd,br->krd", d, _squared_row_coefficients(idx, weight, a, d.dtype))


def bag_weight_diag_tangent(d, idx, weight, a):
    """``(A∘A) d`` for a weight diagonal ``[K, num, dim]``: ``Σ_r c[b, r]² d[r]``, ``[K, B, dim]``."""
    return torch.einsum("krd,br->kbd", d, _squared_row_coefficients(idx, weight, a, d.dtype))


def bag_psw_tangent(idx, weight, t, keep):
    """Tangent of ``sum``-mode bags in their per-sample weights: ``Σ_l t[b, l] W[idx[b, l]]``."""
    if keep is not None:
        t = t * keep.to(t.dtype)
    return torch.einsum("kbl,bld->kbd", t, weight[idx])


def bag_psw_ct(ct, idx, weight, keep, power=1):
    """Cotangent of the per-sample weights: ``⟨ct[b], W[idx[b, l]]⟩`` (``power=2``: with squared rows)."""
    rows = weight[idx]
    if power == 2:
        rows = rows * rows
    out = torch.einsum("kbd,bld->kbl", ct, rows)
    return out if keep is None else out * keep.to(out.dtype)


def bag_max(idx, weight, padding_idx):
    """``embedding_bag(mode="max")`` of 2-D ids, with the row each output entry was taken from (-1 for an empty
    bag, whose output is 0): ATen's own choice at ties.
    """
    b, n = idx.shape
    offsets = torch.arange(0, b * n, n, device=idx.device)
    out, _, size, rows = torch.embedding_bag(weight, idx.reshape(-1), offsets, False, 2, False, None, False,
                                             padding_idx)
    return out, torch.where(size.unsqueeze(-1) > 0, rows, -1)


def bag_max_tangent(rows, tw, ps):
    """``tw[rows[b, j], j]`` for a shared ``[K, num, dim]`` (or per-sample ``[K, B, num, dim]``) stack."""
    k, r = tw.shape[0], rows.clamp_min(0)
    if ps:
        t = tw.gather(2, r.unsqueeze(1).unsqueeze(0).expand(k, -1, 1, -1)).squeeze(2)
    else:
        t = tw.gather(1, r.unsqueeze(0).expand(k, -1, -1))
    return t * (rows >= 0).to(t.dtype)


def bag_max_ct(ct, rows, weight, ps):
    """``ct[b, j]`` sent to entry ``(rows[b, j], j)`` of the weight: ``[K, num, dim]`` or ``[K, B, num, dim]``."""
    k, b, d = ct.shape
    c, r = ct * (rows >= 0).to(ct.dtype), rows.clamp_min(0)
    if ps:
        return ct.new_zeros((k, b, weight.shape[0], d)).scatter_(2, r.unsqueeze(1).unsqueeze(0).expand(k, -1, 1, -1),
                                                                  c.unsqueeze(2))
    return ct.new_zeros((k, weight.shape[0], d)).scatter_add_(1, r.unsqueeze(0).expand(k, -1, -1), c)


# --- rules -----------------------------------------------------------------------------------------------


@register(F.embedding)
class Embedding(Rule):
    """y = W[idx] (constant indices); dy = dW[idx]; the cotangent scatter-adds onto W's rows.

    The entries are 0 or 1, so the diagonal rule is the same scatter.
    """

    diff = ("weight",)
    square_is_self = True  # each output entry reads one weight entry: (A∘A) d = A d

    def signature(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,  # noqa: D102
                  scale_grad_by_freq=False, sparse=False):
        ...

    @staticmethod
    def _check(site):
        if site.args["max_norm"] is not None or site.args["scale_grad_by_freq"]:
            raise Decline

    def jvp(self, e, site, tangents):  # noqa: D102
        self._check(site)
        tw = tangents["weight"]
        if tw is ZERO:
            return ZERO
        return e(embedding_tangent, site.args["input"], tw, site.args["padding_idx"], "weight" in site.ps)

    def vjp(self, e, site, ct):  # noqa: D102
        self._check(site)
        if not site.needs("weight"):
            return {}
        return {"weight": e(embedding_weight_ct, ct, site.args["input"], site.args["weight"],
                            site.args["padding_idx"], "weight" in site.ps)}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)


@register(F.embedding_bag)
class EmbeddingBag(Rule):
    """y[b] = Σ_l a[b, l] W[idx[b, l]]: linear in W and in the per-sample weights; ``max``: y[b, j] = W[r, j] for
    the row r the primal picked (kept by :meth:`primal`).

    For 2-D input; ``a`` is the per-sample weights or 1 (``sum``), or 1/count (``mean``).
    """

    diff = ("weight", "per_sample_weights")

    def signature(input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False,  # noqa: D102
                  mode="mean", sparse=False, per_sample_weights=None, include_last_offset=False,
                  padding_idx=None):
        ...

    @staticmethod
    def _plain(site) -> bool:
        """2-D ids without offsets, renormalisation or frequency scaling: the bags this rule takes."""
        a = site.args
        return (a["offsets"] is None and a["max_norm"] is None and not a["scale_grad_by_freq"]
                and site.val("input").dim() == 2)

    def primal(self, e, site):  # noqa: D102
        a = site.args
        if a["mode"] != "max" or not self._plain(site):
            return None
        both = e(bag_max, a["input"], a["weight"], a["padding_idx"])
        return e(operator.getitem, both, 0), {"rows": e(operator.getitem, both, 1)}

    @staticmethod
    def _max_rows(site):
        """``mode="max"``: each output entry is one entry of the weight, at the row the primal chose."""
        rows = site.extra.get("saved", {}).get("rows")
        if rows is None:
            raise Decline
        return rows

    @staticmethod
    def _setup(e, site):
        a = site.args
        if not EmbeddingBag._plain(site) or a["mode"] not in ("sum", "mean"):
            raise Decline
        if "per_sample_weights" in site.ps:
            raise Decline  # bag weights shared by the batch: unusual, left to the fallback
        num = site.val("weight").shape[0]
        coef = e(bag_coefficients, a["input"], a["weight"], a["per_sample_weights"], a["mode"],
                 a["padding_idx"])
        keep = e(not_padding, a["input"], a["padding_idx"], num) if a["padding_idx"] is not None else None
        return coef, keep

    def jvp(self, e, site, tangents):  # noqa: D102
        if site.args["mode"] == "max":
            tw = tangents["weight"]
            return ZERO if tw is ZERO else e(bag_max_tangent, self._max_rows(site), tw, "weight" in site.ps)
        coef, keep = self._setup(e, site)
        idx, w = site.args["input"], site.args["weight"]
        terms = []
        if tangents["weight"] is not ZERO:
            terms.append(e(bag_weight_tangent, idx, tangents["weight"], coef, "weight" in site.ps))
        t = tangents.get("per_sample_weights", ZERO)
        if t is not ZERO:
            terms.append(e(bag_psw_tangent, idx, w, t, keep))
        return e.sum(terms)

    def diag_jvp(self, e, site, tangents):
        """(A∘A) d: ``max`` selects (the jvp itself); sums square each row's summed coefficient and the rows read
        by the bag weights.
        """
        if site.ps:
            raise Decline  # per-sample diagonals are not propagated forward
        if site.args["mode"] == "max":
            return self.jvp(e, site, tangents)
        coef, keep = self._setup(e, site)
        idx, w = site.args["input"], site.args["weight"]
        terms = []
        if tangents["weight"] is not ZERO:
            terms.append(e(bag_weight_diag_tangent, tangents["weight"], idx, w, coef))
        t = tangents.get("per_sample_weights", ZERO)
        if t is not ZERO:
            terms.append(e(bag_psw_tangent, idx, e(torch.square, w), t, keep))
        return e.sum(terms)

    def _backward(self, e, site, c, power):
        if site.args["mode"] == "max":  # a selection: its squared Jacobian is itself
            rows = self._max_rows(site)
            return {"weight": e(bag_max_ct, c, rows, site.args["weight"], "weight" in site.ps)} \
                if site.needs("weight") else {}
        coef, keep = self._setup(e, site)
        idx, w = site.args["input"], site.args["weight"]
        out = {}
        if site.needs("weight"):
            kernel = bag_weight_ct if power == 1 else bag_weight_diag
            out["weight"] = e(kernel, c, idx, w, coef, "weight" in site.ps)
        if site.args["per_sample_weights"] is not None and site.needs("per_sample_weights"):
            out["per_sample_weights"] = e(bag_psw_ct, c, idx, w, keep, power)
        return out

    def vjp(self, e, site, ct):  # noqa: D102
        return self._backward(e, site, ct, 1)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self._backward(e, site, d, 2)

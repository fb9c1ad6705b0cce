"""Attention: fused attention and the attention modules as traceable decompositions; ``masked_fill``.

Note [attention decompositions]
    ``F.scaled_dot_product_attention`` has no forward-mode formula and is one opaque kernel, so it is expanded
    after tracing into PyTorch's documented reference computation: ``softmax(q kᵀ · scale + bias) v``. The
    matmuls, the scaling, the additions and the softmax then get their structured rules, and diagonal
    back-propagation steps through each of them. ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and
    ``nn.TransformerEncoder`` cannot be traced into (their fast-path checks branch on tensor properties); they
    are traced through functions that reproduce their forward (the slow path, which the fast path equals)
    using their own parameters and submodules.

    Whether a mask is boolean or additive is a property of a tensor, unknown while tracing, so masks are
    applied at run time by :func:`add_mask` (a small op with its own rule): boolean masks are constants, float
    masks are added (and differentiated, a learned bias included). Dropout on attention weights is refused
    (``ModeError``): it makes the output a function of chance.

    A query row whose every key is masked (left padding under a causal mask) has scores of -inf only: a plain
    softmax gives NaN there. PyTorch's fused kernels, and so ``F.scaled_dot_product_attention`` and
    ``nn.MultiheadAttention(need_weights=False)``, return 0 for such a row, its gradient 0 too; with a mask the
    decompositions do the same (:func:`_masked_softmax`). ``need_weights=True`` takes PyTorch's slow path,
    whose softmax gives NaN, and so does its decomposition.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from passes.protocol import ZERO, Decline, Rule

from ..errors import ModeError
from ..tracing import decomposes, emit_op
from . import _rt
from .base import Broadcasting, LinearOp, NonDifferentiable
from .registry import register

# --- run-time kernels (graph ops of the decompositions) --------------------------------------------------


def causal_bias(scores):
    """The additive ``[L, S]`` bias of ``is_causal``: 0 on and below the diagonal, -inf above it.

    The diagonal starts at the top left, as in PyTorch's kernels when ``L != S``.
    """
    L, S = scores.shape[-2], scores.shape[-1]
    keep = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
    return torch.zeros(L, S, dtype=scores.dtype, device=scores.device).masked_fill(~keep, float("-inf"))


def add_mask(scores, mask, blocked_when):
    """Attention scores with a mask applied: a float mask is added; a boolean one sets -inf where blocked.

    A boolean mask blocks where it equals ``blocked_when``: False for SDPA, True for nn.MultiheadAttention.
    """
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask if blocked_when else ~mask, float("-inf"))
    return scores + mask


def heads_view(mask, num_heads):
    """An nn.MultiheadAttention mask ``[L, S]`` (kept) or ``[B·H, L, S]`` (viewed as ``[B, H, L, S]``)."""
    if mask.dim() == 3:
        return mask.reshape((-1, num_heads) + tuple(mask.shape[-2:]))
    return mask


def head_dim_scale(x, query, power=1):
    """``x / √E`` with ``E = query.shape[-1]`` (SDPA's default scale), or ``x / E`` with ``power=2``."""
    e = query.shape[-1]
    return x * (1.0 / math.sqrt(e) if power == 1 else 1.0 / e)


def repeat_heads(x, groups):
    """Grouped-query attention: ``[..., Hk, S, E]`` -> ``[..., Hk·groups, S, E]`` (``repeat_interleave``).

    Each key/value head serves ``groups`` consecutive query heads.
    """
    return x.repeat_interleave(groups, dim=-3)


def repeat_heads_transpose(ct, groups):
    """Adjoint of :func:`repeat_heads`: sum each group of heads."""
    return ct.unflatten(-3, (-1, groups)).sum(-3)


# --- rules for the kernels and masked_fill ---------------------------------------------------------------


@register(causal_bias)
class CausalBias(NonDifferentiable):
    """The causal mask bias: a constant."""

    def signature(scores):  # noqa: D102
        ...


@register(add_mask)
class AddMask(Broadcasting):
    """y = scores + mask (partials 1, 1), or -inf where a boolean mask blocks (partial 1, the mask constant).

    The softmax after a blocked place gives it a zero derivative, so the scores' partial can stay 1.
    """

    inputs = ("input", "mask")

    def signature(input, mask, blocked_when):  # noqa: D102
        ...

    def partial(self, e, site, name):  # noqa: D102
        if name == "mask" and not site.val("mask").is_floating_point():
            return ZERO
        return 1


@register(heads_view)
class HeadsView(LinearOp):
    """A mask reshaped to ``[B, H, L, S]`` (or kept ``[L, S]``); dy = dx reshaped."""

    def signature(input, num_heads):  # noqa: D102
        ...

    def apply(self, e, site, t):  # noqa: D102
        if site.ps:
            raise Decline
        return e(_rt.reshape_like, t, site.out)

    def transpose(self, e, site, ct):  # noqa: D102
        if site.ps:
            raise Decline
        return e(_rt.reshape_like, ct, site.args["input"])


@register(head_dim_scale)
class HeadDimScale(LinearOp):
    """y = x / √E, the default attention scale (E read from the query at run time); squared entries 1/E."""

    diff = ("input", "query")  # the query is read for its size only

    def signature(input, query, power=1):  # noqa: D102
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(head_dim_scale, t, site.args["query"])

    transpose = apply

    square_is_self = False  # its entries are 1/√E: squared, 1/E

    def diag_vjp(self, e, site, d):  # noqa: D102
        return {"input": e(head_dim_scale, d, site.args["query"], 2)}

    def diag_jvp(self, e, site, tangents):  # noqa: D102
        d = tangents["input"]
        return ZERO if d is ZERO else e(head_dim_scale, d, site.args["query"], 2)


@register(repeat_heads)
class RepeatHeads(LinearOp):
    """y = x with each head repeated ``groups`` times; the adjoint sums each group."""

    def signature(input, groups):  # noqa: D102
        ...

    def apply(self, e, site, t):  # noqa: D102
        if site.ps:
            raise Decline
        return e(repeat_heads, t, site.args["groups"])

    def transpose(self, e, site, ct):  # noqa: D102
        if site.ps:
            raise Decline
        return e(repeat_heads_transpose, ct, site.args["groups"])


@register("masked_fill", torch.masked_fill)
class MaskedFill(Rule):
    """y = x where not mask, value where mask (a boolean mask); dy = dx with the masked entries zeroed."""

    diff = ("input", "value")
    square_is_self = True  # the jvp keeps or zeroes entries: (A∘A) d = A d

    def signature(input, mask, value):  # noqa: D102
        ...

    @staticmethod
    def _check(site):
        if "input" in site.ps or tuple(site.val("input").shape) != tuple(site.out_val.shape):
            raise Decline  # the mask broadcasts the input, or a parameter is masked per sample

    def jvp(self, e, site, tangents):  # noqa: D102
        self._check(site)
        if tangents.get("value", ZERO) is not ZERO:
            raise Decline  # a tensor fill value with a tangent: rare, left to the fallback
        t = tangents["input"]
        return ZERO if t is ZERO else e.method("masked_fill", t, site.args["mask"], 0.0)

    def vjp(self, e, site, ct):  # noqa: D102
        self._check(site)
        value = site.args["value"]
        if isinstance(value, fx.Node) and site.extra.get("need") is not None and site.needs("value"):
            raise Decline
        return {"input": e.method("masked_fill", ct, site.args["mask"], 0.0)} if site.needs("input") else {}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)


# --- decompositions --------------------------------------------------------------------------------------


def _refuse_dropout(p, where: str) -> None:
    if not (isinstance(p, (int, float)) and p == 0):
        raise ModeError(f"{where} uses attention dropout (p={p}): the output is then a function of chance; "
                        "call model.eval() (or pass dropout_p=0.0) before building the product")


@decomposes(F.scaled_dot_product_attention)
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """PyTorch's reference computation of fused attention: ``softmax(q kᵀ · scale + bias) v``.

    See Note [attention decompositions].
    """
    _refuse_dropout(dropout_p, "F.scaled_dot_product_attention")
    if is_causal and attn_mask is not None:  # PyTorch's own kernels refuse this too
        raise RuntimeError("F.scaled_dot_product_attention: an explicit attn_mask cannot be combined with "
                           "is_causal=True")
    if enable_gqa:
        groups = query.size(-3) // key.size(-3)
        key, value = emit_op(repeat_heads, key, groups), emit_op(repeat_heads, value, groups)
    scores = query @ key.transpose(-2, -1)
    # The default scale depends on the query's size: a run-time op rather than a Python number.
    scores = emit_op(head_dim_scale, scores, query) if scale is None else scores * scale
    if is_causal:
        scores = scores + emit_op(causal_bias, scores)
    if attn_mask is not None:
        return _masked_softmax(emit_op(add_mask, scores, attn_mask, False)) @ value
    return torch.softmax(scores, dim=-1) @ value


def _masked_softmax(scores):
    """Softmax over the last axis with 0 on rows whose every score is -inf, as PyTorch's fused attention
    kernels compute it (Note [attention decompositions]); the masked scores get no derivative.
    """
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def _to_batch_first(query, key, value):
    """``[L, B, E]`` inputs as ``[B, L, E]``, keeping which of them are the same tensor (self-attention)."""
    if key is value:
        if query is key:
            query = key = value = query.transpose(0, 1)
        else:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
            value = key
    else:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    return query, key, value


def _in_projection(m, query, key, value):
    """nn.MultiheadAttention's input projections (a packed weight, or three when kdim/vdim differ)."""
    E = m.embed_dim
    b = m.in_proj_bias
    if not m._qkv_same_embed_dim:
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return (F.linear(query, m.q_proj_weight, b_q), F.linear(key, m.k_proj_weight, b_k),
                F.linear(value, m.v_proj_weight, b_v))
    w = m.in_proj_weight
    if key is value and query is key:
        q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        return q, k, v
    if key is value:
        w_q, w_kv = w.split([E, 2 * E])
        b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
        k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
        return F.linear(query, w_q, b_q), k, v
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


@decomposes(nn.MultiheadAttention)
def multihead_attention(m, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                        average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward`` (its slow path) on batched input, in traceable ops.

    Computed batch-first as ``[B, H, L, S]`` scores: the same values as PyTorch's ``[B·H, L, S]`` layout.
    Returns ``(output, weights)``, the weights averaged over heads, per head, or ``None`` as the options say.
    See Note [attention decompositions].
    """
    if m.training:
        _refuse_dropout(m.dropout, "nn.MultiheadAttention")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (nn.MultiheadAttention)")
    if not m.batch_first:
        query, key, value = _to_batch_first(query, key, value)
    q, k, v = _in_projection(m, query, key, value)
    pad = 0
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, torch.zeros_like(k[:, :1]) + m.bias_k], dim=1)
        v = torch.cat([v, torch.zeros_like(v[:, :1]) + m.bias_v], dim=1)
        pad += 1
    H, hd = m.num_heads, m.head_dim
    q, k, v = (t.unflatten(-1, (H, hd)).transpose(1, 2) for t in (q, k, v))
    if m.add_zero_attn:
        k = torch.cat([k, torch.zeros_like(k[:, :, :1])], dim=2)
        v = torch.cat([v, torch.zeros_like(v[:, :, :1])], dim=2)
        pad += 1
    # PyTorch uses the causal hint in place of the mask only here; elsewhere the mask itself.
    causal = is_causal and key_padding_mask is None and not need_weights
    if attn_mask is not None and not causal:
        attn_mask = emit_op(heads_view, attn_mask, H)
        if pad:
            attn_mask = F.pad(attn_mask, (0, pad))
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.unsqueeze(1).unsqueeze(1)
        if pad:
            key_padding_mask = F.pad(key_padding_mask, (0, pad))
    scores = (q * math.sqrt(1.0 / float(hd))) @ k.transpose(-2, -1)
    if causal:
        scores = scores + emit_op(causal_bias, scores)
    elif attn_mask is not None:
        scores = emit_op(add_mask, scores, attn_mask, True)
    if key_padding_mask is not None:
        scores = emit_op(add_mask, scores, key_padding_mask, True)
    masked = key_padding_mask is not None or (attn_mask is not None and not causal)
    weights = _masked_softmax(scores) if masked and not need_weights else torch.softmax(scores, dim=-1)
    out = F.linear((weights @ v).transpose(1, 2).flatten(2), m.out_proj.weight, m.out_proj.bias)
    if not m.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, (weights.mean(dim=1) if average_attn_weights else weights)


@decomposes(nn.TransformerEncoderLayer)
def transformer_encoder_layer(m, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    """``nn.TransformerEncoderLayer.forward`` without the fused fast path (the same values).

    It runs the layer's own submodules (``self_attn`` through :func:`multihead_attention`).
    """
    x = src
    if m.norm_first:
        x = x + _self_attention_block(m, m.norm1(x), src_mask, src_key_padding_mask, is_causal)
        x = x + _feed_forward_block(m, m.norm2(x))
    else:
        x = m.norm1(x + _self_attention_block(m, x, src_mask, src_key_padding_mask, is_causal))
        x = m.norm2(x + _feed_forward_block(m, x))
    return x


def _self_attention_block(m, x, attn_mask, key_padding_mask, is_causal):
    x = m.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                    is_causal=is_causal)[0]
    return m.dropout1(x)


def _feed_forward_block(m, x):
    return m.dropout2(m.linear2(m.dropout(m.activation(m.linear1(x)))))


@decomposes(nn.TransformerEncoder)
def transformer_encoder(m, src, mask=None, src_key_padding_mask=None, is_causal=None):
    """``nn.TransformerEncoder.forward``: the layers in turn, then the optional final norm.

    The nested-tensor fast path is skipped (it only runs without autograd, and zeroes padded positions).
    PyTorch detects a causal ``mask`` by comparing values, which a trace cannot; the mask is applied as it
    is, which gives the same result.
    """
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, is_causal=is_causal is True,
                    src_key_padding_mask=src_key_padding_mask)
    if m.norm is not None:
        out = m.norm(out)
    return out


@decomposes(nn.TransformerDecoder)
def transformer_decoder(m, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                        memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    """``nn.TransformerDecoder.forward``: the layers in turn, then the optional final norm.

    As for the encoder, a causal ``tgt_mask`` is applied as it is (PyTorch detects one by its values).
    """
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                    tgt_is_causal=tgt_is_causal is True, memory_is_causal=memory_is_causal)
    if m.norm is not None:
        out = m.norm(out)
    return out


@decomposes(nn.Transformer)
def transformer(m, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                memory_is_causal=False):
    """``nn.Transformer.forward``: the encoder on ``src``, the decoder on ``tgt`` and the encoder's output.

    PyTorch's checks of the batch and feature sizes are left out (a trace cannot branch on them); the model's
    own forward runs them at the first call, which compares its output with the product's.
    """
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)

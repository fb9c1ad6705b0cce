"""Rules of the element-wise, linear-algebra, shape and reduction families, each alone, every spelling.

Each sample is a tiny module calling one op (with a parameter ``w`` or ``W`` where the op takes a second
tensor, so per-sample parameter rules are exercised too); every direction product is checked against
torch.func, and the diagonal back-propagation rule against the exact diagonal (one op: no cross terms).
"""

import operator
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxjac

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import (  # noqa: E402
    Fn,
    assert_close,
    check_diag_backprop,
    check_direction_products,
    per_sample_jacobian,
)


class Op(nn.Module):
    """``f(self, x)`` with a vector parameter ``w`` [5], a matrix ``W`` [5, 4] and ``V`` [3, 4, 5]."""

    def __init__(self, f, positive=False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.f = f
        self.w = nn.Parameter(torch.rand(5, generator=g, dtype=torch.float64) + 0.5)
        self.W = nn.Parameter(torch.randn(5, 4, generator=g, dtype=torch.float64))
        self.V = nn.Parameter(torch.randn(3, 4, 5, generator=g, dtype=torch.float64))
        self.positive = positive

    def forward(self, x):
        return self.f(self, x)


# (id, f(m, x), positive input?) — x is [B, 3, 5]
def _heads(x):
    """``[B, 3, 5]`` -> ``[B, 2, 3, 5]`` as attention splits heads: a transpose over the batch axes of a view."""
    return torch.cat([x, x.sin()], 1).view(x.shape[0], 3, 2, 5).transpose(1, 2)


def _topk_normalised(x):
    """Mixtral's router: the top-2 probabilities normalised in place, their indices read afterwards."""
    v, i = torch.topk(x.softmax(-1), 2, dim=-1)
    v /= v.sum(-1, keepdim=True)
    return v * (i + 1)


_ZEROS = torch.tensor([[1.0, 0, 1, 1, 1], [0, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float64)
"""Rows holding one, two and no zeros: a product's derivative there (autograd's is exact)."""


def _set_slices(m, x):
    h = x.clone()
    h[:, 1:, ::2] = x[:, :2, :3] * m.w[:3]  # a batched value that broadcasts a parameter
    return h


def _set_mask_scalar(m, x):
    h = x.clone()
    h[x > 0.2] = 0.0
    return h


def _set_mask_values(m, x):
    h = x.clone()
    h[h > 0.2] *= 2.0  # getitem by the mask, then setitem of the product
    return h


def _set_broadcast(m, x):
    h = x.clone()
    h[..., 1] = x[:, :1, 2] ** 2  # [B, 1] written into [B, 3]
    return h


def _set_row(m, x):
    h = torch.zeros_like(x)
    h[:, 0] = x.sum(1)  # into a factory's zeros: the base has no derivative
    return h


def _set_param(m, x):
    h = x * 1.0
    h[:, 0] = m.w  # an unbatched value written into every sample (a class token)
    h[:, 1:, 1] = m.W[:2, :1].t()  # [1, 2] into [B, 2]: the value's leading 1 lines up with the batch
    return h


def _write_slice_twice(m, x):
    h = x * m.w
    h2 = h[:, 1:]
    h2.mul_(2.0)
    h2.add_(x[:, :2])  # a second op on the same slice (versions: Note [in-place ops])
    return h


SAMPLES = [
    # element-wise, unary
    ("relu_method", lambda m, x: x.relu(), False),
    ("torch.relu", lambda m, x: torch.relu(x), False),
    ("F.relu", lambda m, x: F.relu(x), False),
    ("F.leaky_relu", lambda m, x: F.leaky_relu(x, 0.2), False),
    ("F.elu", lambda m, x: F.elu(x, 0.7), False),
    ("F.rrelu_eval", lambda m, x: F.rrelu(x, 0.1, 0.3), False),
    ("torch.rrelu_eval", lambda m, x: torch.rrelu(x, 0.2, 0.4, False, None), False),
    ("F.prelu_channels", lambda m, x: F.prelu(x, m.w[:3]), False),
    ("F.prelu_one", lambda m, x: F.prelu(x, m.w[1:2]), False),
    ("F.gelu", lambda m, x: F.gelu(x), False),
    ("F.gelu_tanh", lambda m, x: F.gelu(x, approximate="tanh"), False),
    ("F.silu", lambda m, x: F.silu(x), False),
    ("torch.tanh", lambda m, x: torch.tanh(x), False),
    ("F.tanh", lambda m, x: F.tanh(x), False),
    ("tanh_method", lambda m, x: x.tanh(), False),
    ("torch.sigmoid", lambda m, x: torch.sigmoid(x), False),
    ("F.sigmoid", lambda m, x: F.sigmoid(x), False),
    ("sigmoid_method", lambda m, x: x.sigmoid(), False),
    ("F.softplus", lambda m, x: F.softplus(x, beta=2.0, threshold=1.0), False),
    ("torch.sin", lambda m, x: torch.sin(x), False),
    ("sin_method", lambda m, x: x.sin(), False),
    ("torch.cos", lambda m, x: torch.cos(x), False),
    ("cos_method", lambda m, x: x.cos(), False),
    ("torch.exp", lambda m, x: torch.exp(x), False),
    ("exp_method", lambda m, x: x.exp(), False),
    ("torch.log", lambda m, x: torch.log(x), True),
    ("log_method", lambda m, x: x.log(), True),
    ("torch.log1p", lambda m, x: torch.log1p(x), True),
    ("log1p_method", lambda m, x: x.log1p(), True),
    ("torch.sqrt", lambda m, x: torch.sqrt(x), True),
    ("sqrt_method", lambda m, x: x.sqrt(), True),
    ("torch.rsqrt", lambda m, x: torch.rsqrt(x), True),
    ("rsqrt_method", lambda m, x: x.rsqrt(), True),
    ("torch.reciprocal", lambda m, x: torch.reciprocal(x), True),
    ("reciprocal_method", lambda m, x: x.reciprocal(), True),
    ("torch.square", lambda m, x: torch.square(x), False),
    ("square_method", lambda m, x: x.square(), False),
    ("torch.abs", lambda m, x: torch.abs(x), False),
    ("abs_method", lambda m, x: x.abs(), False),
    ("operator.abs", lambda m, x: abs(x), False),
    ("torch.erf", lambda m, x: torch.erf(x), False),
    ("erf_method", lambda m, x: x.erf(), False),
    ("torch.clamp", lambda m, x: torch.clamp(x, -0.5, 0.7), False),
    ("torch.clip", lambda m, x: torch.clip(x, min=-0.3), False),
    ("clamp_method", lambda m, x: x.clamp(max=0.2), False),
    ("clip_method", lambda m, x: x.clip(-0.1, 0.1), False),
    ("F.hardtanh", lambda m, x: F.hardtanh(x, -0.5, 0.5), False),
    ("F.relu6", lambda m, x: F.relu6(x * 4), False),
    ("torch.neg", lambda m, x: torch.neg(x), False),
    ("operator.neg", lambda m, x: -x, False),
    ("neg_method", lambda m, x: x.neg(), False),
    ("F.mish", lambda m, x: F.mish(x), False),
    ("F.selu", lambda m, x: F.selu(x), False),
    ("torch.selu", lambda m, x: torch.selu(x), False),
    ("F.celu", lambda m, x: F.celu(x, 0.7), False),
    ("torch.celu", lambda m, x: torch.celu(x, 1.3), False),
    ("F.softsign", lambda m, x: F.softsign(x), False),
    ("F.logsigmoid", lambda m, x: F.logsigmoid(x), False),
    ("F.hardswish", lambda m, x: F.hardswish(x * 4), False),
    ("F.hardsigmoid", lambda m, x: F.hardsigmoid(x * 4), False),
    ("F.tanhshrink", lambda m, x: F.tanhshrink(x), False),
    ("F.softshrink", lambda m, x: F.softshrink(x, 0.3), False),
    ("torch.hardshrink", lambda m, x: torch.hardshrink(x, 0.3), False),
    ("hardshrink_method", lambda m, x: x.hardshrink(), False),
    ("F.threshold", lambda m, x: F.threshold(x, 0.1, 2.0), False),
    ("torch.threshold", lambda m, x: torch.threshold(x, -0.2, 0.5), False),
    # parameters computed in the graph: no fused kernel, the derivative itself
    ("F.softshrink_traced_lambd", lambda m, x: F.softshrink(x, x.shape[-1] / 10), False),
    ("hardshrink_traced_lambd", lambda m, x: x.hardshrink(x.shape[-1] / 10), False),
    ("F.threshold_traced", lambda m, x: F.threshold(x, x.shape[-1] / 20, 2.0), False),
    ("F.glu", lambda m, x: F.glu(x[..., 1:]), False),
    ("F.glu_dim1", lambda m, x: F.glu(x[:, 1:] * m.w, 1), False),
    # element-wise, binary with broadcasting and parameters
    ("operator.add", lambda m, x: x + m.w, False),
    ("torch.add", lambda m, x: torch.add(x, m.w, alpha=2.0), False),
    ("add_method", lambda m, x: x.add(m.w), False),
    ("operator.sub", lambda m, x: m.w - x, False),
    ("torch.sub", lambda m, x: torch.sub(x, m.w, alpha=0.5), False),
    ("sub_method", lambda m, x: x.sub(m.w), False),
    ("torch.rsub", lambda m, x: torch.rsub(x, m.w), False),
    ("operator.mul", lambda m, x: x * m.w * x, False),
    ("torch.mul", lambda m, x: torch.mul(m.w, x), False),
    ("mul_method", lambda m, x: x.mul(2.0), False),
    ("operator.truediv", lambda m, x: x / m.w + m.w / (x * x + 1), False),
    ("torch.div", lambda m, x: torch.div(x, m.w), False),
    ("div_method", lambda m, x: x.div(3.0), False),
    ("operator.pow", lambda m, x: x ** 3 + m.w ** x, True),
    ("torch.pow", lambda m, x: torch.pow(x, m.w), True),
    ("pow_method", lambda m, x: x.pow(2), False),
    ("torch.where", lambda m, x: torch.where(x > 0, x * m.w, -x), False),
    ("torch.lerp", lambda m, x: torch.lerp(x, m.w, 0.3), False),
    ("lerp_method_tensor_weight", lambda m, x: x.lerp(x.sin(), m.w), False),
    ("lerp_weight_from_input", lambda m, x: torch.lerp(m.w, m.w * 2, x), False),
    # linear algebra
    ("torch.matmul", lambda m, x: torch.matmul(x, m.W), False),
    ("operator.matmul", lambda m, x: (x @ m.W) @ m.W.t(), False),
    ("matmul_method", lambda m, x: x.matmul(m.w), False),
    ("matmul_vector_left", lambda m, x: m.w @ x.transpose(1, 2), False),
    ("matmul_batched_param", lambda m, x: (x.unsqueeze(1) @ m.V.transpose(1, 2)).sum(1), False),
    ("matmul_heads", lambda m, x: _heads(x) @ (_heads(x) * m.w[:5]).transpose(-2, -1), False),
    ("torch.mm", lambda m, x: torch.mm(x.flatten(1)[:, :5], m.W), False),

    ("mm_method", lambda m, x: x[:, 0].mm(m.W), False),
    ("torch.bmm", lambda m, x: torch.bmm(x, x.transpose(1, 2)), False),
    ("bmm_method", lambda m, x: x.bmm(m.W.expand(x.shape[0], 5, 4)), False),
    ("torch.einsum", lambda m, x: torch.einsum("bij,jk->bik", x, m.W), False),
    ("einsum_list", lambda m, x: torch.einsum("bij,bkj->bik", [x, x]), False),
    ("einsum_sublists", lambda m, x: torch.einsum(x, [0, 1, 2], m.W, [2, 30], [0, 1, 30]), False),
    ("einsum_sublists_implicit", lambda m, x: torch.einsum(x, [..., 27], m.W, [27, 3]), False),
    ("einsum_implicit", lambda m, x: torch.einsum("...j,jk", x, m.W), False),
    ("einsum_three_operands", lambda m, x: torch.einsum("bij,jk,kl->bil", x, m.W, m.V[0]), False),
    ("einsum_summed_partner_index", lambda m, x: torch.einsum("bij,jk->bi", x, m.W), False),
    ("einsum_three_same_input", lambda m, x: torch.einsum("bij,jk,bil->bkl", x, m.W, x), False),
    ("einsum_param_summed_alone", lambda m, x: torch.einsum("bij,kl,jm->bik", x, m.W, m.W[:, :2]), False),
    ("torch.outer", lambda m, x: x * torch.outer(m.w, m.W[:, 0])[:3], False),
    ("outer_method", lambda m, x: x * m.W[:3, 1].outer(m.w), False),
    ("torch.ger", lambda m, x: x[:, 0] @ torch.ger(m.w, m.W[:, 1]), False),
    ("ger_method", lambda m, x: x * m.w.ger(m.W[:3, 0]).t(), False),
    ("outer_batch_of_numbers", lambda m, x: torch.outer(x.sum((1, 2)), m.w), False),
    ("F.linear", lambda m, x: F.linear(x, m.W.t(), m.W[0]), False),
    ("F.linear_positions", lambda m, x: F.linear(x, m.V[0], m.w[:4]), False),
    ("F.bilinear", lambda m, x: F.bilinear(x[:, :, :4], x, m.V, m.W[:3, 0]), False),
    # shape ops
    ("view", lambda m, x: x.contiguous().view(x.shape[0], -1), False),
    ("reshape_method", lambda m, x: x.reshape(x.size(0), 5, 3), False),
    ("torch.reshape", lambda m, x: torch.reshape(x, (-1, 15)), False),
    ("flatten_method", lambda m, x: x.flatten(1), False),
    ("torch.flatten", lambda m, x: torch.flatten(x, 1), False),
    ("unflatten_method", lambda m, x: x.unflatten(2, (5, 1)), False),
    ("torch.unflatten", lambda m, x: torch.unflatten(x, 1, (1, 3)), False),
    ("squeeze_method", lambda m, x: x.unsqueeze(2).squeeze(2), False),
    ("torch.squeeze", lambda m, x: torch.squeeze(x[:, :1], 1), False),
    ("unsqueeze_method", lambda m, x: x.unsqueeze(-1), False),
    ("torch.unsqueeze", lambda m, x: torch.unsqueeze(x, 1), False),
    ("view_as", lambda m, x: x.flatten(1).view_as(x), False),
    ("reshape_as", lambda m, x: x.flatten(1).reshape_as(x), False),
    ("contiguous", lambda m, x: x.transpose(1, 2).contiguous(), False),
    ("clone", lambda m, x: x.clone() * m.w, False),
    ("torch.clone", lambda m, x: torch.clone(x), False),
    ("F.dropout_eval", lambda m, x: F.dropout(x, 0.3, training=False), False),
    ("F.dropout1d", lambda m, x: F.dropout1d(x, 0.3, training=False), False),
    ("F.dropout2d", lambda m, x: F.dropout2d(x.unsqueeze(1), 0.3, training=False), False),
    ("F.dropout3d", lambda m, x: F.dropout3d(x.unsqueeze(1).unsqueeze(1), 0.3, training=False), False),
    ("F.alpha_dropout", lambda m, x: F.alpha_dropout(x, 0.3, training=False), False),
    ("F.feature_alpha_dropout", lambda m, x: F.feature_alpha_dropout(x, 0.3, training=False), False),
    ("permute_method", lambda m, x: x.permute(0, 2, 1), False),
    ("torch.permute", lambda m, x: torch.permute(x, (0, 2, 1)), False),
    ("transpose_method", lambda m, x: x.transpose(-1, 1), False),
    ("torch.transpose", lambda m, x: torch.transpose(x, 1, 2), False),
    ("swapaxes_method", lambda m, x: x.swapaxes(1, 2), False),
    ("torch.swapaxes", lambda m, x: torch.swapaxes(x, 1, 2), False),
    ("t_method", lambda m, x: x[:, 0] @ m.W.t().t(), False),
    ("torch.t", lambda m, x: x[:, 0] @ torch.t(m.V[0].t()).t(), False),
    ("T_attribute", lambda m, x: x[:, 0] @ m.V[0].T, False),
    ("mT_attribute", lambda m, x: x.mT, False),
    ("expand", lambda m, x: x[:, :1].expand(-1, 4, -1), False),
    ("expand_param", lambda m, x: x + m.w.expand(3, 5), False),
    ("expand_as", lambda m, x: m.w.expand_as(x) * x, False),
    ("broadcast_to_method", lambda m, x: x[:, :1].broadcast_to(x.shape), False),
    ("torch.broadcast_to", lambda m, x: torch.broadcast_to(x[:, :, :1], (x.shape[0], 3, 5)), False),
    ("repeat", lambda m, x: x.repeat(1, 2, 1) + m.w.repeat(6, 1), False),
    ("torch.cat", lambda m, x: torch.cat([x, m.W.t().unsqueeze(0).expand(x.shape[0], -1, -1)[:, :3], x], 1),
     False),
    ("torch.concat", lambda m, x: torch.concat([x, -x], dim=-1), False),
    # torch.cat skips a 1-D empty piece among pieces of another rank (an empty cache: Hugging Face's DynamicCache)
    ("cat_legacy_empty", lambda m, x: torch.cat([x.new_zeros(0), x * m.w, torch.tensor([]).to(x)], -2), False),
    ("torch.concatenate", lambda m, x: torch.concatenate([x, x * 2], axis=1), False),
    ("torch.stack", lambda m, x: torch.stack([x, x * m.w], 1), False),
    ("chunk_method", lambda m, x: x.chunk(2, -1)[1] * x.chunk(2, -1)[0][..., :2], False),
    ("torch.chunk", lambda m, x: torch.chunk(x, 3, 1)[2], False),
    ("split_method", lambda m, x: x.split([2, 3], -1)[1], False),
    ("torch.split", lambda m, x: torch.split(x, 2, 2)[0] + torch.split(x, 2, 2)[1], False),
    ("unbind_method", lambda m, x: x.unbind(1)[0] * x.unbind(1)[2], False),
    # a tuple-valued op handed whole to another (tracing.unpack_sequence_arguments)
    ("stack_of_chunk", lambda m, x: torch.stack(x.chunk(5, -1), 1) * m.w[:1], False),
    ("cat_of_split_reversed", lambda m, x: torch.cat(x.split([2, 3], -1)[::-1], -1), False),
    ("cat_of_unbind", lambda m, x: torch.cat(torch.unbind(x * m.w, 1), -1), False),
    ("dstack_of_tensor_split", lambda m, x: torch.dstack(x.tensor_split(2, -1)) * m.w[:1], False),
    ("torch.unbind", lambda m, x: torch.unbind(x, -1)[3], False),
    ("getitem_slices", lambda m, x: x[:, 1:, ::2], False),
    ("getitem_int_none_ellipsis", lambda m, x: x[:, 0, None, ...], False),
    ("getitem_index_tensor", lambda m, x: x[:, torch.tensor([0, 2, 2])], False),
    ("getitem_list_repeats", lambda m, x: x[:, [0, 2, 2, 1]], False),  # the copies' cotangents add
    ("getitem_ellipsis_list", lambda m, x: x[..., [4, 0, 0]], False),
    ("getitem_tuple_entry", lambda m, x: x[:, (1, 1)], False),
    ("getitem_param_list", lambda m, x: x * m.w[..., [0, 0, 1, 4, 4]], False),
    ("torch.gather", lambda m, x: torch.gather(x, 2, x.abs().argsort(2)[:, :, [0, 4, 4, 1]]), False),
    ("gather_method", lambda m, x: x.gather(1, x.argmax(1, keepdim=True).expand(-1, 2, -1)), False),
    ("torch.index_select", lambda m, x: torch.index_select(x, 2, torch.tensor([4, 0, 0, 2])), False),
    ("index_select_param", lambda m, x: x[:, :, :4] * m.W.index_select(0, torch.tensor([1, 1, 3])), False),
    ("index_add_method", lambda m, x: x.index_add(2, torch.tensor([0, 0, 3]), x[:, :, 1:4] ** 2, alpha=0.5), False),
    ("torch.index_add", lambda m, x: torch.index_add(x, 1, torch.tensor([2, 2]),
                                                     m.W.t()[None, :2].expand(x.shape[0], -1, -1)), False),
    ("index_add_inplace", lambda m, x: torch.zeros_like(x).index_add_(1, torch.tensor([2, 0, 2]), x), False),
    ("scatter_add_method", lambda m, x: x.scatter_add(2, x.abs().argsort(2)[:, :, :3], x[:, :, :3] ** 2), False),
    ("torch.scatter_add", lambda m, x: torch.scatter_add(torch.zeros_like(x), 1, x.argsort(1), x * m.w), False),
    ("scatter_add_inplace", lambda m, x: torch.zeros_like(x).scatter_add_(2, x.argsort(2) // 2, x), False),
    ("gather_param", lambda m, x: x[:, :, :2] * m.W.gather(0, torch.tensor([[1, 1], [0, 2], [2, 2]])), False),
    ("getitem_bool_mask", lambda m, x: x[:, :, torch.tensor([True, False, True, True, False])], False),
    ("getitem_param_row", lambda m, x: x * m.W[1:3, 0].sum(), False),
    ("torch.flip", lambda m, x: torch.flip(x, [1, 2]), False),
    ("flip_method", lambda m, x: x.flip(-1), False),
    ("flip_varargs", lambda m, x: x.flip(1, 2), False),
    ("setitem_slices", _set_slices, False),
    ("setitem_mask_scalar", _set_mask_scalar, False),
    ("setitem_mask_values", _set_mask_values, False),
    ("setitem_broadcast", _set_broadcast, False),
    ("setitem_row_of_zeros", _set_row, False),
    ("setitem_slice_written_twice", _write_slice_twice, False),
    ("setitem_param_value", _set_param, False),
    ("F.pad", lambda m, x: F.pad(x, (1, 2, 0, 1)), False),
    ("torch.narrow", lambda m, x: torch.narrow(x, 2, 1, 3), False),
    ("narrow_method", lambda m, x: x.narrow(1, 0, 2), False),
    ("narrow_from_the_end", lambda m, x: x.narrow(-1, -2, 2), False),
    ("F.pad_reflect", lambda m, x: F.pad(x, (1, 2), mode="reflect"), False),
    ("F.pad_reflect_2d", lambda m, x: F.pad(x, (2, 2, 1, 2), mode="reflect"), False),
    ("F.pad_replicate", lambda m, x: F.pad(x, (0, 2, 2, 1), mode="replicate"), False),
    ("F.pad_replicate_3d", lambda m, x: F.pad(x.unsqueeze(1), (1, 0, 0, 1, 1, 2), mode="replicate"), False),
    ("F.pad_circular", lambda m, x: F.pad(x, (2, 1), mode="circular"), False),
    ("F.pad_circular_2d_crop", lambda m, x: F.pad(x, (-1, 3, 1, -1), mode="circular"), False),
    ("repeat_interleave_method", lambda m, x: x.repeat_interleave(2, dim=1), False),
    ("torch.repeat_interleave", lambda m, x: torch.repeat_interleave(x, 2, dim=-1), False),
    ("repeat_interleave_flat_param", lambda m, x: x * torch.repeat_interleave(m.V[0, :3, :1], 5).view(3, 5), False),
    ("repeat_interleave_tensor", lambda m, x: x.repeat_interleave(torch.tensor([1, 0, 2, 1, 3]), -1), False),
    ("movedim_method", lambda m, x: x.movedim(1, 2), False),
    ("torch.movedim", lambda m, x: torch.movedim(x.unsqueeze(1).expand(-1, 2, -1, -1), (-1, 1), (1, -2)), False),
    ("moveaxis_method", lambda m, x: x.moveaxis(-1, 1), False),
    ("torch.moveaxis", lambda m, x: torch.moveaxis(x, 2, 1), False),
    ("select_method", lambda m, x: x.select(1, 2), False),
    ("torch.select", lambda m, x: torch.select(x, -1, -2), False),
    ("tril_method", lambda m, x: x.tril(), False),
    ("torch.tril", lambda m, x: torch.tril(x, -1), False),
    ("triu_method", lambda m, x: x.triu(1), False),
    ("torch.triu", lambda m, x: torch.triu(x, diagonal=-1), False),
    ("torch.roll", lambda m, x: torch.roll(x, 2, 2), False),
    ("roll_method_several_dims", lambda m, x: x.roll((1, -2), (1, -1)), False),
    ("roll_shift_past_size", lambda m, x: torch.roll(x, shifts=-7, dims=-1), False),
    ("roll_flattened_param", lambda m, x: x * torch.roll(m.W, -3)[:3, :1], False),  # dims=None: flattened
    ("F.channel_shuffle", lambda m, x: F.channel_shuffle(x.reshape(x.shape[0], 15, 1), 3), False),
    ("to_dtype", lambda m, x: x.to(torch.float64) * 2, False),
    ("double_method", lambda m, x: x.double() * m.w, False),
    ("type_as", lambda m, x: x.type_as(m.w), False),
    # reductions
    ("torch.sum", lambda m, x: torch.sum(x * m.w, 1), False),
    ("sum_method", lambda m, x: x.sum(dim=(1, 2), keepdim=True), False),
    ("torch.mean", lambda m, x: torch.mean(x, -1), False),
    ("mean_method", lambda m, x: x.mean((1,), keepdim=True) * m.w, False),
    ("torch.amax", lambda m, x: torch.amax(x, 1), False),
    ("amax_method", lambda m, x: x.amax(-1, keepdim=True), False),
    ("amax_ties", lambda m, x: torch.amax(torch.round(x), 2), False),
    ("torch.amin", lambda m, x: torch.amin(x, 1), False),
    ("amin_method", lambda m, x: x.amin((1, 2)), False),
    ("torch.max_dim", lambda m, x: torch.max(x, 1)[0], False),
    ("max_method_values", lambda m, x: x.max(-1, keepdim=True).values, False),
    ("torch.min_dim", lambda m, x: torch.min(x, 2).values, False),
    ("outer_same_operand", lambda m, x: x + torch.outer(m.w, m.w)[:3], False),
    ("clamp_tensor_bounds", lambda m, x: x.clamp(min=-m.w, max=m.w * 2), False),
    ("clamp_bounds_from_input", lambda m, x: torch.clamp(x, min=-x.abs().mean(1, keepdim=True), max=x.flip(-1)),
     False),
    ("clamp_crossed_bounds", lambda m, x: torch.clamp(x, x.cos(), x.sin() * m.w), False),
    ("clip_tensor_min", lambda m, x: x.clip(min=m.w - 1.0), False),
    ("clamp_tensor_max", lambda m, x: x.clamp(max=torch.ones_like(x) * 0.3), False),
    ("number_to_the_power", lambda m, x: 2.0 ** (x * m.w) + torch.pow(1.5, x), False),
    ("div_by_traced_number", lambda m, x: x / (x.size(-1) ** 0.5) + m.w / x.shape[1], False),
    ("topk_values_and_gather", lambda m, x: x.topk(2, -1).values * x.gather(-1, x.topk(2, -1).indices), False),
    ("torch.topk", lambda m, x: torch.topk(x * m.w, 3, 1, largest=False)[0], False),
    ("topk_inplace_on_values", lambda m, x: _topk_normalised(x), False),  # probe CC: Mixtral's router
    ("torch.sort", lambda m, x: torch.sort(x, -1, descending=True).values * m.w, False),
    ("sort_method_stable", lambda m, x: torch.cat([x, x[:, :, :2]], -1).sort(dim=-1, stable=True)[0], False),  # ties
    ("torch.cummax", lambda m, x: torch.cummax(x * m.w, -1).values, False),
    ("cummin_method", lambda m, x: x.cummin(1)[0], False),
    ("torch.cummin", lambda m, x: torch.cummin(x, 2).values + x.cummax(-1).values * m.w, False),
    ("torch.addmm", lambda m, x: torch.addmm(m.V[0, :, 0], x.reshape(-1, 5), m.W, beta=0.5, alpha=2.0)
     .view(x.shape[0], 3, 4), False),
    ("torch.baddbmm", lambda m, x: torch.baddbmm(m.V[0, :3, :4], x, m.W.expand(x.shape[0], 5, 4)), False),
    # complex intermediates: the autograd fallback, with autograd's conventions
    ("fft_abs", lambda m, x: torch.fft.rfft(x * m.w, dim=-1).abs(), False),
    ("fft_real_imag", lambda m, x: torch.fft.fft(x, dim=1).real * torch.fft.fft(x * m.w, dim=1).imag, False),
    # the binary forms: the second operand, bound as ``dim``, may be the only one with a tangent
    ("torch.max_binary", lambda m, x: torch.max(x.detach(), x * m.w), False),
    ("min_method_binary", lambda m, x: (x * 0.5).min(m.w * x), False),
    ("min_method", lambda m, x: x.min(1)[0], False),
    ("torch.logsumexp", lambda m, x: torch.logsumexp(x, -1), False),
    ("logsumexp_method", lambda m, x: x.logsumexp(1, keepdim=True), False),
    ("torch.var", lambda m, x: torch.var(x, -1), False),
    ("var_method", lambda m, x: x.var(1, unbiased=False, keepdim=True), False),
    ("torch.std", lambda m, x: torch.std(x, 2, correction=0), False),
    ("std_method", lambda m, x: x.std(-1), False),
    ("torch.cumsum", lambda m, x: torch.cumsum(x, 1), False),
    ("cumsum_method", lambda m, x: x.cumsum(-1), False),
    ("torch.prod", lambda m, x: torch.prod(x, 1), False),
    ("prod_method", lambda m, x: x.prod(-1, keepdim=True), False),
    ("prod_all_param", lambda m, x: x * m.w.prod(), False),
    ("prod_with_zeros", lambda m, x: (x * _ZEROS).prod(-1), False),
    ("torch.cumprod", lambda m, x: torch.cumprod(x, 1), False),
    ("cumprod_method_zeros", lambda m, x: (x * _ZEROS).cumprod(-1), False),  # rows with one, two and no zeros
    ("cumprod_param", lambda m, x: x * m.w.cumprod(0), False),
    # vector norms: the middle row of x * _ZEROS[:, :1] is a zero vector (autograd's subgradient there is 0)
    ("torch.linalg.vector_norm", lambda m, x: torch.linalg.vector_norm(x * _ZEROS[:, :1], dim=-1), False),
    ("vector_norm_p1_zeros", lambda m, x: torch.linalg.vector_norm(x * _ZEROS, 1, (1, 2), keepdim=True), False),
    ("vector_norm_inf_ties", lambda m, x: torch.linalg.vector_norm(torch.cat([x, -x], -1) * _ZEROS[:, :1],
                                                                   float("inf"), -1), False),
    ("vector_norm_ninf", lambda m, x: torch.linalg.vector_norm(x, -float("inf"), 1, keepdim=True), False),
    ("vector_norm_p1.5_zeros", lambda m, x: torch.linalg.vector_norm(x * _ZEROS, 1.5, -1), False),
    ("vector_norm_p3_zeros", lambda m, x: torch.linalg.vector_norm(x * _ZEROS, 3, -1), False),
    ("vector_norm_p0.5_zeros", lambda m, x: torch.linalg.vector_norm(x * _ZEROS, 0.5, -1), False),
    ("vector_norm_p0", lambda m, x: torch.linalg.vector_norm(x, 0, -1), False),
    ("vector_norm_all_param", lambda m, x: x * torch.linalg.vector_norm(m.V), False),
    ("torch.norm", lambda m, x: torch.norm(x * _ZEROS[:, :1], dim=-1), False),
    ("torch.norm_p3", lambda m, x: torch.norm(x, 3, 1), False),
    ("norm_method", lambda m, x: x.norm(dim=(1, 2), keepdim=True) * m.w.norm(p=1), False),
    ("norm_method_fro", lambda m, x: x.norm("fro", (1, 2), True), False),
    ("torch.linalg.norm", lambda m, x: torch.linalg.norm(x, dim=(1, 2), keepdim=True), False),
    ("linalg_norm_vector_inf", lambda m, x: torch.linalg.norm(x, float("inf"), -1), False),
    ("linalg_norm_matrix_2", lambda m, x: torch.linalg.norm(x, 2, (1, 2)), False),  # spectral: the fallback
    ("F.cosine_similarity", lambda m, x: F.cosine_similarity(x * _ZEROS[:, :1], x * m.w, dim=-1), False),
    ("cosine_similarity_broadcast", lambda m, x: F.cosine_similarity(x[:, :, None, :4], m.W, dim=-1), False),
    ("cosine_similarity_dim1", lambda m, x: F.cosine_similarity(x, m.V[0, :3] + x[:, :1], 1), False),
    ("F.pairwise_distance", lambda m, x: F.pairwise_distance(x, x * m.w), False),
    ("pairwise_distance_p1_param", lambda m, x: F.pairwise_distance(x, m.w, p=1, keepdim=True), False),
    # a spatial transformer's sampling grid, sized by the batch (probe AE: the fallback split the size into samples)
    ("F.affine_grid", lambda m, x: F.affine_grid(x[:, :2, :3] + m.W[:2, :3], [x.shape[0], 1, 4, 5], False), False),
    ("affine_grid_3d", lambda m, x: F.affine_grid(x[:, :, :4] * m.w[:4], [x.shape[0], 2, 2, 3, 2], True), False),
    # constants for differentiation
    ("argmax_gather", lambda m, x: x.gather(-1, x.argmax(-1, keepdim=True)), False),
    ("masks_and_casts", lambda m, x: x * (x > 0).to(x.dtype) + x.floor() + torch.sign(x), False),
    ("shape_arith", lambda m, x: x.reshape(x.shape[0], x.size(1) * x.shape[-1] // 1), False),
]


def _input(batch, positive, contiguous=True):
    g = torch.Generator().manual_seed(batch)
    if contiguous:
        x = torch.randn(batch, 3, 5, generator=g, dtype=torch.float64)
    else:  # a transposed view: non-contiguous
        x = torch.randn(batch, 5, 3, generator=g, dtype=torch.float64).transpose(1, 2)
    return x.abs() + 0.5 if positive else x


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name,f,positive", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_rule(name, f, positive, batch):
    model = Op(f, positive)
    check_direction_products(model, (_input(batch, positive, contiguous=batch == 1),),
                             products=("jvp", "vjp", "mjp"))


_FUSED = ["relu_method", "F.leaky_relu", "F.elu", "F.gelu", "F.gelu_tanh", "F.silu", "torch.tanh", "torch.sigmoid",
          "F.softplus", "F.hardtanh", "F.relu6", "F.mish", "F.selu", "F.celu", "F.hardswish", "F.hardsigmoid",
          "F.logsigmoid", "F.softshrink", "torch.hardshrink", "F.threshold"]
_ALLOCATING = {"F.mish", "F.hardswish"}  # their ATen backward kernels have no ``grad_input=`` form to write into


@pytest.mark.parametrize("name", _FUSED)
def test_fused_activation_kernels_in_float32(name):
    # The activations apply f'(x)·t with ATen's backward kernels, broadcasting a stack against the primal: their
    # float32 CPU paths (oneDNN for gelu) must take it too.
    f = next(s[1] for s in SAMPLES if s[0] == name)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 5, generator=g) * 2
    check_direction_products(Op(f).float(), (x,), dtype=torch.float32, products=("jvp", "vjp", "mjp"))


@pytest.mark.parametrize("name,f,positive", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_rule_diag_backprop(name, f, positive):
    if name in _NOT_ONE_OP:
        pytest.skip("composite sample: several ops, cross terms")
    check_diag_backprop(Op(f, positive), (_input(2, positive),), names=_params_used(f))


# Samples that chain several structured ops (so diagonal back-propagation is not exact there).
_NOT_ONE_OP = {
    "torch.topk", "topk_inplace_on_values", "torch.sort", "sort_method_stable", "torch.cummax", "torch.cummin",
    "operator.mul", "operator.truediv", "operator.pow", "torch.where", "operator.matmul", "matmul_vector_left",
    "matmul_batched_param", "torch.mm", "mm_method", "bmm_method", "F.linear", "F.linear_positions", "F.bilinear",
    "torch.bmm", "einsum_list", "clone", "repeat", "torch.cat", "torch.stack", "chunk_method", "torch.split",
    "unbind_method", "getitem_param_row", "getitem_param_list", "gather_param", "index_select_param",
    "index_add_method", "torch.index_add", "scatter_add_method", "torch.scatter_add", "t_method", "torch.t",
    "T_attribute", "expand_param", "expand_as",
    "sum_all", "mean_method", "max_all", "argmax_gather", "masks_and_casts", "torch.sum", "F.relu6",
    "float_method", "to_dtype", "amax_ties", "squeeze_method", "view_as", "reshape_as", "contiguous",
    "torch.concatenate", "F.dropout2d", "F.dropout3d", "torch.squeeze", "broadcast_to_method",
    "torch.broadcast_to", "expand", "operator.sub", "getitem_int_none_ellipsis", "bmm_method",
    "stack_of_chunk", "cat_of_split_reversed", "cat_of_unbind", "dstack_of_tensor_split", "F.prelu_channels",
    "F.prelu_one", "torch.max_binary", "min_method_binary", "outer_same_operand", "clamp_tensor_bounds",
    "number_to_the_power", "div_by_traced_number", "fft_abs", "fft_real_imag",
    "topk_values_and_gather", "torch.addmm", "torch.baddbmm", "matmul_heads", "F.glu", "F.glu_dim1",
    "clamp_bounds_from_input", "clamp_crossed_bounds", "clip_tensor_min", "clamp_tensor_max", "F.pad_replicate_3d",
    "repeat_interleave_flat_param", "torch.movedim", "prod_all_param", "prod_with_zeros",
    "roll_flattened_param", "cumprod_param", "vector_norm_inf_ties", "vector_norm_all_param", "norm_method",
    "einsum_param_summed_alone", "F.cosine_similarity", "cosine_similarity_broadcast", "cosine_similarity_dim1",
    "F.pairwise_distance", "pairwise_distance_p1_param", "lerp_method_tensor_weight", "lerp_weight_from_input",
    "einsum_three_same_input", "torch.outer", "outer_method", "torch.ger", "ger_method",
    "setitem_slices", "setitem_mask_values", "setitem_broadcast", "setitem_row_of_zeros",
    "setitem_slice_written_twice", "setitem_param_value",
}


def _params_used(f):
    import inspect

    src = inspect.getsource(f)
    used = [n for n in ("w", "W", "V") if f"m.{n}" in src]
    return used or None


def test_adjoint_identity_on_a_branching_net():
    """<u, J v> = <Jᵀ u, v> for products built separately (forward and backward passes agree)."""
    import fxjac

    model = Op(lambda m, x: torch.tanh(x @ m.W) @ m.W.t() * x + x.sum(-1, keepdim=True) * m.w)
    x = _input(4, False)
    g = torch.Generator().manual_seed(9)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    u = torch.randn(x.shape, generator=g, dtype=torch.float64)
    _, jv = fxjac.jvp(model)(x, v)
    _, jtu = fxjac.vjp(model)(x, u)
    assert abs((u * jv).sum() - (jtu * v).sum()) < 1e-10 * (u * jv).abs().sum()


def test_operator_spellings_are_registered():
    from fxjac.rules import RULES

    for key in (operator.add, operator.mul, operator.matmul, operator.getitem, "relu", torch.tanh, F.linear):
        assert key in RULES


class _ConvActPool(nn.Module):
    """conv → activation → max pool, the activation's output also read by a second branch where ``fan_out``."""

    def __init__(self, f, fan_out):
        super().__init__()
        self.f, self.fan_out = f, fan_out
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(12, 4)

    def forward(self, x):
        h = self.f(self.conv(x))
        out = F.max_pool2d(h, 2)
        if self.fan_out:
            out = out + F.avg_pool2d(h, 2)
        return self.fc(out.flatten(1))


@pytest.mark.parametrize("fan_out", [False, True])
@pytest.mark.parametrize("name", _FUSED)
def test_activation_kernels_write_into_fresh_cotangents(name, fan_out):
    """Note [reused cotangents]: behind a max pooling (and a sum of two branches) the activation's backward kernel
    writes into the cotangent stack it reads; every product stays exact, in float64 and float32.
    """
    import fxjac

    f = next(s[1] for s in SAMPLES if s[0] == name)
    inner = lambda t: f(None, t)  # noqa: E731
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = _ConvActPool(inner, fan_out)
    x = torch.randn(3, 2, 4, 4, generator=g) * 2
    code = fxjac.ggn(model, loss="cross_entropy", out="diag", example_inputs=(x,)).code
    # A ReLU whose one user is the max pooling moves after it (Note [ReLU after max pooling]): its mask then
    # meets the pooled cotangent, which is not fresh; behind the pooling and a sum it still writes in place.
    assert ("into_cotangent" in code) == ((name != "relu_method" or fan_out) and name not in _ALLOCATING)
    check_direction_products(model.double(), (x.double(),), products=("vjp", "mjp"))
    check_direction_products(model.float(), (x,), dtype=torch.float32, products=("vjp", "mjp"))


def test_cotangents_read_elsewhere_are_never_overwritten():
    """The caller's cotangent, and a cotangent an addition hands to both of its inputs (also where the other reader
    comes after the activation's kernel), are read by more than the activation: they are never written into
    (Note [reused cotangents]).
    """
    import fxjac

    class Net(nn.Module):
        def forward(self, x):
            return torch.relu(torch.relu(x) + x.flip(-1))

    class Later(nn.Module):  # found by the fuzzer: x's second reader of that cotangent comes after tanh's kernel
        def forward(self, x):
            h = torch.tanh(x) + x
            return h.mean(-1, keepdim=True) * h

    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    w = torch.randn(3, 4, dtype=torch.float64)
    keep = w.clone()
    for net in (Net(), Later()):
        p = fxjac.vjp(net, wrt="input", example_inputs=(x,))
        assert "into_cotangent" not in p.code
        _, got = p(x, w)
        assert torch.equal(w, keep)
        _, ref = torch.func.vjp(net, x)
        assert torch.allclose(got, ref(w)[0], rtol=1e-12, atol=1e-12)
        check_direction_products(net, (x,), products=("vjp", "mjp"))


def test_cdist_against_autograd_without_vmap():
    # torch.cdist is expanded into norms of differences (ATen's kernel has no forward-mode formula and no second
    # derivative). The reference is reverse-mode autograd row by row: torch.func's vmapped cdist backward gives
    # wrong values here in torch 2.13.
    model = Op(lambda m, x: torch.cat([torch.cdist(x, m.W.t().expand(x.shape[0], 4, 5)),
                                       torch.cdist(x, x[:, :2] * 2, p=1.5)], -1))
    x = _input(2, False)
    J = torch.autograd.functional.jacobian(model, x)  # [B, 3, 6, B, 3, 5], one backward per output entry
    J = torch.stack([J[b, :, :, b] for b in range(2)]).reshape(2, 18, 15)
    v, w = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    _, t = fxjac.jvp(model)(x, v)
    assert_close(t.reshape(2, 18), torch.einsum("boi,bi->bo", J, v.reshape(2, 15)), "jvp through cdist")
    _, g = fxjac.vjp(model)(x, w)
    assert_close(g.reshape(2, 15), torch.einsum("boi,bo->bi", J, w.reshape(2, 18)), "vjp through cdist")


def test_matmul_copies_a_strided_operand_once_for_its_derivatives():
    # Note [contiguous matmul operands]: head-split operands do not fold into one batched GEMM; the primal copies
    # each once and the derivatives multiply the copies (before, every product on the view copied it again).
    model = Op(lambda m, x: _heads(x) @ (_heads(x) * m.w[:5]).transpose(-2, -1), False)
    x = _input(3, False)
    p = fxjac.vjp(model, example_inputs=(x,))
    assert p.code.count(".contiguous()") == 3  # both operands, and the cotangent both products read
    p = fxjac.vjp(model, wrt="params", example_inputs=(x,))
    assert p.code.count(".contiguous()") == 2  # only the right operand's cotangent is needed
    check_direction_products(model, (x,), products=("jvp", "vjp"))


# --- kinks and ties: the derivative there is autograd's (reverse mode), in every product -----------------------

_KINKS = [  # (id, f(x), values placed in the input exactly)
    ("F.hardswish", lambda x: F.hardswish(x), (-3.0, 3.0)),  # 0 at -3, 1 at 3
    ("F.hardsigmoid", lambda x: F.hardsigmoid(x), (-3.0, 3.0)),  # 0 at both
    ("F.softshrink", lambda x: F.softshrink(x, 0.5), (-0.5, 0.5)),  # 0 at both
    ("torch.hardshrink", lambda x: torch.hardshrink(x, 0.5), (-0.5, 0.5)),  # 0 at both
    ("F.threshold", lambda x: F.threshold(x, 0.1, 2.0), (0.1,)),  # 0 at the threshold
    ("F.softshrink_traced_lambd", lambda x: F.softshrink(x, x.shape[-1] / 10), (-0.5, 0.5)),
    ("hardshrink_traced_lambd", lambda x: x.hardshrink(x.shape[-1] / 10), (-0.5, 0.5)),
    ("F.threshold_traced", lambda x: F.threshold(x, x.shape[-1] / 20, 2.0), (0.25,)),
    ("F.selu", lambda x: F.selu(x), (0.0,)),  # scale·alpha at 0
    ("F.celu", lambda x: F.celu(x, 0.7), (0.0,)),  # 1 at 0
    ("torch.prod", lambda x: x.prod(-1), (0.0,)),  # rows with one zero and with two
    ("torch.cumprod", lambda x: x.cumprod(-1), (0.0,)),  # from the first zero on, only its derivative counts
    ("vector_norm_p1", lambda x: torch.linalg.vector_norm(x, 1, -1), (0.0,)),  # sgn(0) = 0
    ("vector_norm_p1.5", lambda x: torch.linalg.vector_norm(x, 1.5, -1), (0.0,)),
    ("vector_norm_p0.5", lambda x: torch.linalg.vector_norm(x, 0.5, -1), (0.0,)),  # 0 at a zero entry
    ("vector_norm_inf", lambda x: torch.linalg.vector_norm(x, float("inf"), -1), (3.0, -3.0)),  # ties split evenly
    ("vector_norm_zero_vector", lambda x: torch.linalg.vector_norm(x[:, :, :1], 2, -1), (0.0,)),  # 0 there
    ("F.cosine_similarity", lambda x: F.cosine_similarity(x[..., ::3], x[..., 1:3] + 1, -1), (0.0,)),  # x1 = 0
    # cdist's p = ∞ gives every tied coordinate the full sign (vector_norm splits it): probe ZZ
    ("cdist_inf", lambda x: torch.cdist(x, torch.zeros_like(x[:, :2]), p=float("inf")), (3.0, -3.0)),
]


def _autograd_blocks(model, x):
    """Per-sample Jacobians ``[B, O, I]`` by plain reverse-mode autograd (no vmap)."""
    B = x.shape[0]
    J = torch.autograd.functional.jacobian(model, x).reshape(B, -1, B, x[0].numel())
    return torch.stack([J[b, :, b] for b in range(B)])


def _check_against_autograd(model, x, dtype):
    """jvp, vjp and diagonal back-propagation w.r.t. the input against ``_autograd_blocks`` in the same dtype (the
    kinks of float32 inputs are float32 numbers: 0.1 is not float64's).
    """
    J = _autograd_blocks(model, x).double()
    B, O, n = J.shape
    g = torch.Generator().manual_seed(3)
    v, u = (torch.randn(B, k, generator=g, dtype=torch.float64) for k in (n, O))
    _, t = fxjac.jvp(model, wrt="input", strict=True)(x, v.to(dtype).reshape(x.shape))
    assert_close(t.reshape(B, O), torch.einsum("boi,bi->bo", J, v), "jvp", dtype)
    _, c = fxjac.vjp(model, wrt="input", strict=True)(x, u.to(dtype).reshape(B, *model(x).shape[1:]))
    assert_close(c.reshape(B, n), torch.einsum("boi,bo->bi", J, u), "vjp", dtype)
    p = fxjac.jtmjp(model, wrt="input", matrix="diag", out="diag", method="diag_backprop", strict=True)
    _, d = p(x, u.to(dtype))
    assert_close(d.reshape(B, n), torch.einsum("boi,bo->bi", J * J, u), "diag_backprop", dtype)
    assert J.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,f,kinks", _KINKS, ids=[k[0] for k in _KINKS])
def test_derivative_at_kinks_is_autograds(name, f, kinks, dtype):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2
    flat = x.view(-1)
    flat[::3] = torch.tensor(kinks, dtype=torch.float64).repeat(10)[:10]  # every 3rd entry a kink: rows of 5
    x = x.to(dtype)                                                         # hold one or two
    assert all((x == k).any() for k in torch.tensor(kinks, dtype=dtype))
    _check_against_autograd(Fn(f).to(dtype), x, dtype)


def _clamp_input():
    """Rows x, lo, hi (per sample) meeting every tie of clamp: x = lo < hi, lo < x = hi, x < lo = hi, lo > hi with x
    between, x = lo = hi; x > lo = hi, x < lo < hi, x > hi > lo, x < hi < lo, lo < x < hi.
    """
    x = [[0.0, 1.0, -1.0, 0.3, 0.5], [0.9, -2.0, 3.0, 0.0, 0.2]]
    lo = [[0.0, 0.0, 0.5, 0.5, 0.5], [0.5, 1.0, 0.0, 0.5, -0.5]]
    hi = [[1.0, 1.0, 0.5, 0.1, 0.5], [0.5, 2.0, 1.0, 0.1, 0.5]]
    return torch.tensor([[a, b, c] for a, b, c in zip(x, lo, hi)], dtype=torch.float64)


@pytest.mark.parametrize("bounds", ["both", "min", "max"])
def test_clamp_with_tensor_bounds_at_ties_is_autograds(bounds):
    # autograd's backward: x keeps the derivative at a bound it touches, min gets it where x < min < max, max where
    # x > max or max < min (and nothing does where x < min = max); forward mode (torch.func.jvp) differs at ties.
    lo = (lambda x: x[:, 1]) if bounds != "max" else (lambda x: None)
    hi = (lambda x: x[:, 2]) if bounds != "min" else (lambda x: None)
    model = Fn(lambda x: torch.clamp(x[:, 0], lo(x), hi(x)))
    _check_against_autograd(model, _clamp_input(), torch.float64)


_NEW_RULES = [
    "F.mish", "F.selu", "torch.selu", "F.celu", "torch.celu", "F.softsign", "F.logsigmoid", "F.hardswish",
    "F.hardsigmoid", "F.tanhshrink", "F.softshrink", "torch.hardshrink", "hardshrink_method", "F.threshold",
    "torch.threshold", "F.softshrink_traced_lambd", "hardshrink_traced_lambd", "F.threshold_traced", "F.glu",
    "F.glu_dim1", "clamp_tensor_bounds", "clamp_bounds_from_input",
    "clamp_crossed_bounds", "clip_tensor_min", "clamp_tensor_max", "F.pad_reflect", "F.pad_reflect_2d",
    "F.pad_replicate", "F.pad_replicate_3d", "F.pad_circular", "F.pad_circular_2d_crop", "repeat_interleave_method",
    "torch.repeat_interleave", "repeat_interleave_tensor", "repeat_interleave_flat_param", "movedim_method",
    "torch.movedim", "moveaxis_method", "torch.moveaxis", "select_method", "torch.select", "tril_method",
    "torch.tril", "triu_method", "torch.triu", "torch.prod", "prod_method", "prod_all_param", "prod_with_zeros",
    "torch.roll", "roll_method_several_dims", "roll_shift_past_size", "roll_flattened_param", "F.channel_shuffle",
    "torch.cumprod", "cumprod_method_zeros", "cumprod_param", "torch.linalg.vector_norm", "vector_norm_p1_zeros",
    "vector_norm_inf_ties", "vector_norm_ninf", "einsum_param_summed_alone", "vector_norm_p1.5_zeros",
    "vector_norm_p3_zeros",
    "vector_norm_p0.5_zeros", "vector_norm_p0", "vector_norm_all_param", "torch.norm", "torch.norm_p3", "norm_method",
    "norm_method_fro", "torch.linalg.norm", "linalg_norm_vector_inf", "F.cosine_similarity",
    "cosine_similarity_broadcast", "cosine_similarity_dim1", "F.pairwise_distance", "pairwise_distance_p1_param",
    "torch.lerp", "lerp_method_tensor_weight", "lerp_weight_from_input", "einsum_list", "einsum_three_operands",
    "einsum_summed_partner_index", "einsum_three_same_input", "torch.outer", "outer_method", "torch.ger",
    "ger_method", "outer_batch_of_numbers", "outer_same_operand", "F.affine_grid", "affine_grid_3d", "torch.topk",
    "topk_inplace_on_values", "torch.sort", "sort_method_stable", "torch.cummax", "cummin_method",
    "torch.cummin",
]


@pytest.mark.parametrize("name", _NEW_RULES)
def test_no_autograd_fallback(name):
    # These ops went through the autograd fallback (with its warning); strict=True refuses any op without a
    # structured rule, or whose rule declines the call, and no fallback warning is given.
    import warnings

    f = next(s[1] for s in SAMPLES if s[0] == name)
    model, x = Op(f), _input(2, False)
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for wrt in ("input", "params"):
            fxjac.vjp(model, wrt=wrt, strict=True)(x, model(x))
            fxjac.jvp(model, wrt=wrt, strict=True)(x, x if wrt == "input" else v)
        if name not in _NOT_ONE_OP:
            fxjac.jtmjp(model, matrix="diag", out="diag", method="diag_backprop", strict=True)(x, model(x).flatten(1))
    assert not [w for w in caught if "fallback" in str(w.message)]


@pytest.mark.parametrize("name", ["torch.einsum", "einsum_three_operands", "einsum_param_summed_alone",
                                  "outer_batch_of_numbers", "cosine_similarity_broadcast", "pairwise_distance_p1_param",
                                  "torch.lerp"])
def test_per_sample_parameter_products_without_fallback(name):
    # An unbatched operand against a batched one: per-sample stacks through the rule (values: test_rule).
    f = next(s[1] for s in SAMPLES if s[0] == name)
    model, x = Op(f), _input(2, False)
    P = sum(p.numel() for p in model.parameters())
    fxjac.vjp(model, wrt="params", reduce="none", strict=True)(x, model(x))
    fxjac.jvp(model, wrt="params", strict=True)(x, torch.ones(2, P, dtype=torch.float64))


def test_channel_shuffle_module():
    # nn.ChannelShuffle calls F.channel_shuffle: a permutation of the channels, its adjoint the inverse one.
    model = nn.Sequential(nn.Conv1d(2, 6, 1), nn.ChannelShuffle(3), nn.Conv1d(6, 2, 1)).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_direction_products(model, (x,), products=("jvp", "vjp", "mjp"))
    fxjac.vjp(model, wrt="params", strict=True)(x, model(x))
    check_diag_backprop(nn.Sequential(nn.ChannelShuffle(2)).double(), (x.repeat(1, 2, 1),))


class _SparseGCN(nn.Module):
    """A graph convolution with a constant sparse adjacency over axis 1 of every sample, the samples side by side
    as ``torch.sparse.mm`` needs them (one dense matrix on the right)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        adj = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, -1.5, 0.0], [0.5, 3.0, 1.0, 0.0], [0.0, 0.0, 0.7, 1.0]])
        self.register_buffer("adj", adj.to_sparse())

    def forward(self, x):  # [B, 4, 3] -> [B, 4, 2]
        b = x.shape[0]
        h = self.lin(x).permute(1, 0, 2).reshape(4, -1)
        return torch.tanh(torch.sparse.mm(self.adj, h).reshape(4, b, 2).permute(1, 0, 2))


def _check_sparse_products(model, x, *rest):
    """Every direction product and the exact diagonal w.r.t. input and params against plain autograd (torch.func's
    jacrev cannot take sparse tensors)."""
    B = x.shape[0]
    y = model(x, *rest)
    full = torch.autograd.functional.jacobian(lambda x: model(x, *rest), x).reshape(B, y[0].numel(), B, x[0].numel())
    J_in = torch.stack([full[b, :, b] for b in range(B)])
    params = dict(model.named_parameters())

    def of_params(flat):
        parts, at = {}, 0
        for n, p in params.items():
            parts[n] = flat[at:at + p.numel()].view_as(p)
            at += p.numel()
        return torch.func.functional_call(model, parts, (x, *rest))

    flat = torch.cat([p.detach().flatten() for p in params.values()])
    J_p = torch.autograd.functional.jacobian(of_params, flat).reshape(B, y[0].numel(), -1)
    g = torch.Generator().manual_seed(2)
    for wrt, J in (("input", J_in), ("params", J_p)):
        assert not fxjac.vjp(model, wrt=wrt, strict=True, example_inputs=(x, *rest)).fallback_ops
        v = torch.randn(J.shape[2], generator=g, dtype=torch.float64)
        vx = v.expand(B, -1) if wrt == "params" else torch.randn(B, J.shape[2], generator=g, dtype=torch.float64)
        _, t = fxjac.jvp(model, wrt=wrt)(x, *rest, v if wrt == "params" else vx.reshape(x.shape))
        assert_close(t.reshape(B, -1), torch.einsum("boi,bi->bo", J, vx), f"sparse jvp[{wrt}]")
        w = torch.randn(y.shape, generator=g, dtype=torch.float64)
        _, c = fxjac.vjp(model, wrt=wrt)(x, *rest, w)
        ref = torch.einsum("boi,bo->bi", J, w.reshape(B, -1))
        assert_close(c.reshape(ref.shape) if wrt == "input" else c, ref if wrt == "input" else ref.sum(0),
                     f"sparse vjp[{wrt}]")
        for mode in ("forward", "reverse"):
            assert_close(fxjac.jacobian(model, wrt=wrt, mode=mode)(x, *rest)[1].reshape(J.shape), J,
                         f"sparse jacobian[{wrt}, {mode}]")
        _, d = fxjac.jtmjp(model, wrt=wrt, out="diag")(x, *rest)
        ref = torch.einsum("boi,boi->bi", J, J)
        assert_close(d.reshape(ref.shape) if wrt == "input" else d, ref if wrt == "input" else ref.sum(0),
                     f"sparse jtmjp diag[{wrt}]")


def test_sparse_mm_with_a_constant_operator():
    """``torch.sparse.mm`` with a constant sparse left operand has its own rule (the fallback's vmap cannot take
    sparse tensors: every product raised; found by a probe)."""
    torch.manual_seed(0)
    model = _SparseGCN().double()
    x = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _check_sparse_products(model, x)
    g = torch.Generator().manual_seed(3)
    # the sparse product alone (one linear op): diagonal back-propagation is exact
    one = _SparseOnly(model.adj)
    full = torch.autograd.functional.jacobian(one, x).reshape(3, 12, 3, 12)
    J = torch.stack([full[b, :, b] for b in range(3)])
    d = torch.rand(3, 12, generator=g, dtype=torch.float64)
    _, r = fxjac.jtmjp(one, matrix="diag", out="diag", method="diag_backprop", strict=True)(x, d)
    assert_close(r, torch.einsum("boi,bo->bi", J * J, d), "sparse diag_backprop")


class _SparseBmm(nn.Module):
    """Message passing with a batch of sparse adjacencies built in forward from edge lists (probe AC: the matmul
    rules multiplied them as dense tensors, and ``expand`` raised)."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x, edges):  # x [B, N, 4], edges [B, 2, E]
        B, N, _ = x.shape
        index = torch.stack([torch.arange(B).repeat_interleave(edges.shape[-1]), edges[:, 1].reshape(-1),
                             edges[:, 0].reshape(-1)])
        adj = torch.sparse_coo_tensor(index, torch.ones(index.shape[1], dtype=x.dtype), (B, N, N))
        h = self.lin(x)
        return self.out(torch.relu(torch.bmm(adj, h) + h).sum(1))


def test_sparse_bmm_with_adjacencies_built_in_forward():
    model = _SparseBmm().double()
    x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    edges = torch.randint(0, 6, (3, 2, 10), generator=torch.Generator().manual_seed(2))
    _check_sparse_products(model, x, edges)
    d = torch.rand(3, 3, dtype=torch.float64)  # diagonal back-propagation: the sparse products' rows squared
    _, got = fxjac.jtmjp(model, matrix="diag", out="diag", method="diag_backprop", strict=True)(x, edges, d)
    adj = torch.zeros(3, 6, 6, dtype=torch.float64)
    for b in range(3):
        adj[b].index_put_((edges[b, 1], edges[b, 0]), torch.ones(10, dtype=torch.float64), accumulate=True)
    _, ref = fxjac.jtmjp(_DenseAdjacency(model), matrix="diag", out="diag", method="diag_backprop")(x, adj, d)
    assert_close(got, ref, "diag_backprop through a sparse bmm against the same net with a dense adjacency")


class _DenseAdjacency(nn.Module):
    """``_SparseBmm`` with dense matrices, the adjacency an input (a reference for diagonal back-propagation, whose
    dense rules are tested against squared Jacobians elsewhere)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, adj):
        net = self.net
        return net.out(torch.relu(torch.bmm(adj, net.lin(x)) + net.lin(x)).sum(1))


class _SparseOnly(nn.Module):
    def __init__(self, adj):
        super().__init__()
        self.register_buffer("adj", adj)

    def forward(self, x):
        return torch.sparse.mm(self.adj, x.permute(1, 0, 2).reshape(4, -1)).reshape(4, x.shape[0], 3).permute(1, 0, 2)


def _degenerate_cases():
    """(id, f, x [B, n], dtype): inputs where a derivative is 0/0, inf or NaN somewhere and autograd's formula keeps
    the rest finite (probe K of the eleventh session).
    """
    f64, f32 = torch.float64, torch.float32
    rows = torch.tensor([[3.0, 3.0, 3.0, 3.0], [0.5, -1.0, 2.0, 0.0]], dtype=f64)
    masked = torch.tensor([[True, True, True], [False, True, False]])
    return [
        ("std_of_a_constant_row", lambda x: x.std(-1, keepdim=True) + x, rows, f64),
        ("std_correction0_two_dims", lambda x: x.reshape(2, 2, 2).std((1, 2), correction=0), rows, f64),
        ("where_safe_log", lambda x: torch.where(x > 0, torch.log(x), 0.0), rows.abs(), f64),
        ("where_safe_sqrt_number_branch", lambda x: torch.where(x > 0, x.clamp_min(0).sqrt(), 1.0), rows, f64),
        ("softmax_of_a_fully_masked_row",
         lambda x: torch.softmax(torch.where(masked, -torch.inf, x[:, :3]), -1).nan_to_num(), rows, f64),
        ("clamp_of_log_at_zero", lambda x: torch.clamp(torch.log(x), -1.0, 1.0) + x, rows.abs(), f64),
        ("max_with_a_nan", lambda x: torch.max(torch.log(x)).expand(1, 1) + x[:1, :1],
         torch.tensor([[1.0, -1.0, 2.0, 0.5]], dtype=f64), f64),
        ("div_by_a_subnormal", lambda x: x[:, :2] / x[:, 2:], torch.tensor([[1.0, 2.0, 1e-310, 3.0]], dtype=f64), f64),
        ("div_by_a_subnormal_float32", lambda x: x / 1e-40, torch.tensor([[1.0, 2.0]], dtype=f32), f32),
        ("log_of_a_subnormal_float32", torch.log, torch.tensor([[1e-40, 1.0]], dtype=f32), f32),
        ("div_by_python_zero", lambda x: x / 0.0, rows[1:], f64),
        ("x_pow_x_at_zero", lambda x: x ** x, torch.tensor([[0.0, 2.0]], dtype=f64), f64),
        ("zero_pow_x", lambda x: 0.0 ** x, torch.tensor([[-1.0, 2.0, 0.0]], dtype=f64), f64),
        ("tensor_zero_pow_x", lambda x: torch.zeros_like(x) ** x, torch.tensor([[-1.0, 2.0, 0.0]], dtype=f64), f64),
    ]


@pytest.mark.parametrize("name,f,x,dtype", _degenerate_cases(), ids=[c[0] for c in _degenerate_cases()])
def test_degenerate_points_follow_autograds_modes(name, f, x, dtype):
    # Each mode against its own torch.func transform (they differ at some of these points: the full max of a NaN
    # sends the reverse derivative to the NaN, the forward one is NaN), NaN and inf positions included.

    model = Fn(f).to(dtype)
    x = x.to(dtype)
    for mode in ("reverse", "forward"):
        want = per_sample_jacobian(model, (x,), "input", use_jacrev=mode == "reverse")
        _, got = fxjac.jacobian(model, wrt="input", mode=mode)(x)
        got = got.reshape(want.shape)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=0, msg=lambda m: f"{mode}: {m}")


def test_gather_with_sparse_grad_has_the_dense_derivative():
    # Probe Z: sparse_grad=True (how autograd stores a gradient) made the fallback's vjp sparse, and the products
    # raised torch's "aten::view on SparseCPU"; torch.func cannot differentiate it either, so the reference is the
    # same gather without it.
    def pick(sparse):
        return Op(lambda m, x: x.gather(1, x.argmax(1, keepdim=True).expand(-1, 2, -1), sparse_grad=sparse))

    x = _input(3, False)
    J = per_sample_jacobian(pick(False), (x,))
    w = torch.randn(3, 2 * 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, got = fxjac.vjp(pick(True))(x, w.reshape(3, 2, 5))
    assert_close(got.reshape(3, -1), torch.einsum("boi,bo->bi", J, w), "vjp through gather(sparse_grad=True)")
    _, diag = fxjac.jtmjp(pick(True), out="diag")(x)
    assert_close(diag.reshape(3, -1), (J * J).sum(1), "diag(JᵀJ) through gather(sparse_grad=True)")


def test_edge_values_follow_autograd():
    # Probes AB and ZZ: PReLU's slope derivative at x = inf was NaN (a product with x before the selection);
    # var/std without degrees of freedom raised ZeroDivisionError; x / d's tangent w.r.t. d was NaN where d² underflows
    # (torch's forward mode divides -(t·y) by d); addmm with beta=0 let a NaN/inf input in (ATen ignores it).
    inf, nan = float("inf"), float("nan")
    prelu = nn.Sequential(nn.PReLU(2, init=0.25)).double()
    x = torch.tensor([[inf, -1.0], [0.0, nan], [-inf, 2.0]], dtype=torch.float64)
    w = torch.ones(3, 2, dtype=torch.float64)
    for wrt, inputs in (("params", dict(prelu.named_parameters())), ("input", x)):
        f = (lambda p: torch.func.functional_call(prelu, p, (x,))) if wrt == "params" else prelu
        ref = torch.func.vjp(f, inputs)[1](w)[0]
        ref = ref["0.weight"] if wrt == "params" else ref
        _, got = fxjac.vjp(prelu, wrt=wrt)(x, w)
        torch.testing.assert_close(got, ref, equal_nan=True, msg=f"PReLU's vjp w.r.t. {wrt} at ±inf and NaN")

    class Spread(nn.Module):
        def forward(self, x):
            return torch.cat([x[:, :1].std(-1, keepdim=True), x.var(-1, correction=4, keepdim=True)], -1)

    x4 = torch.randn(3, 4, dtype=torch.float64)
    v, u = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    _, back = torch.func.vjp(Spread(), x4)
    torch.testing.assert_close(fxjac.vjp(Spread())(x4, u)[1], back(u)[0], equal_nan=True)
    torch.testing.assert_close(fxjac.jvp(Spread())(x4, v)[1], torch.func.jvp(Spread(), (x4,), (v,))[1], equal_nan=True)

    class DivP(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = nn.Parameter(torch.tensor([1e-300, 1.0, -2.0], dtype=torch.float64))

        def forward(self, x):
            return x / self.d

    m, xs, t = DivP(), torch.ones(2, 3, dtype=torch.float64), torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    ref = torch.func.jvp(lambda d: torch.func.functional_call(m, {"d": d}, (xs,)), (m.d.detach(),), (t,))[1]
    got = fxjac.jvp(m, wrt="params")(xs, t)[1]
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, atol=0, rtol=1e-15)

    class Addmm(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
            self.register_buffer("junk", torch.tensor([inf, nan, 1.0], dtype=torch.float64))

        def forward(self, x):
            return torch.addmm(self.junk, x, self.W, beta=0) + torch.baddbmm(self.junk, x[:, None], self.W[None]
                                                                            .expand(x.shape[0], 4, 3), beta=0)[:, 0]

    m, xa, ua = Addmm(), torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    y, g = fxjac.vjp(m, wrt="params")(xa, ua)
    assert_close(y, 2 * xa @ m.W, "addmm with beta=0")
    assert_close(g, 2 * (xa.t() @ ua).flatten(), "its vjp w.r.t. W")


def test_heaviside_pdist_and_ops_without_derivative():
    # Probe AB: heaviside (no derivative in ATen) raised torch's RuntimeError in reverse products and an
    # UnsupportedOpError in forward ones; it is piecewise constant in x, and ``values`` where x = 0. Probe ZZ: pdist
    # had no tangents. An op ATen cannot differentiate at all (zeta in x) is one UnsupportedOpError everywhere.
    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.values = nn.Parameter(torch.tensor([0.5, 0.25, 2.0], dtype=torch.float64))

        def forward(self, x):
            return torch.heaviside(x, self.values) * 3 + x.heaviside(self.values.flip(0))

    x = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    J = torch.stack([torch.diag(3 * (x[b] == 0).double()) + torch.diag((x[b] == 0).double()).flip(1)
                     for b in range(2)])  # ∂y/∂values, per sample
    v, u = torch.randn(3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert_close(fxjac.jvp(Step(), wrt="params")(x, v)[1], J @ v, "heaviside's jvp w.r.t. values")
    assert_close(fxjac.vjp(Step(), wrt="params")(x, u)[1], torch.einsum("boi,bo->i", J, u), "its vjp")
    assert_close(fxjac.jacobian(Step(), wrt="input")(x)[1], torch.zeros(2, 3, 3, dtype=torch.float64), "w.r.t. x")

    class Spread(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.lin, self.p = nn.Linear(3, 4).double(), p

        def forward(self, x):
            return torch.pdist(self.lin.weight, p=self.p).unsqueeze(0) * x[:, :1]

    xs = torch.randn(3, 3, dtype=torch.float64)
    for p in (2.0, 1.0, 3.0, float("inf")):
        m = Spread(p)
        m.lin.weight.data[1] = m.lin.weight.data[0] + torch.tensor([0.5, -0.5, 0.1], dtype=torch.float64)  # a tie
        tangent = torch.randn(16, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(  # plain autograd: torch.func's cdist/pdist Jacobians are wrong
            lambda W, b: torch.func.functional_call(m, {"lin.weight": W, "lin.bias": b}, (xs,)),
            (m.lin.weight.detach(), m.lin.bias.detach()))
        ref = J[0].flatten(2) @ tangent[:12] + J[1] @ tangent[12:]
        assert_close(fxjac.jvp(m, wrt="params", strict=True)(xs, tangent)[1], ref, f"jvp through pdist (p={p})")
        u = torch.randn(3, 6, dtype=torch.float64)
        assert_close(fxjac.vjp(m, wrt="params", strict=True)(xs, u)[1],
                     torch.cat([torch.einsum("boij,bo->ij", J[0], u).flatten(), torch.einsum("boi,bo->i", J[1], u)]),
                     f"vjp through pdist (p={p})")

    zeta = Fn(lambda x: torch.special.zeta(x.abs() + 2, 2.0))
    for product in (fxjac.vjp(zeta), fxjac.jvp(zeta), fxjac.jtmjp(zeta, matrix="diag", out="diag"),
                    fxjac.jtmjp(zeta, matrix="diag", out="diag", method="diag_backprop"),
                    fxjac.jmjtp(zeta, matrix="diag")):
        with pytest.warns(UserWarning, match="fallback"), \
                pytest.raises(fxjac.UnsupportedOpError, match="torch has no derivative for"):
            product(xs, xs)

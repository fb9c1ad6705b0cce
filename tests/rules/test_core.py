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
from reference import assert_close, check_diag_backprop, check_direction_products  # noqa: E402


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
    ("einsum_implicit", lambda m, x: torch.einsum("...j,jk", x, m.W), False),
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
    ("getitem_bool_mask", lambda m, x: x[:, :, torch.tensor([True, False, True, True, False])], False),
    ("getitem_param_row", lambda m, x: x * m.W[1:3, 0].sum(), False),
    ("torch.flip", lambda m, x: torch.flip(x, [1, 2]), False),
    ("flip_method", lambda m, x: x.flip(-1), False),
    ("F.pad", lambda m, x: F.pad(x, (1, 2, 0, 1)), False),
    ("torch.narrow", lambda m, x: torch.narrow(x, 2, 1, 3), False),
    ("narrow_method", lambda m, x: x.narrow(1, 0, 2), False),
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
    ("number_to_the_power", lambda m, x: 2.0 ** (x * m.w) + torch.pow(1.5, x), False),
    ("div_by_traced_number", lambda m, x: x / (x.size(-1) ** 0.5) + m.w / x.shape[1], False),
    ("topk_values_and_gather", lambda m, x: x.topk(2, -1).values * x.gather(-1, x.topk(2, -1).indices), False),
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
          "F.softplus", "F.hardtanh", "F.relu6"]


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
    "operator.mul", "operator.truediv", "operator.pow", "torch.where", "operator.matmul", "matmul_vector_left",
    "matmul_batched_param", "torch.mm", "mm_method", "bmm_method", "F.linear", "F.linear_positions", "F.bilinear",
    "torch.bmm", "einsum_list", "clone", "repeat", "torch.cat", "torch.stack", "chunk_method", "torch.split",
    "unbind_method", "getitem_param_row", "t_method", "torch.t", "T_attribute", "expand_param", "expand_as",
    "sum_all", "mean_method", "max_all", "argmax_gather", "masks_and_casts", "torch.sum", "F.relu6",
    "float_method", "to_dtype", "amax_ties", "squeeze_method", "view_as", "reshape_as", "contiguous",
    "torch.concatenate", "F.dropout2d", "F.dropout3d", "torch.squeeze", "broadcast_to_method",
    "torch.broadcast_to", "expand", "operator.sub", "getitem_int_none_ellipsis", "bmm_method",
    "stack_of_chunk", "cat_of_split_reversed", "cat_of_unbind", "dstack_of_tensor_split", "F.prelu_channels",
    "F.prelu_one", "torch.max_binary", "min_method_binary", "outer_same_operand", "clamp_tensor_bounds",
    "number_to_the_power", "div_by_traced_number", "fft_abs", "fft_real_imag",
    "topk_values_and_gather", "torch.addmm", "torch.baddbmm", "matmul_heads",
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
    assert ("into_cotangent" in code) == (name != "relu_method" or fan_out)
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

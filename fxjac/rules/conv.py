"""Convolution, pooling and resampling rules.

Covers ``conv{1,2,3}d``, ``conv_transpose{1,2,3}d``, max, average and adaptive pooling, ``interpolate``,
``pixel_shuffle``/``pixel_unshuffle`` and ``unfold``/``fold``. Every op here acts on ``[N, C, *spatial]`` with
``N`` free, so a stack ``[K, B, C, *spatial]`` goes through the op itself with ``K·B`` merged into ``N``
(:func:`on_stack`). Kernel sizes, strides and batch sizes are read from the primal tensors at run time.

Note [convolution weight cotangents]
    The weight cotangent of a convolution with input ``a`` (zero-padded) and output cotangent ``c`` is
    ``gW[o, i, κ] = Σ_p c[o, p] · a[i, p·stride + κ·dilation]``: a correlation of ``a`` with ``c`` used as the
    kernel, where stride and dilation swap roles. :func:`corr_weight` computes it as ONE grouped convolution
    whose kernel is the cotangent stack: the batch goes into the channels (summed by the convolution for the
    batch-summed cotangent, kept apart by ``groups`` for per-sample cotangents), and the within-group input
    channel goes into the convolution's batch axis so nothing is copied per channel. Every position of every
    sample contributes exactly; no patch matrix is built. The same kernel gives the transposed convolution's
    weight cotangent (its adjoint is a convolution with the roles of input and cotangent exchanged) and the
    diagonal rules (``x∘x`` in place of ``x``).

Note [convolution input cotangents]
    The adjoint of a convolution in its input is the transposed convolution, and that is what autograd runs
    (``convolution_backward``, the same kernel on a CPU). At stride 1 it is also a plain convolution of the
    cotangent, zero-padded by the kernel's reach minus the primal padding, with the flipped kernel whose in and
    out channels are exchanged within each group. On this 2-core CPU oneDNN's forward kernel was up to twice as
    fast: the U-Net's 8 -> 24 channel input cotangent over 160 rows at 32x32 took 7.3 ms against 13.3 ms
    (alternating runs, best of 15), and the other zoo shapes were within noise of each other. A 1x1 kernel
    without padding is a matrix product over the channels, placed at every stride-th position: 0.28 ms against
    2.6 ms for 1 -> 8 channels over the same rows, and 0.17 against 1.96 ms for the ResNet's stride-2 shortcut
    (one column too: ATen's kernel is as slow). Other strides above 1 and padding past the kernel's reach keep
    the transposed convolution, and so does every GPU (the GPU runs so far could not measure the two apart;
    cuDNN has its own kernels).
"""

from __future__ import annotations

import math
import operator
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from passes.protocol import ZERO, Decline, Rule, bind, module_call

from . import _rt
from .base import PARTS, LinearOp, parts_of
from .registry import register

_F_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_F_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d_with_indices, 2: F.max_pool2d_with_indices, 3: F.max_pool3d_with_indices}
_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d_with_indices, 2: F.adaptive_max_pool2d_with_indices,
                 3: F.adaptive_max_pool3d_with_indices}
# Ops applied to stacks by name (fx cannot print every built-in function as a call argument).
_OPS = {
    "avg_pool1d": F.avg_pool1d, "avg_pool2d": F.avg_pool2d, "avg_pool3d": F.avg_pool3d,
    "adaptive_avg_pool1d": F.adaptive_avg_pool1d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "adaptive_avg_pool3d": F.adaptive_avg_pool3d, "interpolate": F.interpolate,
    "unfold": F.unfold, "fold": F.fold,
}

# --- kernels ---------------------------------------------------------------------------------------------


def _tuple(v, n: int) -> tuple:
    """A convolution or pooling size argument as an n-tuple."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


# Note [convolutions under torch.compile]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# On a CPU with oneDNN, inductor lays out every graph that holds a convolution channels-last
# (``GraphLowering.decide_layout_opt``): inputs, kernels and the stacks around them are converted, and its
# convolutions and copies run in that layout. For the products (the cnn's: 3-channel input, NCHW
# ``convolution_backward`` after the forward), that made the compiled products 1.2-1.3x slower than the eager
# ones; with the layout left alone 1.05-1.1x. So under torch.compile on a CPU every convolution a product
# computes (its primal and the rules' own) is the custom op ``fxjac::convolution``, which inductor calls as it
# is, in the layout eager code would use; not where autograd records it (a differentiable product), and not on
# a GPU, where the layout pass has its own heuristics and this was never measured.


def conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv{1,2,3}d`` (by ``w``'s rank); under torch.compile on a CPU the opaque op (Note [convolutions under
    torch.compile]).
    """
    n = w.dim() - 2
    if torch.compiler.is_compiling() and x.device.type == "cpu" and not _rt.records_grad(x, w, b):
        mode = padding if isinstance(padding, str) else ""
        return _convolution(x, w, b, False, _ints(stride, n), mode, [] if mode else _ints(padding, n),
                                           _ints(dilation, n), [0] * n, groups)
    return _F_CONV[n](x, w, b, stride, padding, dilation, groups)


def conv_transpose(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """``F.conv_transpose{1,2,3}d`` (by ``w``'s rank); under torch.compile on a CPU the opaque op."""
    n = w.dim() - 2
    if torch.compiler.is_compiling() and x.device.type == "cpu" and not _rt.records_grad(x, w, b):
        return _convolution(x, w, b, True, _ints(stride, n), "", _ints(padding, n),
                                           _ints(dilation, n), _ints(output_padding, n), groups)
    return _F_CONV_T[n](x, w, b, stride, padding, output_padding, groups, dilation)


def _ints(v, n: int) -> list:
    return [int(a) for a in _tuple(v, n)]


@_rt.opaque_op()
def _convolution(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], transposed: bool, stride: List[int],
                 padding_mode: str, padding: List[int], dilation: List[int], output_padding: List[int],
                 groups: int) -> torch.Tensor:
    n = w.dim() - 2
    if transposed:
        return _F_CONV_T[n](x, w, b, stride, padding, output_padding, groups, dilation)
    return _F_CONV[n](x, w, b, stride, padding_mode or padding, dilation, groups)



def conv_backward(ct, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask):
    """ATen's ``convolution_backward``; under torch.compile the opaque op ``fxjac::conv_backward`` (Note
    [convolutions under torch.compile]), on every device: inductor's lowering makes ``groups`` a constant, and
    per-sample weight gradients have the batch among their groups (every new batch size recompiled).
    """
    if torch.compiler.is_compiling() and not _rt.records_grad(ct, x, w):
        parts = iter(_conv_backward(ct, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
                                    groups, mask))
        return tuple(next(parts) if m else None for m in mask)
    return torch.ops.aten.convolution_backward(ct, x, w, bias_sizes, stride, padding, dilation, transposed,
                                               output_padding, groups, mask)


@_rt.opaque_op()
def _conv_backward(ct: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias_sizes: Optional[List[int]],
                   stride: List[int], padding: List[int], dilation: List[int], transposed: bool,
                   output_padding: List[int], groups: int, mask: List[bool]) -> List[torch.Tensor]:
    parts = torch.ops.aten.convolution_backward(ct, x, w, bias_sizes, stride, padding, dilation, transposed,
                                                output_padding, groups, mask)
    return [p for p, m in zip(parts, mask) if m]


def on_stack(op: str, t, rank: int, *args):
    """``op(t, *args)`` on a stack, for an op on ``[N, *sample]`` (``rank`` sample axes): lead axes join N."""
    lead = tuple(t.shape[:t.dim() - rank])
    y = _OPS[op](t.reshape((-1,) + tuple(t.shape[len(lead):])), *args)
    return y.reshape(lead + tuple(y.shape[1:]))


def pullback(op: str, x, ct, *args):
    """Adjoint of the linear op ``op(x, *args)`` on a stack ``[K, *y]``: PyTorch's own backward, K batched.
    Average poolings call ATen's backward kernel on the stack (with the columns joined to the batch); other ops
    go through torch.func (0.19 ms against 0.03 for a ResNet's global average pooling of one column).
    """
    if op in _POOL_ADJOINTS:
        n = int(op[-2])
        g = ct.reshape((-1,) + tuple(ct.shape[-(n + 1):]))
        # the kernels read only the input's shape: a zero-stride tensor of it, as in pool_scatter
        like = ct.new_zeros(()).expand((g.shape[0],) + tuple(x.shape[-(n + 1):]))
        return _POOL_ADJOINTS[op](n, g, like, *args).reshape((ct.shape[0],) + tuple(x.shape))
    _, pull = torch.func.vjp(lambda u: _OPS[op](u, *args), x)
    return torch.vmap(pull)(ct)[0]


def _adaptive_avg_adjoint(n, g, like, output_size):
    if n == 1:  # through the 2-d kernel with a unit axis
        return _adaptive_avg_adjoint(2, g.unsqueeze(-2), like.unsqueeze(-2), None).squeeze(-2)
    kernel = torch.ops.aten._adaptive_avg_pool3d_backward if n == 3 else torch.ops.aten._adaptive_avg_pool2d_backward
    return kernel(g, like)


def _avg_adjoint(n, g, like, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
    stride = [] if stride is None else list(_tuple(stride, n))  # empty: the kernel size, as the forward has it
    if n == 1:  # through the 2-d kernel with a unit axis
        return torch.ops.aten.avg_pool2d_backward(
            g.unsqueeze(-2), like.unsqueeze(-2), [1, _tuple(kernel_size, 1)[0]], [1] + stride if stride else [],
            [0, _tuple(padding, 1)[0]], ceil_mode, count_include_pad, None).squeeze(-2)
    kernel = torch.ops.aten.avg_pool3d_backward if n == 3 else torch.ops.aten.avg_pool2d_backward
    return kernel(g, like, list(_tuple(kernel_size, n)), stride, list(_tuple(padding, n)), ceil_mode,
                  count_include_pad, divisor_override)


_POOL_ADJOINTS = {"adaptive_avg_pool1d": _adaptive_avg_adjoint, "adaptive_avg_pool2d": _adaptive_avg_adjoint,
                  "adaptive_avg_pool3d": _adaptive_avg_adjoint, "avg_pool1d": _avg_adjoint,
                  "avg_pool2d": _avg_adjoint, "avg_pool3d": _avg_adjoint}


def conv_pads(w, padding, dilation) -> list:
    """The zero padding ``(left, right)`` of each spatial axis of a convolution.

    ``'same'`` and ``'valid'`` are resolved as PyTorch does: an odd total puts the extra element on the right.
    """
    n = w.dim() - 2
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(_tuple(dilation, n), w.shape[2:])]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _tuple(padding, n)]


def conv_stack(t, w, stride, padding, dilation, groups):
    """``conv(t, w)`` on a stack ``[K, B, C, *S]``."""
    y = conv(t.flatten(0, 1), w, None, stride, padding, dilation, groups)
    return y.unflatten(0, t.shape[:2])


def flipped_kernel(w, groups):
    """The kernel of ``conv_transpose(·, w)`` at stride 1 as a convolution: in and out channels exchanged within
    each group, the spatial taps reversed.
    """
    o, i = w.shape[:2]
    w = w.reshape((groups, o // groups, i) + tuple(w.shape[2:])).transpose(1, 2)
    return w.reshape((i * groups, o // groups) + tuple(w.shape[3:])).flip(tuple(range(2, w.dim() - 1)))


def _pointwise(w, padding, dilation, groups, device) -> bool:
    """Whether a convolution is a channel matrix product at every stride-th position (Note [convolution input
    cotangents]): a 1x1 kernel, no padding, one group, on a CPU (measured there only).
    """
    return groups == 1 and device.type == "cpu" and all(k == 1 for k in w.shape[2:]) and \
        not any(lo or hi for lo, hi in conv_pads(w, padding, dilation))


def pointwise_input_ct(ct, w, size, stride):
    """Adjoint of a 1x1 convolution without padding (one group) on a stack or a batch ``[..., C_out, *S']``: the
    channel matrix product, placed at every stride-th position of a zero ``[..., C_in, *size]``.
    """
    n = w.dim() - 2
    y = torch.matmul(w.reshape(w.shape[:2]).t(), ct.flatten(-n)).unflatten(-1, tuple(ct.shape[-n:]))
    s = _tuple(stride, n)
    if all(v == 1 for v in s):
        return y
    out = y.new_zeros(tuple(y.shape[:-n]) + tuple(size))
    out[(Ellipsis,) + tuple(slice(None, None, v) for v in s)] = y
    return out


def conv_input_ct(ct, x, w, stride, padding, dilation, groups):
    """Adjoint of ``conv(·, w)`` on a stack ``[K, *y]`` -> ``[K, *x]`` (Note [convolution input cotangents]).

    A transposed convolution whose output padding restores the input size; at stride 1 a convolution with the
    flipped kernel, and for a 1x1 kernel without padding a matrix product over the channels.
    """
    n = w.dim() - 2
    s, dil, pads = _tuple(stride, n), _tuple(dilation, n), conv_pads(w, padding, dilation)
    size = tuple(x.shape[-n:])
    if _pointwise(w, padding, dilation, groups, ct.device):
        return pointwise_input_ct(ct, w, size, s)
    if all(v == 1 for v in s) and ct.device.type == "cpu":  # measured on the CPU only
        reach = [d * (k - 1) for d, k in zip(dil, w.shape[2:])]
        full = [(r - lo, r - hi) for r, (lo, hi) in zip(reach, pads)]
        if all(a >= 0 and b >= 0 for a, b in full):
            c = ct.flatten(0, 1)
            if any(a != b for a, b in full):
                c = F.pad(c, [v for pair in reversed(full) for v in pair])
                full = [(0, 0)] * n
            g = conv(c, flipped_kernel(w, groups), None, 1, [a for a, _ in full], dil, groups)
            return g.unflatten(0, ct.shape[:2])
    extra = [(L + lo + hi - d * (k - 1) - 1) % st
             for L, (lo, hi), d, k, st in zip(size, pads, dil, w.shape[2:], s)]
    g = conv_transpose(ct.flatten(0, 1), w, None, s, [lo for lo, _ in pads], extra, groups, dil)
    # 'same' padding of an even effective kernel pads one more element on the right: drop its cotangent.
    g = g[(Ellipsis,) + tuple(slice(0, L) for L in size)]
    return g.unflatten(0, ct.shape[:2])


def conv_t_input_ct(ct, x, w, stride, padding, dilation, groups):
    """Adjoint of ``conv_transpose(·, w)`` on a stack: the convolution with the same parameters.

    The result is cropped where an output padding of at least the stride made the primal output longer.
    """
    n = w.dim() - 2
    g = conv(ct.flatten(0, 1), w, None, stride, padding, dilation, groups)
    g = g[(Ellipsis,) + tuple(slice(0, L) for L in x.shape[-n:])]
    return g.unflatten(0, ct.shape[:2])


def conv_t_stack(t, w, stride, padding, output_padding, groups, dilation):
    """``conv_transpose(t, w)`` on a stack ``[K, B, C, *S]``."""
    y = conv_transpose(t.flatten(0, 1), w, None, stride, padding, output_padding, groups, dilation)
    return y.unflatten(0, t.shape[:2])


def _columns_out(y, k: int, b: int, g: int, n: int):
    """``[B, g·K·Og, *S]`` (group-major output channels) -> ``[K, B, g·Og, *S]``."""
    y = y.reshape((b, g, k, -1) + tuple(y.shape[-n:]))
    y = y.permute((2, 0, 1, 3) + tuple(range(4, 4 + n)))
    return y.reshape((k, b, -1) + tuple(y.shape[-n:]))


def conv_weight_tangent(x, tw, stride, padding, dilation, groups):
    """``conv(x, tw_k)`` for every column of a weight-tangent stack, as one grouped convolution.

    ``tw`` is ``[K, O, C/g, *k]`` (shared by the batch) or ``[K, B, O, C/g, *k]`` (per sample: the batch joins
    the groups); the convolution's output channels hold the K columns.
    """
    n, k, b, g = x.dim() - 2, tw.shape[0], x.shape[0], groups
    if k == 0:  # no columns (K is free): the shape of one, empty
        return conv_weight_tangent(x, tw.new_zeros((1,) + tuple(tw.shape[1:])), stride, padding, dilation, groups)[:0]
    kernel = tuple(tw.shape[-n - 1:])  # (C/g, *k)
    if tw.dim() == n + 4:
        w = tw.reshape((k, b, g, -1) + kernel).permute((1, 2, 0, 3) + tuple(range(4, 5 + n)))
        x1 = x.reshape((1, -1) + tuple(x.shape[2:]))
        y = conv(x1, w.reshape((-1,) + kernel), None, stride, padding, dilation, b * g)
    else:
        w = tw.reshape((k, g, -1) + kernel).transpose(0, 1)
        y = conv(x, w.reshape((-1,) + kernel), None, stride, padding, dilation, g)
    return _columns_out(y, k, b, g, n)


def conv_t_weight_tangent(x, tw, stride, padding, output_padding, groups, dilation):
    """``conv_transpose(x, tw_k)`` for every column of a weight-tangent stack, as one grouped convolution.

    ``tw`` is ``[K, C, O/g, *k]`` (shared by the batch) or ``[K, B, C, O/g, *k]`` (per sample).
    """
    n, k, b, g = x.dim() - 2, tw.shape[0], x.shape[0], groups
    if k == 0:  # no columns (K is free): the shape of one, empty
        return conv_t_weight_tangent(x, tw.new_zeros((1,) + tuple(tw.shape[1:])), stride, padding, output_padding,
                                     groups, dilation)[:0]
    kernel = tuple(tw.shape[-n:])
    if tw.dim() == n + 4:
        w = tw.permute((1, 2, 0) + tuple(range(3, 4 + n)))  # [B, C, K, O/g, *k]
        w = w.reshape((w.shape[0] * w.shape[1], -1) + kernel)
        x, g = x.reshape((1, -1) + tuple(x.shape[2:])), b * g
    else:
        w = tw.transpose(0, 1)  # [C, K, O/g, *k]
        w = w.reshape((w.shape[0], -1) + kernel)
    y = conv_transpose(x, w, None, stride, padding, output_padding, g, dilation)
    return _columns_out(y, k, b, groups, n)


def corr_weight(a, c, stride, dilation, pads, ksize, groups, per_sample, cols=None):
    """Weight cotangents ``Σ_positions c ⊗ patches(a)`` of a convolution.

    See Note [convolution weight cotangents].

    Args:
        a: the convolution's input ``[Ka, B, C, *S]`` (unpadded).
        c: its output cotangent ``[Kc, B, O, *S']``; one of ``Ka``, ``Kc`` is 1.
        stride: the convolution's stride.
        dilation: its dilation.
        pads: its ``(left, right)`` zero padding per spatial axis.
        ksize: the kernel's spatial size.
        groups: the convolution's groups.
        per_sample: keep the batch apart.
        cols: the patches of ``a`` from :func:`weight_patches`, where the caller computed them already.

    Returns:
        ``[K, O, C/g, *k]``, or ``[K, B, O, C/g, *k]`` per sample.
    """
    if cols is not None:
        return _corr_weight_unfold(None, c, stride, dilation, ksize, groups, per_sample, cols)
    n = len(ksize)
    ka, b, ch = a.shape[:3]
    kc, o = c.shape[0], c.shape[2]
    g = groups
    a = F.pad(a, [p for lohi in reversed(pads) for p in lohi])
    if n <= 2 and a.numel() * math.prod(ksize) * a.element_size() <= UNFOLD_BYTES:
        return _corr_weight_unfold(a, c, stride, dilation, ksize, groups, per_sample)
    sp, so, r = tuple(a.shape[3:]), tuple(c.shape[3:]), tuple(range(4, 4 + n))
    a = a.reshape((ka, b, g, ch // g) + sp)
    c = c.reshape((kc, b, g, o // g) + so)
    if per_sample:
        img = a.permute((0, 3, 1, 2) + r).reshape((-1, b * g) + sp)
        ker = c.permute((1, 2, 0, 3) + r).reshape((-1, 1) + so)
        y = conv(img, ker, None, _tuple(dilation, n), 0, _tuple(stride, n), b * g)
        y = y.reshape((ka, ch // g, b, g, kc, o // g) + tuple(y.shape[2:]))
        y = y.permute((0, 4, 2, 3, 5, 1) + tuple(range(6, 6 + n)))
        y = y.reshape((ka * kc, b, o, ch // g) + y.shape[6:])
    else:
        img = a.permute((0, 3, 2, 1) + r).reshape((-1, g * b) + sp)
        ker = c.permute((2, 0, 3, 1) + r).reshape((-1, b) + so)
        y = conv(img, ker, None, _tuple(dilation, n), 0, _tuple(stride, n), g)
        y = y.reshape((ka, ch // g, g, kc, o // g) + tuple(y.shape[2:]))
        y = y.permute((0, 3, 2, 4, 1) + tuple(range(5, 5 + n)))
        y = y.reshape((ka * kc, o, ch // g) + y.shape[5:])
    # The correlation also covers offsets past the kernel where the strides leave room: keep the kernel's.
    return y[(Ellipsis,) + tuple(slice(0, k) for k in ksize)]


UNFOLD_BYTES = 256 << 20
"""Patch matrices up to this size take the im2col path of :func:`corr_weight` (1-d and 2-d convolutions)."""


def _patches_like(a, ksize, dilation, stride, grid):
    return a.new_empty((a.shape[0], a.shape[1] * ksize[0] * ksize[1], grid[0] * grid[1]))


@_rt.eager_under_compile(_patches_like)
def patches(a: torch.Tensor, ksize: list[int], dilation: list[int], stride: list[int],
            grid: list[int]) -> torch.Tensor:
    """im2col of ``a`` ``[N, C, H, W]``: ``[N, C·kh·kw, gh·gw]``, the first ``grid`` positions of each axis.

    A strided view of the windows copied once (ATen's im2col is about twice as slow on CPU, inductor's loops
    for it as slow: an eager kernel under torch.compile).
    """
    for axis, (k, d, st, n) in enumerate(zip(ksize, dilation, stride, grid)):
        a = a.unfold(2 + axis, d * (k - 1) + 1, st)[..., ::d] if d > 1 else a.unfold(2 + axis, k, st)
        a = a.narrow(2 + axis, 0, n)
    return a.permute(0, 1, 4, 5, 2, 3).reshape(a.shape[0], -1, grid[0] * grid[1])


def _corr_weight_shifts(a, c, dilation, ksize, groups, per_sample):
    """:func:`corr_weight` of a stride-1 convolution without patches: one batched GEMM per kernel offset (the
    caller takes it where each GEMM has enough input channels and positions to beat copying the patches: at
    least 16 and 512 here).

    With the cotangent zero-padded to the input's row length, the input window of kernel offset ``(i, j)`` is a
    contiguous run of the flattened (padded) input starting at ``i·d·W + j·d``: a strided view that the GEMM
    reads in place (the padding columns meet zeros).

    Args:
        a: the padded input ``[B, C, H, W]`` (one column).
        c: the output cotangent stack ``[K, B, O, Ho, Wo]``, ``Ho = H - d(kh - 1)`` and likewise ``Wo``.
        dilation: the convolution's dilation ``(dh, dw)``.
        ksize: its kernel size ``(kh, kw)``.
        groups: its groups.
        per_sample: keep the batch apart.

    Returns:
        ``[K, B, O, C/g, kh, kw]`` per sample, else ``[K, O, C/g, kh, kw]``.
    """
    b, ch, h, w = a.shape
    k, o, g = c.shape[0], c.shape[2], groups
    ho, wo = c.shape[-2:]
    length = (ho - 1) * w + wo
    cw = c.reshape(k, b, g, o // g, ho, wo).permute(1, 2, 0, 3, 4, 5)
    cw = F.pad(cw, (0, w - wo)).reshape(b * g, k * (o // g), ho * w)[..., :length]  # [B·g, K·O/g, L]
    flat = a.reshape(b * g, ch // g, h * w)
    cols = [torch.bmm(cw, flat[..., i * dilation[0] * w + j * dilation[1]:][..., :length].transpose(1, 2))
            for i in range(ksize[0]) for j in range(ksize[1])]  # each [B·g, K·O/g, C/g]
    y = torch.stack(cols, -1).reshape(b, g, k, o // g, ch // g, ksize[0], ksize[1])
    if per_sample:
        return y.permute(2, 0, 1, 3, 4, 5, 6).reshape(k, b, o, ch // g, ksize[0], ksize[1])
    return y.sum(0).permute(1, 0, 2, 3, 4, 5).reshape(k, o, ch // g, ksize[0], ksize[1])


def _as_2d(a, ksize, stride, dilation):
    """A 1-d convolution's padded input ``[Ka, B, C, L]`` and parameters as 2-d ones with a unit axis."""
    if len(ksize) == 1:
        return a.unsqueeze(-2), (1,) + tuple(ksize), (1,) + _tuple(stride, 1), (1,) + _tuple(dilation, 1)
    return a, tuple(ksize), _tuple(stride, 2), _tuple(dilation, 2)


def _grid(a, ksize, stride, dilation) -> tuple:
    """The output positions per axis of a convolution of the padded 2-d input ``a``."""
    return tuple((L - d * (k - 1) - 1) // s + 1 for L, k, s, d in zip(a.shape[-2:], ksize, stride, dilation))


def _shifts_apply(a, groups, ksize, stride, dilation, grid) -> bool:
    """Whether :func:`_corr_weight_shifts` takes a one-column padded 2-d input ``a`` with a cotangent over
    ``grid`` (see there).
    """
    return a.shape[0] == 1 and a.shape[2] // groups >= 16 and grid[0] * grid[1] >= 512 and stride == (1, 1)


def _unfold_cols(a, ksize, stride, dilation, groups, grid):
    """The patches ``[Ka, B, g, C/g·k, L]`` of a padded 2-d input ``[Ka, B, C, H, W]`` over the first ``grid``
    output positions, for im2col.
    """
    ka, b, ch = a.shape[:3]
    cols = patches(a.reshape((ka * b, ch) + tuple(a.shape[-2:])), ksize, dilation, stride, grid)
    return cols.reshape(ka, b, groups, -1, grid[0] * grid[1])


def _by_patches(w, padding, dilation) -> bool:
    """Whether :func:`weight_patches` may make patches for this kernel (its sizes may still decline)."""
    return w.dim() - 2 <= 2 and (w.shape[1] < 4 or any(lo != hi for lo, hi in conv_pads(w, padding, dilation)))


def weight_patches(x, w, stride, padding, dilation, groups):
    """The patches that :func:`conv_weight_ct` takes for one column of per-sample cotangents, or ``None`` where it
    takes another path (ATen's grouped kernel, the shifted GEMMs, no im2col).

    A function of the primal input alone, emitted as its own node: a column loop computes it once before its
    columns (Note [column loops] in passes/loop.py), where inside the cotangent kernel it was copied again for
    every column (the cnn's first layer, 3 input channels: 3.0 of 58 ms of its exact GGN diagonal).
    """
    if not _by_patches(w, padding, dilation):
        return None
    pads = conv_pads(w, padding, dilation)
    a = F.pad(x.unsqueeze(0), [p for lohi in reversed(pads) for p in lohi])
    if a.numel() * math.prod(w.shape[2:]) * a.element_size() > UNFOLD_BYTES:
        return None
    a, ksize, st, dil = _as_2d(a, tuple(w.shape[2:]), stride, dilation)
    grid = _grid(a, ksize, st, dil)
    if _shifts_apply(a, groups, ksize, st, dil, grid):
        return None
    return _unfold_cols(a, ksize, st, dil, groups, grid)


# Per-sample weight cotangents of a stack by im2col take one GEMM per column where a patch (C/g · kernel size)
# has at most PER_COLUMN_PATCH entries (measured on CPU: 27 entries 2x faster than the einsum, 72 1.2x faster,
# 144 about even, 432 1.5x slower); under torch.compile, for at most PER_COLUMN_UNROLL columns (each GEMM is a
# node of the graph: more would slow compilation). On a GPU never: a launch per column costs more than the copy
# the einsum makes (U-Net exact GGN diagonal on an H100, 1,023 columns: 3,000 GEMM launches per call).
# Each GEMM computes the transposed block (patches times cotangent) where a patch is shorter than
# SHORT_PATCH: MKL's batched GEMM with 27 rows of output per sample against 16 ran in 0.6 of the time of the
# other orientation (9 entries: 0.7; 72 and more: even).
PER_COLUMN_PATCH = 128
PER_COLUMN_UNROLL = 32
SHORT_PATCH = 64


def _corr_weight_unfold(a, c, stride, dilation, ksize, groups, per_sample, cols=None):
    """:func:`corr_weight` by im2col: the patches of the (padded) input times the cotangent, one batched GEMM.

    Faster than the grouped convolution whose kernel is the cotangent when the output is large (big kernels are
    slow in every convolution backend, and inductor's channels-last layout makes them slower still). ``cols``:
    the patches already made (:func:`weight_patches`); ``a`` is not read then.
    """
    n = len(ksize)
    if n == 1:  # as 2-d with a unit axis
        c = c.unsqueeze(-2)
    if cols is None:
        a, ksize2, st, dil = _as_2d(a, ksize, stride, dilation)
        grid = tuple(c.shape[-2:])
        if _shifts_apply(a, groups, ksize2, st, dil, grid) and \
                all(L - d * (k - 1) == s for L, d, k, s in zip(a.shape[-2:], dil, ksize2, grid)):
            y = _corr_weight_shifts(a[0], c, dil, ksize2, groups, per_sample)
            return y.reshape(y.shape[:-2] + tuple(ksize))
        cols = _unfold_cols(a, ksize2, st, dil, groups, grid)  # [Ka, B, g, C/g·k, L]
    ka, b, g, patch, length = cols.shape
    kc, o = c.shape[0], c.shape[2]
    ch = patch * g // math.prod(ksize)
    cc = c.reshape(kc, b, g, o // g, length)  # [Kc, B, g, O/g, L]
    if per_sample and ka == 1 and patch <= PER_COLUMN_PATCH and cc.device.type == "cpu" and \
            (kc <= PER_COLUMN_UNROLL or not torch.compiler.is_compiling()):
        # one bmm per cotangent column: an einsum would first copy the whole cotangent stack sample-major (the
        # largest tensor here), and expanding the patches over the columns copies those. That copy outweighs the
        # GEMMs where the patches are short; with long patches the einsum's one GEMM over all columns is faster.
        # Written in place eagerly; under autograd or torch.compile, stacked (inductor writes the GEMMs into it)
        pt = cols[0].reshape(b * g, patch, length)
        ck = cc.reshape(kc, b * g, o // g, length)
        short = patch < SHORT_PATCH

        def block(k, out=None):  # column k's [B·g, O/g, patch], or its transpose where the patch is short
            return torch.bmm(pt, ck[k].transpose(1, 2), out=out) if short else \
                torch.bmm(ck[k], pt.transpose(1, 2), out=out)

        if torch.compiler.is_compiling() or _rt.records_grad(cc, cols):
            y = torch.stack([block(k) for k in range(kc)])
        else:
            y = cc.new_empty((kc, b * g) + ((patch, o // g) if short else (o // g, patch)))
            for k in range(kc):
                block(k, out=y[k])
        return (y.transpose(-1, -2) if short else y).reshape((kc, b, o, ch // g) + tuple(ksize))
    if per_sample:
        y = torch.einsum("abgjl,cbgol->acbgoj", cols, cc)
        return y.reshape((ka * kc, b, o, ch // g) + tuple(ksize))
    y = torch.einsum("abgjl,cbgol->acgoj", cols, cc)
    return y.reshape((ka * kc, o, ch // g) + tuple(ksize))


def conv_weight_ct(ct, x, w, stride, padding, dilation, groups, per_sample, cols=None):
    """Weight cotangent of ``conv(x, w)`` for an output cotangent stack ``ct`` ``[K, *y]``.

    One column of per-sample cotangents is ATen's weight gradient of the same convolution with the batch moved
    into the groups (``[1, B·C, *S]``, ``B·groups`` groups): each sample's kernel gradient from one fused call.
    On a CPU a stack of up to PER_COLUMN_UNROLL columns (any number eagerly) takes that call per column too: the
    ResNet's 16 -> 16 channel layer at 32x32, batch 32, 10 columns (its J Σ Jᵀ), 8.8 ms against 32.6 ms by
    shifted GEMMs and 18.6 ms by im2col (AMD EPYC; a GPU launches a kernel per column: the stack's paths there).
    ``cols``: the input's patches from :func:`weight_patches` (``None``: made here where needed).
    """
    pads = conv_pads(w, padding, dilation)
    n, b, k = w.dim() - 2, x.shape[0], ct.shape[0]
    if cols is not None:
        return corr_weight(None, ct, stride, dilation, pads, tuple(w.shape[2:]), groups, per_sample, cols)
    if per_sample and w.shape[1] >= 4 and all(lo == hi for lo, hi in pads) and \
            (k == 1 or (ct.device.type == "cpu" and (k <= PER_COLUMN_UNROLL or not torch.compiler.is_compiling()))):
        like = w.new_zeros(()).expand((b * w.shape[0],) + tuple(w.shape[1:]))
        xs = x.reshape((1, -1) + tuple(x.shape[2:]))

        def column(c):
            return conv_backward(
                c.reshape((1, -1) + tuple(c.shape[-n:])), xs, like, None, list(_tuple(stride, n)),
                [lo for lo, _ in pads], list(_tuple(dilation, n)), False, [0] * n, b * groups, [False, True, False])[1]

        if k == 1:
            return column(ct[0]).reshape((1, b) + tuple(w.shape))
        return torch.stack([column(ct[i]) for i in range(k)]).reshape((k, b) + tuple(w.shape))
    return corr_weight(x.unsqueeze(0), ct, stride, dilation, pads, tuple(w.shape[2:]), groups, per_sample)


def conv_t_weight_ct(ct, x, w, stride, padding, dilation, groups, per_sample):
    """Weight cotangent of ``conv_transpose(x, w)``.

    ``<ct, conv_transpose(x, w)> = <conv(ct, w), x>``: the weight cotangent of ``conv(ct, w)`` against ``x``.
    """
    pads = conv_pads(w, padding, dilation)
    return corr_weight(ct, x.unsqueeze(0), stride, dilation, pads, tuple(w.shape[2:]), groups, per_sample)


# Note [weight cotangents through a max pooling]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Where a max pooling reads a convolution's output, the cotangent there is the pooled one scattered to the
# argmax positions, zero elsewhere. The convolution's per-sample weight cotangent sums cotangent ⊗ patch over
# positions, so only the argmax positions count: Σ_q ct[k, b, o, q] · patch[b, idx[b, o, q]], with the patches
# at each output's argmax gathered once for all columns, and the bias cotangent is the pooled cotangent summed.
# No scatter (the largest stack of the cnn: 42 MB, zero-filled and written at each call) and a quarter of the
# multiply-adds for a 2x2 pooling: the cnn's first layer, 10 columns, 17.4 -> 7 ms (AMD EPYC, one thread).
# Taken where the weight cotangent goes through im2col patches (few input channels, ungrouped), on the CPU (not
# measured elsewhere), while the gathered patches (the patches times the output channels over the pooling's
# window) stay under POOLED_BYTES, and for at least POOLED_MIN_COLUMNS columns: the gather costs about two
# columns' scatter and GEMM (the cnn's per-sample gradients, one column: 8.8 -> 13.7 ms), and one column through
# the gathered patches (a batched GEMV) took 1.5 ms against 1.2 for its scatter and GEMM. The gather is made
# where the columns are (inside a column loop, once per chunk): it needs their number.
POOLED_BYTES = 64 << 20
POOLED_MIN_COLUMNS = 3


def pooled_patches(cols, idx):
    """The patches of :func:`weight_patches` at each pooled output's argmax, ``[B·O, Q, patch]`` for indices
    ``[B, O, *pooled]`` into the convolution's output positions, or ``None`` where the scatter stays (Note [weight
    cotangents through a max pooling]).
    """
    if cols is None or cols.device.type != "cpu" or cols.shape[0] != 1 or cols.shape[2] != 1:
        return None
    _, b, _, patch, length = cols.shape
    o, q = idx.shape[1], idx[0, 0].numel()
    if idx.shape[0] != b or b * o * q * patch * cols.element_size() > POOLED_BYTES:
        return None
    rows = cols[0, :, 0].transpose(1, 2).reshape(b * length, patch)  # [B·L, patch], one copy
    at = idx.reshape(b, o * q) + torch.arange(b, device=idx.device).unsqueeze(1) * length
    return rows.index_select(0, at.reshape(-1)).reshape(b * o, q, patch)


def pooled_weight_ct(ct, idx, y, x, w, stride, padding, dilation, groups, cols):
    """Per-sample weight cotangents ``[K, B, *w]`` of ``conv(x, w)`` for the cotangent that a max pooling of
    its output ``y`` scatters from ``ct`` ``[K, B, O, *pooled]`` at ``idx`` (Note [weight cotangents through a
    max pooling]); ``cols``: :func:`weight_patches`. Below POOLED_MIN_COLUMNS columns, or where the gathered
    patches would be too large, the scatter and :func:`conv_weight_ct`.
    """
    gathered = pooled_patches(cols, idx) if ct.shape[0] >= POOLED_MIN_COLUMNS else None
    if gathered is None:
        full = pool_scatter(ct, idx, y, w.dim() - 2)  # the pooling's spatial axes are the convolution's
        return conv_weight_ct(full, x, w, stride, padding, dilation, groups, True, cols)
    k, (bo, q, _) = ct.shape[0], gathered.shape
    # [B·O, K, patch]; the orientation matters: patchesᵀ @ cotangents (a transposed view of the gathered
    # patches) took 17 ms for the cnn's first layer, against 4.4
    g = torch.bmm(ct.reshape(k, bo, q).transpose(0, 1), gathered)
    return g.transpose(0, 1).reshape((k, x.shape[0]) + tuple(w.shape))


@_rt.allocates
def conv_cts(ct, x, w, has_bias, stride, padding, dilation, groups, transposed, output_padding, mask):
    """Cotangent stacks ``[K, *]`` of a convolution's (input, weight, bias), summed over the batch, ``None``
    where ``mask`` is false. One column goes through ATen's ``convolution_backward`` (the kernel autograd runs:
    all three from one call), a stack through the kernels of Note [convolution weight cotangents]. Integer
    paddings only (the rule checks).
    """
    n = w.dim() - 2
    if ct.shape[0] == 1:
        gx = None
        if mask[0] and not transposed and _pointwise(w, padding, dilation, groups, ct.device):
            # ATen's kernel: 1.96 ms for the ResNet's 1x1 stride-2 shortcut (16 -> 32 channels, 32x32, batch 32)
            # against 0.17 ms as a matrix product placed at every other position
            gx, mask = pointwise_input_ct(ct, w, tuple(x.shape[-n:]), stride), [False] + list(mask[1:])
        parts = (None, None, None)
        if any(mask):
            parts = _rt.one_column(conv_backward(
                ct[0], x, w, [w.shape[1] * groups if transposed else w.shape[0]] if has_bias else None,
                list(_tuple(stride, n)), list(_tuple(padding, n)), list(_tuple(dilation, n)), transposed,
                list(_tuple(output_padding, n)), groups, list(mask)), mask)
        return (gx if gx is not None else parts[0],) + tuple(parts[1:])
    adj = (stride, padding, dilation, groups)
    return ((conv_t_input_ct if transposed else conv_input_ct)(ct, x, w, *adj) if mask[0] else None,
            (conv_t_weight_ct if transposed else conv_weight_ct)(ct, x, w, *adj, False) if mask[1] else None,
            bias_ct(ct, n, False) if mask[2] else None)


def bias_tangent(tb, n: int):
    """A bias tangent stack ``[K, O]`` (or per-sample ``[K, B, O]``) to broadcast on ``[K, B, O, *S]``."""
    lead = (tb.shape[0], 1) if tb.dim() == 2 else tuple(tb.shape[:2])
    return tb.reshape(lead + (tb.shape[-1],) + (1,) * n)


def bias_ct(ct, n: int, per_sample: bool):
    """Bias cotangent: the output cotangent ``[K, B, O, *S]`` summed over positions (and the batch)."""
    dims = tuple(range(3, 3 + n))
    return ct.sum(dims) if per_sample else ct.sum((1,) + dims)


def square(x):
    """``x∘x`` (the squared entries of a Jacobian linear in ``x``)."""
    return x * x


# Note [channels-last max pooling]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# On the CPU, ATen's max pooling with indices over contiguous (NCHW) 2-d and 3-d inputs runs one window at a
# time, and its channels-last kernel vectorises over channels: 0.6 against 4.9 ms for the cnn's first pooling
# (64 x 16 x 32 x 32), and 1.5 ms with both copies between layouts. With few channels the vector is short and it
# is slower (3 channels at 224 x 224: 14.7 against 10.7 ms), hence at least 8 channels. The two kernels scan
# each window in the same order, so they pick the same argmax at ties and at NaNs (a test checks this). Autograd
# runs the NCHW kernel, so this also speeds up the forward over a plain forward+backward. Under torch.compile it
# stays this eager kernel (a custom op, Note [eager kernels under torch.compile]).
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _channels_last_pooling(x) -> bool:
    return x.device.type == "cpu" and x.dim() in _CHANNELS_LAST and x.shape[1] >= 8 and x.is_contiguous()


def _max_pool_like(x, n, kernel, stride, padding, dilation, ceil_mode):
    return _MAX_POOL[n](x, kernel, stride or None, padding, dilation, ceil_mode, True)


@_rt.eager_under_compile(_max_pool_like)
def max_pool_channels_last(x: torch.Tensor, n: int, kernel: List[int], stride: List[int], padding: List[int],
                           dilation: List[int], ceil_mode: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max pooling with indices through the channels-last kernel (Note [channels-last max pooling]); an empty
    ``stride`` is the kernel's.
    """
    xl = x.contiguous(memory_format=_CHANNELS_LAST[x.dim()])
    y, i = _MAX_POOL[n](xl, kernel, stride or None, padding, dilation, ceil_mode, True)
    return y.contiguous(), i.contiguous()


def _adaptive_max_like(x, n, output_size):
    return _ADAPTIVE_MAX[n](x, output_size, True)


@_rt.eager_under_compile(_adaptive_max_like)
def adaptive_max_pool_channels_last(x: torch.Tensor, n: int, output_size: List[int]) -> Tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Adaptive max pooling with indices through the channels-last kernel (Note [channels-last max pooling])."""
    y, i = _ADAPTIVE_MAX[n](x.contiguous(memory_format=_CHANNELS_LAST[x.dim()]), output_size, True)
    return y.contiguous(), i.contiguous()


def pool_with_indices(x, n: int, kernel_size, stride, padding, dilation, ceil_mode):
    """A max pooling's output and flat spatial argmax indices: PyTorch's own, so ties go where autograd goes
    (Note [channels-last max pooling]).
    """
    stride = None if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else stride
    if _channels_last_pooling(x):
        return max_pool_channels_last(x, n, list(_tuple(kernel_size, n)), [] if stride is None else
                                      list(_tuple(stride, n)), list(_tuple(padding, n)), list(_tuple(dilation, n)),
                                      bool(ceil_mode))
    return _MAX_POOL[n](x, kernel_size, stride, padding, dilation, ceil_mode, True)


def adaptive_pool_with_indices(x, n: int, output_size):
    """An adaptive max pooling's output and flat spatial argmax indices (Note [channels-last max pooling])."""
    size = _tuple(output_size, n)
    if _channels_last_pooling(x) and all(isinstance(v, int) for v in size):  # None keeps an axis's size
        return adaptive_max_pool_channels_last(x, n, list(size))
    return _ADAPTIVE_MAX[n](x, output_size, True)


def pool_gather(t, idx, n: int):
    """A stack ``[K, *x]`` read at a max pooling's flat spatial indices ``idx`` ``[*y]`` -> ``[K, *y]``."""
    lead = (t.shape[0],) + tuple(idx.shape[:-n])
    i = idx.flatten(-n).expand(lead + (-1,))
    return t.flatten(-n).gather(-1, i).reshape((t.shape[0],) + tuple(idx.shape))


def _scattered_like(ct, idx, x, n):
    return ct.new_empty((ct.shape[0],) + tuple(x.shape))


@_rt.allocates
@_rt.eager_under_compile(_scattered_like)
def pool_scatter(ct: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """Adjoint of :func:`pool_gather`: ``[K, *y]`` added into zeros ``[K, *x]`` at the indices.

    Every (column, sample, channel) plane is one plane of ATen's adaptive max pooling backward, which only reads
    the indices: one fused scatter kernel, where windows that share a maximum add up there, as in autograd (an
    eager kernel under torch.compile: inductor's loops around it were 3x slower).
    """
    k, in_sp, out_sp = ct.shape[0], tuple(x.shape[-n:]), tuple(idx.shape[-n:])
    lead = (k,) + tuple(idx.shape[:-n])
    planes = math.prod(lead)
    unit = (1,) if n == 1 else ()  # 1-d through the 2-d kernel with a unit axis
    backward = torch.ops.aten.adaptive_max_pool3d_backward if n == 3 else torch.ops.aten.adaptive_max_pool2d_backward
    eager = not _rt.records_grad(ct)  # out= kernels are not differentiable
    # The kernel makes its indices contiguous: expanded over the K columns, that copies K int64 index stacks,
    # twice the cotangent's bytes (cnn, 9 columns: 7 ms of a 90 ms call). On the CPU the columns go one call
    # each over the indices as they are; on a GPU one launch for all columns costs less than the copy.
    by_column = eager and ct.device.type == "cpu" and k > 1
    rows = planes // k if by_column else planes
    g = ct.reshape((planes, 1) + unit + out_sp)
    i = (idx if by_column else idx.expand(lead + out_sp)).reshape((rows, 1) + unit + out_sp)
    like = ct.new_zeros(()).expand((rows, 1) + unit + in_sp)
    if not eager:
        return backward(g, like, i).reshape((k,) + tuple(x.shape))
    # The result is the largest stack of a product with K columns (the cnn's first pooling: 42 MB), fresh memory
    # at each call: with transparent huge pages (asked for large buffers only) its zero fill takes one page fault
    # per 2 MiB (cnn: 19 -> 11 ms).
    out = _rt.advise_huge_pages(ct.new_empty((planes, 1) + unit + in_sp))
    for lo in range(0, planes, max(rows, 1)):
        backward.grad_input(g[lo:lo + rows], like, i, grad_input=out[lo:lo + rows])
    return out.reshape((k,) + tuple(x.shape))


def avg_pool_weights(x, n: int, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """``1/divisor`` of each window of an average pooling, ``[1, 1, *y_spatial]``.

    Every entry of a window's Jacobian row is ``1/divisor``: pooled ones give ``count/divisor`` and the same
    windows summed (divisor 1) give the count of real elements, whatever the padding and ceil-mode rules.
    """
    ones = x.new_ones((1, 1) + tuple(x.shape[-n:]))
    ks, st = _tuple(kernel_size, n), _tuple(kernel_size if stride is None or stride == [] else stride, n)
    pad = _tuple(padding, n)
    if n == 1:  # avg_pool1d has no divisor_override: count through the 2-d pooling
        ones, ks, st, pad = ones.unsqueeze(-2), (1,) + ks, (1,) + st, (0,) + pad
    pool = F.avg_pool3d if n == 3 else F.avg_pool2d
    mean = pool(ones, ks, st, pad, ceil_mode, count_include_pad, divisor_override)
    count = pool(ones, ks, st, pad, ceil_mode, True, 1)
    w = mean / count.clamp_min(1)
    return w.squeeze(-2) if n == 1 else w


def adaptive_avg_weights(x, y, n: int):
    """``1/|window|`` of each window of an adaptive average pooling (PyTorch's bounds), ``[*y_spatial]``."""
    w = None
    for i in range(n):
        size_in, size_out = x.shape[i - n], y.shape[i - n]
        o = torch.arange(size_out, device=x.device)
        count = ((o + 1) * size_in + size_out - 1) // size_out - (o * size_in) // size_out
        wi = (1.0 / count.to(x.dtype)).reshape([size_out if j == i else 1 for j in range(n)])
        w = wi if w is None else w * wi
    return w


_A = torch.ops.aten
_RESAMPLE_BACKWARD = {  # (mode, spatial rank) -> (ATen's backward kernel, whether it takes align_corners)
    ("nearest-exact", 1): (_A._upsample_nearest_exact1d_backward, False),
    ("nearest-exact", 2): (_A._upsample_nearest_exact2d_backward, False),
    ("nearest-exact", 3): (_A._upsample_nearest_exact3d_backward, False),
    ("nearest", 1): (_A.upsample_nearest1d_backward, False),
    ("nearest", 2): (_A.upsample_nearest2d_backward, False),
    ("nearest", 3): (_A.upsample_nearest3d_backward, False),
    ("linear", 1): (_A.upsample_linear1d_backward, True),
    ("bilinear", 2): (_A.upsample_bilinear2d_backward, True),
    ("bicubic", 2): (_A.upsample_bicubic2d_backward, True),
    ("trilinear", 3): (_A.upsample_trilinear3d_backward, True),
}


# Nearest up-sampling by whole factors copies each input entry to a block; its adjoint sums the blocks. On an
# H100 ATen's nearest backward kernel took 8.9 ms over [8192, 16, 32, 32] and a sum pooling (avg_pool2d with
# divisor 1) 0.41 ms, both exact; on this CPU the backward kernel is the faster (2.3 against 4.3 ms at 160 rows).
NEAREST_BY_POOLING_ON_CPU = False


def _whole_factors(out_size, in_size, scales):
    """Per-axis whole up-sampling factors where nearest interpolation maps output ``i`` to input ``i // f``
    (the sizes divide, and any scale given is that factor), else ``None``.
    """
    factors = []
    for o, i, sc in zip(out_size, in_size, scales):
        if i == 0 or o % i or (sc is not None and sc != o // i):
            return None
        factors.append(o // i)
    return factors


def _block_sums(g, factors):
    """Sums of ``g`` ``[N, C, *S]`` over blocks of ``factors``: the adjoint of whole-factor nearest up-sampling."""
    if len(factors) == 1:  # avg_pool1d has no divisor_override
        return F.avg_pool1d(g, factors) * factors[0]
    return (F.avg_pool2d if len(factors) == 2 else F.avg_pool3d)(g, factors, divisor_override=1)


def resample_transpose(ct, x, size, scale_factor, mode, align_corners, recompute_scale_factor):
    """Adjoint of ``interpolate(x)`` on a stack: ATen's backward kernel on the merged stack (no forward rerun),
    or for nearest up-sampling by whole factors off the CPU, sums over the blocks (see NEAREST_BY_POOLING_ON_CPU).

    The scales are those ``F.interpolate`` hands to the forward kernel (none where it recomputes them).
    """
    if torch.compiler.is_compiling():
        # With a dynamic batch, the fake kernel of ATen's backward refuses the symbolic input size (torch 2.13:
        # "Expected IntList but got GenericList"); torch.func's adjoint traces.
        return pullback("interpolate", x, ct, size, scale_factor, mode, align_corners, recompute_scale_factor)
    n = x.dim() - 2
    if size is not None or recompute_scale_factor:
        scales = [None] * n
    else:
        scales = [float(s) for s in _tuple(scale_factor, n)]
    if mode == "nearest" and (ct.device.type != "cpu" or NEAREST_BY_POOLING_ON_CPU):
        factors = _whole_factors(ct.shape[-n:], x.shape[-n:], scales)
        if factors is not None:
            return _block_sums(ct.flatten(0, 1), factors).unflatten(0, ct.shape[:2])
    kernel, takes_corners = _RESAMPLE_BACKWARD[(mode, n)]
    size_in = [ct.shape[0] * x.shape[0]] + list(x.shape[1:])
    corners = (bool(align_corners),) if takes_corners else ()
    g = kernel(ct.flatten(0, 1), list(ct.shape[-n:]), size_in, *corners, *scales)
    return g.unflatten(0, ct.shape[:2])


def interp_matrix(x, axis: int, n: int, size, scale_factor, mode, align_corners, recompute_scale_factor,
                  antialias):
    """The transposed 1-D interpolation matrix ``[in, out]`` of one spatial axis: the identity interpolated.

    Interpolation is separable: along one axis it does not depend on the other axes, so the identity is fed
    along ``axis``, constant along the others (size 2 kept at 2; PyTorch's antialiased kernels mishandle
    size-1 axes), and read at index 0 of the others.
    """
    m = x.shape[axis - n]
    others = tuple(m if j == axis else 2 for j in range(n))
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    eye = eye.reshape((m, 1) + tuple(m if j == axis else 1 for j in range(n))).expand((m, 1) + others)
    if size is not None:
        sizes = _tuple(size, n)
        y = F.interpolate(eye, [sizes[j] if j == axis else 2 for j in range(n)], None, mode, align_corners,
                          recompute_scale_factor, antialias)
    else:
        scales = _tuple(scale_factor, n)
        y = F.interpolate(eye, None, [float(scales[j]) if j == axis else 1.0 for j in range(n)], mode,
                          align_corners, recompute_scale_factor, antialias)
    return y[(slice(None), 0) + tuple(slice(None) if j == axis else 0 for j in range(n))]


def interp_squared(d, x, n: int, transpose: bool, size, scale_factor, mode, align_corners, recompute_scale_factor,
                   antialias):
    """``(A∘A)ᵀ d`` (``transpose``) or ``(A∘A) d`` for a separable interpolation ``A = A_1 ⊗ … ⊗ A_n``: squared
    1-D matrices per axis, one axis at a time (an einsum of all of them chose its contraction order by the sizes,
    the batch's among them: under torch.compile every new batch size recompiled).
    """
    for i in range(n):
        m = square(interp_matrix(x, i, n, size, scale_factor, mode, align_corners, recompute_scale_factor,
                                 antialias))  # [in, out]
        axis = d.dim() - n + i
        d = torch.movedim(torch.movedim(d, axis, -1) @ (m.t() if transpose else m), -1, axis)
    return d


def first(v):
    """The values' stack of a tuple-valued op (values, indices); the values themselves otherwise."""
    return v[0] if isinstance(v, (tuple, list)) else v


# --- convolutions ----------------------------------------------------------------------------------------


class _Conv(Rule):
    """y = conv(x, W) + b, bilinear in (x, W); see Note [convolution weight cotangents]."""

    n = 2
    transposed = False

    def _check(self, site):
        if site.ndim("input") != self.n + 2 or "input" in site.ps:
            raise Decline  # an unbatched convolution input: the fallback handles it

    def _params(self, site):
        """The call's parameters in the order the kernels take them."""
        a = site.args
        if self.transposed:
            return a["stride"], a["padding"], a["output_padding"], a["groups"], a["dilation"]
        return a["stride"], a["padding"], a["dilation"], a["groups"]

    def _adjoint_params(self, site):
        a = site.args
        return a["stride"], a["padding"], a["dilation"], a["groups"]

    def primal(self, e, site):  # noqa: D102
        a = site.args  # the same call, an opaque op under torch.compile (Note [convolutions under torch.compile])
        return e(conv_transpose if self.transposed else conv, a["input"], a["weight"], a["bias"],
                 *self._params(site)), {}

    def jvp(self, e, site, tangents):  # noqa: D102
        return self._push(e, site, tangents, lambda v: v)

    def diag_jvp(self, e, site, tangents):
        """(A∘A) d: the jvp with ``W∘W`` for the input's diagonal and ``x∘x`` for the weight's (zero padding
        squares to zero; the bias's Jacobian is 0/1).
        """
        if site.ps:
            raise Decline  # per-sample diagonals are not propagated forward
        return self._push(e, site, tangents, lambda v: e(square, v))

    def _push(self, e, site, tangents, square_of):
        self._check(site)
        x, w = site.args["input"], site.args["weight"]
        terms = []
        if tangents["input"] is not ZERO:
            terms.append(e(conv_t_stack if self.transposed else conv_stack, tangents["input"], square_of(w),
                           *self._params(site)))
        if tangents["weight"] is not ZERO:
            kernel = conv_t_weight_tangent if self.transposed else conv_weight_tangent
            terms.append(e(kernel, square_of(x), tangents["weight"], *self._params(site)))
        tb = tangents.get("bias", ZERO)
        if tb is not ZERO:
            terms.append(e(bias_tangent, tb, self.n))
        out = e.sum(terms)
        if len(terms) == 1 and tb is not ZERO:
            out = e(_rt.expand_like, out, site.out)
        return out

    def _backward(self, e, site, ct, weight_of, input_of, done=()):
        self._check(site)
        x, w, b = site.args["input"], site.args["weight"], site.args["bias"]
        p = self._adjoint_params(site)
        pooled = self._pooled(site, ct)
        out = {}
        if site.needs("input") and "input" not in done:
            out["input"] = e(conv_t_input_ct if self.transposed else conv_input_ct, ct, x, weight_of(w), *p)
        if site.needs("weight") and "weight" not in done:
            if self.transposed:
                out["weight"] = e(conv_t_weight_ct, ct, input_of(x), w, *p, "weight" in site.ps)
            elif "weight" in site.ps:  # the patches in a node of their own: a column loop makes them once
                a = input_of(x)
                cols = e(weight_patches, a, w, *p)
                if self._pooled_weight(site, pooled):  # Note [weight cotangents through a max pooling]
                    out["weight"] = e(pooled_weight_ct, pooled[0], pooled[1], site.out, a, w, *p, cols)
                else:
                    out["weight"] = e(conv_weight_ct, ct, a, w, *p, True, cols)
            else:
                out["weight"] = e(conv_weight_ct, ct, input_of(x), w, *p, False)
        if b is not None and site.needs("bias") and "bias" not in done:
            out["bias"] = e(bias_ct, ct if pooled is None else pooled[0], self.n, "bias" in site.ps)
        return out

    def _pooled(self, site, ct):
        """``(pooled cotangent, indices)`` where ``ct`` is a max pooling's scatter of this convolution's output
        (Note [weight cotangents through a max pooling]).
        """
        if self.transposed or not (isinstance(ct, fx.Node) and ct.op == "call_function" and ct.target is pool_scatter):
            return None
        pooled, idx, y, n = ct.args[:4]
        # the pooling's spatial axes are the convolution's: a MaxPool3d on a Conv2d's [B, C, H, W] (an unbatched
        # [C, D, H, W] to it) or a 2-d pooling on a Conv1d's output also pools over channels
        return (pooled, idx) if y is site.out and n == self.n else None

    def gathers_per_chunk(self, node, rules, differentiated) -> bool:
        """Whether the weight cotangent at ``node`` (a call of this convolution in the traced graph) will take
        the pooled path (Note [weight cotangents through a max pooling]), known before the pass: the output is
        read by a max pooling alone, over the same axes, and the input by no derivative (``differentiated``:
        the nodes a derivative reaches), the kernel through im2col patches. Its patches are gathered once per
        chunk of columns, and its output's cotangent stack is never formed (on a CPU: the caller checks).
        """
        users = list(node.users)
        pool = rules.lookup(users[0]) if len(users) == 1 else None
        if self.transposed or not isinstance(pool, _MaxPool) or pool.n != self.n or self.signature is None:
            return False
        a = bind(self.signature, node.args[3:] if node.target is module_call else node.args, node.kwargs)
        x, w, y = (v.meta.get("val") if isinstance(v, fx.Node) else None for v in (a["input"], a["weight"], users[0]))
        y = first(y)
        if not all(isinstance(t, torch.Tensor) for t in (x, w, y)) or a["groups"] != 1 or \
                a["input"] in differentiated:
            return False
        if y.numel() * math.prod(w.shape[1:]) * w.element_size() > POOLED_BYTES:  # the gathered patches
            return False
        cols = weight_patches(x, w, a["stride"], a["padding"], a["dilation"], 1)  # shapes only: meta values
        return cols is not None and cols.shape[0] == 1 and cols.shape[2] == 1

    def _pooled_weight(self, site, pooled) -> bool:
        """Whether the per-sample weight cotangent skips the scatter: the input's cotangent does not read it (or
        the scatter would be made twice) and im2col patches may apply.
        """
        a = site.args
        return pooled is not None and not site.needs("input") and a["groups"] == 1 and \
            _by_patches(site.val("weight"), a["padding"], a["dilation"])

    def _fused(self, site):
        """What :func:`conv_cts` can give here (the input and shared parameters that are needed) and its
        arguments after the stack, input and weight; ``(None, None)`` for a string padding.
        """
        a = site.args
        if isinstance(a["padding"], str):
            return None, None
        mask = [site.needs(k) and a[k] is not None and k not in site.ps for k in PARTS]
        return mask, (a["bias"] is not None, a["stride"], a["padding"], a["dilation"], a["groups"], self.transposed,
                      a["output_padding"] if self.transposed else 0)

    def vjp(self, e, site, ct):
        """Shared-parameter and input cotangents from :func:`conv_cts` (one column: autograd's own kernel); per-sample
        parameters and string paddings through the kernels of Note [convolution weight cotangents].
        """
        self._check(site)
        mask, args = self._fused(site)
        if mask is None or not any(mask):
            return self._backward(e, site, ct, lambda w: w, lambda x: x)
        out = parts_of(e, e(conv_cts, ct, site.args["input"], site.args["weight"], *args, mask), mask)
        out.update(self._backward(e, site, ct, lambda w: w, lambda x: x, done=set(out)))
        return out

    def diag_vjp(self, e, site, d):
        """Input: the adjoint with ``W∘W``; weight: the weight cotangent against ``x∘x``; bias: d summed. Shared
        parameters and the input go through :func:`conv_cts` (one column: autograd's kernel) with those squares.
        """
        self._check(site)
        mask, args = self._fused(site)
        if mask is None or not any(mask):
            return self._backward(e, site, d, lambda w: e(square, w), lambda x: e(square, x))
        x, w = site.args["input"], site.args["weight"]
        out = {}
        if mask[0]:
            out.update(parts_of(e, e(conv_cts, d, x, e(square, w), *args, [True, False, False]), [True, False, False]))
        if mask[1] or mask[2]:
            params = [False, mask[1], mask[2]]
            out.update(parts_of(e, e(conv_cts, d, e(square, x), w, *args, params), params))
        out.update(self._backward(e, site, d, lambda w: e(square, w), lambda x: e(square, x), done=set(out)))
        return out


def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: D103
    ...


def _conv_t_signature(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,  # noqa: D103
                      dilation=1):
    ...


@register(F.conv1d, signature=_conv_signature)
class Conv1d(_Conv):
    """y = conv1d(x, W) + b; dy = conv(dx, W) + conv(x, dW) + db, reusing x for the weight terms."""

    n = 1


@register(F.conv2d, signature=_conv_signature)
class Conv2d(_Conv):
    """y = conv2d(x, W) + b; dy = conv(dx, W) + conv(x, dW) + db, reusing x for the weight terms."""

    n = 2


@register(F.conv3d, signature=_conv_signature)
class Conv3d(_Conv):
    """y = conv3d(x, W) + b; dy = conv(dx, W) + conv(x, dW) + db, reusing x for the weight terms."""

    n = 3


@register(F.conv_transpose1d, signature=_conv_t_signature)
class ConvTranspose1d(_Conv):
    """y = conv_transpose1d(x, W) + b; bilinear like conv, its adjoint in x is conv(·, W)."""

    n, transposed = 1, True


@register(F.conv_transpose2d, signature=_conv_t_signature)
class ConvTranspose2d(_Conv):
    """y = conv_transpose2d(x, W) + b; bilinear like conv, its adjoint in x is conv(·, W)."""

    n, transposed = 2, True


@register(F.conv_transpose3d, signature=_conv_t_signature)
class ConvTranspose3d(_Conv):
    """y = conv_transpose3d(x, W) + b; bilinear like conv, its adjoint in x is conv(·, W)."""

    n, transposed = 3, True


# --- max pooling -----------------------------------------------------------------------------------------


class _MaxPool(Rule):
    """y = max over each window; dy = dx at the argmax PyTorch returns, the cotangent scattered back there.

    The primal is emitted with its indices (no dearer on CPU than without), so no product pools twice.
    """

    n = 2

    def _with_indices(self, e, site):
        a = site.args
        return e(pool_with_indices, a["input"], self.n, a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                 a["ceil_mode"])

    def primal(self, e, site):  # noqa: D102
        if isinstance(site.out_val, (tuple, list)):  # the call returns its indices itself
            return None
        both = self._with_indices(e, site)
        return e(operator.getitem, both, 0), {"indices": e(operator.getitem, both, 1)}

    def _indices(self, e, site):
        if isinstance(site.out_val, (tuple, list)):  # the op returned its indices: reuse them
            return e(operator.getitem, site.out, 1)
        saved = site.extra.get("saved", {})
        if "indices" in saved:
            return saved["indices"]
        return e(operator.getitem, self._with_indices(e, site), 1)

    def _wrap(self, site, v):
        return (v, ZERO) if isinstance(site.out_val, (tuple, list)) else v

    square_is_self = True  # the jvp gathers at the argmax: (A∘A) d = A d

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        return self._wrap(site, e(pool_gather, t, self._indices(e, site), self.n))

    def _scatter(self, e, site, ct):
        ct = first(ct)
        if ct is ZERO:
            return {}
        return {"input": e(pool_scatter, ct, self._indices(e, site), site.args["input"], self.n)}

    def vjp(self, e, site, ct):  # noqa: D102
        return self._scatter(e, site, ct)

    def diag_vjp(self, e, site, d):
        """The Jacobian is 0/1 with one entry per row: ``d`` scatters like the cotangent."""
        return self._scatter(e, site, d)


def _max_pool_signature(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,  # noqa: D103
                        return_indices=False):
    ...


@register(F.max_pool1d, F.max_pool1d_with_indices, torch.max_pool1d, torch.max_pool1d_with_indices,
          signature=_max_pool_signature)
class MaxPool1d(_MaxPool):
    """y = max_pool1d(x); dy = dx gathered at the argmax indices."""

    n = 1


@register(F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d, signature=_max_pool_signature)
class MaxPool2d(_MaxPool):
    """y = max_pool2d(x); dy = dx gathered at the argmax indices."""

    n = 2


@register(F.max_pool3d, F.max_pool3d_with_indices, torch.max_pool3d, signature=_max_pool_signature)
class MaxPool3d(_MaxPool):
    """y = max_pool3d(x); dy = dx gathered at the argmax indices."""

    n = 3


class _AdaptiveMaxPool(_MaxPool):
    """y = max over adaptive windows; dy = dx at the argmax PyTorch returns."""

    def _with_indices(self, e, site):
        return e(adaptive_pool_with_indices, site.args["input"], self.n, site.args["output_size"])


def _adaptive_max_signature(input, output_size, return_indices=False):  # noqa: D103
    ...


@register(F.adaptive_max_pool1d, F.adaptive_max_pool1d_with_indices, torch.adaptive_max_pool1d,
          signature=_adaptive_max_signature)
class AdaptiveMaxPool1d(_AdaptiveMaxPool):
    """y = adaptive_max_pool1d(x); dy = dx gathered at the argmax indices."""

    n = 1


@register(F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices, signature=_adaptive_max_signature)
class AdaptiveMaxPool2d(_AdaptiveMaxPool):
    """y = adaptive_max_pool2d(x); dy = dx gathered at the argmax indices."""

    n = 2


@register(F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices, signature=_adaptive_max_signature)
class AdaptiveMaxPool3d(_AdaptiveMaxPool):
    """y = adaptive_max_pool3d(x); dy = dx gathered at the argmax indices."""

    n = 3


# --- average pooling and resampling (linear in x) --------------------------------------------------------


class _StackedLinear(LinearOp):
    """A linear op on ``[N, C, *spatial]``: the op itself on the merged stack, PyTorch's backward adjoint."""

    square_is_self = False  # averaging and interpolation weights are fractions: each family squares its own
    op = ""
    n = 2
    names: tuple = ()

    def _args(self, site):
        return tuple(site.args[k] for k in self.names)

    def apply(self, e, site, t):  # noqa: D102
        return e(on_stack, self.op, t, self.n + 1, *self._args(site))

    def transpose(self, e, site, ct):  # noqa: D102
        return e(pullback, self.op, site.args["input"], ct, *self._args(site))


class _AvgPool(_StackedLinear):
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")

    def row_value(self, e, site):
        """Every entry of a window's row is ``1/divisor``."""
        a = site.args
        return e(avg_pool_weights, a["input"], self.n, a["kernel_size"], a["stride"], a["padding"],
                 a["ceil_mode"], a["count_include_pad"], a.get("divisor_override"))


@register(F.avg_pool1d)
class AvgPool1d(_AvgPool):
    """y = avg_pool1d(x), linear: the pooling of the tangent, its adjoint on the cotangent."""

    op, n = "avg_pool1d", 1
    names = _AvgPool.names[:-1]

    def signature(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):  # noqa: D102
        ...


def _avg_pool_signature(input, kernel_size, stride=None, padding=0, ceil_mode=False,  # noqa: D103
                        count_include_pad=True, divisor_override=None):
    ...


@register(F.avg_pool2d, signature=_avg_pool_signature)
class AvgPool2d(_AvgPool):
    """y = avg_pool2d(x), linear: the pooling of the tangent, its adjoint on the cotangent."""

    op, n = "avg_pool2d", 2


@register(F.avg_pool3d, signature=_avg_pool_signature)
class AvgPool3d(_AvgPool):
    """y = avg_pool3d(x), linear: the pooling of the tangent, its adjoint on the cotangent."""

    op, n = "avg_pool3d", 3


class _AdaptiveAvgPool(_StackedLinear):
    names = ("output_size",)

    def signature(input, output_size):  # noqa: D102
        ...

    def row_value(self, e, site):
        """Every entry of a window's row is ``1/|window|``."""
        return e(adaptive_avg_weights, site.args["input"], site.out, self.n)


@register(F.adaptive_avg_pool1d)
class AdaptiveAvgPool1d(_AdaptiveAvgPool):
    """y = adaptive_avg_pool1d(x), linear: the pooling of the tangent, its adjoint on the cotangent."""

    op, n = "adaptive_avg_pool1d", 1


@register(F.adaptive_avg_pool2d)
class AdaptiveAvgPool2d(_AdaptiveAvgPool):
    """y = adaptive_avg_pool2d(x), linear: the pooling of the tangent, its adjoint on the cotangent."""

    op, n = "adaptive_avg_pool2d", 2


@register(F.adaptive_avg_pool3d)
class AdaptiveAvgPool3d(_AdaptiveAvgPool):
    """y = adaptive_avg_pool3d(x), linear: the pooling of the tangent, its adjoint on the cotangent."""

    op, n = "adaptive_avg_pool3d", 3


@register(F.interpolate)
class Interpolate(_StackedLinear):
    """y = interpolate(x) (nn.Upsample), linear: resampled tangent, PyTorch's backward on the cotangent."""

    op = "interpolate"
    names = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")

    def signature(input, size=None, scale_factor=None, mode="nearest", align_corners=None,  # noqa: D102
                  recompute_scale_factor=None, antialias=False):
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(on_stack, self.op, t, site.ndim("input") - 1, *self._args(site))

    def transpose(self, e, site, ct):  # noqa: D102
        a = site.args
        if (a["mode"], site.ndim("input") - 2) in _RESAMPLE_BACKWARD and not a["antialias"] and \
                not isinstance(a["align_corners"], torch.fx.Node):
            return e(resample_transpose, ct, a["input"], a["size"], a["scale_factor"], a["mode"],
                     a["align_corners"], a["recompute_scale_factor"])
        return super().transpose(e, site, ct)

    def diag_vjp(self, e, site, d):
        """Nearest modes are 0/1 (the adjoint itself); the others square the 1-D weights of each axis."""
        if site.args["mode"] in ("nearest", "nearest-exact"):
            return {"input": self.transpose(e, site, d)}
        return {"input": e(interp_squared, d, site.args["input"], site.ndim("input") - 2, True, *self._args(site))}

    def diag_jvp(self, e, site, tangents):
        """Nearest modes are 0/1 (the op itself); the others square the 1-D weights of each axis."""
        d = tangents["input"]
        if d is ZERO or site.args["mode"] in ("nearest", "nearest-exact"):
            return self.jvp(e, site, tangents)
        return e(interp_squared, d, site.args["input"], site.ndim("input") - 2, False, *self._args(site))


# --- rearrangements (0/1 linear maps: the diagonal rule is the adjoint) ----------------------------------


@register(F.pixel_shuffle)
class PixelShuffle(LinearOp):
    """y = pixel_shuffle(x, r), a permutation; the adjoint is pixel_unshuffle."""

    def signature(input, upscale_factor):  # noqa: D102
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(F.pixel_shuffle, t, site.args["upscale_factor"])

    def transpose(self, e, site, ct):  # noqa: D102
        return e(F.pixel_unshuffle, ct, site.args["upscale_factor"])


@register(F.pixel_unshuffle)
class PixelUnshuffle(LinearOp):
    """y = pixel_unshuffle(x, r), a permutation; the adjoint is pixel_shuffle."""

    def signature(input, downscale_factor):  # noqa: D102
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(F.pixel_unshuffle, t, site.args["downscale_factor"])

    def transpose(self, e, site, ct):  # noqa: D102
        return e(F.pixel_shuffle, ct, site.args["downscale_factor"])


@register(F.unfold)
class Unfold(LinearOp):
    """y = unfold(x) (im2col), a 0/1 copy of patches; the adjoint is fold, which adds overlapping patches."""

    def signature(input, kernel_size, dilation=1, padding=0, stride=1):  # noqa: D102
        ...

    def _args(self, site):
        return tuple(site.args[k] for k in ("kernel_size", "dilation", "padding", "stride"))

    def apply(self, e, site, t):  # noqa: D102
        return e(on_stack, "unfold", t, 3, *self._args(site))

    def transpose(self, e, site, ct):  # noqa: D102
        size = e(_spatial, site.args["input"], 2)
        return e(on_stack, "fold", ct, 2, size, *self._args(site))


@register(F.fold)
class Fold(LinearOp):
    """y = fold(x) (col2im), a 0/1 sum of patches; the adjoint is unfold."""

    def signature(input, output_size, kernel_size, dilation=1, padding=0, stride=1):  # noqa: D102
        ...

    def _args(self, site):
        return tuple(site.args[k] for k in ("kernel_size", "dilation", "padding", "stride"))

    def apply(self, e, site, t):  # noqa: D102
        return e(on_stack, "fold", t, 2, site.args["output_size"], *self._args(site))

    def transpose(self, e, site, ct):  # noqa: D102
        return e(on_stack, "unfold", ct, 3, *self._args(site))


def _spatial(x, n: int) -> tuple:
    """The last ``n`` sizes of ``x``."""
    return tuple(x.shape[-n:])

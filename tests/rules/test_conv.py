"""Convolution, pooling and resampling rules against torch.func (float64, tiny shapes).

Every case is one op wrapped in ``nn.Sequential`` (a bare ``nn.ConvTranspose2d`` as the root cannot be traced:
its optional ``output_size`` argument becomes a placeholder); none of them may fall back to autograd.
"""

from __future__ import annotations

import math
import operator
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference  # noqa: E402
from reference import Fn, check_direction_products  # noqa: E402

import fxjac  # noqa: E402


class ConvFn(nn.Module):
    """``F.conv*`` called directly with the module's own parameters."""

    def __init__(self, fn, weight_shape, bias, **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs
        self.weight = nn.Parameter(torch.randn(weight_shape) / 3)
        self.bias = nn.Parameter(torch.randn(bias)) if bias else None

    def forward(self, x):
        return self.fn(x, self.weight, self.bias, **self.kwargs)


class MaxPoolIndices(nn.Module):
    """Max pooling that returns its indices (a tuple-valued node)."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        y, _ = self.pool(x)
        return y


IMG, SEQ, VOL = (2, 5, 6), (2, 7), (2, 3, 4, 5)

# (id, module factory, one sample's shape): params where the op has them.
CONV_CASES = [
    ("conv2d", lambda: nn.Conv2d(2, 3, 3), IMG),
    ("conv2d_stride2_pad_groups2", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 5, 6)),
    ("conv2d_dilation2", lambda: nn.Conv2d(2, 3, (2, 3), padding=2, dilation=2), IMG),
    ("conv2d_same_even_kernel", lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(1, 2)), IMG),
    ("conv2d_valid_nobias", lambda: nn.Conv2d(2, 3, 2, padding="valid", bias=False), IMG),
    ("conv2d_stride_past_kernel", lambda: nn.Conv2d(2, 3, 2, stride=3), (2, 7, 8)),
    ("conv1d_stride2_groups2", lambda: nn.Conv1d(2, 4, 3, stride=2, groups=2), SEQ),
    ("conv1d_same_dilation2", lambda: nn.Conv1d(2, 3, 4, padding="same", dilation=2), SEQ),
    ("conv3d_stride", lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(1, 0, 1)), VOL),
    ("conv3d_groups2", lambda: nn.Conv3d(2, 4, 2, groups=2, dilation=(2, 1, 1)), VOL),
    # stride 1: input cotangents by the flipped kernel, or a channel matrix product for 1x1 kernels
    ("conv2d_1x1", lambda: nn.Conv2d(2, 3, 1), IMG),
    ("conv1d_1x1_nobias", lambda: nn.Conv1d(2, 4, 1, bias=False), SEQ),
    ("conv3d_1x1_groups2", lambda: nn.Conv3d(2, 4, 1, groups=2), VOL),
    ("conv2d_1x1_padded", lambda: nn.Conv2d(2, 3, 1, padding=1), IMG),  # padding past the kernel's reach
    # 1x1 kernels at strides above 1 (a ResNet's shortcut): the channel product at every stride-th position
    ("conv2d_1x1_stride2_odd", lambda: nn.Conv2d(2, 3, 1, stride=2), (2, 5, 6)),
    ("conv1d_1x1_stride3", lambda: nn.Conv1d(2, 4, 1, stride=3, bias=False), SEQ),
    ("conv3d_1x1_stride_mixed", lambda: nn.Conv3d(2, 3, 1, stride=(2, 1, 3)), VOL),
    ("conv2d_pad_past_reach", lambda: nn.Conv2d(2, 3, (3, 2), padding=(1, 2)), IMG),
    ("conv2d_asymmetric_dilated", lambda: nn.Conv2d(4, 2, (3, 2), padding=(2, 1), dilation=(2, 3), groups=2),
     (4, 6, 7)),
    ("F.conv2d", lambda: ConvFn(F.conv2d, (4, 1, 2, 3), 4, stride=(2, 1), groups=2), IMG),
    ("conv_transpose2d", lambda: nn.ConvTranspose2d(2, 3, 3), IMG),
    ("conv_transpose2d_stride2_outpad_groups2",
     lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (4, 3, 4)),
    ("conv_transpose2d_dilation3_outpad2", lambda: nn.ConvTranspose2d(2, 3, 2, stride=2, dilation=3,
                                                                        output_padding=2), (2, 3, 4)),
    ("conv_transpose1d", lambda: nn.ConvTranspose1d(2, 4, 3, stride=2, groups=2, bias=False), SEQ),
    ("conv_transpose3d", lambda: nn.ConvTranspose3d(2, 3, 2, stride=(2, 1, 1), padding=(0, 1, 0)), VOL),
]

POOL_CASES = [
    ("max_pool2d", lambda: nn.MaxPool2d(2), IMG),
    ("max_pool2d_pad_ceil", lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), IMG),
    ("max_pool2d_dilation2_overlap", lambda: nn.MaxPool2d(2, stride=1, dilation=2), IMG),
    ("max_pool2d_indices",
     lambda: MaxPoolIndices(nn.MaxPool2d(3, stride=2, padding=1, return_indices=True)), IMG),
    ("max_pool1d", lambda: nn.MaxPool1d(3, stride=2, padding=1), SEQ),
    ("max_pool1d_indices", lambda: MaxPoolIndices(nn.MaxPool1d(2, return_indices=True)), SEQ),
    ("max_pool3d_ceil", lambda: nn.MaxPool3d(2, ceil_mode=True), VOL),
    ("max_pool3d_indices", lambda: MaxPoolIndices(nn.MaxPool3d(2, stride=1, return_indices=True)), VOL),
    ("torch.max_pool1d", lambda: Fn(lambda x: torch.max_pool1d(x, 2)), SEQ),
    ("torch.max_pool1d_with_indices",
     lambda: Fn(lambda x: torch.max_pool1d_with_indices(x, 3, 2, 1)[0]), SEQ),
    ("torch.max_pool2d", lambda: Fn(lambda x: torch.max_pool2d(x, 2, 1)), IMG),
    ("torch.max_pool3d", lambda: Fn(lambda x: torch.max_pool3d(x, 2, 1, 1)), VOL),
    ("avg_pool2d_ceil_nopadcount", lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True,
                                                         count_include_pad=False), IMG),
    ("avg_pool2d_divisor", lambda: nn.AvgPool2d(2, divisor_override=3), IMG),
    ("avg_pool1d", lambda: nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True), SEQ),
    ("avg_pool3d", lambda: nn.AvgPool3d(2, padding=1, count_include_pad=False), VOL),
    ("adaptive_avg_pool1d", lambda: nn.AdaptiveAvgPool1d(3), SEQ),
    ("adaptive_avg_pool2d", lambda: nn.AdaptiveAvgPool2d((2, 4)), IMG),
    ("adaptive_avg_pool3d", lambda: nn.AdaptiveAvgPool3d((2, 3, None)), VOL),
    ("adaptive_max_pool1d", lambda: nn.AdaptiveMaxPool1d(3), SEQ),
    ("adaptive_max_pool1d_indices",
     lambda: MaxPoolIndices(nn.AdaptiveMaxPool1d(4, return_indices=True)), SEQ),
    ("torch.adaptive_max_pool1d", lambda: Fn(lambda x: torch.adaptive_max_pool1d(x, 3)[0]), SEQ),
    ("adaptive_max_pool2d", lambda: nn.AdaptiveMaxPool2d((2, 4)), IMG),
    ("adaptive_max_pool2d_indices",
     lambda: MaxPoolIndices(nn.AdaptiveMaxPool2d(3, return_indices=True)), IMG),
    ("adaptive_max_pool3d", lambda: nn.AdaptiveMaxPool3d((2, 3, 2)), VOL),
    ("adaptive_max_pool3d_indices",
     lambda: MaxPoolIndices(nn.AdaptiveMaxPool3d(2, return_indices=True)), VOL),
]

RESAMPLE_CASES = [
    ("upsample_nearest", lambda: nn.Upsample(scale_factor=2), IMG),
    ("upsample_nearest_exact_size", lambda: nn.Upsample(size=(8, 4), mode="nearest-exact"), IMG),
    ("upsample_nearest_exact_scale",
     lambda: nn.Upsample(scale_factor=(1.7, 0.6), mode="nearest-exact"), IMG),
    ("upsample_nearest_exact_1d", lambda: nn.Upsample(scale_factor=1.6, mode="nearest-exact"), SEQ),
    ("upsample_nearest_exact_3d",
     lambda: nn.Upsample(scale_factor=(1.5, 1, 0.8), mode="nearest-exact"), VOL),
    ("interpolate_lanczos",
     lambda: Fn(lambda x: F.interpolate(x, scale_factor=1.6, mode="lanczos", antialias=True)), IMG),
    ("upsample_bilinear_size", lambda: nn.Upsample(size=(7, 9), mode="bilinear"), IMG),
    ("upsample_bilinear_align_corners", lambda: nn.Upsample(scale_factor=1.5, mode="bilinear",
                                                             align_corners=True), IMG),
    ("interpolate_bilinear_down_recompute", lambda: Fn(lambda x: F.interpolate(
        x, scale_factor=0.7, mode="bilinear", recompute_scale_factor=True)), IMG),
    ("upsample_linear", lambda: nn.Upsample(scale_factor=2.5, mode="linear"), SEQ),
    ("upsample_bicubic", lambda: nn.Upsample(scale_factor=(1.5, 0.7), mode="bicubic"), IMG),
    ("upsample_trilinear", lambda: nn.Upsample(scale_factor=2, mode="trilinear"), VOL),
    ("interpolate_area", lambda: Fn(lambda x: F.interpolate(x, size=(3, 4), mode="area")), IMG),
    ("interpolate_bilinear_antialias", lambda: Fn(lambda x: F.interpolate(x, size=(3, 4), mode="bilinear",
                                                                          antialias=True)), IMG),
    ("pixel_shuffle", lambda: nn.PixelShuffle(2), (8, 3, 2)),
    ("pixel_unshuffle", lambda: nn.PixelUnshuffle(2), (2, 4, 6)),
    ("unfold", lambda: nn.Unfold(2, padding=1, stride=2), IMG),
    ("unfold_dilation2", lambda: nn.Unfold((2, 3), dilation=2), IMG),
    ("fold", lambda: nn.Fold((5, 6), 2, padding=1, stride=2), (8, 12)),
]

ALL = CONV_CASES + POOL_CASES + RESAMPLE_CASES


def _model(factory, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(factory()).double()


def _input(shape, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch,) + tuple(shape), generator=g, dtype=torch.float64)


def _fallbacks(caught) -> list:
    return [str(w.message) for w in caught if "fallback" in str(w.message)]


def _check(model, x, **kwargs):
    """The direction products are exact and no op falls back to autograd."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_direction_products(model, (x,), **kwargs)
    assert not _fallbacks(caught), _fallbacks(caught)


@pytest.mark.parametrize("name, factory, shape", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv(name, factory, shape):
    _check(_model(factory), _input(shape, 3))


_GROUPED_PATH = [c for c in CONV_CASES if "3d" not in c[0]]


@pytest.mark.parametrize("name, factory, shape", _GROUPED_PATH, ids=[c[0] for c in _GROUPED_PATH])
def test_conv_weight_cotangents_without_im2col(name, factory, shape, monkeypatch):
    # 1-d and 2-d weight cotangents take the im2col path below a patch budget: force the grouped convolution.
    from fxjac.rules import conv

    monkeypatch.setattr(conv, "UNFOLD_BYTES", 0)
    _check(_model(factory), _input(shape, 3), products=("vjp", "mjp", "jacobian"))


_WIDE = [  # at least 4 input channels per group: one column of per-sample weight cotangents by a grouped kernel
    ("conv2d_stride2", lambda: nn.Conv2d(4, 3, 3, stride=2, padding=1), (4, 7, 6)),
    ("conv2d_same_dilation2_groups2", lambda: nn.Conv2d(8, 4, 3, padding="same", dilation=2, groups=2), (8, 6, 5)),
    ("conv2d_same_even_kernel", lambda: nn.Conv2d(4, 3, (2, 3), padding="same"), (4, 5, 6)),
    ("conv1d_stride3", lambda: nn.Conv1d(5, 2, 4, stride=3, padding=2), (5, 11)),
    ("conv3d", lambda: nn.Conv3d(4, 2, 2, stride=(1, 2, 1), padding=1), (4, 3, 4, 3)),
]


@pytest.mark.parametrize("name, factory, shape", _WIDE, ids=[c[0] for c in _WIDE])
def test_conv_per_sample_weight_cotangents_wide(name, factory, shape):
    _check(_model(factory), _input(shape, 3), products=("vjp", "mjp"))


@pytest.mark.parametrize("conv", [nn.Conv2d(16, 3, 3, padding=1),
                                  nn.Conv2d(32, 4, 3, padding=2, dilation=2, groups=2, bias=False),
                                  nn.Conv1d(16, 3, 5, padding=2)], ids=["plain", "dilated_grouped", "1d"])
def test_conv_weight_cotangents_by_kernel_offsets(conv, monkeypatch):
    # Stride-1 convolutions with many channels and positions take one GEMM per kernel offset (no patches):
    # per-sample and summed weight cotangents, one column and a stack, against torch.func.
    from reference import assert_close, per_sample_jacobian

    import fxjac
    from fxjac.rules import conv as rules

    used = []
    shifts = rules._corr_weight_shifts
    monkeypatch.setattr(rules, "_corr_weight_shifts", lambda *a: used.append(1) or shifts(*a))
    model = nn.Sequential(conv).double()
    x = _input((conv.in_channels,) + ((24, 24) if conv.weight.dim() == 4 else (520,)), 2)
    J = per_sample_jacobian(model, (x,), "params")  # [B, O, P]
    g = torch.Generator().manual_seed(5)
    M = torch.randn(2, 3, J.shape[1], generator=g, dtype=torch.float64)
    _, got = fxjac.mjp(model, wrt="params", reduce="none")(x, M)
    assert_close(got, torch.einsum("bko,bop->bkp", M, J), "per-sample mjp")
    _, got = fxjac.mjp(model, wrt="params")(x, M)
    assert_close(got, torch.einsum("bko,bop->kp", M, J), "summed mjp")
    _, got = fxjac.vjp(model, wrt="params", reduce="none")(x, M[:, 0].reshape(model(x).shape))
    assert_close(got, torch.einsum("bo,bop->bp", M[:, 0], J), "per-sample vjp")
    assert used, "the kernel-offset path was not taken"


@pytest.mark.parametrize("name, factory, shape", POOL_CASES + RESAMPLE_CASES,
                         ids=[c[0] for c in POOL_CASES + RESAMPLE_CASES])
def test_linear_and_pooling(name, factory, shape):
    # No parameters: a vector product and the Jacobian in both modes cover stacks of any K.
    _check(_model(factory), _input(shape, 3), products=("vjp", "jacobian"))


BATCH_ONE = [CONV_CASES[1], CONV_CASES[12], POOL_CASES[1], RESAMPLE_CASES[2]]


@pytest.mark.parametrize("name, factory, shape", BATCH_ONE, ids=[c[0] for c in BATCH_ONE])
def test_batch_of_one(name, factory, shape):
    _check(_model(factory), _input(shape, 1))


def test_non_contiguous_input():
    base = _input((2, 6, 5), 3)
    x = base.transpose(-1, -2)
    assert not x.is_contiguous()
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2), nn.MaxPool2d(2, ceil_mode=True),
                          nn.Upsample(scale_factor=2, mode="bilinear")).double()
    _check(model, x)


def test_max_pool_ties_follow_autograd():
    # Integer-valued inputs tie inside most windows: the derivative goes to the index PyTorch returns.
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (3, 2, 5, 6), generator=g).double()
    for pool in (nn.MaxPool2d(2), nn.MaxPool2d(3, stride=1, padding=1), nn.AdaptiveMaxPool2d((2, 3))):
        _check(nn.Sequential(pool), x, products=("vjp", "jacobian"))


def test_padding_modes():
    # Non-zero padding modes arrive as F.pad then an unpadded convolution: the convolution stays structured.
    for mode in ("reflect", "circular", "replicate"):
        model = _model(lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode))  # noqa: B023
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_direction_products(model, (_input(IMG, 2),), products=("jvp", "vjp", "mjp"))
        assert not any("conv2d" in m for m in _fallbacks(caught)), _fallbacks(caught)


class UNetish(nn.Module):
    """Down, up to the skip's size (a traced size node), add, transposed conv back: the ops composed."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        d = self.c2(F.max_pool2d(h, 2))
        u = F.interpolate(d, size=h.shape[-2:], mode="bilinear", align_corners=False)
        return self.up(F.avg_pool2d(h + u, 2))


def test_composed_model():
    torch.manual_seed(0)
    _check(UNetish().double(), _input((2, 6, 7), 3))


def test_every_spelling_is_registered_and_sampled():
    # The cases trace only to registered targets, and every key of this family is traced by some case.
    from fxjac.rules import RULES
    from fxjac.tracing import trace

    seen = set()
    for _, factory, _ in ALL:
        gm = trace(_model(factory))
        targets = [n.target for n in gm.graph.nodes
                   if n.op == "call_function" and n.target is not operator.getitem]
        assert targets and all(t in RULES for t in targets), targets
        seen.update(targets)
    family = {k for k, rule in RULES.items() if type(rule).__module__ == "fxjac.rules.conv"}
    assert family <= seen, [getattr(k, "__name__", k) for k in family - seen]


@pytest.mark.compile
def test_torch_compile_changing_batch():
    torch.manual_seed(0)
    p = fxjac.vjp(UNetish().double(), wrt="params", reduce="none")
    p(_input((2, 6, 7), 1), _input((2, 6, 6), 1))  # built at its first call, compiled after
    # aot_eager: dynamo's whole-graph capture (vjp/vmap kernels included) without inductor's slow codegen.
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (2, 3):
        x = _input((2, 6, 7), batch)
        w = _input((2, 6, 6), batch, seed=2)
        torch.testing.assert_close(compiled(x, w)[1], p(x, w)[1])


@pytest.mark.skipif(not hasattr(reference, "check_diag_backprop"), reason="no reference.check_diag_backprop")
@pytest.mark.parametrize("name, factory, shape", ALL, ids=[c[0] for c in ALL])
def test_diag_backprop(name, factory, shape):
    # One op: the diagonal rule must equal the exact diagonal of Jᵀ diag(d) J.
    reference.check_diag_backprop(_model(factory), (_input(shape, 3),))


@pytest.mark.compile
@pytest.mark.parametrize("mode", ["eager", "autograd", "compiled", "compiled_einsum", "long_patches"])
def test_per_sample_weight_cotangents_per_column(mode, monkeypatch):
    """A stack of columns of per-sample weight cotangents by im2col takes one GEMM per column: written into one
    buffer eagerly, stacked under autograd and torch.compile; by one einsum under compile past
    ``PER_COLUMN_UNROLL`` columns and for patches longer than ``PER_COLUMN_PATCH``; all exact.
    """
    from reference import assert_close, per_sample_jacobian

    from fxjac.rules import conv as rules

    if mode == "compiled_einsum":
        monkeypatch.setattr(rules, "PER_COLUMN_UNROLL", 1)
    if mode == "long_patches":
        monkeypatch.setattr(rules, "PER_COLUMN_PATCH", 0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Tanh(),
                          nn.Conv2d(6, 3, 2)).double()
    x = _input((4, 7, 6), 3)
    J = per_sample_jacobian(model, (x,), "params")  # [B, O, P]
    M = torch.randn(3, 4, J.shape[1], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    p = fxjac.mjp(model, wrt="params", reduce="none", differentiable=mode == "autograd", example_inputs=(x,))
    if mode.startswith("compiled"):
        p = torch.compile(p, backend="aot_eager", fullgraph=True)
    got = p(x, M.requires_grad_(mode == "autograd"))[1]
    assert_close(got.detach(), torch.einsum("bko,bop->bkp", M.detach(), J), f"per-sample mjp [{mode}]")
    if mode == "autograd":  # and it differentiates: d<got, R>/dM = R J per sample
        R = torch.randn_like(got)
        (dm,) = torch.autograd.grad((got * R).sum(), M)
        assert_close(dm, torch.einsum("bkp,bop->bko", R, J), "d per-sample mjp / dM")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_max_pool_scatter_of_a_large_stack_into_huge_pages(n):
    # A stack of columns whose scatter target reaches glibc's mmap threshold (32 MiB) is written into a buffer
    # advised for transparent huge pages through ATen's out= kernel: the same numbers as autograd's max-pool
    # backward, column by column (overlapping windows, so some inputs receive several windows' cotangents).
    from fxjac.rules.conv import pool_scatter, pool_with_indices

    torch.manual_seed(0)
    shape = {1: (4, 8, 2 ** 18), 2: (4, 8, 512, 512), 3: (4, 8, 64, 64, 64)}[n]
    x = torch.randn(shape)
    y, idx = pool_with_indices(x, n, 3, 2, 1, 1, False)
    ct = torch.randn((2,) + tuple(y.shape))
    got = pool_scatter(ct, idx, x, n)
    assert got.numel() * 4 >= 1 << 25
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
    xr = x.clone().requires_grad_(True)
    yr = pool(xr, 3, 2, 1)
    for k in range(2):
        (ref,) = torch.autograd.grad(yr, xr, ct[k], retain_graph=True)
        assert torch.equal(got[k], ref), f"column {k}"


def test_max_pool_scatter_reads_the_indices_in_place_for_every_column():
    # ATen's kernel makes its indices contiguous: expanded over K columns they were copied at every call (cnn:
    # 19 MB of int64 for 9 columns, 7 ms). On the CPU each column is one call over the indices as they are.
    from torch.utils._python_dispatch import TorchDispatchMode

    from fxjac.rules.conv import pool_scatter, pool_with_indices

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.int_copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default) and \
                    out.dtype == torch.int64:
                self.int_copies.append(tuple(out.shape))
            return out

    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    y, idx = pool_with_indices(x, 2, 2, 2, 0, 1, False)
    ct = torch.randn((5,) + tuple(y.shape))
    with Copies() as mode:
        got = pool_scatter(ct, idx, x, 2)
    assert mode.int_copies == []
    xr = x.clone().requires_grad_(True)
    yr = F.max_pool2d(xr, 2, 2)
    for k in range(5):
        (ref,) = torch.autograd.grad(yr, xr, ct[k], retain_graph=True)
        assert torch.equal(got[k], ref), f"column {k}"


@pytest.mark.parametrize("n, args", [(2, (2, 2, 0)), (2, (3, 2, 1)), (3, (2, 2, 0)), (2, "adaptive"),
                                     (3, "adaptive")])
def test_channels_last_pooling_picks_autograds_argmax_at_ties(n, args):
    # Note [channels-last max pooling]: the faster kernel must route cotangents exactly where autograd's NCHW
    # kernel does, also where a window holds its maximum twice (integer values) or a NaN.
    from fxjac.rules.conv import adaptive_pool_with_indices, pool_with_indices

    g = torch.Generator().manual_seed(n)
    x = torch.randint(-2, 2, (3, 8) + (6,) * n, generator=g).float()
    x.view(-1)[5] = float("nan")
    if args == "adaptive":
        got = adaptive_pool_with_indices(x, n, 3)
        ref = (F.adaptive_max_pool2d if n == 2 else F.adaptive_max_pool3d)(x, 3, return_indices=True)
    else:
        got = pool_with_indices(x, n, args[0], args[1], args[2], 1, False)
        ref = (F.max_pool2d if n == 2 else F.max_pool3d)(x, *args, return_indices=True)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    assert torch.equal(got[1], ref[1])
    assert torch.equal(got[0].nan_to_num(), ref[0].nan_to_num())


@pytest.mark.parametrize("pool", [
    lambda h: F.max_pool2d(h, 3, 2, 1, ceil_mode=True),
    lambda h: F.max_pool2d(h, 2, 1, 0, dilation=2),
    lambda h: F.adaptive_max_pool2d(h, (3, None)),
    lambda h: F.adaptive_max_pool2d(h, 2),
    lambda h: F.max_pool3d(h.unsqueeze(2).repeat(1, 1, 2, 1, 1), 2, 1),
], ids=["ceil_pad", "dilated", "adaptive_none", "adaptive", "3d"])
def test_channels_last_pooling_in_products(pool):
    # Note [channels-last max pooling] takes pools over 8 or more channels: every product kind through it,
    # after a ReLU that moves behind the pooling (Note [ReLU after max pooling]).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 8, 3, padding=1), nn.LazyLinear(3)

        def forward(self, x):
            return self.fc(pool(torch.relu(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    net = Net().double()
    net(x)
    reference.check_direction_products(net, (x,), products=("jvp", "vjp", "mjp"))
    reference.check_metric_products(net, (x,), matrices=("diag",), wrts=("params",))


_NEAREST = [  # whole factors (block sums off the CPU), and sizes or scales that are not (ATen's kernel)
    ("scale2_2d", lambda: nn.Upsample(scale_factor=2), IMG),
    ("scale_2_3_2d", lambda: nn.Upsample(scale_factor=(2, 3)), IMG),
    ("size_whole_1d", lambda: nn.Upsample(size=21), SEQ),
    ("scale3_1d", lambda: Fn(lambda x: F.interpolate(x, scale_factor=3)), SEQ),
    ("scale_1_2_2_3d", lambda: nn.Upsample(scale_factor=(1, 2, 2)), VOL),
    ("size_not_whole_2d", lambda: nn.Upsample(size=(7, 9)), IMG),
    ("scale_not_whole_2d", lambda: nn.Upsample(scale_factor=1.5), IMG),
    ("scale_past_whole_2d", lambda: nn.Upsample(scale_factor=2.0000001), IMG),  # sizes double; the mapping not
]


@pytest.mark.parametrize("name, factory, shape", _NEAREST, ids=[c[0] for c in _NEAREST])
def test_nearest_upsampling_adjoint_by_block_sums(name, factory, shape, monkeypatch):
    # On a GPU the adjoint of nearest up-sampling by whole factors is a sum pooling (21x faster than ATen's
    # kernel on an H100); here forced onto the CPU, against torch.func, with stacks of columns (mjp, jacobian).
    from fxjac.rules import conv

    monkeypatch.setattr(conv, "NEAREST_BY_POOLING_ON_CPU", True)
    used = []
    block_sums = conv._block_sums
    monkeypatch.setattr(conv, "_block_sums", lambda *a: used.append(1) or block_sums(*a))
    _check(_model(factory), _input(shape, 3), products=("vjp", "mjp", "jacobian"))
    assert bool(used) == ("not_whole" not in name and "past_whole" not in name)


class _ConvPool(nn.Module):
    """A convolution whose output a max pooling reads (Note [weight cotangents through a max pooling]); with
    ``lifted``, the convolution's input comes from a Linear, so its input cotangent is needed too."""

    def __init__(self, conv, pool, sample, lifted=False):
        super().__init__()
        self.sample, self.lifted = sample, lifted
        self.lift = nn.Linear(3, math.prod(sample)) if lifted else None
        self.conv, self.pool = conv, pool
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        if self.lifted:
            x = torch.tanh(self.lift(x)).reshape((-1,) + self.sample)
        return self.head(torch.relu(self.pool(self.conv(x))).flatten(1))


_CONV_POOL = [  # (id, conv, pool (factories), one sample's input shape, lifted, the scatter skipped)
    ("k2", lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: nn.MaxPool2d(2), (3, 6, 6), False, True),
    ("overlap_pad_ceil", lambda: nn.Conv2d(2, 3, 3), lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
     (2, 7, 8), False, True),
    ("indices_nobias", lambda: nn.Conv2d(3, 2, 2, bias=False),
     lambda: MaxPoolIndices(nn.MaxPool2d(2, return_indices=True)), (3, 5, 7), False, True),
    ("adaptive", lambda: nn.Conv2d(1, 3, 3, padding=1, stride=2), lambda: nn.AdaptiveMaxPool2d((2, 3)), (1, 7, 6),
     False, True),
    ("same_even_wide", lambda: nn.Conv2d(5, 3, (2, 3), padding="same"), lambda: nn.MaxPool2d(2), (5, 4, 6), False,
     True),
    ("1d", lambda: nn.Conv1d(3, 2, 3, padding=1), lambda: nn.MaxPool1d(2, ceil_mode=True), (3, 7), False, True),
    ("lifted", lambda: nn.Conv2d(2, 3, 3, padding=1), lambda: nn.MaxPool2d(2), (2, 4, 4), True, False),
    ("grouped", lambda: nn.Conv2d(2, 4, 3, groups=2), lambda: nn.MaxPool2d(2), (2, 6, 6), False, False),
    ("wide", lambda: nn.Conv2d(4, 3, 3, padding=1), lambda: nn.MaxPool2d(2), (4, 4, 4), False, False),
    ("3d", lambda: nn.Conv3d(2, 3, 2), lambda: nn.MaxPool3d(2), (2, 3, 5, 5), False, False),
    # a pooling of higher rank pools over the channels too (an unbatched input to it): the scatter stays
    ("maxout_3d_on_2d", lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: nn.MaxPool3d(2), (3, 6, 6), False, False),
    ("2d_on_1d", lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: nn.MaxPool2d(2), (3, 8), False, False),
]


@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "scattered_at_run_time"])
@pytest.mark.parametrize("name, conv, pool, shape, lifted, skipped", _CONV_POOL, ids=[c[0] for c in _CONV_POOL])
def test_weight_cotangents_through_a_max_pooling(name, conv, pool, shape, lifted, skipped, gather, monkeypatch):
    # Per-sample weight cotangents from the pooled cotangent and the patches at each argmax, the bias's from the
    # pooled cotangent: every parameter-space product that keeps samples apart, against torch.func.
    from fxjac.rules import conv as rules

    if gather:  # every stack, one column too
        monkeypatch.setattr(rules, "POOLED_MIN_COLUMNS", 1)
    else:  # the gathered patches over their budget: the scatter is made at run time instead
        monkeypatch.setattr(rules, "POOLED_BYTES", 0)
    torch.manual_seed(0)
    model = _ConvPool(conv(), pool(), shape, lifted)
    x = _input((3,) if lifted else shape, 3)
    model(x.float())
    model = model.double()
    reference.check_metric_products(model, (x,), wrts=("params",), matrices=("diag", "sqrt"))
    _check(model, x, products=("vjp", "mjp"))
    code = fxjac.ggn(model, loss="cross_entropy", out="diag", example_inputs=(x,)).code
    assert ("pooled_weight_ct" in code) is skipped and ("pool_scatter" not in code) is (skipped and not lifted)


@pytest.mark.parametrize("name, conv, pool, shape, lifted, skipped", _CONV_POOL, ids=[c[0] for c in _CONV_POOL])
def test_a_pooled_convolution_takes_all_columns_in_one_chunk(name, conv, pool, shape, lifted, skipped, monkeypatch):
    # Where the weight cotangent takes the pooled path (its patches gathered once per chunk), the columns go in
    # one chunk although each column's stacks are over the budget (here 1 byte); elsewhere one at a time. The
    # exact GGN diagonal against torch.func either way.
    from fxjac import direction
    from fxjac.rules import conv as rules
    from fxjac.source import build_source

    monkeypatch.setattr(direction, "CONV_CHUNK_BYTES", 1)
    monkeypatch.setattr(direction, "CPU_CHUNK_BYTES", 1)
    monkeypatch.setattr(rules, "POOLED_MIN_COLUMNS", 2)  # the head's 3 classes give 2 columns
    torch.manual_seed(0)
    model = _ConvPool(conv(), pool(), shape, lifted)
    x = _input((3,) if lifted else shape, 3)
    model(x.float())
    model = model.double()
    src = build_source(model, "params", (x,))
    pooled = direction._pooled_convolutions(src, fxjac.rules.default_rules())
    assert len(pooled) == skipped and all(n.name.startswith("conv") for n in pooled), pooled
    assert direction.chunk_widths(2, None, src, rules=fxjac.rules.default_rules()) == ((2, 2) if skipped else (1, 2))
    p = fxjac.ggn(model, loss="cross_entropy", out="diag", example_inputs=(x,))
    J = reference.per_sample_jacobian(model, (x,), wrt="params")
    H = reference.loss_hessian(model(x), "cross_entropy")
    reference.assert_close(p(x)[1], torch.einsum("bop,boq,bqp->p", J, H, J), f"exact GGN diagonal, {name}")
    assert ("pooled_weight_ct" in p.code) is skipped
    monkeypatch.setattr(rules, "UNFOLD_BYTES", 0)  # no patches: the scatter, every column's stack formed
    assert not direction._pooled_convolutions(src, fxjac.rules.default_rules())

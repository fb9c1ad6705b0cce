"""Softmax and normalisation rules (fxjac/rules/norm.py) against torch.func, float64."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference import check_diag_backprop, check_direction_products  # noqa: E402

import fxjac  # noqa: E402
from fxjac.rules import norm  # noqa: E402
from fxjac.rules.registry import RULES  # noqa: E402
from fxjac.tracing import trace  # noqa: E402
from passes.protocol import rule_key  # noqa: E402

D = torch.float64


class Fn(nn.Module):
    """One functional call, optionally with parameters passed to it."""

    def __init__(self, fn, **params):
        super().__init__()
        for k, v in params.items():
            setattr(self, k, nn.Parameter(v))
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def _randomised(m: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics, float64, eval mode, inside a container (a
    decomposed module must not be the traced root)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for n, b in m.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif n.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))
    return nn.Sequential(m).double().eval()


def _g():
    return torch.Generator().manual_seed(1)


def _vec():
    return torch.randn(5, generator=_g(), dtype=D)


# name -> (model factory, per-sample input shape). Models with parameters exercise the parameter rules.
CASES = {
    "F.softmax": (lambda: Fn(lambda s, x: F.softmax(x * s.a, dim=1), a=_vec()), (2, 5)),
    "torch.softmax": (lambda: Fn(lambda s, x: torch.softmax(x, -1)), (2, 5)),
    "softmax method": (lambda: Fn(lambda s, x: x.softmax(dim=-2)), (3, 2, 5)),
    "softmax dtype": (lambda: Fn(lambda s, x: F.softmax(x, dim=-1, dtype=torch.float64)), (2, 5)),
    "nn.Softmax": (lambda: nn.Softmax(dim=1), (3, 5)),
    "F.softmin": (lambda: Fn(lambda s, x: F.softmin(x, 1)), (3, 5)),
    "F.log_softmax": (lambda: Fn(lambda s, x: F.log_softmax(x * s.a, -1), a=_vec()), (2, 5)),
    "torch.log_softmax": (lambda: Fn(lambda s, x: torch.log_softmax(x, 1)), (3, 5)),
    "log_softmax method": (lambda: Fn(lambda s, x: x.log_softmax(-1)), (2, 5)),
    "layer_norm": (lambda: nn.LayerNorm(5), (2, 5)),
    "layer_norm 2d shape": (lambda: nn.LayerNorm((2, 5)), (3, 2, 5)),
    "layer_norm no affine": (lambda: nn.LayerNorm(5, elementwise_affine=False), (3, 5)),
    "layer_norm no bias": (lambda: nn.LayerNorm(5, bias=False), (2, 5)),
    "group_norm": (lambda: nn.GroupNorm(2, 4), (4, 3, 2)),
    "group_norm 1d": (lambda: nn.GroupNorm(1, 3), (3, 5)),
    "group_norm no affine": (lambda: nn.GroupNorm(3, 3, affine=False), (3, 2, 2)),
    "batch_norm 1d": (lambda: nn.BatchNorm1d(3), (3,)),
    "batch_norm 2d": (lambda: nn.BatchNorm2d(3), (3, 2, 2)),
    "batch_norm no affine": (lambda: nn.BatchNorm1d(2, affine=False), (2, 5)),
    "instance_norm": (lambda: nn.InstanceNorm1d(3, affine=True), (3, 5)),
    "instance_norm 2d": (lambda: nn.InstanceNorm2d(2), (2, 3, 2)),
    "instance_norm running": (lambda: nn.InstanceNorm1d(3, affine=True, track_running_stats=True), (3, 5)),
    "rms_norm": (lambda: nn.RMSNorm(5), (2, 5)),
    "rms_norm eps": (lambda: nn.RMSNorm((2, 5), eps=1e-3), (3, 2, 5)),
    "rms_norm no weight": (lambda: nn.RMSNorm(5, elementwise_affine=False), (2, 5)),
    "F.normalize": (lambda: Fn(lambda s, x: F.normalize(x * s.a, dim=-1), a=_vec()), (2, 5)),
    "F.normalize dims": (lambda: Fn(lambda s, x: F.normalize(x, dim=(1, 2))), (3, 2, 5)),
}

# One op each: for these diagonal back-propagation must be exact (no cross terms).
SINGLE_OP = [n for n in CASES if not n.startswith(("F.softmax", "F.log_softmax", "F.normalize"))] + \
    ["F.normalize dims"]


def _no_fallback(fn):
    """Run ``fn`` recording warnings; fail if the autograd fallback was used."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    used = [str(w.message) for w in rec if "fallback" in str(w.message)]
    assert not used, used


def _input(shape, batch, seed=7):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=D)


BATCH_ONE = ["F.softmax", "F.log_softmax", "layer_norm 2d shape", "group_norm", "batch_norm 2d",
             "instance_norm", "rms_norm", "F.normalize"]


@pytest.mark.parametrize("name,batch", [(n, 3) for n in CASES] + [(n, 1) for n in BATCH_ONE])
def test_direction_products(name, batch):
    make, shape = CASES[name]
    model = _randomised(make())
    x = _input(shape, batch)
    _no_fallback(lambda: check_direction_products(model, (x,)))


@pytest.mark.parametrize("name", SINGLE_OP)
def test_diag_backprop(name):
    make, shape = CASES[name]
    model = _randomised(make())
    x = _input(shape, 3, seed=2)
    _no_fallback(lambda: check_diag_backprop(model, (x,)))


@pytest.mark.parametrize("name", ["layer_norm 2d shape", "group_norm", "softmax method", "batch_norm 2d"])
def test_non_contiguous_input(name):
    make, shape = CASES[name]
    model = _randomised(make())
    base = _input(tuple(reversed(shape)), 3, seed=3)
    x = base.permute(0, *range(base.dim() - 1, 0, -1))  # [B, *shape], strides reversed
    assert x.shape[1:] == shape and not x.is_contiguous()
    _no_fallback(lambda: check_direction_products(model, (x,)))


def test_float32_softmax_with_float64_dtype():
    """``dtype=`` casts before the softmax: tangents follow the cast, cotangents come back in float32."""
    model = Fn(lambda s, x: F.softmax(x * s.a, dim=-1, dtype=torch.float64).float(),
               a=torch.randn(5, generator=_g())).eval()
    x = torch.randn(3, 2, 5, generator=_g())
    _no_fallback(lambda: check_direction_products(model, (x,), dtype=torch.float32))


def test_layer_norm_with_zero_weight_is_exact():
    """Statistics are recomputed from the input, so a zero affine weight does not break the weight's rule."""
    m = nn.LayerNorm(5).double()
    with torch.no_grad():
        m.weight.zero_()
    model = nn.Sequential(m).eval()
    _no_fallback(lambda: check_direction_products(model, (_input((2, 5), 3),)))


def test_every_norm_key_has_a_case():
    """Every key registered by norm.py is reached by some case above."""
    mine = {k for k, rule in RULES.items() if type(rule).__module__ == norm.__name__}
    seen = set()
    for make, _ in CASES.values():
        gm = trace(_randomised(make()))
        seen |= {rule_key(n) for n in gm.graph.nodes}
    missing = mine - seen
    assert not missing, f"no test case reaches {missing}"


def test_training_batch_norm_is_refused():
    model = nn.Sequential(nn.BatchNorm1d(3)).double().train()
    with pytest.raises(fxjac.ModeError):
        fxjac.vjp(model)(_input((3,), 4), _input((3,), 4))


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_float32_saved_statistics_of_a_bfloat16_input(kind):
    # On CUDA the fused layer and group norm kernels keep their mean and 1/σ in float32 for a bfloat16 input (on
    # the CPU in bfloat16). A stack of cotangents read with such statistics must stay bfloat16, as autograd's are:
    # float32 cotangents met a bfloat16 weight's GEMM downstream (a GPU run's bf16 transformer).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    ct = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    if kind == "layer":
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, [5], None, None, 1e-5)
        run = lambda *a: norm.layer_norm_cts(*a[:2], [5], *a[2:], None, None, [True, True, False])  # noqa: E731
    else:
        _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, 3, 4, 5, 2, 1e-5)
        run = lambda *a: norm.group_norm_cts(*a, None, 2, [True, False, False])  # noqa: E731
    ref = run(ct, x, mean, rstd)[0]
    got = run(ct.bfloat16(), x.bfloat16(), mean.float(), rstd.float())[0]
    assert got.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() <= 0.05 * ref.abs().max()

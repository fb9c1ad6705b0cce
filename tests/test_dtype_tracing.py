"""Note [dtypes while tracing] (fxjac/tracing.py): ``x.dtype`` is read as a value while a model is traced."""

import math

import pytest
import torch
import torch.nn as nn
from reference import assert_close, param_fn, per_sample_jacobian

import fxjac


class _FinfoMask(nn.Module):
    """Causal attention whose mask value is ``torch.finfo(x.dtype).min`` (HuggingFace's idiom)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        s = x.shape[1]
        mask = torch.full((s, s), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        w = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(4) + mask
        return self.head(w.softmax(-1) @ self.v(x))


class _DtypeBranch(nn.Module):
    """A branch on the input's dtype (fixed for a product) and a cast to an intermediate value's dtype."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        if h.dtype == torch.float16:
            h = h.float()
        scale = torch.tensor(2.0, device=x.device).to(h.dtype)  # a traced device: a factory node
        return torch.tanh(h) * scale if x.dtype == torch.float64 else h


@pytest.mark.parametrize("lazy", [True, False], ids=["built at the first call", "example_inputs"])
def test_finfo_of_a_traced_dtype(lazy):
    torch.manual_seed(0)
    model = _FinfoMask().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    w = torch.randn(3, 5, 3, dtype=torch.float64)
    p = fxjac.vjp(model, wrt="params", reduce="none", example_inputs=None if lazy else (x,))
    y, got = p(x, w)
    assert_close(y, model(x), "primal")
    f, flat = param_fn(model, (x,))
    J = torch.func.jacrev(f)(flat).reshape(3, 15, -1)  # [B, O, P] of the per-sample outputs
    assert_close(got, torch.einsum("bop,bo->bp", J, w.reshape(3, 15)), "per-sample vjp with a finfo mask")
    _, diag = fxjac.ggn(model, loss="mse", out="diag", example_inputs=None if lazy else (x,))(x)
    assert_close(diag, torch.einsum("bop,bop->p", J, J), "GGN diagonal with a finfo mask")


def test_a_branch_on_a_dtype_follows_the_built_one():
    torch.manual_seed(0)
    model = _DtypeBranch().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(3, 4, dtype=torch.float64)
    _, got = fxjac.jvp(model)(x, v)
    J = per_sample_jacobian(model, (x,))
    assert_close(got, torch.einsum("boi,bi->bo", J, v), "jvp through a dtype branch")


class _SizeScaled(nn.Module):
    """``torch.tensor`` of a traced size: a factory node (torch.fx alone fails, and fxjac's message blamed packed
    sequences), as in attention's ``/ torch.tensor(d).sqrt()``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return h / torch.tensor(h.shape[-1], dtype=h.dtype, device=x.device).sqrt()


def test_torch_tensor_of_a_traced_size():
    torch.manual_seed(0)
    model = _SizeScaled().double()
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    J = per_sample_jacobian(model, (x,))
    _, got = fxjac.vjp(model)(x, w)
    assert_close(got, torch.einsum("boi,bo->bi", J, w), "vjp through torch.tensor(h.shape[-1])")
    _, got = fxjac.jvp(model)(x, x)
    assert_close(got, torch.einsum("boi,bi->bo", J, x), "jvp through torch.tensor(h.shape[-1])")

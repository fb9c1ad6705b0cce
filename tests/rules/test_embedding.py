"""Embedding rules (fxjac/rules/embedding.py) against torch.func, float64.

The indices are computed from the input (``.long()`` then ``.detach()``): batched, constant for
differentiation, and acceptable to torch.func.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference import assert_every_key_reached, check_diag_backprop, check_direction_products  # noqa: E402

import fxjac  # noqa: E402
from fxjac.rules import embedding  # noqa: E402

D = torch.float64
NUM = 7


def _indices(x):
    return ((x.abs() * 3).long() % NUM).detach()


class Emb(nn.Module):
    """nn.Embedding on indices ``[B, *shape]``."""

    def __init__(self, **kw):
        super().__init__()
        self.e = nn.Embedding(NUM, 3, **kw)

    def forward(self, x):
        return self.e(_indices(x))


class FunctionalEmb(nn.Module):
    """F.embedding with a weight computed from a parameter and a negative padding index."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(NUM, 3, dtype=D))

    def forward(self, x):
        return F.embedding(_indices(x), self.w * 2.0, padding_idx=-1)


class Bag(nn.Module):
    """nn.EmbeddingBag on 2-D indices ``[B, L]``, optionally with per-sample weights ``sigmoid(x)``.

    torch.func cannot differentiate ``embedding_bag`` with a weight that requires grad, so the reference (an
    eager call) computes the same bags by gathering rows; the traced graph, which fxjac differentiates, holds
    ``F.embedding_bag`` itself.
    """

    def __init__(self, psw=False, **kw):
        super().__init__()
        self.e = nn.EmbeddingBag(NUM, 3, **kw)
        self.psw = psw

    def forward(self, x):
        idx = _indices(x)
        w = torch.sigmoid(x) if self.psw else None
        if isinstance(x, torch.fx.Proxy):
            return self.e(idx, per_sample_weights=w)
        a = torch.ones_like(idx, dtype=x.dtype) if w is None else w
        keep = torch.ones_like(idx, dtype=torch.bool)
        if self.e.padding_idx is not None:
            keep = idx != self.e.padding_idx
        if self.e.mode == "max":  # the largest entry per column over the bag's kept rows; 0 for an empty bag
            rows = self.e.weight[idx].masked_fill(~keep.unsqueeze(-1), float("-inf"))
            return torch.where(keep.any(-1, keepdim=True), rows.amax(1), 0.0)
        a = a * keep
        if self.e.mode == "mean":
            a = a / keep.sum(-1, keepdim=True).clamp_min(1)
        return (self.e.weight[idx] * a.unsqueeze(-1)).sum(1)


CASES = {
    "embedding": (lambda: Emb(), (2, 5)),
    "embedding padding": (lambda: Emb(padding_idx=1), (2, 5)),
    "F.embedding": (lambda: FunctionalEmb(), (4,)),
    "bag mean": (lambda: Bag(), (6,)),
    "bag mean padding": (lambda: Bag(padding_idx=1), (6,)),
    "bag sum": (lambda: Bag(mode="sum"), (6,)),
    "bag sum weights": (lambda: Bag(mode="sum", psw=True, padding_idx=2), (6,)),
    "bag max": (lambda: Bag(mode="max"), (6,)),
    "bag max padding": (lambda: Bag(mode="max", padding_idx=1), (6,)),
}
# One op w.r.t. the weight (and elementwise ops before the bag weights): diagonal back-propagation is exact.
SINGLE_OP = ["embedding", "embedding padding", "bag mean", "bag mean padding", "bag sum", "bag sum weights",
             "bag max", "bag max padding"]


def _model(name):
    torch.manual_seed(0)
    return CASES[name][0]().double().eval()


def _input(name, batch, seed=7):
    return torch.randn(batch, *CASES[name][1], generator=torch.Generator().manual_seed(seed), dtype=D)


def _no_fallback(fn):
    """Run ``fn`` recording warnings; fail if the autograd fallback was used."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # torch.func's own performance note
        fn()
    used = [str(w.message) for w in rec if "fallback" in str(w.message)]
    assert not used, used


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_direction_products(name, batch):
    model = _model(name)
    _no_fallback(lambda: check_direction_products(model, (_input(name, batch),)))


@pytest.mark.parametrize("name", SINGLE_OP)
def test_diag_backprop(name):
    model = _model(name)
    _no_fallback(lambda: check_diag_backprop(model, (_input(name, 3, seed=2),)))


def test_repeated_rows_in_a_bag():
    """A row used twice in one bag enters with its summed coefficient: the diagonal squares after summing."""
    model = _model("bag sum")
    x = torch.full((2, 6), 0.4, dtype=D)  # every index equal
    _no_fallback(lambda: check_diag_backprop(model, (x,)))


def test_non_contiguous_input():
    model = _model("embedding padding")
    x = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(3), dtype=D).transpose(1, 2)
    assert not x.is_contiguous()
    _no_fallback(lambda: check_direction_products(model, (x,)))


def test_padding_row_gets_no_cotangent():
    model = _model("embedding padding")
    x = torch.full((2, 2, 5), 1 / 3 + 1e-3, dtype=D)  # every index is 1, the padding row
    _, c = fxjac.vjp(model, wrt="params")(x, torch.ones(2, 2, 5, 3, dtype=D))
    assert c.abs().max() == 0


def test_every_embedding_key_has_a_case():
    assert_every_key_reached(embedding, (_model(name) for name in CASES))


def test_max_bag_of_padding_only():
    """``mode="max"``: a bag holding only the padding index is zero, and so is its derivative; the others select
    one row per column (ATen's choice, kept from the primal)."""
    model = _model("bag max padding")
    x = _input("bag max padding", 3)
    x[1] = 0.4  # every index 1, the padding index
    _no_fallback(lambda: check_direction_products(model, (x,)))
    assert torch.count_nonzero(model(x)[1]) == 0

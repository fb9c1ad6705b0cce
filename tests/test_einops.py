"""einops in a model (Note [einops] in fxjac/traced_einops.py): traced into torch ops with structured rules."""

import warnings

import pytest
import torch
import torch.nn as nn
from reference import check_direction_products, check_metric_products

import fxjac

einops = pytest.importorskip("einops")
from einops import rearrange, reduce, repeat  # noqa: E402
from einops.layers.torch import EinMix, Rearrange, Reduce  # noqa: E402


class Patches(nn.Module):
    """A ViT-style patch embedding and mixer written with einops, by name, as a module attribute and as layers."""

    def __init__(self):
        super().__init__()
        self.mix = EinMix("b t c -> b t d", weight_shape="c d", bias_shape="d", c=4, d=4)
        self.pos = nn.Parameter(torch.randn(3))
        self.to_grid = Rearrange("b (h w) c -> b w h c", h=2)
        self.pool = Reduce("b w h c -> b c", "max")
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x [B, 6, 4]
        h = torch.tanh(self.mix(x))
        h = rearrange(h, "b t d -> b d t")
        h = einops.reduce(h, "b d (t two) -> b d t", "mean", two=2)  # [B, 4, 3]
        h = h + repeat(self.pos, "t -> 1 d t", d=4)
        h = einops.einsum(h, torch.sin(h), "b d t, b e t -> b d e")  # [B, 4, 4]
        h = self.pool(self.to_grid(h))  # [B, 4]
        return self.head(reduce(torch.stack([h, h * h]), "two b c -> b c", "sum"))


class Ellipsis(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(torch.tanh(einops.rearrange(x, "b ... d -> b d ...")).mean(-1))


def model_and_input(cls, seed=0):
    torch.manual_seed(seed)
    return cls().double(), torch.randn(3, 6, 4, dtype=torch.float64)


def fallback_warnings(caught) -> list:
    return [w for w in caught if "fallback" in str(w.message)]


def test_einops_calls_become_torch_ops_with_structured_rules():
    model, x = model_and_input(Patches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_direction_products(model, (x,))
    assert not fallback_warnings(caught), [str(w.message) for w in fallback_warnings(caught)]
    check_metric_products(model, (x,))


def test_batch_size_stays_free_through_einops():
    model, x = model_and_input(Patches)
    p = fxjac.jvp(model, wrt="params", example_inputs=(x,))
    x5 = torch.randn(5, 6, 4, dtype=torch.float64)
    y, _ = p(x5, torch.randn(sum(q.numel() for q in model.parameters()), dtype=torch.float64))
    torch.testing.assert_close(y, model(x5), rtol=1e-12, atol=1e-12)


def test_an_ellipsis_pattern_is_one_node_for_the_fallback():
    model, x = model_and_input(Ellipsis)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_direction_products(model, (x,), products=("jvp", "vjp"))
    assert fallback_warnings(caught)


def test_tracing_puts_the_model_modules_names_back():
    model, x = model_and_input(Patches)
    fxjac.vjp(model, example_inputs=(x,))
    assert globals()["rearrange"] is einops.rearrange
    assert globals()["einops"] is einops
    assert model(x).shape == (3, 3)  # the model still runs eagerly, through einops itself


class _ImportsInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(6, 6)

    def forward(self, x):
        import einops as E

        return E.rearrange(self.tok(E.rearrange(x, "b t c -> b c t")), "b c t -> b t c")


def test_einops_imported_inside_forward_is_a_trace_error_that_says_where_to_import_it():
    # was "forward's own check raised RuntimeError", a hint about isinstance checks (probe SS)
    with pytest.raises(fxjac.TraceError, match=r"(?s)unknown to einops.*test_einops.py.*Move the import to the "
                                                r"module's top level"):
        fxjac.jacobian(_ImportsInForward())(torch.randn(2, 6, 4))

"""fxjac as laplace-torch's curvature backend: same numbers as its own backends, and nets where they fail."""

import warnings

import pytest
import torch
import torch.nn as nn

laplace = pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN, GGNInterface  # noqa: E402

import fxjac.zoo as zoo  # noqa: E402
from fxjac.integrations.laplace import FxJacGGN  # noqa: E402


def _loader(X, Y, batch=8):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=batch)


def _fit(make, backend, loader, x_test, likelihood="classification", **kw):
    la = Laplace(make(), likelihood, backend=backend, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(loader)
        la.optimize_prior_precision()
        pred = la(x_test, pred_type="glm")
    return la, pred


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("structure,subset", [("diag", "all"), ("full", "all"), ("full", "last_layer")])
def test_same_numbers_as_curvlinops_on_an_mlp(structure, subset):
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    loader = _loader(X, Y)
    ours, p_ours = _fit(_mlp, FxJacGGN, loader, X[:5], subset_of_weights=subset, hessian_structure=structure)
    ref, p_ref = _fit(_mlp, CurvlinopsGGN, loader, X[:5], subset_of_weights=subset, hessian_structure=structure)
    assert torch.allclose(ours.H, ref.H, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.prior_precision, ref.prior_precision, rtol=1e-4)
    assert torch.allclose(p_ours, p_ref, rtol=1e-4, atol=1e-6)


def test_regression_diag():
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(24, 4, generator=g), torch.randn(24, 3, generator=g)
    loader = _loader(X, Y)
    ours, p_ours = _fit(_mlp, FxJacGGN, loader, X[:4], likelihood="regression", subset_of_weights="all",
                        hessian_structure="diag")
    ref, p_ref = _fit(_mlp, CurvlinopsGGN, loader, X[:4], likelihood="regression", subset_of_weights="all",
                      hessian_structure="diag")
    assert torch.allclose(ours.H, ref.H, rtol=1e-5, atol=1e-6)
    assert torch.allclose(p_ours[0], p_ref[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet", "transformer_mha"])
def test_zoo_nets_where_backpack_or_asdl_fail(name):
    """BackPACK fails on both (in-place skip additions; no extension for a custom module); ASDL gives a wrong
    diagonal on the ResNet and none on the transformer. laplace-torch's torch.func interface is the reference."""
    X, = zoo.example_inputs(name, 16, dtype=torch.float32)
    Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    loader = _loader(X, Y)

    def make():
        return zoo.build(name, dtype=torch.float32)[0]

    ours, p_ours = _fit(make, FxJacGGN, loader, X[:4], subset_of_weights="all", hessian_structure="diag")
    ref, p_ref = _fit(make, GGNInterface, loader, X[:4], subset_of_weights="all", hessian_structure="diag")
    assert ((ours.H - ref.H).abs().max() / ref.H.abs().max()) < 1e-5
    assert torch.allclose(p_ours, p_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_enable_backprop_gives_input_gradients(subset):
    """``enable_backprop=True``: the GLM predictive variance is differentiable w.r.t. the input, with the same
    gradient as laplace-torch's curvlinops backend, even after a call without it (a product built for one is not
    reused for the other)."""
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    grads = []
    for backend in (FxJacGGN, CurvlinopsGGN):
        la = Laplace(_mlp().double(), "classification", subset_of_weights=subset, hessian_structure="full",
                     backend=backend, enable_backprop=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.fit(_loader(X, Y))
            la.enable_backprop = False
            la(X[:2], pred_type="glm")
            la.enable_backprop = True
            x = X[:3].clone().requires_grad_(True)
            _, f_var = la._glm_predictive_distribution(x)
        grads.append(torch.autograd.grad(f_var.sum(), x)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9)  # two GGNs summed in another order


def test_kron_is_refused_with_a_message():
    with pytest.raises(NotImplementedError, match="hessian_structure='diag'"):
        FxJacGGN(_mlp(), "classification").kron(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))


class _PooledCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1).flatten(1))


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_other_image_sizes_after_the_fit(structure):
    """A CNN with adaptive pooling fitted at 8x8 and asked at 12x12, then refitted at 12x12: one product per
    sample shape (the cached product was built for the first shape: a ShapeError)."""
    g = torch.Generator().manual_seed(3)
    X8, X12 = torch.randn(12, 1, 8, 8, generator=g), torch.randn(12, 1, 12, 12, generator=g)
    Y = torch.randint(0, 3, (12,), generator=g)
    kw = dict(subset_of_weights="all", hessian_structure=structure)
    ours, p_ours = _fit(lambda: _PooledCNN().double(), FxJacGGN, _loader(X8.double(), Y), X8[:3].double(), **kw)
    ref, p_ref = _fit(lambda: _PooledCNN().double(), GGNInterface, _loader(X8.double(), Y), X8[:3].double(), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.allclose(ours(X12[:3].double(), pred_type="glm"), ref(X12[:3].double(), pred_type="glm"),
                              rtol=1e-10, atol=1e-12)
        ours.fit(_loader(X12.double(), Y))
        ref.fit(_loader(X12.double(), Y))
    assert torch.allclose(ours.H, ref.H, rtol=1e-10, atol=1e-12)


class _BranchesOnTheBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)

    def forward(self, x):
        h = self.a(x)
        return torch.tanh(h) if x.shape[0] > 0 else h


def _branching_net():
    torch.manual_seed(0)
    return nn.Sequential(_BranchesOnTheBatch(), nn.Linear(6, 3)).double()


def test_tracing_options_through_backend_kwargs():
    """fxjac's leaf_modules reach every product through Laplace's backend_kwargs (the TraceError's hint names it;
    laplace-torch passed it on to its own interface, a TypeError)."""
    g = torch.Generator().manual_seed(4)
    X, Y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    kw = dict(subset_of_weights="all", hessian_structure="diag")
    ours, p_ours = _fit(_branching_net, FxJacGGN, _loader(X, Y), X[:3],
                        backend_kwargs={"leaf_modules": [_BranchesOnTheBatch]}, **kw)
    ref, p_ref = _fit(_branching_net, GGNInterface, _loader(X, Y), X[:3], **kw)
    assert torch.allclose(ours.H, ref.H, rtol=1e-10, atol=1e-12)
    assert torch.allclose(p_ours, p_ref, rtol=1e-10, atol=1e-12)

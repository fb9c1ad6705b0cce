"""Note [GEMMs through oneDNN] in fxjac/rules/_rt.py: the rules' float32 GEMMs that go through oneDNN give
torch.matmul's numbers, fall back where oneDNN cannot go (autograd, torch.func transforms, forward AD, float64,
large transposed operands), and every product that uses them matches torch.func in float64.

Forced on (and for every size) whatever the CPU, so these run the same on Intel machines, where fxjac leaves
the GEMMs to MKL by default.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxjac
from fxjac import zoo
from fxjac.rules import _rt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import RTOL, check_diag_backprop, check_direction_products, check_metric_products, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="this torch build has no oneDNN linear")


@pytest.fixture
def onednn(monkeypatch):
    """oneDNN on for every size; yields the list of ``(a.shape, w.shape)`` it multiplied."""
    calls = []
    real = _rt.onednn_linear

    def counted(a, w):
        calls.append((tuple(a.shape), tuple(w.shape)))
        return real(a, w)

    monkeypatch.setattr(_rt, "ONEDNN_GEMM", True)
    monkeypatch.setattr(_rt, "ONEDNN_MIN_MACS", 1)
    monkeypatch.setattr(_rt, "onednn_linear", counted)
    return calls


def _r(*shape, g):
    return torch.randn(*shape, generator=g)


LEFT = {
    "matrix": lambda g: _r(7, 5, g=g),
    "stack": lambda g: _r(3, 4, 5, g=g),
    "column-major": lambda g: _r(5, 7, g=g).t(),
    "row-sliced": lambda g: _r(9, 5, g=g)[::2],
}


@pytest.mark.parametrize("left", list(LEFT))
@pytest.mark.parametrize("right_t", [False, True], ids=["b", "b-transposed"])
def test_mm_is_matmul(onednn, left, right_t):
    g = torch.Generator().manual_seed(0)
    a = LEFT[left](g)
    b = _r(6, 5, g=g).t() if right_t else _r(5, 6, g=g)
    got = _rt.mm(a, b)
    assert rel_err(got, a.double() @ b.double()) < 1e-6
    assert got.shape == torch.Size(a.shape[:-1] + (6,))
    assert len(onednn) == 1
    w = b.t()
    assert rel_err(_rt.mm_t(a, w), F.linear(a.double(), w.double())) < 1e-6
    assert len(onednn) == 2


def test_mm_falls_back(onednn, monkeypatch):
    """Where oneDNN cannot go, torch.matmul's path: the numbers (and derivatives) are the same."""
    g = torch.Generator().manual_seed(1)
    b = _r(5, 6, g=g)
    strided = _r(4, 3, 5, g=g).transpose(0, 1)  # a non-contiguous stack: oneDNN would copy it
    assert rel_err(_rt.mm(strided, b), strided.double() @ b.double()) < 1e-6
    a64 = _r(7, 5, g=g).double()
    assert rel_err(_rt.mm(a64, b.double()), a64 @ b.double()) < 1e-12
    monkeypatch.setattr(_rt, "ONEDNN_MAX_COPY", 8)  # a large column-major left operand
    at = _r(5, 7, g=g).t()
    assert rel_err(_rt.mm(at, b), at.double() @ b.double()) < 1e-6
    assert onednn == []

    # autograd records (a differentiable product): the op has no derivative
    a = _r(7, 5, g=g).requires_grad_()
    (ga,) = torch.autograd.grad(_rt.mm(a, b).square().sum(), a)
    ref = 2 * (a.detach().double() @ b.double()) @ b.double().t()
    assert rel_err(ga, ref) < 1e-6
    # torch.func transforms and forward-mode AD: no batching rule, no forward derivative
    xs = _r(4, 7, 5, g=g)
    assert rel_err(torch.vmap(lambda x: _rt.mm(x, b))(xs), xs.double() @ b.double()) < 1e-6
    t = _r(7, 5, g=g)
    _, jt = torch.func.jvp(lambda x: _rt.mm_t(x, b.t()), (a.detach(),), (t,))
    assert rel_err(jt, t.double() @ b.double()) < 1e-6
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(a.detach(), t)
        tangent = torch.autograd.forward_ad.unpack_dual(_rt.mm(dual, b)).tangent
    assert rel_err(tangent, t.double() @ b.double()) < 1e-6
    assert onednn == []


def test_size_threshold_and_choice(monkeypatch):
    """Small GEMMs stay on MKL (oneDNN's call costs more); ``FXJAC_CPU_GEMM`` overrides the vendor rule."""
    monkeypatch.setattr(_rt, "ONEDNN_GEMM", True)
    a, w = torch.ones(8, 16), torch.ones(16, 16)
    assert not _rt._by_onednn(a, w)
    assert _rt._by_onednn(torch.ones(_rt.ONEDNN_MIN_MACS // 256, 16), w)
    for value, want in (("onednn", True), ("mkl", False), ("MKL", False)):
        monkeypatch.setenv("FXJAC_CPU_GEMM", value)
        assert _rt._onednn_gemm() is want
    monkeypatch.delenv("FXJAC_CPU_GEMM")
    auto = _rt._onednn_gemm()
    monkeypatch.setenv("FXJAC_CPU_GEMM", "openblas")
    with pytest.warns(UserWarning, match="FXJAC_CPU_GEMM='openblas'"):
        assert _rt._onednn_gemm() is auto
    monkeypatch.delenv("FXJAC_CPU_GEMM")
    monkeypatch.setattr(_rt, "_cpu_vendor", lambda: "GenuineIntel")  # MKL's AVX-512 kernels run there
    assert _rt._onednn_gemm() is False


class _MatmulNet(torch.nn.Module):
    """Parameters multiplied by ``@`` (the matmul rule's terms), a 3-d activation on the left."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(6)
        self.w1 = torch.nn.Parameter(torch.randn(6, 8, generator=g) / 3)
        self.w2 = torch.nn.Parameter(torch.randn(8, 3, generator=g) / 3)

    def forward(self, x):
        return (torch.tanh(x.view(-1, 2, 3) @ self.w1[:3]).flatten(1)[:, :8] @ self.w2)


def _built(name):
    if name == "matmul":
        return _MatmulNet(), (torch.randn(3, 6, generator=torch.Generator().manual_seed(7)),)
    model, _ = zoo.build(name, dtype=torch.float32)
    return model, zoo.example_inputs(name, 3, dtype=torch.float32)


@pytest.mark.parametrize("name", ["mlp", "transformer_explicit", "cnn", "matmul"])
def test_float32_products_through_onednn(onednn, name):
    """Every direction and metric product in float32, the Linear and matmul GEMMs through oneDNN, against float64
    torch.func (the rules' terms of jvp, vjp, jmp, mjp, Jacobians, metric stacks, diagonals)."""
    model, xs = _built(name)
    check_direction_products(model, xs, dtype=torch.float32)
    check_metric_products(model, xs, dtype=torch.float32, matrices=("identity", "diag", "full"))
    shapes = set(onednn)
    assert len(shapes) >= 3, shapes
    _, ggn = fxjac.ggn(model, out="diag")(*xs)
    ggn64 = fxjac.ggn(model.double(), out="diag")(*(x.double() for x in xs))[1]
    assert rel_err(ggn, ggn64) < RTOL[torch.float32]


def test_diag_backprop_through_onednn(onednn):
    model = torch.nn.Linear(6, 4)
    xs = (torch.randn(5, 6, generator=torch.Generator().manual_seed(3)),)
    check_diag_backprop(model, xs, dtype=torch.float32)
    assert onednn


def test_differentiable_product_through_autograd(onednn):
    """A differentiable product's GEMMs stay where autograd records them: its gradient is right."""
    model, _ = zoo.build("mlp", dtype=torch.float32)
    (x,) = zoo.example_inputs("mlp", 3, dtype=torch.float32)
    x = x.requires_grad_()
    _, d = fxjac.ggn(model, loss="cross_entropy", out="diag", wrt="input", differentiable=True)(x)
    (gx,) = torch.autograd.grad(d.sum(), x)
    model64 = model.double()
    x64 = x.detach().double().requires_grad_()
    _, d64 = fxjac.ggn(model64, loss="cross_entropy", out="diag", wrt="input", differentiable=True)(x64)
    (gx64,) = torch.autograd.grad(d64.sum(), x64)
    assert rel_err(gx, gx64) < RTOL[torch.float32]


def test_onednn_gemm_is_one_op_under_compile(onednn):
    """Under torch.compile the oneDNN GEMM is the custom op ``fxjac::onednn_linear`` (inductor's own lowering of
    ``mkldnn._linear_pointwise`` takes frozen weights only), with a shape that follows the batch."""
    model, _ = zoo.build("mlp", dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    p = fxjac.ggn(model, loss="cross_entropy", out="diag", example_inputs=(_r(5, 6, g=g),))
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(p, backend=backend, fullgraph=True, dynamic=True)
    for batch in (5, 7):
        x = _r(batch, 6, g=g)
        assert rel_err(compiled(x)[1], p(x)[1]) < 1e-6
    assert "fxjac.onednn_linear.default" in seen, seen
    assert not any("mkldnn" in t for t in seen), seen

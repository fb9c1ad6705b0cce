"""The products on a CUDA device (every test is skipped without one; CI has none, the lent GPU runs them).

Everything is checked against torch.func on the same device: every product kind on every zoo model in float64,
float32 with TF32 off, every loss's GGN, ggn_vp, dataset accumulation, random architectures from the fuzzer, and
torch.compile with inductor (Triton kernels). The CPU-only paths (huge-page buffers, im2col custom kernels) must
step aside on CUDA tensors, so a product runs on the device its model and inputs are on.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from reference import (
    assert_close,
    check_direction_products,
    check_metric_products,
    loss_hessian,
    per_sample_jacobian,
)

import fxjac
import fxjac.zoo as zoo

# FXJAC_TEST_DEVICE=cpu runs the same checks on the CPU (to try this file on a machine without a GPU).
DEV = os.environ.get("FXJAC_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]

NAMES = zoo.names()


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 matmuls and convolutions in full float32 (TF32 would need a 1e-2 tolerance)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_device(name, batch, dtype=torch.float64):
    model, _ = zoo.build(name, dtype=dtype)
    xs = zoo.example_inputs(name, batch, dtype=dtype)
    return model.to(DEV), tuple(x.to(DEV) for x in xs)


@pytest.mark.parametrize("name", NAMES)
def test_direction_products(name):
    model, xs = on_device(name, 3)
    check_direction_products(model, xs)


@pytest.mark.parametrize("name", NAMES)
def test_metric_products(name):
    model, xs = on_device(name, 2)
    check_metric_products(model, xs)


@pytest.mark.parametrize("name", NAMES)
def test_float32(name):
    model, xs = on_device(name, 3, torch.float32)
    check_direction_products(model, xs, dtype=torch.float32, products=("jvp", "vjp", "jmp", "mjp"))
    check_metric_products(model, xs, dtype=torch.float32, matrices=("identity", "diag"))


GGN_CASES = [("mlp", "cross_entropy"), ("cnn", "cross_entropy"), ("resnet", "cross_entropy"),
             ("transformer_explicit", "cross_entropy"), ("unet", "mse"), ("small_mlp", "bce"),
             ("small_mlp", "gaussian"), ("two_input", "mse")]


@pytest.mark.parametrize("name,loss", GGN_CASES)
def test_ggn(name, loss):
    model, xs = on_device(name, 3)
    J = per_sample_jacobian(model, xs, "params")
    H = loss_hessian(model(*xs).detach(), loss)
    G = torch.einsum("bop,boq,bqr->bpr", J, H, J)
    _, d = fxjac.ggn(model, loss=loss)(*xs)
    assert d.device.type == DEV
    assert_close(d, torch.diagonal(G.sum(0)), f"ggn[{name}, {loss}] diag")
    _, dn = fxjac.ggn(model, loss=loss, reduce="none")(*xs)
    assert_close(dn, torch.diagonal(G, dim1=-2, dim2=-1), f"ggn[{name}, {loss}] diag per sample")
    _, dc = fxjac.ggn(model, loss=loss, chunk_size=2)(*xs)  # a column loop wherever K > 2
    assert_close(dc, torch.diagonal(G.sum(0)), f"ggn[{name}, {loss}] diag, chunks of 2 columns")
    _, blocks = fxjac.ggn(model, loss=loss, out="block")(*xs)
    mask = torch.block_diag(*[torch.ones(b.shape, dtype=torch.bool, device=DEV) for b in blocks])
    assert_close(torch.block_diag(*blocks), G.sum(0) * mask, f"ggn[{name}, {loss}] blocks")
    v = torch.randn(G.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(DEV)
    _, gv = fxjac.ggn_vp(model, loss=loss)(*xs, v)
    assert_close(gv, G.sum(0) @ v, f"ggn_vp[{name}, {loss}]")


@pytest.mark.parametrize("name", ["cnn", "resnet", "transformer_explicit"])
def test_diag_backprop_matches_the_cpu(name):
    # The approximation has no torch.func reference; the CPU path (tested against one-op references) is it.
    model, xs = on_device(name, 3)
    _, d = fxjac.ggn(model, loss="cross_entropy", method="diag_backprop")(*xs)
    _, ref = fxjac.ggn(model.cpu(), loss="cross_entropy", method="diag_backprop")(*(x.cpu() for x in xs))
    assert d.device.type == DEV
    assert_close(d, ref.to(DEV), f"diag_backprop[{name}] cuda vs cpu")


def test_accumulate_over_a_loader_on_the_device():
    model, (x,) = on_device("mlp", 12)
    y = torch.randint(0, model(x).shape[1], (12,), generator=torch.Generator().manual_seed(1)).to(DEV)
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
    d = fxjac.accumulate(fxjac.ggn(model, loss="cross_entropy"), loader)
    _, ref = fxjac.ggn(model, loss="cross_entropy")(x, target=y)
    assert_close(d, ref, "accumulate[ggn diag] over 3 batches")


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_architectures(seed):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fuzz.gen import generate

    model, inputs = generate(seed, 8).build()
    model, inputs = model.to(DEV), tuple(x.to(DEV) for x in inputs)
    check_direction_products(model, inputs, seed=seed, products=("jvp", "vjp", "jmp", "mjp"))
    if any(p.requires_grad for p in model.parameters()):
        J = per_sample_jacobian(model, inputs, "params")
        _, d = fxjac.ggn(model, loss="mse")(*inputs)
        assert_close(d, (J * J).sum((0, 1)), f"fuzz seed {seed}: ggn[mse, diag]")


@pytest.mark.parametrize("name,product,options", [
    ("mlp", "vjp", dict(wrt="params")),
    ("cnn", "ggn", dict(loss="cross_entropy")),
    ("cnn", "vjp", dict(wrt="params", reduce="none")),
    ("transformer_explicit", "jvp", dict(wrt="params")),
    ("resnet", "jmjtp", dict(wrt="params", matrix="diag", out="full")),
])
def test_inductor_on_the_device(name, product, options):
    """torch.compile with inductor (Triton kernels on the GPU), fullgraph, at two batch sizes."""
    model, (x,) = on_device(name, 4, torch.float32)
    g = torch.Generator().manual_seed(3)
    P = sum(p.numel() for p in model.parameters())
    p = getattr(fxjac, product)(model, example_inputs=(x,), **options)
    torch._dynamo.reset()
    compiled = torch.compile(p, backend="inductor", fullgraph=True, dynamic=True)
    for batch in (4, 7):
        _, (xb,) = on_device(name, batch, torch.float32)
        y = model(xb)
        operand = {"vjp": lambda: torch.randn(y.shape, generator=g),
                   "jvp": lambda: torch.randn(P, generator=g),
                   "jmjtp": lambda: torch.rand(P, generator=g),
                   "ggn": None}[product]
        args = (xb,) if operand is None else (xb, operand().to(DEV))
        got, ref = compiled(*args)[1], p(*args)[1]
        assert got.device.type == DEV
        assert_close(got, ref, f"inductor {product}[{name}] at batch {batch}", torch.float32, rtol=1e-4)


@pytest.mark.parametrize("name", ["cnn", "resnet", "transformer_sdpa"])
def test_products_under_autocast(name):
    # A product pauses torch.autocast and computes in the model's dtype (on CUDA autocast runs matmuls and
    # convolutions in bfloat16, which met the rules' float32 buffers).
    model, xs = on_device(name, 3, torch.float32)
    _, ref = fxjac.ggn(model, loss="mse")(*xs)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        y, d = fxjac.ggn(model, loss="mse")(*xs)
    assert y.dtype == d.dtype == torch.float32
    assert_close(d, ref, f"ggn[{name}] under autocast", torch.float32, rtol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "transformer_sdpa"])
def test_bfloat16_models(name):
    # A bfloat16 model on the device: fused attention kernels against the product's decomposed attention differ
    # by bfloat16 rounding, which the first call's trace check must accept.
    model, xs = on_device(name, 3)
    J = per_sample_jacobian(model, xs, "params")
    half, xh = model.to(torch.bfloat16), tuple(x.to(torch.bfloat16) for x in xs)
    _, d = fxjac.ggn(half, loss="mse")(*xh)
    assert d.dtype == torch.bfloat16
    assert_close(d, (J * J).sum((0, 1)), f"ggn[{name}] in bfloat16", rtol=3e-2)

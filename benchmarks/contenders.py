"""The contenders: for each task, how fxjac, torch.func/autograd, BackPACK, curvlinops and laplace-torch compute it.

A contender's setup for a task takes the case's :class:`Ctx` and returns a :class:`Setup` whose ``fn()`` computes
the task's result in a common layout (parameter results flat in ``named_parameters()`` order):

| task | result |
|---|---|
| forward | ``y`` |
| fwd_bwd | the loss gradient ``[P]`` |
| jvp_input, jvp_params | ``J v`` shaped like ``y`` |
| vjp_params | ``Jᵀ w`` summed over the batch, ``[P]`` |
| per_sample_grad | per-sample ``Jᵀ w``, ``[B, P]`` |
| diag_ggn, diag_ggn_backprop | ``[P]`` |
| full_ggn | ``[P, P]`` |
| ggn_vp | ``G v``, ``[P]`` |
| jsjt_diag | ``J Σ Jᵀ`` per sample, ``[B, C, C]`` |

Setups do the work that is done once (building a product, ``backpack.extend``, a linear operator); ``fn`` is what
is timed. Where a contender cannot compute a task, its setup raises :class:`NotApplicable` with the reason. Every
contender but fxjac and torch gets a fresh copy of the model (BackPACK's ``extend`` and laplace's backends modify
the module they get; a model extended by BackPACK no longer works under torch.func).

The GGN is that of the loss summed over the batch: cross-entropy (loss Hessian ``diag(p) − p pᵀ``) or fxjac's
``"mse"``, ½‖y − t‖² (loss Hessian ``I``); peers built on ``nn.MSELoss(reduction="sum")`` (Hessian ``2 I``) are
scaled by ½.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch._dynamo
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

import fxjac
from fxjac import zoo

from .cases import Case

# The torch.func references form per-sample Jacobians in chunks of samples holding at most this many bytes.
JAC_CHUNK_BYTES = 256 << 20


class NotApplicable(Exception):
    """The contender cannot compute this task; the message says why."""


@dataclass
class Setup:
    """What a contender prepared for one task: ``fn()`` is timed."""

    fn: Callable[[], torch.Tensor]
    method: str = ""
    note: str = ""
    build_s: Optional[float] = None  # fxjac: trace + passes of the product(s)
    compile_s: Optional[float] = None  # fxjac+compile: first call of the torch.compile'd product(s)
    products: list = field(default_factory=list)  # fxjac products (for profiling)


# --- the case's data -----------------------------------------------------------------------------------------


class Ctx:
    """A case's model, inputs and operands, built deterministically (the same in every process)."""

    def __init__(self, case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.case = case
        self.dtype = dtype
        self.device = torch.device(device)
        self.model = self.fresh_model()
        (self.x,) = zoo.example_inputs(case.zoo, case.batch, case.preset, dtype)
        self.x = self.x.to(self.device)
        with torch.no_grad():
            y = self.model(self.x)
        self.y_shape = tuple(y.shape)
        self.B = y.shape[0]
        self.C = y[0].numel()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = tuple(p for p in self.model.parameters() if p.requires_grad)
        self.P = sum(p.numel() for p in self.params)
        # Operands are drawn on the CPU (the same numbers for every device), then moved.
        gen = torch.Generator().manual_seed(1)
        if case.loss == "cross_entropy":
            target = torch.randint(0, y.shape[1], (self.B,) + self.y_shape[2:], generator=gen)
        else:
            target = torch.randn(self.y_shape, generator=gen, dtype=dtype)
        w = torch.randn(self.y_shape, generator=gen, dtype=dtype)
        v_in = torch.randn(self.x.shape, generator=gen, dtype=dtype)
        v_params = torch.randn(self.P, generator=gen, dtype=dtype)
        # A diagonal posterior covariance (variances below 1, so laplace's prior precision 1 can be matched).
        sigma = torch.rand(self.P, generator=gen, dtype=dtype) * 1e-2 + 1e-3
        self.target, self.w, self.v_in, self.v_params, self.sigma = (
            t.to(self.device) for t in (target, w, v_in, v_params, sigma))

    def fresh_model(self) -> torch.nn.Module:
        """A new copy of the case's model (same seed, so the same weights)."""
        model, _ = zoo.build(self.case.zoo, self.case.preset, self.dtype)
        return model.to(self.device)

    def split(self, vec: torch.Tensor) -> tuple:
        """A flat ``[P]`` vector as a tuple shaped like the parameters."""
        out, i = [], 0
        for p in self.params:
            out.append(vec[i:i + p.numel()].view_as(p))
            i += p.numel()
        return tuple(out)

    def loss_fn(self, reduction: str = "sum") -> torch.nn.Module:
        """The case's loss as a torch module (MSE: ``nn.MSELoss``, whose Hessian is twice fxjac's)."""
        if self.case.loss == "cross_entropy":
            return torch.nn.CrossEntropyLoss(reduction=reduction)
        return torch.nn.MSELoss(reduction=reduction)

    @property
    def mse_scale(self) -> float:
        """The factor that turns a GGN of ``nn.MSELoss(reduction="sum")`` into fxjac's (½‖y − t‖²)."""
        return 0.5 if self.case.loss == "mse" else 1.0


def _flat(tensors, batch: Optional[int] = None) -> torch.Tensor:
    if batch is None:
        return torch.cat([t.reshape(-1) for t in tensors])
    return torch.cat([t.reshape(batch, -1) for t in tensors], dim=1)


def loss_hvp(loss: str, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The loss Hessian w.r.t. the output applied to ``u`` (per sample; classes on dim 1)."""
    if loss == "mse":
        return u
    p = torch.softmax(y, dim=1)
    return p * u - p * (p * u).sum(1, keepdim=True)


def loss_sqrt(loss: str, y: torch.Tensor) -> Optional[torch.Tensor]:
    """A per-sample square root ``S`` ``[B, C, C]`` of the loss Hessian (``H = S Sᵀ``); ``None`` for the identity."""
    if loss == "mse":
        return None
    p = torch.softmax(y.reshape(y.shape[0], -1), dim=1)
    sp = p.sqrt()
    return torch.diag_embed(sp) - p[:, :, None] * sp[:, None, :]


# --- fxjac ---------------------------------------------------------------------------------------------------


def _fxjac_products(ctx: Ctx, task: str):
    """(builders, call): builders make the products; ``call(products)`` computes the task's result."""
    m, x, loss = ctx.model, ctx.x, ctx.case.loss
    ex = {"example_inputs": (x,)}
    if task == "jvp_input":
        return [lambda: fxjac.jvp(m, wrt="input", **ex)], lambda p: p[0](x, ctx.v_in)[1]
    if task == "jvp_params":
        return [lambda: fxjac.jvp(m, wrt="params", **ex)], lambda p: p[0](x, ctx.v_params)[1]
    if task == "vjp_params":
        return [lambda: fxjac.vjp(m, wrt="params", **ex)], lambda p: p[0](x, ctx.w)[1]
    if task == "per_sample_grad":
        return [lambda: fxjac.vjp(m, wrt="params", reduce="none", **ex)], lambda p: p[0](x, ctx.w)[1]
    if task == "diag_ggn":
        return [lambda: fxjac.ggn(m, loss=loss, out="diag", **ex)], lambda p: p[0](x)[1]
    if task == "diag_ggn_backprop":
        return [lambda: fxjac.ggn(m, loss=loss, out="diag", method="diag_backprop", **ex)], lambda p: p[0](x)[1]
    if task == "full_ggn":
        return [lambda: fxjac.ggn(m, loss=loss, out="full", **ex)], lambda p: p[0](x)[1]
    if task == "jsjt_diag":
        return [lambda: fxjac.jmjtp(m, wrt="params", matrix="diag", **ex)], lambda p: p[0](x, ctx.sigma)[1]
    if task == "ggn_vp":
        return [lambda: fxjac.ggn_vp(m, loss=loss, **ex)], lambda p: p[0](x, ctx.v_params)[1]
    raise NotApplicable(f"no fxjac product for {task}")


_FXJAC_METHOD = {
    "jvp_input": "fxjac.jvp(wrt='input')",
    "jvp_params": "fxjac.jvp(wrt='params')",
    "vjp_params": "fxjac.vjp(wrt='params')",
    "per_sample_grad": "fxjac.vjp(wrt='params', reduce='none')",
    "diag_ggn": "fxjac.ggn(out='diag')",
    "diag_ggn_backprop": "fxjac.ggn(method='diag_backprop')",
    "full_ggn": "fxjac.ggn(out='full')",
    "jsjt_diag": "fxjac.jmjtp(wrt='params', matrix='diag')",
    "ggn_vp": "fxjac.ggn_vp (one graph: tangent forward, loss Hessian, cotangent backward)",
}


def _build_fxjac(ctx: Ctx, task: str):
    builders, call = _fxjac_products(ctx, task)
    products, build_s = [], 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for make in builders:
            t0 = time.perf_counter()
            products.append(make())
            build_s += time.perf_counter() - t0
    fallback = sorted({str(getattr(n, "target", n)) for p in products for n in getattr(p, "fallback_ops", [])})
    note = ("autograd fallback for: " + ", ".join(fallback)) if fallback else ""
    return products, call, build_s, note


def fxjac_setup(ctx: Ctx, task: str) -> Setup:
    """fxjac, eager: the products' GraphModules called directly."""
    if task in ("forward", "fwd_bwd"):
        raise NotApplicable("baseline task (plain PyTorch)")
    products, call, build_s, note = _build_fxjac(ctx, task)
    return Setup(lambda: call(products), _FXJAC_METHOD[task], note, build_s=build_s, products=products)


def fxjac_compiled_setup(ctx: Ctx, task: str, backend: str) -> Setup:
    """fxjac under ``torch.compile(product, backend=..., fullgraph=True, dynamic=True)``.

    Each product is called once before ``torch.compile`` (products build lazily at their first call; these are
    built with ``example_inputs``, but the first call also checks the primal output). The compile time is the
    first call of the compiled product(s). Dynamo's caches are reset first (see below), so each contender is
    measured as if it were the only compiled product in the process.
    """
    if task in ("forward", "fwd_bwd"):
        raise NotApplicable("baseline task (plain PyTorch)")
    products, call, build_s, note = _build_fxjac(ctx, task)
    call(products)
    # Every Product shares Product.__call__'s code object, so dynamo keeps all compiled products in one frame
    # cache, whose recompile_limit (8) would make the ninth compiled product in a process fail: start afresh.
    torch._dynamo.reset()
    compiled = [torch.compile(p, backend=backend, fullgraph=True, dynamic=True) for p in products]
    t0 = time.perf_counter()
    call(compiled)
    compile_s = time.perf_counter() - t0
    return Setup(lambda: call(compiled), f"torch.compile({backend}) of {_FXJAC_METHOD[task]}", note,
                 build_s=build_s, compile_s=compile_s, products=products)


# --- torch.func / autograd (the reference) ------------------------------------------------------------------


def _functional(ctx: Ctx):
    model, names = ctx.model, ctx.names
    buffers = dict(model.named_buffers())

    def f(params, x):
        return functional_call(model, ({n: p for n, p in zip(names, params)}, buffers), (x,))

    return f


def _per_sample_jacobians(ctx: Ctx):
    """Yield per-sample Jacobians ``[b, C, P]`` (``vmap(jacrev)``) chunk by chunk, with their sample slice."""
    f = _functional(ctx)
    params = tuple(p.detach() for p in ctx.params)

    def f1(ps, xi):
        return f(ps, xi.unsqueeze(0)).reshape(-1)

    jac = vmap(jacrev(f1), in_dims=(None, 0))
    per_sample = ctx.C * ctx.P * ctx.x.element_size()
    step = max(1, min(ctx.B, JAC_CHUNK_BYTES // max(per_sample, 1)))
    for a in range(0, ctx.B, step):
        xs = ctx.x[a:a + step]
        js = jac(params, xs)
        yield slice(a, a + step), torch.cat([j.reshape(xs.shape[0], ctx.C, -1) for j in js], dim=2)


def _chunk_note(ctx: Ctx) -> str:
    per_sample = ctx.C * ctx.P * ctx.x.element_size()
    step = max(1, min(ctx.B, JAC_CHUNK_BYTES // max(per_sample, 1)))
    return "" if step >= ctx.B else f"samples in chunks of {step} (Jacobian chunks ≤ 256 MiB)"


def torch_setup(ctx: Ctx, task: str) -> Setup:
    """torch.func and plain autograd: the reference every other contender is checked against."""
    model, x, loss = ctx.model, ctx.x, ctx.case.loss
    f = _functional(ctx)
    params = tuple(p.detach() for p in ctx.params)

    if task == "forward":
        def fn():
            with torch.no_grad():
                return model(x)

        return Setup(fn, "model(x) under no_grad")
    if task == "fwd_bwd":
        lossf = ctx.loss_fn()

        def fn():
            for p in ctx.params:
                p.grad = None
            lossf(model(x), ctx.target).backward()
            g = _flat([p.grad for p in ctx.params])
            for p in ctx.params:
                p.grad = None
            return g

        return Setup(fn, "loss(model(x)).backward()")
    if task == "jvp_input":
        def fwd_ad():
            return jvp(model, (x,), (ctx.v_in,))[1]

        def double_backward():
            return torch.autograd.functional.jvp(model, x, ctx.v_in)[1]

        try:
            fwd_ad()
            return Setup(fwd_ad, "torch.func.jvp")
        except Exception as err:  # forward AD missing for an op: the double-backward trick
            return Setup(double_backward, "autograd double-backward jvp",
                         f"forward AD failed ({type(err).__name__}); double-backward trick")
    if task == "jvp_params":
        vs = ctx.split(ctx.v_params)

        def fwd_ad():
            return jvp(lambda *ps: f(ps, x), params, vs)[1]

        try:
            fwd_ad()
            return Setup(fwd_ad, "torch.func.jvp over functional_call")
        except Exception as err:
            def double_backward():
                return torch.autograd.functional.jvp(lambda *ps: f(ps, x), params, vs)[1]

            return Setup(double_backward, "autograd double-backward jvp",
                         f"forward AD failed ({type(err).__name__}); double-backward trick")
    if task == "vjp_params":
        def fn():
            y = model(x)
            return _flat(torch.autograd.grad(y, ctx.params, ctx.w))

        return Setup(fn, "torch.autograd.grad(y, params, w)")
    if task == "per_sample_grad":
        def one(ps, xi, wi):
            return (f(ps, xi.unsqueeze(0)).squeeze(0) * wi).sum()

        psg = vmap(grad(one), in_dims=(None, 0, 0))

        def fn():
            return _flat(psg(params, x, ctx.w), ctx.B)

        return Setup(fn, "vmap(grad)")
    if task in ("diag_ggn", "full_ggn", "jsjt_diag"):
        def fn():
            with torch.no_grad():
                y = model(x)
            s = loss_sqrt(loss, y)
            acc = None
            for sl, j in _per_sample_jacobians(ctx):
                if task == "jsjt_diag":
                    part = torch.einsum("bcp,p,bkp->bck", j, ctx.sigma, j)
                    acc = part if acc is None else torch.cat([acc, part])
                    continue
                g = j if s is None else torch.einsum("bck,bcp->bkp", s[sl], j)
                part = (g * g).sum((0, 1)) if task == "diag_ggn" else g.reshape(-1, ctx.P).T @ g.reshape(-1, ctx.P)
                acc = part if acc is None else acc + part
            return acc

        method = {"diag_ggn": "vmap(jacrev) per sample, S_lossᵀ J squared",
                  "full_ggn": "vmap(jacrev) per sample, Σ (S_lossᵀ J)ᵀ(S_lossᵀ J)",
                  "jsjt_diag": "vmap(jacrev) per sample, einsum J Σ Jᵀ"}[task]
        return Setup(fn, method, _chunk_note(ctx))
    if task == "ggn_vp":
        vs = ctx.split(ctx.v_params)

        def fn():
            y, jv = jvp(lambda *ps: f(ps, x), params, vs)
            _, pull = vjp(lambda *ps: f(ps, x), *params)
            return _flat(pull(loss_hvp(loss, y, jv)))

        return Setup(fn, "torch.func.jvp -> H_loss -> torch.func.vjp")
    if task == "diag_ggn_backprop":
        raise NotApplicable("no diagonal back-propagation in torch.func (an approximation specific to nnj/fxjac)")
    raise NotApplicable(f"unknown task {task}")


# --- BackPACK ------------------------------------------------------------------------------------------------


def _backpack_model(ctx: Ctx):
    """A fresh model extended by BackPACK; models with non-container graphs go through its fx converter."""
    from backpack import extend

    model = ctx.fresh_model()
    if isinstance(getattr(model, "net", None), torch.nn.Sequential):  # the MLPs: a wrapper around a Sequential
        extend(model.net)
        return model, ""
    return extend(model, use_converter=True), "backpack.extend(use_converter=True)"


def backpack_setup(ctx: Ctx, task: str) -> Setup:
    """BackPACK 1.7: BatchGrad, DiagGGNExact, SqrtGGNExact, and its autodiff GGN-vector product."""
    import backpack
    from backpack import extensions as ext

    x, B = ctx.x, ctx.B
    if task == "ggn_vp":
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

        model = ctx.fresh_model()
        lossf = ctx.loss_fn()
        params = [p for p in model.parameters() if p.requires_grad]
        vs = list(ctx.split(ctx.v_params))

        def fn():
            y = model(x)
            return _flat(ggn_vector_product_from_plist(lossf(y, ctx.target), y, params, vs)) * ctx.mse_scale

        return Setup(fn, "backpack.hessianfree ggn_vector_product (R-op by double backward)")
    if task not in ("per_sample_grad", "diag_ggn", "full_ggn"):
        raise NotApplicable({
            "jvp_input": "BackPACK extends a loss backward pass; it has no standalone J v",
            "jvp_params": "BackPACK extends a loss backward pass; it has no standalone J v",
            "vjp_params": "a summed vjp is plain autograd (the torch row); BackPACK adds nothing",
            "diag_ggn_backprop": "BackPACK has no diagonal back-propagation (DiagGGNMC is a different estimator)",
            "jsjt_diag": "BackPACK has no J Σ Jᵀ; see laplace[backpack], which builds it from BatchGrad",
        }.get(task, "not a BackPACK quantity"))
    model, how = _backpack_model(ctx)
    params = [p for p in model.parameters() if p.requires_grad]

    def release(attr):
        """Drop what BackPACK attached to the parameters: nothing of a call outlives it (as for the others)."""
        for p in params:
            p.grad = None
            if hasattr(p, attr):
                delattr(p, attr)

    if task == "per_sample_grad":
        def fn():
            model.zero_grad()
            with backpack.backpack(ext.BatchGrad()):
                (model(x) * ctx.w).sum().backward()
            out = _flat([p.grad_batch for p in params], B)
            release("grad_batch")
            return out

        return Setup(fn, "BatchGrad", how)
    lossf = backpack.extend(ctx.loss_fn())
    if task == "diag_ggn":
        def fn():
            model.zero_grad()
            with backpack.backpack(ext.DiagGGNExact()):
                lossf(model(x), ctx.target).backward()
            out = _flat([p.diag_ggn_exact for p in params]) * ctx.mse_scale
            release("diag_ggn_exact")
            return out

        return Setup(fn, "DiagGGNExact", how)

    def fn():  # full_ggn
        model.zero_grad()
        with backpack.backpack(ext.SqrtGGNExact()):
            lossf(model(x), ctx.target).backward()
        s = torch.cat([p.sqrt_ggn_exact.reshape(p.sqrt_ggn_exact.shape[0] * B, -1) for p in params], dim=1)
        release("sqrt_ggn_exact")
        return (s.T @ s) * ctx.mse_scale

    return Setup(fn, "SqrtGGNExact, then SᵀS", how)


# --- curvlinops ----------------------------------------------------------------------------------------------


def curvlinops_setup(ctx: Ctx, task: str) -> Setup:
    """curvlinops 3: Jacobian, transposed-Jacobian and GGN linear operators (torch.func inside)."""
    import curvlinops as cl

    if task not in ("jvp_params", "vjp_params", "ggn_vp", "full_ggn"):
        raise NotApplicable({
            "jvp_input": "curvlinops' operators are w.r.t. parameters",
            "per_sample_grad": "curvlinops has no per-sample gradients",
            "diag_ggn": "curvlinops 3.0 has only stochastic diagonal estimators (hutchinson_diag, xdiag)",
            "diag_ggn_backprop": "curvlinops has no diagonal back-propagation",
            "jsjt_diag": "curvlinops has no J Σ Jᵀ (laplace's curvlinops backend forms J by torch.func.jacrev)",
        }.get(task, "not a curvlinops quantity"))
    model = ctx.fresh_model()
    params = [p for p in model.parameters() if p.requires_grad]
    data = [(ctx.x, ctx.target)]
    kw = {"check_deterministic": False}
    if task == "jvp_params":
        op = cl.JacobianLinearOperator(model, params, data, **kw)
        return Setup(lambda: (op @ ctx.v_params).reshape(ctx.y_shape), "JacobianLinearOperator @ v")
    if task == "vjp_params":
        op = cl.TransposedJacobianLinearOperator(model, params, data, **kw)
        return Setup(lambda: op @ ctx.w.reshape(-1), "TransposedJacobianLinearOperator @ w")
    op = cl.GGNLinearOperator(model, ctx.loss_fn(), params, data, **kw)
    if task == "ggn_vp":
        return Setup(lambda: (op @ ctx.v_params) * ctx.mse_scale, "GGNLinearOperator @ v")
    eye = torch.eye(ctx.P, dtype=ctx.dtype, device=ctx.device)
    return Setup(lambda: (op @ eye) * ctx.mse_scale, "GGNLinearOperator @ I (P matvecs, batched)")


# --- laplace-torch -------------------------------------------------------------------------------------------


def _laplace_classifier_only(ctx: Ctx):
    if ctx.case.loss != "cross_entropy" or len(ctx.y_shape) != 2:
        raise NotApplicable("laplace-torch's regression expects [B, outputs]; the U-Net's are images")


def laplace_backpack_setup(ctx: Ctx, task: str) -> Setup:
    """laplace-torch 0.3 with its BackPACK backend: the GLM predictive ``J Σ Jᵀ`` and the full GGN."""
    if task not in ("jsjt_diag", "full_ggn"):
        raise NotApplicable("laplace[backpack] is timed for J Σ Jᵀ and the full GGN (its other quantities "
                            "are BackPACK's own: see the backpack row)")
    _laplace_classifier_only(ctx)
    from laplace import DiagLaplace
    from laplace.curvature import BackPackGGN

    model = ctx.fresh_model()
    model.output_size = ctx.C
    if task == "full_ggn":
        backend = BackPackGGN(model, "classification")
        return Setup(lambda: backend.full(ctx.x, ctx.target)[1], "BackPackGGN.full: BatchGrad per output, einsum",
                     "Jacobian [B, C, P] formed")
    la = DiagLaplace(model, "classification", backend=BackPackGGN)
    # posterior precision = H + prior precision (1): choose H so that the posterior variance is Σ.
    la.H = 1.0 / ctx.sigma - 1.0
    assert torch.allclose(la.posterior_variance, ctx.sigma)
    return Setup(lambda: la._glm_predictive_distribution(ctx.x)[1],
                 "DiagLaplace GLM predictive: BatchGrad per output, einsum", "Jacobian [B, C, P] formed")


def laplace_asdl_setup(ctx: Ctx, task: str) -> Setup:
    """laplace-torch 0.3 with its ASDL backend: exact diagonal GGN (``fisher_exact``) and the full GGN."""
    if task not in ("diag_ggn", "full_ggn"):
        raise NotApplicable({
            "jsjt_diag": "laplace's GLM predictive falls back to whole-batch torch.func.jacrev with ASDL",
        }.get(task, "laplace[asdl] is timed for the diagonal and full GGN"))
    _laplace_classifier_only(ctx)
    from laplace.curvature import AsdlGGN

    model = ctx.fresh_model()
    model.output_size = ctx.C
    backend = AsdlGGN(model, "classification", stochastic=False)
    if task == "diag_ggn":
        return Setup(lambda: backend.diag(ctx.x, ctx.target)[1], "AsdlGGN.diag (fisher_exact)")
    return Setup(lambda: backend.full(ctx.x, ctx.target)[1], "AsdlGGN.full: ASDL Jacobians, einsum",
                 "Jacobian [B, C, P] formed")


# --- registry ------------------------------------------------------------------------------------------------

CONTENDERS = ("fxjac", "fxjac+compile", "torch", "backpack", "curvlinops", "laplace[backpack]", "laplace[asdl]")
OTHERS = ("torch", "backpack", "curvlinops", "laplace[backpack]", "laplace[asdl]")


def setup(name: str, ctx: Ctx, task: str, backend: str = "inductor") -> Setup:
    """The setup of contender ``name`` for ``task``; raises :class:`NotApplicable` where it cannot run."""
    if name == "fxjac":
        return fxjac_setup(ctx, task)
    if name == "fxjac+compile":
        return fxjac_compiled_setup(ctx, task, backend)
    if task in ("forward", "fwd_bwd") and name != "torch":
        raise NotApplicable("baseline task (plain PyTorch)")
    return {
        "torch": torch_setup,
        "backpack": backpack_setup,
        "curvlinops": curvlinops_setup,
        "laplace[backpack]": laplace_backpack_setup,
        "laplace[asdl]": laplace_asdl_setup,
    }[name](ctx, task)


__all__ = ["CONTENDERS", "OTHERS", "Ctx", "NotApplicable", "Setup", "loss_hvp", "loss_sqrt", "setup"]

"""Independent references (torch.func over functional_call, float64) and the checks the tests share.

Tolerances live here, in one place: ``RTOL[dtype]`` is the relative error allowed against the reference,
measured as ``max|got - ref| / max(max|ref|, tiny)``.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, jacrev

import fxjac

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's largest entry."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return (got - ref).abs().max().item() / max(scale, 1e-30) if ref.numel() else 0.0


def assert_close(got, ref, what: str, dtype=torch.float64, rtol=None):
    """Fail with where and by how much when ``got`` is not ``ref`` within the dtype's tolerance."""
    tol = RTOL[dtype] if rtol is None else rtol
    err = rel_err(got, ref)
    if not err <= tol:
        diff = (got.detach().double() - ref.detach().double()).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.0e} (worst at index {idx}: "
                             f"got {got.flatten()[diff.flatten().argmax()].item():.6g}, "
                             f"ref {ref.flatten()[diff.flatten().argmax()].item():.6g})")


def selected(model, names=None):
    """The parameters fxjac selects for ``wrt`` (``None`` = all trainable), as an ordered dict."""
    named = dict(model.named_parameters())
    if names is None:
        return {n: p for n, p in named.items() if p.requires_grad}
    out = {}
    for n, p in named.items():
        if p.requires_grad and any(n == w or n.startswith(w + ".") for w in names):
            out[n] = p
    return out


def param_fn(model, inputs, names=None, output=None):
    """``f(theta_flat) -> y`` with the selected parameters replaced, the rest as in the model."""
    sel = selected(model, names)
    shapes = [(n, p.shape, p.numel()) for n, p in sel.items()]

    def f(flat):
        params, off = {}, 0
        for n, s, k in shapes:
            params[n] = flat[off:off + k].reshape(s)
            off += k
        out = functional_call(model, params, tuple(inputs))
        return out if output is None else out[output]

    flat = torch.cat([p.detach().reshape(-1) for p in sel.values()])
    return f, flat


def input_fn(model, inputs, index=0, output=None):
    """``f(x_index) -> y`` with the other inputs fixed."""

    def f(x):
        args = list(inputs)
        args[index] = x
        out = model(*args)
        return out if output is None else out[output]

    return f


class Fn(torch.nn.Module):
    """A functional call ``fn(x)`` as a module (no parameters of its own)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def per_sample_jacobian(model, inputs, wrt="input", names=None, use_jacrev=True):
    """Dense per-sample Jacobian ``[B, O, I]`` or ``[B, O, P]`` from torch.func: reverse mode, or forward mode
    (``jacfwd``) with ``use_jacrev=False`` (the two differ at some degenerate points, as autograd's modes do).
    """
    B = inputs[0].shape[0]
    jac = jacrev if use_jacrev else torch.func.jacfwd
    if wrt == "input":
        f = input_fn(model, inputs)
        J = jac(f)(inputs[0])  # [B, *out, B, *in]
        y = f(inputs[0])
        O = y[0].numel()
        J = J.reshape(B, O, B, -1)
        return torch.stack([J[b, :, b] for b in range(B)])
    f, flat = param_fn(model, inputs, names)
    J = jac(f)(flat)  # [B, *out, P]
    return J.reshape(B, -1, flat.numel())


def as_float64(model, inputs):
    """A float64 copy of the model and inputs for the reference (the model itself when already float64)."""
    if all(p.dtype == torch.float64 for p in model.parameters()) and all(
            not torch.is_floating_point(x) or x.dtype == torch.float64 for x in inputs):
        return model, tuple(inputs)
    return copy.deepcopy(model).double(), tuple(x.double() if torch.is_floating_point(x) else x for x in inputs)


def check_direction_products(model, inputs, names=None, dtype=torch.float64, seed=0, products=None):
    """Every direction product w.r.t. the first input and w.r.t. parameters ``names`` (None: all) against the
    dense per-sample Jacobian from torch.func; raises AssertionError naming the first mismatch."""
    g = torch.Generator().manual_seed(seed)
    device = inputs[0].device

    def rand(*shape):  # drawn on the CPU (the same numbers on every device), then moved to the inputs' device
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    x = inputs[0]
    B = x.shape[0]
    model64, inputs64 = as_float64(model, inputs)
    J_in = per_sample_jacobian(model64, inputs64, "input")
    P = sum(p.numel() for p in selected(model64, names).values())
    J_p = per_sample_jacobian(model64, inputs64, "params", names) if P else None
    O, I = J_in.shape[1], J_in.shape[2]
    wrt_p = "params" if names is None else list(names)
    y_ref = model64(*inputs64)
    want = products or ("jvp", "vjp", "jmp", "mjp", "jacobian")
    cases = [("input", J_in)] + ([(wrt_p, J_p)] if P else [])
    for wrt, J in cases:
        tag = "input" if wrt == "input" else "params"
        if "jvp" in want:
            p = fxjac.jvp(model, wrt=wrt)
            v = rand(*x.shape) if tag == "input" else rand(P)
            y, t = p(*inputs, v)
            assert_close(y, y_ref, f"jvp[{tag}] primal", dtype)
            vf = v.reshape(B, -1) if tag == "input" else v.expand(B, P)
            assert_close(t.reshape(B, -1), torch.einsum("boi,bi->bo", J, vf.double()), f"jvp[{tag}]", dtype)
            if tag == "params":
                v2 = rand(B, P)
                _, t2 = p(*inputs, v2)
                assert_close(t2.reshape(B, -1), torch.einsum("boi,bi->bo", J, v2.double()), "jvp[params, per-sample]",
                             dtype)
        if "vjp" in want:
            w = rand(*y_ref.shape)
            p = fxjac.vjp(model, wrt=wrt)
            y, c = p(*inputs, w)
            ref = torch.einsum("boi,bo->bi", J, w.reshape(B, -1).double())
            if tag == "input":
                assert_close(c.reshape(B, -1), ref, f"vjp[{tag}]", dtype)
            else:
                assert_close(c, ref.sum(0), "vjp[params]", dtype)
                _, c2 = fxjac.vjp(model, wrt=wrt, reduce="none")(*inputs, w)
                assert_close(c2, ref, "vjp[params, reduce=none]", dtype)
        if "jmp" in want:
            K = 3
            M = rand(B, I, K) if tag == "input" else rand(P, K)
            _, r = fxjac.jmp(model, wrt=wrt)(*inputs, M)
            M64 = M.double()
            ref = torch.einsum("boi,bik->bok", J, M64) if tag == "input" else torch.einsum("boi,ik->bok", J, M64)
            assert_close(r, ref, f"jmp[{tag}]", dtype)
        if "mjp" in want:
            K = 2
            M = rand(B, K, O)
            _, r = fxjac.mjp(model, wrt=wrt)(*inputs, M)
            ref = torch.einsum("bko,boi->bki", M.double(), J)
            assert_close(r, ref if tag == "input" else ref.sum(0), f"mjp[{tag}]", dtype)
            if tag == "params":
                _, r2 = fxjac.mjp(model, wrt=wrt, reduce="none")(*inputs, M)
                assert_close(r2, ref, "mjp[params, reduce=none]", dtype)
        if "jacobian" in want:
            for mode in ("forward", "reverse"):
                _, r = fxjac.jacobian(model, wrt=wrt, mode=mode)(*inputs)
                assert_close(r, J, f"jacobian[{tag}, {mode}]", dtype)


def sym(rand, *shape):
    """A random symmetric (indefinite) matrix, batched over leading axes."""
    a = rand(*shape)
    return (a + a.transpose(-1, -2)) / 2


def check_metric_products(model, inputs, names=None, dtype=torch.float64, seed=0, wrts=("input", "params"),
                          matrices=None):
    """Every exact jtmjp / jmjtp combination against dense products of the per-sample Jacobian."""
    g = torch.Generator().manual_seed(seed)
    device = inputs[0].device

    def rand(*shape):  # drawn on the CPU (the same numbers on every device), then moved to the inputs' device
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    B = inputs[0].shape[0]
    wrt_p = "params" if names is None else list(names)
    model64, inputs64 = as_float64(model, inputs)
    for wrt in wrts:
        if wrt != "input" and not selected(model, names):
            continue
        J = per_sample_jacobian(model64, inputs64, "input" if wrt == "input" else "params", names)
        O, N = J.shape[1], J.shape[2]
        w = "input" if wrt == "input" else wrt_p
        # J^T M J, M in output space (per sample).
        Ms = {"identity": None, "diag": rand(B, O), "sqrt": rand(B, O, 2), "full": sym(rand, B, O, O)}
        for kind, M in Ms.items():
            if matrices and kind not in matrices:
                continue
            M64 = None if M is None else M.double()
            dense = {"identity": torch.eye(O, dtype=torch.float64, device=device).expand(B, O, O),
                     "diag": torch.diag_embed(M64) if kind == "diag" else None,
                     "sqrt": M64 @ M64.transpose(-1, -2) if kind == "sqrt" else None, "full": M64}[kind]
            ref = torch.einsum("boi,bop,bpj->bij", J, dense, J)  # per sample [B, N, N]
            outs = ("full", "diag", "block") if wrt != "input" else ("full", "diag")
            for out in outs:
                p = fxjac.jtmjp(model, wrt=w, matrix=kind, out=out)
                args = (*inputs,) if M is None else (*inputs, M)
                _, r = p(*args)
                tag = f"jtmjp[{wrt}, {kind}, {out}]"
                if wrt == "input":
                    assert_close(r, ref if out == "full" else torch.diagonal(ref, dim1=-2, dim2=-1), tag, dtype)
                    continue
                tot = ref.sum(0)
                if out == "full":
                    assert_close(r, tot, tag, dtype)
                elif out == "diag":
                    assert_close(r, torch.diagonal(tot), tag, dtype)
                    _, r2 = fxjac.jtmjp(model, wrt=w, matrix=kind, out="diag", reduce="none")(*args)
                    assert_close(r2, torch.diagonal(ref, dim1=-2, dim2=-1), tag + " reduce=none", dtype)
                else:
                    off = 0
                    for blk in r:
                        n = blk.shape[0]
                        assert_close(blk, tot[off:off + n, off:off + n], tag + f" block@{off}", dtype)
                        off += n
                    assert off == N, f"{tag}: blocks cover {off} of {N}"
        # J M J^T, M in input space (per sample) or parameter space (shared).
        if wrt == "input":
            Ms = {"identity": None, "diag": rand(B, N), "sqrt": rand(B, N, 3), "full": sym(rand, B, N, N)}
        else:
            Ms = {"identity": None, "diag": rand(N), "sqrt": rand(N, 3), "full": sym(rand, N, N)}
        for kind, M in Ms.items():
            if matrices and kind not in matrices:
                continue
            M64 = None if M is None else M.double()
            if kind == "identity":
                dense = torch.eye(N, dtype=torch.float64, device=device)
            elif kind == "diag":
                dense = torch.diag_embed(M64)
            elif kind == "sqrt":
                dense = M64 @ M64.transpose(-1, -2)
            else:
                dense = M64
            ref = torch.einsum("boi,...ij,bpj->bop", J, dense, J) if dense.dim() == 2 else \
                torch.einsum("boi,bij,bpj->bop", J, dense, J)
            modes = ("forward", "reverse") if wrt == "input" else ("auto",)
            for mode in modes:
                for out in ("full", "diag"):
                    p = fxjac.jmjtp(model, wrt=w, matrix=kind, out=out, mode=mode)
                    args = (*inputs,) if M is None else (*inputs, M)
                    _, r = p(*args)
                    want = ref if out == "full" else torch.diagonal(ref, dim1=-2, dim2=-1)
                    assert_close(r, want, f"jmjtp[{wrt}, {kind}, {out}, {mode}]", dtype)
        if wrt != "input":  # block-diagonal Sigma, one block per module owning parameters
            p = fxjac.jmjtp(model, wrt=w, matrix="block", out="full")
            sizes = _block_sizes(model, names)
            blocks = [sym(rand, n, n) for n in sizes]
            dense = torch.block_diag(*blocks).double()
            _, r = p(*inputs, blocks)
            assert_close(r, torch.einsum("boi,ij,bpj->bop", J, dense, J), f"jmjtp[{wrt}, block]", dtype)


def _block_sizes(model, names=None):
    sizes = {}
    for n, p in selected(model, names).items():
        mod = n.rsplit(".", 1)[0] if "." in n else ""
        sizes[mod] = sizes.get(mod, 0) + p.numel()
    return list(sizes.values())


def loss_hessian(y, loss, class_dim=1, sigma=1.0):
    """Dense per-sample loss Hessian (Fisher for gaussian_nll) ``[B, O, O]`` by torch.func.hessian."""
    B = y.shape[0]
    if loss == "gaussian_nll":
        var = torch.exp(y[:, 1:2])
        d = torch.cat([1 / var, torch.full_like(var, 0.5)], dim=1).reshape(B, -1)
        return torch.diag_embed(d)
    t = torch.zeros_like(y[0])
    in_sample = class_dim % y.dim() - 1  # the class axis of one sample
    if loss == "cross_entropy":
        t = torch.zeros(y[0].movedim(in_sample, 0).shape[1:], dtype=torch.long, device=y.device)

    def f(ys):
        if loss == "mse":
            return 0.5 * ((ys - t) ** 2).sum()
        if loss == "cross_entropy":
            logits = ys.movedim(in_sample, 0).unsqueeze(0)
            return torch.nn.functional.cross_entropy(logits, t.unsqueeze(0), reduction="sum")
        if loss == "bce":
            return torch.nn.functional.binary_cross_entropy_with_logits(ys, t, reduction="sum")
        return 0.5 * (((ys - t) / sigma) ** 2).sum()

    H = torch.stack([torch.func.hessian(f)(y[b]) for b in range(B)])
    return H.reshape(B, y[0].numel(), y[0].numel())


def check_diag_backprop(model, inputs, names=None, dtype=torch.float64, seed=0):
    """For a model of ONE op (no cross terms), diagonal back-propagation is exact: compare
    ``jtmjp(method="diag_backprop", matrix="diag", out="diag")`` with the diagonal of ``Jᵀ diag(d) J``."""
    g = torch.Generator().manual_seed(seed)
    B = inputs[0].shape[0]
    for wrt in ("input", "params"):
        if wrt == "params" and not selected(model, names):
            continue
        J = per_sample_jacobian(model, inputs, wrt, names)
        O = J.shape[1]
        d = torch.randn(B, O, generator=g, dtype=torch.float64).to(device=inputs[0].device, dtype=dtype)
        w = "input" if wrt == "input" else ("params" if names is None else list(names))
        p = fxjac.jtmjp(model, wrt=w, matrix="diag", out="diag", method="diag_backprop")
        _, r = p(*inputs, d)
        ref = torch.einsum("boi,bo->bi", J * J, d)
        assert_close(r, ref if wrt == "input" else ref.sum(0), f"diag_backprop[{wrt}]", dtype)
        if wrt == "params":
            _, r2 = fxjac.jtmjp(model, wrt=w, matrix="diag", out="diag", method="diag_backprop",
                                reduce="none")(*inputs, d)
            assert_close(r2, ref, "diag_backprop[params, reduce=none]", dtype)


def assert_every_key_reached(rules_module, models) -> None:
    """Every key that ``rules_module`` registers is called by the traced graph of some model in ``models``."""
    from fxjac.rules.registry import RULES
    from fxjac.tracing import trace
    from passes.protocol import rule_key

    mine = {k for k, rule in RULES.items() if type(rule).__module__ == rules_module.__name__}
    seen = set()
    for model in models:
        seen |= {rule_key(n) for n in trace(model).graph.nodes}
    missing = mine - seen
    assert not missing, f"no test case reaches {missing}"

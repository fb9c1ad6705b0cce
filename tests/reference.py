"""Independent references (torch.func over functional_call, float64) and the checks the tests share.

Tolerances live here, in one place: ``RTOL[dtype]`` is the relative error allowed against the reference,
measured as ``max|got - ref| / max(max|ref|, tiny)``.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev, jvp, vjp

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


def per_sample_jacobian(model, inputs, wrt="input", names=None, use_jacrev=True):
    """Dense per-sample Jacobian ``[B, O, I]`` or ``[B, O, P]`` from torch.func (reverse mode)."""
    B = inputs[0].shape[0]
    if wrt == "input":
        f = input_fn(model, inputs)
        J = jacrev(f)(inputs[0])  # [B, *out, B, *in]
        y = f(inputs[0])
        O = y[0].numel()
        J = J.reshape(B, O, B, -1)
        return torch.stack([J[b, :, b] for b in range(B)])
    f, flat = param_fn(model, inputs, names)
    J = jacrev(f)(flat)  # [B, *out, P]
    return J.reshape(B, -1, flat.numel())


def check_direction_products(model, inputs, names=None, dtype=torch.float64, seed=0, products=None):
    """Every direction product w.r.t. the first input and w.r.t. parameters ``names`` (None: all) against the
    dense per-sample Jacobian from torch.func; raises AssertionError naming the first mismatch."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x = inputs[0]
    B = x.shape[0]
    model64 = model
    J_in = per_sample_jacobian(model64, inputs, "input")
    J_p = per_sample_jacobian(model64, inputs, "params", names)
    O, I, P = J_in.shape[1], J_in.shape[2], J_p.shape[2]
    wrt_p = "params" if names is None else list(names)
    y_ref = model(*inputs)
    want = products or ("jvp", "vjp", "jmp", "mjp", "jacobian")
    for wrt, J in (("input", J_in), (wrt_p, J_p)):
        tag = "input" if wrt == "input" else "params"
        if "jvp" in want:
            p = fxjac.jvp(model, wrt=wrt)
            v = rand(*x.shape) if tag == "input" else rand(P)
            y, t = p(*inputs, v)
            assert_close(y, y_ref, f"jvp[{tag}] primal", dtype)
            vf = v.reshape(B, -1) if tag == "input" else v.expand(B, P)
            assert_close(t.reshape(B, -1), torch.einsum("boi,bi->bo", J, vf), f"jvp[{tag}]", dtype)
            if tag == "params":
                v2 = rand(B, P)
                _, t2 = p(*inputs, v2)
                assert_close(t2.reshape(B, -1), torch.einsum("boi,bi->bo", J, v2), "jvp[params, per-sample]", dtype)
        if "vjp" in want:
            w = rand(*y_ref.shape)
            p = fxjac.vjp(model, wrt=wrt)
            y, c = p(*inputs, w)
            ref = torch.einsum("boi,bo->bi", J, w.reshape(B, -1))
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
            ref = torch.einsum("boi,bik->bok", J, M) if tag == "input" else torch.einsum("boi,ik->bok", J, M)
            assert_close(r, ref, f"jmp[{tag}]", dtype)
        if "mjp" in want:
            K = 2
            M = rand(B, K, O)
            _, r = fxjac.mjp(model, wrt=wrt)(*inputs, M)
            ref = torch.einsum("bko,boi->bki", M, J)
            assert_close(r, ref if tag == "input" else ref.sum(0), f"mjp[{tag}]", dtype)
            if tag == "params":
                _, r2 = fxjac.mjp(model, wrt=wrt, reduce="none")(*inputs, M)
                assert_close(r2, ref, "mjp[params, reduce=none]", dtype)
        if "jacobian" in want:
            for mode in ("forward", "reverse"):
                _, r = fxjac.jacobian(model, wrt=wrt, mode=mode)(*inputs)
                assert_close(r, J, f"jacobian[{tag}, {mode}]", dtype)

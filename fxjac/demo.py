"""The main job (``fxjac demo``): every product on every zoo model, checked against torch.func, timed.

For each model of the zoo and each product the demo builds the fxjac product, computes the same quantity
densely with torch.func (per-sample ``jacrev`` in float64, then the matrix products), reports the relative error
and the median time of fxjac beside the torch.func computation, and exits non-zero if any check fails.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.func import functional_call, jacrev
from tqdm import tqdm

from . import direction, metric, zoo

TOLERANCE = 1e-9


@dataclass
class Row:
    """One line of the demo's table."""

    model: str
    product: str
    error: float
    t_fxjac: float
    t_torch: Optional[float]
    ok: bool


def _median_time(fn: Callable, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def _jacobians(model, xs):
    """Dense per-sample Jacobians w.r.t. the first input and all parameters, by torch.func (reverse mode)."""
    b = xs[0].shape[0]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f_in(x):
        return model(x, *xs[1:])

    j_in = jacrev(f_in)(xs[0]).reshape(b, -1, b, xs[0][0].numel())
    j_in = torch.stack([j_in[i, :, i] for i in range(b)])

    def f_p(prm):
        return functional_call(model, prm, tuple(xs))

    jp = jacrev(f_p)(params)
    j_p = torch.cat([jp[n].reshape(b, -1, p.numel()) for n, p in params.items()], dim=2)
    return j_in, j_p


def _torch_func_baselines(model, xs, names):
    """How a torch.func user computes each product (dense Jacobians where torch.func has nothing better)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    b = xs[0].shape[0]

    def f_p(prm, *inp):
        return functional_call(model, prm, inp)

    def f_in(x):
        return model(x, *xs[1:])

    def per_sample_grads(w):
        def one(x1, w1):
            return torch.func.grad(lambda prm: (f_p(prm, x1[None], *[t[:1] for t in xs[1:]]) * w1[None]).sum())(
                params)

        return torch.func.vmap(one)(xs[0], w)

    def dense_params():
        return jacrev(lambda prm: f_p(prm, *xs))(params)

    def dense_input():
        return jacrev(f_in)(xs[0])

    table = {
        "jvp[input]": lambda v: torch.func.jvp(f_in, (xs[0],), (v,)),
        "jvp[params]": lambda vp: torch.func.jvp(lambda prm: f_p(prm, *xs), (params,),
                                                 (_split(vp, params),)),
        "vjp[params]": lambda w: torch.func.vjp(lambda prm: f_p(prm, *xs), params)[1](w),
        "per-sample grads": per_sample_grads if len(xs) == 1 else None,
        "jmp[input]": lambda m: torch.func.vmap(lambda c: torch.func.jvp(f_in, (xs[0],), (c.reshape(xs[0].shape),))[1],
                                                in_dims=2)(m),
        "mjp[input]": lambda m: torch.func.vmap(torch.func.vjp(f_in, xs[0])[1], in_dims=1)(
            m.reshape((b, m.shape[1]) + tuple(f_in(xs[0]).shape[1:]))),
        "jacobian[input]": lambda: dense_input(),
        "JtJ diag[params]": lambda: dense_params(),
        "Jt diag(d) J[input]": lambda d: dense_input(),
        "J Σ Jt, diag Σ[params]": lambda s: dense_params(),
    }
    return {n: table.get(n) for n in names}


def _split(vec, params):
    out, off = {}, 0
    for n, p in params.items():
        out[n] = vec[off:off + p.numel()].reshape(p.shape)
        off += p.numel()
    return out


def _cases(model, xs, j_in, j_p, g: torch.Generator):
    """(name, fxjac product, operands, dense reference) for each product."""
    b, o, i = j_in.shape
    P = j_p.shape[2]
    dt = xs[0].dtype

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dt)

    v, w, m_in, m_out, d_out = r(*xs[0].shape), r(b, o), r(b, i, 3), r(b, 2, o), r(b, o)
    vp = r(P)
    w_like_y = w.reshape(model(*xs).shape)  # vjp takes a cotangent shaped like the output
    yield "jvp[input]", direction.jvp(model), (v,), torch.einsum("boi,bi->bo", j_in, v.reshape(b, -1))
    yield "jvp[params]", direction.jvp(model, wrt="params"), (vp,), torch.einsum("bop,p->bo", j_p, vp)
    yield "vjp[params]", direction.vjp(model, wrt="params"), (w_like_y,), torch.einsum("bop,bo->p", j_p, w)
    yield "per-sample grads", direction.vjp(model, wrt="params", reduce="none"), (w_like_y,), \
        torch.einsum("bop,bo->bp", j_p, w)
    yield "jmp[input]", direction.jmp(model), (m_in,), torch.einsum("boi,bik->bok", j_in, m_in)
    yield "mjp[input]", direction.mjp(model), (m_out,), torch.einsum("bko,boi->bki", m_out, j_in)
    yield "jacobian[input]", direction.jacobian(model), (), j_in
    yield "JtJ diag[params]", metric.jtmjp(model, wrt="params", out="diag"), (), (j_p * j_p).sum((0, 1))
    yield "Jt diag(d) J[input]", metric.jtmjp(model, matrix="diag"), (d_out,), \
        torch.einsum("boi,bo,boj->bij", j_in, d_out, j_in)
    sig = r(P).abs()
    yield "J Σ Jt, diag Σ[params]", metric.jmjtp(model, wrt="params", matrix="diag"), (sig,), \
        torch.einsum("bop,p,bqp->boq", j_p, sig, j_p)


def _shape_like(got, ref):
    return got.reshape(ref.shape) if got.numel() == ref.numel() else got


def run(names: Optional[list] = None, batch: int = 4, repeat: int = 5, out=sys.stdout,
        pictures: Optional[str] = "fxjac-demo", progress: Optional[bool] = None) -> list:
    """Run the demo on ``names`` (default: the zoo's test models), print the table and write one product-flow
    picture per model into ``pictures`` (SVG; skipped when the ``dot`` program is missing); returns the rows.
    """
    rows = []
    names = names or zoo.names()
    g = torch.Generator().manual_seed(0)
    show = out.isatty() if progress is None and hasattr(out, "isatty") else bool(progress)
    bar = tqdm(total=len(names) * 10, desc="fxjac demo", disable=not show, file=sys.stderr, leave=False)
    print(f"{'model':<22}{'product':<26}{'rel. error':>12}{'fxjac ms':>11}{'torch.func ms':>15}  ok", file=out)
    for name in names:
        model, _ = zoo.build(name)
        xs = zoo.example_inputs(name, batch)
        j_in, j_p = _jacobians(model, xs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cases = list(_cases(model, xs, j_in, j_p, g))
            baselines = _torch_func_baselines(model, xs, [c[0] for c in cases])
            for prod_name, p, ops, ref in cases:
                got = p(*xs, *ops)[1]
                err = ((_shape_like(got, ref) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                t = _median_time(lambda p=p, ops=ops: p(*xs, *ops), repeat)
                base = baselines[prod_name]
                try:
                    t_ref = _median_time(lambda: base(*ops), repeat) * 1e3 if base is not None else None
                except Exception:  # noqa: BLE001 - torch.func cannot compute it (no forward-mode formula…)
                    t_ref = None
                ok = err < TOLERANCE
                rows.append(Row(name, prod_name, err, t * 1e3, t_ref, ok))
                ref_col = f"{t_ref:>15.2f}" if t_ref is not None else f"{'n/a':>15}"
                bar.update()
                print(f"{name:<22}{prod_name:<26}{err:>12.2e}{t * 1e3:>11.2f}{ref_col}  {'yes' if ok else 'NO'}",
                      file=out, flush=True)
        if pictures:
            _picture(model, xs, name, pictures)
    bar.close()
    failed = [r for r in rows if not r.ok]
    print(f"\nchecks: {len(rows) - len(failed)} ok, {len(failed)} wrong (torch.func column: the same quantity "
          "computed with torch.func; n/a where it cannot)", file=out)
    if pictures:
        print(f"product-flow pictures: {os.path.abspath(pictures)}/", file=out)
    return rows


def _picture(model, xs, name, folder):
    """One product-flow picture per model: the backward metric product w.r.t. the parameters."""
    from .draw import draw

    os.makedirs(folder, exist_ok=True)
    suffix = ".svg" if shutil.which("dot") else ".dot"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        draw(model, os.path.join(folder, f"{name}-jtmjp{suffix}"), product="jtmjp", wrt="params",
             example_inputs=xs, out="diag")

"""Matrix-free curvature: the GGN-vector product as one graph, dataset accumulation, a scipy LinearOperator."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from passes import ZERO, forward_tangents

from . import assemble as A
from . import checks
from .direction import _options
from .errors import OptionError
from .losses import LOSSES, loss_hvp, loss_options
from .product import Product, make_product


def ggn_vp(model, loss: str = "cross_entropy", wrt: Any = "params", class_dim: int = 1, sigma: Any = 1.0,
           **options) -> Product:
    """The GGN-vector product ``Jᵀ H J v`` summed over the batch, in one generated graph: the tangent of ``v``
    forward with the primal, the loss Hessian applied to it at the output, the cotangent backward.

    Args:
        model: any ``nn.Module``.
        loss: as in :func:`fxjac.ggn`.
        wrt: ``"params"`` or parameter names (the flat layout of the contract).
        class_dim: cross-entropy's class axis.
        sigma: the Gaussian likelihood's standard deviation.
        **options: the common options.

    Returns:
        ``p(*inputs, v, target=None) -> (y, G v)`` with ``v`` and ``G v`` of shape ``[P]``.
    """
    options = _options(options)
    if loss not in LOSSES:
        raise OptionError(f"unknown loss {loss!r}; one of {sorted(LOSSES)}")
    if isinstance(wrt, str) and wrt.startswith("input"):
        raise OptionError("ggn_vp is a parameter-space product: use wrt='params' or parameter names")
    loss_options(loss, class_dim, sigma)

    def assemble(src, b, key):
        sig = loss_options(loss, class_dim, sigma, src.output.meta["val"])
        A.input_placeholders(b, src)
        v = b.graph.placeholder("v")
        b.graph.placeholder("target", default_value=None)
        e = A.api_emitter(b)
        v = e(checks.check_shape, v, (src.P,), A.param_like(b, src), "v")
        tan = forward_tangents(b, A.param_seeds(e, src, e.method("unsqueeze", v, 0)))
        y = b.env[src.output]
        ty = tan.get(src.output, ZERO)
        if ty is ZERO:
            return (y, e(torch.zeros_like, v))
        flat = A.param_stack(b, e, src, {src.output: e(loss_hvp, y, ty, loss, class_dim, sig)}, 1,
                             A.param_like(b, src), ps=False)
        return (y, e.method("squeeze", flat, 0))

    return make_product(assemble, model, wrt, takes_target=True, summed=True, real_only="ggn_vp", **options)


def _split(batch, n_inputs: int, wants_target: bool):
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, Mapping):
        raise OptionError("accumulate takes batches that are tensors or tuples (the model's inputs, then the target);"
                          f" got a dict with keys {list(batch)}: map the loader to tuples first")
    batch = tuple(batch)
    inputs = batch[:n_inputs]
    target = batch[n_inputs] if wants_target and len(batch) > n_inputs else None
    return inputs, target


def _summed_over_the_batch(product, part) -> bool:
    """Whether a product's result is a parameter-space quantity summed over the batch: ``[P]``, ``[P, P]`` or
    square blocks, where a result with a batch axis is ``[B, ...]`` (reduce='none', input or output space).
    """
    shapes = getattr(product, "_fxjac_param_shapes", None)
    if not shapes:
        return False
    n = sum(math.prod(s) for _, s in shapes)
    if isinstance(part, (list, tuple)):
        return all(b.dim() == 2 and b.shape[0] == b.shape[1] for b in part)
    return tuple(part.shape) in ((n,), (n, n))


def _add(total, part):
    if total is None:
        return part
    pairs = list(zip(total, part)) if isinstance(part, (list, tuple)) else [(total, part)]
    return [a + b for a, b in pairs] if isinstance(part, (list, tuple)) else total + part


def accumulate(product, loader: Iterable, *operands, progress: Optional[bool] = None) -> Any:
    """Sum a parameter-space product (``reduce="sum"``) over every batch of ``loader``.

    Args:
        product: a product whose result is summed over the batch (a diagonal, blocks or full GGN, a vjp…).
        loader: an iterable of batches; a batch is a tensor or a tuple whose first elements are the model's
            inputs, the next (if any) the target for ``ggn`` products, the rest ignored.
        *operands: extra operands passed to every call after the inputs (e.g. ``v`` for ``ggn_vp``).
        progress: show a tqdm progress bar (default: when stderr is a terminal).

    Returns:
        The sum over all batches (a tensor, or a list for blocks). Under ``torch.distributed``, rank ``r`` takes
        batches ``r, r + W, r + 2W, …`` and the sums are all-reduced, equal to one process within rounding.
    """
    from tqdm import tqdm

    base = getattr(product, "product", product)  # a product through fxjac.compile: its own product's spec
    n_in = base._fxjac_spec.get("n_inputs") or 1
    wants_target = bool(base._fxjac_spec.get("takes_target"))
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    show = sys.stderr.isatty() if progress is None else progress
    wrong = OptionError("accumulate sums a parameter-space result that each call already sums over its batch (vjp, "
                        "jtmjp or ggn w.r.t. parameters with reduce='sum', or ggn_vp); this product's result is per "
                        "sample, in input or output space, or per column of an operand")
    if not base._fxjac_spec.get("summed"):
        raise wrong  # before a call, whose own TypeError (a missing operand) would hide this one
    total = None
    for i, batch in enumerate(tqdm(loader, disable=not show or rank != 0, desc="fxjac accumulate")):
        if i % world != rank:
            continue
        inputs, target = _split(batch, n_in, wants_target)
        kwargs = {"target": target} if target is not None and wants_target else {}
        part = product(*inputs, *operands, **kwargs)[1]
        if not _summed_over_the_batch(base, part):
            raise wrong
        total = _add(total, part)
    if total is None:
        raise ValueError("the loader gave this process no batch")
    if distributed:
        parts = total if isinstance(total, list) else [total]
        for t in parts:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return total


def linear_operator(model, loader: Iterable, loss: str = "cross_entropy", kind: str = "ggn", progress=False,
                    **options):
    """The dataset's GGN as a ``scipy.sparse.linalg.LinearOperator`` ``[P, P]`` (flat parameter layout): each
    matvec runs :func:`ggn_vp` over every batch of ``loader``, so eigsh, Lanczos or CG never see a matrix.

    Args:
        model: the model.
        loader: a re-iterable of batches (see :func:`accumulate`).
        loss: as in :func:`fxjac.ggn`.
        kind: ``"ggn"`` (the only kind so far).
        progress: a progress bar per matvec.
        **options: options of :func:`ggn_vp` (``wrt``, ``class_dim``, ``sigma``…).

    Returns:
        A LinearOperator in the dtype of the model's parameters (symmetric: ``rmatvec`` is ``matvec``).
    """
    from scipy.sparse.linalg import LinearOperator

    if kind != "ggn":
        raise OptionError(f"kind={kind!r}: only 'ggn' is available")
    p = ggn_vp(model, loss=loss, **options)
    named = dict(model.named_parameters())
    selected = [named[n] for n in p.wrt_names]
    dtype, device = selected[0].dtype, selected[0].device
    size = sum(q.numel() for q in selected)

    def matvec(v):
        t = torch.as_tensor(v.reshape(-1), dtype=dtype, device=device)
        return accumulate(p, loader, t, progress=progress).detach().cpu().numpy()

    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return LinearOperator((size, size), matvec=matvec, rmatvec=matvec, dtype=np_dtype)


"""Operand checks that generated products run first (plain Python on shapes, so torch.compile guards them)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import ShapeError


def _fail(name, t, expected, like):
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise ShapeError(f"{name} has dtype {t.dtype}, expected {like.dtype} (the model's)")
    if t.device != like.device:
        raise ShapeError(f"{name} is on {t.device}, but the model's tensors are on {like.device}")
    raise ShapeError(f"{name} has shape {tuple(t.shape)}, expected {expected}")


def _ok(t, like):
    return isinstance(t, torch.Tensor) and t.dtype == like.dtype and t.device == like.device


def check_like(t, like, name):
    """``t`` must have ``like``'s shape, dtype and device."""
    if not (_ok(t, like) and t.shape == like.shape):
        _fail(name, t, tuple(like.shape), like)
    return t


def check_shape(t, shape, like, name):
    """``t`` must have exactly ``shape`` (ints; -1 matches anything) and ``like``'s dtype and device."""
    shape = tuple(shape)
    if not (_ok(t, like) and t.dim() == len(shape) and all(s == -1 or s == d for s, d in zip(shape, t.shape))):
        _fail(name, t, tuple("K" if s == -1 else s for s in shape), like)
    return t


def check_symmetric(m, name):
    """A full metric must be symmetric (indefinite is fine). Under torch.compile the check is an assertion in the
    compiled graph, which raises a RuntimeError with the same message.
    """
    tol = 1e-6 if m.dtype == torch.float64 else 1e-3
    # each matrix against its own scale: one large sample must not hide another's asymmetry
    scale = m.abs().amax((-2, -1)).clamp_min(1e-30)
    bad = ((m - m.transpose(-1, -2)).abs().amax((-2, -1)) > tol * scale).any()
    if torch.compiler.is_compiling():  # a branch on values breaks the graph: a run-time assertion instead
        torch._assert_async(~bad, f"{name} must be symmetric")
    elif bad:
        raise ShapeError(f"{name} must be symmetric")
    return m


def check_blocks(m, sizes, like, name):
    """A block-diagonal metric: a list of one symmetric ``[n, n]`` block per module, ``n`` in ``sizes``."""
    if not isinstance(m, (list, tuple)) or len(m) != len(sizes):
        got = f"{len(m)} blocks" if isinstance(m, (list, tuple)) else f"a {type(m).__name__}"
        raise ShapeError(f"{name} must be a list of {len(sizes)} blocks (one per module owning selected "
                         f"parameters, sizes {list(sizes)}), got {got}")
    return [check_symmetric(check_shape(b, (n, n), like, f"{name}[{i}]"), f"{name}[{i}]")
            for i, (b, n) in enumerate(zip(m, sizes))]


def nested_layout(v) -> tuple:
    """A tuple, list or dict input's layout for :func:`check_nested`: a dict's keys in order and a sequence's
    length, at any depth, and each tensor's sample shape (the container types are free: a DataLoader makes lists).
    """
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape[1:]) if v.dim() > 0 else None)
    if isinstance(v, Mapping):
        return ("keys", tuple(v.keys()), tuple(nested_layout(a) for a in v.values()))
    if isinstance(v, (list, tuple)):
        return ("entries", len(v), tuple(nested_layout(a) for a in v))
    if hasattr(v, "__dict__") and not isinstance(v, (type, torch.nn.Module)):  # a dataclass, an object
        held = {k: nested_layout(a) for k, a in vars(v).items()}
        held = {k: a for k, a in held.items() if a[0] != "other"}
        if held:
            return ("attributes", tuple(held), tuple(held.values()))
    return ("other",)


@torch.fx.node.has_side_effect  # (kept where the model reads no entry: built for {}, called with {"mask": m})
def check_nested(x, layout, name):
    """A tuple, list or dict input keeps the keys, lengths and per-sample shapes the product was built for
    (``layout`` from :func:`nested_layout`): a loop over its entries and ``**batch`` are unrolled for them, and its
    sizes but the batch's are numbers of the product (Note [sizes while tracing] in fxjac/tracing.py).
    """
    _check_layout(x, layout, name)
    return x


def _check_layout(x, layout, where: str) -> None:
    kind = layout[0]
    if kind == "tensor":
        if layout[1] is not None and isinstance(x, torch.Tensor) and (x.dim() == 0 or tuple(x.shape[1:]) != layout[1]):
            raise ShapeError(f"{where} has shape {tuple(x.shape)}; this product was built for [B, "
                             f"{', '.join(map(str, layout[1]))}] (build another product for other sample shapes)")
    elif kind == "keys":
        if not isinstance(x, Mapping) or tuple(x.keys()) != layout[1]:
            raise ShapeError(f"{where} is {_outline(x)}; this product was built for a dict with keys "
                             f"{list(layout[1])}, in this order (a loop over them and **batch are unrolled into the "
                             "product): build another product for it")
        for key, sub in zip(layout[1], layout[2]):
            _check_layout(x[key], sub, f"{where}[{key!r}]")
    elif kind == "attributes":
        for key, sub in zip(layout[1], layout[2]):
            if hasattr(x, key):
                _check_layout(getattr(x, key), sub, f"{where}.{key}")
    elif kind == "entries":
        if not isinstance(x, (list, tuple)) or len(x) != layout[1]:
            raise ShapeError(f"{where} is {_outline(x)}; this product was built for {layout[1]} entries (a loop over "
                             "them is unrolled into the product): build another product for it")
        for i, sub in enumerate(layout[2]):
            _check_layout(x[i], sub, f"{where}[{i}]")


def _outline(x) -> str:
    if isinstance(x, Mapping):
        return f"a dict with keys {list(x)}"
    return f"a {type(x).__name__} of {len(x)} entries" if isinstance(x, (tuple, list)) else f"a {type(x).__name__}"


def check_input(x, sample_shape, name, first=None, dtype=None, integer=False):
    """A model input must keep the per-sample shape and the floating dtype (``dtype``, None for other inputs) the
    product was built for, or be of an integer dtype where it was built for one (``integer``: token ids); the batch
    is free, but the same for every input (``first``: the first tensor input, for the others).
    """
    if isinstance(x, torch.Tensor) and (tuple(x.shape[1:]) != tuple(sample_shape) or x.dim() == 0):
        raise ShapeError(f"{name} has shape {tuple(x.shape)}; this product was built for [B, "
                         f"{', '.join(map(str, sample_shape))}] (build another product for other sample shapes)")
    if dtype is not None and isinstance(x, torch.Tensor) and x.dtype != dtype:
        raise ShapeError(f"{name} is {x.dtype}; this product was built for {dtype} inputs (cast the input, or build "
                         "another product for this dtype)")
    if integer and isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
        raise ShapeError(f"{name} is {x.dtype}; this product was built for integer inputs (ids, indices): cast "
                         "it (x.long())")
    if isinstance(first, torch.Tensor) and isinstance(x, torch.Tensor) and x.shape[0] != first.shape[0]:
        raise ShapeError(f"{name} has a batch of {x.shape[0]} and input 0 of {first.shape[0]}: dim 0 of every "
                         "input is the batch")
    return x

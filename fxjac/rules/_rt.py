"""Small run-time helpers that generated product code calls (plain tensor ops, so torch.compile traces them).

Stacks follow Note [stacked columns] in ``passes/protocol.py``: one leading column axis ``K``.
"""

from __future__ import annotations

import torch


def align(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Insert unit axes after the column axis so a stack of a rank-r value lines up with a rank-``ndim`` one."""
    missing = ndim - (t.dim() - 1)
    if missing <= 0:
        return t
    return t.reshape((t.shape[0],) + (1,) * missing + tuple(t.shape[1:]))


def align_ps(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Line up a per-sample stack ``[K, B, *s]`` of an unbatched value with a batched rank-``ndim`` value."""
    s = tuple(t.shape[2:])
    if len(s) == ndim:  # the unbatched value has a leading unit axis where the output has the batch
        s = s[1:]
    missing = ndim - 1 - len(s)
    return t.reshape(tuple(t.shape[:2]) + (1,) * missing + s)


def sum_to(ct: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reduce a stack ``[K, *out]`` to ``[K, *like.shape]`` (the transpose of broadcasting)."""
    shape = tuple(like.shape) if isinstance(like, torch.Tensor) else ()
    if tuple(ct.shape[1:]) == shape:
        return ct
    lead = ct.dim() - 1 - len(shape)
    target = (ct.shape[0],) + (1,) * lead + shape
    return ct.sum_to_size(target).reshape((ct.shape[0],) + shape)


def sum_to_ps(ct: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reduce a stack ``[K, B, *out]`` to per-sample ``[K, B, *like.shape]`` for an unbatched ``like``."""
    shape = tuple(like.shape) if isinstance(like, torch.Tensor) else ()
    tail = shape[1:] if len(shape) == ct.dim() - 1 else shape
    lead = ct.dim() - 2 - len(tail)
    target = tuple(ct.shape[:2]) + (1,) * lead + tail
    return ct.sum_to_size(target).reshape(tuple(ct.shape[:2]) + shape)


def shift_dim(dim, ndim: int):
    """A primal axis index (int, tuple or None) as an index into its stack: non-negative axes move by one."""
    if dim is None:
        return None
    if isinstance(dim, (tuple, list)):
        return type(dim)(shift_dim(d, ndim) for d in dim)
    return dim + 1 if dim >= 0 else dim


def reshape_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a stack to ``[K, *like.shape]``."""
    return t.reshape((t.shape[0],) + tuple(like.shape))


def expand_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Expand a (possibly lower-rank) stack to ``[K, *like.shape]``."""
    t = align(t, like.dim())
    return t.expand((t.shape[0],) + tuple(like.shape))


def one_column(parts, mask) -> tuple:
    """The results of an ATen backward kernel run on one column, as stacks ``[1, *]`` (``None`` where ``mask``
    did not ask for them): the fused single-column paths of the convolution and normalisation rules.
    """
    return tuple(p.unsqueeze(0) if m else None for p, m in zip(parts, mask))


def records_grad(*tensors) -> bool:
    """Whether autograd records an op on these (a ``differentiable=True`` product): kernels without a double
    backward must not be used then.
    """
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

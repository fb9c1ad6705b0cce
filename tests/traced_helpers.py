"""A user's helper module for tests/test_robustness.py: a tensor factory sized by the input, outside forward, and
a module using one in its own forward (the usual layout: blocks in one file, the net in another)."""

import functools

import torch
import torch.nn as nn


def causal_mask(x):
    """``[T, T]``: True above the diagonal, for ``x`` ``[B, T, d]``."""
    t = x.shape[1]
    return torch.triu(torch.ones(t, t, dtype=torch.bool), 1)


class CausalBlock(nn.Module):
    """Causal self-attention whose mask is made in this file's forward from the input's length."""

    def __init__(self, d=4):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.qkv(x).chunk(3, -1)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        return (q @ k.transpose(1, 2)).masked_fill(mask, float("-inf")).softmax(-1) @ v


def logged(forward):
    """A decorator in another file than the forward it wraps (Hugging Face's ``can_return_tuple``)."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    return wrapper


class CheckedBlock(nn.Module):
    """A library-style block whose forward checks its input's type (torch_geometric's MessagePassing)."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise ValueError("x must be a tensor")
        return self.lin(x)

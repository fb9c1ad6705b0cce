"""A user's helper module for tests/test_robustness.py: a tensor factory sized by the input, outside forward."""

import torch


def causal_mask(x):
    """``[T, T]``: True above the diagonal, for ``x`` ``[B, T, d]``."""
    t = x.shape[1]
    return torch.triu(torch.ones(t, t, dtype=torch.bool), 1)

"""Traceable forwards for torch.nn built-ins whose own forward torch.fx cannot trace into.

BatchNorm and InstanceNorm check the input's rank with Python comparisons on tensor sizes, which a symbolic
trace cannot evaluate. These decompositions are the same computation without the checks, so the functional
calls (``F.batch_norm``…) reach their structured rules. Attention modules are decomposed in
``fxjac/rules/attention.py``.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .tracing import decomposes


@decomposes(nn.modules.batchnorm._BatchNorm)
def batch_norm_module(m: nn.Module, input):
    """``_BatchNorm.forward`` without the rank check (training mode is refused later, so no stat update)."""
    bn_training = m.training or (m.running_mean is None and m.running_var is None)
    use_buffers = not m.training or m.track_running_stats
    return F.batch_norm(input, m.running_mean if use_buffers else None, m.running_var if use_buffers else None,
                        m.weight, m.bias, bn_training, 0.0 if m.momentum is None else m.momentum, m.eps)


@decomposes(nn.modules.instancenorm._InstanceNorm)
def instance_norm_module(m: nn.Module, input):
    """``_InstanceNorm.forward`` for batched input without the rank and size checks."""
    return F.instance_norm(input, m.running_mean, m.running_var, m.weight, m.bias,
                           m.training or not m.track_running_stats, m.momentum if m.momentum is not None else 0.0,
                           m.eps)

"""Shape propagation: run the primal graph once on example inputs and record every value's shape.

Each node gets ``node.meta["val"]``: a tensor on the ``meta`` device (shape, dtype, rank; no data) for tensor
values, the same structure for tuples and lists of tensors, and the Python value itself for everything else
(sizes, ints, dtypes). Rules read ranks and static sizes there; they never run tensors.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map


def _to_meta(v):
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
    return v


class _Recorder(fx.Interpreter):
    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        n.meta["val"] = tree_map(_to_meta, out)
        return out


def propagate_shapes(gm: fx.GraphModule, *example_inputs) -> object:
    """Run ``gm`` on ``example_inputs``, storing each node's value as ``node.meta["val"]``; returns the output."""
    with torch.no_grad():
        return _Recorder(gm).run(*example_inputs)

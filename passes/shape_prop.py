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


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.shapes = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.shapes[n] = tree_map(lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else None, out)
        return out


def _one_more(x):
    """The example input with one more sample (a copy of its first, or zeros for an empty batch)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    extra = x[:1] if x.shape[0] else torch.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, extra])


def _batch_dim(a, b):
    if isinstance(a, tuple) and isinstance(b, tuple) and all(isinstance(s, int) for s in a + b):
        if len(a) != len(b):
            return None
        diff = [i for i, (s, t) in enumerate(zip(a, b)) if s != t]
        return diff[0] if diff else None
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return tuple(_batch_dim(x, y) for x, y in zip(a, b))
    return None


def propagate_batch_dims(gm: fx.GraphModule, *example_inputs) -> bool:
    """Find which axis of every value is the batch: run again with one more sample and compare the shapes.

    Stores ``node.meta["batch_dim"]``: the axis (an int), ``None`` for values without one (parameters, sizes,
    constants), or a tuple of those for tuple values. Returns False (storing nothing) when the model cannot run
    on a batch one larger (it hard-codes its batch size), so callers fall back to "the batch is axis 0".
    """
    rec = _ShapeRecorder(gm)
    try:
        with torch.no_grad():
            rec.run(*[_one_more(x) for x in example_inputs])
    except Exception:  # noqa: BLE001 - any failure means: no second run, keep the conservative default
        return False
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n in rec.shapes and val is not None:
            first = tree_map(lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else None, val)
            n.meta["batch_dim"] = _batch_dim(first, rec.shapes[n])
    return True

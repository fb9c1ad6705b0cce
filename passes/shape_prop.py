"""Shape propagation: run the primal graph once on example inputs and record every value's shape.

Each node gets ``node.meta["val"]``: a tensor on the ``meta`` device (shape, dtype, rank; no data) for tensor
values, the same structure for tuples and lists of tensors, and the Python value itself for everything else
(sizes, ints, dtypes). Rules read ranks and static sizes there; they never run tensors.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten


def _to_meta(v):
    if isinstance(v, torch.Tensor):
        if v.layout != torch.strided:  # a sparse value keeps its layout (rules multiply it otherwise)
            return torch.empty(v.shape, dtype=v.dtype, device="meta", layout=v.layout)
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


_SELECTING = {torch.nonzero, torch.argwhere, torch.masked_select, torch.repeat_interleave, torch.unique,
              torch.unique_consecutive, "nonzero", "argwhere", "masked_select", "repeat_interleave", "unique",
              "unique_consecutive"}


def _selects_by_values(n: fx.Node) -> bool:
    """Whether ``n`` may size its output by the values it reads: ``nonzero`` and its kin, ``torch.where(cond)``,
    indexing by a boolean mask (``meta["val"]`` tells a mask from integer indices).
    """
    if n.op not in ("call_function", "call_method"):
        return False
    if n.target in _SELECTING or n.target is torch.where and len(n.args) + len(n.kwargs) == 1:
        return True
    if n.target is operator.getitem and len(n.args) == 2:
        index = n.args[1] if isinstance(n.args[1], (tuple, list)) else (n.args[1],)
        return any(isinstance(i, fx.Node) and isinstance(i.meta.get("val"), torch.Tensor)
                   and i.meta["val"].dtype in (torch.bool, torch.uint8) for i in index)
    return False


class _SizedByValues(TorchDispatchMode):
    """Makes each op whose output size depends on the values of a batched mask or count it reads (``nonzero``,
    also under ``torch.where(cond)`` and ``argwhere``; ``masked_select``; indexing by a boolean mask;
    ``repeat_interleave`` by tensor counts) select one entry more, or, where every entry is selected, one fewer:
    the same change for the same mask wherever it is read, so the model still runs and the values sized by them
    change shape. A mask that is no batch value (a buffer, a parameter's sign) is left alone: what it selects has
    the same size for every batch.
    """

    def __init__(self):
        super().__init__()
        self.batched: dict = {}  # id -> the values of batched nodes (kept alive, so ids stay theirs)

    def note(self, value) -> None:
        if isinstance(value, torch.Tensor):
            self.batched[id(value)] = value

    def _driven(self, t) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.batched

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet is aten.nonzero and self._driven(args[0]):
            args = (self._toggle(args[0]),) + tuple(args[1:])
        elif packet is aten.masked_select and self._driven(args[1]):
            x, mask = args[:2]
            args = (x, self._toggle(mask.expand(torch.broadcast_shapes(x.shape, mask.shape)))) + tuple(args[2:])
        elif packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and any(
                self._driven(i) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            indices = [self._toggle(i) if self._driven(i) and i.dtype in (torch.bool, torch.uint8) else i
                       for i in args[1]]
            args = (args[0], indices) + tuple(args[2:])
        elif func is aten.repeat_interleave.Tensor and self._driven(args[0]):
            args = (self._toggle(args[0], count=True),) + tuple(args[1:])
        return func(*args, **kwargs)

    @staticmethod
    def _toggle(t: torch.Tensor, count: bool = False) -> torch.Tensor:
        if t.numel() == 0:
            return t
        flat = t.reshape(-1).clone()
        if count:
            flat[0] += 1
        else:
            off = (flat == 0).nonzero()
            flat[int(off[0]) if off.numel() else 0] = 1 if off.numel() else 0
        return flat.view(t.shape)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph on one more sample (a copy of sample 0) and records each value's shape, and where an axis
    grew by several rows, whether the new sample's rows were appended as a block (sample-major) or interleaved.
    """

    def __init__(self, gm, batch: int, sized: _SizedByValues | None = None):
        super().__init__(gm)
        self.batch = batch
        self.sized = sized
        self.shapes = {}
        self.sample_major = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if self.sized is not None and isinstance(n.meta.get("batch_dim"), int):
            self.sized.note(out)
        self.shapes[n] = tree_map(lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else None, out)
        val = n.meta.get("val")
        if isinstance(out, torch.Tensor) and isinstance(val, torch.Tensor) and out.dim() == val.dim():
            grown = [(i, b - a) for i, (a, b) in enumerate(zip(val.shape, out.shape)) if a != b]
            if len(grown) == 1 and grown[0][1] > 1 and self.batch:
                axis, rows = grown[0]
                self.sample_major[n] = _appended_as_block(out.movedim(axis, 0), self.batch, rows)
                if self.sample_major[n] is None:
                    self.sample_major[n] = self._inherited(n, tuple(out.shape))
        return out

    def _inherited(self, n: fx.Node, shape: tuple):
        """The layout of the inputs of ``n`` shaped as its value is, where they agree: for a value whose entries
        cannot tell (all zeros: a batch norm whose weight starts at zero, on a merged batch).
        """
        known = {self.sample_major.get(a) for a in n.all_input_nodes if self.shapes.get(a) == shape}
        known.discard(None)
        return known.pop() if len(known) == 1 else None


def _appended_as_block(v, batch, rows):
    """For ``v`` with ``(batch + 1)·rows`` leading rows whose last sample copies sample 0: True if the copy's rows
    came last (sample-major), False if each of the ``rows`` groups ends with it (sample-minor), None if the values
    cannot tell.

    The copy's rows equal sample 0's up to rounding only: a GEMM over more rows may block them differently and
    round in another order (MKL on an AVX-512 CPU: 2e-16 apart in float64). Rows of another sample differ by the
    values' own size.
    """
    if v.shape[0] != (batch + 1) * rows:
        return None  # not ``rows`` per sample (rows picked by the values: see _mark_sized_by_values)
    v = v.detach()
    if v.is_complex():
        v = torch.view_as_real(v)
    elif not v.is_floating_point():
        v = v.double()
    tol = 64 * torch.finfo(v.dtype).eps
    atol = tol * float(v.abs().nan_to_num(0.0, 0.0, 0.0).max()) if v.numel() else 0.0

    def same(a, b):
        return bool(torch.allclose(a, b, rtol=tol, atol=atol, equal_nan=True))

    block = same(v[batch * rows:], v[:rows])
    groups = v.unflatten(0, (rows, batch + 1))
    interleaved = same(groups[:, batch], groups[:, 0])
    return block if block != interleaved else None


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


def propagate_batch_dims(gm: fx.GraphModule, *example_inputs):
    """Find which axis of every value is the batch: run again with one more sample and compare the shapes.

    Stores ``node.meta["batch_dim"]``: the axis (an int), ``None`` for values without one (parameters, sizes,
    constants), or a tuple of those for tuple values; and ``node.meta["batch_factor"]`` where that axis holds
    several rows per sample (Note [merged batch] in passes/builder.py). Returns the graph's output on the grown
    batch, or None (storing nothing) when the model cannot run on a batch one larger (it hard-codes its batch
    size), so callers fall back to "the batch is axis 0".
    """
    rec = _ShapeRecorder(gm, batch_size_of(example_inputs))
    try:
        with torch.no_grad():
            grown_output = rec.run(*[_one_more(x) for x in example_inputs])
    except Exception:  # noqa: BLE001 - any failure means: no second run, keep the conservative default
        return None
    batch = batch_size_of(example_inputs)
    from_batch = set()  # floating values computed from a batched one
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n in rec.shapes and val is not None:
            first = tree_map(lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else None, val)
            n.meta["batch_dim"] = _batch_dim(first, rec.shapes[n])
            bd = n.meta["batch_dim"]
            if isinstance(bd, int) and isinstance(first, tuple):
                # Rows per sample along the batch axis: more than one where the batch was merged with another
                # axis (``x.view(-1, d)`` on ``[B, T, d]``: B·T rows, T per sample).
                grown = rec.shapes[n][bd] - first[bd]
                if grown > 1 and first[bd] == grown * batch:
                    n.meta["batch_factor"] = grown
                    n.meta["sample_major"] = rec.sample_major.get(n)
                if first[bd] != grown * batch:
                    n.meta["part_of_batch"] = True  # h[1:]: not every sample's rows
        if isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex()) and any(
                a in from_batch or isinstance(a.meta.get("batch_dim"), int) for a in n.all_input_nodes
                if isinstance(a.meta.get("val"), torch.Tensor)):
            from_batch.add(n)
    unbatched = [n for n in from_batch if n.meta.get("batch_dim", 0) is None]
    if unbatched:
        for n in _moving(gm, example_inputs, unbatched):
            n.meta["part_of_batch"] = True  # h[:1]: samples' values without their batch axis
    selecting = [n for n in gm.graph.nodes if _selects_by_values(n)
                 and any(isinstance(a.meta.get("batch_dim"), int) for a in n.all_input_nodes)]
    if selecting:
        _mark_sized_by_values(gm, example_inputs, selecting)
    return grown_output


def _mark_sized_by_values(gm: fx.GraphModule, example_inputs, nodes: list) -> None:
    """Store ``node.meta["data_sized"]``: the axes whose length depends on the values the model reads (rows
    picked by ``nonzero`` or a boolean mask: routed tokens, selected entries), found by running again with each
    such selection one entry larger; ``"unknown"`` for every value after such an op where that run fails.

    A batch axis among them has no fixed number of rows per sample (Note [merged batch] in passes/builder.py):
    what the example inputs route is no promise for the next batch. A value selected from the batch where the
    copy of sample 0 added nothing (it selected no entry) gets that axis as its batch axis.
    """
    sized = _SizedByValues()
    rec = _ShapeRecorder(gm, 0, sized)
    try:
        with torch.no_grad(), sized:
            rec.run(*example_inputs)
    except Exception:  # noqa: BLE001 - the changed selection broke the model: every value after it may depend
        after = set(nodes)
        for n in gm.graph.nodes:
            if n in after or any(a in after for a in n.all_input_nodes):
                after.add(n)
                n.meta["data_sized"] = "unknown"
        return
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n not in rec.shapes or not isinstance(val, torch.Tensor) or not isinstance(rec.shapes[n], tuple):
            continue
        now = rec.shapes[n]
        if len(now) != val.dim():
            n.meta["data_sized"] = "unknown"
        elif now != tuple(val.shape):
            n.meta["data_sized"] = tuple(i for i, (a, b) in enumerate(zip(val.shape, now)) if a != b)
        axes = n.meta.get("data_sized")
        if isinstance(axes, tuple) and len(axes) == 1 and "batch_dim" in n.meta and n.meta["batch_dim"] is None \
                and any(isinstance(a.meta.get("batch_dim"), int) for a in n.all_input_nodes):
            n.meta["batch_dim"] = axes[0]  # entries of every sample (``h[h > t]``) where sample 0 had none


class _Values(fx.Interpreter):
    """Runs the graph and keeps the values of the nodes asked for."""

    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.values = set(wanted), {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def _moving(gm: fx.GraphModule, example_inputs, nodes: list) -> list:
    """Those of ``nodes`` whose values change with the inputs' values (``x[:1]``), found by running again on
    other values: a value made from the batch only through its dtype or shape (``p.type_as(h)``,
    ``torch.ones_like(h[0])``) does not move.
    """
    def other(x):
        return x * 0.75 + 0.125 if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()) else x

    try:
        with torch.no_grad():
            before, after = _Values(gm, nodes), _Values(gm, nodes)
            before.run(*example_inputs)
            after.run(*[other(x) for x in example_inputs])
    except Exception:  # noqa: BLE001 - the model fails on other values: keep the conservative answer
        return list(nodes)
    moved = []
    for n in nodes:
        a, b = before.values.get(n), after.values.get(n)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (
                a.shape != b.shape or not torch.equal(a.nan_to_num(), b.nan_to_num())):
            moved.append(n)
    return moved


def batch_size_of(example_inputs) -> int:
    """The batch size: the first axis of the first input with one (0 when no input has an axis)."""
    first = next((x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    return first.shape[0] if first is not None else 0

"""Shape ops: views, permutations (rolls, channel shuffles), broadcasts, repeats, concatenation, splitting, indexing,
padding and masks.

All are linear with 0/1 entries, so each gives its action on a stack and its adjoint; the diagonal rule is the
adjoint itself. Axes are shifted by one for the column axis (Note [stacked columns]); sizes come from the primal
values at run time, so a changing batch size needs no new graph.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from passes.protocol import ZERO, Decline, Rule

from ..tracing import setitem, straight_through
from . import _rt
from .base import LinearOp
from .registry import register

_aten = torch.ops.aten

# --- kernels ---------------------------------------------------------------------------------------------


def unreduce(ct, like, dim, keepdim):
    """Broadcast a reduction's stack ``[K, *out]`` back to ``[K, *like.shape]`` (the adjoint of ``sum``)."""
    if dim is None or dim == ():
        return ct.reshape((ct.shape[0],) + (1,) * like.dim()).expand((ct.shape[0],) + tuple(like.shape))
    if not keepdim:
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = sorted(d % like.dim() for d in dims)
        for d in dims:
            ct = ct.unsqueeze(d + 1)
    return ct.expand((ct.shape[0],) + tuple(like.shape))


def stack_sum(t, dim, keepdim):
    """``sum`` of a stack over primal axes ``dim`` (None: all axes)."""
    if dim is None or dim == ():
        out = t.reshape(t.shape[0], -1).sum(1)
        return out.reshape((t.shape[0],) + (1,) * (t.dim() - 1)) if keepdim else out
    return t.sum(_rt.shift_dim(dim, t.dim() - 1), keepdim=keepdim)


def _sum_copies(ct, shape, sizes):
    """A stack ``[N, *out]`` of ``x.repeat(*sizes)`` for ``x`` of (rank-padded) ``shape``, its copies summed."""
    if not sizes:  # (``sum`` over no axes would sum over all of them)
        return ct
    split = [ct.shape[0]]
    for r, s in zip(sizes, shape):
        split += [r, s]
    return ct.reshape(split).sum(tuple(range(1, 2 * len(sizes), 2)))


def repeat_transpose(ct, like, sizes):
    """Adjoint of ``x.repeat(*sizes)``: sum the copies back onto ``[K, *like.shape]``."""
    shape = (1,) * (len(sizes) - like.dim()) + tuple(like.shape)
    return _sum_copies(ct, shape, sizes).reshape((ct.shape[0],) + tuple(like.shape))


def repeat_transpose_ps(ct, like, sizes):
    """Per-sample adjoint of ``x.repeat(*sizes)`` for an unbatched ``x`` copied once per sample along the batch
    axis (a class token, ``cls.repeat(B, 1, 1)``): ``[K, B, *out[1:]]``, each sample's row summed over the other
    axes' copies, onto ``[K, B, *like.shape]``.
    """
    k, b = ct.shape[:2]
    shape = (1,) * (len(sizes) - like.dim()) + tuple(like.shape)
    rows = ct.reshape((k * b,) + tuple(ct.shape[2:]))
    return _sum_copies(rows, shape[1:], sizes[1:]).reshape((k, b) + tuple(like.shape))


def repeat_tangent_ps(t, sizes):
    """``x.repeat(*sizes)`` on per-sample stacks ``[K, B, *x.shape]`` of an unbatched ``x`` copied once per sample
    along the batch axis: each sample's tangent is its row, copied along the other axes: ``[K, B, *out[1:]]``.
    """
    rows = _rt.align_ps(t, len(sizes))  # [K, B, *x.shape[1:]] lined up with the output's other axes
    return rows.repeat(1, 1, *sizes[1:])


def _cat_rank(xs) -> int:
    """The rank of ``cat``'s pieces: ``torch.cat`` skips a 1-D empty piece (``torch.tensor([])``, an empty cache
    that later calls fill) among pieces of another rank.
    """
    return next((x.dim() for x in xs if not _skipped_by_cat(x)), xs[0].dim())


def _skipped_by_cat(x) -> bool:
    return x.dim() == 1 and x.shape[0] == 0


def cat_tangent(tangents, xs, dim):
    """``cat`` of tangent stacks, zeros standing in where an input has none."""
    nd = _cat_rank(xs)
    k = next(t.shape[0] for t in tangents if t is not None)
    parts = [t if t is not None else x.new_zeros((k,) + tuple(x.shape)) for t, x in zip(tangents, xs)
             if x.dim() == nd or not _skipped_by_cat(x)]
    return torch.cat(parts, _rt.shift_dim(dim, nd))


def cat_transpose(ct, xs, dim):
    """Adjoint of ``cat``: the cotangent stack split into the inputs' pieces along ``dim`` (an empty stack for a
    piece ``cat`` skipped).
    """
    nd = _cat_rank(xs)
    kept = [x.dim() == nd or not _skipped_by_cat(x) for x in xs]
    pieces = iter(torch.split(ct, [x.shape[dim] if x.dim() > 0 else 0 for x, k in zip(xs, kept) if k],
                              _rt.shift_dim(dim, nd)))
    return [next(pieces) if k else ct.new_zeros((ct.shape[0], 0)) for k in kept]


def stack_tangent(tangents, xs, dim):
    """``stack`` of tangent stacks, zeros standing in where an input has none."""
    k = next(t.shape[0] for t in tangents if t is not None)
    parts = [t if t is not None else x.new_zeros((k,) + tuple(x.shape)) for t, x in zip(tangents, xs)]
    d = dim if dim >= 0 else dim + xs[0].dim() + 1
    return torch.stack(parts, d + 1)


def stack_transpose(ct, dim, ndim):
    """Adjoint of ``stack``: the cotangent stack unbound along ``dim``."""
    d = dim if dim >= 0 else dim + ndim + 1
    return list(torch.unbind(ct, d + 1))


def pieces_transpose(cts, outs, dim):
    """Adjoint of ``chunk``/``split``: the pieces' cotangent stacks concatenated (zeros for missing ones)."""
    k = next(c.shape[0] for c in cts if c is not None)
    parts = [c if c is not None else o.new_zeros((k,) + tuple(o.shape)) for c, o in zip(cts, outs)]
    return torch.cat(parts, _rt.shift_dim(dim, outs[0].dim()))


def _index_of(idx):
    return idx if isinstance(idx, tuple) else (idx,)


def getitem_tangent(t, idx):
    """``x[idx]`` applied to a stack: a full slice for the column axis first."""
    return t[(slice(None),) + _index_of(idx)]


def _integers(i) -> bool:
    """Whether ``i`` is a (nested) list or tuple of Python integers: an advanced index, as a tensor would be."""
    if isinstance(i, (list, tuple)):
        return all(_integers(j) for j in i)
    return isinstance(i, int) and not isinstance(i, bool)


def getitem_transpose(ct, like, idx):
    """Adjoint of ``x[idx]``: scatter-add the cotangent stack into zeros shaped like ``[K, *x]`` (an index that
    repeats an entry, ``x[:, [0, 2, 2]]``, adds the cotangents of its copies).
    """
    out = ct.new_zeros((ct.shape[0],) + tuple(like.shape))
    index = tuple(torch.tensor(i, device=ct.device) if isinstance(i, (list, tuple)) and i and _integers(i) else i
                  for i in _index_of(idx))
    full = (slice(None),) + index
    if any(isinstance(i, torch.Tensor) and i.dtype != torch.bool for i in index):
        return out.index_put(_as_indices(out, full), ct, accumulate=True)
    out[full] = ct
    return out


def rows_tangent_ps(t, idx):
    """Per-sample ``table[idx]`` for an unbatched ``table`` with a per-sample tangent stack ``t`` ``[K, B,
    *table.shape]`` and a batched integer ``idx`` ``[B, *s]``: each sample's rows of its own tangent, ``[K, B, *s,
    *row]``.
    """
    b = t.shape[1]
    rows = idx.reshape(b, -1)
    picked = t[:, torch.arange(b, device=t.device).unsqueeze(1), rows]  # [K, B, n, *row]
    return picked.reshape(tuple(t.shape[:2]) + tuple(idx.shape[1:]) + tuple(t.shape[3:]))


def rows_transpose_ps(ct, like, idx):
    """Per-sample adjoint of ``table[idx]`` for an unbatched ``table`` and a batched integer ``idx`` ``[B, *s]`` (an
    embedding written as indexing): ``[K, B, *s, *row]`` scatter-added into each sample's ``[K, B, *table.shape]``.
    """
    k, b = ct.shape[:2]
    rows = idx.reshape(b, -1)
    n = rows.shape[1]
    out = ct.new_zeros((k, b) + tuple(like.shape))
    kk = torch.arange(k, device=ct.device).view(k, 1, 1).expand(k, b, n)
    bb = torch.arange(b, device=ct.device).view(1, b, 1).expand(k, b, n)
    out.index_put_((kk, bb, rows.unsqueeze(0).expand(k, b, n)), ct.reshape((k, b, n) + tuple(like.shape[1:])),
                   accumulate=True)
    return out


def _as_indices(out, full):
    """Turn a (slice, …, integer tensor) index into explicit broadcast index tensors for ``index_put``."""
    view = torch.arange(out.numel(), device=out.device).reshape(out.shape)[full]
    flat = []
    rem = view
    for size in reversed(out.shape):
        flat.append(rem % size)
        rem = rem // size
    return tuple(reversed(flat))


def permute_tangent(t, dims):
    """``permute`` of a stack (primal ``dims``)."""
    n = t.dim() - 1
    return t.permute((0,) + tuple(d % n + 1 for d in dims))


def permute_transpose(ct, dims):
    """Adjoint of ``permute``: the inverse permutation."""
    n = ct.dim() - 1
    inv = [0] * n
    for i, d in enumerate(dims):
        inv[d % n] = i
    return ct.permute((0,) + tuple(i + 1 for i in inv))


_PAD_BACKWARD = {("reflect", 1): _aten.reflection_pad1d_backward, ("reflect", 2): _aten.reflection_pad2d_backward,
                 ("reflect", 3): _aten.reflection_pad3d_backward, ("replicate", 1): _aten.replication_pad1d_backward,
                 ("replicate", 2): _aten.replication_pad2d_backward,
                 ("replicate", 3): _aten.replication_pad3d_backward}


def pad_tangent(t, pad, mode):
    """``pad(x, pad, mode)`` (reflect, replicate, circular) on a stack: its leading axes merged into a batch of one
    channel, the layout every mode takes.
    """
    n = len(pad) // 2
    out = F.pad(t.reshape((-1, 1) + tuple(t.shape[t.dim() - n:])), pad, mode=mode)
    return out.reshape(tuple(t.shape[:t.dim() - n]) + tuple(out.shape[2:]))


def pad_transpose(ct, like, pad, mode):
    """Adjoint of a reflect, replicate or circular ``pad``: each copied entry added back onto its source, by ATen's
    backward kernel (whose input is read for its shape only) or, for circular, an ``index_add`` per padded axis.
    """
    n = len(pad) // 2
    g = ct.reshape((-1, 1) + tuple(ct.shape[ct.dim() - n:]))
    spatial = tuple(like.shape[like.dim() - n:])
    if mode == "circular":
        for i in range(n):
            d, size, left, right = g.dim() - 1 - i, spatial[n - 1 - i], pad[2 * i], pad[2 * i + 1]
            start = max(-left, 0)  # negative pads crop first; the padding wraps around the entries kept
            kept = size - start - max(-right, 0)
            idx = start + torch.arange(-max(left, 0), kept + max(right, 0), device=g.device) % kept
            g = g.new_zeros(tuple(g.shape[:d]) + (size,) + tuple(g.shape[d + 1:])).index_add(d, idx, g)
    else:
        g = _PAD_BACKWARD[mode, n](g, g.new_zeros(()).expand(tuple(g.shape[:2]) + spatial), pad)
    return g.reshape((ct.shape[0],) + tuple(like.shape))


def repeat_interleave_tangent(t, repeats, dim):
    """``x.repeat_interleave(repeats, dim)`` on a stack (``dim=None``: of the flattened value)."""
    if dim is None:
        return t.flatten(1).repeat_interleave(repeats, 1)
    return t.repeat_interleave(repeats, dim % (t.dim() - 1) + 1)


def repeat_interleave_transpose(ct, like, repeats, dim):
    """Adjoint of ``x.repeat_interleave(repeats, dim)``: each entry's consecutive copies summed back onto it."""
    shape = (like.numel(),) if dim is None else tuple(like.shape)
    d = 0 if dim is None else dim % like.dim()
    if isinstance(repeats, int):
        ct = ct.reshape((ct.shape[0],) + shape[:d] + (shape[d], repeats) + shape[d + 1:]).sum(d + 2)
    else:
        idx = torch.repeat_interleave(torch.arange(shape[d], device=ct.device), repeats.to(ct.device))
        ct = ct.new_zeros((ct.shape[0],) + shape).index_add(d + 1, idx, ct)
    return ct.reshape((ct.shape[0],) + tuple(like.shape))


def roll_tangent(t, shifts, dims):
    """``x.roll(shifts, dims)`` on a stack (``dims=None``: of the flattened value, the shape kept)."""
    if dims is None:
        return t.reshape(t.shape[0], -1).roll(shifts, 1).reshape(t.shape)
    return t.roll(shifts, _rt.shift_dim(dims, t.dim() - 1))


def roll_transpose(ct, shifts, dims):
    """Adjoint of ``roll``: the inverse permutation, a roll by the negated shifts."""
    back = -shifts if not isinstance(shifts, (tuple, list)) else tuple(-s for s in shifts)
    return roll_tangent(ct, back, dims)


def channel_shuffle_tangent(t, groups):
    """``channel_shuffle(x, groups)`` on a stack: the column axis merged into the leading one (axis 1 of the
    primal stays the shuffled one).
    """
    return torch.channel_shuffle(t.flatten(0, 1), groups).reshape(t.shape)


def channel_shuffle_transpose(ct, groups):
    """Adjoint of ``channel_shuffle``: the inverse permutation, a shuffle with ``C / groups`` groups (the
    ``[groups, C/groups]`` layout of the channels transposed back).
    """
    return channel_shuffle_tangent(ct, ct.shape[2] // groups)


# --- rules -----------------------------------------------------------------------------------------------


class _ReshapeLike(LinearOp):
    """An op that only reshapes: the stack is reshaped to the output, the cotangent back to the input."""

    diff = ("0", "1")  # a template (view_as, expand_as) is read for its shape only

    def apply(self, e, site, t):  # noqa: D102
        return e(_rt.reshape_like, t, site.out)

    def transpose(self, e, site, ct):  # noqa: D102
        return e(_rt.reshape_like, ct, site.args["input"])


@register("view", "reshape", torch.reshape, "flatten", torch.flatten, "unflatten", torch.unflatten, "squeeze",
          torch.squeeze, "unsqueeze", torch.unsqueeze, "view_as", "reshape_as")
class Reshape(_ReshapeLike):
    """y = x reshaped (view, reshape, flatten, unflatten, squeeze, unsqueeze); dy = dx reshaped."""

    signature = None

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["0"]
        return ZERO if t is ZERO else e(_rt.reshape_like, t, site.out)

    def vjp(self, e, site, ct):  # noqa: D102
        return {"0": e(_rt.reshape_like, ct, site.args["0"])}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)


@register("contiguous", "clone", torch.clone, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
          F.alpha_dropout, F.feature_alpha_dropout)
class Identity(LinearOp):
    """y = x (copies, contiguity, dropout in eval mode; training-mode dropout is refused before this)."""

    diff = ("0",)

    signature = None

    def jvp(self, e, site, tangents):  # noqa: D102
        return tangents["0"]

    def vjp(self, e, site, ct):  # noqa: D102
        return {"0": ct}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return {"0": d}


@register("permute", torch.permute)
class Permute(LinearOp):
    """y = x.permute(dims); dy = dx permuted, the cotangent permuted back."""

    diff = ("0",)

    signature = None

    @staticmethod
    def _dims(site):
        rest = [site.args[k] for k in sorted((k for k in site.args if k.isdigit() and k != "0"), key=int)]
        if "dims" in site.args:
            rest = [site.args["dims"]]
        return tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["0"]
        return ZERO if t is ZERO else e(permute_tangent, t, self._dims(site))

    def vjp(self, e, site, ct):  # noqa: D102
        return {"0": e(permute_transpose, ct, self._dims(site))}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)


@register("transpose", torch.transpose, "swapaxes", torch.swapaxes)
class Transpose(LinearOp):
    """y = x.transpose(a, b); its own adjoint."""

    def signature(input, dim0, dim1):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        n = site.ndim("input")
        d0, d1 = site.args["dim0"] % n + 1, site.args["dim1"] % n + 1
        return e.method("transpose", t, d0, d1)

    transpose = apply


@register("t", torch.t)
class T(LinearOp):
    """y = xᵀ for a matrix (a no-op on vectors); its own adjoint."""

    def signature(input):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return t if site.ndim("input") < 2 else e.method("transpose", t, 1, 2)

    transpose = apply


@register("expand", "expand_as", "broadcast_to", torch.broadcast_to)
class Expand(LinearOp):
    """y = x broadcast to a larger shape; the adjoint sums the copies."""

    diff = ("0", "1")  # a template (view_as, expand_as) is read for its shape only

    signature = None

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["0"]
        if t is ZERO:
            return ZERO
        if site.ps:  # an unbatched value expanded to the batch (e.g. to x.shape[0]): per-sample columns line up
            t = e(_rt.align_ps, t, site.ndim())
        return e(_rt.expand_like, t, site.out)

    def vjp(self, e, site, ct):  # noqa: D102
        if site.ps:
            return {"0": e(_rt.sum_to_ps, ct, site.args["0"])}
        return {"0": e(_rt.sum_to, ct, site.args["0"])}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)


@register("repeat")
class Repeat(LinearOp):
    """y = x.repeat(*sizes); the adjoint sums the copies."""

    diff = ("0",)

    signature = None

    @staticmethod
    def _sizes(site):
        rest = [site.args[k] for k in sorted((k for k in site.args if k.isdigit() and k != "0"), key=int)]
        return tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["0"]
        if t is ZERO:
            return ZERO
        sizes = self._sizes(site)
        if "0" in site.ps:  # an unbatched value copied to every sample (Repeat.vjp's case)
            self._copied_per_sample(site, sizes)
            return e(repeat_tangent_ps, t, sizes)
        return e.method("repeat", e(_rt.align, t, len(sizes)), 1, *sizes)

    @staticmethod
    def _copied_per_sample(site, sizes) -> None:
        """Declines unless the batch axis is axis 0 and the value has one row there, copied once per sample."""
        shape = (1,) * (len(sizes) - site.ndim("0")) + tuple(site.val("0").shape)
        if site.extra.get("out_batch_dim") != 0 or site.node.meta.get("batch_factor", 1) != 1 or shape[0] != 1:
            raise Decline

    def vjp(self, e, site, ct):  # noqa: D102
        sizes = self._sizes(site)
        if "0" in site.ps:  # an unbatched value copied to every sample: one copy per sample along axis 0 only
            self._copied_per_sample(site, sizes)
            return {"0": e(repeat_transpose_ps, ct, site.args["0"], sizes)}
        return {"0": e(repeat_transpose, ct, site.args["0"], sizes)}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)


@register("tile", torch.tile)
class Tile(Repeat):
    """y = x.tile(dims): ``repeat`` with ``dims`` padded by leading ones to x's rank."""

    @staticmethod
    def _sizes(site):
        sizes = Repeat._sizes(site)
        return (1,) * (site.ndim("0") - len(sizes)) + sizes


@register(torch.cat, torch.concat, torch.concatenate)
class Cat(Rule):
    """y = cat(xs, dim); dy = cat of the tangents; the adjoint splits the cotangent."""

    diff = ("tensors",)

    square_is_self = True

    def signature(tensors, dim=0, *, axis=None):  # noqa: D103
        ...

    @staticmethod
    def _dim(site):
        return site.args["axis"] if site.args.get("axis") is not None else site.args["dim"]

    def jvp(self, e, site, tangents):  # noqa: D102
        ts = tangents["tensors"]
        if ts is ZERO:
            return ZERO
        return e(cat_tangent, ts, site.args["tensors"], self._dim(site))

    def vjp(self, e, site, ct):  # noqa: D102
        pieces = e(cat_transpose, ct, site.args["tensors"], self._dim(site))
        return {"tensors": [e(operator.getitem, pieces, i) for i in range(len(site.val("tensors")))]}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)


@register(torch.stack)
class Stack(Rule):
    """y = stack(xs, dim); the adjoint unbinds the cotangent."""

    diff = ("tensors",)

    square_is_self = True

    def signature(tensors, dim=0):  # noqa: D103
        ...

    def jvp(self, e, site, tangents):  # noqa: D102
        ts = tangents["tensors"]
        if ts is ZERO:
            return ZERO
        return e(stack_tangent, ts, site.args["tensors"], site.args["dim"])

    def vjp(self, e, site, ct):  # noqa: D102
        pieces = e(stack_transpose, ct, site.args["dim"], site.ndim() - 1)
        return {"tensors": [e(operator.getitem, pieces, i) for i in range(len(site.val("tensors")))]}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)


class _Pieces(Rule):
    """A tuple-valued split (chunk, split, unbind): the same split on the stack; the adjoint concatenates."""

    diff = ("input",)

    square_is_self = True

    def _dim(self, site):
        return site.args["dim"]

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        return self.apply(e, site, t)

    def vjp(self, e, site, ct):  # noqa: D102
        cts = [c for c in ct]
        return {"input": e(pieces_transpose, cts, site.out, self._dim(site))}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)


@register("chunk", torch.chunk)
class Chunk(_Pieces):
    """ys = chunk(x, n, dim)."""

    def signature(input, chunks, dim=0):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(torch.chunk, t, site.args["chunks"], site.args["dim"] % site.ndim("input") + 1)


@register("split", torch.split)
class Split(_Pieces):
    """ys = split(x, size_or_sections, dim)."""

    def signature(input, split_size_or_sections, dim=0):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(torch.split, t, site.args["split_size_or_sections"], site.args["dim"] % site.ndim("input") + 1)


@register("unbind", torch.unbind)
class Unbind(_Pieces):
    """ys = unbind(x, dim); the adjoint stacks."""

    def signature(input, dim=0):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(torch.unbind, t, site.args["dim"] % site.ndim("input") + 1)

    def vjp(self, e, site, ct):  # noqa: D102
        d = site.args["dim"] % site.ndim("input")
        return {"input": e(stack_tangent, [c for c in ct], site.out, d)}


@register(operator.getitem)
class GetItem(LinearOp):
    """y = x[idx] (basic and advanced indexing); the adjoint scatter-adds into zeros."""

    def signature(input, idx):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        idx = site.args["idx"]
        parts = idx if isinstance(idx, tuple) else (idx,)
        if sum(1 for p in parts if isinstance(p, (torch.fx.Node, list, tuple))) > 1:
            raise Decline  # several advanced indices move axes to the front: leave it to the fallback
        return e(getitem_tangent, t, idx)

    def transpose(self, e, site, ct):  # noqa: D102
        idx = site.args["idx"]
        parts = idx if isinstance(idx, tuple) else (idx,)
        if sum(1 for p in parts if isinstance(p, (torch.fx.Node, list, tuple))) > 1:
            raise Decline
        return e(getitem_transpose, ct, site.args["input"], idx)

    @staticmethod
    def _rows_per_sample(site):
        """An unbatched table with per-sample (co)tangents, indexed by a batched integer tensor: each sample
        reads its own rows (an embedding written as indexing); anything else goes to the fallback.
        """
        idx, val = site.args["idx"], site.val("idx")
        if not (isinstance(idx, torch.fx.Node) and isinstance(val, torch.Tensor) and not val.is_floating_point()
                and val.dtype != torch.bool and idx in site.extra.get("batched", {})
                and site.extra.get("out_batch_dim") == 0 and site.node.meta.get("batch_factor", 1) == 1):
            raise Decline
        return idx

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if "input" not in site.ps or t is ZERO:
            return super().jvp(e, site, tangents)
        return e(rows_tangent_ps, t, self._rows_per_sample(site))

    def vjp(self, e, site, ct):  # noqa: D102
        if "input" not in site.ps:
            return super().vjp(e, site, ct)
        return {"input": e(rows_transpose_ps, ct, site.args["input"], self._rows_per_sample(site))}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)  # 0/1 entries: the adjoint itself


def _indexed_dim(site):
    """The op's ``dim`` made non-negative, or Decline: a traced dim, ``out=``, or per-sample stacks of an
    unbatched operand (each sample would index its own copy: the fallback's per-sample rule).
    """
    dim, nd = site.args["dim"], site.ndim("input")
    if not isinstance(dim, int) or nd == 0 or site.args.get("out") is not None or site.ps:
        raise Decline
    return dim % nd


def gather_tangent(t, dim, idx):
    """``gather`` on a stack ``[K, *x]``: the index repeated for every column."""
    return t.gather(dim + 1, idx.expand((t.shape[0],) + tuple(idx.shape)))


def gather_transpose(ct, like, dim, idx):
    """Adjoint of ``gather``: the cotangent stack scatter-added into zeros ``[K, *x]`` (repeated indices add)."""
    out = ct.new_zeros((ct.shape[0],) + tuple(like.shape))
    return out.scatter_add(dim + 1, idx.expand((ct.shape[0],) + tuple(idx.shape)), ct)


@register(torch.gather, "gather")
class Gather(LinearOp):
    """y = x.gather(dim, index): each output entry is one entry of x (0/1 entries: the diagonal rules are the op
    and its adjoint); the adjoint scatter-adds. ``sparse_grad`` only says how autograd stores a gradient.
    """

    def signature(input, dim, index, *, sparse_grad=False, out=None):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(gather_tangent, t, _indexed_dim(site), site.args["index"])

    def transpose(self, e, site, ct):  # noqa: D102
        return e(gather_transpose, ct, site.args["input"], _indexed_dim(site), site.args["index"])


class _Sorted(Rule):
    """``(values, indices) = op(x, dim)`` whose values are ``x.gather(dim, indices)``: gather's rules with the op's
    own indices (0/1 entries: the diagonal rules are the same); the indices have no derivative.
    """

    diff = ("input",)

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO:
            return ZERO
        dim = _indexed_dim(site)
        return e(gather_tangent, t, dim, e(operator.getitem, site.out, 1)), ZERO

    def vjp(self, e, site, ct):  # noqa: D102
        dim = _indexed_dim(site)
        if ct[0] is ZERO:
            return {}
        return {"input": e(gather_transpose, ct[0], site.args["input"], dim, e(operator.getitem, site.out, 1))}

    diag_jvp = jvp
    diag_vjp = vjp


@register(torch.topk, "topk")
class TopK(_Sorted):
    """The k largest (or smallest) entries along dim."""

    def signature(input, k, dim=-1, largest=True, sorted=True, *, out=None):  # noqa: D103
        ...


@register(torch.sort, "sort")
class Sort(_Sorted):
    """The entries sorted along dim (stable or not: the indices it returns say which)."""

    def signature(input, dim=-1, descending=False, stable=False, *, out=None):  # noqa: D103
        ...


@register(torch.cummax, "cummax", torch.cummin, "cummin")
class CumMax(_Sorted):
    """The running maximum (minimum) along dim: each entry is the input's at the returned index (repeated indices:
    the adjoint adds, as autograd's).
    """

    def signature(input, dim, *, out=None):  # noqa: D103
        ...


def index_select_tangent(t, dim, idx):
    """``index_select`` on a stack ``[K, *x]``."""
    return t.index_select(dim + 1, idx)


def index_select_transpose(ct, like, dim, idx):
    """Adjoint of ``index_select``: the stack index-added into zeros ``[K, *x]`` (repeated indices add)."""
    out = ct.new_zeros((ct.shape[0],) + tuple(like.shape))
    return out.index_add(dim + 1, idx, ct)


@register(torch.index_select, "index_select")
class IndexSelect(LinearOp):
    """y = x.index_select(dim, index): rows of x (0/1 entries: the diagonal rules are the op and its adjoint); the
    adjoint index-adds.
    """

    def signature(input, dim, index, *, out=None):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(index_select_tangent, t, _indexed_dim(site), site.args["index"])

    def transpose(self, e, site, ct):  # noqa: D102
        return e(index_select_transpose, ct, site.args["input"], _indexed_dim(site), site.args["index"])


def index_add_tangent(tx, ts, like, dim, idx, alpha):
    """``x.index_add(dim, idx, s, alpha)``'s tangent from stacks ``tx`` (None: none) and ``ts``."""
    base = tx if tx is not None else ts.new_zeros((ts.shape[0],) + tuple(like.shape))
    return base.index_add(dim + 1, idx, ts, alpha=alpha)


def scatter_add_tangent(tx, ts, like, dim, idx):
    """``x.scatter_add(dim, idx, s)``'s tangent from stacks ``tx`` (None: none) and ``ts``."""
    base = tx if tx is not None else ts.new_zeros((ts.shape[0],) + tuple(like.shape))
    return base.scatter_add(dim + 1, idx.expand((ts.shape[0],) + tuple(idx.shape)), ts)


class _AddAt(Rule):
    """y = x with the entries of ``source`` added at indexed places: the identity in x, a 0/``a`` map in the
    source (``a`` = alpha), so the diagonal rules are the same maps with ``a²``.
    """

    src = "source"  # the added operand's argument name
    diff = ("input", "source")

    def _alpha(self, site):
        return 1

    def _check(self, site):
        raise NotImplementedError

    def jvp(self, e, site, tangents):  # noqa: D102
        return self._push(e, site, tangents, 1)

    def diag_jvp(self, e, site, tangents):  # noqa: D102
        return self._push(e, site, tangents, 2)

    def vjp(self, e, site, ct):  # noqa: D102
        return self._pull(e, site, ct, 1)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self._pull(e, site, d, 2)

    def _push(self, e, site, tangents, power):
        dim = self._check(site)
        tx, ts = tangents["input"], tangents.get(self.src, ZERO)
        if ts is ZERO:
            return tx
        return self._add(e, site, None if tx is ZERO else tx, ts, dim, self._alpha(site) ** power)

    def _pull(self, e, site, ct, power):
        dim = self._check(site)
        out = {"input": ct} if site.needs("input") else {}
        if site.needs(self.src):
            out[self.src] = self._take(e, site, ct, dim, self._alpha(site) ** power)
        return out


@register(torch.index_add, "index_add")
class IndexAdd(_AddAt):
    """y = x.index_add(dim, index, source, alpha=a): ``a · source`` added at the indexed rows of x."""

    def signature(input, dim, index, source, *, alpha=1, out=None):  # noqa: D103
        ...

    def _alpha(self, site):
        a = site.args["alpha"]
        if not isinstance(a, (int, float)):
            raise Decline
        return a

    def _check(self, site):
        return _indexed_dim(site)

    def _add(self, e, site, tx, ts, dim, alpha):
        return e(index_add_tangent, tx, ts, site.args["input"], dim, site.args["index"], alpha)

    def _take(self, e, site, ct, dim, alpha):
        out = e(index_select_tangent, ct, dim, site.args["index"])
        return out if alpha == 1 else e(operator.mul, out, alpha)


@register(torch.scatter_add, "scatter_add")
class ScatterAdd(_AddAt):
    """y = x.scatter_add(dim, index, src): each entry of src added at the place index names along dim."""

    src = "src"
    diff = ("input", "src")

    def signature(input, dim, index, src, *, out=None):  # noqa: D103
        ...

    def _check(self, site):
        dim = _indexed_dim(site)
        if tuple(site.val("index").shape) != tuple(site.val("src").shape):
            raise Decline  # entries of src beyond the index's shape are not read: the fallback
        return dim

    def _add(self, e, site, tx, ts, dim, alpha):
        return e(scatter_add_tangent, tx, ts, site.args["input"], dim, site.args["index"])

    def _take(self, e, site, ct, dim, alpha):
        return e(gather_tangent, ct, dim, site.args["index"])


@register(straight_through)
class StraightThrough(LinearOp):
    """y = new's values with the derivative of ``input`` (an in-place write autograd does not record): the
    identity in ``input``, zero in ``new``.
    """

    diff = ("input", "new")

    def signature(input, new):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return t

    transpose = apply


@register(torch.flip, "flip")
class Flip(LinearOp):
    """y = flip(x, dims); its own adjoint. The method takes its dims as varargs too: ``h.flip(1, 2)``."""

    def signature(input, *dims_, dims=None):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        n = site.ndim("input")
        dims = site.args["dims"]
        if dims is None:
            rest = site.args["dims_"]
            dims = rest[0] if len(rest) == 1 else rest
        dims = [dims] if isinstance(dims, int) else dims
        return e(torch.flip, t, [d % n + 1 for d in dims])

    transpose = apply


@register(torch.roll, "roll")
class Roll(LinearOp):
    """y = roll(x, shifts, dims), a cyclic shift (a permutation); the adjoint rolls back by the negated shifts."""

    def signature(input, shifts, dims=None):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(roll_tangent, t, site.args["shifts"], site.args["dims"])

    def transpose(self, e, site, ct):  # noqa: D102
        return e(roll_transpose, ct, site.args["shifts"], site.args["dims"])


@register(F.channel_shuffle)  # torch.channel_shuffle; nn.ChannelShuffle calls it
class ChannelShuffle(LinearOp):
    """y = channel_shuffle(x, g): axis 1 viewed as ``[g, C/g]`` and transposed (a permutation); the adjoint is
    the shuffle with ``C/g`` groups.
    """

    def signature(input, groups):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(channel_shuffle_tangent, t, site.args["groups"])

    def transpose(self, e, site, ct):  # noqa: D102
        return e(channel_shuffle_transpose, ct, site.args["groups"])


def unpad(ct, pad):
    """The adjoint of a zero padding: the padding cut off (the amounts may be sizes computed in the graph: a
    U-Net's ``F.pad(x1, [dX // 2, dX - dX // 2, ...])``).
    """
    return F.pad(ct, [-p for p in pad])


@register(F.pad)
class Pad(LinearOp):
    """y = pad(x): zeros (a constant fill value adds nothing to the derivative), or copies of x's border entries
    (reflect, replicate, circular), which the adjoint adds back onto them.
    """

    def signature(input, pad, mode="constant", value=None):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        if site.args["mode"] != "constant":
            return e(pad_tangent, t, site.args["pad"], site.args["mode"])
        return e(F.pad, t, site.args["pad"])

    def transpose(self, e, site, ct):  # noqa: D102
        if site.args["mode"] != "constant":
            return e(pad_transpose, ct, site.args["input"], site.args["pad"], site.args["mode"])
        return e(unpad, ct, site.args["pad"])


@register(torch.narrow, "narrow")
class Narrow(LinearOp):
    """y = x.narrow(dim, start, length); the adjoint pads with zeros."""

    def signature(input, dim, start, length):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(torch.narrow, t, site.args["dim"] % site.ndim("input") + 1, site.args["start"],
                 site.args["length"])

    def transpose(self, e, site, ct):  # noqa: D102
        d = site.args["dim"] % site.ndim("input")
        start, length = site.args["start"], site.args["length"]
        if isinstance(start, int) and isinstance(length, int) and start < 0:  # counted from the end
            start += site.val("input").shape[d]
        idx = (slice(None),) * d + (slice(start, e(operator.add, start, length)),)
        return e(getitem_transpose, ct, site.args["input"], idx)


@register("select", torch.select)
class Select(LinearOp):
    """y = x.select(dim, index); the adjoint writes the cotangent into zeros at that index."""

    def signature(input, dim, index):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(torch.select, t, site.args["dim"] % site.ndim("input") + 1, site.args["index"])

    def transpose(self, e, site, ct):  # noqa: D102
        idx = (slice(None),) * (site.args["dim"] % site.ndim("input")) + (site.args["index"],)
        return e(getitem_transpose, ct, site.args["input"], idx)


@register("movedim", torch.movedim, "moveaxis", torch.moveaxis)
class Movedim(LinearOp):
    """y = x.movedim(source, destination); the adjoint moves the axes back."""

    def signature(input, source, destination):  # noqa: D103
        ...

    def _move(self, e, site, t, src, dst):
        n = site.ndim("input")
        return e(torch.movedim, t, _rt.shift_dim(site.args[src], n), _rt.shift_dim(site.args[dst], n))

    def apply(self, e, site, t):  # noqa: D102
        return self._move(e, site, t, "source", "destination")

    def transpose(self, e, site, ct):  # noqa: D102
        return self._move(e, site, ct, "destination", "source")


@register("repeat_interleave", torch.repeat_interleave)
class RepeatInterleave(LinearOp):
    """y = x.repeat_interleave(repeats, dim) (a number or a constant tensor of repeats); the adjoint sums each
    entry's copies.
    """

    def signature(input, repeats=None, dim=None, *, output_size=None):  # noqa: D103
        ...

    @staticmethod
    def _repeats(site):
        if site.args["repeats"] is None:
            raise Decline  # repeat_interleave(repeats): integer indices
        return site.args["repeats"]

    def apply(self, e, site, t):  # noqa: D102
        return e(repeat_interleave_tangent, t, self._repeats(site), site.args["dim"])

    def transpose(self, e, site, ct):  # noqa: D102
        return e(repeat_interleave_transpose, ct, site.args["input"], self._repeats(site), site.args["dim"])

    # An unbatched value with one row copied to every sample (a learned latent array, ``lat.repeat_interleave(B,
    # 0)``) is ``expand`` to the batch: per-sample stacks line up with it.

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        if t is ZERO or not site.ps:
            return super().jvp(e, site, tangents)
        self._copied_per_sample(site)
        return e(_rt.expand_like, e(_rt.align_ps, t, site.ndim()), site.out)

    def vjp(self, e, site, ct):  # noqa: D102
        if not site.ps:
            return super().vjp(e, site, ct)
        self._copied_per_sample(site)
        return {"input": e(_rt.sum_to_ps, ct, site.args["input"])}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)

    @staticmethod
    def _copied_per_sample(site) -> None:
        dim, shape = site.args["dim"], tuple(site.val("input").shape)
        if dim is None or site.args["repeats"] is None or not shape or dim % len(shape) != 0 or shape[0] != 1 or \
                site.extra.get("out_batch_dim") != 0 or site.node.meta.get("batch_factor", 1) != 1:
            raise Decline


class _Triangle(LinearOp):
    """A triangular mask of the last two axes: y = M∘x, its own adjoint."""

    op = None

    def signature(input, diagonal=0):  # noqa: D103
        ...

    def apply(self, e, site, t):  # noqa: D102
        return e(self.op, t, site.args["diagonal"])

    transpose = apply


@register("tril", torch.tril)
class Tril(_Triangle):
    """y = tril(x, diagonal)."""

    op = torch.tril


@register("triu", torch.triu)
class Triu(_Triangle):
    """y = triu(x, diagonal)."""

    op = torch.triu


def _lined_up(shape: tuple, sel_dim: int) -> tuple:
    """A value's ``shape`` lined up with the rank-``sel_dim`` selection it is written into: ``x[idx] = v``
    broadcasts ``v`` from the right and drops its leading unit axes beyond the selection's (for a per-sample stack
    of an unbatched value, its leading 1 lines up with the batch).
    """
    core = tuple(shape)
    while len(core) > sel_dim and core and core[0] == 1:
        core = core[1:]
    return (1,) * (sel_dim - len(core)) + core


def setitem_tangent(tb, tv, like, idx, lead=1):
    """``setitem(base, idx, value)`` on stacks: the base's (zeros where it has none) with the value's written at
    ``idx`` (zeros where the value has none). ``lead`` is 2 where the value is unbatched with a per-sample stack
    ``[K, B, *v]`` (a class token written into every sample: ``out[:, 0] = self.cls``; the index keeps the batch
    axis first and whole).
    """
    k = (tb if tb is not None else tv).shape[0]
    out = tb.clone() if tb is not None else tv.new_zeros((k,) + tuple(like.shape))
    full = (slice(None),) + _index_of(idx)
    if tv is None:
        out[full] = 0.0
    else:
        out[full] = tv.reshape(tuple(tv.shape[:lead]) + _lined_up(tuple(tv.shape[lead:]), out[full].dim() - lead))
    return out


def setitem_base_transpose(ct, idx):
    """The base's cotangent: the output's, zero where the value was written."""
    out = ct.clone()
    out[(slice(None),) + _index_of(idx)] = 0.0
    return out


def setitem_value_transpose(ct, idx, value, lead=1):
    """The value's cotangent ``[K, *value.shape]`` (``[K, B, *value.shape]`` per sample with ``lead`` 2): the
    output's at ``idx``, summed over the copies broadcasting made.
    """
    sel = ct[(slice(None),) + _index_of(idx)]
    stack = tuple(sel.shape[:lead])
    return sel.sum_to_size(stack + _lined_up(tuple(value.shape), sel.dim() - lead)).reshape(stack + tuple(value.shape))


@register(setitem)
class SetItem(Rule):
    """y = base with ``y[idx] = value`` (the normalised form of ``x[idx] = v`` and of an in-place op through a
    slice): a 0/1 map in each operand, so the diagonal rules are the same maps. Basic indices and at most one
    boolean mask; integer index tensors (whose repeated entries leave the last write) go to the fallback.
    """

    diff = ("base", "value")

    def signature(base, index, value):  # noqa: D103
        ...

    @staticmethod
    def _index(site):
        parts = _index_of(site.val("index"))
        if site.ps and not (site.ps == {"value"} and parts and parts[0] == slice(None)
                            and site.node.meta.get("batch_dim") == 0 and site.node.meta.get("batch_factor", 1) == 1):
            raise Decline  # per-sample stacks the batch axis does not line up with: the fallback's per-sample rule
        advanced = [p for p in parts if not (p is None or p is Ellipsis or isinstance(p, (int, slice)))]
        if any(isinstance(p, bool) for p in parts) or len(advanced) > 1 or any(
                not isinstance(p, torch.Tensor) or p.dtype != torch.bool for p in advanced):
            raise Decline
        return site.args["index"]

    def jvp(self, e, site, tangents):  # noqa: D102
        idx = self._index(site)
        tb, tv = tangents["base"], tangents.get("value", ZERO)
        if tb is ZERO and tv is ZERO:
            return ZERO
        lead = 2 if "value" in site.ps else 1
        return e(setitem_tangent, None if tb is ZERO else tb, None if tv is ZERO else tv, site.args["base"], idx,
                 lead)

    def vjp(self, e, site, ct):  # noqa: D102
        idx = self._index(site)
        out = {}
        if site.needs("base"):
            out["base"] = e(setitem_base_transpose, ct, idx)
        if site.needs("value"):
            out["value"] = e(setitem_value_transpose, ct, idx, site.args["value"], 2 if "value" in site.ps else 1)
        return out

    def diag_jvp(self, e, site, tangents):  # noqa: D102
        return self.jvp(e, site, tangents)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self.vjp(e, site, d)

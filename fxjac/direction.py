"""The direction products: ``jvp``, ``vjp``, ``jmp``, ``mjp`` and ``jacobian``."""

from __future__ import annotations

import itertools
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

from passes import ZERO, backward_cotangents, chunk_body, column_loop, forward_tangents

from . import assemble as A
from . import checks
from .errors import OptionError, UnsupportedOpError
from .product import Product, make_product

_COMMON = ("example_inputs", "leaf_modules", "strict", "chunk_size", "differentiable", "output", "concrete_args")


def _options(kwargs: dict, extra=()) -> dict:
    """Validate the common options and drop ``chunk_size`` (the products with K columns read it first; for the
    one-column products, jvp, vjp and ggn_vp, there is nothing to chunk).
    """
    unknown = set(kwargs) - set(_COMMON) - set(extra)
    if unknown:
        raise OptionError(f"unknown option(s) {sorted(unknown)}; known: {sorted(set(_COMMON) | set(extra))}")
    chunk = kwargs.get("chunk_size")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise OptionError(f"chunk_size must be a positive int, got {chunk!r}")
    kwargs.pop("chunk_size", None)
    return kwargs


# Columns per chunk (Note [column loops] in passes/loop.py): as many as keep the largest per-column stack under a
# budget, and at most MAX_CHUNKS chunks where that keeps a chunk's stacks under GPU_CHUNK_BYTES (each chunk costs a
# loop iteration, about 1 ms of Python on the U-Net). Measured end to end on the 2-core CPU (exact GGN diagonals),
# not explained op by op: the U-Net's 1,024 MSE columns at 1.5 MB each took 18.2 s in chunks of 682, 9.7 s in
# chunks of 32, 6.2-6.9 s in chunks of 4 to 10 and 7.4 s one at a time; the ResNet's 9 columns at 2 MiB, 190 ms one
# at a time and 265 ms in one or two chunks; the cnn's at 4 MiB, 62 ms against 72 ms; the mlp's at 0.25 MiB, 8.5 ms
# in one chunk against 10 ms in two; the transformer's, 40 ms in one chunk against 42 ms in chunks of 2. So 2 MiB
# (one core's L2 here) with convolutions, 16 MiB without. One convolution over 320 rows took no longer than ten
# over 32 rows in isolation: the gain is likely cache reuse between a chunk's ops and fresh buffers small enough
# for the allocator to recycle (no page faults). On a GPU a chunk is a launch per kernel and memory is not page-
# faulted in: 1 GiB there.
#
# Where a convolution's weight cotangent takes the pooled path (Note [weight cotangents through a max pooling] in
# fxjac/rules/conv.py), its patches are gathered once per chunk, about two columns' worth of work, and the
# stack of its output's cotangent, often the largest, is never formed: all columns go in one chunk while the
# stacks that are formed stay within POOLED_CHUNK_BYTES. The cnn's exact GGN diagonal, 9 columns: 46.5 ms one
# column at a time, 53 in chunks of 3, 49 in chunks of 5, 37 in one chunk (and without the pooled path 45 in
# one chunk, 45 one at a time).
CPU_CHUNK_BYTES, CONV_CHUNK_BYTES, GPU_CHUNK_BYTES, MAX_CHUNKS = 16 << 20, 2 << 20, 1 << 30, 128
POOLED_CHUNK_BYTES = 64 << 20
_CONVOLUTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


def take(t, lo, hi):
    """Columns ``lo:hi`` of a stack or of column weights (``None`` stays ``None``)."""
    return None if t is None else t[lo:hi]


def add_all(parts):
    """Sum of a list of tensors."""
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def _pooled_convolutions(src, rules) -> frozenset:
    """Convolution nodes whose weight cotangent takes the pooled path (``rule.gathers_per_chunk``; on a CPU)."""
    held = next(itertools.chain(src.model.parameters(), src.model.buffers()), None)
    if rules is None or (held is not None and held.device.type != "cpu"):
        return frozenset()
    differentiated = set(src.param_nodes) | ({src.inputs[src.wrt_index]} if src.wrt_kind == "input" else set())
    for n in src.gm.graph.nodes:
        if any(a in differentiated for a in n.all_input_nodes):
            differentiated.add(n)
    out = set()
    for n in src.gm.graph.nodes:
        gathers = getattr(rules.lookup(n), "gathers_per_chunk", None) if n.op == "call_function" else None
        if gathers is not None and gathers(n, rules, differentiated):
            out.add(n)
    return frozenset(out)


def _per_column_bytes(src, never_stacked) -> int:
    """Bytes of the largest per-column stack (B x the largest value per sample, or x a whole parameter: a
    parameter's per-sample stack holds it whole per sample). Nodes in ``never_stacked`` (parameters reduced in
    closed form, never forming per-sample stacks; a pooled convolution's output) do not count.
    """
    per_column = 0
    first = src.inputs[0].meta.get("val") if src.inputs else None
    if src.inputs and not isinstance(first, torch.Tensor):
        raise UnsupportedOpError(
            "products with columns (jacobian, jtmjp, jmjtp, ggn) take the batch size from the first input, and "
            f"it is a {type(first).__name__}: give the model its tensors as separate arguments (a wrapper whose "
            "forward(x, z) calls model({'x': x, 'z': z}))")
    batch = first.shape[0] if src.inputs else 1
    for n in src.gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and n not in never_stacked:
            per = v.numel() if n in src.param_nodes else math.prod(v.shape[1:])
            per_column = max(per_column, per * batch * v.element_size())
    return max(per_column, 1)


def _chunk_budget(src) -> int:
    """Bytes of the largest per-column stack in one chunk, by the model's device and its ops (see CPU_CHUNK_BYTES)."""
    held = next(itertools.chain(src.model.parameters(), src.model.buffers()), None)  # (shapes are on "meta")
    if held is not None and held.device.type != "cpu":
        return GPU_CHUNK_BYTES
    convs = any(n.op == "call_function" and n.target in _CONVOLUTIONS for n in src.gm.graph.nodes)
    return CONV_CHUNK_BYTES if convs else CPU_CHUNK_BYTES


def chunk_widths(k: int, chunk_size, src, never_stacked=frozenset(), rules=None) -> tuple:
    """Columns per chunk, eagerly and under torch.compile: at most ``chunk_size`` where given; else as many as
    keep the per-column stacks within the budget (:func:`_chunk_budget`, GPU_CHUNK_BYTES under torch.compile),
    at most MAX_CHUNKS chunks where a chunk then stays within GPU_CHUNK_BYTES; all in one chunk through a pooled
    convolution within POOLED_CHUNK_BYTES. Balanced: K = 1,024 with ``chunk_size=1000`` gives two chunks of
    512, not 1,000 and a last one padded with 976 zero columns.
    """
    per_column = None if chunk_size is not None else _per_column_bytes(src, never_stacked)
    if per_column is not None and k > 1:
        pooled = _pooled_convolutions(src, rules)
        if pooled and k * _per_column_bytes(src, never_stacked | pooled) <= POOLED_CHUNK_BYTES:
            return k, k

    def width_for(budget):
        if chunk_size is not None:
            width = chunk_size
        else:
            most = max(1, max(budget, GPU_CHUNK_BYTES) // per_column)
            width = max(1, budget // per_column, min(-(-k // MAX_CHUNKS), most))
        return -(-k // -(-k // width))  # as many chunks, balanced: the last one padded by fewer than their count

    return width_for(_chunk_budget(src)), width_for(GPU_CHUNK_BYTES)


def through_chunks(e, b, src, k: int, chunk_size, seed, weights, emit, cat_dim=None, never=frozenset()):
    """``emit(columns, weights, n)`` (a node, or a list of nodes) over the ``k`` columns of ``seed`` (and of
    ``weights``, ``None`` when there are none), chunk by chunk (:func:`chunk_widths`), the chunks' results added
    or concatenated along ``cat_dim``. Several chunks go through one copy of the emitted pass, called in a loop
    (Note [column loops] in passes/loop.py), and under torch.compile, which unrolls the loop, through a second
    copy for wider chunks; where the chunk cannot be outlined, the chunks are unrolled.
    """
    if not isinstance(k, int):  # K is the operand's, known at run time: chunks of chunk_size, the last padded
        if chunk_size is None:
            return emit(seed, weights, k)
        width = wide = chunk_size
    else:
        width, wide = chunk_widths(k, chunk_size, src, never, b.rules)
        if width >= k:
            return emit(seed, weights, k)

    def chunk(n):  # one chunk's pass: (the graph's last node before it, its column slices, result)
        start = next(iter(reversed(e.graph.nodes)))
        s = e(take, seed, 0, n)
        wc = None if weights is None else e(take, weights, 0, n)
        return start, [s, wc], emit(s, wc, n)

    start, roots, first = chunk(width)
    # Results that do not depend on the columns (the zero block of a parameter the output never reads) are
    # computed once, outside the loop, which sums only the others.
    looped = _column_dependent(roots, first) if cat_dim is None and isinstance(first, list) else None

    def in_loop(result):
        return result if looped is None else [result[i] for i in looped]

    eager = chunk_body(e.graph, start, roots, in_loop(first))
    if eager is not None:
        variants = [eager + (width,)]
        if wide != width:  # (k is an int here: with an operand's K both widths are chunk_size)
            w_start, w_roots, w_result = chunk(min(wide, k))
            compiled = chunk_body(e.graph, w_start, w_roots, in_loop(w_result))
            if compiled is None:  # the same emission with another width: outlined alike
                raise RuntimeError("fxjac: internal error: a chunk of columns outlined at one width and not another")
            variants.append(compiled + (min(wide, k),))
        sums = column_loop(e, b.modules, seed, weights, k if isinstance(k, int) else None, variants, in_loop(first),
                           cat_dim)
        if looped is None:
            return sums
        out = list(first)
        for j, i in enumerate(looped):
            out[i] = sums[j]
        return out
    if not isinstance(k, int):
        raise OptionError("chunk_size: this product's pass cannot be put in a loop over chunks of the operand's "
                          "columns (their number is known only at run time); build it without chunk_size")
    parts = [first]
    for lo in range(width, k, width):
        hi = min(lo + width, k)
        s = e(take, seed, lo, hi)
        parts.append(emit(s, None if weights is None else e(take, weights, lo, hi), hi - lo))
    if cat_dim is not None:
        return e(torch.cat, parts, cat_dim)
    if isinstance(parts[0], list):
        return [e(add_all, list(p)) for p in zip(*parts)]
    return e(add_all, parts)


def _column_dependent(roots, results) -> list:
    """Indices of the ``results`` (nodes) that the column slices ``roots`` reach in the graph."""
    reached, todo = set(), [r for r in roots if r is not None]
    while todo:
        n = todo.pop()
        if n not in reached:
            reached.add(n)
            todo.extend(n.users)
    return [i for i, r in enumerate(results) if r in reached]


def _reduce(reduce: str) -> str:
    if reduce not in ("sum", "none"):
        raise OptionError(f"reduce must be 'sum' or 'none', got {reduce!r}")
    return reduce


def _primal_out(b, src):
    """The new-graph node of the model output and its (old-graph) node."""
    return b.env[src.output]


def jvp(model, wrt: Any = "input", **options) -> Product:
    """Jacobian-vector product ``J v`` by forward propagation of a tangent.

    Args:
        model: any ``nn.Module`` (or GraphModule).
        wrt: ``"input"``, ``"input:N"``, ``"params"`` or parameter names / module prefixes.
        **options: ``example_inputs``, ``leaf_modules``, ``strict``, ``differentiable``, ``output``,
            ``concrete_args``.

    Returns:
        A product ``p(*inputs, v) -> (y, J v)``; ``v`` is shaped like the input (``wrt="input"``), or ``[P]``
        (shared by the batch) or ``[B, P]`` (per sample) for parameters; ``J v`` is shaped like ``y``.
    """
    options = _options(options)

    def assemble(src, b, key):
        xs = A.input_placeholders(b, src)
        v = b.graph.placeholder("v")
        e = A.api_emitter(b)
        y_like = None
        if src.wrt_kind == "input":
            x = xs[src.wrt_index]
            v = e(checks.check_like, v, x, "v")
            seeds = {src.inputs[src.wrt_index]: e.method("unsqueeze", v, 0)}
            tan = forward_tangents(b, seeds)
        elif key == "ps":
            v = e(checks.check_shape, v, (A.size(e, xs[0], 0), src.P), A.param_like(b, src), "v")
            stack = v  # [B, P]: K = 1, so the K*B stack is v itself
            tan = forward_tangents(b, A.param_seeds(e, src, stack), ps=True)
        else:
            v = e(checks.check_shape, v, (src.P,), A.param_like(b, src), "v")
            tan = forward_tangents(b, A.param_seeds(e, src, e.method("unsqueeze", v, 0)))
        y = b.env[src.output]
        ty = tan.get(src.output, ZERO)
        y_like = e(torch.zeros_like, y) if ty is ZERO else e.method("squeeze", ty, 0)
        return (y, y_like)

    def variant(operands):
        v = operands[0] if operands else None
        return "ps" if isinstance(v, torch.Tensor) and v.dim() == 2 and _params(wrt) else None

    return make_product(assemble, model, wrt, variant=variant, **options)


def _params(wrt) -> bool:
    return not (isinstance(wrt, str) and wrt.startswith("input"))


def vjp(model, wrt: Any = "input", reduce: str = "sum", **options) -> Product:
    """Vector-Jacobian product ``Jᵀ w`` by backward propagation of a cotangent.

    Args:
        model: any ``nn.Module``.
        wrt: as in :func:`jvp`.
        reduce: for parameters, ``"sum"`` over the batch (``[P]``) or ``"none"`` (per-sample ``[B, P]``).
        **options: as in :func:`jvp`.

    Returns:
        A product ``p(*inputs, w) -> (y, Jᵀ w)``, ``w`` shaped like ``y``.
    """
    options = _options(options)
    reduce = _reduce(reduce)

    def assemble(src, b, key):
        xs = A.input_placeholders(b, src)
        w = b.graph.placeholder("w")
        b.copy_all()
        e = A.api_emitter(b)
        y = b.env[src.output]
        w = e(checks.check_like, w, y, "w")
        seeds = {src.output: e.method("unsqueeze", w, 0)}
        if src.wrt_kind == "input":
            x = xs[src.wrt_index]
            cts = backward_cotangents(b, seeds, [src.inputs[src.wrt_index]])
            ct = cts.get(src.inputs[src.wrt_index], ZERO)
            return (y, e(torch.zeros_like, x) if ct is ZERO else e.method("squeeze", ct, 0))
        per_sample = reduce == "none"
        rows = b.batch_size() if per_sample else 1
        flat = A.param_stack(b, e, src, seeds, rows, A.param_like(b, src), per_sample)
        return (y, flat if per_sample else e.method("squeeze", flat, 0))

    return make_product(assemble, model, wrt, summed=_params(wrt) and reduce == "sum", **options)


def jmp(model, wrt: Any = "input", **options) -> Product:
    """Jacobian-matrix product ``J M`` by forward propagation of K tangent columns at once (at most
    ``chunk_size`` at a time where given).

    Returns:
        ``p(*inputs, M) -> (y, J M)``: ``M`` is ``[B, I, K]`` (input) or ``[P, K]`` (parameters, shared by the
        batch); the result is ``[B, O, K]``.
    """
    chunk_size = options.get("chunk_size")
    options = _options(options)

    def assemble(src, b, key):
        xs = A.input_placeholders(b, src)
        m = b.graph.placeholder("M")
        e = A.api_emitter(b)
        if src.wrt_kind == "input":
            x = xs[src.wrt_index]
            n = A.numel_per_sample(src.inputs[src.wrt_index])
            m = e(checks.check_shape, m, (A.size(e, x, 0), n, -1), x, "M")
            cols = e(A.stack_to_shape, m, x)
        else:
            m = e(checks.check_shape, m, (src.P, -1), A.param_like(b, src), "M")
            cols = e.method("t", m)
        if chunk_size is not None:  # the primal before the loop; else interleaved with the tangents, as in jvp
            b.copy_all()

        def push(c, _, n):
            seeds = {src.inputs[src.wrt_index]: c} if src.wrt_kind == "input" else A.param_seeds(e, src, c)
            ty = forward_tangents(b, seeds).get(src.output, ZERO)
            return e(A.zeros_stack, b.env[src.output], n) if ty is ZERO else ty

        ty = through_chunks(e, b, src, e.method("size", m, -1), chunk_size, cols, None, push, cat_dim=0)
        y = b.env[src.output]
        return (y, e(A.stack_to_rows, ty, A.size(e, y, 0)))

    return make_product(assemble, model, wrt, **options)


def mjp(model, wrt: Any = "input", reduce: str = "sum", **options) -> Product:
    """Matrix-Jacobian product ``M J`` by backward propagation of K cotangent rows at once (at most
    ``chunk_size`` at a time where given).

    Returns:
        ``p(*inputs, M) -> (y, M J)``: ``M`` is ``[B, K, O]``; the result is ``[B, K, I]`` (input), ``[K, P]``
        (parameters, summed over the batch) or ``[B, K, P]`` with ``reduce="none"``.
    """
    chunk_size = options.get("chunk_size")
    options = _options(options)
    reduce = _reduce(reduce)

    def assemble(src, b, key):
        xs = A.input_placeholders(b, src)
        m = b.graph.placeholder("M")
        b.copy_all()
        e = A.api_emitter(b)
        y = b.env[src.output]
        batch = A.size(e, y, 0)
        m = e(checks.check_shape, m, (batch, -1, A.numel_per_sample(src.output)), y, "M")
        per_sample = reduce == "none"

        def pull(rows, _, k):  # -> [B, k, I], [B, k, P] (per sample) or [k, P]
            seeds = {src.output: rows}
            if src.wrt_kind == "input":
                x_old = src.inputs[src.wrt_index]
                ct = backward_cotangents(b, seeds, [x_old]).get(x_old, ZERO)
                return e(A.stack_to_batch_rows, e(A.zeros_stack, xs[src.wrt_index], k) if ct is ZERO else ct, batch)
            if not per_sample:
                return A.param_stack(b, e, src, seeds, k, A.param_like(b, src), False)
            stack = A.param_stack(b, e, src, seeds, e(operator.mul, k, batch), A.param_like(b, src), True)
            return e(_ps_rows_to_batch_first, stack, k, batch)

        cat_dim = 0 if src.wrt_kind != "input" and not per_sample else 1
        return (y, through_chunks(e, b, src, e.method("size", m, 1), chunk_size, e(_rows_to_stack, m, y), None,
                                  pull, cat_dim=cat_dim))

    return make_product(assemble, model, wrt, **options)


def _rows_to_stack(m, like):
    """``[B, K, O]`` -> a cotangent stack ``[K, *like.shape]``."""
    return m.transpose(0, 1).reshape((m.shape[1],) + tuple(like.shape))


def _ps_rows_to_batch_first(flat, k, batch):
    """``[K*B, P]`` -> ``[B, K, P]``."""
    return flat.reshape(k, batch, flat.shape[-1]).transpose(0, 1)


def jacobian(model, wrt: Any = "input", mode: str = "auto", **options) -> Product:
    """The Jacobian itself, ``[B, O, I]`` or ``[B, O, P]``, by forward (I or P columns) or reverse (O rows)
    accumulation; ``mode="auto"`` picks the one with fewer columns from the shapes known at build time.

    Returns:
        ``p(*inputs) -> (y, J)``.
    """
    chunk_size = options.get("chunk_size")
    options = _options(options)
    if mode not in ("auto", "forward", "reverse"):
        raise OptionError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}")

    def assemble(src, b, key):
        xs = A.input_placeholders(b, src)
        e = A.api_emitter(b)
        n_out = A.numel_per_sample(src.output)
        n_in = A.numel_per_sample(src.inputs[src.wrt_index]) if src.wrt_kind == "input" else src.P
        forward = mode == "forward" or (mode == "auto" and n_in < n_out)
        b.copy_all()
        y = b.env[src.output]
        if forward:  # columns of J, chunk by chunk, pushed forward
            if src.wrt_kind == "input":
                eye = e(A.eye_stack, xs[src.wrt_index], n_in)
            else:
                eye = e(A.eye_like, A.param_like(b, src), n_in)

            def push(cols, _, n):
                seeds = {src.inputs[src.wrt_index]: cols} if src.wrt_kind == "input" else A.param_seeds(e, src, cols)
                ty = forward_tangents(b, seeds).get(src.output, ZERO)
                return e(A.zeros_stack, y, n) if ty is ZERO else ty

            ty = through_chunks(e, b, src, n_in, chunk_size, eye, None, push, cat_dim=0)
            return (y, e(A.stack_to_rows, ty, A.size(e, y, 0)))
        batch = A.size(e, y, 0)

        def pull(rows, _, n):  # rows of J, chunk by chunk, pulled back
            seeds = {src.output: rows}
            if src.wrt_kind == "input":
                x_old = src.inputs[src.wrt_index]
                ct = backward_cotangents(b, seeds, [x_old]).get(x_old, ZERO)
                return e(A.stack_to_batch_rows, e(A.zeros_stack, xs[src.wrt_index], n) if ct is ZERO else ct, batch)
            flat = A.param_stack(b, e, src, seeds, e(operator.mul, batch, n), A.param_like(b, src), True)
            return e(_ps_rows_to_batch_first, flat, n, batch)

        return (y, through_chunks(e, b, src, n_out, chunk_size, e(A.eye_stack, y, n_out), None, pull, cat_dim=1))

    return make_product(assemble, model, wrt, real_only="jacobian", **options)


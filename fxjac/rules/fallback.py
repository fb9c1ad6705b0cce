"""The autograd fallback: exact derivatives of any op without a structured rule, node-local, via torch.func.

The op is called on the differentiable inputs as a small function ``g``. Tangents: ``torch.func.jvp`` with the
K columns batched by ``vmap``; where forward mode has no formula (fused kernels) the linear map is obtained from
reverse mode (the vjp of the vjp). Cotangents: ``torch.func.vjp``, K columns batched by ``vmap``. Per-sample
stacks (Note [per-sample stacks]) add a ``vmap`` over the batch; where vmap has no batching rule (RNNs) a loop over
the batch is the one Python loop fxjac allows, and the fallback warning names it.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import math

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name
from torch.utils._pytree import tree_leaves, tree_map

from passes.protocol import ZERO, Rule, module_call

_SLOT = "__fxjac_slot_{}__"
_CTX = "__fxjac_ctx_{}__"
# Ops whose tangents come from reverse mode (the vjp of the vjp): those found without a forward-mode formula, and
# from the start those whose forward-mode derivative torch gets wrong. torch 2.13's forward AD of
# scatter_reduce(reduce="prod") is zero (the other reductions are right, but one key per op: all take this path);
# its forward AD of cholesky_inverse is wrong (gradcheck with check_forward_ad fails; probe DD).
_NO_FORWARD_AD: set = {"torch.scatter_reduce", "method:scatter_reduce", "method:scatter_reduce_",
                       "torch.cholesky_inverse", "method:cholesky_inverse"}
_NO_VMAP: set = set()


def _fill(template, primals, ctx=()):
    """Put the differentiated values (and the batched constants) back into the call's argument structure."""

    def fill(v):
        if isinstance(v, str) and v.endswith("__"):
            if v.startswith("__fxjac_slot_"):
                return primals[int(v[len("__fxjac_slot_"):-2])]
            if v.startswith("__fxjac_ctx_"):
                return ctx[int(v[len("__fxjac_ctx_"):-2])]
        return v

    return tree_map(fill, template)


@functools.lru_cache(maxsize=None)
def _resolve(name: str):
    """The function a qualified name (as ``torch.fx`` writes it) refers to."""
    parts = name.split(".")
    if len(parts) == 1:
        return getattr(builtins, name)
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise LookupError(f"cannot resolve {name!r}")


_NAMED: dict = {}
_LABELS: dict = {}  # fallback names of leaf modules -> how messages name them
"""Qualified name -> function, filled when a fallback node is built: generated code names the op by a string,
and a dict lookup (unlike ``importlib``) is something torch.compile can trace."""


def _call(fn, args, kwargs):
    if fn.startswith("method:"):
        return getattr(args[0], fn[len("method:"):])(*args[1:], **kwargs)
    return _target(fn)(*args, **kwargs)


_DENSE_ONLY = frozenset({"torch.view_as_complex"})
"""Ops whose tangents must be dense: a parameter's columns of a ``[B, P]`` tangent are a strided slice (row stride
``P``, maybe odd), which a view as complex numbers (pairs of adjacent reals) cannot take."""


def _flat(spec, v):
    """Leaves of an output-like structure ``v`` along ``spec`` (a missing sub-structure gives Nones)."""
    if isinstance(spec, tuple):
        if v is None:
            return [None] * _count(spec)
        return [leaf for s, x in zip(spec, v) for leaf in _flat(s, x)]
    return [v]


def _count(spec):
    return sum(_count(s) for s in spec) if isinstance(spec, tuple) else 1


def _unflat(spec, leaves):
    it = iter(leaves)

    def build(s):
        return tuple(build(c) for c in s) if isinstance(s, tuple) else next(it)

    return build(spec)


def _spec_leaves(spec):
    if isinstance(spec, tuple):
        return [leaf for s in spec for leaf in _spec_leaves(s)]
    return [spec]


def _op(fn, args, kwargs, ctx=(), spec=True):
    """The op as a function of its differentiated inputs, returning its floating outputs only (one tensor,
    or a tuple of them when the op returns a structure; ``spec`` marks which leaves are floating).
    """

    def g(*primals):
        a, k = _fill((args, kwargs), primals, ctx)
        try:
            if a and isinstance(a[0], torch.nn.RNNBase):  # a leaf RNN (module_call(module, ...))
                # oneDNN's float32 LSTM keeps its backward's workspace for autograd only, not under torch.func's
                # transforms ("Expected a proper Tensor ... 'workspace'"): ATen's own RNN kernels run here
                with torch.backends.mkldnn.flags(enabled=False):
                    out = _call(fn, a, k)
            else:
                out = _call(fn, a, k)
        except RuntimeError as err:
            from ..errors import UnsupportedOpError

            if a and isinstance(a[0], torch.nn.Module) and _autograd_inside(err):
                raise UnsupportedOpError(
                    f"the leaf module {type(a[0]).__name__} takes a derivative with torch.autograd in its forward "
                    "(torch.autograd.grad, requires_grad_), which torch.func's transforms cannot run, and forward-"
                    "mode and per-sample products differentiate a leaf with them. Take that derivative with "
                    "torch.func in the leaf's forward (torch.func.grad, torch.func.jacrev, torch.func.vmap): every "
                    f"product then works ({str(err).splitlines()[0]})") from err
            if "mutate a captured Tensor" not in str(err):
                raise

            what = f"the leaf module {type(a[0]).__name__}" if a and isinstance(a[0], torch.nn.Module) else fn
            raise UnsupportedOpError(
                f"{what} writes to a tensor it does not return (a buffer: self.steps += 1, a running average), "
                "which torch.func refuses while it differentiates the call. Leave it out of leaf_modules (fxjac "
                "then traces it, and a product does not repeat the buffer update), or move the update out of "
                f"the module's call ({str(err).splitlines()[0]})") from err
        if spec is True:
            return out
        return tuple(leaf for leaf, f in zip(_flat(spec, out), _spec_leaves(spec)) if f)

    return g


def _autograd_inside(err: Exception) -> bool:
    """Whether ``err`` is torch.autograd refusing to run inside a torch.func transform (``requires_grad_()`` on a
    wrapped tensor, or ``autograd.grad`` of a value the transform's level does not record).
    """
    text = str(err)
    return "requires_grad_()" in text and ("functorch" in text or "torch.func" in text) or \
        "does not require grad and does not have a grad_fn" in text or "not have been used in the graph" in text


def _key(fn):
    return fn


def _target(fn: str):
    """The callable a fallback node's name refers to (None for a method)."""
    return None if fn.startswith("method:") else (_NAMED.get(fn) or _resolve(fn))


_AUTOGRAD_NAMES: set = set()
"""Names of fallback nodes (leaf modules, the user's functions) that run a custom op inside: differentiated by
torch.autograd (Note [ops torch.func cannot differentiate])."""


def _custom(op) -> bool:
    return isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and \
        op.namespace not in ("aten", "prims", "prim")


def _runs_custom_ops(node: fx.Node) -> bool:
    """Whether a leaf module's or a user function's call (not torch's own ops) runs a custom op, found by running
    it once on the node's example values under a dispatch mode that records the ops' namespaces.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    target = node.target
    if node.op != "call_function" or _custom(target) or (
            target is not module_call and getattr(target, "__module__", "torch").startswith(("torch", "_operator",
                                                                                            "builtins", "math"))):
        return False
    if "fxjac_custom_ops" in node.meta:  # once per node: each product direction builds its template
        return node.meta["fxjac_custom_ops"]

    class Namespaces(TorchDispatchMode):
        found = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Namespaces.found |= _custom(func)
            return func(*args, **(kwargs or {}))

    def value(a):
        return a.meta["module"] if "module" in a.meta else a.meta.get("val")

    from ..tracing import module_state, restore_module_state

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
    state = module_state(args[0]) if target is module_call else []
    try:
        with torch.no_grad(), Namespaces():
            if target is module_call:  # the leaf's own forward: its hooks would keep meta tensors (a user's dict)
                from torch.nn.utils.stateless import _reparametrize_module

                mod, names, params, *rest = args
                with _reparametrize_module(mod, dict(zip(names, params))):
                    mod.forward(*rest, **{k: v for k, v in kwargs.items() if k != "_fields"})
            else:
                target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - not runnable here: as before, torch.func
        Namespaces.found = False
    finally:
        restore_module_state(state)  # (a leaf keeping its last output, self.last = h, on meta tensors)
    node.meta["fxjac_custom_ops"] = Namespaces.found
    return Namespaces.found


def _autograd_only(fn: str) -> bool:
    """Note [ops torch.func cannot differentiate]: a ``torch.library`` custom op (an OpOverload outside aten and
    prims). torch 2.13's torch.func runs no derivative it registers (``register_autograd``): reverse mode raises
    ("must override the setup_context staticmethod"), and forward mode gives zeros, silently. Its derivatives
    come from torch.autograd instead, one column and one sample at a time (no vmap over autograd.grad).
    """
    return fn in _AUTOGRAD_NAMES or _custom(_target(fn))


def _once_differentiable(fn: str) -> bool:
    """A custom autograd Function whose backward is ``@once_differentiable``: the vjp of its vjp is zero, silently
    (torch.func), or raises (autograd).
    """
    cls = getattr(_target(fn), "function_class", None)
    code = getattr(getattr(cls, "backward", None), "__code__", None)
    return code is not None and code.co_filename.replace("\\", "/").endswith("torch/autograd/function.py")


def _not_under_transform(fn: str) -> None:
    from . import _rt

    if _rt.transformed():  # _per_sample's vmap: it then loops over the samples
        raise RuntimeError(f"{fn} is differentiated by torch.autograd, which does not run under torch.func")


def _record(fn: str, g, primals):
    """``g`` run with autograd recording from fresh leaves for ``primals``: (the leaves, its output, the output as
    a tuple).
    """
    _not_under_transform(fn)
    with torch.enable_grad():
        xs = tuple(p.detach().requires_grad_() for p in primals)
        out = g(*xs)
    return xs, out, out if isinstance(out, tuple) else (out,)


def _autograd_vjp(fn: str, g, primals):
    """``torch.func.vjp(g, *primals)`` by torch.autograd (Note [ops torch.func cannot differentiate])."""
    xs, out, outs = _record(fn, g, primals)

    def vjp_fn(ct):
        cts = ct if isinstance(ct, tuple) else (ct,)
        pairs = [(o, c) for o, c in zip(outs, cts) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], xs, [c for _, c in pairs], retain_graph=True,
                                    allow_unused=True) if pairs else (None,) * len(xs)
        return tuple(torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, xs))

    vjp_fn.columns_one_by_one = True  # no vmap over autograd.grad (:func:`_vmap_columns`)
    return tree_map(torch.Tensor.detach, out), vjp_fn


def _func_or_autograd(fn: str, func, autograd):
    """``func()`` by torch.func, or ``autograd()`` where the op is, or turns out to be, one torch.func cannot
    differentiate: a custom Function of the old style (``forward(ctx, ...)``) inside a leaf module raises.
    """
    if _autograd_only(fn):
        return autograd()
    try:
        return func()
    except RuntimeError as err:
        if "setup_context staticmethod" not in str(err):
            raise
    _AUTOGRAD_NAMES.add(fn)
    return autograd()


def _vjp(fn: str, g, primals):
    return _func_or_autograd(fn, lambda: torch.func.vjp(g, *primals), lambda: _autograd_vjp(fn, g, primals))


_COMPLEX = (" Diagonal back-propagation squares the entries of each op's Jacobian, which torch.func builds for "
            "real tensors only: through complex values (torch.fft, view_as_complex) use method='exact'.")


def _jacobians(fn: str, g, primals):
    """``g``'s Jacobians w.r.t. each primal (for each floating output, when there are several)."""
    def autograd():
        _not_under_transform(fn)
        return torch.autograd.functional.jacobian(g, tuple(primals))

    try:
        return _func_or_autograd(fn, lambda: torch.func.jacrev(g, argnums=tuple(range(len(primals))))(*primals),
                                 autograd)
    except RuntimeError as err:
        if "complex" not in str(err):
            raise
        from ..errors import UnsupportedOpError
        raise UnsupportedOpError(f"the autograd fallback differentiates {fn} entry by entry here (a diagonal), "
                                 f"and its Jacobian has complex entries: {err}.{_COMPLEX}") from err


def _autograd_jvp(fn: str, g, primals, tangents):
    """The tangent columns of an op torch.func cannot differentiate: the vjp of its vjp, by torch.autograd."""
    xs, out, outs = _record(fn, g, primals)
    with torch.enable_grad():
        us = tuple(torch.zeros_like(o, requires_grad=True) for o in outs)
        live = [i for i, o in enumerate(outs) if o.requires_grad]
        try:
            gx = torch.autograd.grad([outs[i] for i in live], xs, [us[i] for i in live], create_graph=True,
                                     allow_unused=True) if live else (None,) * len(xs)
        except RuntimeError as err:
            _no_tangents(fn, err, err)
        pairs = [(gr, t) for gr, t in zip(gx, tangents) if gr is not None and isinstance(t, torch.Tensor)]
        if any(not gr.requires_grad for gr, _ in pairs):
            _no_tangents(fn, "its registered backward is not differentiable")
        cols = []
        for k in range(_columns(tangents)):
            got = torch.autograd.grad([gr for gr, _ in pairs], us, [t[k] for _, t in pairs], retain_graph=True,
                                      allow_unused=True) if pairs else (None,) * len(us)
            cols.append(tuple(torch.zeros_like(u) if c is None else c.detach() for c, u in zip(got, us)))
    stacked = tuple(torch.stack(c) for c in zip(*cols))
    return stacked if isinstance(out, tuple) else stacked[0]


def _no_tangents(fn, why, cause=None):
    from ..errors import UnsupportedOpError

    cls = getattr(_target(fn), "function_class", None)
    name = f"the custom autograd Function {cls.__qualname__}" if cls is not None else _LABELS.get(fn, fn)
    raise UnsupportedOpError(
        f"the autograd fallback cannot give tangents through {name}: it has no forward-mode derivative, and the one "
        f"fxjac takes from reverse mode (the vjp of its vjp) needs a differentiable backward ({why}). Products that "
        "push tangents forward (jvp, jmp, jacobian(mode='forward'), jmjtp(mode='forward'), which mode='auto' picks "
        "where M has fewer columns than the output has entries) are unavailable through it; the reverse products "
        "(vjp, mjp, jacobian(mode='reverse'), jmjtp(mode='reverse'), jtmjp, ggn) work. A custom Function gets them "
        "from a jvp staticmethod") from cause


def _expanded(t) -> bool:
    return isinstance(t, torch.Tensor) and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


def _columns(tangents) -> int:
    return next((t.shape[0] for t in tangents if isinstance(t, torch.Tensor)), 1)


def _no_vmap_support(err: Exception) -> bool:
    """A custom ``torch.autograd.Function`` without a vmap rule (no ``vmap`` staticmethod, no
    ``generate_vmap_rule``) was vmapped: torch.func differentiates it one column at a time.
    """
    return isinstance(err, RuntimeError) and ("does not have vmap support" in str(err)
                                              or "inside of vmap" in str(err))  # (NYI: is_contiguous in SDPA)


def _vmap_columns(f, *stacks):
    """``torch.vmap(f)(*stacks)``; one column is one call (no vmap: under torch.compile with a symbolic batch
    size, vmap over some ops' derivatives fails in dynamo, irfft2's after an index_put), and so is each column
    where ``f`` runs a custom Function that vmap cannot.
    """
    k = tree_leaves(stacks)[0].shape[0]
    if k != 1 and not getattr(f, "columns_one_by_one", False):
        try:
            return torch.vmap(f)(*stacks)
        except RuntimeError as err:
            if not _no_vmap_support(err):
                raise
    cols = [f(*tree_map(lambda t: t[i], stacks)) for i in range(k)]
    return tree_map(lambda *c: torch.stack(c), *cols)


def _jvp_columns(g, primals, tangents, fn):
    """``J t`` for a stack of tangent columns (dimension 0 of every tangent)."""
    key = _key(fn)
    # Forward mode attaches a tangent to each primal in place, which an expanded view (stride 0) refuses.
    primals = tuple(p.contiguous() if _expanded(p) else p for p in primals)
    if fn in _DENSE_ONLY:
        tangents = tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in tangents)
    # Under torch.compile, forward mode inside a vmap over several columns or over the batch fails in dynamo's
    # fake tensors (torch 2.13: an internal assert on ``_fw_primal``), and so does one column through some ops
    # once the batch size is symbolic (linalg.inv: "Cannot call storage_offset() on tensor with symbolic sizes").
    # Reverse mode traces.
    reverse = torch.compiler.is_compiling()
    return _func_or_autograd(fn, lambda: _func_jvp(g, primals, tangents, fn, key, reverse),
                             lambda: _autograd_jvp(fn, g, primals, tangents))


def _func_jvp(g, primals, tangents, fn, key, reverse):
    if key not in _NO_FORWARD_AD and not reverse:
        try:
            return _vmap_columns(lambda *ts: torch.func.jvp(g, primals, ts)[1], *tangents)
        except (RuntimeError, NotImplementedError) as err:
            if "forward" not in str(err).lower() and "jvp" not in str(err).lower() or "setup_context" in str(err):
                raise
            _NO_FORWARD_AD.add(key)
    # Reverse mode only: the vjp is linear in the cotangent, so its own vjp is the jvp.
    if _once_differentiable(fn):
        _no_tangents(fn, "its backward is @once_differentiable")
    out, vjp_fn = torch.func.vjp(g, *primals)
    zeros = tree_map(torch.zeros_like, out)
    # An op without a derivative at all fails here, its raw error told by _needs_derivative; one without a second
    # derivative fails below.
    _, vjp2 = torch.func.vjp(lambda u: vjp_fn(u), zeros)
    try:
        return _vmap_columns(lambda *ts: vjp2(ts)[0], *tangents)
    except (RuntimeError, NotImplementedError) as err:  # no double backward either (EmbeddingBag with max_norm;
        # with per_sample_weights, a RuntimeError "derivative for … is not implemented")
        if not isinstance(err, NotImplementedError) and "not implemented" not in str(err):
            raise
        _no_tangents(fn, err, err)


def _restructure(spec, floats):
    """Put the floating outputs' stacks back into the op's output structure (None for the others)."""
    if spec is True:
        return floats
    it = iter(floats)
    return _unflat(spec, [next(it) if f else None for f in _spec_leaves(spec)])


def _float_cts(spec, ct, out_value, per_sample_dim=None):
    """The cotangents of the floating outputs as a tuple of stacks, zeros where none flows."""
    if spec is True:
        return ct
    cts = _flat(spec, ct)
    outs = _flat(spec, out_value)
    k = next(c.shape[0] for c in cts if isinstance(c, torch.Tensor))
    return tuple(c if c is not None else o.new_zeros((k,) + tuple(o.shape))
                 for c, o, f in zip(cts, outs, _spec_leaves(spec)) if f)


def _per_sample(fn, primals, bdims, ctx, cdims, extra, extra_dims, body, out_dims, expect=None):
    """Run ``body(xs, ctx, *extra)`` one sample at a time: batched primals and constants sliced along their
    batch axes (``bdims``, ``cdims``; a unit axis is kept so the op sees a batch of one), ``extra`` stacks
    along ``extra_dims``; each result gains the batch back at its entry of ``out_dims``.

    Uses ``vmap`` over the batch; where the op has no batching rule (RNN kernels), or vmap's results do not have
    the ``expect``ed shapes, loops over the batch (the one Python loop fxjac allows; the fallback warning names
    the op).
    """
    n = len(primals)

    def one(*flat):
        xs, cs, ex = flat[:n], flat[n:n + len(ctx)], flat[n + len(ctx):]
        xs = tuple(x.unsqueeze(d) if d is not None else x for x, d in zip(xs, bdims))
        cs = tuple(c.unsqueeze(d) for c, d in zip(cs, cdims))
        return body(xs, cs, *ex)

    in_dims = tuple(bdims) + tuple(cdims) + tuple(extra_dims)
    flat_in = (*primals, *ctx, *extra)
    batch = next(t.shape[d] for t, d in zip(flat_in, in_dims) if d is not None)
    if fn not in _NO_VMAP:
        try:
            res = torch.vmap(one, in_dims=in_dims, out_dims=out_dims)(*flat_in)
            if expect is None or [tuple(r.shape) for r in res] == [tuple(e) for e in expect]:
                return res
            # A batching rule that is wrong under nested vmap (torch 2.13's prelu backward returns the batch
            # where the columns belong): never trust its values; the loop below is right.
        except (RuntimeError, NotImplementedError, ValueError, IndexError):
            # No batching rule, or a kernel that mixes vmapped and plain tensors in place (RNNs): the loop below
            # computes the same samples one by one (and raises its own error if the op itself fails).
            pass
        _NO_VMAP.add(fn)
    from ..errors import FxJacError, UnsupportedOpError

    try:
        results = [one(*[t.select(d, i) if d is not None else t for t, d in zip(flat_in, in_dims)])
                   for i in range(batch)]
    except FxJacError:
        raise
    except (IndexError, RuntimeError, ValueError) as err:
        if _no_derivative(err):
            raise  # (:func:`_needs_derivative` says so)

        msg = f"the autograd fallback differentiates {fn} one sample at a time here (per-sample results, or a " \
              f"diagonal), and the op fails on one sample: {err}."
        if "complex" in str(err):
            msg += _COMPLEX
        elif isinstance(err, IndexError) or "index" in str(err):
            msg += (" An index that addresses the batch axis (h[torch.arange(B)[:, None], idx]) or samples merged "
                    "into one axis with indices across it (a batch of graphs as one node set) cannot be split "
                    "into samples; index each sample along its own axes (h[:, idx], torch.gather, index_add over "
                    "axis 1 of [B, N, F])")
        raise UnsupportedOpError(msg) from err
    return tuple(torch.stack(rs, dim=d) for rs, d in zip(zip(*results), out_dims))


def _stack_dims(bdims):
    """Batch axes of stacks ``[K, *x]`` (one more), and ``1`` for unbatched values' per-sample ``[K, B, *s]``."""
    return tuple(1 + d if d is not None else 1 for d in bdims)


def _squeeze_batch(ts, bdims):
    return tuple(t.squeeze(1 + d) if d is not None else t for t, d in zip(ts, bdims))


def _no_derivative(err: Exception) -> bool:
    """Whether ``err`` is torch's for an op without a derivative (not an fxjac error: those subclass
    NotImplementedError too).
    """
    text = str(err)
    return type(err) in (RuntimeError, NotImplementedError) and "derivative for" in text and "not implemented" in text


def _needs_derivative(f):
    """``f`` (a fallback kernel) with torch's "derivative for … is not implemented" (an op ATen has no
    derivative for: ``special.zeta`` in x) raised as one UnsupportedOpError in every product.
    """
    @functools.wraps(f)
    def wrapper(fn, *args, **kwargs):
        try:
            return f(fn, *args, **kwargs)
        except RuntimeError as err:
            if not _no_derivative(err):
                raise
            from ..errors import UnsupportedOpError

            raise UnsupportedOpError(f"torch has no derivative for {fn} ({str(err).splitlines()[0]}), so no product "
                                     "goes through it: detach its input where it is a constant, or compute it "
                                     "outside the model") from err
    return wrapper


@_needs_derivative
def fallback_jvp(fn, args, kwargs, primals, tangents, bdims, ctx=(), cdims=(), per_sample=False, spec=True,
                 odims=(0,)):
    """Tangent stack of ``fn(*args, **kwargs)`` for the given tangent stacks of ``primals``.

    ``bdims[i]`` is primal i's batch axis (None: unbatched); ``ctx`` are batched tensors that are not
    differentiated (batch axes ``cdims``). With ``per_sample``, the tangents of unbatched primals are per-sample
    stacks ``[K, B, *s]`` and the op is differentiated sample by sample. ``spec`` marks the floating leaves of a
    structured output, ``odims`` their batch axes.
    """
    if not per_sample:
        out = _jvp_columns(_op(fn, args, kwargs, ctx, spec), tuple(primals), tuple(tangents), fn)
        return _restructure(spec, out)

    def body(xs, cs, *ts):
        ts = tuple(t.unsqueeze(1 + d) if d is not None else t for t, d in zip(ts, bdims))
        out = _jvp_columns(_op(fn, args, kwargs, cs, spec), xs, ts, fn)
        outs = (out,) if spec is True else tuple(out)
        for o, d in zip(outs, odims):
            if o.shape[1 + d] != 1:  # the cotangent path's autograd reports this as a shape mismatch
                raise ValueError(f"its output for one sample has {o.shape[1 + d]} entries along the batch axis "
                                 f"{d}, not 1 (a size read from the whole batch, such as x.shape[1], is fixed in "
                                 "the call)")
        return _squeeze_batch(outs, odims)

    res = _per_sample(fn, primals, bdims, ctx, cdims, tangents, _stack_dims(bdims), body, _stack_dims(odims))
    return _restructure(spec, res[0] if spec is True else res)


@_needs_derivative
def fallback_vjp(fn, args, kwargs, primals, ct, bdims, ctx=(), cdims=(), per_sample=False, spec=True,
                 out_value=None, odims=(0,)):
    """Cotangent stacks of ``primals`` (a tuple) given the output cotangent stack ``ct``.

    With ``per_sample``, the cotangents of unbatched primals are per-sample stacks ``[K, B, *s]``.
    """
    cts = _float_cts(spec, ct, out_value)
    if not per_sample:
        _, vjp_fn = _vjp(fn, _op(fn, args, kwargs, ctx, spec), primals)
        return _vmap_columns(vjp_fn, cts)
    cts = cts if isinstance(cts, tuple) else (cts,)

    def body(xs, cs, *c):
        _, vjp_fn = _vjp(fn, _op(fn, args, kwargs, cs, spec), xs)
        c = tuple(ci.unsqueeze(1 + d) for ci, d in zip(c, odims))
        res = _vmap_columns(vjp_fn, c if spec is not True else c[0])
        return _squeeze_batch(res, bdims)

    return _per_sample(fn, primals, bdims, ctx, cdims, cts, _stack_dims(odims), body, _stack_dims(bdims),
                       _cotangent_shapes(primals, bdims, cts, odims))


def _cotangent_shapes(primals, bdims, stacks, odims):
    """Shapes of the primals' cotangent stacks: ``[K, *x]``, or ``[K, B, *s]`` for unbatched (per-sample) ones."""
    k, batch = stacks[0].shape[0], stacks[0].shape[1 + odims[0]]
    return [(k,) + tuple(x.shape) if d is not None else (k, batch) + tuple(x.shape) for x, d in zip(primals, bdims)]


@_needs_derivative
def fallback_diag_vjp(fn, args, kwargs, primals, d, bdims, ctx=(), cdims=(), per_sample=False, spec=True,
                      out_value=None, odims=(0,)):
    """``(A∘A)ᵀ d`` for each primal from the op's dense per-sample local Jacobian (exact, costly).

    Samples are independent, so the op is differentiated on one sample at a time.
    """
    n = len(primals)
    ds = _float_cts(spec, d, out_value)
    ds = ds if isinstance(ds, tuple) else (ds,)
    if not ctx and all(b is None for b in bdims):
        return _shared_diag_vjp(fn, args, kwargs, primals, ds, per_sample, spec)

    def body(xs, cs, *dd):
        jacs = _jacobians(fn, _op(fn, args, kwargs, cs, spec), xs)
        if spec is True:
            jacs = (jacs,)
        res = [0] * n
        for jo, do, od in zip(jacs, dd, odims):  # one entry per floating output
            do = do.unsqueeze(1 + od)  # [K, *out_sample] with the unit batch axis the sliced call keeps
            n_out = math.prod(do.shape[1:])
            for i, (j, x) in enumerate(zip(jo, xs)):
                sq = (j * j).reshape(n_out, -1)
                res[i] = res[i] + (do.reshape(do.shape[0], -1) @ sq).reshape((do.shape[0],) + tuple(x.shape))
        return _squeeze_batch(res, bdims)

    res = _per_sample(fn, primals, bdims, ctx, cdims, ds, _stack_dims(odims), body, _stack_dims(bdims),
                      _cotangent_shapes(primals, bdims, ds, odims))
    return tuple(r if d is not None or per_sample else r.sum(1) for r, d in zip(res, bdims))


def _shared_squares(fn, args, kwargs, primals, spec) -> list:
    """For an op on unbatched values alone (a weight's parametrization: weight_norm, spectral_norm, orthogonal;
    ``a @ b``): its one local Jacobian, shared by the samples, squared: for each floating output, one
    ``(A∘A as [numel(y), numel(x)], y's shape)`` per primal ``x``.
    """
    jacs = _jacobians(fn, _op(fn, args, kwargs, (), spec), primals)
    out = []
    for jo in (jacs,) if spec is True else jacs:
        shapes = [tuple(j.shape[:j.dim() - x.dim()]) for j, x in zip(jo, primals)]
        out.append([((j * j).reshape(math.prod(y), x.numel()), y) for j, x, y in zip(jo, primals, shapes)])
    return out


def _shared_diag_vjp(fn, args, kwargs, primals, ds, per_sample, spec):
    """:func:`fallback_diag_vjp` of an op on unbatched values alone (:func:`_shared_squares`), applied to the
    diagonals ``[K, *y]`` or per-sample ``[K, B, *y]`` (summed over the batch unless ``per_sample``).
    """
    res = [0] * len(primals)
    for squares, do in zip(_shared_squares(fn, args, kwargs, primals, spec), ds):  # one per floating output
        for i, ((sq, y), x) in enumerate(zip(squares, primals)):
            lead = tuple(do.shape[:do.dim() - len(y)])
            r = (do.reshape(math.prod(lead), -1) @ sq).reshape(lead + tuple(x.shape))
            res[i] = res[i] + (r.sum(1) if len(lead) == 2 and not per_sample else r)
    return tuple(res)


@_needs_derivative
def fallback_diag_jvp(fn, args, kwargs, primals, ds, bdims, ctx=(), cdims=(), per_sample=False, spec=True,
                      odims=(0,)):
    """``Σ_i (A_i∘A_i) d_i`` from the op's dense per-sample local Jacobian (exact, costly); diagonals of
    unbatched primals (parameters) are shared by the batch.
    """
    if per_sample:
        raise NotImplementedError("per-sample diagonals are not propagated forward")
    if not ctx and all(b is None for b in bdims):  # a weight computed from parameters alone
        res = [sum((d.reshape(d.shape[0], x.numel()) @ sq.t()).reshape((d.shape[0],) + y)
                   for (sq, y), x, d in zip(squares, primals, ds))
               for squares in _shared_squares(fn, args, kwargs, primals, spec)]  # one per floating output
        return _restructure(spec, res[0] if spec is True else tuple(res))

    def body(xs, cs, *dd):
        jacs = _jacobians(fn, _op(fn, args, kwargs, cs, spec), xs)
        outs = jacs if spec is not True else (jacs,)
        res = []
        for jo in outs:  # one entry per floating output
            total = 0
            for j, x, d, bd in zip(jo, xs, dd, bdims):
                d = d.unsqueeze(1 + bd) if bd is not None else d
                n_in = x.numel()
                sq = (j * j).reshape(-1, n_in)
                out_shape = (d.shape[0],) + tuple(j.shape[:j.dim() - x.dim()])
                total = total + (d.reshape(d.shape[0], n_in) @ sq.t()).reshape(out_shape)
            res.append(total)
        return _squeeze_batch(res, odims)

    in_dims = tuple(1 + d if d is not None else None for d in bdims)
    res = _per_sample(fn, primals, bdims, ctx, cdims, ds, in_dims, body, _stack_dims(odims))
    return _restructure(spec, res[0] if spec is True else res)


def output_spec(val):
    """``True`` for a single tensor output, else the output's structure with a flag per leaf: floating, and not
    empty (``linalg.lstsq``'s residuals ``[0]``: nothing to differentiate, and no batch axis to split)?
    """
    if isinstance(val, (tuple, list)):
        return tuple(output_spec(v) if isinstance(v, (tuple, list)) else
                     bool(isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel())
                     for v in val)
    return True


def _by_node(site, tangents: dict) -> dict:
    """The tangents keyed by the original input node they belong to (list arguments flattened)."""
    tan_of = {}

    def collect(t, old_v):
        if isinstance(old_v, fx.Node):
            if t is not ZERO:
                tan_of[old_v] = t
        elif isinstance(old_v, (list, tuple)) and t is not ZERO:
            for ti, oi in zip(t, old_v):
                collect(ti, oi)

    for k, t in tangents.items():
        collect(t, site.extra["old_args"][k])
    return tan_of


class Fallback(Rule):
    """Any op: node-local torch.func derivatives (exact; slower than a structured rule)."""

    signature = None
    kind = "fallback"

    @staticmethod
    def _template(site, pick):
        """The call as (qualified name, args, kwargs) with slots for the differentiated inputs (those ``pick``
        chooses) and for the other batched tensors (sliced per sample where needed); returns both lists.
        """
        node = site.node
        n_pos = sum(1 for k in site.args if k.isdigit())
        old = site.extra["old_args"]
        batched = site.extra["batched"]
        chosen, ctx = [], []

        def mark(new, old_v):
            if isinstance(new, fx.Node):
                for i, (o, _) in enumerate(chosen):
                    if o is old_v:  # the same value at two places: one slot, so contributions add
                        return _SLOT.format(i)
                if pick(old_v, new):
                    chosen.append((old_v, new))
                    return _SLOT.format(len(chosen) - 1)
                if new in batched and isinstance(old_v.meta.get("val"), torch.Tensor):
                    if new not in ctx:
                        ctx.append(new)
                    return _CTX.format(ctx.index(new))
                return new
            if isinstance(new, (list, tuple)):
                return type(new)(mark(a, b) for a, b in zip(new, old_v))
            if isinstance(new, dict):
                return {k: mark(new[k], old_v[k]) for k in new}
            return new

        t_args = tuple(mark(site.args[str(i)], old[str(i)]) for i in range(n_pos))
        t_kwargs = {k: mark(v, old[k]) for k, v in site.args.items() if not k.isdigit()}
        if node.op == "call_method":
            name = "method:" + node.target
        else:
            name = _get_qualified_name(node.target)
            try:
                found = _resolve(name)
            except (LookupError, AttributeError):
                found = None
            if found is None or found != node.target:  # not importable under its name (a class defined in a
                name = f"{name}@{id(node.target):x}"     # function, a custom Function's apply): by identity
                found = node.target
            custom = _runs_custom_ops(node)
            if node.target is module_call or custom:
                # This node only: each leaf module is differentiated by torch.func or by torch.autograd on its own
                # (Note [ops torch.func cannot differentiate]).
                name = f"{name}@{id(node):x}"
                mod = site.val("0") if node.target is module_call else None
                if isinstance(mod, torch.nn.Module):
                    path = node.args[0].target if isinstance(node.args[0], fx.Node) else node.name
                    _LABELS[name] = f"the module kept whole {type(mod).__name__} ({path})"
                if custom:
                    _AUTOGRAD_NAMES.add(name)
            _NAMED[name] = found
        return name, t_args, t_kwargs, chosen, tuple(ctx)

    def jvp(self, e, site, tangents):  # noqa: D102
        return self._push(e, site, tangents, fallback_jvp)

    def diag_jvp(self, e, site, tangents):  # noqa: D102
        if site.ps:
            raise NotImplementedError("per-sample diagonals are not propagated forward")
        return self._push(e, site, tangents, fallback_diag_jvp)

    def _push(self, e, site, tangents, kernel):
        tan_of = _by_node(site, tangents)
        fn, t_args, t_kwargs, chosen, ctx = self._template(site, lambda old_v, new: old_v in tan_of)
        primals = tuple(new for _, new in chosen)
        stacks = tuple(tan_of[old_v] for old_v, _ in chosen)
        spec = output_spec(site.out_val)
        return e(kernel, fn, t_args, t_kwargs, primals, stacks, *self._dims(site, primals, ctx, spec),
                 bool(site.ps), spec, self._out_dims(site, spec))

    @staticmethod
    def _dims(site, primals, ctx, spec):
        """(batch axes of the primals, the batched constants, their axes)."""
        batched = site.extra["batched"]
        return tuple(batched.get(p) for p in primals), ctx, tuple(batched[c] for c in ctx)

    @staticmethod
    def _out_dims(site, spec):
        """Batch axes of the floating outputs (0 where not measured)."""
        od = site.extra.get("out_batch_dim", 0)
        if spec is True:
            return (od if isinstance(od, int) else 0,)
        flat = _flat(spec, od if isinstance(od, tuple) else None)
        return tuple(d if isinstance(d, int) else 0 for d, f in zip(flat, _spec_leaves(spec)) if f)

    def vjp(self, e, site, ct):  # noqa: D102
        return self._pull(e, site, ct, fallback_vjp, bool(site.ps))

    def diag_vjp(self, e, site, d):  # noqa: D102
        return self._pull(e, site, d, fallback_diag_vjp, bool(site.ps))

    def _pull(self, e, site, ct, kernel, per_sample):
        need = site.extra.get("need")

        def pick(old_v, new):
            val = old_v.meta.get("val")
            if not (isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex())):
                return False
            return need is None or any(old_v is a or (isinstance(a, (list, tuple)) and old_v in a)
                                       for k, a in site.extra["old_args"].items() if k in need)

        fn, t_args, t_kwargs, chosen, ctx = self._template(site, pick)
        if not chosen:
            return {}
        primals = tuple(new for _, new in chosen)
        spec = output_spec(site.out_val)
        res = e(kernel, fn, t_args, t_kwargs, primals, ct, *self._dims(site, primals, ctx, spec), per_sample,
                spec, site.out if spec is not True else None, self._out_dims(site, spec))
        # Hand each chosen input its cotangent, in the argument structure the pass expects. A value at several
        # places had one slot, whose cotangent already sums them: it is handed over at the first place only.
        per_node = {old_v: e(_getitem, res, i) for i, (old_v, _) in enumerate(chosen)}

        def take(a):
            return per_node.pop(a) if isinstance(a, fx.Node) and a in per_node else ZERO

        out = {}
        for k, old_v in site.extra["old_args"].items():
            if isinstance(old_v, fx.Node) and old_v in per_node:
                out[k] = take(old_v)
            elif isinstance(old_v, (list, tuple)) and any(isinstance(a, fx.Node) and a in per_node for a in old_v):
                out[k] = [take(a) for a in old_v]
        return out


def _getitem(seq, i):
    """``seq[i]`` (a named function so generated code reads clearly)."""
    return seq[i]


__all__ = ["Fallback", "fallback_diag_jvp", "fallback_diag_vjp", "fallback_jvp", "fallback_vjp", "module_call"]

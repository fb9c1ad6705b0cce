"""Small run-time helpers that generated product code calls (plain tensor ops, so torch.compile traces them).

Stacks follow Note [stacked columns] in ``passes/protocol.py``: one leading column axis ``K``.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import operator
import os
import sys
import typing
import warnings

import torch
import torch.fx as fx

from ..tracing import transformed


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


def sum_rows_here(site, name: str) -> None:
    """Tell the backward pass that the rule summed ``name``'s per-sample cotangent over each sample's rows itself
    (Note [merged batch]), so the pass does not (a weight's per-row cotangents are T times larger).
    """
    site.extra.setdefault("rows_summed", set()).add(name)


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


def select(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` where the 0/1 ``mask`` is nonzero, else 0: a mask's product as autograd's ``where`` computes it (a NaN
    or inf of ``t`` outside the mask stays out).
    """
    return torch.where(mask != 0, t, 0.0)


def one_column(parts, mask) -> tuple:
    """The results of an ATen backward kernel run on one column, as stacks ``[1, *]`` (``None`` where ``mask``
    did not ask for them): the fused single-column paths of the convolution and normalisation rules.
    """
    return tuple(p.unsqueeze(0) if m else None for p, m in zip(parts, mask))


def records_grad(*tensors) -> bool:
    """Whether autograd records an op on these (a ``differentiable=True`` product), or a torch.func transform
    does (``jacfwd``, ``jvp``, ``vmap`` over a product: its tensors are wrapped): kernels without a double
    backward, that write ``out=`` or that reuse statistics without a tangent must not be used then.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    return not torch.compiler.is_compiling() and transformed()


# Note [reused cotangents]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# A stack of K columns through a convolutional net is the largest tensor of a product (the cnn's first
# activation with 10 columns: 42 MB). On CPU every fresh buffer that large is new memory from the kernel, and its
# page faults cost more than the arithmetic (a ReLU's mask on it: 10 ms into a new buffer, 1 ms in place). So an
# activation's fused backward kernel writes into the cotangent it reads when that cotangent is memory nothing
# else reads: the result of a kernel that allocates it (marked with :func:`allocates`, or the sum of two stacks),
# read by that one kernel alone. That is checked when the rule emits the kernel and again on the finished graph
# (passes/clean.py), as a reader may come later: an addition hands the same cotangent to both of its inputs, so
# ``tanh(x) + x`` gives ``x`` the very cotangent that tanh's kernel reads. :func:`into_cotangent` still runs the
# plain kernel where writing in place is not allowed: under autograd, under torch.compile, or where the result
# would not have the cotangent's shape and dtype.

ALLOCATING: set = set()
WRITERS: dict = {}  # name -> a backward kernel with a ``grad_input=`` form (product code names it: fx prints no ops)


def allocates(fn):
    """Mark a kernel whose results are memory it allocated, read by nothing else (Note [reused cotangents])."""
    ALLOCATING.add(fn)
    return fn


def writes_into(fn):
    """Register a backward kernel ``fn(t, *args, grad_input=None)`` that may write its result into ``t``."""
    WRITERS[fn.__name__] = fn
    return fn


def fresh(node) -> bool:
    """Whether the value of a product-graph node is memory that only its one reader reads."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.users) != 1:
        return False
    if node.target is operator.getitem:
        src = node.args[0]
        return isinstance(src, fx.Node) and src.op == "call_function" and src.target in ALLOCATING
    if node.target is operator.add:
        return all(isinstance(a, fx.Node) for a in node.args)
    return node.target in ALLOCATING


def reuse_cotangent(node, ct) -> None:
    """Turn ``node``, where it is a call of a registered kernel on ``ct``, into one that writes into ``ct`` where
    ``ct`` is memory no one else reads (any other node is left as it is). Marked with its plain form, which
    clean-up restores where ``ct`` has another reader in the finished graph (passes/clean.py).
    """
    name = getattr(node.target, "__name__", None)
    if node.args[:1] == (ct,) and WRITERS.get(name) is node.target and fresh(ct):
        node.meta.update(plain=node.target, plain_drop=1, writes_arg=1)
        node.args, node.target = (name,) + node.args, into_cotangent


def _broadcasts_to(shape, target) -> bool:
    """Whether ``shape`` broadcasts to ``target`` itself (torch.broadcast_shapes took 0.05 ms a call)."""
    return len(shape) <= len(target) and all(s == 1 or s == u for s, u in zip(reversed(shape), reversed(target)))


def into_cotangent(name, t, *args, **kwargs):
    """``kernel(t, *args)`` for the kernel registered as ``name``, written into ``t`` where allowed (Note
    [reused cotangents]); under torch.compile only ReLU's mask, as a custom op that inductor writes in place
    (Note [eager kernels under torch.compile]).
    """
    kernel = WRITERS[name]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if records_grad(t, *tensors) or \
            any(a.dtype != t.dtype or not _broadcasts_to(a.shape, t.shape) for a in tensors):
        return kernel(t, *args, **kwargs)
    if torch.compiler.is_compiling():
        if name != "threshold_backward" or args[1:] != (0,):
            return kernel(t, *args, **kwargs)
        _relu_mask_(t, args[0])
        return t
    return kernel(t, *args, grad_input=t, **kwargs)


# Note [opaque ops]
# ~~~~~~~~~~~~~~~~~
# The kernels that torch.compile calls as they are (Note [eager kernels under torch.compile], Note [flat writes
# under torch.compile], Note [convolutions under torch.compile] in fxjac/rules/conv.py) are operators of the
# library ``fxjac`` with one CompositeExplicitAutograd kernel and a fake kernel for tracing. They were
# ``torch.library.custom_op``s, whose calls go through Python layers of their own (an autograd kernel, a
# dynamo-disabled wrapper): 10-40 us a call alone, 0.1 ms a convolution inside a compiled product, so that
# the cnn's compiled summed vjp (14 such calls) was 1.12x its eager time with every kernel the same. Through
# the dispatcher straight to the kernel a call costs about 1 us. They have no derivative and are called only
# where autograd records nothing (``records_grad``).

_LIB = torch.library.Library("fxjac", "DEF")


def opaque_op(fake=None, mutates_args=()):
    """Decorate a kernel (its arguments annotated, as for ``torch.library.custom_op``) into the operator
    ``torch.ops.fxjac.<name>.default`` (the kernel's name without leading underscores); ``fake`` gives its
    results' shapes and dtypes from the arguments (``None``: the kernel itself, made of ATen ops that fake
    tensors run) (Note [opaque ops]).
    """

    def wrap(fn):
        name = fn.__name__.lstrip("_")
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(f"fxjac::{name}", fake or fn, lib=_LIB)
        return getattr(torch.ops.fxjac, name).default

    return wrap


# Note [eager kernels under torch.compile]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Inductor traces through the rules' kernels and generates its own loops for them. For a few that are one ATen
# kernel with reshapes around it (a max-pool scatter), a strided view copied once (im2col patches) or a mask
# written into a fresh stack, its loops were 2-5x slower than the eager code on CPU (the cnn's exact GGN
# diagonal: 127 ms compiled against 107 ms eagerly). Under torch.compile these run as opaque ops (Note [opaque
# ops]), which inductor calls as they are; not where autograd records them (differentiable products), as they
# have no derivative of their own.


def eager_under_compile(fake):
    """Decorate a kernel (its arguments annotated for a custom op's schema) so that torch.compile calls it as
    one opaque op ``fxjac::<name>``; ``fake`` gives the result's shape and dtype from the arguments.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def fresh_result(*args):  # a custom op's result may not alias its inputs (a 1x1 kernel's patches: a view)
            out = fn(*args)
            storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            return tuple(_unaliased(o, storages) for o in out) if isinstance(out, tuple) else \
                _unaliased(out, storages)

        sig, hints = inspect.signature(fn), typing.get_type_hints(fn)  # the schema, from fn's own module
        fresh_result.__signature__ = sig.replace(
            parameters=[q.replace(annotation=hints.get(q.name, q.annotation)) for q in sig.parameters.values()],
            return_annotation=hints.get("return", sig.return_annotation))
        op = opaque_op(fake)(fresh_result)

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling() and not records_grad(*[a for a in args if isinstance(a, torch.Tensor)]):
                return op(*args)
            return fn(*args)

        return call

    return wrap


def _unaliased(t, storages):
    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in storages:
        return t.clone()
    return t


@opaque_op(lambda t, y: None, mutates_args={"t"})
def _relu_mask_(t: torch.Tensor, y: torch.Tensor) -> None:
    """``t[y <= 0] = 0`` in place: ReLU's backward kernel writing into its cotangent stack ``t``."""
    torch.ops.aten.threshold_backward(t, y, 0, grad_input=t)


_HUGE_PAGE = 1 << 21  # a transparent huge page of x86-64 and arm64 Linux
_HUGE_MIN_BYTES = 1 << 25  # glibc serves allocations this large from fresh mmap()s, never from its heap
_libc = None


def advise_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask Linux to back a large, not yet touched CPU tensor with transparent huge pages (``madvise``), so that
    filling it takes one page fault per 2 MiB instead of one per 4 KiB: writing a fresh ``[B, P]`` per-sample
    stack is bound by those faults (the mlp benchmark: 120 ms of faults for 343 MB, 55 ms with huge pages).
    PyTorch does the same for every allocation under ``THP_MEM_ALLOC_ENABLE=1``. A no-op elsewhere (other
    systems, devices, small tensors, while dynamo traces: compiled products call it inside their custom op
    ``fxjac::flat_empty``) and where the kernel refuses.
    """
    global _libc
    if torch.compiler.is_compiling():  # first: no guard on the (symbolic) size
        return t
    nbytes = t.numel() * t.element_size()
    if nbytes < _HUGE_MIN_BYTES or t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return t
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = (t.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)  # whole huge pages inside the tensor only
        end = (t.data_ptr() + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            _libc.madvise(start, end - start, 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass
    return t


# Note [glibc's heap and column stacks]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# PyTorch takes CPU tensors from malloc and caches none. glibc serves a request from a fresh mmap() when it is
# larger than its mmap threshold (128 KiB at first, raised to the largest mapping freed so far, up to 32 MiB)
# and hands the top of its heap back to the system once more than the trim threshold (twice that) lies free
# there. A product with K columns allocates tens of megabytes of stacks in one call and frees them at its end:
# glibc returned them, and the next call faulted them in again, 4 KiB at a time. Measured in fresh processes
# (one thread, thread time): cnn J diag(σ) Jᵀ 70 -> 49 ms, ResNet 238 -> 136 ms, ResNet GGN diagonal
# 171 -> 109 ms, U-Net per-sample gradients 12.3 -> 8.7 ms with the thresholds below; 1 GiB of retention
# gained nothing over 256 MiB. So the first product built for CPU tensors sets the mmap threshold to glibc's
# largest (32 MiB) and the trim threshold to 256 MiB (``mallopt``): the process keeps up to 256 MiB of freed
# heap, and tensors up to 32 MiB come from it. Larger ones still come from mmap (``advise_huge_pages`` gives
# them huge pages). The setting is the process's: every other library's CPU tensors share it. Left alone with
# ``FXJAC_MALLOC=off``, where the user set glibc's own variables (``MALLOC_*_``, ``GLIBC_TUNABLES``), and on
# other C libraries.

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit systems
MALLOC_TRIM_THRESHOLD = 256 << 20
_malloc_tuned: typing.Optional[bool] = None  # None: not decided yet


def _malloc_choice() -> str:
    choice = os.environ.get("FXJAC_MALLOC", "auto").lower()
    if choice not in ("auto", "off"):
        warnings.warn(f"FXJAC_MALLOC={choice!r} is not one of 'auto', 'off'; using 'auto'", stacklevel=3)
        choice = "auto"
    return choice


def tune_malloc() -> bool:
    """Keep freed CPU memory in glibc's heap between calls (Note [glibc's heap and column stacks]); once per
    process. Returns whether the thresholds are fxjac's.
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if _malloc_choice() == "off" or not sys.platform.startswith("linux"):
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and \
            bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
    except (OSError, ValueError, AttributeError):
        pass
    return _malloc_tuned

# Note [GEMMs through oneDNN]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# PyTorch's CPU wheels multiply float32 matrices with MKL, which runs its AVX-512 kernels on Intel processors
# only: on an AMD EPYC (Zen 5) with AVX-512, one core's sgemm ran at 105 GFLOP/s, and oneDNN's matmul (bundled
# with the same wheel, reached through ``mkldnn._linear_pointwise``) at 235 on the same [1152, 512] @ [512, 512].
# The rules' large float32 GEMMs (a Linear's or a matmul's cotangent stacks times its weight, tangents through
# it, one-column weight cotangents) go through oneDNN there; small ones stay on MKL (oneDNN's call costs about
# 10 us; the two meet near 2^20 multiply-adds). Products written into a block of a flat stack (``write``) stay on
# MKL's ``out=``: oneDNN has no such variant, and its fresh result copied in faulted in new pages at every call
# (large_mlp's GGN diagonal: 3.4 ms steady, 7.7 ms while the allocator returned the pages). Not where autograd
# records (a differentiable product), a torch.func transform or forward AD runs (the op has no derivative or
# batching rule), nor for a large transposed left operand (oneDNN copies it: a column-major [163840, 144] @
# [144, 16] took 61 ms, MKL 24). The primal forward keeps the model's own ops, so the product's output is the
# model's. ``FXJAC_CPU_GEMM`` (read at import) overrides the choice: ``onednn`` or ``mkl``; by default oneDNN on
# non-Intel AVX-512 CPUs.

ONEDNN_MIN_MACS = 1 << 21
ONEDNN_MAX_COPY = 1 << 20  # a column-major left operand up to this size still gains (a [B, O] Gram factor)


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _onednn_gemm() -> bool:
    choice = os.environ.get("FXJAC_CPU_GEMM", "auto").lower()
    if choice not in ("auto", "onednn", "mkl"):
        warnings.warn(f"FXJAC_CPU_GEMM={choice!r} is not one of 'onednn', 'mkl', 'auto'; using 'auto'", stacklevel=2)
        choice = "auto"
    available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if choice != "auto":
        return available and choice == "onednn"
    return available and torch.backends.cpu.get_cpu_capability().startswith("AVX512") and \
        _cpu_vendor() not in ("GenuineIntel", "")


ONEDNN_GEMM = _onednn_gemm()


def _onednn_fake(a, w):
    return a.new_empty(tuple(a.shape[:-1]) + (w.shape[0],))


@eager_under_compile(_onednn_fake)
def onednn_linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ wᵀ`` by oneDNN (``w`` ``[N, K]``, a Linear's weight layout)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")


def _by_onednn(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``a @ wᵀ`` goes through oneDNN (Note [GEMMs through oneDNN])."""
    if not (ONEDNN_GEMM and w.dim() == 2 and a.dim() >= 2 and a.dtype == torch.float32 and w.dtype == torch.float32
            and a.device.type == "cpu" and w.device.type == "cpu"):
        return False
    if not (a.is_contiguous() or a.dim() == 2 and (a.stride(-1) == 1 or a.numel() <= ONEDNN_MAX_COPY)):
        return False
    if a.numel() * w.shape[0] < ONEDNN_MIN_MACS or records_grad(a, w):
        return False
    return torch.compiler.is_compiling() or not transformed()


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a`` ``[..., K]``: through oneDNN where that is faster (Note [GEMMs through oneDNN])."""
    if b.dim() == 2 and _by_onednn(a, b.t()):
        return onednn_linear(a, b.t())
    return torch.matmul(a, b)


def mm_t(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ wᵀ`` (``F.linear`` without a bias): through oneDNN where that is faster."""
    if _by_onednn(a, w):
        return onednn_linear(a, w)
    return torch.nn.functional.linear(a, w)


# Note [flat writes under torch.compile]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A parameter-space result is one flat stack, each parameter's block written once (Note [flat writes] in
# fxjac/assemble.py). Under torch.compile the same writes are the mutating custom op ``fxjac::write_into`` on
# views of a stack from ``fxjac::flat_empty``: inductor calls them as they are, in place (its reinplacing
# leaves no copy of the stack), and the stack gets the eager path's huge pages. Inductor's own result, a
# concatenation of the blocks' values into a buffer it allocates, faulted 4 KiB pages one by one: the mlp's
# per-sample gradients (343 MB) took 125-130 ms compiled against 83-90 ms eagerly, and 72 ms compiled with
# every allocation on huge pages (THP_MEM_ALLOC_ENABLE=1). Where autograd records a write (a differentiable
# product), it is the plain in-place op, which functionalization turns into a scatter: slower, but differentiable.

_WRITE_OPS = {"bmm": torch.bmm, "mm": torch.mm, "mul": torch.mul, "sum": torch.sum, "cat": torch.cat}


def write(out: torch.Tensor, op: str, *args) -> torch.Tensor:
    """Write ``op(*args)`` into ``out`` (a view of a flat stack) and return ``out``: ``op`` one of
    ``_WRITE_OPS`` (``"cat"`` takes a list; ints after the tensors, as in ``write(o, "sum", t, 1)``), or
    ``"copy"``, ``"add"`` (``out += args[0]``), ``"zero"``. Eagerly with ``out=`` (no temporary) where the
    dtypes agree and autograd records nothing, else copied; under torch.compile one custom op (Note [flat writes
    under torch.compile]).
    """
    if torch.compiler.is_compiling():
        tensors = list(args[0]) if op == "cat" else [a for a in args if isinstance(a, torch.Tensor)]
        if not records_grad(out, *tensors):
            dims = [a for a in args[1:] if isinstance(a, int)] if op == "cat" else \
                [a for a in args if not isinstance(a, torch.Tensor)]
            _write_into(out, op, tensors, dims)
            return out
    _write_now(out, op, args)
    return out


def _write_now(out, op, args):
    if transformed():
        try:
            _write_copy(out, op, args)
        except RuntimeError as err:  # vmap: a batched value cannot be written into the unbatched stack
            from ..errors import UnsupportedOpError

            raise UnsupportedOpError(
                "a parameter-space result is written block by block into one stack allocated for the batch, which "
                "torch.func.vmap cannot batch: call the product once on the stacked batch (reduce='none' gives "
                f"per-sample results) or in a loop; reverse and forward mode go through it ({err})") from err
        return
    if op == "copy":
        out.copy_(args[0])
    elif op == "add":
        out.add_(args[0])
    elif op == "zero":
        out.zero_()
    else:
        fn = _WRITE_OPS[op]
        tensors = list(args[0]) if op == "cat" else [a for a in args if isinstance(a, torch.Tensor)]
        if any(t.dtype != out.dtype for t in tensors) or records_grad(out, *tensors):
            out.copy_(fn(*args))
        else:
            fn(*args, out=out)


def _write_copy(out, op, args):
    """:func:`_write_now` without ``out=`` kernels."""
    if op == "zero":
        out.zero_()
    elif op in ("copy", "add"):
        (out.copy_ if op == "copy" else out.add_)(args[0])
    else:
        out.copy_(_WRITE_OPS[op](*args))


@opaque_op(lambda out, op, tensors, dims: None, mutates_args={"out"})
def _write_into(out: torch.Tensor, op: str, tensors: list[torch.Tensor], dims: list[int]) -> None:
    """:func:`write` as one op: ``tensors`` then ``dims`` are ``op``'s arguments (for ``"cat"``, its list)."""
    _write_now(out, op, (tensors, *dims) if op == "cat" else (*tensors, *dims))

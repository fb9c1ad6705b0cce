"""The :class:`Product` GraphModule and the assembly shared by every product builder."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import itertools
import linecache
import operator
import re
import types
import warnings
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.graph_module import _loader
from torch.utils._pytree import tree_leaves, tree_map

from passes import Builder, MissingRulesError, clean
from passes.builder import BatchLayoutError

from .assemble import input_name
from .errors import (
    FxJacError,
    ModeError,
    OptionError,
    ShapeError,
    StaleProductError,
    TraceError,
    UnsupportedOpError,
    describe,
    source_line,
)
from .rules import _rt, default_rules
from .source import BuiltLayout, Source, build_source, check_initialised, field_names
from .tracing import BUILD_LOCK, parametrizations_uncached


class _GeneratedSources:
    """Forget the Python source of the GraphModules a build made and dropped (Note [generated sources]).

    Note [generated sources]
    ~~~~~~~~~~~~~~~~~~~~~~~~
    torch.fx compiles every GraphModule's code from source and keeps the source, and a copy of the code's
    globals, in its own cache and in ``linecache`` for tracebacks, for the life of the process: a build makes
    about ten (tracing, normalisation, the product) and drops all but one or two, so a program building products
    in a loop grew by about 0.1 MB a build. Sources made during a build are forgotten at its end unless a module
    it keeps runs them, and those when that module is collected.
    """

    def __init__(self):
        self.roots: tuple = ()

    def __enter__(self) -> "_GeneratedSources":
        self.before = set(_loader.eval_cache)
        return self

    def keep(self, *roots) -> None:
        """The modules the build returns (their GraphModule submodules' sources stay while they live)."""
        self.roots = roots

    def __exit__(self, *exc) -> None:
        live = {}
        for root in self.roots:
            for m in root.modules() if isinstance(root, nn.Module) else ():
                code = getattr(type(m).__dict__.get("forward"), "__code__", None)
                if isinstance(m, fx.GraphModule) and code is not None:
                    live[code.co_filename] = m
        for key in set(_loader.eval_cache) - self.before:
            if key in live:
                weakref.finalize(live[key], _forget_source, key)
            else:
                _forget_source(key)


def _forget_source(key: str) -> None:
    _loader.eval_cache.pop(key, None)
    linecache.cache.pop(key, None)


def _unbuilt(*args, **kwargs):
    """Stands in for a product's code until its first call has seen the input shapes."""
    raise RuntimeError("this fxjac product is built at its first call: call it once eagerly (or build it with "
                       "example_inputs=, or use fxjac.compile(..., backend=...)) before torch.compile, and call the "
                       "product itself, not .forward()")


class Product(fx.GraphModule):
    """A compiled Jacobian product: a GraphModule reading the model's current parameters at every call.

    Built without ``example_inputs`` it specialises itself at its first call (only ranks and static sizes are
    taken from those inputs: the batch size may change later). Its first call also checks the primal output
    against the model's own output. Results are detached unless built with ``differentiable=True``.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, build: Callable, spec: dict):
        # torch.compile(product) compiles ``__call__``, and dynamo keeps at most 8 compiled versions per code
        # object: shared by every product, the 9th product compiled in a process would fail (fullgraph) or run
        # eagerly. Each product calls through a copy of the code of its own, set on the class torch.fx makes for
        # every GraphModule instance (before its recompile wraps ``__call__``).
        call = Product.__call__
        type(self).__call__ = types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__,
                                                 call.__defaults__, call.__closure__)
        super().__init__(root, graph, class_name="Product")
        self._fxjac_build = build
        self._fxjac_spec = spec
        self._fxjac_checked = False
        self._fxjac_variants: dict = {}
        self._fxjac_structure: list = []
        self.wrt_names: list = []

    def __deepcopy__(self, memo):
        """A copy computing with a copy of the model (torch.fx's own copy keeps only the graph and submodules)."""
        res = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():
            if key.startswith("_fxjac") or key in ("wrt_names", "fallback_ops"):
                res.__dict__[key] = copy.deepcopy(value, memo)
        return res

    # The model is held as a submodule so that parameter lookups in the code are live (``self.model.fc.weight``).
    def __reduce__(self):
        raise TypeError("an fxjac product cannot be pickled (nor torch.save'd): it holds the model and the code that "
                        "builds it for new input shapes. Save the model (torch.save(model.state_dict())) and build the "
                        "product again after loading it; copy.deepcopy(product) works within a process")

    def _install(self, gm: "Product", src: Source) -> None:
        self.graph = gm.graph
        for name, mod in gm.named_children():
            if name != "model":
                setattr(self, name, mod)
        self.recompile()
        self._fxjac_structure = _structure(src)
        self._fxjac_n_positional = None
        self.fallback_ops = list(getattr(gm, "fallback_ops", []))

    def __call__(self, *args, **kwargs):  # noqa: D102
        if torch.compiler.is_compiling():
            # Under torch.compile the product must already be built (fxjac.compile sees to it), and so must the
            # sibling for another operand form (a jvp's [B, P] tangents); the eager-only checks (first-call output
            # check, module identity) stay out of the compiled graph.
            if empty_batch(args[:self._fxjac_spec.get("n_inputs")]):
                return self._on_empty_batch(args, kwargs)
            sibling = self._variant_of(args)
            if sibling is not None:
                return sibling(*args, **kwargs)
            with torch.set_grad_enabled(bool(self._fxjac_spec.get("differentiable"))):
                return super().__call__(*args, **kwargs)
        _refuse_meta(args[:self._fxjac_spec.get("n_inputs")])
        autocast = _autocast_device(args)
        if autocast is not None:
            # torch.autocast would run some ops of the product in half precision and the buffers that the rules
            # allocate in the model's dtype would then meet mixed dtypes. Products compute in the model's dtype,
            # so autocast is paused for the call (and for the first call's build); to compute in bfloat16, cast
            # the model and inputs.
            with torch.autocast(autocast, enabled=False):
                return self(*args, **kwargs)
        spec = self._fxjac_spec
        n_in = spec.get("n_inputs")
        if empty_batch(args[:n_in]):
            return self._on_empty_batch(args, kwargs)
        sibling = self._variant_of(args, build=True)
        if sibling is not None:
            return sibling(*args, **kwargs)
        self._build_lazily(args)
        self._check_structure()
        if len(args) != self._n_positional():
            self._refuse_arity(args, kwargs)
        try:
            if spec.get("differentiable"):
                out = super().__call__(*args, **kwargs)
            else:
                with torch.no_grad():
                    out = super().__call__(*args, **kwargs)
                if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].requires_grad:
                    out = (out[0].detach(),) + out[1:]  # y is the input itself, or a view of it: no history either
        except Exception as err:
            self._check_param_shapes(err)
            if isinstance(err, UnsupportedOpError) and len(err.args) == 1 and isinstance(err.args[0], str):
                where = self._failed_line(err)
                if where and where not in err.args[0]:
                    err.args = (f"{err.args[0]}\n  at {where}",)
            raise
        if not self._fxjac_checked and not _rt.transformed():  # under vmap or jacfwd: at the next plain call
            self._check_primal(args, out)
        return _fresh(out, args, bool(spec.get("differentiable")))

    def _failed_line(self, err: Exception) -> Optional[str]:
        """The user's source line of the model op whose generated line raised ``err`` (a rule's or the fallback's
        error at call time, which knows the op but not where the model wrote it).
        """
        import traceback

        code = getattr(type(self).forward, "__code__", None)
        lines = [lineno for frame, lineno in traceback.walk_tb(err.__traceback__) if frame.f_code is code]
        if not lines:
            return None
        text = linecache.getline(code.co_filename, lines[-1])
        name = text.split("=", 1)[0].strip() if "=" in text else ""
        node = next((n for n in self.graph.nodes if n.name == name), None)
        return source_line(node) if node is not None else None

    def _check_param_shapes(self, err: Exception) -> None:
        """After a failed call: a selected parameter replaced by one of another shape (the generated code holds the
        old layout), or the model cast to another dtype since the build (``model.double()``), is a
        StaleProductError, not the kernel's error. Checked only then, so calls pay nothing.
        """
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, shape in getattr(self, "_fxjac_param_shapes", None) or []:
            if name in params and tuple(params[name].shape) != tuple(shape):
                raise StaleProductError(f"the model's parameter {name!r} has shape {tuple(params[name].shape)} "
                                        f"but this product was built for {tuple(shape)}; build the product "
                                        "again") from err
        built = getattr(self, "_fxjac_dtypes", None) or {}
        for name, t in _floating_state(self.model):
            if name in built and t.dtype != built[name]:
                raise StaleProductError(f"the model's {name!r} is {t.dtype} but this product was built when it was "
                                        f"{built[name]}: the model was cast after the build (model.double(), "
                                        ".half(), .to(dtype)); build the product again for the model as it "
                                        "is now") from err

    def _on_empty_batch(self, args, kwargs):
        """The results for inputs without samples (Note [an empty batch])."""
        n_in = self._fxjac_spec.get("n_inputs") or len(args)
        sizes = [(i, a.shape[0]) for i, a in enumerate(args[:n_in]) if isinstance(a, torch.Tensor) and a.dim() > 0]
        full = [(i, n) for i, n in sizes if n]
        if full:
            raise ShapeError(f"input {full[0][0]} has a batch of {full[0][1]} and input "
                             f"{next(i for i, n in sizes if not n)} of 0: every input has the same batch")
        grown = [([_with_samples(a, b, i < n_in) for i, a in enumerate(args)],
                  {k: _with_samples(v, b, True) for k, v in kwargs.items()}) for b in (1, 2)]
        if torch.compiler.is_compiling():  # both made-up batches in the compiled graph
            return tree_map(_at_no_samples, *[self(*a, **k) for a, k in grown])
        checked, self._fxjac_checked = self._fxjac_checked, True  # made-up samples: nothing to check
        try:
            outs = [self(*a, **k) for a, k in grown]
        except FxJacError as err:
            raise type(err)(f"{err} (an empty batch: the product checked one made-up sample, so the batch sizes "
                            "above read 1)") from err
        finally:
            self._fxjac_checked = checked
        return tree_map(_at_no_samples, outs[0], outs[1])

    def _refuse_arity(self, args, kwargs) -> None:
        """Raises the TypeError for a call with more positional arguments than the product takes, or without one it
        needs (a forgotten operand); checked only where the count differs.
        """
        spec = self._fxjac_spec
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder" and n.target != "target"]
        names = [n.target for n in placeholders]
        takes = f"this product takes {len(names)} positional argument(s) ({', '.join(names)}), got {len(args)}"
        if len(args) > len(names):
            hint = "target is keyword-only: call the product as p(x, ..., target=t); " \
                if spec.get("takes_target") else ""
            hint += "a forward argument with a default is traced as that default unless the product is built with " \
                "it among example_inputs=(...)"
            if spec.get("no_operand") and len(args) == len(names) + 1:
                hint = spec["no_operand"]
            raise TypeError(f"{takes}: {hint}")
        missing = [n.target for n in placeholders[len(args):] if not n.args and n.target not in kwargs]
        if missing:
            raise TypeError(f"{takes}: {', '.join(missing)} missing (the model's inputs come first, then the "
                            "product's operands: v for a jvp, w for a vjp, M for matrix='diag', 'full' or 'sqrt'; "
                            "API.md's shape table gives their shapes)")

    def _n_positional(self) -> int:
        """How many positional arguments the built product takes (its inputs and operands, not ``target``)."""
        n = self.__dict__.get("_fxjac_n_positional")
        if n is None:
            n = sum(1 for node in self.graph.nodes if node.op == "placeholder" and node.target != "target")
            self._fxjac_n_positional = n
        return n

    def _variant_of(self, args, build=False):
        """The sibling product for these operands' form (built on demand eagerly: ``build``), or ``None`` where
        this product takes them itself.
        """
        spec = self._fxjac_spec
        n_in, variant = spec.get("n_inputs"), spec.get("variant")
        if variant is None or n_in is None or len(args) <= n_in:
            return None
        key = variant(args[n_in:])
        if key is None:
            return None
        if key not in self._fxjac_variants:
            if not build:
                raise RuntimeError("this operand form needs a sibling product that is built at its first call: "
                                   "call the product once eagerly with operands of this form before torch.compile")
            with BUILD_LOCK:
                if key not in self._fxjac_variants:
                    self._fxjac_variants[key] = self._fxjac_build(args[:n_in], key, self.model, self._layout())
        return self._fxjac_variants[key]

    def _layout(self) -> Optional[BuiltLayout]:
        """The flat parameter layout this product or a sibling was built with (a sibling built later keeps it,
        whatever was frozen since), or ``None`` before any build and for products w.r.t. an input.
        """
        names = None if self._fxjac_spec.get("lazy") else self.wrt_names
        names = names or next((v.wrt_names for v in self._fxjac_variants.values() if v.wrt_names), None)
        return BuiltLayout(names) if names else None

    def ensure_built(self, *args) -> "Product":
        """Build a lazily built product for these inputs (and operands) without computing anything."""
        if self._variant_of(args, build=True) is not None:
            return self
        self._build_lazily(args)
        return self

    def _build_lazily(self, args) -> None:
        """A product built without example_inputs is built at its first call, once (two threads calling it
        first at the same time: one builds, the other waits for it).
        """
        spec = self._fxjac_spec
        if self._fxjac_build is None or not spec.get("lazy"):
            return
        with BUILD_LOCK, _GeneratedSources() as sources:
            if not spec.get("lazy"):
                return
            n_in = spec.get("n_inputs")
            built = self._fxjac_build(args[:n_in] if n_in is not None else args, None, self.model, self._layout())
            self._install(built, built._fxjac_src)
            sources.keep(self, *_kept_source(built))
            self.wrt_names = built.wrt_names
            self._fxjac_dtypes = built._fxjac_dtypes
            spec["lazy"] = False

    def _check_structure(self) -> None:
        """Every module the product reads is still where it was: one dict lookup per module (see :func:`_structure`),
        not a walk from the root per path (0.1 ms a call on the transformer).
        """
        for path, parent, name, mod, moded, state in self._fxjac_structure:
            if isinstance(moded, _GlobalHooks):
                if _global_hooks() != moded.keys:
                    raise StaleProductError("a global module hook (torch.nn.modules.module's register_module_"
                                            "forward_hook or _pre_hook) was registered or removed since this "
                                            "product was built; build the product again")
                continue
            if isinstance(moded, _Tie):  # a tied parameter's second name: still the first name's tensor?
                if parent._parameters.get(name) is not mod._parameters.get(moded.attr):
                    raise StaleProductError(f"the model's parameter {path!r} was tied to another when this product "
                                            "was built and no longer is; build the product again")
                continue
            holder = self if parent is None else parent
            if holder._modules.get(name) is not mod:
                raise StaleProductError(f"the model's submodule {path!r} was replaced since this product was "
                                        "built; build the product again")
            if _state(mod) != state:
                where = f"submodule {path!r}" if path else "root module"
                raise StaleProductError(f"the model's {where} changed since this product was built: "
                                        f"{_state_change(mod, state, path)}; build the product again")
            if moded and mod.training:
                where = f"submodule {path!r}" if path else "root module"
                raise ModeError(f"the model's {where} ({type(mod).__name__}) is in training mode since this "
                                "product was built in eval mode: call model.eval() (a product computes what the "
                                "model computed when it was built)")

    def _check_primal(self, args, out) -> None:
        """First call: the product's ``y`` must equal the model's own output (catches mis-traced mutation)."""
        n_in = self._fxjac_spec.get("n_inputs") or len(args)
        model = self.model
        fixed = {k: v for k, v in (self._fxjac_spec.get("concrete_args") or {}).items()
                 if v is not fx._symbolic_trace.PH}
        sel = self._fxjac_spec.get("output")

        # The model's own forward may write into its inputs or buffers (x.mul_(2), a running count); the
        # product never does, and its check must not either: each call gets copies of the inputs.
        buffers = [(name, b, b.clone()) for name, b in model.named_buffers() if b.layout == torch.strided]
        if sum(b.numel() * b.element_size() for _, b, _ in buffers) > 2 ** 28:
            buffers = []

        def reference(grad: bool):
            # The forward's other arguments as traced (concrete_args=); parametrize's cache off (under no_grad
            # the check would leave the user's cached() block a parametrized weight without history).
            inputs = _name_inputs(model, tree_map(_copy_tensor, tuple(args[:n_in])), fixed)
            with torch.set_grad_enabled(grad), parametrizations_uncached():
                ref = model(*inputs, **fixed) if isinstance(inputs, tuple) else model(**inputs, **fixed)
            if isinstance(sel, int) and isinstance(ref, dict) and sel not in ref:  # (a ModelOutput's out[0])
                ref = [v for v in ref.values() if v is not None][sel]
            elif sel is not None:
                fields = field_names(type(ref))
                ref = getattr(ref, sel) if isinstance(sel, str) and fields else \
                    getattr(ref, fields[sel]) if fields and dataclasses.is_dataclass(ref) else ref[sel]
            return ref.detach() if isinstance(ref, torch.Tensor) else ref

        def same(ref):
            return isinstance(ref, torch.Tensor) and ref.shape == y.shape and _same_output(ref.to(y.dtype), y)

        y = out[0]
        try:
            ref = reference(False)
            changed = _changed(buffers)
            # A buffer the forward writes into (a step counter) matters only where the next call computes
            # another output with it.
            again = reference(False) if changed else ref
        finally:
            _put_back(buffers)
        if changed and not (isinstance(ref, torch.Tensor) and isinstance(again, torch.Tensor)
                            and ref.shape == again.shape and _same_output(again.to(ref.dtype), ref)):
            where = next((source_line(n) for n in self.graph.nodes if n.op == "get_attr"
                          and n.target.endswith("." + changed[0]) and source_line(n)), None)
            raise ModeError(f"the model's forward writes into its buffer {changed[0]!r} and its output changes "
                            "from one call to the next (the old nn.utils.spectral_norm's power iteration in "
                            "training mode, a call counter the output reads, a cache): fxjac's products are of "
                            "one function and never write into the model. Keep that state out of forward (a "
                            "module of yours), or switch it off (model.eval() for spectral norm)"
                            + (f"\n  at {where}" if where else ""))
        # Without grad, some modules take another kernel (nn.MultiheadAttention's fast path gives NaN for a
        # fully masked row, its differentiable path 0; nn.TransformerEncoder's nested tensors give 0 at padded
        # positions): the product follows the differentiable one.
        if not same(ref) and torch.is_tensor(ref):
            try:
                ref = reference(True)
            except RuntimeError:  # (under torch.inference_mode inference tensors cannot be recorded)
                pass
            finally:
                _put_back(buffers)
        if not same(ref):
            if isinstance(ref, torch.Tensor) and ref.shape == y.shape and y.is_floating_point() and \
                    bool((torch.isfinite(ref) & ~torch.isfinite(y)).any()):
                raise TraceError("the traced graph gives NaN or inf where the model's output is finite: an op "
                                 "fxjac traces through (a decomposed module, or ops inside one) may differ from "
                                 "PyTorch's fused kernel at degenerate inputs (a fully masked row, a zero norm); "
                                 "keep the module whole with leaf_modules=[...] (its derivatives then come from "
                                 "the autograd fallback)")
            raise TraceError("the traced graph does not reproduce the model's output: an in-place write the "
                             "rewrite could not follow (write it out of place: h = h * s, not h.mul_(s)), or a "
                             "Python side effect torch.fx did not record (name the submodule that does it in "
                             "leaf_modules=[...])")
        self._fxjac_checked = True


# Note [an empty batch]
# ~~~~~~~~~~~~~~~~~~~~~
# A batch without samples (the last batch of a filtered loader) has a definite answer: a result with a batch axis
# is empty, a result summed over the batch is zero. The rules cannot compute it: they reshape stacks with an
# inferred axis, which torch cannot infer from no elements, and kernels divide by the batch (BatchNorm's
# backward at B = 0: SIGFPE, the process killed). So a call with an empty batch runs the product on one and on
# two samples of zeros (operands grown likewise: every empty axis of an operand is the batch's) and reads each
# result's sizes at no samples off how they grow: size(0) = 2 size(1) - size(2); a result that does not grow is
# a sum over the batch, zero. Under torch.compile both made-up batches are in the graph compiled for B = 0 (dynamo
# specialises sizes 0 and 1).

def empty_batch(inputs) -> bool:
    """Whether some input tensor has no samples (Note [an empty batch])."""
    return any(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 0 for a in inputs)


def _with_samples(a, b: int, leading: bool):
    """``a`` with its empty batch axis (the leading one of an input; every empty axis of an operand) grown to
    ``b`` samples of zeros (Note [an empty batch]).
    """
    if not isinstance(a, torch.Tensor) or a.dim() == 0:
        return a
    shape = [b if n == 0 and (i == 0 or not leading) else n for i, n in enumerate(a.shape)]
    return a if shape == list(a.shape) else a.new_zeros(shape)  # an operand shared by the batch as it is


def _at_no_samples(one, two):
    """A result at no samples from the same result at one and at two samples (Note [an empty batch])."""
    if not isinstance(one, torch.Tensor):
        return one
    if one.dim() != two.dim():
        raise ShapeError(f"an empty batch: the product's result has rank {one.dim()} for one sample and "
                         f"{two.dim()} for two, so its shape for none is unknown; skip empty batches")
    sizes = [max(0, 2 * a - c) for a, c in zip(one.shape, two.shape)]
    if sizes == list(one.shape):  # a sum over the batch; a differentiable product's stays on the tape (grad 0)
        return one * 0 if one.requires_grad else torch.zeros_like(one)
    for axis, n in enumerate(sizes):
        if n != one.shape[axis]:
            one = one.narrow(axis, 0, min(n, one.shape[axis]))
    return one if list(one.shape) == sizes else one.new_empty(sizes)


def _floating_state(model: nn.Module):
    """The model's floating-point parameters and buffers, by name (tied ones under each name)."""
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        if t is not None and t.is_floating_point():
            yield name, t


def _refuse_meta(inputs) -> None:
    """Raises ShapeError for an input on the meta device (API.md: a wrong device is a ShapeError)."""
    if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tree_leaves(inputs)):
        raise ShapeError("an input is on the meta device: a product computes with values (and checks its first "
                         "output against the model's), which meta tensors do not hold")


def _plain(t):
    """An example input as a plain tensor: a first call inside ``torch.vmap`` or ``torch.func.grad`` builds from one
    sample of the transform's wrapped tensor (the build's checks run ops that vmap cannot batch: masks).
    """
    unwrap = torch._C._functorch
    if not isinstance(t, torch.Tensor):
        return t
    while unwrap.is_functorch_wrapped_tensor(t):
        t = unwrap.get_unwrapped(t).select(unwrap.maybe_get_bdim(t), 0) if unwrap.is_batchedtensor(t) else \
            unwrap.get_unwrapped(t)
    return t


def _same_batch(inputs) -> None:
    """Raises the ShapeError a built product's call gives for tensor inputs of different batch sizes (found before
    the build: the batch check's made-up samples would blame the model).
    """
    sizes = [(i, t.shape[0]) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.dim() > 0]
    other = next(((i, n) for i, n in sizes if n != sizes[0][1]), None)
    if other is not None:
        raise ShapeError(f"input {other[0]} has a batch of {other[1]} and input {sizes[0][0]} of {sizes[0][1]}: dim 0 "
                         "of every input is the batch")


def _autocast_device(args) -> Optional[str]:
    """The device type of the first tensor argument, if torch.autocast is on for it."""
    for a in args:
        if isinstance(a, torch.Tensor):
            try:
                return a.device.type if torch.is_autocast_enabled(a.device.type) else None
            except RuntimeError:  # a device type autocast does not know
                return None
    return None


def _same_output(ref: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the product's ``y`` is the model's output up to rounding. The product graph may compute an op
    another way (attention decomposed into matmul and softmax), which in bfloat16 moves the output by a few
    thousandths; a mis-traced mutation moves it by the values' own size. Tolerance: 8 ulps of the dtype, at least
    1e-4, relative to each entry and to the output's largest entry.
    """
    if not y.is_floating_point():
        return torch.equal(ref, y)
    tol = max(1e-4, 8 * torch.finfo(y.dtype).eps)
    scale = ref.detach().abs().nan_to_num(0.0, 0.0, 0.0).max().item() if ref.numel() else 0.0
    return torch.allclose(ref, y, rtol=tol, atol=max(1e-5, tol * scale), equal_nan=True)


def _copy_tensor(t):
    return t.clone() if isinstance(t, torch.Tensor) and t.layout == torch.strided else t


def _same_buffer(b: torch.Tensor, saved: torch.Tensor) -> bool:
    return b.shape == saved.shape and (torch.equal(b, saved) or b.is_floating_point() and bool(
        ((b == saved) | b.isnan() & saved.isnan()).all()))


def _changed(buffers: list) -> list:
    """The names of the buffers (``(name, buffer, saved copy)``) the model's forward wrote into."""
    return [name for name, b, saved in buffers if not _same_buffer(b, saved)]


def _put_back(buffers: list) -> None:
    """Restore the buffers the model's forward wrote into during the first call's check."""
    with torch.no_grad():
        for _, b, saved in buffers:
            if b.shape == saved.shape and not _same_buffer(b, saved):
                b.copy_(saved)


def _name_inputs(model: nn.Module, inputs: tuple, fixed: dict):
    """The product's ``inputs`` as ``model``'s forward takes them: by position, or by name where ``concrete_args``
    fixes a parameter before one of them (``forward(x, scale=2.0, mask=None)`` with ``scale`` fixed: ``mask`` is
    the second input) or forward has keyword-only parameters (``forward(x, *, z)``).
    """
    from .tracing import forward_parameters

    params = forward_parameters(model)
    if params is None or not fixed and not any(p.kind is p.KEYWORD_ONLY for p in params):
        return tuple(inputs)
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in fixed]
    return dict(zip(names, inputs)) if len(names) >= len(inputs) else tuple(inputs)


def _structure(src: Source) -> list:
    """The modules the product relies on (every module owning a parameter or buffer it reads, and every module
    traced into) with their ancestors, as ``(path, parent, name, module)`` from the root down: ``parent`` (``None``
    for the product itself, which holds the model as ``model``) must still hold ``module`` as its child ``name``.
    Checked in that order, each parent has been checked before its children.
    """
    model = src.model
    paths = set()
    for n in src.gm.graph.nodes:
        if n.op == "get_attr":
            paths.add(n.target.rsplit(".", 1)[0] if "." in n.target else "")
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():  # modules traced into, with or
            paths.add(path)                                             # without parameters
    for p in list(paths):
        parts = p.split(".") if p else []
        paths.update(".".join(parts[:i]) for i in range(len(parts)))
    out = []
    for p in sorted(paths, key=lambda q: (q.count(".") + bool(q), q)):
        if not p:
            out.append(("", None, "model", model, _moded(model), _state(model)))
            continue
        parent_path, _, name = p.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            mod = parent._modules[name]
        except (AttributeError, KeyError):
            continue
        if isinstance(mod, nn.Module):
            out.append((p, parent, name, mod, _moded(mod), _state(mod)))
    return out + _ties(model) + [('', None, '', None, _GlobalHooks(), None)]


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _state(mod: nn.Module) -> tuple:
    """What the product was traced with besides the modules' places: ``mod``'s forward pre-hooks and forward hooks
    (the tracer ran them; each registration has its own key, so a hook swapped for another counts), its class
    (``register_parametrization`` swaps it on the same object), how many of its parameter slots are None (``bias =
    None`` after the build, or a bias given to a layer built without), for a container how many modules it holds
    (a forward iterating it runs one appended after the build), a ``forward`` set on the instance, the
    settings of a ``torch.nn`` built-in (:func:`_settings`), and the shapes of its parameters and buffers (a size
    read from one while tracing is a number of the product: Note [sizes while tracing] in fxjac/tracing.py).
    """
    return (tuple(mod._forward_pre_hooks), tuple(mod._forward_hooks), type(mod),
            sum(1 for t in mod._parameters.values() if t is None),
            len(mod._modules) if isinstance(mod, _CONTAINERS) else -1, mod.__dict__.get("forward"), _settings(mod),
            tuple((k, t.shape) for k, t in itertools.chain(mod._parameters.items(), mod._buffers.items())
                  if t is not None))


def _settings(mod: nn.Module) -> tuple:
    """A ``torch.nn`` built-in's settings that tracing made constants (:func:`_setting_names`)."""
    names = _SETTING_NAMES.get(type(mod))
    if names is None:
        names = _SETTING_NAMES.setdefault(type(mod), _setting_names(type(mod)))
    return tuple(map(mod.__dict__.get, names)) if names else ()


_SETTING_NAMES: dict = {}


def _setting_names(cls: type) -> tuple:
    """A ``torch.nn`` built-in's ``__constants__`` (a LeakyReLU's ``negative_slope``, a convolution's ``stride``);
    none for Dropout, whose eval-mode forward ignores its ``p``, nor BatchNorm's ``momentum`` (a running average's,
    not the output's), nor ``inplace`` (the product computes out of place anyway). A module of the user's own
    holds plain attributes that tracing fixed too; those are not checked (README, *What fxjac refuses*).
    """
    if not cls.__module__.startswith("torch.nn.") or issubclass(cls, nn.modules.dropout._DropoutNd):
        return ()
    return tuple(c for c in getattr(cls, "__constants__", ()) if c not in ("momentum", "inplace"))


def _state_change(mod: nn.Module, before: tuple, path: str = "") -> str:
    """What changed in ``mod`` (at ``path``) since :func:`_state` gave ``before``, in words."""
    now = _state(mod)
    if now[:2] != before[:2]:
        return "its forward hooks (a hook added, removed or swapped for another changes what the model computes)"
    if now[2] is not before[2]:
        return (f"its class, {before[2].__name__} then {now[2].__name__} (a parametrization registered or removed "
                "renames its parameters)")
    if now[3] != before[3]:
        return "its parameters (one set to None, or a None one given a tensor)"
    if now[4] != before[4]:
        return f"its length, {before[4]} then {now[4]} modules (a forward iterating it runs them all)"
    if now[5] is not before[5]:
        return "its forward (a function assigned to the instance's forward, or removed)"
    if now[7] != before[7]:
        built = dict(before[7])
        name, shape = next(((k, t) for k, t in now[7] if built.get(k, t) != t), now[7][0])
        full = f"{path}.{name}" if path else name
        return (f"{full!r} has shape {tuple(shape)} but this product was built for {tuple(built.get(name, ()))} (a "
                "parameter or buffer replaced by one of another shape: sizes read from it are numbers of the "
                "product)")
    changed = [f"{c} {b!r} then {a!r}" for c, b, a in zip(_setting_names(type(mod)), before[6], now[6]) if a != b]
    return f"its settings ({', '.join(changed)}), which tracing made constants of the product"


class _GlobalHooks:
    """The moded slot of the structure's last entry: the global module hooks (``register_module_forward_hook``,
    ``register_module_forward_pre_hook``) there were at the build, by registration.
    """

    def __init__(self):
        self.keys = _global_hooks()


def _global_hooks() -> tuple:
    """The keys of the global forward hooks that are not torch's own: torch's observe (FlopCounterMode's and
    ModuleTracker's, registered for a ``with`` block), a user's may change outputs.
    """
    from torch.nn.modules import module as _module

    return tuple(tuple(k for k, h in hooks.items() if not (getattr(h, "__module__", None) or "").startswith("torch."))
                 for hooks in (_module._global_forward_pre_hooks, _module._global_forward_hooks))


class _Tie:
    """The last slot of a structure entry for a tied parameter's second name: the first name's attribute."""

    def __init__(self, attr: str):
        self.attr = attr


def _ties(model: nn.Module) -> list:
    """One entry per second name of a tied parameter: ``(alias, its holder, its attribute, the first name's holder,
    _Tie(the first name's attribute), None)``. The graph reads a tied parameter by its first name only: untied after the
    build, the product would go on reading that tensor for both.
    """
    first, out = {}, []
    for full, prm in model.named_parameters(remove_duplicate=False):
        path, _, attr = full.rpartition(".")
        holder = model.get_submodule(path) if path else model
        if id(prm) in first:
            out.append((full, holder, attr, first[id(prm)][0], _Tie(first[id(prm)][1]), None))
        else:
            first[id(prm)] = (holder, attr)
    return out


# Modules whose training mode changes what they compute per sample (check_modes refuses them at build): switched
# to training after the build, the product would go on computing the eval forward.
_MODED = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.RReLU)


def _moded(mod: nn.Module) -> bool:
    """Whether ``mod`` computed its eval forward when built and would compute another in training mode: torch.nn's
    modes (batch norm, dropout, attention dropout), and a user's module whose forward reads ``self.training``
    (``F.dropout(h, p, training=self.training)``, ``if self.training:``), which tracing fixed to its value then.
    """
    if mod.training:
        return False
    if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p == 0:
        return False
    if isinstance(mod, (nn.RNNBase, nn.MultiheadAttention)):  # dropout between its layers, on attention weights
        return mod.dropout > 0 and getattr(mod, "num_layers", 2) > 1
    return isinstance(mod, _MODED) or _reads_training(type(mod))


@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    """Whether a user's module class reads ``self.training`` in its forward or in a method of its own that forward
    calls (``self._drop(h)``, and so on down), also one inherited from another user class (torch.nn's own are
    listed above: a TransformerEncoderLayer reads it for its fast path only). A method forward never calls (a
    logging ``shared_step``) does not count.
    """
    if cls.__module__.startswith("torch.") or cls.forward is nn.Module.forward:
        return False
    mine = [c for c in cls.__mro__ if not (c.__module__.startswith("torch.") or c is object)]

    def defined(name: str, every: bool) -> list:  # the method forward calls (every class's: through super())
        fns = [getattr(vars(c)[name], "__func__", vars(c)[name]) for c in mine if name in vars(c)]
        return fns if every else fns[:1]

    todo, seen = defined("forward", False), set()
    while todo:
        fn = todo.pop()
        if fn in seen or not isinstance(fn, types.FunctionType):
            continue
        seen.add(fn)
        try:
            source = inspect.getsource(fn)
            me = next(iter(inspect.signature(fn).parameters), "self")
        except (OSError, TypeError, ValueError):
            continue
        if re.search(rf"\b{me}\.training\b", source):
            return True
        for name in re.findall(rf"\b{me}\.(\w+)\s*\(", source):
            todo += defined(name, False)
        for name in re.findall(r"\bsuper\(\)\.(\w+)\s*\(", source):
            todo += defined(name, True)
    return False


# Note [results]
# ~~~~~~~~~~~~~~
# A product's results after ``y`` are the caller's, as torch.func's are: contiguous, and never the caller's own
# operand. A rule may pass an operand through (a bias's jvp is ``v``; the identity's M), and a Jacobian assembled
# from rows is a transposed view. The product graph ends each result in ``contiguous_result`` (a no-op where it
# is) or, where the result is an operand seen through views, ``copied_result``: that holds under torch.compile
# too. Eagerly, ``_fresh`` also copies a result found to share an operand's memory through a rule's own helper.
_RESULT_VIEWS = {"view", "reshape", "expand", "expand_as", "transpose", "permute", "squeeze", "unsqueeze", "flatten",
                 "unflatten", "contiguous", "t", "view_as", "reshape_as", "movedim", "narrow", "select", "detach",
                 # fxjac's own helpers that may hand back their first argument or a view of it
                 "check_shape", "check_input", "param_slice", "align", "align_ps", "expand_like", "sum_to",
                 "sum_to_ps", "getitem_tangent", "permute_tangent", "permute_transpose", "stack_to_shape",
                 "stack_to_rows", "stack_to_batch_rows", "_rows_to_stack", "_ps_rows_to_batch_first"}


def contiguous_result(t):
    """A result in contiguous memory (Note [results])."""
    if isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_contiguous():
        return t.contiguous()
    return t


def copied_result(t):
    """A result that is an operand seen through views, copied (Note [results])."""
    return t.clone(memory_format=torch.contiguous_format) if isinstance(t, torch.Tensor) else t


def _an_operand(n: Any) -> bool:
    """Whether a product-graph value is one of the product's arguments seen through views."""
    for _ in range(32):
        if not isinstance(n, fx.Node):
            return False
        if n.op == "placeholder":
            return True
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", None)
        if name not in _RESULT_VIEWS and n.target is not operator.getitem or not n.args:
            return False
        n = n.args[0]
    return False


def _fresh(out: Any, args: tuple, differentiable: bool = False) -> Any:
    """The results (not ``y``) as torch.func returns them: a result that shares the memory of one of the call's
    arguments (passed through a rule's own helper, which the graph's ``copied_result`` does not see) is copied
    (Note [results]; the graph already made every result contiguous).
    """
    if not isinstance(out, tuple) or len(out) < 2 or torch.compiler.is_compiling() or _rt.transformed():
        return out  # (no storage under vmap's wrappers)
    given = {
        a.untyped_storage().data_ptr() for a in args
        if isinstance(a, torch.Tensor) and a.layout == torch.strided and a.device.type != "meta" and a.numel()}

    def fresh(r):
        if not isinstance(r, torch.Tensor) or r.layout != torch.strided:
            return r
        if given and r.numel() and r.device.type != "meta" and r.untyped_storage().data_ptr() in given:
            with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
                return r.clone(memory_format=torch.contiguous_format)
        return r

    return (out[0],) + tuple(fresh(o) if isinstance(o, torch.Tensor) else tree_map(fresh, o) for o in out[1:])


def finish(b: Builder, outputs: Any, src: Source) -> Product:
    """Close a product graph: prefix attribute reads with ``model.``, lint, clean, wrap in a Product."""
    for n in b.graph.nodes:
        if n.op == "get_attr":
            n.target = "model." + n.target
    holder = nn.Module()
    holder.model = src.model
    for name, module in b.modules.items():
        holder.add_module(name, module)
    if isinstance(outputs, tuple) and len(outputs) > 1:  # the results after y: the caller's (Note [results])
        outputs = (outputs[0],) + tuple(fx.node.map_arg(o, lambda n: b.graph.call_function(
            copied_result if _an_operand(n) else contiguous_result, (n,))) for o in outputs[1:])
    b.graph.output(outputs)
    gm = fx.GraphModule(holder, b.graph, class_name="Product")  # before the purity checks: column loops are
    gm.model = src.model                                          # submodules
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    clean(gm)
    gm.fallback_ops = list(b.fallback_nodes)
    return gm


def warn_fallback(nodes: Sequence[fx.Node]) -> None:
    """Name, once per product, the ops differentiated by the autograd fallback."""
    if nodes:
        warnings.warn("fxjac: these ops have no structured rule and use the exact but slower autograd fallback "
                      "(node-local torch.func; a per-sample loop where vmap has no batching rule):\n"
                      + describe(nodes), stacklevel=4)


def _check_concrete_names(model: nn.Module, concrete_args) -> None:
    """``concrete_args`` must name parameters of ``forward`` (unless it takes ``**kwargs``)."""
    from .tracing import forward_parameters

    params = forward_parameters(model) if not isinstance(model, fx.GraphModule) else None
    if not concrete_args or params is None or any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind is not p.VAR_POSITIONAL]
    unknown = [k for k in concrete_args if k not in names]
    if unknown:
        raise OptionError(f"concrete_args names {unknown}, which forward does not take; its parameters: {names}")


def _check_common(leaf_modules, concrete_args, output, strict, differentiable) -> tuple:
    """The options every product takes, checked when it is built (OptionError, a ValueError); returns
    ``leaf_modules`` as a tuple (one class or module may be given alone).
    """
    for name, flag in (("strict", strict), ("differentiable", differentiable)):
        if not isinstance(flag, bool):
            raise OptionError(f"{name}= takes True or False, got {flag!r}")
    if output is not None and (isinstance(output, bool) or not isinstance(output, (int, str))):
        raise OptionError(f"output= takes an index or a key, got {output!r}")
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise OptionError(f"concrete_args= takes a dict of argument names to values, got {concrete_args!r}")
    items = [leaf_modules] if isinstance(leaf_modules, (type, nn.Module)) else leaf_modules
    try:
        items = list(items)
    except TypeError:
        items = [leaf_modules]
    bad = [m for m in items if not (isinstance(m, nn.Module) or (isinstance(m, type) and issubclass(m, nn.Module)))]
    if bad:
        raise OptionError(f"leaf_modules= takes nn.Module classes or instances, got {bad[0]!r}")
    return tuple(items)


def _refuse_complex(product: str, src: Source) -> None:
    """A Jacobian or curvature w.r.t. complex values: refused (UnsupportedOpError). Each complex number is two
    real ones to a real output, but these products contract J with itself as if the values were real (J Jᵀ, not
    the curvature of the real and imaginary parts: a GGN diagonal of 0 for a weight that moves the output), and a
    Jacobian's result has the dtype of the real output. vjp, jvp, jmp and mjp take complex values as autograd does.
    """
    names = [p.name for p in src.params if p.param.is_complex()]
    if src.wrt_kind == "input" and src.inputs[src.wrt_index].meta.get("val") is not None and \
            src.inputs[src.wrt_index].meta["val"].is_complex():
        names = [f"input {src.wrt_index}"]
    if names:
        raise UnsupportedOpError(
            f"fxjac.{product} w.r.t. complex values ({', '.join(names[:5])}): these products treat the values as "
            "real, which complex numbers are not (each is a real and an imaginary part). Store a complex parameter "
            "as a real one with a last axis of 2 and call torch.view_as_complex on it in forward: the products "
            "are then those of the real and imaginary parts. fxjac.vjp, jvp, jmp and mjp take complex values as "
            "autograd does")


def make_product(assemble: Callable, model: nn.Module, wrt: Any, *, example_inputs=None, leaf_modules=(),
                 concrete_args=None, output=None, strict=False, differentiable=False, variant=None,
                 n_inputs: Optional[int] = None, takes_target: bool = False, summed: bool = False,
                 no_operand: Optional[str] = None, real_only: Optional[str] = None) -> Product:
    """Build a Product: ``assemble(src, builder, key)`` writes the product graph and returns its outputs.
    ``summed``: the result is a parameter-space quantity summed over the batch (what ``accumulate`` adds up).

    ``no_operand``: why the product takes no operand (``matrix="identity"``), told to a call that passes one.

    ``real_only``: the product's name where it refuses complex parameters or a complex input to differentiate
    (:func:`_refuse_complex`).

    ``variant(operands) -> key or None`` lets a product dispatch an operand of another form (``[B, P]`` instead
    of ``[P]``) to a sibling product built on demand with ``key``.
    """
    if isinstance(model, Product):
        raise TypeError("pass the model, not a product")
    leaf_modules = _check_common(leaf_modules, concrete_args, output, strict, differentiable)
    _check_concrete_names(model, concrete_args)
    check_initialised(model)

    def build(inputs, key, of=None, layout=None):
        # ``of``: the product's model (a deep copy's, not the one built from); ``layout``: a sibling's BuiltLayout
        with BUILD_LOCK, _GeneratedSources() as sources:  # Note [tracing and threads]
            prod = _build(inputs, key, model if of is None else of, wrt if layout is None else layout)
            sources.keep(prod, *_kept_source(prod))
            return prod

    def _build(inputs, key, model, wrt):
        inputs = tuple(tree_map(_plain, tuple(inputs)))
        _refuse_meta(inputs)
        _same_batch(inputs)
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves(inputs)):
            _rt.tune_malloc()  # Note [glibc's heap and column stacks]
        src = build_source(model, wrt, list(inputs), leaf_modules=leaf_modules, concrete_args=concrete_args,
                           output=output)
        if real_only:
            _refuse_complex(real_only, src)
        b = Builder(src.gm, default_rules(), strict=strict)
        try:
            outs = assemble(src, b, key)
        except BatchLayoutError as err:
            raise UnsupportedOpError(f"{err}:\n" + describe([err.node])) from err
        except MissingRulesError as err:
            nodes = list(err.nodes)
            if strict:  # every op without a rule, and the op whose rule declined these arguments
                missing = _all_missing(src, b)
                nodes = missing + [n for n in nodes if n not in missing]
            raise UnsupportedOpError("strict=True and these ops have no structured rule (or none for these "
                                     "arguments):\n" + describe(nodes)) from err
        gm = finish(b, outs, src)
        warn_fallback(b.fallback_nodes)
        prod = Product(gm, gm.graph, None, {"n_inputs": len(src.inputs), "output": output,
                                             "differentiable": differentiable, "concrete_args": concrete_args})
        prod.model = model
        prod._fxjac_src = src
        prod._fxjac_structure = _structure(src)
        prod.wrt_names = [p.name for p in src.params]
        prod._fxjac_param_shapes = [(p.name, p.shape) for p in src.params]
        prod._fxjac_dtypes = {name: t.dtype for name, t in _floating_state(model)}
        prod.fallback_ops = list(b.fallback_nodes)
        return prod

    spec = {"n_inputs": n_inputs, "output": output, "differentiable": differentiable, "variant": variant,
            "takes_target": takes_target, "concrete_args": concrete_args, "summed": summed, "no_operand": no_operand}

    def _make() -> Product:
        if example_inputs is not None:
            inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
            built = build(inputs, None)
            spec["n_inputs"] = len(inputs)
            prod = Product(built, built.graph, build, spec)
            prod.model = model
            prod._install(built, built._fxjac_src)
            prod.wrt_names = built.wrt_names
            prod._fxjac_param_shapes = built._fxjac_param_shapes
            prod._fxjac_dtypes = built._fxjac_dtypes
            return prod
        # Validate the options now (wrt names, modes, tracing) even though shapes wait for the first call.
        from .source import parse_wrt, select_params
        from .tracing import check_modes, input_names, trace

        kind, index = parse_wrt(wrt)
        params = select_params(model, wrt) if kind == "params" else []
        try:
            gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
            check_modes(gm, model)
            names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        except TraceError as err:
            # Without inputs a dtype read while tracing is the model's floating dtype (Note [dtypes while tracing]),
            # and a tuple's length is unknown (Tracer.iter); a forward that failed after such a guess (it checks an
            # integer input's dtype, iterates over chunks) is traced again at the first call, with the inputs, and
            # reports a failure then.
            names = input_names(model, concrete_args) if getattr(err, "guessed", False) else None
            if names is None:
                raise
        n_ph = len(names)
        if kind == "input" and not 0 <= index < n_ph:
            raise OptionError(f"wrt='input:{index}' but the model has {n_ph} input(s)")
        spec.update(lazy=True, n_inputs=n_ph)
        graph = fx.Graph()
        phs = [graph.placeholder(input_name(name)) for name in names]
        rest = graph.placeholder("*operands")  # the operands' names are the built product's (p.code shows them then)
        graph.output(graph.call_function(_unbuilt, tuple(phs) + (rest,)))
        holder = nn.Module()
        holder.model = model
        prod = Product(holder, graph, build, spec)
        prod.model = model
        prod.wrt_names = [p.name for p in params]
        prod._fxjac_param_shapes = [(p.name, p.shape) for p in params]
        prod._fxjac_structure = []
        return prod

    with _GeneratedSources() as sources:  # Note [generated sources]
        prod = _make()
        sources.keep(prod, *_kept_source(prod))
        return prod


def _kept_source(prod) -> tuple:
    """The traced model a built product keeps (read by its structure check and drawings)."""
    src = getattr(prod, "_fxjac_src", None)
    return (src.gm,) if src is not None else ()


def _all_missing(src: Source, b: Builder) -> list:
    from passes.builder import is_structural

    return [n for n in src.gm.graph.nodes if n.op in ("call_function", "call_method")
            and not is_structural(n) and b.structured(n) is None]

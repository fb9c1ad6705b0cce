"""``fxjac.compile`` (products by name, optionally through torch.compile) and ``fxjac.unflatten``."""

from __future__ import annotations

from typing import Optional

import torch

from .errors import OptionError
from .product import empty_batch


def _products() -> dict:
    from . import direction

    table = {"jvp": direction.jvp, "vjp": direction.vjp, "jmp": direction.jmp, "mjp": direction.mjp,
             "jacobian": direction.jacobian}
    try:
        from . import metric

        table.update(jmjtp=metric.jmjtp, jtmjp=metric.jtmjp, ggn=metric.ggn)
        from . import curvature

        table.update(ggn_vp=curvature.ggn_vp)
    except ImportError as err:  # pragma: no cover - metric products are part of the package
        if "metric" not in str(err):
            raise
    return table


def compile(model: torch.nn.Module, product: str, *, backend: Optional[str] = None,  # noqa: A001
            mode: Optional[str] = None, dynamic: Optional[bool] = True, **options):
    """Build the product named ``product`` (``"jvp"``, ``"jtmjp"``, …) with ``options``.

    Args:
        model: the model.
        product: the product's name, as the function that builds it.
        backend: when given, the product is passed to ``torch.compile(product, backend=backend,
            fullgraph=True, dynamic=True)`` (``fullgraph=False`` for a model holding an RNN, which torch.compile
            does not trace).
        mode: torch.compile's ``mode`` (``"max-autotune"``, …), with ``backend`` only; for ``"jacobian"`` and
            ``"jmjtp"``, ``"auto"``, ``"forward"`` or ``"reverse"`` is the product's own ``mode`` (the two sets of
            values are apart).
        dynamic: torch.compile's ``dynamic`` (default True: a new batch size reuses the compiled code), with
            ``backend`` only.
        **options: the options of that product.

    Returns:
        The product (a GraphModule), or, when ``backend`` is given, a callable that runs it through
        ``torch.compile`` (built and checked eagerly at its first call when no ``example_inputs`` were given).
    """
    table = _products()
    if product not in table:
        raise OptionError(f"unknown product {product!r}; one of {sorted(table)}")
    if product in ("jacobian", "jmjtp") and mode in ("auto", "forward", "reverse"):
        options["mode"], mode = mode, None  # the product's accumulation order
    if backend is None and (mode is not None or dynamic is not True):
        raise OptionError("mode= and dynamic= are torch.compile's options: they need backend=")
    if backend is not None:
        _check_compile_options(backend, mode)
    p = table[product](model, **options)
    if backend is None:
        return p
    return CompiledProduct(p, backend, mode, dynamic)


def _check_compile_options(backend, mode) -> None:
    """torch.compile checks its backend and mode at the first call: checked when the product is built."""
    from torch._dynamo.backends.registry import lookup_backend

    if isinstance(backend, str):
        try:
            lookup_backend(backend)
        except Exception as err:  # noqa: BLE001 - dynamo's InvalidBackend
            raise OptionError(f"backend={backend!r} is not a torch.compile backend; one of "
                              f"{sorted(torch._dynamo.list_backends(exclude_tags=()))}") from err
    modes = list(torch._inductor.list_mode_options())
    if mode is not None and mode not in modes:
        raise OptionError(f"mode={mode!r} is not a torch.compile mode; one of {modes} (and, for 'jacobian' and "
                          "'jmjtp', the product's own 'auto', 'forward' or 'reverse')")


# Note [guards of a compiled product]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Dynamo guards every global that the code it traced read, and checks them all at each call: the generated code
# calls fxjac's rules, which read fxjac's modules, torch and Python's builtins (some 300 guards for the cnn's
# vjp). Those are fixed for the life of the process, so fxjac.compile leaves them unguarded (torch.compile's
# guard_filter_fn; not with mode=, which torch.compile cannot take beside options) and keeps every other guard:
# on tensors, on the model's modules, on the user's globals (a fallback leaf's own forward), on grad mode.
# Interleaved calls, one thread: the cnn's vjp at batch 16, 2.10 -> 2.03 ms; the small MLP's at 64, 0.117 -> 0.107.
_LIBRARY_GLOBALS = ("G['__import_fxjac", "G['__import_passes", "G['__import_torch", "G['__builtins_dict",
                    "G['fxjac_", "G['torch']", "G['math']", "G['operator']", "G['builtins']")


def library_globals_unguarded(entries) -> list:
    """torch.compile's ``guard_filter_fn``: keep every guard but those on fxjac's, torch's and the builtins'
    globals (Note [guards of a compiled product]).
    """
    return [not (e.is_global and e.name.startswith(_LIBRARY_GLOBALS)) for e in entries]


class CompiledProduct:
    """A product run through ``torch.compile(p, backend=..., fullgraph=True, dynamic=True)``.

    A product built without ``example_inputs`` specialises itself at its first call, which cannot happen inside
    a compiled graph: that call runs eagerly, the following ones compiled.
    """

    def __init__(self, product, backend: str, mode: Optional[str] = None, dynamic: Optional[bool] = True):
        self.product = product
        self.backend = backend
        self.mode, self.dynamic = mode, dynamic
        self._compiled: dict = {}  # id of the product (or of its sibling for another operand form) -> compiled
        if not product._fxjac_spec.get("lazy"):
            self._compile(product)

    @property
    def compiled(self):
        """The compiled forward of the product itself (``None`` before its first call when built lazily)."""
        return self._compiled.get(id(self.product))

    def _compile(self, p):
        # The generated forward is a code object of its own per product, so each product gets its own dynamo
        # cache (compiling ``Product.__call__``, shared by all products, would exhaust dynamo's per-code limit).
        # torch.compile refuses to trace nn.RNN/LSTM/GRU ("Attempted to wrap RNN"): around them it breaks the graph.
        whole = not any(isinstance(m, torch.nn.RNNBase) for m in p.model.modules())
        options = None if self.mode is not None else {"guard_filter_fn": library_globals_unguarded}
        self._compiled[id(p)] = torch.compile(p.forward, backend=self.backend, fullgraph=whole, dynamic=self.dynamic,
                                              mode=self.mode, options=options)

    def __call__(self, *args, **kwargs):
        """Compute the product (compiled after the first call with operands of this form)."""
        p = self.product._variant_of(args, build=True) or self.product  # a jvp's [B, P] tangents: a sibling
        compiled = self._compiled.get(id(p))
        if compiled is not None and empty_batch(args[:p._fxjac_spec.get("n_inputs")]):
            return p(*args, **kwargs)  # an empty batch, eagerly (Note [an empty batch] in fxjac/product.py)
        if compiled is None:
            out = p(*args, **kwargs)
            self._compile(p)
            return out
        p._check_structure()
        with torch.set_grad_enabled(bool(p._fxjac_spec.get("differentiable"))):
            return compiled(*args, **kwargs)

    @property
    def code(self) -> str:
        """The generated code of the underlying product."""
        return self.product.code


def unflatten(product, vec: torch.Tensor) -> dict:
    """Split a flat parameter vector ``[P]`` or ``[B, P]`` into ``{name: tensor}`` in the product's layout.

    Args:
        product: a product built with parameters as ``wrt``.
        vec: ``[P]``, or any ``[..., P]`` (the leading axes are kept).

    Returns:
        A dict from parameter name to a tensor of shape ``[..., *param.shape]``.
    """
    product = getattr(product, "product", product) if isinstance(product, CompiledProduct) else product
    shapes = getattr(product, "_fxjac_param_shapes", None)
    if not shapes:
        raise OptionError("unflatten needs a product built with wrt='params' or parameter names")
    total = sum(_numel(s) for _, s in shapes)
    if vec.shape[-1] != total:
        raise OptionError(f"the vector has {vec.shape[-1]} entries in its last axis, the product's layout {total}")
    out, offset = {}, 0
    for name, shape in shapes:
        n = _numel(shape)
        out[name] = vec[..., offset:offset + n].reshape(tuple(vec.shape[:-1]) + tuple(shape))
        offset += n
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

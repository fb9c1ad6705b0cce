"""The primal side of every product: the traced model, its selected output, its parameters and ``wrt``."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from passes import propagate_shapes
from passes.shape_prop import batch_size_of, propagate_batch_dims

from .errors import ModeError, OptionError, ShapeError, StaleProductError, TraceError, source_line
from .tracing import check_modes, fields_as_tuples, trace, unpack_sequence_arguments


@dataclass
class ParamInfo:
    """One selected parameter: its canonical name, the tensor, its offset in the flat layout."""

    name: str
    param: torch.nn.Parameter
    offset: int
    module: str  # the block it belongs to: its name without the last part ("" for the root's own)

    @property
    def numel(self) -> int:
        """Number of scalars."""
        return self.param.numel()

    @property
    def shape(self) -> tuple:
        """The parameter's shape."""
        return tuple(self.param.shape)


@dataclass
class Source:
    """A traced, normalised, shape-propagated model with its differentiation target."""

    model: nn.Module
    gm: fx.GraphModule
    inputs: list  # placeholder nodes
    output: fx.Node  # the selected output tensor node
    wrt_kind: str  # "input" or "params"
    wrt_index: int = 0
    params: list = field(default_factory=list)  # ParamInfo, in the flat layout's order
    param_nodes: dict = field(default_factory=dict)  # get_attr node -> ParamInfo

    @property
    def P(self) -> int:  # noqa: N802
        """Number of selected scalar parameters."""
        return sum(p.numel for p in self.params)



def check_initialised(model: nn.Module) -> None:
    """Raises OptionError for parameters or buffers a lazy module has not shaped yet (whatever ``wrt`` is)."""
    lazy = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if isinstance(t, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        raise OptionError(f"the parameters {lazy[:5]} are not initialised yet (a lazy module: nn.LazyLinear, "
                          "nn.LazyConv2d…): run the model once on a batch (model(x)) before building the product")


class BuiltLayout(tuple):
    """The parameter names of a built product, in its flat layout, as ``wrt`` for a sibling product (a jvp's
    ``[B, P]`` form, built at its first use): the same layout, a parameter frozen since the build included.
    """


def select_params(model: nn.Module, wrt: Any) -> list:
    """The parameters selected by ``wrt`` (``"params"``, names / module prefixes, or a :class:`BuiltLayout`), in the
    flat layout.

    Raises:
        OptionError: a name matches nothing, or names a frozen parameter (with the nearest names).
    """
    check_initialised(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(wrt, BuiltLayout):
        every = dict(model.named_parameters())
        gone = [n for n in wrt if n not in every]
        if gone:
            raise StaleProductError(f"the model's parameter(s) {gone[:5]} of this product's layout are gone since "
                                    "it was built; build the product again")
        chosen = [(n, every[n]) for n in wrt]
    elif wrt == "params":
        chosen = named
    else:
        names = [wrt] if isinstance(wrt, str) else list(wrt)
        aliases = list(model.named_parameters(remove_duplicate=False))
        canonical = {id(p): n for n, p in model.named_parameters()}
        frozen = {n for n, p in aliases if not p.requires_grad}
        ids = set()
        for want in names:
            hits = [p for n, p in aliases if n == want or n.startswith(want + ".")]
            if not hits:
                buffers = [n for n, _ in model.named_buffers() if n == want or n.startswith(want + ".")]
                if buffers:
                    raise OptionError(f"wrt names {want!r}, which holds buffers, not parameters ({buffers[:5]}): a "
                                      "buffer is a constant of the product; register it as an nn.Parameter to "
                                      "differentiate w.r.t. it")
                modules = sorted({n.rsplit(".", 1)[0] for n, _ in aliases if "." in n})  # prefixes are accepted too
                near = difflib.get_close_matches(want, [n for n, _ in aliases] + modules, n=5, cutoff=0.4)
                near += [n for m in near if m in modules for n, _ in aliases if n.startswith(m + ".")][:6]
                near = list(dict.fromkeys(near)) or [n for n, _ in aliases][:5]
                raise OptionError(f"wrt names no parameter {want!r}; nearest names: {near}")
            if all(not p.requires_grad for p in hits):
                named_frozen = sorted(n for n in frozen if n == want or n.startswith(want + "."))
                raise OptionError(f"wrt names the frozen parameter(s) {named_frozen} (requires_grad=False); "
                                  "unfreeze them or choose others")
            ids |= {id(p) for p in hits if p.requires_grad}
        chosen = [(canonical[id(p)], p) for n, p in named if id(p) in ids]
    if not chosen:
        swapped = any(not isinstance(p, nn.Parameter) for _, p in model.named_parameters())
        raise OptionError("wrt selects no parameter with requires_grad=True" + (
            ": the model's parameters are swapped for tensors that do not require grad (inside "
            "torch.func.functional_call?). Build the product before (example_inputs=, or one plain call), or "
            "swap in tensors that require grad" if swapped else ""))
    out, offset = [], 0
    for n, p in chosen:
        module = n.rsplit(".", 1)[0] if "." in n else ""
        out.append(ParamInfo(n, p, offset, module))
        offset += p.numel()
    return out


def parse_wrt(wrt: Any) -> tuple:
    """``("input", N)`` or ``("params", None)``."""
    if isinstance(wrt, str) and (wrt == "input" or wrt.startswith("input:")):
        if wrt == "input":
            return "input", 0
        try:
            return "input", int(wrt.split(":", 1)[1])
        except ValueError as err:
            raise OptionError(f"bad wrt {wrt!r}: use 'input', 'input:N', 'params' or parameter names") from err
    if isinstance(wrt, (list, tuple)) and not all(isinstance(w, str) for w in wrt):
        bad = next(w for w in wrt if not isinstance(w, str))
        raise OptionError(f"bad wrt entry {bad!r}: a list names parameters or module prefixes as strings "
                          "('fc.weight', 'encoder'); for an input use wrt='input:N'")
    if wrt == "params" or isinstance(wrt, (list, tuple)) or isinstance(wrt, str):
        return "params", None
    raise OptionError(f"bad wrt {wrt!r}: use 'input', 'input:N', 'params' or a list of parameter names")


def _check_output_batch(out: fx.Node, grown, example_inputs: Sequence) -> None:
    """Refuse an output whose batch is not its first axis, one row per sample (API.md: dim 0 of the output), and
    one that does not grow with the batch although it has the batch's size (a loop over the samples).

    Raises:
        ShapeError: naming what was measured and the usual fix.
        TraceError: for a loop over the batch, whose length tracing fixed.
    """
    if grown is None or not isinstance(out.meta.get("val"), torch.Tensor) or out.meta["val"].dim() == 0:
        return
    bd, rows = out.meta.get("batch_dim"), out.meta.get("batch_factor", 1)
    batch = batch_size_of(example_inputs)
    if bd is None and batch > 1 and out.meta["val"].shape[0] == batch:  # (at 1: a whole-batch reduction)
        raise TraceError(f"the model's output keeps {batch} rows when the batch grows by one sample: forward "
                         "loops over the batch (for r in h.unbind(0), h.split(1), range(x.shape[0])), and tracing "
                         "fixed the loop to the traced batch size. Use ops that take every sample at once "
                         "(h.sort(dim=-1), h.median(dim=-1), torch.vmap(f)(h) in a submodule named in "
                         "leaf_modules=[...])")
    if bd not in (0, None):
        raise ShapeError(f"the model's output carries the batch on axis {bd}; fxjac takes dim 0 of the output as "
                         "the batch (a sequence-first model: permute its output to batch first)")
    if bd == 0 and rows != 1:
        raise ShapeError(f"the model's output holds {rows} rows per sample on its batch axis (logits.view(-1, C) "
                         "of [B, T, C]?); return one row per sample, e.g. [B, T, C] (cross-entropy: "
                         "class_dim=-1)")


_SPLITS = {"split": 2, "chunk": 2, "unbind": 1, torch.split: 2, torch.chunk: 2, torch.unbind: 1}
"""Ops that cut a value into pieces, with the position of their ``dim`` argument."""


def _check_batch_splits(gm: fx.GraphModule) -> None:
    """Refuse cutting the batch axis into pieces (``h.unbind(0)``, micro-batches ``x.split(2)``, ``x.chunk(2)``):
    tracing fixed how many pieces there are, so at another batch size samples would be dropped or missing.

    Raises:
        TraceError: naming the op and the usual fix.
    """
    for n in gm.graph.nodes:
        if n.op not in ("call_method", "call_function") or n.target not in _SPLITS or not n.args:
            continue
        src, at = n.args[0], _SPLITS[n.target]
        val, bd = (src.meta.get("val"), src.meta.get("batch_dim")) if isinstance(src, fx.Node) else (None, None)
        dim = n.kwargs.get("dim", n.args[at] if len(n.args) > at else 0)
        if not isinstance(val, torch.Tensor) or not isinstance(bd, int) or not isinstance(dim, int) or \
                dim % max(val.dim(), 1) != bd or \
                src.meta.get("batch_factor", 1) != 1 and src.meta.get("sample_major") is not True:
            continue  # (the batch interleaved with time, [T·B, d].split(B): each piece holds every sample)
        name = n.target if isinstance(n.target, str) else n.target.__name__
        where = source_line(n)
        raise TraceError(f"forward cuts the batch axis into pieces ({name} along dim {dim}"
                         + (f", at {where}" if where else "") + "): tracing fixed how many pieces there are to the "
                         "traced batch's, so at another batch size samples would be dropped or missing. Run the "
                         "ops on the whole batch (a loop over samples: ops that take every sample at once, such as "
                         "h.sort(dim=-1); micro-batches: the whole batch at once), or torch.vmap in a submodule "
                         "named in leaf_modules=[...]")


# Relative changes that are rounding: another batch size may take other kernels (blocking; on CUDA, TF32
# convolutions, cuDNN's algorithm choice), so a model is refused only well above that.
_SAME = {("cpu", torch.float64): 1e-8, ("cpu", torch.float32): 2e-4, ("cuda", torch.float64): 1e-6,
         ("cuda", torch.float32): 1e-2}


def _relative_change(before, after) -> float:
    """The largest change between two floating tensors over the entries finite in both, relative to the largest
    such entry of ``before``.
    """
    finite = torch.isfinite(before) & torch.isfinite(after)
    diff = (before - after).abs()[finite]
    scale = before.abs()[finite].max() if finite.any() else torch.tensor(0.0)
    return (diff.max() / scale.clamp_min(torch.finfo(before.dtype).tiny)).item() if diff.numel() else 0.0


def _tolerance(device_type: str, dtypes) -> float:
    """How much an output may move from rounding alone: that of the least precise floating dtype the model
    computes in (a float32 body under a float64 head rounds as float32).
    """
    return max(_SAME.get((device_type, dt), 1e-1) for dt in dtypes)


def _computed_dtypes(model: nn.Module, example_inputs: Sequence, y, gm: fx.GraphModule) -> set:
    """The floating dtypes of the output, the inputs, the parameters, the buffers and every value the graph
    computes (a layer run in float32 inside a float64 model rounds as float32: the checks' tolerance is its).
    """
    tensors = itertools.chain(model.parameters(), model.buffers(), example_inputs, [y],
                              (n.meta.get("val") for n in gm.graph.nodes))
    return {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}


def _check_samples_independent(y, grown, dtypes=()) -> None:
    """Refuse a model whose output for a sample changes when another sample joins the batch.

    ``grown`` is the output on the example batch plus a copy of its first sample. Every product assumes that
    samples are independent (API.md); batch statistics or a mean over the batch break it, silently otherwise.

    Raises:
        ModeError: with the size of the change.
    """
    if not (isinstance(y, torch.Tensor) and isinstance(grown, torch.Tensor) and y.dim() > 0 and y.numel()
            and grown.shape[1:] == y.shape[1:] and grown.shape[0] == y.shape[0] + 1):
        return
    before, after = y.detach(), grown[:y.shape[0]].detach()
    if not before.is_floating_point():
        changed = not torch.equal(before, after)
        rel = float("nan")
    else:
        rel = _relative_change(before, after)
        same_nan = torch.equal(torch.isnan(before), torch.isnan(after))
        changed = rel > _tolerance(before.device.type, {before.dtype, *dtypes}) or not same_nan
    if changed:
        raise ModeError(f"the model's output for the first {y.shape[0]} samples changed (relative {rel:.1e}) when "
                        "one more sample joined the batch: its samples depend on each other (batch statistics, a "
                        "mean or a softmax over the batch axis?), or forward updates state at every call (the old "
                        "nn.utils.spectral_norm's power iteration in training mode). fxjac's products are per "
                        "sample, of a fixed function; make the forward treat samples independently and keep its "
                        "state (model.eval() for BatchNorm and spectral norm)")


def _check_samples_independent_in_place(gm: fx.GraphModule, example_inputs: Sequence, y, dtypes=()) -> None:
    """Change some samples (each to its neighbour's values) and refuse the model if another sample's output moves:
    a whole graph given as the batch couples its rows, through an ``[N, N]`` adjacency (the model cannot run on
    one more sample then, so the check above saw nothing) or through fixed edge indices (one more sample, unreached
    by the edges, changes nothing there). The samples changed are those with bit ``j`` of their index set, then
    those without, for each bit of the index: any two samples are told apart in 2·⌈log₂ B⌉ runs (an isolated
    last node hid a graph's coupling when only the last sample changed), up to :data:`_COUPLING_BITS` bits.

    Raises:
        ModeError: with the size of the change.
    """
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not (isinstance(y, torch.Tensor) and y.dim() > 0 and y.is_floating_point() and tensors
            and y.shape[0] == tensors[0].shape[0] >= 2):
        return
    batch = y.shape[0]
    index = torch.arange(batch)
    def changed(x, moved):
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch:
            return x
        moved = moved.to(x.device)
        other = x.roll(1, 0)  # each sample gets another's values (a copy of the batch's own)
        if x.is_floating_point() and torch.equal(other[moved], x[moved]):
            other = other + 1
        return torch.where(moved.view((batch,) + (1,) * (x.dim() - 1)), other, x)

    for bit in range(min(_COUPLING_BITS, (batch - 1).bit_length())):
        for moved in ((index >> bit) & 1 == 1, (index >> bit) & 1 == 0):
            try:
                with torch.no_grad():
                    out = gm(*[changed(x, moved) for x in example_inputs])
            except Exception:  # noqa: BLE001 - inputs the model cannot take at all: nothing to compare
                return
            if not (isinstance(out, torch.Tensor) and out.shape == y.shape):
                return
            kept = ~moved.to(y.device)
            before, after = y[kept].detach(), out[kept].detach()
            rel = _relative_change(before, after)
            if rel > _tolerance(before.device.type, {before.dtype, *dtypes}):
                raise ModeError(f"the model's output for some samples changed (relative {rel:.1e}) when other "
                                "samples changed: its samples depend on each other (a whole graph or set given as "
                                "the batch, an [N, N] operator over the batch axis?). fxjac's products are per "
                                "sample: put the batch first, as [B, N, F] with an operator over axis 1")


_COUPLING_BITS = 12
"""Bits of the sample index :func:`_check_samples_independent_in_place` tries at most (two runs each): every pair
of samples in an example batch of up to 4,096."""


def field_names(tp: type):
    """The field names of a NamedTuple type, a structseq (``torch.return_types.topk``: values, indices) or a
    dataclass, else None.
    """
    fields = getattr(tp, "_fields", None)
    if fields is None and hasattr(tp, "n_sequence_fields"):
        fields = getattr(tp, "__match_args__", None)
    if fields is None and isinstance(tp, type) and dataclasses.is_dataclass(tp):
        fields = [f.name for f in dataclasses.fields(tp)]
    return tuple(fields) if fields is not None else None


def _field_index(gm: fx.GraphModule, output: str, example_inputs: Sequence) -> Any:
    """A NamedTuple output's field ``output`` as its index (the graph can index a tuple, not name its fields), or
    ``output`` itself where the output is no NamedTuple; an index checked against a tuple the graph returns as
    one value (a NamedTuple); from one shape run of the model.
    """
    try:
        whole = propagate_shapes(gm, *example_inputs)
    except Exception:  # noqa: BLE001 - the main shape run reports the model's own errors
        return output
    if isinstance(output, int) and isinstance(whole, (tuple, list)):
        if not -len(whole) <= output < len(whole):
            raise OptionError(f"output={output!r} selects nothing from the model's output ({len(whole)} entries)")
        return output
    fields = field_names(type(whole))
    if fields is None or not isinstance(output, str):
        return output
    if output not in fields:
        raise OptionError(f"output={output!r} selects nothing from the model's output (fields {list(fields)})")
    return fields.index(output)


def _named_tuple_field(val, index) -> Any:
    """The node a NamedTuple's or dataclass's constructor call ``val`` takes as its field ``index`` (an int), else
    None.
    """
    target = getattr(val, "target", None)
    fields = field_names(target) if isinstance(target, type) else None
    if not (isinstance(val, fx.Node) and val.op == "call_function" and fields and isinstance(index, int)
            and not isinstance(index, bool) and -len(fields) <= index < len(fields)):
        return None
    name = fields[index]
    got = val.kwargs.get(name) if name in val.kwargs else \
        (val.args[index % len(fields)] if index % len(fields) < len(val.args) else None)
    return got if isinstance(got, fx.Node) else None


def _choices(value) -> str:
    """What ``output=`` can select from a value: its fields, keys or number of entries."""
    fields = field_names(type(value))
    if fields:
        return f"a {type(value).__name__} with fields {list(fields)}"
    if isinstance(value, dict):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} entries"
    return f"a {type(value).__name__}"


def _select_output(gm: fx.GraphModule, output: Any, example_inputs: Sequence = ()) -> fx.Node:
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    val = out_node.args[0]
    if isinstance(output, (str, int)) and not isinstance(output, bool) and isinstance(val, fx.Node):
        output = _field_index(gm, output, example_inputs)
    built = _named_tuple_field(val, output)
    if built is not None:  # NT(a, b)[i] is the i-th argument: the constructor then has no user, nor a fallback
        out_node.args = (built,)
        if not val.users:
            gm.graph.erase_node(val)
        return built
    if output is not None:
        try:
            if isinstance(val, fx.Node):
                with gm.graph.inserting_before(out_node):
                    sel = gm.graph.call_function(operator.getitem, (val, output))
                sel.meta["fxjac_selection"] = True  # output= indexing one node's value (a tuple, or a tensor)
                out_node.args = (sel,)
                val = sel
            elif isinstance(val, dict) and isinstance(output, int) and output not in val:
                # a position among the entries that are not None, as a Hugging Face ModelOutput reads out[0]
                val = [v for v in val.values() if v is not None][output]
                out_node.args = (val,)
            else:
                val = val[output]
                out_node.args = (val,)
        except (KeyError, IndexError, TypeError) as err:
            raise OptionError(f"output={output!r} selects nothing from the model's output "
                              f"({_choices(out_node.args[0])})") from err
        if not isinstance(val, fx.Node):
            kind = type(val).__name__.replace("immutable_", "")
            raise OptionError(f"output={output!r} selects a value of type {kind} from the model's output, not a "
                              f"tensor: {val!r}")
    elif not isinstance(val, fx.Node):
        raise OptionError(f"the model returns a tuple or dict ({_choices(val)}): choose the differentiated tensor "
                          "with output= (an index or a key)")
    return val


def _check_selection(out: fx.Node, output) -> None:
    """Raises OptionError where ``output=`` selects from a model output that is one tensor (any index or key)."""
    if output is not None and out.meta.get("fxjac_selection") and \
            isinstance(out.args[0], fx.Node) and isinstance(out.args[0].meta.get("val"), torch.Tensor):
        raise OptionError(f"output={output!r} selects from a tuple or dict output, but the model returns one "
                          "tensor (indexing it would pick a sample): leave output= out")


def build_source(model: nn.Module, wrt: Any, example_inputs: Sequence, *, leaf_modules=(), concrete_args=None,
                 output=None) -> Source:
    """Trace ``model``, select its output and ``wrt``, and propagate shapes from ``example_inputs``."""
    kind, index = parse_wrt(wrt)
    params = select_params(model, wrt) if kind == "params" else []
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args, n_inputs=len(example_inputs),
               example_inputs=example_inputs)
    check_modes(gm, model)
    out = _select_output(gm, output, example_inputs)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) != len(inputs):
        raise ShapeError(f"the model takes {len(inputs)} tensor input(s), got {len(example_inputs)}")
    if kind == "input" and not 0 <= index < len(inputs):
        raise OptionError(f"wrt='input:{index}' but the model has {len(inputs)} input(s)")
    if kind == "input" and not (isinstance(example_inputs[index], torch.Tensor)
                                and example_inputs[index].is_floating_point()):
        raise OptionError(f"wrt='input:{index}': that input is not a floating-point tensor (integer ids, masks "
                          "are constants); differentiate w.r.t. a floating input or the parameters")
    try:
        y = propagate_shapes(gm, *example_inputs)
    except Exception as err:  # the model itself failed on these inputs: report it as the model's error
        _check_selection(out, output)  # (or output= indexed its one tensor: output="logits", output=5)
        pdtype = next((t.dtype for t in itertools.chain(model.parameters(), model.buffers())
                       if t.is_floating_point()), None)
        odd = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()
               and pdtype is not None and x.dtype != pdtype]
        if odd and "type" in str(err).lower():  # "dtype", "scalar type", "Input type (double) and bias type"
            raise ShapeError(f"input {odd[0]} is {example_inputs[odd[0]].dtype} and the model's parameters "
                             f"{pdtype}; the model fails on it ({str(err).splitlines()[0]}): cast the input") from err
        hint = ("\nHint: forward takes a derivative with torch.autograd.grad (a score, a force -dH/dq), which a "
                "traced graph cannot replay. Compute it with torch.func.grad in a submodule named in "
                "leaf_modules=[...] (a model that is itself one: nn.Sequential(model), leaf_modules=[type(model)])"
                if "does not require grad" in str(err) or "not used in the graph" in str(err) else "")
        raise TraceError(f"running the traced model on the example inputs failed: {err}{hint}") from err
    _check_selection(out, output)
    fields_as_tuples(gm)
    unpack_sequence_arguments(gm)
    grown = propagate_batch_dims(gm, *example_inputs)
    _check_output_batch(out, grown, example_inputs)
    _check_batch_splits(gm)
    dtypes = _computed_dtypes(model, example_inputs, y, gm)
    _check_samples_independent(y, grown, dtypes)
    _check_samples_independent_in_place(gm, example_inputs, y, dtypes)
    if not isinstance(out.meta.get("val"), torch.Tensor):
        raise OptionError(f"the selected output is not a tensor ({_choices(out.meta.get('val'))}); choose one with "
                          "output=")
    src = Source(model, gm, inputs, out, kind, index or 0, params)
    by_id = {id(p.param): p for p in params}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            obj = _resolve(gm, n.target)
            if isinstance(obj, torch.Tensor) and id(obj) in by_id:
                src.param_nodes[n] = by_id[id(obj)]
    return src


def _resolve(gm: fx.GraphModule, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

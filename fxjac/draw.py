"""``fxjac.draw``: a picture of a product's flow, rendered with graphviz (the only module importing it).

Primal ops, the tangents or cotangents that run beside them, what flows along each edge and its shape.

Note [drawing units]
    One box per primal op (a copied node of the model's graph) and one box per (role, primal) group of emitted
    nodes: the several nodes a rule emits for one op (``ct_sin = cos(...); ct_sin_1 = ct * ...``) are
    one product box named after the op, listing the functions it calls. Edges are the product graph's edges
    between boxes. Shapes come from ``node.meta["val"]`` where shape propagation stored one and, for emitted
    nodes, from one run of the product under ``FakeTensorMode`` (shapes only: no memory, no arithmetic); the
    operands are made from the product's own operand checks, which state the shapes they expect.

Note [clusters and repeated blocks]
    A box sits in the cluster of the module that made its op (``nn_module_stack``; for parameters the
    ``get_attr`` target). Only modules with children are clusters (a Linear is one op, not a cluster), and a
    numbered child of a container is one level with it (``layers.0`` -> ``layers[0]``), so ``depth=1`` shows a
    ResNet's blocks. Runs of three or more numbered siblings with the same ops and shapes are collapsed: the
    first and the last stay, the ones between become one ``× N`` box per role.
"""

from __future__ import annotations

import contextlib
import html
import logging
import operator
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import graphviz
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_map

from . import checks
from .errors import OptionError

# --- styles ----------------------------------------------------------------------------------------------

FILL = {"structured": "#d8f0d2", "fallback": "#ffd8a8", "constant": "#e6e6e6", "none": "#ffffff"}
ROLE_COLOR = {"primal": "#333333", "tangent": "#1f5fbf", "cotangent": "#c0392b", "diag": "#7d3c98",
              "factor": "#1e8449", "api": "#7f7f7f", "io": "#333333"}
REUSE_COLOR = "#9a9a9a"
_ROLES_PRODUCT = ("tangent", "cotangent", "diag", "factor")
_J_ROWS = {"sandwich", "sandwich_diag", "weighted_outer", "weighted_outer_diag", "rows_outer", "jac_sandwich",
           "project"}
_SUFFIXES = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": None, ".gv": None}
_METRIC_REDUCERS = {"gram", "gram_diag", "outer_cols", "rows_outer", "sandwich", "sandwich_diag", "weighted_outer",
                    "weighted_outer_diag", "jac_sandwich", "project", "eigen_stack", "loss_factor", "kron_gram",
                    "linear_weight_gram_diag_into"}


# --- public entry ----------------------------------------------------------------------------------------


def draw(product_or_model, path=None, *, depth: int = 1, collapse: bool = True, product: str = "vjp",
         wrt: Any = "params", example_inputs=None, shape_ops: bool = False, params: bool = True,
         reuse: str = "own", rankdir: str = "TB", **options) -> graphviz.Digraph:
    """Draw the flow of a product: primal ops, product ops, what flows between them and its shape.

    Args:
        product_or_model: a product (a GraphModule from :func:`fxjac.vjp` and friends), or an ``nn.Module``:
            then the product named by ``product`` is built with ``wrt``, ``example_inputs`` and ``options``.
        path: where to write the picture; the suffix picks the format: ``.svg``, ``.png``, ``.pdf`` (rendered
            with graphviz's ``dot``) or ``.dot`` / ``.gv`` (the DOT source, no ``dot`` binary needed).
            ``None``: write nothing.
        depth: how many levels of sub-module clusters to draw (0: none).
        collapse: replace runs of identical numbered blocks (``layers.1`` … ``layers.48``) by one ``× N`` box.
        product: the product to build for a model: ``"jvp"``, ``"vjp"``, ``"jmp"``, ``"mjp"``,
            ``"jacobian"``, ``"jtmjp"``, ``"jmjtp"`` or ``"ggn"``.
        wrt: ``wrt`` of that product.
        example_inputs: a tensor or a tuple of tensors: the model's inputs (needed for a model; for a product,
            optional — its recorded input shapes are used otherwise).
        shape_ops: also draw ops on Python values (``x.shape``, sizes); hidden by default.
        params: draw a box for every parameter read.
        reuse: which dashed "primal value reused" edges to draw: ``"own"`` (from an op and its inputs to the
            product box of that op), ``"all"`` or ``"none"``.
        rankdir: graphviz ``rankdir`` (``"TB"`` top to bottom, ``"LR"`` left to right).
        **options: options of the product built for a model (``matrix=``, ``out=``, ``loss=``, …).

    Returns:
        The ``graphviz.Digraph`` (its ``.source`` is the DOT text).

    Raises:
        OptionError: an unknown suffix or product name, a model without ``example_inputs``, a product that
            has not seen its inputs yet.
        RuntimeError: rendering SVG/PNG/PDF without graphviz's ``dot`` executable.
    """
    if reuse not in ("own", "all", "none"):
        raise OptionError(f"reuse must be 'own', 'all' or 'none', got {reuse!r}")
    if path is not None and Path(path).suffix.lower() not in _SUFFIXES:
        raise OptionError(f"draw writes {sorted(_SUFFIXES)}; got {str(path)!r}")
    inputs = _as_tuple(example_inputs)
    p = _product_of(product_or_model, product, wrt, inputs, options)
    flow = _flow_kind(p, product if isinstance(product_or_model, nn.Module)
                      and not isinstance(product_or_model, fx.GraphModule) else None, options)
    shapes = _run_shapes(p, inputs)
    g = _Picture(p, shapes, flow, depth=depth, collapse=collapse, shape_ops=shape_ops, params=params,
                 reuse=reuse).build(
        rankdir)
    if path is not None:
        _write(g, Path(path))
    return g


# --- building the product and its shapes -----------------------------------------------------------------


def _as_tuple(x) -> Optional[tuple]:
    if x is None:
        return None
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _product_of(obj, name: str, wrt, inputs, options) -> fx.GraphModule:
    from .util import CompiledProduct

    if isinstance(obj, CompiledProduct):  # fxjac.compile(..., backend=...): the product it runs
        obj = obj.product
    if isinstance(obj, fx.GraphModule) and _is_product(obj):
        if options:
            raise OptionError(f"options {sorted(options)} build a product from a model; this is a product already")
        spec = getattr(obj, "_fxjac_spec", {})
        if spec.get("lazy"):
            if inputs is None:
                raise OptionError("this product is built at its first call: call it once, or pass "
                                  "example_inputs= to draw")
            return obj._fxjac_build(inputs, None, obj.model)
        return obj
    if not isinstance(obj, nn.Module):
        raise TypeError(f"draw takes a product or an nn.Module, got {type(obj).__name__}")
    if inputs is None:
        raise OptionError("draw needs example_inputs= to build the product of a model (the shapes it draws)")
    from .util import compile as build

    return build(obj, name, wrt=wrt, example_inputs=inputs, **options)


def _is_product(gm: fx.GraphModule) -> bool:
    return hasattr(gm, "_fxjac_spec") or any("fxjac" in n.meta for n in gm.graph.nodes)


def _flow_kind(p: fx.GraphModule, name: Optional[str], options: dict) -> str:
    """What the product's stacks are: ``"vector"``, ``"stack"`` (K columns), ``"factor"`` or ``"diagonal"``."""
    if name is not None:
        if options.get("method") == "diag_backprop":
            return "diagonal"
        if name in ("jtmjp", "jmjtp", "ggn"):
            return "factor"
        return "vector" if name in ("jvp", "vjp") else "stack"
    names = {_target_name(n) for n in p.graph.nodes if n.op in ("call_function", "call_method")}
    for n in p.graph.nodes:
        if (n.meta.get("fxjac") or {}).get("role") != "api" or n.op != "call_function":
            continue
        if n.target is torch.ones_like or _target_name(n) == "reshape_like_batch":
            return "diagonal"
        if _target_name(n) == "loss_factor" and "diag" in n.args:
            return "diagonal"
    if names & _METRIC_REDUCERS:
        return "factor"
    ops = [n.name for n in p.graph.nodes if n.op == "placeholder" and "val" not in n.meta]
    return "vector" if ops and ops[0] in ("v", "w") else "stack"


class _Operand:
    """Stands for an operand placeholder until the product's check states its shape."""

    def __init__(self, name):
        self.name = name


class _ShapeRun(fx.Interpreter):
    """Runs a product once, making operands from the product's own checks and recording every value."""

    def __init__(self, gm, blocks, k):
        super().__init__(gm)
        self.values: dict = {}
        self.blocks = blocks
        self.k = k

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n] = tree_map(lambda v: _to_meta(v) if isinstance(v, torch.Tensor) else v, out)
        return out

    def call_function(self, target, args, kwargs):
        if args and isinstance(args[0], _Operand):
            like = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if target is checks.check_like:
                return torch.zeros_like(like)
            if target is checks.check_shape:
                shape = tuple(self.k if s == -1 else int(s) for s in args[1])
                return like.new_zeros(shape)
            if target is operator.getitem and self.blocks:
                n = self.blocks[args[1]]
                return torch.zeros(n, n)
        if target is checks.check_symmetric:
            return args[0]  # no values to check here: shapes only
        return super().call_function(target, args, kwargs)


def _to_meta(v: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(int(s) for s in v.shape), dtype=v.dtype, device="meta")


@contextlib.contextmanager
def _quiet(logger: str):
    """Silence a logger for the block (the shapes run retries on real tensors where fake ones fail)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _run_shapes(p: fx.GraphModule, inputs: Optional[tuple]) -> dict:
    """Every node's value as a meta tensor (or Python value), from one shapes-only run; ``{}`` if it fails."""
    phs = [n for n in p.graph.nodes if n.op == "placeholder"]
    ins = [n for n in phs if "val" in n.meta]
    if inputs is None:
        inputs = []
        for n in ins:
            v = n.meta["val"]
            if not isinstance(v, torch.Tensor):
                return {}
            inputs.append(torch.zeros(tuple(v.shape), dtype=v.dtype))
    args = list(inputs) + [_Operand(n.name) for n in phs[len(inputs):] if not n.args]
    from torch._subclasses.fake_tensor import FakeTensorMode

    for fake in (True, False):
        run = _ShapeRun(p, _blocks(p), k=2)
        try:
            with torch.no_grad():
                if fake:
                    mode = FakeTensorMode(allow_non_fake_inputs=True)
                    with mode, _quiet("torch._subclasses.fake_tensor"):  # a failed meta run logs an error
                        run.run(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
                else:
                    run.run(*args)
            return run.values
        except Exception:  # noqa: BLE001 - a picture without the emitted shapes is still a picture
            continue
    return {}


def _blocks(p) -> list:
    """Sizes of the parameter blocks (one per module owning selected parameters), for a block operand."""
    shapes = getattr(p, "_fxjac_param_shapes", None) or []
    sizes: "OrderedDict[str, int]" = OrderedDict()
    for name, shape in shapes:
        mod = name.rsplit(".", 1)[0] if "." in name else ""
        n = 1
        for s in shape:
            n *= int(s)
        sizes[mod] = sizes.get(mod, 0) + n
    return list(sizes.values())


# --- the picture -----------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """One box: a primal node, or the emitted nodes of one (role, primal) group."""

    key: str
    role: str  # primal | tangent | cotangent | diag | factor | api | io | param
    nodes: list
    primal: Optional[fx.Node] = None
    rule: str = "none"
    path: tuple = ()
    label: str = ""
    extra: dict = field(default_factory=dict)


class _Picture:
    def __init__(self, p, values, flow, depth, collapse, shape_ops, params, reuse):
        self.p = p
        self.reuse = reuse
        self.values = values
        self.flow = flow
        self.depth = depth
        self.collapse = collapse
        self.shape_ops = shape_ops
        self.params = params
        self.model = getattr(p, "model", None)
        self.by_name = {n.name: n for n in p.graph.nodes}
        self.fallback_names = {getattr(n, "name", str(n)) for n in getattr(p, "fallback_ops", [])}
        # J M Jᵀ pulled back in reverse mode: the cotangents are rows of J, not columns of a factor of M.
        self.j_rows = any(_target_name(n) in _J_ROWS for n in p.graph.nodes if n.op == "call_function")

    # values and shapes

    def value(self, n: fx.Node):
        if n in self.values:
            return self.values[n]
        return n.meta.get("val")

    def is_tensorish(self, n: fx.Node) -> Optional[bool]:
        v = self.value(n)
        if v is None and n not in self.values:
            return None
        leaves = []
        tree_map(lambda x: leaves.append(x), v)
        return any(isinstance(x, torch.Tensor) for x in leaves)

    # units

    def role_of(self, n: fx.Node) -> str:
        tag = n.meta.get("fxjac")
        if tag:
            return tag.get("role") or "api"
        if n.op == "placeholder":
            return "io" if "val" in n.meta else "operand"
        if n.op == "output":
            return "io"
        if n.op == "get_attr":
            return "param"
        return "primal"

    def module_path(self, n: fx.Node) -> Optional[str]:
        stack = n.meta.get("nn_module_stack")
        if stack:
            last = list(stack.values())[-1]
            path = last[0] if isinstance(last, tuple) else str(last)
            return re.sub(r"@\d+$", "", path)
        if n.op == "get_attr" and isinstance(n.target, str):
            t = n.target[len("model."):] if n.target.startswith("model.") else n.target
            return t.rsplit(".", 1)[0] if "." in t else ""
        return None

    def levels(self, path: Optional[str]) -> tuple:
        """Cluster levels ``(module path, label)`` of a module path (Note [clusters and repeated blocks])."""
        if not path:
            return ()
        parts = path.split(".")
        levels, i = [], 0
        while i < len(parts):
            name = ".".join(parts[:i + 1])
            label = parts[i] if not parts[i].isdigit() else f"[{parts[i]}]"
            if i + 1 < len(parts) and parts[i + 1].isdigit() and self.has_children(".".join(parts[:i + 2])):
                label = f"{parts[i]}[{parts[i + 1]}]"
                name = ".".join(parts[:i + 2])
                i += 1
            if self.has_children(name):
                levels.append((name, label))
            i += 1
        return tuple(levels)

    def has_children(self, path: str) -> bool:
        if self.model is None:
            return True
        try:
            mod = self.model.get_submodule(path)
        except AttributeError:
            return False
        return any(True for _ in mod.children())

    def is_parameter(self, n: fx.Node) -> bool:
        t = n.target[len("model."):] if n.target.startswith("model.") else n.target
        if self.model is None:
            return self.is_tensorish(n) is not False
        try:
            self.model.get_parameter(t)
        except AttributeError:
            return False
        return True

    def rule_of(self, primal: fx.Node, emitted: list) -> str:
        if primal.op not in ("call_function", "call_method", "call_module"):
            return "none"
        if primal.name in self.fallback_names or any(_is_fallback(e) for e in emitted):
            return "fallback"
        from .rules import default_rules

        try:
            rule = default_rules().lookup(primal)
        except Exception:  # noqa: BLE001 - an odd key is a picture detail, not an error
            rule = None
        if rule is not None:
            return getattr(rule, "kind", "structured")
        if emitted:
            return "structured"
        return "constant" if self.is_tensorish(primal) is False else "none"

    def units(self) -> "OrderedDict[str, _Unit]":
        groups: "OrderedDict[tuple, list]" = OrderedDict()
        for n in self.p.graph.nodes:
            tag = n.meta.get("fxjac")
            if tag and tag.get("role") in _ROLES_PRODUCT and tag.get("primal") in self.by_name:
                groups.setdefault((tag["role"], tag["primal"]), []).append(n)
        emitted_of: dict = {}
        for (role, pname), nodes in groups.items():
            emitted_of.setdefault(pname, []).extend(nodes)
        units: "OrderedDict[str, _Unit]" = OrderedDict()
        self.unit_of: dict = {}
        for n in self.p.graph.nodes:
            role = self.role_of(n)
            tag = n.meta.get("fxjac") or {}
            if role in _ROLES_PRODUCT and tag.get("primal") in self.by_name:
                key = f"{role}:{tag['primal']}"
                if key not in units:
                    primal = self.by_name[tag["primal"]]
                    units[key] = _Unit(key, role, [], primal, self.rule_of(primal, emitted_of.get(primal.name, [])),
                                       self.levels(self.module_path(primal)))
                units[key].nodes.append(n)
                self.unit_of[n] = key
                continue
            if role == "param":
                if not self.params or not self.is_parameter(n):
                    continue
            elif role == "primal" and not self.shape_ops and self.is_tensorish(n) is False:
                continue
            if role == "operand" and not n.users:
                continue
            role = "api" if role in _ROLES_PRODUCT else role
            rule = self.rule_of(n, emitted_of.get(n.name, [])) if role == "primal" else "none"
            path = self.levels(self.module_path(n)) if role in ("primal", "param") else ()
            units[n.name] = _Unit(n.name, role, [n], n if role in ("primal", "param") else None, rule, path)
            self.unit_of[n] = n.name
        return units

    # edges

    def edges(self, units) -> list:
        """(src unit, dst unit, kind, source node) for every graph edge between two different units."""
        out, seen = [], set()
        for n in self.p.graph.nodes:
            dst = self.unit_of.get(n)
            if dst is None:
                continue
            for a in n.all_input_nodes:
                src = self.unit_of.get(a)
                if src is None or src == dst:
                    continue
                if (src, dst) in seen:
                    continue
                kind = self.edge_kind(units[src], units[dst], a)
                if kind is None or (kind == "reuse" and not self.show_reuse(a, units[dst])):
                    continue
                seen.add((src, dst))
                out.append((src, dst, kind, a))
        return out

    def show_reuse(self, a: fx.Node, du: _Unit) -> bool:
        """Whether to draw the dashed edge of a primal value ``a`` read by the product box ``du``."""
        if self.reuse == "all":
            return True
        own = du.primal is not None and (a is du.primal or a in du.primal.all_input_nodes)
        return self.reuse == "own" and own

    def edge_kind(self, su: _Unit, du: _Unit, a: fx.Node) -> Optional[str]:
        """What flows from ``su`` to ``du`` (``None``: plumbing not worth an edge)."""
        if su.role in ("primal", "io", "param"):
            return "reuse" if du.role in _ROLES_PRODUCT + ("api",) else "primal"
        if su.role == "operand":
            return "operand"
        v = self.value(a)
        if su.role == "api":
            if not isinstance(v, torch.Tensor) and self.is_tensorish(a) is False:
                return None  # sizes and other Python values
            if du.role in _ROLES_PRODUCT:
                # A seed (a stack over the value it starts at) is the product's flow; weights and the like
                # feeding many boxes are plumbing.
                return du.role if self.stack_text(v, du) else None
            return "result"
        if su.role in _ROLES_PRODUCT and du.role not in _ROLES_PRODUCT and not self.stack_text(v, su):
            return "reduced"
        return su.role

    def flow_word(self, role: str, shape) -> str:
        if role == "diag" or self.flow == "diagonal":
            return "diagonal"
        if role == "factor":
            return "√M factor"
        direction = "tangent" if role == "tangent" else "cotangent"
        if self.flow == "factor" and (direction == "tangent" or not self.j_rows):
            return f"√M factor ({direction}s)"
        if self.flow == "vector" or (shape is not None and len(shape) and shape[0] == 1 and self.flow != "stack"):
            return f"{direction} vector"
        return f"{direction} K-column stack"

    def shape_text(self, node: fx.Node) -> str:
        v = self.value(node)
        return _fmt(v)

    def edge_label(self, kind, src_node, su: _Unit) -> str:
        shape = self.shape_text(src_node)
        if kind in ("primal", "reuse"):
            word = "primal" if kind == "primal" else "primal (reused)"
        elif kind == "operand":
            word = "operand"
        elif kind == "result":
            word = "result"
        elif kind == "reduced":
            word = "reduced"
        else:
            v = self.value(src_node)
            word = self.flow_word(kind, tuple(v.shape) if isinstance(v, torch.Tensor) else None)
            shape = self.stack_text(v, su) or shape
        return f"{word}\n{shape}" if shape else word

    def stack_text(self, v, su: _Unit) -> str:
        """``[K=3 | 2, 4, 8, 8]`` where a value is a stack (Note [stacked columns]), else ``""``.

        A stack is over the value of the box's op or of one of its inputs (a cotangent goes to the inputs).
        """
        if not isinstance(v, torch.Tensor) or su.primal is None or v.dim() < 1:
            return ""
        for node in [su.primal] + list(su.primal.all_input_nodes):
            pv = self.value(node)
            if isinstance(pv, torch.Tensor) and tuple(v.shape[1:]) == tuple(pv.shape):
                return f"[K={int(v.shape[0])} | " + ", ".join(str(int(s)) for s in pv.shape) + "]"
        return ""

    # collapsing

    def signature(self, units: list) -> tuple:
        """What makes two blocks the same: their primal ops and shapes, and which product roles run beside.

        Emitted nodes are left out on purpose: the cotangent sum at a block's input is emitted with the block
        that reads it, so the last block of a run differs there from the others.
        """
        sig = [(u.role, n.op, _target_name(n), _fmt(self.value(n)))
               for u in units if u.role not in _ROLES_PRODUCT for n in u.nodes]
        return tuple(sig) + tuple(sorted({u.role for u in units if u.role in _ROLES_PRODUCT}))

    def collapse_runs(self, units) -> list:
        """Runs of identical numbered blocks: (first key, last key, hidden block paths, container label)."""
        by_block: "OrderedDict[tuple, list]" = OrderedDict()
        for u in units.values():
            for i, (name, label) in enumerate(u.path):
                if label.endswith("]"):
                    by_block.setdefault(u.path[:i + 1], []).append(u)
        families: "OrderedDict[tuple, list]" = OrderedDict()
        for path, us in by_block.items():
            name, label = path[-1]
            container, idx = label[:-1].rsplit("[", 1)
            families.setdefault((path[:-1], container), []).append((int(idx), path, us))
        runs = []
        for (_, container), members in families.items():
            members.sort(key=lambda m: m[0])
            i = 0
            while i < len(members):
                j = i
                sig = self.signature(members[i][2])
                while (j + 1 < len(members) and members[j + 1][0] == members[j][0] + 1
                       and self.signature(members[j + 1][2]) == sig):
                    j += 1
                if j - i + 1 >= 3:
                    runs.append((members[i][1], members[j][1], [m[1] for m in members[i + 1:j]], container,
                                 members[i + 1][0], members[j - 1][0]))
                i = j + 1
        return runs

    # graphviz

    def build(self, rankdir: str) -> graphviz.Digraph:
        units = self.units()
        edges = self.edges(units)
        while True:  # drop plumbing that leads nowhere drawn (sizes, weights read by many boxes)
            sources = {s for s, _, _, _ in edges}
            dead = {k for k, u in units.items() if u.role == "api" and k not in sources}
            if not dead:
                break
            for key in dead:
                del units[key]
            edges = [e for e in edges if e[0] not in dead and e[1] not in dead]
        hidden: dict = {}  # unit key -> box key
        boxes: "OrderedDict[str, dict]" = OrderedDict()
        self.boxes = boxes
        force: set = set()  # block paths of the first and last block of each collapsed run
        if self.collapse:
            for r, (first, last, middle, container, lo, hi) in enumerate(self.collapse_runs(units)):
                force.update({first, last})
                mids = set(middle)
                for u in units.values():
                    blk = next((u.path[:k + 1] for k in range(len(u.path)) if u.path[:k + 1] in mids), None)
                    if blk is None or u.key in hidden:
                        continue
                    kind = u.role if u.role in _ROLES_PRODUCT else "primal"
                    bkey = f"run{r}_{kind}"
                    boxes.setdefault(bkey, dict(kind=kind, n=hi - lo + 1, container=container, lo=lo, hi=hi,
                                                path=first[:-1]))
                    hidden[u.key] = bkey

        g = graphviz.Digraph("fxjac", graph_attr=dict(rankdir=rankdir, fontname="Helvetica", fontsize="11",
                                                       nodesep="0.25", ranksep="0.35", newrank="true",
                                                       compound="true"),
                             node_attr=dict(fontname="Helvetica", fontsize="10", shape="box", height="0.3",
                                            margin="0.08,0.03"),
                             edge_attr=dict(fontname="Helvetica", fontsize="8", arrowsize="0.6"))
        tree: dict = {"children": OrderedDict(), "items": []}

        def place(path, item, at_least=0):
            node = tree
            for level in path[:max(min(self.depth, len(path)), at_least)]:
                node = node["children"].setdefault(level, {"children": OrderedDict(), "items": []})
            node["items"].append(item)

        for u in units.values():
            if u.key in hidden:
                continue
            kept = [k + 1 for k in range(len(u.path)) if u.path[:k + 1] in force]
            place(u.path, ("unit", u), max(kept, default=0))
        for bkey, box in boxes.items():
            place(box["path"], ("box", bkey, box), len(box["path"]))

        self.units_drawn = units
        self._emit(g, tree, 0)
        self._edges(g, units, edges, hidden)
        self._align(g, units, hidden)
        self._legend(g)
        return g

    def _emit(self, g, node, level, name="root"):
        for item in node["items"]:
            if item[0] == "unit":
                self._node(g, item[1])
            else:
                self._box(g, item[1], item[2])
        for (path, label), child in node["children"].items():
            cname = "cluster_" + re.sub(r"\W", "_", path)
            with g.subgraph(name=cname) as sub:
                sub.attr(label=label, style="rounded,dashed", color="#8c8c8c", fontcolor="#555555",
                         fontsize="10", labeljust="l")
                self._emit(sub, child, level + 1, cname)

    def _node(self, g, u: _Unit):
        attrs = {}
        if u.role == "primal":
            n = u.nodes[0]
            title = n.name
            sub = _target_name(n)
            shape = self.shape_text(n)
            lines = [title] + ([sub] if sub and sub != title else []) + ([shape] if shape else [])
            attrs = dict(style="filled", fillcolor=FILL[u.rule], color=ROLE_COLOR["primal"])
        elif u.role in _ROLES_PRODUCT:
            prefix = {"tangent": "t", "cotangent": "ct", "diag": "d", "factor": "s"}[u.role]
            calls = []
            for n in u.nodes:
                t = _target_name(n)
                if t not in calls:
                    calls.append(t)
            more = f", +{len(calls) - 3}" if len(calls) > 3 else ""
            lines = [f"{prefix} {u.primal.name}", ", ".join(calls[:3]) + more]
            attrs = dict(style="rounded,filled,bold", fillcolor=FILL[u.rule], color=ROLE_COLOR[u.role],
                         fontcolor=ROLE_COLOR[u.role])
        elif u.role == "param":
            n = u.nodes[0]
            t = n.target[len("model."):] if isinstance(n.target, str) and n.target.startswith("model.") else n.target
            lines = [str(t), self.shape_text(n)]
            attrs = dict(shape="box", style="filled", fillcolor="#f7f7f7", color="#bbbbbb", fontsize="8",
                         height="0.2")
        elif u.role == "io":
            n = u.nodes[0]
            lines = ["output" if n.op == "output" else f"input {n.name}", self.shape_text(n)]
            attrs = dict(shape="oval", style="bold")
        elif u.role == "operand":
            n = u.nodes[0]
            lines = [f"operand {n.name}"]
            attrs = dict(shape="oval", style="bold", color=ROLE_COLOR["api"])
        else:  # api
            n = u.nodes[0]
            lines = [_target_name(n), self.shape_text(n)]
            attrs = dict(shape="hexagon", style="filled", fillcolor="#f2f2f2", color=ROLE_COLOR["api"],
                         fontsize="8")
        g.node(_id(u.key), "\n".join(x for x in lines if x), **attrs)

    def _box(self, g, bkey, box):
        kind = box["kind"]
        what = "primal ops" if kind == "primal" else f"{kind} ops"
        label = (f"× {box['n']}\n{box['container']}[{box['lo']}] … {box['container']}[{box['hi']}]\n"
                 f"identical blocks ({what})")
        g.node(_id(bkey), label, shape="box3d", style="filled", fillcolor="#fff9db",
               color=ROLE_COLOR.get(kind, ROLE_COLOR["primal"]), fontcolor=ROLE_COLOR.get(kind, "#333333"))

    def _edges(self, g, units, edges, hidden):
        done = set()
        for src, dst, kind, a in edges:
            s, d = hidden.get(src, src), hidden.get(dst, dst)
            if s == d or (s, d) in done:
                continue
            done.add((s, d))
            label = self.edge_label(kind, a, units[src] if units[src].primal is not None else units[dst])
            color = {"primal": ROLE_COLOR["primal"], "reuse": REUSE_COLOR, "operand": ROLE_COLOR["api"],
                     "result": ROLE_COLOR["api"], "reduced": ROLE_COLOR["api"]}.get(kind)
            color = color or ROLE_COLOR.get(kind, "#333333")
            if self.flow == "diagonal" and kind in _ROLES_PRODUCT:
                color = ROLE_COLOR["diag"]
            attrs = dict(label=label, color=color, fontcolor=color)
            if kind == "reuse":
                attrs.update(style="dashed", constraint="false", penwidth="0.7")
            elif kind in _ROLES_PRODUCT and self.backward(units, s) and self.backward(units, d):
                # Cotangents run against the primal order: draw them reversed so both columns share ranks.
                g.edge(_id(d), _id(s), dir="back", penwidth="1.4", **attrs)
                continue
            elif kind in _ROLES_PRODUCT and d in units and units[d].role not in _ROLES_PRODUCT:
                attrs["penwidth"] = "0.7"  # into the product's result plumbing: thin, it is not the flow
            elif kind in _ROLES_PRODUCT:
                attrs["penwidth"] = "1.4"
            g.edge(_id(s), _id(d), **attrs)

    def backward(self, units, key) -> bool:
        """Whether a box (a unit, or a collapsed run's box) holds cotangent-side ops."""
        if key in units:
            return units[key].role == "cotangent" or (units[key].role == "diag" and self.flow == "diagonal")
        return self.boxes.get(key, {}).get("kind") == "cotangent"

    def _align(self, g, units, hidden):
        """Invisible edges primal -> its product box, so the product column runs beside the primal one."""
        for u in units.values():
            if u.role not in _ROLES_PRODUCT or u.primal is None or u.key in hidden:
                continue
            key = self.unit_of.get(u.primal)
            if key is None or key in hidden:
                continue
            g.edge(_id(key), _id(u.key), style="invis", weight="4")

    def _legend(self, g):
        def row(text, color="#000000", fill=None):
            bg = f' BGCOLOR="{fill}"' if fill else ""
            return f'<TR><TD ALIGN="LEFT"{bg}><FONT COLOR="{color}">{html.escape(text)}</FONT></TD></TR>'

        rows = [
            '<TR><TD><B>legend</B></TD></TR>',
            row("box: primal op (copied from the model)"),
            *[row(text, ROLE_COLOR[r]) for r, text in (("tangent", "rounded blue: tangent ops (forward)"),
                                                        ("cotangent", "rounded red: cotangent ops (backward)"))
              if r in {u.role for u in self.units_drawn.values()}],
            row("hexagon: product plumbing (api)", ROLE_COLOR["api"]),
            row("structured rule", fill=FILL["structured"]),
            row("autograd fallback", fill=FILL["fallback"]),
            row("constant (no derivative)", fill=FILL["constant"]),
            row("edge: primal tensor [shape]", ROLE_COLOR["primal"]),
            row("dashed: primal value reused by the product", REUSE_COLOR),
        ]
        roles = {u.role for u in self.units_drawn.values()}
        rows += [row(f"edge: {self.flow_word(r, None)} [K | shape]", ROLE_COLOR[r]) for r in ("tangent", "cotangent")
                 if r in roles]
        label = '<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3">' + "".join(rows) + "</TABLE>>"
        g.node("legend", label, shape="plaintext", fontsize="9")


# --- helpers ---------------------------------------------------------------------------------------------


def _id(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", key)


def _is_fallback(n: fx.Node) -> bool:
    t = n.target
    return callable(t) and getattr(t, "__module__", "") == "fxjac.rules.fallback" and \
        getattr(t, "__name__", "").startswith("fallback_")


def _target_name(n: fx.Node) -> str:
    if n.op == "call_method":
        return f".{n.target}"
    if n.op == "call_function":
        t = n.target
        if getattr(t, "__name__", "") == "module_call" and n.args and isinstance(n.args[0], fx.Node):
            try:
                return type(n.graph.owning_module.get_submodule(n.args[0].target)).__name__
            except AttributeError:
                return "module"
        name = getattr(t, "__name__", str(t))
        return name
    if n.op == "get_attr":
        return "param"
    return n.op


def _fmt(v) -> str:
    if isinstance(v, torch.Tensor):
        return "[" + ", ".join(str(int(s)) for s in v.shape) + "]"
    if isinstance(v, (tuple, list)):
        parts = [_fmt(x) for x in v]
        parts = [x for x in parts if x]
        if not parts:
            return ""
        if len(parts) > 3:
            return f"{len(parts)}× " + parts[0] if len(set(parts)) == 1 else f"({parts[0]}, … {len(parts)} values)"
        return "(" + ", ".join(parts) + ")"
    return ""


def _write(g: graphviz.Digraph, path: Path) -> None:
    fmt = _SUFFIXES[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt is None:
        path.write_text(g.source)
        return
    try:
        data = g.pipe(format=fmt)
    except graphviz.ExecutableNotFound as err:
        raise RuntimeError(f"rendering {path.suffix} needs graphviz's `dot` executable (apt-get install graphviz); "
                           "write a .dot file instead, which needs no binary") from err
    path.write_bytes(data)


__all__ = ["draw"]

"""Clean-up: dead code elimination and common sub-expression elimination on a product graph."""

from __future__ import annotations

import torch.fx as fx

_IMPURE_METHODS = {"add_", "mul_", "sub_", "div_", "copy_", "zero_", "fill_", "clamp_", "relu_", "index_put_"}


def _key(node: fx.Node):
    try:
        key = (node.op, node.target, node.args, tuple(sorted(node.kwargs.items())))
        hash(key)
        return key
    except TypeError:  # unhashable constants (lists, slices in old Pythons): leave the node alone
        return None


def clean(gm: fx.GraphModule) -> fx.GraphModule:
    """Merge identical pure nodes and drop dead ones, in place; returns ``gm`` recompiled."""
    seen: dict = {}
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method", "get_attr"):
            continue
        if node.op == "call_method" and (node.target in _IMPURE_METHODS or node.target.endswith("_")):
            continue
        if node.is_impure():
            continue
        key = _key(node)
        if key is None:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
        else:
            seen[key] = node
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm

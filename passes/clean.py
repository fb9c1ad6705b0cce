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


def _written(node: fx.Node) -> bool:
    """Whether a user writes its result into ``node``'s value (it says so with ``meta["writes_arg"]``, the index of
    the argument it overwrites): such a value must keep its one reader, so it is never merged with a twin.
    """
    for user in node.users:
        i = user.meta.get("writes_arg")
        if i is not None and i < len(user.args) and user.args[i] is node:
            return True
    return False


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
            if _written(node) or _written(seen[key]):
                continue
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
        else:
            seen[key] = node
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm

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


def _unwrite_shared(graph: fx.Graph) -> None:
    """A node that writes its result into one of its arguments (``meta["writes_arg"]``, that argument's index) may
    do so only as the argument's one reader; elsewhere it gets back its plain form: ``meta["plain"]``, a target
    that takes the node's arguments after the first ``meta["plain_drop"]``. Checked on the finished graph: a
    reader may be emitted after the writer (an addition hands the same cotangent to both of its inputs), or
    merged into the argument's readers by CSE.
    """
    for node in graph.nodes:
        i = node.meta.get("writes_arg")
        if i is not None and len(node.args[i].users) != 1:
            node.target, node.args = node.meta.pop("plain"), node.args[node.meta.pop("plain_drop"):]
            del node.meta["writes_arg"]


def clean(gm: fx.GraphModule) -> fx.GraphModule:
    """Merge identical pure nodes, drop dead ones and keep writes into arguments only where they are safe, in place;
    returns ``gm`` recompiled.
    """
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
    _unwrite_shared(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm

"""Graph rewrite passes of fxjac: they know torch.fx graphs, not operators (rules come in as an argument)."""

from passes.backward import backward_cotangents
from passes.builder import Builder, MissingRulesError
from passes.clean import clean
from passes.forward import forward_tangents
from passes.loop import ColumnLoop, chunk_body, column_loop
from passes.protocol import ZERO, Emitter, Rule, RuleTable, Site, module_call, rule_key
from passes.shape_prop import propagate_shapes

__all__ = [
    "Builder",
    "ColumnLoop",
    "Emitter",
    "MissingRulesError",
    "Rule",
    "RuleTable",
    "Site",
    "ZERO",
    "backward_cotangents",
    "chunk_body",
    "clean",
    "column_loop",
    "forward_tangents",
    "module_call",
    "propagate_shapes",
    "rule_key",
]

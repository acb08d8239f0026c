"""Small graphs for pass tests: a module exported as the passes see it, and the ops a graph calls."""

from __future__ import annotations

import torch
from torch import fx

from vtrcompile.passes.strip_runtime_asserts import strip_runtime_asserts


def exported(module: torch.nn.Module, *x: torch.Tensor) -> fx.GraphModule:
    """`module` at inputs `x` through torch.export (non-strict), runtime asserts stripped."""
    gm = torch.export.export(module, x, strict=False).module()
    strip_runtime_asserts(gm)
    return gm


def call_targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]

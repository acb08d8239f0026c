"""Method cases shared by the family tests: (method, options, eager reference(model, ids, pixels)) for the
methods whose reference needs no family-specific split (one image grid, one set of LLM layers)."""

from __future__ import annotations

from vtrcompile.reference.baselines import divprune_stage
from vtrcompile.reference.methods import fastv_reference, gprune_reference, pyramiddrop_reference, run_stages

METHOD_CASES = [
    ("fastv", {"layer": 2, "keep": 10}, lambda m, i, p: fastv_reference(m, i, p, 2, 10)),
    ("gprune", {"keep": 9}, lambda m, i, p: gprune_reference(m, i, p, 9)),
    ("pyramiddrop", {}, lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5)),
    ("divprune", {"keep": 9}, lambda m, i, p: run_stages(m, i, p, first=divprune_stage(9))),
]

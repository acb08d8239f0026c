"""The method-module refactor changed no engine: for every method configuration of the engine tests, the
rewritten program has the same op histogram and the same logits (1e-6) as the code before it.

tests/data/programs_before_method_modules.json was written by the pre-refactor code (commit "Generation:
prefill engines return each layer's KV cache..."), with the snapshot logic below: ops of the re-exported
program, logits on two fixed prompts."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SLOW_ENGINES
from vtrcompile.models.loading import example_prompt

BEFORE = json.loads((Path(__file__).parent / "data" / "programs_before_method_modules.json").read_text())

# Changed on purpose after the snapshot, logits unchanged: a vision-site method's new block now enters the shorter
# sequence through merge_image_block at the gathered placeholders (so that an llm@ site stacked after it finds
# the boundary there), which adds the placeholders' gather, the block start found again and the block's reshapes.
VISION_SITE_MERGE = {"aten.gather.default": 1, "aten.expand.default": 1, "aten.eq.Scalar": 1, "aten.to.dtype": 1,
                     "aten.argmax.default": 1, "aten.reshape.default": 2}
# And every engine: each boolean attention mask (the model's, and each llm@ site's gathered copy) is made additive
# once (passes/replace_bool_attention_masks.py): a where and a cast per mask.
ADDITIVE_MASK = {"aten.where.Scalar": 1, "aten.to.dtype": 1}
# And G-Prune's selector: its two N x N selects folded into one select with a scalar (same scores bit for bit,
# tests/methods/test_methods.py).
GPRUNE_ONE_SELECT = {"aten.where.ScalarSelf": 1, "aten.where.self": -2, "aten.zeros_like.default": -1,
                     "aten.full_like.default": -1, "aten.abs.default": -1, "aten.lt.Scalar": -1}
# And PruMerge's key-neighbour merge: each kept token's neighbours as a membership mask (m-th value, ties by a
# cumulative count) instead of a one-hot of top-k's indices weighted through a gather (same rows,
# tests/methods/test_tensor_ops.py).
PRUMERGE_MEMBERSHIP = {"aten.__and__.Tensor": 1, "aten.__or__.Tensor": 1, "aten.cumsum.default": 1, "aten.gt.Tensor": 1,
                       "aten.le.Tensor": 1, "aten.rsub.Scalar": 1, "aten.slice.Tensor": 1, "aten.where.ScalarOther": 1,
                       "aten.arange.default": -1, "aten.flatten.using_ints": -1, "aten.gather.default": -1,
                       "aten.mul.Tensor": -1, "aten.reshape.default": -1, "aten.unsqueeze.default": -1}


# And every engine: each multiplication by an rsqrt (the RMSNorms' scaling) is a division by a sqrt
# (passes/replace_rsqrt_scaling.py), which ONNX Runtime fuses.
def rsqrt_as_division(ops: dict) -> dict:
    n = ops.get("aten.rsqrt.default", 0)
    return {"aten.rsqrt.default": -n, "aten.mul.Tensor": -n, "aten.sqrt.default": n, "aten.div.Tensor": n}


# Configurations whose engines the default run does not build elsewhere (second budgets, one per kind kept) run
# with -m slow.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ENGINES else n
                                  for n in sorted(BEFORE)])
def test_program_unchanged(tiny, tiny_build, name):
    want = BEFORE[name]
    b = tiny_build(want["method"], **want["options"])
    ops = collections.Counter(str(n.target) for n in b.program.graph.nodes if n.op == "call_function")
    expected = collections.Counter(want["ops"])
    if any(r.site == "vision" for r in b.reductions):
        expected.update(VISION_SITE_MERGE)
    for _ in range(1 + len({r.layer for r in b.reductions if r.site == "llm"})):
        expected.update(ADDITIVE_MASK)
    if any(r.method == "gprune" for r in b.reductions):
        expected.update(GPRUNE_ONE_SELECT)
    if any(r.method in ("prumerge", "prumerge-plus") for r in b.reductions):
        expected.update(PRUMERGE_MEMBERSHIP)
    expected.update(rsqrt_as_division(want["ops"]))
    assert min(expected.values()) >= 0, expected  # a delta removes only ops the snapshot had
    expected = +expected  # drop the ops no longer there
    assert dict(sorted(ops.items())) == dict(sorted(expected.items()))
    for (pre, suf, seed), logits in zip(((5, 8, 10), (20, 3, 12)), want["logits"], strict=True):
        ids, px = example_prompt(tiny.hf_model.config, pre, suf, seed=seed)
        with torch.no_grad():
            got = b.program.module()(ids, px)[0][0]
        assert float((got - torch.tensor(logits)).abs().max()) <= 1e-6

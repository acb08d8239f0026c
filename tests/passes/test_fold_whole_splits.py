"""fold_whole_splits: a one-chunk split (sizes read from a tensor, as HF's per-image split) becomes its input."""

from __future__ import annotations

import torch

from vtrcompile.passes.fold_whole_splits import fold_whole_splits
from vtrcompile.passes.strip_runtime_asserts import strip_runtime_asserts


class _PerImage(torch.nn.Module):
    def __init__(self, grid: list[list[int]]) -> None:
        super().__init__()
        self.grid = torch.tensor(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x * 2, self.grid.prod(-1).tolist())
        return torch.cat([p.sum(0, keepdim=True) for p in parts]) + 1


def _graph(grid):
    x = torch.randn(int(torch.tensor(grid).prod(-1).sum()), 4)
    gm = torch.export.export(_PerImage(grid), (x,), strict=False).module()
    strip_runtime_asserts(gm)
    return gm, x


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_one_chunk_split_is_folded_with_its_scalar_reads():
    gm, x = _graph([[1, 2, 3]])
    want = gm(x)
    assert torch.ops.aten.split_with_sizes.default in _ops(gm)
    res = fold_whole_splits(gm)
    assert res.modified and res.facts["folded"] == 1
    ops = _ops(gm)
    assert torch.ops.aten.split_with_sizes.default not in ops and torch.ops.aten.item.default not in ops
    assert torch.equal(gm(x), want)


def test_a_split_into_several_chunks_is_left_alone():
    gm, x = _graph([[1, 2, 3], [1, 1, 2]])
    before = [str(n) for n in gm.graph.nodes]
    res = fold_whole_splits(gm)
    assert not res.modified and [str(n) for n in gm.graph.nodes] == before

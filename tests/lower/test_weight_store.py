"""The shared weight store: tensors appended once, an interrupted append cut back to its intact index, and a
damaged index never costing the engines already written their weights."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vtrcompile.lower.weight_store import WeightStore


def _store_with_two(tmp_path) -> tuple[WeightStore, bytes]:
    s = WeightStore(tmp_path, "m", "float32")
    s.tensor("a", lambda: torch.arange(6, dtype=torch.float32))
    s.tensor("b", lambda: torch.ones(4))
    return s, s.data.read_bytes()


def test_tensors_are_appended_once_and_found_again(tmp_path):
    s, data = _store_with_two(tmp_path)
    assert s.index == {"a": [0, 24], "b": [24, 16]} and len(data) == 40
    again = WeightStore(tmp_path, "m", "float32")
    assert again.tensor("a", lambda: pytest.fail("made twice")) == (0, 24) and not again.new


def test_bytes_an_interrupted_append_left_are_cut_back_to_the_index(tmp_path):
    s, data = _store_with_two(tmp_path)
    with open(s.data, "ab") as f:
        f.write(b"\x01" * 10)  # a tensor half written, never indexed
    assert WeightStore(tmp_path, "m", "float32").data.read_bytes() == data


@pytest.mark.parametrize("index", [
    b"{not json",
    b'{"format": "vtrcompile-weights/1", \xff}',  # not UTF-8
    json.dumps({"format": "vtrcompile-weights/1", "model_id": "m", "dtype": "float32", "tensors": {"a": [0, 2400]}}),
    json.dumps({"format": "vtrcompile-weights/1", "model_id": "m", "dtype": "float32", "tensors": {"a": [0]}}),
    json.dumps({"format": "vtrcompile-weights/1", "model_id": "m", "dtype": "float32", "tensors": {"a": ["0", 4]}}),
    None,  # the index file deleted
])
def test_a_damaged_index_keeps_every_byte_already_written(tmp_path, index):
    """Engines already written point into the store (an OpenVINO IR's .bin is a hard link to it): with its index
    damaged or gone, the store is neither cut nor removed; new tensors go after the old bytes."""
    s, data = _store_with_two(tmp_path)
    os.link(s.data, tmp_path / "engine.bin")
    if index is None:
        s.index_path.unlink()
    else:
        s.index_path.write_bytes(index if isinstance(index, bytes) else index.encode())
    t = WeightStore(tmp_path, "m", "float32")
    assert t.index == {} and not t.new
    assert t.tensor("c", lambda: torch.full((2,), 7.0)) == (40, 8)
    assert (tmp_path / "engine.bin").read_bytes()[:40] == data
    t.discard_if_new()  # a failed build: the store was not new, so it stays
    assert t.data.is_file() and t.data.read_bytes()[:40] == data

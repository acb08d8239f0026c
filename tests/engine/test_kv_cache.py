"""KvCache (engine/kv_cache.py): buffers sized for a generation, filled from the prefill's caches, each step's rows
written in place, whatever form a runner hands them out in (numpy, OpenVINO's bf16 bits, OrtValues, torch)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vtrcompile.engine.io import past_names, present_names
from vtrcompile.engine.kv_cache import KvCache, as_tensor


def _prefill(n: int, lengths: list[int], dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(1, 2, lengths[i // 2], 4, generator=g).to(dtype)
            for i, name in enumerate(present_names(n))}


def _bits(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor as OpenVINO hands it to numpy: a float16 array of the raw bits."""
    return t.contiguous().view(torch.float16).numpy()


@pytest.mark.parametrize("form", ["numpy", "torch"])
def test_buffers_hold_the_prefill_rows_then_each_steps_rows_then_zeros(form):
    ref = _prefill(2, [3, 5], torch.float32)
    out = {k: v.numpy() if form == "numpy" else v for k, v in ref.items()}
    kv = KvCache(out, 2, "float32", extra_rows=2)
    assert kv.lengths == [3, 5] and kv.capacity == [5, 7]
    assert set(kv.feeds()) == {*past_names(2), "past_lengths"} and kv.feeds()["past_lengths"].tolist() == [3, 5]
    assert all(not np.shares_memory(kv.buffers[j].numpy(), ref[k].numpy()) for j, k in enumerate(present_names(2)))
    rows = [_prefill(2, [1, 1], torch.float32, seed=s) for s in (1, 2)]
    for r in rows:
        kv.append({k: v.numpy() if form == "numpy" else v for k, v in r.items()})
    assert kv.lengths == [5, 7] and kv.feeds()["past_lengths"].tolist() == [5, 7]
    for j, k in enumerate(present_names(2)):
        s = ref[k].shape[2]
        want = torch.cat([ref[k], rows[0][k], rows[1][k]], dim=2)
        assert torch.equal(kv.buffers[j][:, :, :s + 2], want)
        assert kv.buffers[j][:, :, s + 2:].eq(0).all()
    with pytest.raises(ValueError, match="KV cache full"):
        kv.append({k: v.numpy() for k, v in rows[0].items()})


@pytest.mark.parametrize("form", ["openvino bits", "ortvalue", "torch"])
def test_bfloat16_rows_in_every_runners_form_land_bit_for_bit(form):
    def hand_out(t: torch.Tensor):
        if form == "openvino bits":
            return _bits(t)
        if form == "ortvalue":
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.contiguous().view(torch.int16).numpy(),
                                                                   onnx.TensorProto.BFLOAT16)
        return t

    ref = _prefill(1, [4], torch.bfloat16)
    kv = KvCache({k: hand_out(v) for k, v in ref.items()}, 1, "bfloat16", extra_rows=1)
    row = _prefill(1, [1], torch.bfloat16, seed=3)
    kv.append({k: hand_out(v) for k, v in row.items()})
    for j, k in enumerate(present_names(1)):
        assert kv.buffers[j].dtype == torch.bfloat16
        assert torch.equal(kv.buffers[j], torch.cat([ref[k], row[k]], dim=2))


def test_as_tensor_shares_numpy_memory_and_converts_only_when_asked():
    a = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    t = as_tensor(a, "float32")
    assert np.shares_memory(t.numpy(), a)
    assert as_tensor(a, "float16").dtype == torch.float16
    b = torch.arange(6, dtype=torch.bfloat16)
    assert torch.equal(as_tensor(_bits(b), "bfloat16"), b)  # OpenVINO's bits, read back as bf16


def test_capacity_is_rounded_within_the_limit_and_same_shaped_buffers_are_reused():
    ref = _prefill(2, [3, 30], torch.float32)
    first = KvCache(ref, 2, "float32", extra_rows=4, round_to=32, limit=40)
    assert first.capacity == [32, 40] and first.reused == 0  # 7 -> 32; 34 -> 64, held to the limit of 40
    assert first.buffers[0][:, :, 3:].eq(0).all()
    first.append({k: v[:, :, :1] + 100 for k, v in ref.items()})  # rows the next generation must not see
    again = _prefill(2, [5, 29], torch.float32, seed=7)
    second = KvCache(again, 2, "float32", extra_rows=4, round_to=32, limit=40, reuse=first)
    assert second.capacity == [32, 40] and second.reused == 4 and second.lengths == [5, 29]
    assert {b.data_ptr() for b in second.buffers} == {b.data_ptr() for b in first.buffers}  # the same memory
    for j, k in enumerate(present_names(2)):
        assert torch.equal(second.buffers[j][:, :, :again[k].shape[2]], again[k])
    other = KvCache(_prefill(2, [40, 30], torch.float32), 2, "float32", 4, round_to=32, limit=100, reuse=second)
    assert other.reused == 0 and other.capacity == [64, 64]
    assert KvCache(ref, 2, "float16", 4, round_to=32, reuse=first).reused == 0  # another dtype: new buffers


def test_a_reused_buffers_stale_rows_do_not_change_generation(tiny, tiny_engines):
    """Two generations in a row through one engine pair, the second reusing the first's buffers (their rows past
    its prompt still hold the first's keys and values): the second equals a fresh engine's generation."""
    from tests.conftest import prompts
    from vtrcompile import load_engine

    out = tiny_engines["fastv-k2-18"].files[-1]
    (ids, px), (ids2, px2) = prompts(tiny.hf_model.config)[:2]
    warm = load_engine(out, threads=1)
    warm.generate(input_ids=ids2.numpy(), pixel_values=px2.numpy(), max_new_tokens=6, eos_token_id=[])
    got = warm.generate(input_ids=ids.numpy(), pixel_values=px.numpy(), max_new_tokens=6, eos_token_id=[])
    assert warm._kv is not None and warm._kv.reused > 0
    fresh = load_engine(out, threads=1).generate(input_ids=ids.numpy(), pixel_values=px.numpy(), max_new_tokens=6,
                                                 eos_token_id=[])
    assert np.array_equal(got.tokens, fresh.tokens) and np.array_equal(got.logits, fresh.logits)

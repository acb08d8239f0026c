"""Analysis passes on the tiny preset, and their errors on graphs without the structure."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vtrcompile.capture import capture, editable_module
from vtrcompile.errors import AnalysisError
from vtrcompile.passes.analysis import analyze
from vtrcompile.passes.find_vision_llm_boundary import find_vision_llm_boundary
from vtrcompile.passes.strip_runtime_asserts import strip_runtime_asserts


@pytest.fixture(scope="module")
def tiny_gm(tiny):
    gm = editable_module(capture(tiny))
    strip_runtime_asserts(gm)
    return gm


def test_facts_of_tiny(tiny_gm, tiny):
    nodes_before = len(tiny_gm.graph.nodes)
    f = analyze(tiny_gm)
    assert len(tiny_gm.graph.nodes) == nodes_before  # analysis never mutates
    cfg = tiny.hf_model.config
    assert f.boundary.image_token_id == cfg.image_token_id
    assert f.boundary.n_image == 36 and f.boundary.batch == 1
    assert f.vision.module.endswith("vision_tower") and f.vision.drops_cls
    assert f.vision.feature_layer == cfg.vision_config.num_hidden_layers + cfg.vision_feature_layer
    assert f.projector.module.endswith("multi_modal_projector")
    assert [lay.index for lay in f.layers] == list(range(cfg.text_config.num_hidden_layers))
    assert all(lay.module.endswith(f"layers.{lay.index}") for lay in f.layers)
    # Layer l's residual input is layer l-1's output; layer 0's is the boundary.
    assert f.layers[0].residual_input is f.boundary.node
    for prev, lay in zip(f.layers, f.layers[1:], strict=False):
        assert lay.residual_input in prev.nodes
    roles = sorted(s.role for s in f.side[1])
    assert roles == ["mask", "rotary", "rotary", "seq_len"]
    mask = next(s for s in f.side[1] if s.role == "mask")
    assert mask.seq_dims == (2, 3)
    assert all(lay.scale == pytest.approx(16 ** -0.5) for lay in f.layers)


class _TextOnly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=100)
        self.lm = LlamaForCausalLM(cfg).eval()

    def forward(self, input_ids, pixel_values):
        return self.lm(input_ids=input_ids, use_cache=False).logits[:, -1]


def test_text_only_llm_has_no_boundary():
    ids = torch.randint(0, 100, (1, 12))
    gm = torch.export.export(_TextOnly(), (ids, torch.zeros(1, 3, 4, 4))).module()
    with pytest.raises(AnalysisError, match="no op where visual tokens enter the LLM.*masked_scatter"):
        find_vision_llm_boundary(gm)


class _NoImages(torch.nn.Module):
    """A LLaVA called with text only: the image path never reaches the LLM."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values):
        return self.model(input_ids=input_ids, use_cache=False).logits[:, -1] + 0 * pixel_values.sum()


def test_llava_without_image_input_has_no_boundary(tiny):
    ids = torch.randint(0, 300, (1, 12))
    gm = torch.export.export(_NoImages(tiny.hf_model), (ids, tiny.example_inputs[1])).module()
    with pytest.raises(AnalysisError, match="text-only model, or one called without images"):
        analyze(gm)


class _UserWrapper(torch.nn.Module):
    """A user's own module around the model: other attribute names, so other module paths."""

    def __init__(self, model) -> None:
        super().__init__()
        self.my_vlm = model

    def forward(self, input_ids, pixel_values):
        out = self.my_vlm(input_ids=input_ids, pixel_values=pixel_values, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1, :]


def test_a_users_own_module_is_found_by_structure(tiny):
    from tests.conftest import check_against_reference
    from vtrcompile.build import build
    from vtrcompile.models.loading import ModelSource
    from vtrcompile.reference.methods import fastv_reference

    src = ModelSource("user", "pickle", _UserWrapper(tiny.hf_model), None, tiny.example_inputs,
                      hf_model=tiny.hf_model)
    b = build(src, "fastv", {"layer": 2, "keep": 9})
    assert b.facts.layers[0].module.startswith("my_vlm.")
    check_against_reference(b.program.module(), lambda m, i, p: fastv_reference(m, i, p, 2, 9), tiny)

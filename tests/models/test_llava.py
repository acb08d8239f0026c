"""The LLaVA family's image preprocessing follows the checkpoint's image processor, as transformers runs it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vtrcompile.calibration import preprocess
from vtrcompile.errors import VtrError

SIZES = [(500, 333), (333, 500), (101, 77), (1001, 777)]  # the tiny preset's tower takes 84 x 84


def _processors(side: int) -> dict:
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, SiglipImageProcessorPil

    crop = {"height": side, "width": side}
    return {"clip": CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=crop),
            "siglip": SiglipImageProcessorPil(size=crop, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                              resample=2),  # bilinear, to check that the setting is followed
            "llava-pad": LlavaImageProcessorPil(size={"shortest_edge": side}, crop_size=crop, do_pad=True)}


@pytest.mark.parametrize("kind", ["clip", "siglip", "llava-pad"])
def test_preprocessing_equals_the_checkpoint_s_image_processor(tiny, tmp_path, kind):
    """CLIP's (shorter side, longer one rounded down, centre crop), SigLIP's (squashed to the square, no crop) and
    LlavaImageProcessor's do_pad (centred on a square of the mean colour first), each saved as a checkpoint saves
    it: the engine's recorded steps give transformers' PIL processor's pixel_values bit for bit on images of
    other shapes."""
    side = tiny.family.image_size(tiny.hf_model.config)
    processor = _processors(side)[kind]
    model_dir = tmp_path / "model"
    processor.save_pretrained(model_dir)
    facts = tiny.family.processor_facts(tiny.hf_model.config, model_dir)
    assert facts["pad_to_square"] == (kind == "llava-pad") and (facts["crop"] is None) == (kind == "siglip")
    assert facts["resample"] == (2 if kind == "siglip" else 3)
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        img = tmp_path / f"{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img)
        ours = preprocess(img, side, facts).numpy()
        theirs = processor(images=Image.open(img), return_tensors="np")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, side, side) and np.array_equal(ours, theirs), (kind, w, h)


def test_without_settings_the_steps_are_clip_s_and_older_engines_get_them_too(tiny, tmp_path):
    """No image processor in the model directory: CLIP's steps at the tower's size; an engine's facts from before
    the steps were recorded (no `resize` key) prepare an image the same way."""
    fam, cfg = tiny.family, tiny.hf_model.config
    side = fam.image_size(cfg)
    facts = fam.processor_facts(cfg, tmp_path)
    assert (facts["pad_to_square"], facts["resize"], facts["crop"], facts["resample"]) == (
        False, {"shortest_edge": side}, [side, side], 3)
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (77, 101, 3), dtype=np.uint8)).save(img)
    old = {k: v for k, v in facts.items() if k not in ("pad_to_square", "resize", "crop", "resample")}
    assert np.array_equal(preprocess(img, side, facts).numpy(), preprocess(img, side, old).numpy())


def test_a_null_shortest_edge_beside_height_and_width_resizes_to_them(tiny, tmp_path):
    """transformers' size settings may carry `shortest_edge: null` next to height and width (SigLIP's): the steps
    are SigLIP's, not a shortest-edge resize of nothing."""
    import json

    side = tiny.family.image_size(tiny.hf_model.config)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": None, "height": side, "width": side}}))
    facts = tiny.family.processor_facts(tiny.hf_model.config, tmp_path)
    assert facts["resize"] == {"height": side, "width": side} and facts["crop"] is None


@pytest.mark.parametrize("settings,words", [
    ({"size": {"shortest_edge": 84}, "crop_size": {"height": 64, "width": 64}}, "makes images of 64x64 px"),
    ({"size": {"height": 96, "width": 96}}, "makes images of 96x96 px"),
    ({"size": {"shortest_edge": 96}, "do_center_crop": False}, "a shorter side of 96"),
    ({"size": {"longest_edge": 84}}, "neither"),
    ({"size": {"shortest_edge": 84}, "crop_size": [84, 84]}, "crop_size"),
    ({"size": {"shortest_edge": 84}, "resample": "bicubic"}, "resample"),
])
def test_settings_that_do_not_end_at_the_tower_s_size_are_refused(tiny, tmp_path, settings, words):
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(VtrError, match="preprocessor_config.json: ") as e:
        tiny.family.processor_facts(tiny.hf_model.config, tmp_path)
    assert words in str(e.value) and "\n" not in str(e.value)

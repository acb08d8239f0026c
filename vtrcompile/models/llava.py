"""The LLaVA family (LlavaForConditionalGeneration: CLIP or SigLIP tower, MLP projector, Llama / Qwen2 /
Mistral LLM): one image per prompt, N = patches (CLS dropped unless the feature strategy is 'full')."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VtrError
from .family import Family

# CLIP's normalisation (LLaVA-1.5's image processor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL's filter number, as image processor settings write it


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    architecture = "LlavaForConditionalGeneration"
    config_class_name = "LlavaConfig"
    # LLaVA-1.5's conversation layout, used when the tokenizer has no chat template.
    template = "USER: {image}\n{prompt} ASSISTANT:"
    image_mean, image_std = CLIP_MEAN, CLIP_STD

    def preset_config(self, vision: dict, text: dict, image_token_id: int, extra: dict):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        defaults = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                    "projector_hidden_act": "gelu"}
        return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                           image_token_id=image_token_id, **{**defaults, **extra})

    def image_steps(self, settings: dict[str, Any], config, source: Path | None) -> dict[str, Any]:
        """What the checkpoint's image processor does before normalising, as transformers' image processors of
        LLaVA checkpoints do it, in this order: `pad_to_square` (LlavaImageProcessor's do_pad: the image centred
        on a square of the mean colour), `resize` ({"shortest_edge": n}: CLIP's, the aspect ratio kept; or
        {"height", "width"}: SigLIP's), `crop` ([h, w] centre crop, or None), with `resample` (PIL's filter
        number; bicubic, 3, unless the settings say otherwise). Without settings: CLIP's steps at the vision
        tower's size. Refused when they do not end at the tower's size."""
        side = self.image_size(config)
        size = settings.get("size", {"shortest_edge": side})
        size = {"shortest_edge": size} if isinstance(size, int) else size
        if not isinstance(size, dict) or not (_whole(size.get("shortest_edge")) or (
                _whole(size.get("height")) and _whole(size.get("width")))):
            raise VtrError(f"{source}: the image processor's size {size!r} is neither {{'shortest_edge': n}} nor "
                           "{'height': h, 'width': w}; restore the model's own file, or remove it to use CLIP's steps")
        resize = ({"shortest_edge": size["shortest_edge"]} if _whole(size.get("shortest_edge"))
                  else {"height": size["height"], "width": size["width"]})
        crop = None
        if settings.get("do_center_crop", "shortest_edge" in resize):
            c = settings.get("crop_size", side)
            c = {"height": c, "width": c} if isinstance(c, int) else c
            if not isinstance(c, dict) or not (_whole(c.get("height")) and _whole(c.get("width"))):
                raise VtrError(f"{source}: the image processor's crop_size {c!r} is not {{'height': h, 'width': w}}; "
                               "restore the model's own file")
            crop = [int(c["height"]), int(c["width"])]
        ends = crop or ([resize["height"], resize["width"]] if "height" in resize else None)
        if ends != [side, side]:
            made = "a shorter side of " + str(resize["shortest_edge"]) if ends is None else f"{ends[0]}x{ends[1]}"
            raise VtrError(f"{source}: the image processor makes images of {made} px, but the vision tower takes "
                           f"{side}x{side}; fix its size / crop_size, or remove the file to use CLIP's steps")
        resample = settings.get("resample", BICUBIC)
        if not (isinstance(resample, int) and not isinstance(resample, bool) and 0 <= resample <= 5):
            raise VtrError(f"{source}: the image processor's resample {resample!r} is not one of PIL's filters (0-5); "
                           "restore the model's own file")
        return {"pad_to_square": bool(settings.get("do_pad", False)), "resize": resize, "crop": crop,
                "resample": resample}

    def preprocess(self, image, size: int, tiles: int, processing: dict | None = None) -> np.ndarray:
        """The image processor's steps recorded by image_steps (CLIPImageProcessor's by default: shorter side to
        `size`, bicubic, the longer one in proportion rounded down as transformers rounds it, then the centre
        crop); engines built before 2026-12-08 record none and get CLIP's."""
        from PIL import Image

        p = processing or {}
        if p.get("pad_to_square") and image.size[0] != image.size[1]:
            colour = tuple(int(m * 255) for m in p.get("image_mean", self.image_mean))
            square = Image.new("RGB", (max(image.size),) * 2, colour)
            square.paste(image, ((square.size[0] - image.size[0]) // 2, (square.size[1] - image.size[1]) // 2))
            image = square
        resize, resample = p.get("resize", {"shortest_edge": size}), Image.Resampling(p.get("resample", BICUBIC))
        if "shortest_edge" in resize:
            n = resize["shortest_edge"]
            w, h = image.size
            short, long = sorted((w, h))
            other = int(n * long / short)
            image = image.resize((n, other) if w == short else (other, n), resample)
        else:
            image = image.resize((resize["width"], resize["height"]), resample)
        crop = p["crop"] if "resize" in p else [size, size]
        if crop is not None:
            (ch, cw), (w, h) = crop, image.size
            left, top = (w - cw) // 2, (h - ch) // 2
            image = image.crop((left, top, left + cw, top + ch))
        return (np.asarray(image, dtype=np.float32) / 255.0)[None]

    def tokens_per_tile(self, config) -> int:
        n = (self.image_size(config) // self.patch_size(config)) ** 2
        return n + 1 if config.vision_feature_select_strategy == "full" else n


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


LLAVA = LlavaFamily()

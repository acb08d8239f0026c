"""The LLaVA family (LlavaForConditionalGeneration: CLIP or SigLIP tower, MLP projector, Llama / Qwen2 /
Mistral LLM): one image per prompt, N = patches (CLS dropped unless the feature strategy is 'full')."""

from __future__ import annotations

import numpy as np

from .family import Family

# CLIP's normalisation (LLaVA-1.5's image processor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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

    def preprocess(self, image, size: int, tiles: int, processing: dict | None = None) -> np.ndarray:
        """LLaVA-1.5's processor (CLIPImageProcessor): shorter side to `size` (bicubic), the longer one in
        proportion, rounded down as transformers' resize rounds it, then the centre crop."""
        from PIL import Image

        w, h = image.size
        short, long = sorted((w, h))
        other = int(size * long / short)
        image = image.resize((size, other) if w == short else (other, size), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        return (np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0)[None]

    def tokens_per_tile(self, config) -> int:
        n = (self.image_size(config) // self.patch_size(config)) ** 2
        return n + 1 if config.vision_feature_select_strategy == "full" else n


LLAVA = LlavaFamily()

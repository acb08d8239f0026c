"""The InternVL family (InternVLForConditionalGeneration: InternViT, pixel shuffle 0.5 + LayerNorm/MLP
projector, Qwen2 LLM by default; G-Search's InternVL2 is this architecture). An engine is built for a fixed
number of 448 px tiles (`--tiles`, default 1); each tile gives (side / patch)^2 * ratio^2 tokens (256),
written between the text markers `<img>` and `</img>`."""

from __future__ import annotations

import numpy as np

from .family import Family


def tile_grid(width: int, height: int, tiles: int) -> tuple[int, int]:
    """(columns, rows) of the grid whose aspect ratio is closest to the image's among grids of `tiles` cells
    (ties to fewer columns)."""
    aspect = width / height
    grids = [(c, tiles // c) for c in range(1, tiles + 1) if tiles % c == 0]
    return min(grids, key=lambda g: (abs(aspect - g[0] / g[1]), g[0]))


class InternVLFamily(Family):
    name = "internvl"
    model_types = ("internvl",)
    architecture = "InternVLForConditionalGeneration"
    config_class_name = "InternVLConfig"
    template = "<|im_start|>user\n<img>{image}</img>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    chat_image = "<img>{image}</img>"  # InternVLProcessor's expansion of the chat template's "<image>"
    image_mean, image_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's (InternVL's processor)
    max_tiles = 12  # InternVL's processor default max_patches
    vision_site_refusal = ("InternVL's projector merges 2x2 patches (pixel shuffle) and its feature layer drops "
                           "CLS, so no LLM token maps to one vision patch; use a projector or llm@ method")

    def preset_config(self, vision: dict, text: dict, image_token_id: int, extra: dict):
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        cfg = InternVLConfig(vision_config=InternVLVisionConfig(**vision), text_config=Qwen2Config(**text),
                             image_token_id=image_token_id, **extra)
        cfg.image_seq_length = self.tokens_per_tile(cfg)  # what InternVL's processor expands <image> to
        return cfg

    def preprocess(self, image, size: int, tiles: int, processing: dict | None = None) -> np.ndarray:
        """InternVL's processor for a fixed tile count: one tile is the image resized to size x size; T > 1
        tiles are a grid of T - 1 tiles (the grid closest to the image's aspect ratio, image resized onto it)
        followed by a thumbnail of the whole image."""
        from PIL import Image

        def arr(im) -> np.ndarray:
            return np.asarray(im, dtype=np.float32) / 255.0

        thumb = arr(image.resize((size, size), Image.BICUBIC))
        if tiles == 1:
            return thumb[None]
        cols, rows = tile_grid(*image.size, tiles - 1)
        big = arr(image.resize((cols * size, rows * size), Image.BICUBIC))
        cells = [big[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
        return np.stack([*cells, thumb])

    def tokens_per_tile(self, config) -> int:
        side = self.image_size(config) // self.patch_size(config)
        return int(side * side * config.downsample_ratio ** 2)


INTERNVL = InternVLFamily()

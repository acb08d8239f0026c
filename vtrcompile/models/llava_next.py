"""The LLaVA-NeXT family (LlavaNextForConditionalGeneration: CLIP tower, MLP projector, Llama / Mistral / Qwen2
LLM, "anyres" images).

An image is a base tile (the whole image resized to the tower's side s) plus a grid of gh x gw tiles of a
resolution from `image_grid_pinpoints`; the model lays the tiles' patches out as one (gh*p) x (gw*p) grid
(p = s / patch), appends its learned `image_newline` vector after every grid row, and writes base patches
first. An engine is built for one image size (`--image-size HxW`, any size; default the first square
pinpoint): the layout is then fixed (`image_sizes` becomes a constant of the capture, as
`transformers.exporters` passes it), and the runner resizes every image to H x W before LLaVA-NeXT's own
processing. That processing is the model's: the best-fitting pinpoint P is chosen for H x W, the image is
resized to fit inside P keeping its aspect ratio and padded (black, centred) to P, and the model drops the
padded rows or columns of the grid again ("unpad") before the row ends: N = p^2 + rows * (cols + 1) with
(rows, cols) the unpadded grid. At a pinpoint size nothing is padded.

The row-end (`image_newline`) rows are not patches: every method keeps them and never scores or merges them
(docs/methods.md, "Model families"); the family reports them as the image layout's protected rows, and
G-Prune runs on the base and hi-res patches separately (its official LLaVA-NeXT code).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError
from .family import Family
from .llava import CLIP_MEAN, CLIP_STD
from .prompt import padding_kwargs


def best_pinpoint(size: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint LLaVA-NeXT's processor and model choose for an H x W image: the most image pixels kept when
    it is scaled to fit, then the least padding (first in the list on a tie)."""
    from transformers.image_processing_utils import select_best_resolution

    best = select_best_resolution(size, pinpoints)  # None when no pinpoint keeps a pixel: fix_geometry refuses
    return tuple(best) if best is not None else tuple(pinpoints[0])


def fitted_size(size: tuple[int, int], padded: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an H x W image resized to fit inside `padded` with its aspect ratio (the rest is padding); the
    processor's arithmetic, in its order."""
    (h, w), (ph, pw) = size, padded
    scale_w, scale_h = pw / w, ph / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), ph), pw
    return ph, min(math.ceil(w * scale_h), pw)


def unpadded_grid(size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) left of a (rows, cols) patch grid once the model removes the padding of an H x W image: the
    padded side loses (padding // 2) rows or columns at each end (the model's `unpad_image`, in its order)."""
    (h, w), (rows, cols) = size, grid
    if w / h > cols / rows:
        pad = (rows - int(round(h * (cols / w), 7))) // 2
        return max(rows - 2 * pad, 0), cols
    pad = (cols - int(round(w * (rows / h), 7))) // 2
    return rows, max(cols - 2 * pad, 0)


class LlavaNextNextTokenLogits(nn.Module):
    """forward(input_ids [B,S], pixel_values [B*T, 3, s, s] f32[, attention_mask [B,S]]) -> logits [B, vocab];
    T = 1 + gh*gw tiles, the base tile first; the image size is a constant of the module."""

    def __init__(self, model: nn.Module, image_size: tuple[int, int], tiles: int) -> None:
        super().__init__()
        self.model, self.size, self.tiles = model, [int(image_size[0]), int(image_size[1])], tiles

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.model.dtype
        if pixel_values.dtype != dtype:
            pixel_values = pixel_values.to(dtype)
        b = input_ids.shape[0]
        pixels = pixel_values.reshape(b, self.tiles, *pixel_values.shape[1:])
        out = self.model(input_ids=input_ids, pixel_values=pixels, image_sizes=[self.size] * b, use_cache=False,
                         logits_to_keep=1, **padding_kwargs(attention_mask))
        return out.logits[:, -1, :].float()


class LlavaNextFamily(Family):
    name = "llava_next"
    title = "LLaVA-NeXT"
    model_types = ("llava_next",)
    architecture = "LlavaNextForConditionalGeneration"
    config_class_name = "LlavaNextConfig"
    template = "USER: {image}\n{prompt} ASSISTANT:"  # LLaVA-1.5's, when the tokenizer has no chat template
    image_mean, image_std = CLIP_MEAN, CLIP_STD
    vision_site_refusal = ("LLaVA-NeXT lays its tiles' patches out as one grid and appends row-end (image_newline) "
                           "tokens after the projector, so the image block is not the projector's rows in order; "
                           "use a projector or llm@ method")
    # Methods whose definition reads the block as something LLaVA-NeXT's is not.
    method_refusals = {
        "pool": "pool reads the image block as one token grid, and LLaVA-NeXT's is a base grid, a hi-res grid and "
                "row-end tokens; use divprune, gprune or random for a projector-site baseline",
    }

    def preset_config(self, vision: dict, text: dict, image_token_id: int, extra: dict):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

        extra = dict(extra)
        size = extra.pop("image_size", None)
        defaults = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                    "projector_hidden_act": "gelu"}
        cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                              image_token_id=image_token_id, **{**defaults, **extra})
        self.fix_geometry(cfg, tuple(size) if size else None)
        return cfg

    # --- image geometry ------------------------------------------------------------------------------
    def tile_side(self, config) -> int:
        return super().image_size(config)

    def pinpoints(self, config) -> list[tuple[int, int]]:
        return [(int(h), int(w)) for h, w in config.image_grid_pinpoints]

    def fix_geometry(self, config, image_size: tuple[int, int] | None) -> None:
        """Record the engine's image size (H, W) on the loaded config; refuse a size whose grid the model would
        unpad to nothing, or a pinpoint list whose entries are not whole tiles."""
        pins = self.pinpoints(config)
        if image_size is None:
            image_size = getattr(config, "vtrcompile_image_size", None) or next(
                (p for p in pins if p[0] == p[1]), pins[0])
        size = (int(image_size[0]), int(image_size[1]))
        s = self.tile_side(config)
        bad = [f"{h}x{w}" for h, w in pins if h % s or w % s]
        if bad:
            raise UnsupportedModelError(f"{self.title} image_grid_pinpoints {', '.join(bad)} are not multiples of the "
                                        f"tower's {s} px tiles; fix the model's config")
        if min(size) < 1:
            raise UnsupportedModelError(f"--image-size {size[0]}x{size[1]}: give a height and width of at least 1 px")
        ph, pw = best_pinpoint(size, pins)
        p = s // self.patch_size(config)
        rows, cols = unpadded_grid(size, (ph // s * p, pw // s * p))
        if rows < 1 or cols < 1:
            raise UnsupportedModelError(f"--image-size {size[0]}x{size[1]}: {self.title} keeps no patch row or column "
                                        "of an image this elongated once it removes the padding; choose a size "
                                        "closer to one of the model's image_grid_pinpoints")
        config.vtrcompile_image_size = list(size)

    def image_size(self, config) -> list[int]:  # type: ignore[override]
        """[H, W] of the engine's images (the runner resizes every image to it)."""
        if getattr(config, "vtrcompile_image_size", None) is None:
            self.fix_geometry(config, None)
        return [int(v) for v in config.vtrcompile_image_size]

    def padded_size(self, config) -> tuple[int, int]:
        """The pinpoint the engine's images are resized and padded to (the model's best fit for H x W)."""
        return best_pinpoint(tuple(self.image_size(config)), self.pinpoints(config))

    def grid(self, config) -> tuple[int, int]:
        """(gh, gw): the hi-res tiles of the engine's image size."""
        h, w = self.padded_size(config)
        s = self.tile_side(config)
        return h // s, w // s

    def tile_patches(self, config) -> int:
        """p: patches along one side of a tile."""
        return self.tile_side(config) // self.patch_size(config)

    def base_tokens(self, config) -> int:
        p = self.tile_patches(config)
        return p * p + (1 if config.vision_feature_select_strategy == "full" else 0)

    def grid_rows(self, config) -> tuple[int, int]:
        """(rows, columns) of the hi-res token grid the model writes (before its row ends): the tiles' patch grid
        with the padding's rows or columns removed."""
        gh, gw = self.grid(config)
        p = self.tile_patches(config)
        return unpadded_grid(tuple(self.image_size(config)), (gh * p, gw * p))

    def image_token_count(self, config, tiles: int = 1) -> int:
        rows, cols = self.grid_rows(config)
        return tiles * (self.base_tokens(config) + rows * cols + rows)

    def check_strategy(self, config) -> None:
        if config.vision_feature_select_strategy == "full":
            raise UnsupportedModelError("LLaVA-NeXT with vision_feature_select_strategy 'full' (a CLS row per "
                                        "tile inside the grid) is not supported; use 'default'")

    def pixel_shape(self, config, tiles: int = 1) -> list[int]:
        gh, gw = self.grid(config)
        s = self.tile_side(config)
        return [tiles * (1 + gh * gw), 3, s, s]

    def image_layout(self, config) -> dict[str, Any]:
        """Rows of the image block (image-relative) that are not patches and how the patches group: the row
        ends (kept by every method, never scored), and [base patches, hi-res patches] (G-Prune's two graphs)."""
        self.check_strategy(config)
        rows, width = self.grid_rows(config)
        base = self.base_tokens(config)
        row_ends = [base + r * (width + 1) + width for r in range(rows)]
        return {"protected": row_ends, "segments": [base, rows * width],
                "why": f"{self.title}'s row-end (image_newline) tokens"}

    # --- preprocessing (LlavaNextImageProcessor on an image of the engine's size) -------------------
    def preprocess(self, image, size, tiles: int, processing: dict | None = None) -> np.ndarray:
        """The image resized to the engine's H x W (bicubic), then LLaVA-NeXT's processing: the whole image
        resized to s x s first, then the image resized to fit the padded size (aspect kept, bicubic), padded
        black and centred, cut into gh x gw tiles in row-major order -> [1 + gh*gw, s, s, 3] in [0, 1]."""
        from PIL import Image

        if not processing or "tile_size" not in processing:
            raise ValueError("LLaVA-NeXT preprocessing needs the tile size (the engine's processor facts)")
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        s = int(processing["tile_size"])
        ph, pw = (int(v) for v in processing.get("padded_size", (h, w)))  # older engines: a pinpoint size
        image = image.resize((w, h), Image.BICUBIC)

        def arr(im) -> np.ndarray:
            return np.asarray(im, dtype=np.float32) / 255.0

        base = arr(image.resize((s, s), Image.BICUBIC))
        fh, fw = fitted_size((h, w), (ph, pw))
        big = np.zeros((ph, pw, 3), np.float32)
        top, left = (ph - fh) // 2, (pw - fw) // 2
        big[top:top + fh, left:left + fw] = arr(image.resize((fw, fh), Image.BICUBIC))
        cells = [big[r:r + s, c:c + s] for r in range(0, ph, s) for c in range(0, pw, s)]
        return np.stack([base, *cells])

    def processor_facts(self, config, model_dir=None) -> dict[str, Any]:
        return {**super().processor_facts(config, model_dir), "tile_size": self.tile_side(config),
                "padded_size": list(self.padded_size(config))}

    # --- capture and the eager references ----------------------------------------------------------------
    def capture_module(self, model: nn.Module, batch: int = 1) -> nn.Module:
        return LlavaNextNextTokenLogits(model, tuple(self.image_size(model.config)),
                                        self.pixel_shape(model.config)[0])

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, batch: int) -> torch.Tensor:
        cfg = model.config
        pixels = pixel_values.reshape(batch, self.pixel_shape(cfg)[0], *pixel_values.shape[1:])
        out = model.model.get_image_features(pixel_values=pixels, image_sizes=[self.image_size(cfg)] * batch,
                                             vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                             **self.feature_kwargs(cfg))
        return torch.cat(list(out.pooler_output)).reshape(batch, -1, out.pooler_output[0].shape[-1])

    def feature_kwargs(self, config) -> dict[str, Any]:
        return {}


class LlavaOnevisionFamily(LlavaNextFamily):
    """LLaVA-OneVision (LlavaOnevisionForConditionalGeneration: SigLIP without CLS, strategy 'full', Qwen2 LLM):
    LLaVA-NeXT's layout, and a hi-res grid larger than `anyres_max_M` allows (more than 1.1 x sqrt(M) tiles'
    worth of patches along the diagonal) is downsampled bilinearly to (rows // r, cols // r) before the row
    ends, r = sqrt(rows * cols / (M p^2)), as the model does."""

    name = "llava_onevision"
    title = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    architecture = "LlavaOnevisionForConditionalGeneration"
    config_class_name = "LlavaOnevisionConfig"
    template = "<|im_start|>user\n{image}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"  # Qwen2's chat layout
    vision_site_refusal = ("LLaVA-OneVision's SigLIP tower has no CLS token, and the model lays its tiles' patches "
                           "out as one grid with row-end (image_newline) tokens after the projector; use a "
                           "projector or llm@ method")
    method_refusals = {"pool": LlavaNextFamily.method_refusals["pool"].replace("LLaVA-NeXT", "LLaVA-OneVision")}

    def preset_config(self, vision: dict, text: dict, image_token_id: int, extra: dict):
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        extra = dict(extra)
        size = extra.pop("image_size", None)
        cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision).to_dict(),
                                   text_config=Qwen2Config(**text).to_dict(), image_token_id=image_token_id,
                                   **{"vision_feature_layer": -1, "vision_feature_select_strategy": "full", **extra})
        self.fix_geometry(cfg, tuple(size) if size else None)
        return cfg

    def check_strategy(self, config) -> None:
        if config.vision_feature_select_strategy != "full":
            raise UnsupportedModelError("LLaVA-OneVision with vision_feature_select_strategy "
                                        f"'{config.vision_feature_select_strategy}' is not supported; its SigLIP tower "
                                        "has no CLS token to drop ('full')")

    def base_tokens(self, config) -> int:
        p = self.tile_patches(config)
        return p * p

    def grid_rows(self, config) -> tuple[int, int]:
        import math

        rows, cols = super().grid_rows(config)
        p = self.tile_patches(config)
        max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))  # HF: .strip("anyres_max_")
        ratio = math.sqrt(rows * cols / (max_tiles * p * p))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    def feature_kwargs(self, config) -> dict[str, Any]:
        return {"vision_aspect_ratio": config.vision_aspect_ratio}


LLAVA_NEXT = LlavaNextFamily()
LLAVA_ONEVISION = LlavaOnevisionFamily()

"""The Qwen-VL family (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
Qwen3VLForConditionalGeneration): a ViT with 2-D rotary positions and no CLS token (window attention on
Qwen2.5, patch 16 and learned position embeddings on Qwen3), a 2x2 patch merger as the projector, a Qwen2 /
Qwen3 LLM with 3-axis rotary positions (mRoPE; interleaved on Qwen3). Qwen3-VL's DeepStack adds features of
chosen vision layers to the hidden states after the first k LLM layers at the image positions; a reduction
before one of those layers gathers the later additions with the image tokens it keeps (passes
replace_image_row_additions and insert_token_reduction, found from the graph; merging methods are refused
there).

An engine is built for one image size (`--image-size HxW`, default 448x448; sides multiples of 28 px, of the
attention window, 112 px, on Qwen2.5): the vision tower's helper tensors for that grid (attention segments,
window order, rotary positions) are computed here, outside the trace, and the mRoPE positions of the LLM
come from the host as the engine input `position_ids` [3, B, S] (models/mrope.py), derived by the runner from
`input_ids`. pixel_values are the processor's flattened patches [h*w, 3*2*14*14] for one image, in the
merger's 2x2 order, exactly as Qwen2VLImageProcessor returns them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError
from .family import Family, prompt_rows

# OpenAI CLIP's normalisation (Qwen2-VL's image processor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = (448, 448)


class QwenNextTokenLogits(nn.Module):
    """forward(input_ids [B,S], pixel_values [B*h*w, C*T*P*P] f32, position_ids [3,B,S] int64[, attention_mask
    [B,S] int64, batch > 1]) -> logits [B, vocab].

    The image grid is fixed: image_grid_thw and the vision helpers are constants of this module, so no
    data-dependent size (the encoder's per-image split) reaches the trace."""

    def __init__(self, model: nn.Module, grid_thw: tuple[int, int, int], rows_per_image: int, batch: int = 1
                 ) -> None:
        super().__init__()
        from transformers.exporters.utils import precompute_export_inputs

        self.model = model
        self.grid = torch.tensor([list(grid_thw)] * batch, dtype=torch.int64)
        helpers: dict[str, Any] = {"grid_thw": self.grid}
        precompute_export_inputs(model.model.visual, helpers)
        self.helpers = {k: v for k, v in helpers.items() if k != "grid_thw" and v is not None}
        # Each image's rows of the tower's output, as Python ints: the model's get_image_features computes them
        # from the grid tensor with .tolist(), which torch.export cannot fix once there are two images in a run.
        self.split = [rows_per_image] * batch

    def image_features(self, pixel_values: torch.Tensor):
        """The vision tower's output split per image, as the model's get_image_features returns it."""
        out = self.model.model.visual(pixel_values, grid_thw=self.grid, return_dict=True, **self.helpers)
        out.pooler_output = torch.split(out.pooler_output, self.split)
        if getattr(out, "deepstack_features", None) is not None:
            out.deepstack_features = [torch.split(f, self.split) for f in out.deepstack_features]
        return out

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.model.dtype
        if pixel_values.dtype != dtype:
            pixel_values = pixel_values.to(dtype)
        out = self.model(input_ids=input_ids, position_ids=position_ids, image_grid_thw=self.grid,
                         mm_encoder_outputs={"image": self.image_features(pixel_values)}, use_cache=False,
                         logits_to_keep=1, attention_mask=attention_mask)
        return out.logits[:, -1, :].float()


class QwenVLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    architecture = "Qwen2VLForConditionalGeneration"
    config_class_name = "Qwen2VLConfig"
    # Qwen2-VL's chat layout, used when the tokenizer has no chat template (its template writes the
    # placeholder token itself between the vision markers, so chat_image stays None).
    template = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|>{image}<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")
    image_mean, image_std = CLIP_MEAN, CLIP_STD
    positions = "mrope"
    vision_site_refusal = ("Qwen-VL's vision tower has no CLS token and its patch merger joins 2x2 patches, so no "
                           "LLM token maps to one vision patch; use a projector or llm@ method")

    def preset_config(self, vision: dict, text: dict, image_token_id: int, extra: dict):
        import transformers

        extra = dict(extra)
        size = tuple(extra.pop("image_size", DEFAULT_IMAGE_SIZE))
        cfg = getattr(transformers, self.config_class_name)(vision_config=vision, text_config=text,
                                                            image_token_id=image_token_id, **extra)
        self.fix_geometry(cfg, size)
        return cfg

    # --- image geometry ------------------------------------------------------------------------------
    def side_multiple(self, config) -> int:
        vc = config.vision_config
        return vc.patch_size * vc.spatial_merge_size

    def fix_geometry(self, config, image_size: tuple[int, int] | None) -> None:
        """Record the engine's fixed image size (H, W) on the loaded config (vision_config.image_size)."""
        size = tuple(image_size) if image_size else tuple(getattr(config.vision_config, "image_size", None)
                                                          or DEFAULT_IMAGE_SIZE)
        m = self.side_multiple(config)
        if len(size) != 2 or any(int(s) != s or s < m or s % m for s in size):
            raise UnsupportedModelError(f"--image-size {'x'.join(map(str, size))}: {self.name} needs sides that are "
                                        f"multiples of {m} px (e.g. {4 * m}x{4 * m})")
        config.vision_config.image_size = [int(size[0]), int(size[1])]

    def image_size(self, config) -> list[int]:  # type: ignore[override]
        s = getattr(config.vision_config, "image_size", None) or DEFAULT_IMAGE_SIZE
        return [int(s[0]), int(s[1])]

    def patch_grid(self, config) -> tuple[int, int, int]:
        """(t, h, w) of the vision patches: image_grid_thw."""
        h, w = self.image_size(config)
        p = config.vision_config.patch_size
        return 1, h // p, w // p

    def merged_grid(self, config) -> tuple[int, int, int]:
        t, h, w = self.patch_grid(config)
        m = config.vision_config.spatial_merge_size
        return t, h // m, w // m

    def tokens_per_tile(self, config) -> int:
        return int(np.prod(self.merged_grid(config)))

    def pixel_shape(self, config, tiles: int = 1) -> list[int]:
        vc = config.vision_config
        t, h, w = self.patch_grid(config)
        return [t * h * w * tiles, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2]

    def host_inputs(self, config) -> dict[str, Any]:
        return {"position_ids": {"kind": "mrope", "image_token_id": int(config.image_token_id),
                                 "grid": list(self.merged_grid(config)), "seq_dim": 2}}

    def prompt_positions(self, config, input_ids: torch.Tensor) -> torch.Tensor:
        from .mrope import mrope_positions

        pos = mrope_positions(input_ids.cpu().numpy()[None], config.image_token_id, self.merged_grid(config))
        return torch.from_numpy(pos[:, 0])

    # --- capture -------------------------------------------------------------------------------------
    def capture_module(self, model: nn.Module, batch: int = 1) -> nn.Module:
        return QwenNextTokenLogits(model, self.patch_grid(model.config), self.tokens_per_tile(model.config), batch)

    def export_context(self):
        """transformers' export patches: the vision attention over uniform segments as one batched SDPA
        (the stock code splits by cu_seqlens with .tolist())."""
        import transformers.exporters.exporter_dynamo  # noqa: F401  (registers the patches)
        from transformers.exporters.utils import apply_patches

        return apply_patches("dynamo")

    # --- preprocessing -------------------------------------------------------------------------------
    def preprocess(self, image, size, tiles: int, processing: dict | None = None) -> np.ndarray:
        """Qwen-VL's processor with the engine's size fixed: the image resized to H x W (bicubic), so an image of
        another aspect ratio is stretched to it."""
        from PIL import Image

        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return (np.asarray(image.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0)[None]

    def pack_pixels(self, pixels: np.ndarray, processing: dict[str, Any]) -> np.ndarray:
        """Normalised [1, C, H, W] -> Qwen2VLImageProcessor's flat patches [h*w, C*T*P*P]: 2x2 merge blocks in
        row-major order, each patch repeated over the temporal patch."""
        p, m, tp = processing["patch_size"], processing["merge_size"], processing["temporal_patch_size"]
        out = []
        for img in pixels:
            c, hh, ww = img.shape
            gh, gw = hh // p, ww // p
            x = img.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
            x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, *x.shape[5:]))
            out.append(x.reshape(gh * gw, c * tp * p * p))
        return np.ascontiguousarray(np.concatenate(out).astype(np.float32))

    def processor_facts(self, config, model_dir=None) -> dict[str, Any]:
        vc = config.vision_config
        return {**super().processor_facts(config, model_dir), "patch_size": int(vc.patch_size),
                "merge_size": int(vc.spatial_merge_size), "temporal_patch_size": int(vc.temporal_patch_size)}

    # --- the model's parts ---------------------------------------------------------------------------
    def vision_output(self, model: nn.Module, pixel_values: torch.Tensor, batch: int):
        """The model's get_image_features for `batch` images of the engine's grid."""
        grid = torch.tensor([list(self.patch_grid(model.config))] * batch)
        with contextlib.suppress(AttributeError):
            pixel_values = pixel_values.to(model.model.visual.dtype)
        return model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid, return_dict=True)

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, batch: int) -> torch.Tensor:
        return prompt_rows(self.vision_output(model, pixel_values, batch).pooler_output, batch)


class Qwen25VLFamily(QwenVLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    architecture = "Qwen2_5_VLForConditionalGeneration"
    config_class_name = "Qwen2_5_VLConfig"

    def side_multiple(self, config) -> int:
        # Window attention: export needs every window of the grid full (uneven windows fail at run time).
        return int(config.vision_config.window_size)


class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    architecture = "Qwen3VLForConditionalGeneration"
    config_class_name = "Qwen3VLConfig"
    image_mean, image_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # Qwen3-VL's processor

    def layer_additions(self, model: nn.Module, pixel_values: torch.Tensor, batch: int) -> dict[int, torch.Tensor]:
        """DeepStack: the merged features of vision layers deepstack_visual_indexes[i], added after LLM layer i."""
        feats = self.vision_output(model, pixel_values, batch).deepstack_features
        return {i: prompt_rows(f, batch) for i, f in enumerate(feats)}


QWEN2_VL = QwenVLFamily()
QWEN2_5_VL = Qwen25VLFamily()
QWEN3_VL = Qwen3VLFamily()

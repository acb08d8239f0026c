"""Built-in presets: config recipes of each family built with random weights, no download."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    vision: dict
    text: dict
    image_token_id: int
    family: str = "llava"
    extra: dict = field(default_factory=dict)  # top-level config fields beyond the defaults below


# Qwen-VL's special tokens inside a tiny vocabulary (the image placeholder is the preset's image_token_id).
QWEN_TINY_IDS = {"vision_start_token_id": 316, "vision_end_token_id": 317, "video_token_id": 318}
QWEN_GEOMETRY_IDS = {"vision_start_token_id": 32001, "vision_end_token_id": 32002, "video_token_id": 32003}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny",
            "tests: CLIP 2x32 on 84 px (36 image tokens), Llama 4x64 with GQA (4 q / 2 kv heads)",
            vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=84, patch_size=14, projection_dim=32),
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024),
            image_token_id=319,
        ),
        Preset(
            "llava15-geometry",
            "demo: LLaVA-1.5 geometry (336 px, patch 14, 576 image tokens), CLIP 6x256, Llama 12x768, "
            "widths cut so a prefill takes about a second on a 2-core CPU",
            vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                        image_size=336, patch_size=14, projection_dim=256),
            text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32064, max_position_embeddings=4096),
            image_token_id=32000,
        ),
        Preset(
            "llava15-7b",
            "scale check: LLaVA-1.5-7B architecture (CLIP-L/14-336 + Llama-7B); built on the meta device",
            vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14, projection_dim=768),
            text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                      rms_norm_eps=1e-5),
            image_token_id=32000,
        ),
        Preset(
            "llava15-13b",
            "scale check: LLaVA-1.5-13B architecture (CLIP-L/14-336 + Llama-13B, 40 x 5120); built on the meta "
            "device",
            vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14, projection_dim=768),
            text=dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32064, max_position_embeddings=4096,
                      rms_norm_eps=1e-5),
            image_token_id=32000,
        ),
        Preset(
            "internvl-tiny",
            "tests: InternVL, InternViT 2x32 on 112 px tiles (16 image tokens per tile after pixel shuffle), "
            "Qwen2 4x64 with GQA (4 q / 2 kv heads)",
            vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=[112, 112], patch_size=[14, 14]),
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024),
            image_token_id=319, family="internvl",
        ),
        Preset(
            "internvl-geometry",
            "InternVL2 geometry (448 px tile, patch 14, pixel shuffle 0.5: 256 image tokens per tile), "
            "InternViT 6x256, Qwen2 12x768 (12 q / 4 kv heads), widths cut for a 2-core CPU",
            vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                        image_size=[448, 448], patch_size=[14, 14]),
            text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096),
            image_token_id=32000, family="internvl",
        ),
        Preset(
            "qwen2vl-tiny",
            "tests: Qwen2-VL, ViT 2x32 on 112x112 images (8x8 patches, 16 image tokens after the 2x2 merger), "
            "Qwen2 4x64 with GQA (4 q / 2 kv heads), mRoPE",
            vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2),
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
            image_token_id=319, family="qwen2_vl", extra=QWEN_TINY_IDS | {"image_size": [112, 112]},
        ),
        Preset(
            "qwen25vl-tiny",
            "tests: Qwen2.5-VL, ViT 4x32 (window attention, layers 1 and 3 global) on 224x224 images (16x16 "
            "patches, 4 windows, 64 image tokens), Qwen2 4x64 with GQA (4 q / 2 kv heads), mRoPE",
            vision=dict(depth=4, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=[1, 3]),
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
            image_token_id=319, family="qwen2_5_vl", extra=QWEN_TINY_IDS | {"image_size": [224, 224]},
        ),
        Preset(
            "qwen3vl-tiny",
            "tests: Qwen3-VL, ViT 4x64 (patch 16, DeepStack features of vision layers 1 and 2 added after LLM "
            "layers 0 and 1) on 128x128 images (8x8 patches, 16 image tokens), Qwen3 4x96 with GQA (4 q / 2 kv "
            "heads), interleaved mRoPE",
            vision=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=96,
                        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                        deepstack_visual_indexes=[1, 2]),
            text=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=24, vocab_size=320, max_position_embeddings=1024,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4],
                                       "mrope_interleaved": True}),
            image_token_id=319, family="qwen3_vl", extra=QWEN_TINY_IDS | {"image_size": [128, 128]},
        ),
        Preset(
            "qwen25vl-geometry",
            "Qwen2.5-VL geometry (448x448 image, patch 14, 2x2 merger: 256 image tokens; window attention, "
            "112 px windows), ViT 8x256, Qwen2 12x768 (12 q / 2 kv heads, mRoPE), widths cut for a 2-core CPU",
            vision=dict(depth=8, hidden_size=256, intermediate_size=1024, out_hidden_size=768, num_heads=4,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=[3, 7]),
            text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=2, vocab_size=32064, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                       "mrope_section": [8, 12, 12]}),
            image_token_id=32000, family="qwen2_5_vl",
            extra=QWEN_GEOMETRY_IDS | {"image_size": [448, 448]},
        ),
        Preset(
            "qwen2vl-geometry",
            "Qwen2-VL geometry (448x448 image, patch 14, 2x2 merger: 256 image tokens; full attention over the "
            "1024 patches), ViT 8x256, Qwen2 12x768 (12 q / 2 kv heads, mRoPE), widths cut for a 2-core CPU",
            vision=dict(depth=8, embed_dim=256, hidden_size=768, num_heads=4, mlp_ratio=4, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2),
            text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=2, vocab_size=32064, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                       "mrope_section": [8, 12, 12]}),
            image_token_id=32000, family="qwen2_vl",
            extra=QWEN_GEOMETRY_IDS | {"image_size": [448, 448]},
        ),
        Preset(
            "qwen3vl-geometry",
            "Qwen3-VL geometry (448x448 image, patch 16, 2x2 merger: 196 image tokens; DeepStack features of "
            "vision layers 1, 3, 5 added after LLM layers 0-2, as the released models' 3), ViT 8x256, Qwen3 12x768 "
            "(12 q / 2 kv heads, interleaved mRoPE), widths cut for a 2-core CPU",
            vision=dict(depth=8, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=768,
                        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[1, 3, 5]),
            text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=2, head_dim=64, vocab_size=32064, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                       "mrope_section": [12, 10, 10], "mrope_interleaved": True}),
            image_token_id=32000, family="qwen3_vl",
            extra=QWEN_GEOMETRY_IDS | {"image_size": [448, 448]},
        ),
        Preset(
            "llavanext-tiny",
            "tests: LLaVA-NeXT, CLIP 2x32 on 28 px tiles (patch 7: 16 base tokens), 56x56 images = 2x2 hi-res "
            "tiles (8x8 grid + 8 row ends): 88 image tokens, Llama 4x64 with GQA (4 q / 2 kv heads)",
            vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=28, patch_size=7, projection_dim=32),
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024),
            image_token_id=319, family="llava_next",
            extra={"image_grid_pinpoints": [[56, 56], [28, 56], [56, 28]], "image_size": [56, 56]},
        ),
        Preset(
            "onevision-tiny",
            "tests: LLaVA-OneVision, SigLIP 2x32 on 28 px tiles (patch 7: 16 base tokens, no CLS), 56x56 images = "
            "2x2 hi-res tiles, 8x8 grid downsampled to 5x5 by anyres_max_2, + 5 row ends: 46 image tokens, Qwen2 "
            "4x64 with GQA (4 q / 2 kv heads)",
            vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=28, patch_size=7),
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024),
            image_token_id=319, family="llava_onevision",
            extra={"image_grid_pinpoints": [[56, 56], [28, 56], [56, 28]], "image_size": [56, 56],
                   "vision_aspect_ratio": "anyres_max_2"},
        ),
        Preset(
            "llavanext-geometry",
            "LLaVA-NeXT geometry (336 px tiles, patch 14; 672x672 images = 576 base + 48x48 hi-res + 48 row-end "
            "tokens = 2928 image tokens), CLIP 6x256, Llama 12x512, widths cut for a 2-core CPU",
            vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                        image_size=336, patch_size=14, projection_dim=256),
            text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
                      vocab_size=32064, max_position_embeddings=4096),
            image_token_id=32000, family="llava_next",
            extra={"image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                   "image_size": [672, 672]},
        ),
        Preset(
            "onevision-geometry",
            "LLaVA-OneVision geometry (384 px SigLIP tiles, patch 14, no CLS; 384x768 images = 729 base + 27x54 "
            "hi-res from 1x2 tiles + 27 row ends = 2214 image tokens), SigLIP 6x256, Qwen2 12x512 (8 q / 2 kv "
            "heads), widths cut for a 2-core CPU",
            vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                        image_size=384, patch_size=14),
            text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=32064, max_position_embeddings=8192),
            image_token_id=32000, family="llava_onevision",
            extra={"image_grid_pinpoints": [[384, 384], [384, 768], [768, 384], [768, 768]],
                   "image_size": [384, 768], "vision_aspect_ratio": "anyres_max_9"},
        ),
    ]
}

# Presets too large to build with weights on this kind of machine: analysis only (meta device).
META_PRESETS = {"llava15-7b", "llava15-13b"}


def preset_config(name: str):
    """The preset's config, built by its family's module."""
    from .family import family_named

    p = PRESETS[name]
    cfg = family_named(p.family).preset_config(p.vision, p.text, p.image_token_id, p.extra)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_preset(name: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build a preset with seeded random weights (on `device`; 'meta' allocates nothing)."""
    from .family import family_named

    cfg = preset_config(name)
    torch.manual_seed(seed)
    # Built directly in `dtype`: a 7B model built in float32 first would need 27 GB.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = family_named(PRESETS[name].family).model_class()(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()

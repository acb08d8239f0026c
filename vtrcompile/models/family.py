"""What vtrcompile knows about a model family, in one place per family.

Each family is one module under `vtrcompile/models/` holding one `Family` instance: how its checkpoints load,
how many image tokens N a fixed image geometry gives, how an image becomes `pixel_values`, the prompt
layout, and the hooks the eager references use (image features, the language model). Everything else
(capture, passes, lowering, runners) is family-free: the passes find the merge and the attention ops
structurally, and engines describe their own inputs and outputs in their metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError, VtrError


def prompt_rows(feats, batch: int) -> torch.Tensor:
    """Image rows as a model returns them ([B*N, D], [images, n, D] or a list of per-image [n_i, D]) ->
    [batch, N, D]."""
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    return feats.reshape(batch, -1, feats.shape[-1])


class Family:
    """A vision-language family whose model is `<Arch>ForConditionalGeneration` with `.model.language_model`
    (a Hugging Face decoder: Llama / Qwen2 / Mistral layers with 1-D RoPE) and one merge of N image rows."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    architecture: str = ""  # the transformers class
    config_class_name: str = ""
    # The prompt when the tokenizer has no chat template; `{image}` is where the image block goes (the family's
    # start/end markers around one placeholder that the runner expands to N) and `{prompt}` the user's text.
    template: str = "{image}\n{prompt}"
    # What the family's processor puts where a chat template writes its image marker ("<image>"), or None when
    # the marker is the placeholder token itself; `{image}` is the placeholder token's text.
    chat_image: str | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_tiles: int = 1  # images (tiles) per prompt an engine may be built for
    # "1d": one position per token, 0..S-1 (the graph computes them); "mrope": three axes per token, computed on
    # the host and passed to the engine as `position_ids` (host_inputs).
    positions: str = "1d"
    # Why the vision-site methods (a CLS token and one LLM token per feature-layer patch) cannot run here,
    # or None when they can.
    vision_site_refusal: str | None = None
    # Methods that cannot run on this family: name -> why (one line).
    method_refusals: dict[str, str] = {}

    # --- loading -------------------------------------------------------------------------------------
    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.architecture)

    def config_class(self) -> type:
        import transformers

        return getattr(transformers, self.config_class_name)

    def preset_config(self, vision: dict, text: dict, image_token_id: int, extra: dict):
        """A config of this family from a preset's vision / text fields (models/presets.py)."""
        raise NotImplementedError

    # --- image geometry ------------------------------------------------------------------------------
    def image_size(self, config) -> int:
        """The square side in pixels the vision tower takes."""
        s = config.vision_config.image_size
        return int(s[0] if isinstance(s, (list, tuple)) else s)

    def patch_size(self, config) -> int:
        p = config.vision_config.patch_size
        return int(p[0] if isinstance(p, (list, tuple)) else p)

    def tokens_per_tile(self, config) -> int:
        raise NotImplementedError

    def fix_geometry(self, config, image_size: tuple[int, int] | None) -> None:
        """Fix the engine's image size on the loaded config; families whose vision tower takes one size refuse
        another."""
        if image_size is None:
            return
        s = self.image_size(config)
        if tuple(image_size) != (s, s):
            raise UnsupportedModelError(f"--image-size {image_size[0]}x{image_size[1]}: the {self.name} family's "
                                        f"engines take the vision tower's own {s}x{s} px images")

    def image_token_count(self, config, tiles: int = 1) -> int:
        """N: image placeholders per prompt for `tiles` images (tiles) of the fixed geometry."""
        return self.tokens_per_tile(config) * tiles

    def pixel_shape(self, config, tiles: int = 1) -> list[int]:
        """Shape of pixel_values for one prompt: [tiles, 3, H, W]; prompts stack along dim 0."""
        s = self.image_size(config)
        return [tiles, 3, s, s]

    def prompt_facts(self, config, tiles: int = 1) -> dict[str, Any]:
        """What a valid prompt is, in the engine metadata's words: N, the placeholder id, vocab, the shape of
        one image (tile) and the tiles per prompt."""
        return {"n_image": self.image_token_count(config, tiles), "image_token_id": int(config.image_token_id),
                "vocab": int(self.text_config(config).vocab_size), "pixel_shape": self.pixel_shape(config)[1:],
                "pixel_rows": self.pixel_shape(config, tiles)[0], "tiles": tiles,
                "processor": self.processor_facts(config), "host_inputs": self.host_inputs(config)}

    def check_tiles(self, tiles: int) -> None:
        if not 1 <= tiles <= self.max_tiles:
            what = "one image per prompt" if self.max_tiles == 1 else f"1 to {self.max_tiles} tiles"
            raise UnsupportedModelError(f"--tiles {tiles}: the {self.name} family takes {what}")

    def preprocess(self, image, size, tiles: int, processing: dict | None = None) -> np.ndarray:
        """A PIL RGB image -> float32 [tiles, H, W, 3] in [0, 1] (normalisation is the caller's); `size` is the
        side, or [H, W]; `processing`: the engine's processor facts."""
        raise NotImplementedError

    def pack_pixels(self, pixels: np.ndarray, processing: dict[str, Any]) -> np.ndarray:
        """Normalised [tiles, 3, H, W] -> pixel_values as the family's processor lays them out (as they are here)."""
        return pixels

    # --- engine inputs beyond input_ids and pixel_values ----------------------------------------------
    def host_inputs(self, config) -> dict[str, Any]:
        """Engine inputs the runner derives from input_ids on the host, by name: how (engine/host_inputs.py)."""
        return {}

    def prompt_positions(self, config, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [S] -> the rotary positions of its tokens: [S], or [3, S] for mRoPE (the references)."""
        return torch.arange(input_ids.shape[-1])

    # --- capture -------------------------------------------------------------------------------------
    def capture_module(self, model: nn.Module, batch: int = 1) -> nn.Module:
        """The module torch.export traces: forward(input_ids, pixel_values, *host inputs) -> logits [B, vocab]."""
        from .loading import NextTokenLogits

        return NextTokenLogits(model)

    def export_context(self):
        """A context torch.export of this family runs in (transformers' export patches, where needed)."""
        import contextlib

        return contextlib.nullcontext()

    # --- the model's parts, for the eager references and the search evaluator -----------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def text_config(self, config):
        return config.text_config

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, batch: int) -> torch.Tensor:
        """-> [batch, N, D]: the projected image rows in the order the merge writes them."""
        out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        feats = out.pooler_output  # [B*N, D], [images, n, D] or a list of per-image [n_i, D]
        return prompt_rows(feats, batch)

    def image_layout(self, config) -> dict[str, Any] | None:
        """Rows of the image block that are not patches, when there are any: {"protected": image-relative rows
        every method keeps and never scores or merges, "segments": patch counts of the block's parts in order,
        "why": what the protected rows are}; None for a block of patches only."""
        return None

    def budget_basis(self, config, tiles: int = 1) -> tuple[int, tuple[int, ...] | None]:
        """(the image tokens a method selects among and its budgets count: N less the protected rows, the
        patch counts of the block's parts or None), as `build` plans a method's reductions."""
        layout = self.image_layout(config)
        n = self.image_token_count(config, tiles)
        if not layout:
            return n, None
        return n - len(layout["protected"]), tuple(layout["segments"]) or None

    def layer_additions(self, model: nn.Module, pixel_values: torch.Tensor, batch: int) -> dict[int, torch.Tensor]:
        """{LLM layer l: [batch, N, D]}: what the model adds to the image rows of the hidden states after layer
        l (Qwen3-VL's DeepStack); empty for most families."""
        return {}

    # --- what an engine records so it runs without the model directory ---------------------------------
    def processor_facts(self, config, model_dir=None) -> dict[str, Any]:
        """Image preprocessing and the prompt layout `generate` uses (the image mean and std read from the model
        directory's image processor settings when it has them: image_processor_settings)."""
        mean, std = list(self.image_mean), list(self.image_std)
        found = image_processor_settings(model_dir) if model_dir is not None else None
        pc_file, pc = found if found is not None else (None, {})
        if pc_file is not None:
            mean, std = ((_channels(pc.get("image_mean", mean)), _channels(pc.get("image_std", std)))
                         if isinstance(pc, dict) else (None, None))
            if mean is None or std is None or 0 in std:
                # the engine records these and normalises every image with them: a damaged file must not pass
                raise VtrError(f"{pc_file}: not a JSON object whose image_mean and image_std are 3 numbers each "
                               "(std nonzero); restore the model's own file, or remove it to use the family's "
                               "defaults")
        return {"family": self.name, "image_size": self.image_size(config), "image_mean": mean,
                "image_std": std, "template": self.template, "chat_image": self.chat_image,
                **self.image_steps(pc, config, pc_file)}

    def image_steps(self, settings: dict[str, Any], config, source: Path | None) -> dict[str, Any]:
        """Processor facts read from the image processor's settings (`source`, a dict already checked) beyond
        mean and std, for a family whose preprocessing follows them; none for most families."""
        return {}


def image_processor_settings(model_dir: Path) -> tuple[Path, Any] | None:
    """(file, settings) of a model directory's image processor, where transformers looks first: the
    "image_processor" entry of processor_config.json (as transformers 5 saves a processor), else
    preprocessor_config.json; settings is None when the file is not JSON. None when neither file has them."""
    import json

    def read(f: Path) -> Any:
        try:
            return json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    nested = model_dir / "processor_config.json"
    if nested.is_file():
        d = read(nested)
        if not isinstance(d, dict):
            return nested, None
        if "image_processor" in d:
            return nested, d["image_processor"]
    flat = model_dir / "preprocessor_config.json"
    return (flat, read(flat)) if flat.is_file() else None


def _channels(v: Any) -> list[float] | None:
    """A preprocessor config's image_mean / image_std as 3 finite numbers (one number: the same for every
    channel, as Hugging Face image processors take it); None when it is anything else."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        v = [v] * 3
    if isinstance(v, list | tuple) and len(v) == 3 and all(
            isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x) for x in v):
        return [float(x) for x in v]
    return None


def families() -> list[Family]:
    from .internvl import INTERNVL
    from .llava import LLAVA
    from .llava_next import LLAVA_NEXT, LLAVA_ONEVISION
    from .qwen_vl import QWEN2_5_VL, QWEN2_VL, QWEN3_VL

    return [LLAVA, INTERNVL, QWEN2_VL, QWEN2_5_VL, QWEN3_VL, LLAVA_NEXT, LLAVA_ONEVISION]


# Vision-language families we recognise but do not compile yet (each needs its own module here first).
LATER_FAMILIES = {
    "llava_next_video", "qwen3_vl_moe",
    "idefics2", "idefics3", "paligemma", "mllama", "gemma3", "smolvlm", "pixtral",
}


def family_named(name: str) -> Family:
    return next(f for f in families() if f.name == name)


def family_for(config: Any, where: str = "the model") -> Family:
    """The family of a config (a transformers config object or a config.json dict); refuses the others with
    what is supported."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    model_type, archs = get("model_type", "?"), get("architectures") or []
    for f in families():
        if model_type in f.model_types or f.architecture in archs:
            return f
    supported = ", ".join(f.architecture for f in families())
    if model_type in LATER_FAMILIES:
        raise UnsupportedModelError(f"{where}: model family '{model_type}' is not supported yet; vtrcompile "
                                    f"compiles {supported}")
    if get("vision_config") is None:
        raise UnsupportedModelError(f"{where}: '{model_type}' is a text-only model (no vision_config); vtrcompile "
                                    f"needs a vision-language model ({supported})")
    raise UnsupportedModelError(f"{where}: model type '{model_type}' is not supported yet; use one of {supported}")


def family_of(model: nn.Module) -> Family:
    return family_for(model.config)

"""MODEL argument -> ModelSource: a preset name, a HF directory, a torch.export file or a pickle."""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError, VtrError
from .family import Family, family_for
from .presets import META_PRESETS, PRESETS, build_preset
from .prompt import padding_kwargs

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """What the compiler starts from: an eager module or an exported program, with example inputs."""

    label: str
    kind: str  # "preset" | "hf-dir" | "exported" | "pickle"
    module: nn.Module | None
    program: torch.export.ExportedProgram | None
    example_inputs: tuple[torch.Tensor, ...]  # input_ids, pixel_values, then the family's host inputs
    hf_model: nn.Module | None = None  # the <Family>ForConditionalGeneration, when there is one
    # Captured programs by (max_prompt, dtype): every build starts from a fresh ep.module() copy, so one
    # capture serves all of them (the reduced and the baseline engine of one `optimize --profile`).
    captured: dict = field(default_factory=dict, repr=False)
    # A Hugging Face directory read lazily: the module's parameters are empty stand-ins and engines stream
    # every weight from the checkpoint (models/checkpoint.py); `eager()` loads them for jobs that run the model.
    weights: Any = None
    tiles: int = 1  # images (tiles) per prompt the example inputs, and so the engines, are built for
    batch: int = 1  # prompts per run the example inputs, and so the engines, are built for (fixed)
    image_size: tuple[int, int] | None = None  # the fixed image size asked for (--image-size), if any

    @property
    def family(self) -> Family | None:
        return family_for(self.hf_model.config) if self.hf_model is not None else None

    @property
    def host_inputs(self) -> dict[str, Any]:
        """How the engine inputs after input_ids and pixel_values derive from the prompt (engine/host_inputs.py);
        batch > 1 adds the padding mask."""
        from ..engine.host_inputs import with_padding

        return with_padding(self.family.host_inputs(self.hf_model.config), self.batch) if self.hf_model is not None \
            else {}

    def inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every graph input for a prompt and its pixels."""
        from ..engine.host_inputs import graph_inputs

        return graph_inputs(self.host_inputs, input_ids, pixel_values)

    def eager(self) -> ModelSource:
        """This source with its weights in memory (in the checkpoint's dtype, or the one asked for): for jobs
        that run the model (search, --keep auto, AOTInductor). A no-op for sources that are loaded already."""
        if self.weights is None:
            return self
        loaded = _load_hf_dir(Path(self.label), self.weights.dtype, stream=False, tiles=self.tiles,
                              image_size=self.image_size, batch=self.batch)
        self.module, self.hf_model, self.weights, self.captured = loaded.module, loaded.hf_model, None, {}
        return self

    @property
    def dtype(self) -> torch.dtype:
        p = next(iter(self.module.parameters()), None) if self.module is not None else None
        if p is None and self.program is not None:
            p = next(iter(self.program.state_dict.values()), None)
        return p.dtype if p is not None else torch.float32


class NextTokenLogits(nn.Module):
    """forward(input_ids [B,S] int64, pixel_values [B*tiles,3,H,W] f32[, attention_mask [B,S] int64]) -> logits
    [B, vocab] at the last position. attention_mask: engines of batch > 1 (left padding, engine/host_inputs.py)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.model.dtype
        if pixel_values.dtype != dtype:  # engines take float32 pixels whatever precision they compute in
            pixel_values = pixel_values.to(dtype)
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False, logits_to_keep=1,
                         **padding_kwargs(attention_mask))
        return out.logits[:, -1, :].float()


def example_prompt(config, prefix: int = 5, suffix: int = 8, seed: int = 0, batch: int = 1, tiles: int = 1
                   ) -> tuple[torch.Tensor, ...]:
    """A prompt [prefix][N image placeholders][suffix], random pixels for `tiles` images per prompt and the
    family's host inputs (mRoPE positions; for batch > 1 an all-ones attention_mask), for capture and tests."""
    from ..engine.host_inputs import graph_inputs, with_padding
    from .prompt import layout_prompt

    family = family_for(config)
    family.check_tiles(tiles)
    g = torch.Generator().manual_seed(seed)
    vocab = family.text_config(config).vocab_size
    image_id = config.image_token_id

    def text(k: int) -> np.ndarray:
        t = torch.randint(0, vocab - 1, (batch, k), generator=g)
        return (torch.where(t >= image_id, t + 1, t) % vocab).numpy()

    pre = text(prefix)
    ids = torch.from_numpy(layout_prompt(pre, text(suffix), family.image_token_count(config, tiles), image_id))
    tiles_, *chw = family.pixel_shape(config, tiles)
    pixels = torch.randn(batch * tiles_, *chw, generator=g)
    return graph_inputs(with_padding(family.host_inputs(config), batch), ids, pixels)


def _read_config(path: Path):
    """(family, config) of a Hugging Face directory; other families refused with what is supported."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise VtrError(f"{path}: no config.json; a Hugging Face model directory needs config.json and weights")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VtrError(f"{cfg_file}: not valid JSON ({e.msg if hasattr(e, 'msg') else e}); "
                       "fix or re-save the checkpoint") from None
    if not isinstance(cfg, dict):
        raise VtrError(f"{cfg_file}: holds a JSON {type(cfg).__name__}, not an object; fix or re-save config.json")
    family = family_for(cfg, str(path))
    try:
        return family, family.config_class().from_pretrained(path, local_files_only=True)
    except Exception as e:  # a config.json that parses as JSON but not as this family's config
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VtrError(f"{cfg_file}: not a valid {family.config_class_name} ({first}); fix or re-save "
                       "config.json") from None


def _refuse_eager(module, args, kwargs):
    """Forward pre-hook of a model whose parameters are empty stand-ins: tracing (fake tensors) may run it,
    running it on real inputs would compute with unwritten memory."""
    from torch._guards import detect_fake_mode

    if detect_fake_mode((args, kwargs)) is None:
        raise VtrError("internal: a model read lazily from its checkpoint was run without its weights; call "
                       "ModelSource.eager() first")


def _load_hf_dir(path: Path, dtype: torch.dtype | None = None, stream: bool = True, tiles: int = 1,
                 image_size: tuple[int, int] | None = None, batch: int = 1) -> ModelSource:
    """A Hugging Face directory in its own dtype (the config's), or `dtype` when given; never upcast silently.
    `stream`: build the model with empty parameters and read the weights from the safetensors files only when
    an engine is written (folders without safetensors files load eagerly)."""
    from .checkpoint import CheckpointWeights, config_dtype, empty_model

    family, config = _read_config(path)
    family.check_tiles(tiles)
    family.fix_geometry(config, image_size)
    dtype = dtype or config_dtype(config) or torch.float32
    if stream and any(path.glob("*.safetensors")):
        try:
            model = empty_model(family.model_class(), config, dtype)
        except Exception as e:  # a config that parses but names what the model code lacks (e.g. an activation)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VtrError(f"{path / 'config.json'}: the {family.config_class_name} does not build a model "
                           f"({type(e).__name__}: {first[:160]}); fix or re-save config.json") from None
        model.config._attn_implementation = "sdpa"
        weights = CheckpointWeights(path, model, dtype)
        model.register_forward_pre_hook(_refuse_eager, with_kwargs=True)
        log.info("%s: %.1f GB of %s weights, read from the checkpoint when engines are written", path,
                 weights.nbytes / 1e9, str(dtype).removeprefix("torch."))
        return ModelSource(str(path), "hf-dir", family.capture_module(model, batch), None,
                           example_prompt(model.config, tiles=tiles, batch=batch), hf_model=model, weights=weights,
                           tiles=tiles, image_size=image_size, batch=batch)
    try:
        model = family.model_class().from_pretrained(
            path, config=config, local_files_only=True, attn_implementation="sdpa", dtype=dtype)
    except Exception as e:  # transformers raises many types for broken checkpoints
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VtrError(f"{path}: could not load the weights ({first}); check the safetensors files") from None
    model.eval()
    return ModelSource(str(path), "hf-dir", family.capture_module(model, batch), None,
                       example_prompt(model.config, tiles=tiles, batch=batch), hf_model=model, tiles=tiles,
                       image_size=image_size, batch=batch)


def _load_exported(path: Path, batch: int | None = None) -> ModelSource:
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise VtrError(f"{path}: not a readable torch.export program ({type(e).__name__}); "
                       "save one with torch.export.save") from None
    example = ep.example_inputs
    if not example or len(example[0]) != 2:
        raise VtrError(f"{path}: the exported program must take (input_ids, pixel_values) and carry "
                       "its example inputs; export with torch.export.export(model, (ids, pixels), ...)")
    own = int(example[0][0].shape[0])
    if batch is not None and batch != own:
        raise VtrError(f"{path}: the exported program was traced with batch {own}; --batch {batch} cannot change "
                       f"it (export it again with {batch} prompts, or leave --batch out)")
    return ModelSource(str(path), "exported", None, ep, tuple(example[0]), batch=own)


def _register_recorded_outputs(model: nn.Module) -> None:
    """Register each Hugging Face model class in `model` for the outputs its forward records, as its __init__ does.

    transformers (5.x) records some outputs (a vision tower's hidden states, which LLaVA's projector reads) through
    a registry keyed by model class, filled in PreTrainedModel.__init__. Unpickling runs no __init__, so in a process
    that has not built that class itself the registry has no entry, the tower returns no hidden states, and the
    trace fails ('NoneType' object is not subscriptable). A transformers without the registry needs nothing."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            _CAN_RECORD_REGISTRY[m] = getattr(m, "_can_record_outputs", None)


def _load_pickle(path: Path, tiles: int = 1, image_size: tuple[int, int] | None = None, batch: int = 1
                 ) -> ModelSource:
    try:
        obj = torch.load(str(path), weights_only=False, map_location="cpu")
    except Exception as e:
        raise VtrError(f"{path}: could not unpickle ({type(e).__name__}); is it a torch.save'd nn.Module?") from None
    if not isinstance(obj, nn.Module):
        raise VtrError(f"{path}: holds a {type(obj).__name__}, not an nn.Module; "
                       "save the model object itself with torch.save(model, path)")
    cfg = getattr(obj, "config", None)
    if cfg is None or not hasattr(cfg, "vision_config") or not hasattr(cfg, "image_token_id"):
        raise UnsupportedModelError(
            f"{path}: the module has no vision-language .config (vision_config, image_token_id); vtrcompile "
            "needs it to build example inputs")
    family = family_for(cfg, str(path))
    family.check_tiles(tiles)
    family.fix_geometry(cfg, image_size)
    _register_recorded_outputs(obj)
    obj.eval()
    return ModelSource(str(path), "pickle", family.capture_module(obj, batch), None,
                       example_prompt(cfg, tiles=tiles, batch=batch), hf_model=obj, tiles=tiles, image_size=image_size,
                       batch=batch)


def _refuse_engine(path: Path) -> None:
    """An engine file given where a model is expected: say so, and what to run instead."""
    from ..engine.runners import BACKENDS, read_engine_metadata

    if path.suffix.lower() not in {e for exts in BACKENDS.values() for e in exts} - {".pt2"} and not (
            path.suffix.lower() == ".pt2" and _is_aoti_package(path)):
        return
    meta = read_engine_metadata(path)
    if meta is not None:
        what = f"a vtrcompile {meta.get('role', 'prefill')} engine of {meta.get('model', '?')}"
        if meta.get("method"):
            what += f" (method {meta['method']})"
        raise VtrError(f"{path} is {what}, not a model; run `vtrcompile profile`, `generate` or `eval` on it, or "
                       f"give the model it was built from")
    raise VtrError(f"{path}: an engine file ({path.suffix}), not a model; give a Hugging Face model directory, a "
                   ".pt2 program from torch.export.save, or a preset")


def _zip_names(path: Path) -> list[str]:
    """The member names of a zip archive; [] when it is none, or one whose directory is damaged (is_zipfile
    only finds the end record): the loader that reads it next then names the damage."""
    if not zipfile.is_zipfile(path):
        return []
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def _is_aoti_package(path: Path) -> bool:
    return any("aotinductor" in n for n in _zip_names(path))


def load_model(spec: str, allow_pickle: bool = False, dtype: torch.dtype | None = None,
               stream: bool = True, tiles: int = 1, image_size: tuple[int, int] | None = None,
               batch: int | None = None) -> ModelSource:
    """Resolve the MODEL argument of the CLI. A Hugging Face directory is read in its own dtype (or `dtype`);
    with `stream` its weights stay in the checkpoint until an engine is written (ModelSource.eager() loads them).
    `tiles`: images per prompt the engines take (families that tile an image, e.g. InternVL); `image_size`:
    (H, W) of the engines' fixed image (families whose tower takes several sizes, e.g. Qwen-VL); `batch`: prompts
    per run the engines take (default 1; an exported program keeps the batch it was traced with)."""
    if batch is not None and batch < 1:
        raise VtrError(f"--batch {batch}: give at least 1")
    rows = 1 if batch is None else batch  # an exported program's own batch is checked against `batch` as given
    if spec in PRESETS:
        device = "meta" if spec in META_PRESETS else "cpu"
        model = build_preset(spec, device=device)
        family = family_for(model.config)
        family.check_tiles(tiles)
        family.fix_geometry(model.config, image_size)
        return ModelSource(f"preset:{spec}", "preset", family.capture_module(model, rows), None,
                           example_prompt(model.config, tiles=tiles, batch=rows), hf_model=model, tiles=tiles,
                           image_size=image_size, batch=rows)
    path = Path(spec)
    if not path.exists():
        raise VtrError(f"model not found: {spec} (give a Hugging Face model directory, a .pt2 file from "
                       f"torch.export.save, a pickled nn.Module with --allow-pickle, or a preset: "
                       f"{', '.join(PRESETS)})")
    if path.is_dir():
        return _load_hf_dir(path, dtype, stream, tiles, image_size, rows)
    _refuse_engine(path)
    with path.open("rb") as f:
        head = f.read(4)
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in _zip_names(path)):
        return _load_exported(path, batch)
    if not head:
        raise VtrError(f"{path}: empty file; expected a .pt2 program, a pickled module or a model directory")
    if path.suffix == ".pt2":
        return _load_exported(path, batch)
    if not allow_pickle:
        raise VtrError(f"{path}: looks like a pickled module; unpickling runs arbitrary code, so pass "
                       "--allow-pickle only if you trust this file")
    return _load_pickle(path, tiles, image_size, rows)

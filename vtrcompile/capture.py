"""Model source -> torch.export program with a dynamic prompt length, and back to an editable GraphModule."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from torch import fx

from .engine.host_inputs import seq_dims
from .errors import VtrError
from .models.loading import ModelSource

log = logging.getLogger(__name__)

# The longest prompt an engine takes when --max-prompt is not given: DEFAULT_MAX_PROMPT, or the image tokens plus
# TEXT_ROOM when they need more (LLaVA-NeXT's 2928 at 672x672), never beyond the LLM's max_position_embeddings.
DEFAULT_MAX_PROMPT = 2048
TEXT_ROOM = 512


def prompt_dim(n_image: int, max_prompt: int) -> torch.export.Dim:
    # At least two text tokens: the last prompt token is text, and a reduction that withdraws every
    # image token (VTW) still leaves a sequence of 2+, which export does not specialise to 1.
    return torch.export.Dim("prompt", min=n_image + 2, max=max_prompt)


def prompt_dims(names: list[str], seq_dims: dict[str, int], dim: torch.export.Dim) -> dict[str, Any]:
    """dynamic_shapes for inputs `names`: the prompt-length dim of each input that has one, else static."""
    return {n: ({seq_dims[n]: dim} if n in seq_dims else None) for n in names}


def export_program(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], n_image: int,
                   max_prompt: int, host_inputs: dict[str, Any] | None = None, context=None
                   ) -> torch.export.ExportedProgram:
    """torch.export with the prompt length dynamic (input_ids dim 1, and each host input's sequence dim);
    pixel_values keep the static image size."""
    names = ["input_ids", "pixel_values", *(host_inputs or {})]
    dims = prompt_dims(names, seq_dims(host_inputs or {}), prompt_dim(n_image, max_prompt))
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), (context or contextlib.nullcontext()):
            ep = torch.export.export(module, tuple(example_inputs), dynamic_shapes=dims, strict=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VtrError(f"torch.export failed: {first}") from e
    log.info("exported in %.1fs (%d nodes)", time.perf_counter() - t0, len(ep.graph.nodes))
    return ep


def module_device(module: torch.nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def capture(source: ModelSource, max_prompt: int | None = None) -> torch.export.ExportedProgram:
    """The unmodified program of a model source (exports eager modules, passes programs through)."""
    if source.program is not None:
        return source.program
    assert source.module is not None
    cfg = source.hf_model.config if source.hf_model is not None else None
    if cfg is None:
        raise VtrError(f"{source.label}: cannot build example inputs without a config")
    family = source.family
    n_image = family.image_token_count(cfg, source.tiles)
    found = int((source.example_inputs[0][0] == cfg.image_token_id).sum())
    if found != n_image:
        raise VtrError(f"{source.label}: the example prompt has {found} image tokens, the model needs "
                       f"{n_image}; a prompt without image tokens cannot locate the visual-token boundary")
    limit = family.text_config(cfg).max_position_embeddings
    if max_prompt is None:
        max_prompt = max(DEFAULT_MAX_PROMPT, n_image + TEXT_ROOM)
    max_prompt = min(max_prompt, limit)
    if max_prompt <= n_image + 2:
        hint = (f"; give --max-prompt up to {limit} (the LLM's max_position_embeddings)" if limit > n_image + 2
                else "; the LLM's max_position_embeddings is too small for this image size")
        raise VtrError(f"--max-prompt {max_prompt} leaves no room for text around {n_image} image tokens{hint}")
    device = module_device(source.module)  # a meta-device model (analysis only) takes meta inputs
    p = next(iter(source.module.parameters()), None)
    key = (max_prompt, p.dtype if p is not None else None, device.type)
    if key not in source.captured:
        example = tuple(t.to(device) for t in source.example_inputs)
        source.captured[key] = export_program(source.module, example, n_image, max_prompt, source.host_inputs,
                                              family.export_context())
    return source.captured[key]


def editable_module(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """An fx.GraphModule of the program (parameters as attributes) that passes may rewrite."""
    return ep.module()

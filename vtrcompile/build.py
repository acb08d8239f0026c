"""Model source + method -> rewritten, re-exported program ready for a backend, with its facts."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .capture import capture, editable_module, prompt_dims
from .engine.host_inputs import graph_inputs
from .errors import AnalysisError, VtrError
from .methods.registry import label, resolve
from .models.loading import ModelSource
from .passes.analysis import analyze
from .passes.base import run_pipeline
from .passes.facts import GraphFacts
from .passes.find_decoder_layers import SDPA
from .passes.fold_whole_splits import fold_whole_splits
from .passes.graph_utils import mark_meta_current
from .passes.insert_token_reduction import ImageLayout, Reduction
from .passes.pipeline import build_pipeline
from .passes.provenance import module_stack
from .passes.strip_runtime_asserts import strip_runtime_asserts

log = logging.getLogger(__name__)


@dataclass
class Build:
    method: str
    options: dict[str, Any]
    reductions: list[Reduction]
    facts: GraphFacts  # of the unmodified graph
    graph_module: fx.GraphModule  # rewritten, runnable in eager
    program: torch.export.ExportedProgram  # re-exported, asserts stripped
    example_inputs: tuple[torch.Tensor, ...]  # on the CPU, whatever the weights' device
    prompt_range: tuple[int, int]
    host_inputs: dict[str, Any] = field(default_factory=dict)  # engine/host_inputs.py

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "pixel_values", *self.host_inputs]

    def inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Every graph input for a prompt, its pixels and its padding (host inputs derived as a runner does)."""
        return graph_inputs(self.host_inputs, input_ids, pixel_values, attention_mask)

    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, vocab] of the rewritten graph (its first output; the rest is the KV cache)."""
        return self.graph_module(*self.inputs(input_ids, pixel_values))[0]

    def llm_tokens(self, prompt_len: int) -> list[int]:
        """Sequence length entering each decoder layer for a prompt of `prompt_len` tokens, read off the
        query length of each layer's attention op in the rewritten graph (found by provenance: after a
        vision-site reduction the original boundary op is gone)."""
        out = []
        for layer in self.facts.layers:
            ops = [n for n in self.graph_module.graph.nodes if n.op == "call_function" and n.target == SDPA
                   and module_stack(n) and module_stack(n)[-1][0] == layer.attention_module]
            s = ops[0].meta["val"].shape[2]
            expr = s.node.expr if isinstance(s, torch.SymInt) else s
            out.append(int(expr.subs(self.facts.seq_symbol, prompt_len)) if hasattr(expr, "subs") else int(expr))
        return out


def prompt_range(ep: torch.export.ExportedProgram) -> tuple[int, int]:
    ids = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == ep.graph_signature.user_inputs[0])
    s = ids.meta["val"].shape[1]
    if not isinstance(s, torch.SymInt):
        raise VtrError("the program's prompt length is static; capture it with a dynamic input_ids dim 1")
    r = ep.range_constraints[s.node.expr]
    return int(r.lower), int(r.upper)


def input_prompt_dims(gm: fx.GraphModule) -> dict[str, int]:
    """Placeholder name -> the dim of the prompt length (the symbol of input_ids' dim 1), for inputs that have one."""
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seq = ph[0].meta["val"].shape[1]
    seq = seq.node.expr if isinstance(seq, torch.SymInt) else seq
    out = {}
    for n in ph:
        v = n.meta.get("val")
        for d, size in enumerate(getattr(v, "shape", ())):
            if isinstance(size, torch.SymInt) and size.node.expr == seq:
                out[n.name] = d
                break
    return out


def reexport(gm: fx.GraphModule, example_inputs, lo: int, hi: int) -> torch.export.ExportedProgram:
    """Export a rewritten graph again, with the prompt-length dim of every input that has one dynamic."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    dims = prompt_dims(names, input_prompt_dims(gm), torch.export.Dim("prompt", min=lo, max=hi))
    with torch.no_grad():
        ep = torch.export.export(gm, tuple(example_inputs), dynamic_shapes=dims, strict=False)
    strip_runtime_asserts(ep.graph_module)
    return ep


def image_layout(source: ModelSource, n_image: int) -> ImageLayout | None:
    """The model's non-patch image rows (its family's image_layout), checked against the graph's N."""
    family = source.family
    cfg = source.hf_model.config if source.hf_model is not None else None
    facts = family.image_layout(cfg) if family is not None else None
    if not facts:
        return None
    if facts["protected"] and max(facts["protected"]) >= n_image or sum(facts["segments"]) + len(
            facts["protected"]) != n_image:
        raise VtrError(f"internal: the {family.name} image layout does not describe the graph's {n_image} image rows")
    return ImageLayout(tuple(facts["protected"]), tuple(facts["segments"]), facts["why"])


@contextlib.contextmanager
def naming_the_model(source: ModelSource) -> Iterator[None]:
    """A structure the analysis or a pass cannot find in the graph of `source` names that model first: the same
    message holds for every model, and a damaged program file can load and still not be a vision-language model's
    graph (fuzzing found one)."""
    try:
        yield
    except AnalysisError as e:
        raise AnalysisError(f"{source.label}: {e}") from None


def build(source: ModelSource, method: str, options: dict[str, Any], max_prompt: int | None = None) -> Build:
    """Capture `source`, insert the method's reduction, re-export (the program every lowering starts from)."""
    with naming_the_model(source):
        return _build(source, method, options, max_prompt)


def _build(source: ModelSource, method: str, options: dict[str, Any], max_prompt: int | None) -> Build:
    t0 = time.perf_counter()
    ep = capture(source, max_prompt)
    t1 = time.perf_counter()
    gm = editable_module(ep)
    strip_runtime_asserts(gm)
    fold_whole_splits(gm)
    mark_meta_current(gm)
    facts = analyze(gm)
    layout = image_layout(source, facts.boundary.n_image)
    n_patches = facts.boundary.n_image - (len(layout.protected) if layout else 0)
    reductions = resolve(method, options, n_patches, len(facts.layers), layout.segments if layout else None)
    if layout is not None:
        family = source.family
        for r in reductions:
            why = family.method_refusals.get(r.method) or (family.vision_site_refusal if r.site == "vision" else None)
            if why:
                raise VtrError(f"{r.method}: {why}")
            r.layout = layout
            r.recorded["protected_rows"] = len(layout.protected)
    host = source.host_inputs
    mrope = [i for i, h in enumerate(host.values()) if h["kind"] == "mrope"]
    if mrope:
        # Positions of several axes (mRoPE): a renumbering policy keeps each kept token's positions instead
        # (docs/methods.md, "Model families"); the engine records the policy it used.
        for r in reductions:
            if r.positions == "renumber":
                r.positions = "keep"
                r.recorded["positions_asked"] = "renumber"
    position_input = 2 + mrope[0] if mrope else None
    padding = [i for i, h in enumerate(host.values()) if h["kind"] == "padding"]
    run_pipeline(gm, build_pipeline(reductions, [lay.attention_module for lay in facts.layers], position_input,
                                    2 + padding[0] if padding else None))
    t2 = time.perf_counter()
    lo, hi = prompt_range(ep)
    device = next((t.device for t in ep.state_dict.values()), torch.device("cpu"))
    example = tuple(t.to(device) for t in source.example_inputs)
    program = reexport(gm, example, lo, hi)
    t3 = time.perf_counter()
    used = {k: v for k, v in options.items() if v is not None}
    b = Build(label(method, used), used, reductions, facts, gm, program, tuple(source.example_inputs), (lo, hi),
              host)
    log.info("built %s in %.1fs (capture %.1fs, passes %.1fs, re-export %.1fs)", method, t3 - t0, t1 - t0,
             t2 - t1, t3 - t2)
    return b

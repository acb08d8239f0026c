"""Candidate schedules -> next-token logits on calibration prompts, eagerly, from one prepared model.

No re-export per candidate: image features and prompt embeddings are computed once per prompt, and the
decoder runs the schedule with the reference building blocks (reference/blocks.py). tests/search checks
that these logits equal the compiled `schedule` engine's. G-Search also checkpoints the hidden states
entering the layer it is deciding, so each candidate only runs the layers from there on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import VtrError
from ..reference.blocks import (
    PROTECTED,
    add_to_image_rows,
    embed_prompt,
    image_features,
    image_start,
    language_model,
    layer_additions,
    next_token_logits,
    pick_rows,
    prompt_positions,
    protected_mask,
    protecting,
    run_layers,
)
from ..reference.methods import first_stage_rows, follow, kept_rows, noting_kept, suffix_scores
from ..reference.vision import VisionStage

log = logging.getLogger(__name__)


@dataclass
class _State:
    h_prev: torch.Tensor  # what entered layer l-1
    h: torch.Tensor  # what enters layer l
    pos: torch.Tensor
    start: int
    n: int  # image-block rows present
    protected: torch.Tensor | None  # bool [n]: rows no reduction selects or drops (LLaVA-NeXT's row ends)
    ids: torch.Tensor | None  # the original block rows present (None: new rows, after a vision stage)
    adds: dict[int, torch.Tensor]  # {layer l: [1, N, D]} added to the image rows after layer l (DeepStack)


class ScheduleEvaluator:
    def __init__(self, model, items: list, answers: list[int] | None = None, first=None) -> None:
        """`first`: a projector stage (reference/baselines.py) or a vision stage (reference/vision.py) applied
        before the LLM; the schedule then counts the image tokens it leaves. Where the family's image block
        holds rows that are not patches (LLaVA-NeXT's row ends), schedules count patches, as every budget
        does there, and those rows stay in every layer, as in the compiled engine."""
        self.model = model.eval()
        self.layers = len(language_model(model).layers)
        self.answers = answers
        self._h0: list[_State] = []
        with torch.no_grad():
            for it in items:
                ids, px = torch.as_tensor(it.ids), torch.as_tensor(it.pixels)
                feats = image_features(model, px.to(next(model.parameters()).dtype), ids.shape[0])
                h, start = embed_prompt(model, ids, feats), image_start(model, ids)
                pos, n = prompt_positions(model, ids), int(feats.shape[1])
                adds = layer_additions(model, px.to(feats.dtype), ids.shape[0])
                present: torch.Tensor | None = torch.arange(n)
                with protecting(protected_mask(model, n)):
                    if first is not None:
                        with noting_kept() as note:
                            h, pos, n = first_stage_rows(first, model, px.to(feats.dtype), feats[0], h, pos, start)
                        present = follow(None if isinstance(first, VisionStage) else present, note, n)
                    protected = PROTECTED.get()
                self._h0.append(_State(h, h, pos, start, n, protected, present, adds))
            self.n_image = n - (0 if protected is None else int(protected.sum()))
        self._cp: tuple[int, tuple[int, ...], list[_State]] | None = None
        self.evaluations = 0
        self.full = self.logits([self.n_image] * self.layers)

    def _start_state(self, i: int) -> _State:
        return self._h0[i]

    def _advance(self, st: _State, keeps: list[int], lo: int, hi: int) -> _State:
        """Run layers lo..hi-1, reducing before each layer l where keeps[l] < keeps[l-1]: the top keeps[l]
        patches by layer l-1's suffix-text attention, plus every protected row; a layer's addition to the image
        rows (DeepStack) goes to the original rows still present."""
        h_prev, h, pos, start, n, protected, ids = st.h_prev, st.h, st.pos, st.start, st.n, st.protected, st.ids
        for layer in range(lo, hi):
            patches = n - (0 if protected is None else int(protected.sum()))
            if layer > 0 and keeps[layer] < patches:
                with protecting(protected):
                    kept = pick_rows(suffix_scores(self.model, layer - 1, h_prev, pos, start, n), keeps[layer])
                    protected = PROTECTED.get()
                rows = kept_rows(h.shape[1], start, n, kept)
                h, pos, n = h[:, rows], pos[..., rows], len(kept)
                ids = None if ids is None else ids[kept]
            h_prev, h = h, run_layers(self.model, h, pos, range(layer, layer + 1))
            if layer in st.adds:
                h = add_to_image_rows(h, start, n, st.adds[layer], ids)
        return _State(h_prev, h, pos, start, n, protected, ids, st.adds)

    @torch.no_grad()
    def checkpoint(self, keeps: list[int], layer: int) -> None:
        """Keep the states entering `layer` under keeps[:layer]; later candidates sharing it start there."""
        self._cp = (layer, tuple(keeps[:layer]),
                    [self._advance(self._start_state(i), keeps, 0, layer) for i in range(len(self._h0))])

    @torch.no_grad()
    def logits(self, keeps: list[int]) -> torch.Tensor:
        """keeps n_0..n_{L-1} (non-increasing, n_0 = N) -> next-token logits [M, vocab]."""
        if len(keeps) != self.layers or keeps[0] != self.n_image or any(
                b > a for a, b in zip(keeps, keeps[1:], strict=False)):
            raise VtrError(f"schedule {keeps}: needs {self.layers} non-increasing counts from N={self.n_image}")
        self.evaluations += 1
        out = []
        for i in range(len(self._h0)):
            if self._cp is not None and tuple(keeps[:self._cp[0]]) == self._cp[1]:
                st, lo = self._cp[2][i], self._cp[0]
            else:
                st, lo = self._start_state(i), 0
            st = self._advance(st, keeps, lo, self.layers)
            out.append(next_token_logits(self.model, st.h)[0])
        return torch.stack(out)


@dataclass(frozen=True)
class Metric:
    """The quality a search keeps: 'accuracy' (labels), 'agreement' (top-1 with the unreduced model) or 'kl'
    (mean KL(full || reduced)); `drop` is how far a value is from the unreduced model's, in its own units."""

    name: str

    def value(self, ev: ScheduleEvaluator, logits: torch.Tensor) -> float:
        if self.name == "accuracy":
            return float((logits.argmax(-1) == torch.tensor(ev.answers)).float().mean())
        if self.name == "agreement":
            return float((logits.argmax(-1) == ev.full.argmax(-1)).float().mean())
        lf, lr = torch.log_softmax(ev.full.double(), -1), torch.log_softmax(logits.double(), -1)
        return float((lf.exp() * (lf - lr)).sum(-1).mean())

    def drop(self, baseline: float, v: float) -> float:
        return v - baseline if self.name == "kl" else baseline - v


def calibration_items(spec: str, model, count: int, source_dir: str | None = None, tiles: int = 1
                      ) -> tuple[list, list[int] | None, str]:
    """The search's calibration prompts (evaluation.calibration_items), tokenized with the model directory's
    tokenizer when it has one."""
    from ..evaluation import calibration_items as items_for
    from ..models.family import family_of

    return items_for(spec, family_of(model).prompt_facts(model.config, tiles), count, _tokenizer(source_dir))


def _tokenizer(source_dir: str | None) -> Any:
    if not source_dir or not Path(source_dir).is_dir():
        return None
    if not any((Path(source_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source_dir, local_files_only=True)

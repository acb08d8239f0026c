"""Eager references of FastV and G-Prune, written from docs/methods.md (batch 1)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .blocks import (
    PROTECTED,
    add_to_image_rows,
    attention_probs,
    embed_prompt,
    image_features,
    image_segments,
    image_start,
    language_model,
    last_row_attention,
    layer_additions,
    next_token_logits,
    patch_rows_present,
    patches_present,
    pick_rows,
    pre_rope_keys,
    prompt_positions,
    protected_mask,
    protecting,
    renumbered,
    run_layers,
    top_rows_ascending,
    with_protected,
)
from .vision import VisionStage


def kept_rows(s: int, start: int, n: int, kept: torch.Tensor) -> torch.Tensor:
    """Sequence rows left when the image block [start, start + n) keeps its rows `kept` (ascending); also
    noted for the caller's row tracking (KEPT)."""
    note = KEPT.get()
    if note is not None:
        note.append(torch.as_tensor(kept, dtype=torch.long))
    return torch.cat([torch.arange(start), start + kept, torch.arange(start + n, s)])


# While a reduction runs inside _progressive, the block rows it keeps (kept_rows calls) are noted here, so the
# image rows' later additions (DeepStack) follow the tokens that are left.
KEPT: ContextVar[list | None] = ContextVar("kept_rows_noted", default=None)


@contextmanager
def noting_kept() -> Iterator[list]:
    """Inside: the block rows each kept_rows call keeps are appended to the list yielded."""
    note: list = []
    token = KEPT.set(note)
    try:
        yield note
    finally:
        KEPT.reset(token)


def follow(block_ids: torch.Tensor | None, note: list, n: int) -> torch.Tensor | None:
    """The original block rows present after a reduction that noted `note` and left n rows: block_ids composed
    with its one selection, or None when it made none that leaves n rows (a merge, or new tokens)."""
    if block_ids is None or len(note) != 1 or note[0] is None or len(note[0]) != n:
        return None
    return block_ids[note[0]]


def fastv_site(model, keep: int):
    """FastV's reduction before layer K: the top `keep` image tokens by layer K-1's last-row attention,
    ascending, positions kept."""
    def reduce(layer, h_prev, h, pos, start, n):
        scores = last_row_attention(model, layer - 1, h_prev, pos)[0, start:start + n]
        kept = pick_rows(scores, keep)
        rows = kept_rows(h.shape[1], start, n, kept)
        return h[:, rows], pos[..., rows], len(kept)
    return reduce


@torch.no_grad()
def fastv_reference(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, layer: int, keep: int
                    ) -> torch.Tensor:
    """FastV at llm@K: score = head-mean attention of the last token at layer K-1; positions kept."""
    return run_stages(model, input_ids, pixel_values, sites={layer: fastv_site(model, keep)})


def gprune_reference_scores(f: torch.Tensor) -> torch.Tensor:
    """f [N, D] -> s [N], the spec's formula line by line."""
    f = f.float()
    fn = f / f.norm(dim=1, keepdim=True)
    a = fn @ fn.T
    a[a < 0.5] = 0
    a = a / 0.03
    a[a.abs() < 1e-6] = -5000
    p = torch.softmax(a, dim=1)
    deg = torch.count_nonzero(p, dim=1).float()
    w = f.norm(dim=1)
    return (w @ torch.linalg.matrix_power(p, 5)) / deg


@torch.no_grad()
def gprune_reference(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, keep: int,
                     keeps: list[int] | None = None) -> torch.Tensor:
    """G-Prune at the projector: keep top-`keep` projected tokens by s, ascending, positions kept. Where the
    block has parts (LLaVA-NeXT: base and hi-res patches) and `keeps` is given, one graph per part, keeping
    keeps[i] of part i; rows that are not patches are always kept."""
    n_layers = len(language_model(model).layers)
    feats = image_features(model, pixel_values, input_ids.shape[0])
    h = embed_prompt(model, input_ids, feats)
    s, n, start = h.shape[1], feats.shape[1], image_start(model, input_ids)
    mask = protected_mask(model, n)
    segments = image_segments(model) if keeps is not None else None
    if mask is None:
        kept = top_rows_ascending(gprune_reference_scores(feats[0]), keep)
    else:
        from .baselines import gprune_stage

        patches = (~mask).nonzero().flatten()
        picked = gprune_stage(keep, segments, keeps)(feats[0][patches])[2]
        kept = torch.sort(torch.cat([patches[picked], mask.nonzero().flatten()])).values
    rows = kept_rows(s, start, n, kept)
    pos = prompt_positions(model, input_ids)[..., rows]
    return next_token_logits(model, run_layers(model, h[:, rows], pos, range(n_layers)))


def projector_stage_rows(first, feats: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, start: int
                         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Apply a projector stage `first(feats [N, D]) -> (block [n, D], policy, kept)` to a prompt's embeddings:
    -> (h with the image block replaced, positions under the stage's policy, n). Where the block holds
    protected rows (PROTECTED), the stage selects among the patches only and the protected rows stay."""
    n_full = feats.shape[0]
    if PROTECTED.get() is None:
        block, policy, kept = first(feats)
        note = KEPT.get()
        if note is not None and not torch.equal(block, feats[kept]):
            note.append(None)  # new rows (Pool): not the original rows `kept`
    else:
        patches = patch_rows_present(n_full)
        part, policy, picked = first(feats[patches])
        assert torch.equal(part, feats[patches][picked]), "a merging stage on a block with protected rows"
        kept = with_protected(patches[picked])
        block = feats[kept]
    rows = kept_rows(h.shape[1], start, n_full, kept)
    h = torch.cat([h[:, :start], block[None].to(h.dtype), h[:, start + n_full:]], dim=1)
    pos = renumbered(pos, rows) if policy == "renumber" else pos[..., rows]
    return h, pos, block.shape[0]


def first_stage_rows(first, model, pixel_values: torch.Tensor, feats: torch.Tensor, h: torch.Tensor,
                     pos: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first stage of a stacked reduction or a search, before layer 0: a projector stage on the image
    features `feats` [N, D] (projector_stage_rows), or a VisionStage, whose rows from the pixels replace the
    block, every position renumbered (vision-site methods). -> (h, positions, n)."""
    if isinstance(first, VisionStage):  # as a projector stage whose rows are all new: kept = 0..n-1, renumbered
        block = first(model, pixel_values)
        first = lambda _feats: (block, "renumber", torch.arange(block.shape[0]))  # noqa: E731
    return projector_stage_rows(first, feats, h, pos, start)


def _progressive(model, input_ids, pixel_values, sites, reduce, first=None) -> torch.Tensor:
    """Run the decoder layer by layer; before each site layer l, `reduce(l, h_in_prev, h, pos, start, n)`
    returns the new (h, pos, n) from h (entering layer l) and h_in_prev (what entered layer l-1).
    `first` replaces the image block before layer 0: a projector stage `first(feats [N, D]) -> (block [n, D],
    positions 'keep' or 'renumber', kept)`, or a VisionStage (first_stage_rows)."""
    n_layers = len(language_model(model).layers)
    feats = image_features(model, pixel_values, input_ids.shape[0])
    h = embed_prompt(model, input_ids, feats)
    start, n = image_start(model, input_ids), feats.shape[1]
    pos = prompt_positions(model, input_ids)
    adds = layer_additions(model, pixel_values, input_ids.shape[0])
    ids: torch.Tensor | None = torch.arange(n)  # the original block rows present, in order (None: not rows)
    with protecting(protected_mask(model, n)):
        if first is not None:
            with noting_kept() as note:
                h, pos, n = first_stage_rows(first, model, pixel_values, feats[0], h, pos, start)
            ids = follow(None if isinstance(first, VisionStage) else ids, note, n)
        h_prev = h
        for layer in range(n_layers):
            if layer in sites:
                with noting_kept() as note:
                    h, pos, n = reduce(layer, h_prev, h, pos, start, n)
                ids = follow(ids, note, n)
            h_prev = h
            h = run_layers(model, h, pos, range(layer, layer + 1))
            if layer in adds:
                h = add_to_image_rows(h, start, n, adds[layer], ids)
    return next_token_logits(model, h)


def pyramiddrop_sites(model, n_layers: int, keep_ratio: float = 0.5) -> dict:
    """PyramidDrop's sites L/4, L/2, 3L/4: keep int(lambda*I) of the I image tokens present, by layer l-1's
    last-token attention; positions renumbered."""
    def reduce(layer, h_prev, h, pos, start, n):
        scores = last_row_attention(model, layer - 1, h_prev, pos)[0, start:start + n]
        kept = pick_rows(scores, int(keep_ratio * patches_present(n)))
        rows = kept_rows(h.shape[1], start, n, kept)
        return h[:, rows], renumbered(pos, rows), len(kept)
    return dict.fromkeys(sorted({n_layers // 4, n_layers // 2, 3 * n_layers // 4} - {0}), reduce)


@torch.no_grad()
def pyramiddrop_reference(model, input_ids, pixel_values, keep_ratio: float = 0.5) -> torch.Tensor:
    """Sites L/4, L/2, 3L/4: keep int(lambda*I) by layer l-1's last-token attention; positions renumbered."""
    n_layers = len(language_model(model).layers)
    return run_stages(model, input_ids, pixel_values, sites=pyramiddrop_sites(model, n_layers, keep_ratio))


@torch.no_grad()
def vtw_reference(model, input_ids, pixel_values, layer: int) -> torch.Tensor:
    """All image tokens withdrawn before layer K; the text keeps its positions."""

    def reduce(_, h_prev, h, pos, start, n):
        kept = pick_rows(torch.zeros(n), 0)
        rows = kept_rows(h.shape[1], start, n, kept)
        return h[:, rows], pos[..., rows], len(kept)

    return _progressive(model, input_ids, pixel_values, {layer}, reduce)


@torch.no_grad()
def pumer_reference(model, input_ids, pixel_values, prune_ratio: float = 0.1, merge_ratio: float = 0.3
                    ) -> torch.Tensor:
    """PuMer's decoder port (spec): prune by suffix-text attention, then ToMe bipartite merging."""
    n_layers = len(language_model(model).layers)
    sites = {round(2 * n_layers / 12), round(5 * n_layers / 12), round(8 * n_layers / 12)} - {0}

    def reduce(layer, h_prev, h, pos, start, n):
        rows_p = patch_rows_present(n)  # block rows of the patches
        n_p = len(rows_p)
        probs = attention_probs(model, layer - 1, h_prev, pos)[0]  # [S, S]
        scores = probs[start + n:, start + rows_p].mean(dim=0)
        n_prune = round(prune_ratio * n_p)
        kept = top_rows_ascending(scores, n_p - n_prune).tolist()  # patch-relative
        n_merge = min(round(merge_ratio * n_p), len(kept) // 2)
        keys = pre_rope_keys(model, layer - 1, h_prev)[0, start + rows_p]
        keys = keys / keys.norm(dim=-1, keepdim=True)
        a, b = kept[0::2], kept[1::2]
        best = []
        for i in a:
            sims = torch.stack([keys[i] @ keys[j] for j in b])
            j = int(torch.argmax(sims))  # first maximum
            best.append((float(sims[j]), b[j]))
        order = sorted(range(len(a)), key=lambda t: (-best[t][0], t))
        merged = {a[t]: best[t][1] for t in order[:n_merge]}
        block = h[0, start:start + n]
        out = {}  # block row -> its new hidden state (a protected row stays itself)
        for tok in sorted(set(kept) - set(merged)):
            members = [tok] + [x for x, dst in merged.items() if dst == tok]
            out[int(rows_p[tok])] = torch.stack([block[rows_p[m]] for m in members]).mean(dim=0)
        order_rows = with_protected(torch.tensor(sorted(out), dtype=torch.long)).tolist()
        out = {r: out[r] if r in out else block[r] for r in order_rows}
        new_h = torch.cat([h[:, :start], torch.stack([out[r] for r in order_rows])[None], h[:, start + n:]], dim=1)
        out_pos = [pos[..., start + r] for r in order_rows]
        new_pos = torch.cat([pos[..., :start], torch.stack(out_pos, dim=-1), pos[..., start + n:]], dim=-1)
        return new_h, new_pos, len(order_rows)

    return _progressive(model, input_ids, pixel_values, sites, reduce)


def suffix_scores(model, layer: int, h_prev: torch.Tensor, pos: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Head-mean attention of layer `layer` from every suffix-text row to each image token, row-mean: [n]."""
    probs = attention_probs(model, layer, h_prev, pos)[0]
    return probs[start + n:, start:start + n].mean(dim=0)


def schedule_sites(model, keeps: list[int]) -> dict:
    """A keep schedule's sites: before layer l where the count drops, the top n_l patches still present by layer
    l-1's suffix-text attention, plus every protected row (ascending, positions kept; 0 withdraws every patch)."""
    def reduce(layer, h_prev, h, pos, start, n):
        kept = pick_rows(suffix_scores(model, layer - 1, h_prev, pos, start, n), keeps[layer])
        rows = kept_rows(h.shape[1], start, n, kept)
        return h[:, rows], pos[..., rows], len(kept)
    return {layer: reduce for layer in range(1, len(keeps)) if keeps[layer] < keeps[layer - 1]}


@torch.no_grad()
def schedule_reference(model, input_ids, pixel_values, keeps: list[int]) -> torch.Tensor:
    """A keep schedule n_0..n_{L-1}: before layer l, keep the top n_l image tokens still present by layer
    l-1's suffix-text attention (ascending, positions kept); n_l = 0 withdraws them all."""
    return run_stages(model, input_ids, pixel_values, sites=schedule_sites(model, keeps))


def run_stages(model, input_ids, pixel_values, first=None, sites: dict | None = None) -> torch.Tensor:
    """A projector or vision stage, then LLM sites {layer: reduce}: every progressive reference, and the composition a
    stacked engine must equal."""
    sites = sites or {}
    return torch.no_grad()(_progressive)(model, input_ids, pixel_values, set(sites),
                                         lambda layer, *a: sites[layer](layer, *a), first)

"""Fixed-size building blocks shared by methods and passes: selection, index maps and gathers.

Every function here uses only ops with static output sizes given the input sizes (arange, gather,
top-k with a Python-int k, matmul, where), so the engines keep no data-dependent shape.
"""

from __future__ import annotations

import torch


def first_image_row(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """input_ids [B, S] int64 -> [B] int64: the row where the (contiguous) image block starts."""
    # ArgMax over a float 0/1 vector: ties go to the lowest index, i.e. the first placeholder.
    return (input_ids == image_token_id).to(torch.float32).argmax(dim=1)


def take_image_block(x: torch.Tensor, image_start: torch.Tensor, n_image: int) -> torch.Tensor:
    """x [B, S, D], image_start [B] -> [B, N, D]: the rows of the image block."""
    rows = image_start[:, None] + torch.arange(n_image, device=x.device)[None, :]
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


def merge_image_block(text_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor,
                      image_token_id: int, n_image: int) -> torch.Tensor:
    """Fixed-size stand-in for masked_scatter of a contiguous image block.

    text_embeds [B, S, D], input_ids [B, S], image_features [B*N, D] -> [B, S, D]
    """
    b, s, d = text_embeds.shape
    feats = image_features.reshape(b, n_image, d).to(text_embeds.dtype)
    start = first_image_row(input_ids, image_token_id)
    rel = torch.arange(s, device=input_ids.device)[None, :] - start[:, None]
    inside = (rel >= 0) & (rel < n_image)
    rows = rel.clamp(0, n_image - 1)
    gathered = feats.gather(1, rows[..., None].expand(b, s, d))
    return torch.where(inside[..., None], gathered, text_embeds)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean attention mask (True = may attend), any shape -> the same shape in `dtype`: 0 where True, the
    dtype's lowest finite value where False (softmax then gives those keys exactly 0)."""
    return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype)


def topk_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, N] -> [B, k] int64: indices of the k highest scores, sorted by index."""
    top = torch.topk(scores, k, dim=-1, largest=True, sorted=False).indices
    return torch.sort(top, dim=-1).values


def topk_descending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, N] -> [B, k] int64: indices of the k highest scores, highest first."""
    return torch.topk(scores, k, dim=-1, largest=True, sorted=True).indices


def top_members(scores: torch.Tensor, m: int) -> torch.Tensor:
    """scores [..., N] -> bool [..., N]: True at the m highest scores of each row, ties to the lower index.

    A membership mask instead of a one-hot of top-k's indices: every op here is [..., N], where a one-hot is
    [..., m, N]. The m-th highest value is the same whatever a runtime's top-k does with ties; the entries tied
    at that value are then taken lowest index first, so the set does not depend on the runtime either."""
    kth = torch.topk(scores, m, dim=-1).values[..., -1:]
    above = scores > kth
    tied = scores == kth
    room = m - above.sum(dim=-1, keepdim=True)
    return above | (tied & (torch.cumsum(tied.to(torch.int32), dim=-1) <= room))


def sequence_index(image_start: torch.Tensor, kept: torch.Tensor, seq_len: int, n_image: int) -> torch.Tensor:
    """Map each row of the reduced sequence to a row of the full one.

    image_start [B], kept [B, k] (image-relative indices, in output order), seq_len S (may be symbolic)
    -> [B, S - N + k] int64. Rows before the block map to themselves, block rows to image_start +
    kept, rows after the block shift by N - k.
    """
    k = kept.shape[1]
    if k == 0:
        return drop_block_index(image_start, seq_len, n_image)
    j = torch.arange(seq_len - n_image + k, device=kept.device)[None, :]
    rel = j - image_start[:, None]
    in_block = (rel >= 0) & (rel < k)
    from_block = image_start[:, None] + kept.gather(1, rel.clamp(0, k - 1))
    after = torch.where(rel >= k, j + (n_image - k), j)
    return torch.where(in_block, from_block, after)


def gather_dim(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """x [B or 1, ..., S (at dim), ...], index [B, S'] -> x with dim `dim` replaced by S'.

    A size-1 batch in x broadcasts against index's batch.
    """
    b = index.shape[0]
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0] = b
    shape[dim] = index.shape[1]
    idx = index.reshape(shape)
    sizes = list(x.shape)
    sizes[dim] = index.shape[1]
    return x.gather(dim, idx.expand(sizes))


def gather_seq_dims(x: torch.Tensor, index: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Gather every sequence dim of a side tensor (rotary tables: one dim; masks: rows and columns)."""
    for d in dims:
        x = gather_dim(x, index, d)
    return x


def renumbered_index(index: torch.Tensor) -> torch.Tensor:
    """index [B, S'] -> [B, S'] = 0..S'-1: positions of a sequence renumbered as if it were shorter."""
    return torch.arange(index.shape[1], device=index.device)[None, :].expand(index.shape[0], -1)


def head_mean_attention_rows(q_rows: torch.Tensor, k: torch.Tensor, scale: float,
                             mask_rows: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of selected query rows, averaged over heads, in float32.

    q_rows [B, H, r, d], k [B, H, S, d] (GQA already expanded), mask_rows [B|1, 1|H, r, S] bool
    (True = may attend) or additive float, or None -> [B, r, S]. A row with no allowed key (a left-padding
    row of a padded batch) comes out uniform instead of NaN, so a mean over rows that gives it no weight
    stays finite.
    """
    logits = torch.matmul(q_rows.float(), k.float().transpose(-1, -2)) * scale
    if mask_rows is not None:
        if mask_rows.dtype == torch.bool:
            logits = logits.masked_fill(~mask_rows, torch.finfo(torch.float32).min)
        else:
            logits = logits + mask_rows.float()
    return torch.softmax(logits, dim=-1).mean(dim=1)


def drop_block_index(image_start: torch.Tensor, seq_len: int, n_image: int) -> torch.Tensor:
    """The index map when every image token goes: image_start [B] -> [B, S - N]."""
    j = torch.arange(seq_len - n_image, device=image_start.device)[None, :]
    return torch.where(j >= image_start[:, None], j + n_image, j)


def apply_image_mix(reduced: torch.Tensor, full: torch.Tensor, image_start: torch.Tensor,
                    mix: torch.Tensor, n_image: int) -> torch.Tensor:
    """Overwrite the image block of a reduced sequence with mixtures of the full block's rows.

    reduced [B, S', D] (its image block: k rows at image_start), full [B, S, D] (N image rows),
    mix [B, k, N] (row weights) -> [B, S', D]. Merging as a fixed-size matmul, no scatter.
    """
    block = torch.matmul(mix.to(full.dtype), take_image_block(full, image_start, n_image))  # [B, k, D]
    return write_image_block(reduced, image_start, block)


def write_image_block(reduced: torch.Tensor, image_start: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """reduced [B, S', D] with a k-row image block at image_start, rows [B, k, D] -> the block replaced."""
    k = rows.shape[1]
    rel = torch.arange(reduced.shape[1], device=reduced.device)[None, :] - image_start[:, None]
    inside = (rel >= 0) & (rel < k)
    picked = rows.to(reduced.dtype).gather(1, rel.clamp(0, k - 1)[..., None].expand(-1, -1, reduced.shape[-1]))
    return torch.where(inside[..., None], picked, reduced)


def image_block_rows(x: torch.Tensor, image_start: torch.Tensor, n_image: int) -> torch.Tensor:
    """x [B, S, D], image_start [B] -> [B*N, D]: `x[input_ids == image_token_id]` for a contiguous block."""
    return take_image_block(x, image_start, n_image).reshape(-1, x.shape[-1])


def put_image_block_rows(x: torch.Tensor, image_start: torch.Tensor, rows: torch.Tensor, n_image: int
                         ) -> torch.Tensor:
    """x [B, S, D], rows [B*N, D] -> x with its image block replaced: `x[input_ids == image_token_id] = rows`
    for a contiguous block, out of place."""
    return write_image_block(x, image_start, rows.reshape(x.shape[0], n_image, x.shape[-1]))


def image_rows_addend(rows: torch.Tensor, image_start: torch.Tensor, input_ids: torch.Tensor, n_image: int
                      ) -> torch.Tensor:
    """rows [B*N, D], image_start [B], input_ids [B, S] -> [B, S, D]: the rows on the image block, zero elsewhere.
    `x + image_rows_addend(rows, ...)` is `put_image_block_rows(x, s, image_block_rows(x, s) + rows)` for x
    [B, S, D] (out of place), as a tensor with a sequence dimension that does not depend on x."""
    b, s = input_ids.shape
    return write_image_block(rows.new_zeros(b, s, rows.shape[-1]), image_start, rows.reshape(b, n_image, -1))


def block_order(rows: torch.Tensor) -> torch.Tensor:
    """rows [B, k, D] -> [B, k] = 0..k-1: 'kept' indices for a block whose rows are all new."""
    return torch.arange(rows.shape[1], device=rows.device)[None, :].expand(rows.shape[0], -1)


def suffix_attention_to_image(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                              image_start: torch.Tensor, n_image: int, scale: float) -> torch.Tensor:
    """Head-mean attention of every suffix-text row (rows after the image block) to each image token,
    averaged over those rows. q, k [B, H, S, d] -> [B, N] float32.

    The number of suffix rows depends on the prompt, so all rows are scored and the non-suffix rows
    masked out of the mean: fixed sizes at the price of an S x S score matrix.
    """
    probs = head_mean_attention_rows(q, k, scale, mask)  # [B, S, S]
    rows = torch.arange(q.shape[2], device=q.device)[None, :] >= (image_start + n_image)[:, None]
    w = rows.to(torch.float32)
    mean = (probs * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True)  # [B, S]
    return take_image_block(mean[..., None], image_start, n_image)[..., 0]


# --- rows of the image block that every method keeps (LLaVA-NeXT's row ends), fixed-size -------------------
def constant_rows(image_start: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """[B] -> [B, p] int64: the same image-relative rows for every prompt."""
    r = torch.tensor(rows, dtype=torch.int64, device=image_start.device)
    return r[None, :].expand(image_start.shape[0], -1)


def rows_after_selection(rows: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """rows [B, p] (image-relative, all of them in kept), kept [B, k] ascending -> [B, p]: where each row sits
    in the block that the selection leaves."""
    return (kept[:, None, :] < rows[:, :, None]).sum(dim=-1)


def patch_rows(rows: torch.Tensor, n_image: int) -> torch.Tensor:
    """rows [B, p] -> [B, n - p] int64: the other image-relative rows of an n-row block, ascending."""
    pos = torch.arange(n_image, device=rows.device)
    protected = (pos[None, :, None] == rows[:, None, :]).any(dim=-1)  # [B, n]
    key = pos[None, :] + protected.to(torch.int64) * n_image
    return torch.sort(key, dim=-1).indices[:, :n_image - rows.shape[1]]


def view_order(rows: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """The block order of a selector's view: the kept rows first (the selector sees them before its image
    block, like text), then the patches. [B, p], [B, n-p] -> [B, n]."""
    return torch.cat([rows, patches], dim=1)


def shift_rows(image_start: torch.Tensor, p: int) -> torch.Tensor:
    """image_start [B] -> [B]: the first patch row of the view."""
    return image_start + p


def patch_features(image_features: torch.Tensor, patches: torch.Tensor, batch: int, n_image: int) -> torch.Tensor:
    """image_features [B*N, D], patches [B, N-p] -> [B*(N-p), D]: the projector rows of the patches only."""
    f = image_features.reshape(batch, n_image, image_features.shape[-1])
    return gather_dim(f, patches, 1).reshape(-1, image_features.shape[-1])


def with_rows(kept: torch.Tensor, patches: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A selection among the patches (kept [B, k], patch-relative) -> block rows [B, k + p] ascending, the
    protected rows included."""
    return torch.sort(torch.cat([patches.gather(1, kept), rows], dim=1), dim=-1).values


def with_rows_merged(kept: torch.Tensor, mix: torch.Tensor, patches: torch.Tensor, rows: torch.Tensor,
                     n_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A merge among the patches (kept [B, k], mix [B, k, n-p] over the patches) -> (kept [B, k+p] block rows
    ascending, mix [B, k+p, n] over the block): each protected row stays itself."""
    pos = torch.arange(n_image, device=kept.device)
    onehot_patches = (patches[:, :, None] == pos[None, None, :]).to(mix.dtype)  # [B, n-p, n]
    onehot_rows = (rows[:, :, None] == pos[None, None, :]).to(mix.dtype)  # [B, p, n]
    full = torch.cat([patches.gather(1, kept), rows], dim=1)
    mixes = torch.cat([torch.matmul(mix, onehot_patches), onehot_rows], dim=1)
    order = torch.sort(full, dim=-1).indices
    return full.gather(1, order), mixes.gather(1, order[..., None].expand(-1, -1, n_image))

"""Train the shipped demo model (a small LlavaForConditionalGeneration) on vqa-synth; not part of CI.

The shipped model's recipe, one command per stage (stage 2 was actually run as 200 steps without the guide,
then 500 with it from that checkpoint; models/vqa-synth-llava/README.md has the exact commands and numbers):

    python training/pretrain_vision.py --minutes 9 --out build/vision-pretrain.pt      # stage 1
    python training/train_vqa_synth.py --vision-init build/vision-pretrain.pt --freeze-vision \
        --guide-layer 3 --guide-weight 0.3 --out models/vqa-synth-llava --minutes 40     # stage 2

Seeded; every batch is fresh train-split samples (index = step * batch + i), so nothing repeats. Each
training prompt asks every question kind about its image (the first exactly in the benchmark's format, the
others as follow-up turns) and the loss is the cross-entropy of each one-word answer (prompts are
right-padded; causal attention means padding never reaches a real token). Evaluation uses the benchmark's
single-question prompts. Every --eval-every steps it measures val accuracy per
question class and keeps the best checkpoint; the test split is only read once, at the end, for the card.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vtrcompile.datasets import vqa_synth as vs  # noqa: E402


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {w: i for i, w in enumerate(vs.vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", extra_special_tokens={"image_token": vs.IMAGE_TOKEN})


def vision_config(width: int, layers: int) -> CLIPVisionConfig:
    """The demo model's CLIP-style tower on vqa-synth's geometry (also what pretrain_vision.py trains)."""
    return CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=4, image_size=vs.SIZE, patch_size=vs.PATCH, projection_dim=width)


def lr_at(base: float, steps_done: int, warmup: int, frac: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 5% over the wall-clock budget (`frac` of it
    spent): the step count is unknown in advance on a CPU."""
    return base * min(1.0, (steps_done + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def make_config(args) -> LlavaConfig:
    vocab = vs.vocabulary()
    cfg = LlavaConfig(
        vision_config=vision_config(args.vision_width, args.vision_layers),
        text_config=LlamaConfig(hidden_size=args.width, intermediate_size=int(args.width * 8 / 3) // 8 * 8,
                                num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                vocab_size=len(vocab), max_position_embeddings=1024, pad_token_id=0,
                                bos_token_id=2, eos_token_id=2),
        image_token_id=vocab.index(vs.IMAGE_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return cfg


def batch(split: str, start: int, size: int, vocab: list[str]):
    ss = vs.samples(split, size, start)
    ids = [vs.encode(s.prompt, vocab) for s in ss]
    s_max = max(len(i) for i in ids)
    padded = np.zeros((size, s_max), dtype=np.int64)
    for r, i in enumerate(ids):
        padded[r, :len(i)] = i
    px = vs.pixel_values(np.stack([vs.render(s.scene) for s in ss]))
    answers = torch.tensor([vocab.index(s.answer) for s in ss])
    lengths = torch.tensor([len(i) for i in ids])
    return torch.from_numpy(padded), torch.from_numpy(px), answers, lengths, ss


# (digit box patches, dot block patches, big-shape side range): large first, then the benchmark's sizes.
CURRICULUM = [(8, 3, (56, 97)), (6, 2, (72, 121)), (4, 2, (96, 145)), (3, 1, (112, 169)), (2, 1, (112, 169))]


def curriculum_sizes(step: int, start: int, steps: int) -> tuple[int, int, tuple[int, int]]:
    """Equal shares of the curriculum's steps per stage; the benchmark's sizes after it."""
    if steps <= 0 or step - start >= steps:
        return 2, 1, (112, 169)
    return CURRICULUM[len(CURRICULUM) * (step - start) // steps]


def multi_qa_batch(start: int, size: int, vocab: list[str], box_patches: int = 2, dot_patches: int = 1,
                   shape_sides: tuple[int, int] = (112, 169)):
    """Training prompts with every question kind about one image: the sample's own question first, in exactly
    the benchmark's format (so answer 1 sees what an eval prompt shows), then the other six as follow-up
    turns ("user : <question> assistant : <answer>"). Each answer is supervised: 7 targets per 600-token
    sequence instead of 1, for about 15% more compute."""
    index = {w: i for i, w in enumerate(vocab)}
    seqs, targets, pixels, salient, where = [], [], [], [], []
    for j in range(start, start + size):
        smp = vs.sample("train", j, box_patches, dot_patches, shape_sides)
        words = list(smp.prompt)
        pos = [len(words) - 1]
        words.append(smp.answer)
        kinds = [smp.kind]
        rng = np.random.default_rng([7, j])
        others = [q for q in vs.QUESTIONS if q[0] != smp.kind]
        for k in rng.permutation(len(others)):
            kind, _, question = others[int(k)]
            words += ["user", ":"] + question.split() + ["assistant", ":"]
            pos.append(len(words) - 1)
            kinds.append(kind)
            words.append(smp.scene.answer(kind))
        seqs.append([index[w] for w in words])
        targets.append([(p, index[words[p + 1]]) for p in pos])
        pixels.append(vs.render(smp.scene))
        sc = smp.scene
        (br, bc), k = sc.digit_cell, sc.box_patches
        box = [(br + a) * vs.GRID + bc + b for a in range(k) for b in range(k)]
        dots = [r * vs.GRID + c for r, c in sc.dot_cells]
        salient.append(box + dots)
        first = words.index(vs.IMAGE_TOKEN)
        where.append([[first + i for i in (box if kd == "digit" else dots)] if vs.KINDS[kd] == "fine" else []
                      for kd in kinds])
    s_max = max(len(x) for x in seqs)
    ids = np.zeros((size, s_max), dtype=np.int64)
    for r, x in enumerate(seqs):
        ids[r, :len(x)] = x
    rows = torch.tensor([r for r, t in enumerate(targets) for _ in t])
    cols = torch.tensor([p for t in targets for p, _ in t])
    answers = torch.tensor([a for t in targets for _, a in t])
    # Per supervised answer (same order as rows/cols): the sequence positions of the patches a fine question
    # is about (digit box or dots), empty for coarse questions.
    look = [w for per_row in where for w in per_row]
    return (torch.from_numpy(ids), torch.from_numpy(vs.pixel_values(np.stack(pixels))), rows, cols, answers,
            salient, look)


class AttentionGuide:
    """Training-only auxiliary loss: one head of one LLM layer, at the answer position of a fine-grained
    question, is pulled towards the patches the question is about (cross-entropy of that head's attention
    against a uniform target over the digit box's or the dots' positions). From scratch, the query/key
    projections start near zero, so selective attention to 1-4 of 576 tokens gets almost no gradient; this
    gives one head a direct one. Every other head, and every coarse answer, is untouched."""

    def __init__(self, model, layer: int, head: int):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.rope = apply_rotary_pos_emb
        self.attn = model.model.language_model.layers[layer].self_attn
        self.head = head
        self.captured: tuple | None = None
        self.attn.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        self.captured = (hs, kwargs["position_embeddings"])

    def loss(self, rows: torch.Tensor, cols: torch.Tensor, look: list[list[int]]) -> torch.Tensor:
        hs, (cos, sin) = self.captured
        a, h = self.attn, self.head
        shape = (*hs.shape[:-1], -1, a.head_dim)
        q = a.q_proj(hs).view(shape).transpose(1, 2)[:, h:h + 1]
        k = a.k_proj(hs).view(shape).transpose(1, 2)[:, h:h + 1]
        q, k = self.rope(q, k, cos, sin)
        sel = [i for i, w in enumerate(look) if w]
        if not sel:
            return hs.new_zeros(())
        r, c = rows[sel], cols[sel]
        logits = torch.einsum("nd,nsd->ns", q[r, 0, c], k[r, 0]) * a.scaling
        future = torch.arange(hs.shape[1], device=hs.device)[None] > c[:, None]
        logp = torch.log_softmax(logits.masked_fill(future, float("-inf")), -1)
        return torch.stack([-logp[j, look[i]].mean() for j, i in enumerate(sel)]).mean()


def fewer_distractors_forward(model, ids, px, rows, cols, keep: int, salient, gen: torch.Generator):
    """Training-only curriculum: the LLM sees `keep` of the 576 image tokens per prompt, always including the
    digit box's and the dots' patches plus a random sample of the others, at their original positions
    (position ids unchanged). With fewer distractors the answer's attention to the few fine-grained patches
    gets a usable gradient early; the curriculum raises `keep` to all 576 and the rest of training is the
    benchmark's full prompt. Returns the logits at the answer positions."""
    inner = model.model
    n = vs.GRID * vs.GRID
    feats = inner.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = inner.multi_modal_projector(feats)
    emb = inner.get_input_embeddings()(ids)
    is_img = ids == model.config.image_token_id
    emb = emb.masked_scatter(is_img[..., None], feats.to(emb.dtype))
    starts = is_img.int().argmax(1)
    index = []
    for b in range(ids.shape[0]):
        fine = set(salient[b])
        others = torch.tensor([i for i in range(n) if i not in fine])
        pick = others[torch.randperm(len(others), generator=gen)[:keep - len(salient[b])]]
        kept = torch.sort(torch.cat([torch.tensor(salient[b]), pick])).values + starts[b]
        s0 = int(starts[b])
        index.append(torch.cat([torch.arange(s0), kept, torch.arange(s0 + n, ids.shape[1])]))
    index = torch.stack(index).to(ids.device)
    emb = torch.gather(emb, 1, index[..., None].expand(-1, -1, emb.shape[-1]))
    h = inner.language_model(inputs_embeds=emb, position_ids=index, use_cache=False).last_hidden_state
    return model.lm_head(h[rows, cols - (n - keep)])


def curriculum_keep(frac: float, until: float) -> int:
    """Image tokens kept at this fraction of the wall-clock budget: 36 -> 576 linearly until `until`, then 576."""
    n = vs.GRID * vs.GRID
    if until <= 0 or frac >= until:
        return n
    return int(36 + (n - 36) * frac / until)


def last_logits(model, ids, px, lengths):
    h = model.model(input_ids=ids, pixel_values=px, use_cache=False).last_hidden_state
    last = h[torch.arange(h.shape[0]), lengths - 1]
    return model.lm_head(last)


@torch.no_grad()
def accuracy(model, split: str, count: int, vocab: list[str], bs: int = 32) -> dict:
    model.eval()
    right: dict[str, list[int]] = {}
    for start in range(0, count, bs):
        ids, px, ans, lengths, ss = batch(split, start, min(bs, count - start), vocab)
        pred = last_logits(model, ids, px, lengths).argmax(-1)
        for s, p, a in zip(ss, pred.tolist(), ans.tolist(), strict=True):
            right.setdefault(s.kind, []).append(int(p == a))
    model.train()
    out = {k: float(np.mean(v)) for k, v in right.items()}
    for cls in ("coarse", "fine"):
        vals = [x for k, v in right.items() if vs.KINDS[k] == cls for x in v]
        out[cls] = float(np.mean(vals))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "models" / "vqa-synth-llava"))
    ap.add_argument("--minutes", type=float, default=75)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vision-width", type=int, default=64)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-count", type=int, default=420)
    ap.add_argument("--test-count", type=int, default=2100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, help="continue from this checkpoint directory (same config)")
    ap.add_argument("--start-step", type=int, default=0, help="with --init: steps already taken (new data)")
    ap.add_argument("--curriculum", type=int, default=0,
                    help="steps of larger digit boxes and dots (CURRICULUM stages) before the benchmark's sizes")
    ap.add_argument("--vision-init", default=None,
                    help="a vision tower pretrained by training/pretrain_vision.py (stage 1)")
    ap.add_argument("--freeze-vision", action="store_true", help="keep the vision tower fixed (stage 2)")
    ap.add_argument("--fewer-distractors", type=float, default=0.0,
                    help="fraction of the budget over which the LLM's image tokens grow from 36 (fine-grained "
                         "patches always included) to all 576; 0 = always all")
    ap.add_argument("--guide-layer", type=int, default=-1,
                    help="LLM layer of the attention guide (AttentionGuide); -1 = no guide")
    ap.add_argument("--guide-head", type=int, default=0)
    ap.add_argument("--guide-weight", type=float, default=0.2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = vs.vocabulary()
    cfg = make_config(args)
    if args.init:
        model = LlavaForConditionalGeneration.from_pretrained(args.init, attn_implementation="sdpa").to(args.device)
        cfg = model.config
    else:
        model = LlavaForConditionalGeneration(cfg).to(args.device)
    if args.vision_init:
        pre = torch.load(args.vision_init, map_location=args.device)
        model.model.vision_tower.load_state_dict(pre["tower"])
        print(f"vision tower from {args.vision_init} ({pre['steps']} pretraining steps)", flush=True)
    model.train()
    if args.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
        model.model.vision_tower.eval()
    guide = AttentionGuide(model, args.guide_layer, args.guide_head) if args.guide_layer >= 0 else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M on {args.device}", flush=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    budget_s = args.minutes * 60
    warmup = 100
    t0 = time.time()
    log: list[dict] = []
    best = -1.0
    out = Path(args.out)
    step = args.start_step
    losses: list[float] = []
    while step < args.max_steps:
        elapsed = time.time() - t0
        if elapsed > budget_s:
            break
        frac = min(elapsed / budget_s, 1.0)
        lr = lr_at(args.lr, step - args.start_step, warmup, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        box, dots, sides = curriculum_sizes(step, args.start_step, args.curriculum)
        ids, px, rows, cols, ans, salient, look = multi_qa_batch(step * args.batch, args.batch, vocab, box, dots, sides)
        keep = curriculum_keep(frac, args.fewer_distractors)
        if keep < vs.GRID * vs.GRID:
            logits = fewer_distractors_forward(model, ids.to(args.device), px.to(args.device), rows.to(args.device),
                                               cols.to(args.device), keep, salient, gen)
        else:
            h = model.model(input_ids=ids.to(args.device), pixel_values=px.to(args.device), use_cache=False)
            logits = model.lm_head(h.last_hidden_state[rows.to(args.device), cols.to(args.device)])
        loss = F.cross_entropy(logits, ans.to(args.device))
        if guide is not None and keep == vs.GRID * vs.GRID:
            loss = loss + args.guide_weight * guide.loss(rows.to(args.device), cols.to(args.device), look)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % args.eval_every == 0:
            acc = accuracy(model.to("cpu") if args.device == "cpu" else model, "val", args.eval_count, vocab)
            rec = {"step": step, "seconds": round(time.time() - t0), "lr": lr, "image_tokens": keep,
                   "loss": float(np.mean(losses[-args.eval_every:])), "val": acc}
            log.append(rec)
            print(json.dumps(rec), flush=True)
            score = acc["coarse"] + acc["fine"]
            if score > best:
                best = score
                model.save_pretrained(out, safe_serialization=True)
    train_s = time.time() - t0
    if best < 0:
        model.save_pretrained(out, safe_serialization=True)
    make_tokenizer().save_pretrained(out)
    final = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="sdpa").eval()
    test = accuracy(final, "test", args.test_count, vocab)
    report = {"args": vars(args), "params": n_params, "steps": step, "train_seconds": round(train_s),
              "samples_seen": step * args.batch, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "test": test, "log": log}
    (out / "training_log.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({"test": test}), flush=True)


if __name__ == "__main__":
    main()

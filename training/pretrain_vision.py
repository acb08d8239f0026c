"""Stage 1 of the demo model's recipe: pretrain its CLIP-style vision tower on dense per-patch labels.

    python training/pretrain_vision.py --out build/vision-pretrain.pt --minutes 8

From scratch, a LLaVA trained only on one-word answers never learned the fine-grained questions on a
2-core CPU: the answer has to attend to 1-4 of 576 image tokens whose features are themselves untrained.
This stage gives the patch features their content first. Every patch of the feature layer LLaVA reads
(`vision_feature_layer` = -2) is supervised with what is *in that patch*:

- region: background, big shape, digit box or dot;
- colour: the background's, the big shape's, white for the box, the dot's colour for a dot patch;
- for big-shape patches, the shape (circle/square/triangle);
- for the box's patches, the digit it shows (the box spans 2 x 2 patches, so the tower must mix them);
- for dot patches, how many dots the image has.

The labels live only on the patches that hold the thing, so the information stays where it is in the image:
dropping the box's tokens still drops the digit, which is what makes the benchmark's fine questions a test
of token reduction. Seeded; fresh train-split scenes every step (index space disjoint from stage 2's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train_vqa_synth import lr_at, vision_config  # noqa: E402  (same folder: the script's sys.path[0])

from vtrcompile.datasets import vqa_synth as vs  # noqa: E402

COLOURS = tuple(vs.RGB)  # 12 colour classes
REGIONS = ("background", "shape", "box", "dot")
IGNORE = -100
INDEX_OFFSET = 10_000_000  # scenes for this stage: train indices far from the ones stage 2 reads


def patch_labels(scene: vs.Scene, img: np.ndarray) -> dict[str, np.ndarray]:
    """Per-patch targets [576] for one scene (row-major patches, LLaVA's order)."""
    g, p = vs.GRID, vs.PATCH
    region = np.zeros((g, g), dtype=np.int64)
    colour = np.full((g, g), COLOURS.index(scene.background), dtype=np.int64)
    shape = np.full((g, g), IGNORE, dtype=np.int64)
    digit = np.full((g, g), IGNORE, dtype=np.int64)
    count = np.full((g, g), IGNORE, dtype=np.int64)
    # Big shape: patches at least 30% covered by its colour.
    is_shape = np.all(img == np.array(vs.RGB[scene.shape_colour], dtype=np.uint8), axis=-1)
    cover = is_shape.reshape(g, p, g, p).mean(axis=(1, 3))
    sm = cover >= 0.3
    region[sm] = 1
    colour[sm] = COLOURS.index(scene.shape_colour)
    shape[sm] = vs.SHAPES.index(scene.shape)
    br, bc = scene.digit_cell
    k = scene.box_patches
    region[br:br + k, bc:bc + k] = 2
    colour[br:br + k, bc:bc + k] = COLOURS.index("white")
    digit[br:br + k, bc:bc + k] = scene.digit
    for r, c in scene.dot_cells:
        region[r, c] = 3
        colour[r, c] = COLOURS.index(scene.dot_colour)
        count[r, c] = len(scene.dot_cells) - 1
    return {"region": region.ravel(), "colour": colour.ravel(), "shape": shape.ravel(),
            "digit": digit.ravel(), "count": count.ravel()}


HEADS = {"region": len(REGIONS), "colour": len(COLOURS), "shape": len(vs.SHAPES), "digit": 10, "count": 4}


def make_batch(start: int, size: int):
    imgs, labels = [], {k: [] for k in HEADS}
    for j in range(start, start + size):
        scene = vs.make_scene(np.random.default_rng([vs.SPLIT_SEEDS["train"], INDEX_OFFSET + j]))
        img = vs.render(scene)
        imgs.append(img)
        for k, v in patch_labels(scene, img).items():
            labels[k].append(v)
    px = torch.from_numpy(vs.pixel_values(np.stack(imgs)))
    return px, {k: torch.from_numpy(np.stack(v)) for k, v in labels.items()}


def features(tower: CLIPVisionModel, px: torch.Tensor) -> torch.Tensor:
    """The patch features LLaVA reads: hidden_states[-2] without CLS."""
    return tower(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]


def losses(tower, heads, px, labels) -> tuple[torch.Tensor, dict[str, float]]:
    f = features(tower, px)
    total, acc = torch.zeros(()), {}
    for k, head in heads.items():
        logits = head(f).flatten(0, 1)
        y = labels[k].flatten()
        mask = y != IGNORE
        if mask.any():
            # Region/colour weight the rare box and dot patches up, so 5 patches in 576 are not ignored.
            if k in ("region", "colour"):
                w = torch.where(labels["region"].flatten() >= 2, 20.0, 1.0)
                total = total + (F.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()
            else:
                total = total + F.cross_entropy(logits[mask], y[mask])
            acc[k] = float((logits[mask].argmax(-1) == y[mask]).float().mean())
    return total, acc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "build" / "vision-pretrain.pt"))
    ap.add_argument("--minutes", type=float, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    cfg = vision_config(args.width, args.layers)
    tower = CLIPVisionModel(cfg)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(args.width, n) for k, n in HEADS.items()})
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    t0, step, log, recent = time.time(), 0, [], []
    budget = args.minutes * 60
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        lr = lr_at(args.lr, step, 50, frac)
        for gr in opt.param_groups:
            gr["lr"] = lr
        px, labels = make_batch(step * args.batch, args.batch)
        loss, acc = losses(tower, heads, px, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent.append({"loss": loss.item(), **acc})
        step += 1
        if step % args.log_every == 0:
            rec = {"step": step, "seconds": round(time.time() - t0),
                   **{k: round(float(np.mean([r[k] for r in recent if k in r])), 3) for k in recent[-1]}}
            log.append(rec)
            recent = []
            print(json.dumps(rec), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "tower": tower.state_dict(), "heads": heads.state_dict(),
                "args": vars(args), "steps": step, "seconds": round(time.time() - t0), "log": log}, out)
    print(f"saved {out} after {step} steps", flush=True)


if __name__ == "__main__":
    main()

"""Calibration folder -> images as pixel tensors (+ optional prompts), for compile-time choices."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import VtrError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
PROMPTS_FILE = "prompts.jsonl"
# CLIP's normalisation (LLaVA-1.5's image processor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CalibrationSet:
    names: list[str]
    pixel_values: torch.Tensor  # [M, 3, H, W], CLIP-normalised
    prompts: list[dict] = field(default_factory=list)  # {"image": name, "prompt": text}


def preprocess(path: Path, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic), centre-crop to size x size, normalise (CLIP's by default)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise VtrError(f"{path}: not a readable image ({type(e).__name__})") from None
    a = (a - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def load_calibration(folder: str | Path, image_size: int) -> CalibrationSet:
    d = Path(folder)
    if not d.is_dir():
        raise VtrError(f"calibration folder not found: {d} (a folder of images, optionally with {PROMPTS_FILE})")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VtrError(f"{d}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the calibration folder")
    prompts: list[dict] = []
    pf = d / PROMPTS_FILE
    if pf.is_file():
        names = {p.name for p in files}
        try:
            text = pf.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise VtrError(f"{pf}: not UTF-8 text (byte {e.start}); write it as UTF-8 JSON lines") from None
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise VtrError(f"{pf}:{i}: not JSON ({e.msg}); each line is "
                               '{"image": "<file name>", "prompt": "<text>"}') from None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(
                    rec.get("prompt"), str):
                raise VtrError(f'{pf}:{i}: needs string fields "image" and "prompt"')
            if rec["image"] not in names:
                raise VtrError(f"{pf}:{i}: image '{rec['image']}' is not in {d}")
            prompts.append(rec)
    log.info("calibration: %d images, %d prompts from %s", len(files), len(prompts), d)
    pixels = torch.stack([preprocess(p, image_size) for p in files])
    return CalibrationSet([p.name for p in files], pixels, prompts)

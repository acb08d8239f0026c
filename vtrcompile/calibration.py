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


@dataclass
class CalibrationSet:
    names: list[str]
    pixel_values: torch.Tensor  # [M * rows, ...], as the model's processor prepares them ([M * tiles, 3, H, W])
    prompts: list[dict] = field(default_factory=list)  # {"image": name, "prompt": text}
    rows: int = 1  # rows of pixel_values per image (tiles, or Qwen-VL's flattened patches)

    def pixels_of(self, k: int) -> torch.Tensor:
        """Image k's pixel_values for one prompt: [rows, ...]."""
        return self.pixel_values[k * self.rows:(k + 1) * self.rows]


def preprocess(path: Path, size, processing: dict | None = None) -> torch.Tensor:
    """An image file -> pixel_values for one prompt, float32, as the family's processor prepares them ([tiles, 3,
    size, size]; Qwen-VL: flattened patches). `size`: the side, or [H, W]. `processing`: {"family", "image_mean",
    "image_std", "tiles", ...} (an engine's processor facts); LLaVA's (CLIP's) by default."""
    from PIL import Image, UnidentifiedImageError

    from .models.family import family_named

    processing = processing or {}
    family = family_named(processing.get("family", "llava"))
    mean = processing.get("image_mean", family.image_mean)
    std = processing.get("image_std", family.image_std)
    try:
        with Image.open(path) as im:
            a = family.preprocess(im.convert("RGB"), size, int(processing.get("tiles", 1)), processing)
    except (UnidentifiedImageError, OSError) as e:
        raise VtrError(f"{path}: not a readable image ({type(e).__name__})") from None
    a = (a - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(family.pack_pixels(a.transpose(0, 3, 1, 2), processing)))


def load_calibration(folder: str | Path, image_size, processing: dict | None = None) -> CalibrationSet:
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
    per_image = [preprocess(p, image_size, processing) for p in files]
    return CalibrationSet([p.name for p in files], torch.cat(per_image), prompts, per_image[0].shape[0])

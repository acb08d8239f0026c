"""An image file and a text prompt -> engine inputs, with the tokenizer an engine carries beside it.

`optimize` copies the model directory's tokenizer files into `tokenizer-<model id>/` next to the engines,
so an engine folder generates text without the original model directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VtrError
from ..lower.atomic import scratch_dir
from ..models.prompt import layout_prompt

log = logging.getLogger(__name__)

CHAT_IMAGE_MARKER = "<image>"  # what chat templates write for an image
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def tokenizer_folder_name(model_id: str) -> str:
    return f"tokenizer-{model_id[:12]}"


def has_tokenizer(model_dir: Path | None) -> bool:
    return model_dir is not None and any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def copy_tokenizer(model_dir: Path, folder: Path, model_id: str) -> Path:
    """Copy the tokenizer files once (atomically: a temporary folder renamed into place)."""
    dest = folder / tokenizer_folder_name(model_id)
    if dest.is_dir():
        return dest
    with scratch_dir(folder, f".{dest.name}.") as tmp:
        for f in TOKENIZER_FILES:
            if (model_dir / f).is_file():
                shutil.copy2(model_dir / f, tmp / f)
        os.replace(tmp, dest)
    return dest


def load_tokenizer(engine_path: Path, meta: dict[str, Any]):
    name = (meta.get("processor") or {}).get("tokenizer")
    if not name or not (engine_path.parent / name).is_dir():
        raise VtrError(f"{engine_path}: its model has no tokenizer (a preset, or a model directory without "
                       "tokenizer files); pass token ids with --ids, e.g. --ids '2,3,image,7' ('image' marks "
                       "where the image tokens go)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(engine_path.parent / name), local_files_only=True)
    except Exception as e:
        raise VtrError(f"{engine_path.parent / name}: the tokenizer files do not load ({type(e).__name__}); "
                       "rebuild the engine with `vtrcompile optimize`") from None


def prompt_ids(tokenizer, meta: dict[str, Any], prompt: str) -> np.ndarray:
    """The prompt through the tokenizer's chat template (else the family's layout), with its one image
    placeholder expanded to the engine's N image tokens: int64 [1, S]."""
    placeholder = tokenizer.convert_ids_to_tokens(meta["image_token_id"])
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        block = meta["processor"].get("chat_image")
        if block and text.count(CHAT_IMAGE_MARKER) == 1:  # the family's processor expands the marker
            text = text.replace(CHAT_IMAGE_MARKER, block.format(image=placeholder))
    else:
        text = meta["processor"]["template"].format(prompt=prompt, image=placeholder)
    ids = list(tokenizer(text, add_special_tokens=getattr(tokenizer, "chat_template", None) is None)["input_ids"])
    image = meta["image_token_id"]
    if ids.count(image) != 1:
        raise VtrError(f"the prompt template gave {ids.count(image)} image placeholders (id {image}); it needs one")
    i = ids.index(image)
    return layout_prompt(ids[:i], ids[i + 1:], meta["n_image"], image)


def parse_ids(text: str, meta: dict[str, Any]) -> np.ndarray:
    """'2,3,image,7' -> int64 [1, S] with 'image' expanded to the N image tokens."""
    toks = text.replace(",", " ").split()
    if toks.count("image") != 1:
        raise VtrError(f"--ids: needs exactly one 'image' (where the N image tokens go), got {toks.count('image')}")
    for tok in toks:
        if tok != "image" and not (tok.isdigit() and int(tok) < meta["vocab"]):
            raise VtrError(f"--ids: '{tok}' is neither a token id below {meta['vocab']} nor 'image'")
    i = toks.index("image")
    return layout_prompt([int(t) for t in toks[:i]], [int(t) for t in toks[i + 1:]], meta["n_image"],
                         meta["image_token_id"])


def batch_prompt(meta: dict[str, Any], images: int, prompts: list[str], tokenizer=None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """The CLI's prompts (texts through `tokenizer`, else --ids strings) for an engine's fixed batch: one per
    image, or one for all of them -> (input_ids int64 [batch, S], attention_mask int64 [batch, S] or None).
    Prompts of different lengths are left-padded to the longest (a batch engine's attention_mask marks the
    padding); a batch-1 engine gets no mask."""
    b = int(meta.get("batch", 1))
    if images != b:
        built = f" (it was built with --batch {b})" if b > 1 else ""
        raise VtrError(f"this engine takes {b} image{'s' if b > 1 else ''} per run{built}; got {images} --image")
    rows = [prompt_ids(tokenizer, meta, t) if tokenizer is not None else parse_ids(t, meta) for t in prompts]
    if len(rows) not in (1, b):
        what = "the image" if b == 1 else f"all {b} images or one per image"
        raise VtrError(f"give one prompt for {what}; got {len(rows)}")
    rows = rows * b if len(rows) == 1 else rows
    if b == 1:
        return rows[0], None
    return left_pad([r[0] for r in rows], pad_id(tokenizer, meta["image_token_id"]))


class TextStream:
    """Generated token ids, one at a time -> the text each one adds, for showing an answer as it is generated.
    The ids so far are decoded whole and what goes past the text given before is returned, held back while it
    ends in an incomplete character (a byte-level token may carry part of one); `rest` gives what is left."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.given = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return "" if text.endswith("\ufffd") else self._past_given(text)

    def rest(self) -> str:
        return self._past_given(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _past_given(self, text: str) -> str:
        if not text.startswith(self.given):
            return ""  # decoding more ids changed text already given, which cannot be taken back
        new, self.given = text[len(self.given):], text
        return new


def pad_id(tokenizer, image_token_id: int) -> int:
    """The id written over padding (masked out, so any id but the image placeholder): the tokenizer's pad token
    when it has one, else 0."""
    tid = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    for candidate in (tid, 0, 1):
        if candidate is not None and int(candidate) != image_token_id:
            return int(candidate)
    raise AssertionError("unreachable: 0 and 1 cannot both be the image placeholder")


def left_pad(rows: list[np.ndarray], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of any lengths -> (ids [B, S], attention_mask [B, S]) left-padded to the longest, as a tokenizer
    with padding_side="left" returns them."""
    s = max(len(r) for r in rows)
    ids = np.full((len(rows), s), pad, dtype=np.int64)
    mask = np.zeros((len(rows), s), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, s - len(r):] = r
        mask[i, s - len(r):] = 1
    return ids, mask


def image_pixels(path: Path, meta: dict[str, Any]) -> np.ndarray:
    """An image file -> float32 [tiles, 3, H, W] as the model's processor prepares it (recorded in the engine)."""
    from ..calibration import preprocess

    if not path.is_file():
        raise VtrError(f"image not found: {path}")
    p = meta["processor"]
    if p is None:
        raise VtrError("this engine records no image preprocessing (it was built from an exported program); "
                       "pass pixel values through the Python API (vtrcompile.load_engine) instead")
    return preprocess(path, p["image_size"], {**p, "tiles": meta.get("tiles", 1)}).numpy()

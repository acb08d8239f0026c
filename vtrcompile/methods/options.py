"""User options -> the options a method plans with: checks that need no model, then what needs one
(PruMerge's --keep auto from calibration images, a schedule file checked against the model)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import VtrError
from .registry import THEN, resolve, stage_text, stages, validate

log = logging.getLogger(__name__)


def check_options(method: str, given: dict[str, Any], calibration: Path | None) -> None:
    """Everything that can be refused before the model is loaded (one line each)."""
    keep = given.get("keep")
    if keep == "auto":
        if method != "prumerge":
            raise VtrError(f"--keep auto is PruMerge's adaptive count; {method} takes a number")
        if calibration is None:
            raise VtrError("--keep auto needs --calibration DIR (a folder of images, see the README)")
    elif calibration is not None:
        raise VtrError("--calibration is only used with --keep auto")
    validate(method, given)  # unknown methods/options, bad counts and intervals
    parts = stages(method, given)
    for i, (m, g) in enumerate(parts):
        if m == "schedule" and g.get("schedule"):
            from ..search.schedule_file import load_schedule

            rec = load_schedule(g["schedule"])  # a bad file fails before loading the model
            first = stage_text(parts[0][0], validate(*parts[0])) if i == 1 else None
            if rec.get("first") != first:
                raise VtrError(
                    f"{g['schedule']}: searched after the first stage '{rec['first']}'; compile it with --method "
                    f"{rec['first'].split()[0]} ... --then \"schedule schedule={g['schedule']}\" and the same options"
                    if rec.get("first") else
                    f"{g['schedule']}: searched without a first stage; search again with --first \"{first}\"")


def prepare_options(src, method: str, given: dict[str, Any], calibration: Path | None) -> dict[str, Any]:
    """The options with --keep auto resolved (PruMerge's IQR rule over the calibration images) and a
    schedule checked against this model's identity and N (the patches, where the family protects rows)."""
    out = dict(given)
    cfg = src.hf_model.config if src.hf_model is not None else None
    for i, (m, g) in enumerate(stages(method, given)):
        if m == "schedule" and g.get("schedule"):
            from ..optimize import source_id
            from ..search.schedule_file import check_model, load_schedule

            sched = load_schedule(g["schedule"])
            fam = src.family
            n, segments = fam.budget_basis(cfg, src.tiles) if fam else (sched["n_image"], None)
            if i == 1 and fam:  # the image tokens the first stage leaves
                n = resolve(method, {k: v for k, v in given.items() if k != THEN}, n,
                            fam.text_config(cfg).num_hidden_layers, segments)[-1].count
            check_model(sched, source_id(src), n, str(g["schedule"]))
    if given.get("keep") == "auto":
        from .prumerge_auto import auto_keep

        if cfg is None:
            raise VtrError("--keep auto needs an eager model (a preset, HF directory or pickle)")
        fam = src.family
        if fam.vision_site_refusal:
            raise VtrError(f"{method}: {fam.vision_site_refusal}")
        out["keep"], counts = auto_keep(src.eager().hf_model, calibration_pixels(
            calibration, fam.image_size(cfg), fam.processor_facts(cfg)))
        log.info("--keep auto: IQR outlier counts over %d calibration images %s -> median %d", len(counts), counts,
                 out["keep"])
    return out


def calibration_pixels(calibration: Path | str, image_size: int, processing: dict | None = None):
    """Pixels [M, 3, H, W] of a calibration folder, or of vqa-synth's val split ('vqa-synth:val')."""
    if str(calibration).startswith("vqa-synth"):  # the benchmark's images, as `search` accepts them
        import torch

        from ..evaluation import benchmark_items

        split = str(calibration).partition(":")[2] or "val"
        if split == "test":
            raise VtrError("the test split is never used for choices; use --calibration vqa-synth:val")
        items = benchmark_items(f"vqa-synth:{split}", 64)
        return torch.cat([torch.from_numpy(items[i].pixels) for i in range(len(items))])
    from ..calibration import load_calibration

    return load_calibration(calibration, image_size, processing).pixel_values

"""schedule.json: the keep count per layer, how it was found, and for which model; written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import VtrError
from ..lower.atomic import write_atomically

FORMAT = "vtrcompile-schedule/1"


def save_schedule(path: Path, record: dict[str, Any]) -> None:
    rec = {"format": FORMAT, **record}
    write_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(rec, indent=1)))


def load_schedule(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise VtrError(f"schedule not found: {p} (write one with `vtrcompile search ... --out {p.name}`)")
    try:
        rec = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VtrError(f"{p}: not a JSON schedule ({getattr(e, 'msg', e)})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise VtrError(f"{p}: not a vtrcompile schedule (format '{FORMAT}' expected)")
    keeps = rec.get("keep")
    if not rec.get("complete", False):
        raise VtrError(f"{p}: the search that writes it did not finish; resume it with the same "
                       "`vtrcompile search` command")
    if (not isinstance(keeps, list) or not keeps or any(not isinstance(k, int) for k in keeps)
            or keeps[0] != rec.get("n_image") or any(b > a or b < 0 for a, b in zip(keeps, keeps[1:], strict=False))):
        raise VtrError(f"{p}: 'keep' must be non-increasing integer counts starting at N={rec.get('n_image')}")
    return rec


def check_model(rec: dict[str, Any], model_id: str, n_image: int, path: str) -> None:
    """A schedule is only valid for the model (weights and config) it was searched on."""
    if rec["model_id"] != model_id:
        raise VtrError(f"{path}: searched on model {rec.get('model')} ({rec['model_id']}), not this one "
                       f"({model_id}); search again for this model")
    if rec["n_image"] != n_image:
        raise VtrError(f"{path}: made for N={rec['n_image']} image tokens, this model has {n_image}")

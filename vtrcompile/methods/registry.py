"""Every method vtrcompile offers, collected from its own module (methods/<name>.py declares SPEC)."""

from __future__ import annotations

from typing import Any

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction
from . import fastv, gprune, none, prumerge, prumerge_plus, pumer, pyramiddrop, schedule, visionzip, vtw
from .spec import MethodSpec

METHODS: dict[str, MethodSpec] = {m.SPEC.name: m.SPEC for m in (
    none, fastv, gprune, prumerge, prumerge_plus, visionzip, pumer, pyramiddrop, vtw, schedule)}


def validate(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Options given by the user (None = not given) -> the method's full options, defaults filled in; an
    unknown method or option, a --keep that is not a count, or a value outside its interval is an error."""
    if method not in METHODS:
        raise VtrError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)} "
                       "(see `vtrcompile methods`)")
    spec = METHODS[method]
    names = {o.name for o in spec.options}
    extra = [k for k, v in given.items() if v is not None and k not in names]
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        takes = ", ".join("--" + o.name.replace("_", "-") for o in spec.options) or "no options"
        raise VtrError(f"{method} does not take {flags}; it takes {takes}")
    opts = {o.name: (given.get(o.name) if given.get(o.name) is not None else o.default) for o in spec.options}
    keep = opts.get("keep")
    if isinstance(keep, str) and keep != "auto":
        if not keep.isdigit() or int(keep) < 1:
            raise VtrError(f"--keep {keep}: give a count of at least 1" +
                           (" or 'auto' (with --calibration)" if method == "prumerge" else ""))
        opts["keep"] = int(keep)
    for o in spec.options:
        o.check(method, opts[o.name])
    return opts


def resolve(method: str, given: dict[str, Any], n_image: int, n_layers: int) -> list[Reduction]:
    """Options given by the user -> the method's reductions for a model with n_image tokens and n_layers."""
    opts = validate(method, given)
    if opts.get("keep") == "auto":
        raise VtrError("--keep auto must be resolved from calibration images before planning")
    return METHODS[method].plan(opts, n_image, n_layers)

"""Every method vtrcompile offers, collected from its own module (methods/<name>.py declares SPEC)."""

from __future__ import annotations

from typing import Any

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction
from . import (
    dart,
    divprune,
    fastv,
    gprune,
    none,
    pool,
    prumerge,
    prumerge_plus,
    pumer,
    pyramiddrop,
    random_prune,
    schedule,
    visionzip,
    vtw,
)
from .spec import MethodSpec

METHODS: dict[str, MethodSpec] = {m.SPEC.name: m.SPEC for m in (
    none, fastv, gprune, prumerge, prumerge_plus, visionzip, pumer, pyramiddrop, vtw, schedule, random_prune, pool,
    divprune, dart)}


THEN = "then"  # the option key of a stacked reduction: "METHOD key=value ...", applied after this one


def parse_then(text: str, option: str = "--then") -> tuple[str, dict[str, Any]]:
    """'fastv keep=64 layer=2' -> ('fastv', {'keep': '64', 'layer': 2}): values typed as the method declares.
    `option`: the command-line option the text came from, named in every error (--then, or search's --first)."""
    words = str(text).split()
    if not words:
        example = "divprune keep=288" if option == "--first" else "fastv keep=64"
        raise VtrError(f"{option}: give a method and its options, e.g. {option} \"{example}\"")
    method, given = words[0], {}
    if method not in METHODS:
        raise VtrError(f"{option}: unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    types = {o.name: o.type for o in METHODS[method].options}
    for w in words[1:]:
        key, eq, value = w.partition("=")
        key = key.replace("-", "_")
        if not eq or not value:
            raise VtrError(f"{option}: '{w}' is not key=value (e.g. keep=64)")
        if key not in types:
            takes = ", ".join(types) or "no options"
            raise VtrError(f"{option}: {method} does not take '{key}'; it takes {takes}")
        try:
            given[key] = types[key](value)
        except ValueError:
            raise VtrError(f"{option}: {key}={value} is not a {types[key].__name__}") from None
    if THEN in given:
        raise VtrError(f"{option}: one stacked method only")
    return method, given


def stages(method: str, given: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The (method, options) stages of a possibly stacked reduction, in the order they apply."""
    own = {k: v for k, v in given.items() if k != THEN}
    if given.get(THEN) is None:
        return [(method, own)]
    return [(method, own), parse_then(given[THEN])]


def stage_text(method: str, opts: dict[str, Any]) -> str:
    """One stage in `--then` syntax with every option (defaults filled): how a schedule names the stage
    it was searched after."""
    return " ".join([method, *(f"{k}={v}" for k, v in sorted(opts.items()) if v is not None and k != THEN)])


def label(method: str, given: dict[str, Any]) -> str:
    """'divprune+fastv' for a stacked reduction, else the method."""
    return "+".join(m for m, _ in stages(method, given))


def validate(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Options given by the user (None = not given) -> the method's full options, defaults filled in; an
    unknown method or option, a --keep that is not a count, or a value outside its interval is an error.
    A stacked reduction (`then`) validates each stage and keeps the text."""
    if given.get(THEN) is not None:
        parts = stages(method, given)
        if method == "none" or parts[1][0] == "none":
            raise VtrError("--then stacks two reductions; 'none' is not one")
        out = validate(method, parts[0][1])
        validate(*parts[1])
        return {**out, THEN: " ".join(str(given[THEN]).split())}
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


def resolve(method: str, given: dict[str, Any], n_image: int, n_layers: int,
            segments: tuple[int, ...] | None = None) -> list[Reduction]:
    """Options given by the user -> the method's reductions for a model with n_image tokens (patches: rows
    every method keeps are not counted) and n_layers. Stacked: the first stage must reduce before the LLM
    (site vision or projector), the second inside it (llm@K), planned for the image tokens the first leaves.
    segments: patch counts of the image block's parts (LLaVA-NeXT's base and hi-res grids), given to the
    first stage's planner as the option `image_segments`."""
    parts = stages(method, given)
    out: list[Reduction] = []
    for i, (m, g) in enumerate(parts):
        opts = validate(m, g)
        if opts.get("keep") == "auto":
            raise VtrError("--keep auto must be resolved from calibration images before planning")
        if i == 0 and segments:
            opts["image_segments"] = list(segments)
        plan = METHODS[m].plan(opts, out[-1].count if out else n_image, n_layers)
        if len(parts) > 1 and i == 0 and any(r.layer != 0 for r in plan):
            raise VtrError(f"--then: the first method must reduce before the LLM (site vision or projector); "
                           f"{m} reduces at llm@{max(r.layer for r in plan)}")
        if i == 1 and any(r.layer == 0 for r in plan):
            raise VtrError(f"--then: the stacked method must reduce inside the LLM (llm@K); {m} reduces at the "
                           f"{plan[0].site}")
        if i == 1 and out[-1].count == 0:
            raise VtrError(f"--then: {parts[0][0]} leaves no image token for {m}")
        out += plan
    return out

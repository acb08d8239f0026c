"""The pass protocol: (gm, config) -> PassResult, and a pipeline runner whose errors name the pass."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx

from ..errors import VtrError

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    facts: Any = None  # what an analysis pass found (a dataclass), or a transform's report


Pass = Callable[[fx.GraphModule, Any], PassResult]


def finish_transform(gm: fx.GraphModule) -> None:
    """What every mutating pass ends with."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def rewrite_result(gm: fx.GraphModule, name: str, rewritten: int, declined: str, done: str) -> PassResult:
    """How a pass that rewrites ops one by one ends: with nothing rewritten the graph is left as it was (`declined`
    logged); else finish_transform and refresh_meta, `done` logged with the count, which the facts carry."""
    from .graph_utils import refresh_meta

    if not rewritten:
        log.debug("%s: declined, %s", name, declined)
        return PassResult(gm, False)
    finish_transform(gm)
    refresh_meta(gm)
    log.debug("%s: %d %s", name, rewritten, done)
    return PassResult(gm, True, facts={"rewritten": rewritten})


def run_pipeline(gm: fx.GraphModule, passes: Sequence[tuple[Pass, Any]]) -> list[PassResult]:
    """Run passes in order; a failure names the failing pass and the passes that ran before it."""
    results: list[PassResult] = []
    done: list[str] = []
    for fn, config in passes:
        name = getattr(fn, "__name__", repr(fn))
        try:
            res = fn(gm, config)
        except VtrError:
            raise
        except Exception as e:
            before = ", ".join(done) or "none"
            raise RuntimeError(f"pass {name} failed (after: {before}): {type(e).__name__}: {e}") from e
        log.debug("pass %s: modified=%s", name, res.modified)
        gm = res.graph_module
        results.append(res)
        done.append(name)
    return results

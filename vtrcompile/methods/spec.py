"""What a method module declares: its options (with defaults and help), sites, position policy, source, and
the planner that turns options into Reductions (whose selectors are the only graph glue)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs


@dataclass(frozen=True)
class Option:
    name: str  # CLI flag without dashes, underscores for dashes
    type: type  # the value type the CLI parses (str for --keep: a count, or PruMerge's 'auto')
    default: Any
    help: str
    bounds: str | None = None  # an interval the value must lie in, e.g. "[0, 1)", "(0, 1]", "[1, inf)"

    def check(self, method: str, value: Any) -> None:
        """One-line error when a given value lies outside the option's interval."""
        if self.bounds is None or value is None:
            return
        lo_s, hi_s = self.bounds[1:-1].split(",")
        lo, hi = float(lo_s), float(hi_s)
        ok = (value >= lo if self.bounds[0] == "[" else value > lo) and (value <= hi if self.bounds[-1] == "]"
                                                                        else value < hi)
        if not ok:
            raise VtrError(f"{method}: --{self.name.replace('_', '-')} {value} is outside {self.bounds}")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str
    sites: str
    positions: str
    source: str
    options: tuple[Option, ...]
    plan: Callable[[dict[str, Any], int, int], list[Reduction]]  # (options, N, decoder layers)


# --keep is shared by several methods: a count (PruMerge also takes 'auto', resolved before planning; the
# registry turns the text into an int).
KEEP = Option("keep", str, None, "image tokens to keep (overrides the ratio)")


def count_option(opts: dict, n: int, method: str, from_ratio: int) -> int:
    keep = opts.get("keep")
    keep = from_ratio if keep is None else int(keep)
    if not 1 <= keep <= n:
        raise VtrError(f"{method}: --keep {keep} is outside 1..{n} ({n} image tokens reach {method})")
    return keep


def signal_layer(method: str, k: int, layers: int) -> int:
    """K of a method whose signal is layer K-1's attention: 1 <= K <= L-1, else a one-line error."""
    if not 1 <= k <= layers - 1:
        raise VtrError(f"{method}: --layer {k} is outside 1..{layers - 1} (the LLM has {layers} decoder layers; "
                       "the signal comes from layer K-1)")
    return k


def attention_scale(attention) -> float:
    """The softmax scale an attention op applies: its `scale` kwarg, else SDPA's default d^-0.5."""
    scale = attention.kwargs.get("scale")
    return scale if scale is not None else float(attention.args[0].meta["val"].shape[-1]) ** -0.5


def vision_taps(s: SelectorInputs, method: str, next_layer: bool):
    """The vision-site taps a method needs, or a one-line refusal naming what the model lacks."""
    t = s.vision
    patches = int(t.attention.args[0].meta["val"].shape[2]) - int(t.has_cls)  # the feature layer's, per image
    per_image = int(t.patches.meta["val"].shape[-2])  # rows per image the projector takes
    if patches != per_image:
        raise VtrError(f"{method} needs one LLM token per vision patch, and this model turns {patches} patches of "
                       f"its feature layer into {per_image} projector rows per image (it merges patches, e.g. a "
                       "pixel shuffle); use a projector or llm@ method (e.g. divprune, gprune, fastv)")
    if not t.has_cls:
        raise VtrError(f"{method} needs the vision tower's CLS token, and this model feeds the projector "
                       "without slicing one off (no CLS, or vision_feature_select_strategy 'full')")
    if next_layer and (t.next_q_proj is None or t.next_k_proj is None):
        raise VtrError(f"{method} needs the q/k projections of the vision layer after the selected "
                       "feature layer, and the graph has none (is the feature layer the last one?)")
    return t

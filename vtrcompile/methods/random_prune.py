"""Random pruning (VLMUniPruneBench `Random_PreLLM.py` / `Random_IntraLLM.py`), fixed variant: one subset drawn
at compile time from a seeded generator and stored in the engine."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .spec import KEEP, MethodSpec, Option, count_option


def random_indices(n_image: int, keep: int, seed: int) -> list[int]:
    """sort(Generator(PCG64(seed)).permutation(N)[:keep]): the subset the engine keeps, ascending."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return sorted(int(i) for i in rng.permutation(n_image)[:keep])


def constant_keep(image_start: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """image_start [B] -> kept [B, len(indices)]: the same stored indices for every prompt."""
    kept = torch.tensor(indices, dtype=torch.int64, device=image_start.device)
    return kept[None, :].expand(image_start.shape[0], -1)


def parse_site(site: str, layers: int) -> int:
    """'projector' -> 0, 'llm@K' -> K (1 <= K <= L-1); anything else is a one-line error."""
    if site == "projector":
        return 0
    head, _, k = site.partition("@")
    if head != "llm" or not k.isdigit():
        raise VtrError(f"random: --site {site!r} is neither 'projector' nor 'llm@K' (e.g. llm@2)")
    if not 1 <= int(k) <= layers - 1:
        raise VtrError(f"random: --site {site} is outside llm@1..llm@{layers - 1} (the LLM has {layers} layers)")
    return int(k)


def plan_random(opts: dict, n: int, layers: int) -> list[Reduction]:
    layer = parse_site(opts["site"], layers)
    keep = count_option(opts, n, "random", max(1, int(n * opts["keep_ratio"])))
    indices = random_indices(n, keep, opts["seed"])

    def select(s: SelectorInputs):
        return constant_keep, (s.image_start,), {"indices": indices}

    return [Reduction("random", layer, keep, "renumber", select, site="projector" if layer == 0 else "llm",
                      options=dict(opts), recorded={"indices": indices, "numpy": np.__version__})]


SPEC = MethodSpec(
    "random", "Random: keep a seeded random subset of the image tokens (drawn once, stored in the engine)",
    "projector | llm@K", "renumber", "UniPruneBench baseline (VLMUniPruneBench, methods/Random_PreLLM.py)",
    (Option("site", str, "projector", "'projector' or 'llm@K' (Random_IntraLLM)"),
     Option("keep_ratio", float, 0.5, "keep max(1, int(ratio*N)) image tokens", "(0, 1]"),
     Option("seed", int, 0, "numpy PCG64 seed of the drawn subset", "[0, 4294967295]"), KEEP),
    plan_random)

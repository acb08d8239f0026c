"""vtrcompile: trace a LLaVA-style VLM, insert visual-token reduction, lower it to generating engines."""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__", "load_engine"]


def load_engine(path, threads=None):
    """Open a vtrcompile engine (prefill + its decode engine) for inference and greedy generation.
    See vtrcompile.engine.generate.Engine and docs/engine.md."""
    from .engine.generate import load_engine as _load

    return _load(path, threads)

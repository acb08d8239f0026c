"""vtrcompile: trace a LLaVA-style VLM, insert visual-token reduction, lower it to an engine."""

from __future__ import annotations

__version__ = "0.1.0"

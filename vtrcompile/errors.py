"""User-facing errors: each one is a single line that names the problem and what to do."""

from __future__ import annotations


class VtrError(Exception):
    """A problem with the user's input or model; the CLI prints it on one line and exits 2."""


class UnsupportedModelError(VtrError):
    """The model is of a family or shape that vtrcompile cannot compile (yet)."""


class AnalysisError(VtrError):
    """An analysis pass could not find a structure it needs; the message says why candidates were declined."""

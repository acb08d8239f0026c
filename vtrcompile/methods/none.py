"""The unmodified model: no reduction (the baseline engine every profile compares against)."""

from __future__ import annotations

from .spec import MethodSpec

SPEC = MethodSpec("none", "unmodified model (the baseline engine)", "-", "-", "-", (),
    lambda opts, n, layers: [])

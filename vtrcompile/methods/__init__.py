"""Reduction methods: pure tensor functions (shapes in docstrings) plus one registry of their specs."""

"""Eager references: plain PyTorch versions of each method's spec around the HF model's own modules.

They share no code with the graph passes or the in-graph selector functions, so a test that compares
an engine with them checks the rewrite and the method at once.
"""

"""Benchmarks with known answers (synthetic, generated on the fly, no download)."""

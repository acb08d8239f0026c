"""Engines as a user sees them: the I/O contract, host-side input checks, and prefill + decode generation."""

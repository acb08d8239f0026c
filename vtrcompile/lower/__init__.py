"""Backends: rewritten program -> engine file (ONNX now), engine runners, TensorRT preflight."""

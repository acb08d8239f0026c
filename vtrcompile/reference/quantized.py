"""Eager reference of the int8 and int4 linear layers that `--weights int8` / `int4` write for ONNX Runtime
(lower/onnx_weights.py): ONNX Runtime's `MatMulNBits` (com.microsoft) with 8 or 4 bits, written from the operator's
contract, not from the kernel.

The weight W [K, N] is stored per output column n in blocks of `block` rows along K (K padded with zeros to whole
blocks): B [N, blocks, block * bits / 8] uint8, one float scale per (n, block), and a zero point, 2^(bits - 1) when
none is stored (symmetric: 128 for 8 bits, 8 for 4). With 4 bits each byte holds two rows of K, the lower one in its
low nibble. W[k, n] = (q[n, k // block, k % block] - zero point) * scale[n, k // block].

With `quantize_input` (what accuracy_level 4 asks of the CPU kernel) each row of the input is quantized the same
way, per block of K, symmetric: a = q_a * s_a with s_a = max|a| / 127 over the block and q_a = round(a / s_a), and
each block's integer dot product is scaled by s_a * scale. Without it the input stays float.
"""

from __future__ import annotations

import numpy as np


def unpacked(packed: np.ndarray, n: int, blocks: int, block: int, bits: int) -> np.ndarray:
    """The stored integers q [N, blocks, block] (0 .. 2^bits - 1) of B [N, blocks, block * bits / 8] uint8."""
    b = packed.reshape(n, blocks, block * bits // 8)
    if bits == 8:
        return b
    if bits != 4:
        raise ValueError(f"MatMulNBits reference: {bits} bits; this reference reads 8 and 4")
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, blocks, block)  # row 2j low nibble, 2j + 1 high


def dequantized_weight(packed: np.ndarray, scales: np.ndarray, k: int, n: int, block: int,
                       bits: int = 8) -> np.ndarray:
    """W [K, N] float32 from B [N, blocks, block * bits / 8] uint8 and scales [N * blocks] (no zero points stored:
    the default one, 2^(bits - 1))."""
    blocks = -(-k // block)
    q = unpacked(packed, n, blocks, block, bits).astype(np.float32) - 2 ** (bits - 1)
    w = q * scales.reshape(n, blocks, 1).astype(np.float32)
    return w.reshape(n, blocks * block)[:, :k].T


def nbits_linear_reference(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, k: int, n: int, block: int,
                           bits: int = 8, quantize_input: bool = True) -> np.ndarray:
    """x [..., K] float32 -> [..., N]: x @ W for the stored int8 or int4 weight, the input quantized to int8 per block
    of K as the accuracy_level 4 kernel quantizes it (`quantize_input`), or left in float."""
    w = dequantized_weight(packed, scales, k, n, block, bits)
    if not quantize_input:
        return (x.astype(np.float64) @ w.astype(np.float64)).astype(np.float32)
    blocks = -(-k // block)
    lead = x.shape[:-1]
    a = np.zeros((int(np.prod(lead, dtype=np.int64)), blocks * block), np.float64)
    a[:, :k] = x.reshape(-1, k)
    a = a.reshape(-1, blocks, block)
    amax = np.abs(a).max(axis=-1, keepdims=True)
    s_a = amax / 127.0
    q_a = np.where(s_a > 0, np.round(a / np.where(s_a > 0, s_a, 1.0)), 0.0)
    wq = np.zeros((blocks * block, n), np.float64)
    wq[:k] = w
    out = np.einsum("rbj,bjn->rn", q_a * s_a, wq.reshape(blocks, block, n))
    return out.reshape(*lead, n).astype(np.float32)

"""One description of an engine's inputs and outputs (names, dtypes, shapes), stored in its metadata.

Runners, profile, eval and generation read names and shapes from here instead of assuming them. Dynamic
dims are strings: `prompt` (the prompt length), `capacity.{l}` (the rows of layer l's cache buffer a decode step
reads; its first `past_lengths[l]` are filled).
"""

from __future__ import annotations

from typing import Any

import torch

FORMAT_VERSION = 4  # 2: prefill engines return the KV cache; decode engines exist. 3: host inputs, pixel rows.
# 4: decode engines read fixed-capacity cache buffers (past_lengths) and return only the new token's keys/values


def prefill_outputs(n_layers: int) -> list[str]:
    return ["logits", *present_names(n_layers), "next_layer_position_ids"]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def decode_inputs(n_layers: int, padded: bool = False) -> list[str]:
    """The caches are buffers of fixed capacity, `past_lengths` [L] their filled rows per layer; padded (engines of
    batch > 1): the prompt's attention_mask comes last."""
    return ["input_ids", "layer_position_ids", *past_names(n_layers), "past_lengths",
            *(["attention_mask"] if padded else [])]


def decode_outputs(n_layers: int) -> list[str]:
    """present.{l}.* of a decode engine are the new token's keys and values [B, kv, 1, d], for the host to write
    into the buffers at row past_lengths[l]."""
    return ["logits", *present_names(n_layers), "next_layer_position_ids"]


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def describe(program: torch.export.ExportedProgram, inputs: list[str], outputs: list[str],
             dim_names: dict[Any, str]) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes of a program's user inputs/outputs; symbolic dims named by `dim_names`
    (sympy symbol -> name), other symbolic expressions written as text."""
    sig = program.graph_signature
    nodes = {n.name: n for n in program.graph.nodes}
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    out_vals = [a.meta["val"] for a in out_node.args[0][-len(sig.user_outputs):]] if sig.user_outputs else []

    def shape(v) -> list[int | str]:
        dims: list[int | str] = []
        for s in v.shape:
            if isinstance(s, torch.SymInt):
                expr = s.node.expr
                text = str(expr)
                for sym, name in dim_names.items():
                    text = text.replace(str(sym), name)
                dims.append(text)
            else:
                dims.append(int(s))
        return dims

    in_vals = [nodes[n].meta["val"] for n in sig.user_inputs]
    if len(in_vals) != len(inputs) or len(out_vals) != len(outputs):
        raise ValueError(f"program has {len(in_vals)} inputs / {len(out_vals)} outputs; names given for "
                         f"{len(inputs)} / {len(outputs)}")
    return {"inputs": [{"name": n, "dtype": _dtype_name(v.dtype), "shape": shape(v)} for n, v in zip(inputs, in_vals, strict=True)],
            "outputs": [{"name": n, "dtype": _dtype_name(v.dtype), "shape": shape(v)}
                        for n, v in zip(outputs, out_vals, strict=True)]}


def names(io: dict, kind: str) -> list[str]:
    return [t["name"] for t in io[kind]]

"""GraphFacts -> a plain dict report (what `inspect` shows as a table or JSON)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .passes.facts import GraphFacts
from .passes.find_decoder_layers import inputs_written_between_layers, stream_addends
from .passes.find_sequence_side_tensors import rotary_origin
from .passes.provenance import val


def _shape(node: fx.Node | None) -> str:
    if node is None:
        return "-"
    v = val(node)
    if isinstance(v, torch.Tensor):
        return "[" + ", ".join(str(s) for s in v.shape) + "]"
    return str(v)


def _short(path: str, root: str) -> str:
    return path[len(root) + 1:] if root and path.startswith(root + ".") else path


def facts_report(gm: fx.GraphModule, f: GraphFacts, prompt_range: tuple[int, int] | None = None,
                 normalized: GraphFacts | None = None) -> dict[str, Any]:
    """The model's graph as the analysis finds it (`f`); what may sit between its decoder layers is read from
    `normalized`, the analysis of the graph the reductions see (after passes.pipeline.normalizing_passes)."""
    b = f.boundary
    between = (normalized or f).layers
    side = []
    for st in f.side[0]:
        role = rotary_origin(gm, st.node) if st.role == "rotary" else st.role
        side.append({"role": role, "node": st.node.name, "shape": _shape(st.node), "seq_dims": list(st.seq_dims)})
    llm_root = f.layers[0].module.rsplit(".", 2)[0] if f.layers else ""
    layers = []
    for lay in f.layers:
        layers.append({
            "layer": lay.index, "module": lay.module, "attention": f"{lay.attention.name} in {_short(lay.attention_module, llm_root)}",
            "q": f"{lay.q.name} {_shape(lay.q)}", "k": f"{lay.k.name} {_shape(lay.k)}", "v": f"{lay.v.name} {_shape(lay.v)}",
            "mask": lay.mask.name if lay.mask is not None else "-", "scale": lay.scale,
            "residual_input": f"{lay.residual_input.name} {_shape(lay.residual_input)}",
        })
    v = f.vision
    n_tower = len(v.layers)
    return {
        "vision_tower": {"module": v.module, "class": v.class_name.rsplit(".", 1)[-1], "layers_in_graph": n_tower,
                         "feature_layer": v.layers[v.feature_layer], "feature_hidden_state": v.feature_layer + 1,
                         "drops_cls": v.drops_cls},
        "projector": {"module": f.projector.module, "class": f.projector.class_name.rsplit(".", 1)[-1],
                      "input": f"{f.projector.input.name} {_shape(f.projector.input)}",
                      "output": f"{f.projector.output.name} {_shape(f.projector.output)}"},
        "boundary": {"op": str(b.node.target), "node": b.node.name, "image_token_id": b.image_token_id,
                     "n_image": b.n_image, "batch": b.batch, "hidden_size": b.hidden_size},
        "sequence": {"symbol": str(f.seq_symbol), "range": list(prompt_range) if prompt_range else None,
                     "side_tensors": side},
        "decoder_layers": layers,
        "written_between_layers": [lay.index for lay in inputs_written_between_layers(between)],
        "added_between_layers": sorted(stream_addends(between)),
    }


def format_facts(r: dict[str, Any]) -> str:
    v, p, b, s = r["vision_tower"], r["projector"], r["boundary"], r["sequence"]
    lines = [
        f"vision tower   {v['module']} ({v['class']}), {v['layers_in_graph']} encoder layers in the graph",
        f"feature layer  {v['feature_layer']} output (hidden_states[{v['feature_hidden_state']}])"
        + ("; CLS dropped before the projector" if v["drops_cls"] else "; all rows go to the projector (no CLS slice)"),
        f"projector      {p['module']} ({p['class']}): {p['input']} -> {p['output']}",
        f"boundary       {b['op']} at {b['node']}: image token id {b['image_token_id']}, N={b['n_image']} "
        f"image tokens, batch {b['batch']}, hidden {b['hidden_size']}",
        f"prompt length  symbol {s['symbol']}" + (f", range {s['range'][0]}..{s['range'][1]}" if s["range"] else ""),
        "side tensors   " + "; ".join(f"{t['role']} {t['node']} {t['shape']}" for t in s["side_tensors"]),
    ]
    late = r.get("written_between_layers") or []
    if late:
        lines.append(f"sites          layer >= {late[-1]} only: the inputs of layers {', '.join(map(str, late))} are "
                     "written between decoder layers in a way a reduction cannot follow")
    added = r.get("added_between_layers") or []
    if added:
        lines.append(f"additions      the inputs of layers {', '.join(map(str, added))} add a tensor at the image rows "
                     "(e.g. DeepStack features): a site before them gathers it with the tokens it keeps; merging "
                     f"methods only at layer >= {added[-1]}")
    lines.append("")
    cols = ["layer", "attention", "q", "k", "mask", "scale", "residual_input"]
    rows = [cols] + [[str(lay[c]) for c in cols] for lay in r["decoder_layers"]]
    w = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w[j]) for j, c in enumerate(row)).rstrip())
        if i == 0:
            lines.append("-" * (sum(w) + 2 * (len(w) - 1)))
    return "\n".join(lines)

"""Prototype, not the engines' path: what an OpenVINO decode step gains from a cache it appends to in place.

Today's decode engine concatenates each layer's cache with the new token's keys and values and returns the
whole cache (`present.*`), so every step copies every cache and every step has new shapes. This script takes a
decode IR as `optimize` writes it and rewrites it, in OpenVINO's graph API, into the design that would avoid
both: each `past_key_values.{l}.*` input is a buffer of fixed capacity (the layer's length after the prefill
plus `--extra` rows), a new input `cache_mask.{l}` [1, 1, 1, capacity] (0 for a filled row, -inf for an empty
one) masks the empty rows, attention is split over the buffer and the new token (scores of both concatenated,
one softmax, the two value products added), and `present.*` return only the new token's keys and values, which
the host writes into the buffers. It then times, in one process and alternating, (1) the isolated step at the
prefill's context, both IRs, and (2) a generation-like loop of 32 steps: today's IR fed its own outputs (shapes
growing), the prototype with its buffers filled in place (shapes fixed). It also prints the largest difference
between the two IRs' first-step logits (float32 engines: rounding only).

Usage: python benchmarks/inplace_cache_prototype.py FOLDER PREFILL_NAME [--extra 32 --rounds 8 --out F.json]
       (FOLDER: an OpenVINO engine folder with the prefill IR and its decode IR, e.g. from benchmarks/generation.py)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from vtrcompile.engine.generate import decode_feeds
from vtrcompile.engine.host_inputs import prefill_feeds
from vtrcompile.engine.runners import open_engine
from vtrcompile.lower.openvino import bf16_tensor
from vtrcompile.profile import environment, profile_prompt


def consumer(output, type_name: str):
    return next(t.get_node() for t in output.get_target_inputs() if t.get_node().get_type_name() == type_name)


def rewrite(model, layers: int):
    """Concat-and-return-all decode IR -> fixed-capacity buffers, split attention, only new K/V returned."""
    params = {p.get_friendly_name(): p for p in model.get_parameters()}
    results = {r.get_friendly_name().split("/")[0]: r for r in model.get_results()}
    masks = []
    for layer in range(layers):
        pk, pv = params[f"past_key_values.{layer}.key"], params[f"past_key_values.{layer}.value"]
        cat_k, cat_v = consumer(pk.output(0), "Concat"), consumer(pv.output(0), "Concat")
        new_k, new_v = cat_k.input_value(1), cat_v.input_value(1)
        tk = consumer(cat_k.output(0), "Transpose")  # keys transposed for q @ k^T
        scores = consumer(tk.output(0), "MatMul")
        softmax = consumer(consumer(scores.output(0), "Add").output(0), "Softmax")
        out = consumer(softmax.output(0), "MatMul")
        q, perm = scores.input_value(0), tk.input_value(1)
        mask = ops.parameter([1, 1, 1, -1], np.float32, name=f"cache_mask.{layer}")
        mask.output(0).get_tensor().set_names({f"cache_mask.{layer}"})
        masks.append(mask)
        s_past = ops.add(ops.matmul(q, ops.transpose(pk, perm), False, False), ops.convert_like(mask, q))
        s_new = ops.matmul(q, ops.transpose(new_k, perm), False, False)
        p = ops.softmax(ops.concat([s_past, s_new], -1), -1)
        cap = ops.gather(ops.shape_of(pk), ops.constant(np.array([2], np.int64)), ops.constant(np.int64(0)))
        parts = ops.variadic_split(p, ops.constant(np.int64(-1)), ops.concat([cap, ops.constant(np.array([1], np.int64))], 0))
        attn = ops.add(ops.matmul(parts.output(0), pv, False, False), ops.matmul(parts.output(1), new_v, False, False))
        for t in list(out.output(0).get_target_inputs()):
            t.replace_source_output(attn.output(0))
        results[f"present.{layer}.key"].input(0).replace_source_output(new_k)
        results[f"present.{layer}.value"].input(0).replace_source_output(new_v)
    model.add_parameters(masks)
    model.validate_nodes_and_infer_types()
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("prefill")
    ap.add_argument("--extra", type=int, default=32, help="empty rows per layer buffer after the prefill's cache")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    folder = Path(args.folder)
    pre = open_engine(folder / f"{args.prefill}.xml", 2)
    meta, layers = pre.metadata, pre.metadata["llm_layers"]
    bf16 = meta["dtype"] == "bfloat16"
    dec_path = folder / meta["decode"]["file"]
    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
           "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    base = core.compile_model(core.read_model(dec_path), "CPU", cfg)
    proto = core.compile_model(rewrite(core.read_model(dec_path), layers), "CPU", cfg)

    ids, px = profile_prompt(meta)[:2]
    out = pre.run(prefill_feeds(meta, ids, px))
    first = {k: np.array(v) for k, v in decode_feeds(out, out["logits"].argmax(-1), layers).items()}
    lengths = [first[f"past_key_values.{i}.key"].shape[2] for i in range(layers)]
    names = [(i, kv) for i in range(layers) for kv in ("key", "value")]

    def tensor(name, a):
        return bf16_tensor(name, a) if bf16 and name.startswith("past") else ov.Tensor(np.ascontiguousarray(a))

    def bind_base(req, feeds):
        for k, v in feeds.items():
            req.set_tensor(k, tensor(k, v))

    def fresh_buffers():
        bufs, masks = {}, {}
        for i, kv in names:
            a = first[f"past_key_values.{i}.{kv}"]
            b = np.zeros((*a.shape[:2], lengths[i] + args.extra, a.shape[3]), a.dtype)
            b[:, :, : lengths[i]] = a
            bufs[i, kv] = b
        for i in range(layers):
            masks[i] = np.full((1, 1, 1, lengths[i] + args.extra), -np.inf, np.float32)
            masks[i][..., : lengths[i]] = 0
        return bufs, masks

    def bind_proto(req, bufs, masks):
        for (i, kv), b in bufs.items():
            req.set_tensor(f"past_key_values.{i}.{kv}", bf16_tensor("past", b) if bf16 else ov.Tensor(b, shared_memory=True))
        for i in range(layers):
            req.set_tensor(f"cache_mask.{i}", ov.Tensor(masks[i], shared_memory=True))
        req.set_tensor("input_ids", ov.Tensor(first["input_ids"]))
        req.set_tensor("layer_position_ids", ov.Tensor(np.ascontiguousarray(first["layer_position_ids"])))

    rb, rp = base.create_infer_request(), proto.create_infer_request()
    bind_base(rb, first)
    held = fresh_buffers()  # the request reads these arrays in place
    bind_proto(rp, *held)
    rb.infer(share_outputs=True)
    rp.infer(share_outputs=True)
    lb, lp = rb.get_tensor("logits").data, rp.get_tensor("logits").data
    diff = float(np.abs(lb.astype(np.float32) - lp).max())

    def isolated(req, n=12):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            req.infer(share_outputs=True)
            ts.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(ts[2:]))

    def loop_base():
        req, feeds, ts = base.create_infer_request(), dict(first), []
        for _ in range(args.steps):
            bind_base(req, feeds)
            t0 = time.perf_counter()
            req.infer(share_outputs=True)
            ts.append((time.perf_counter() - t0) * 1e3)
            o = {k: req.get_tensor(k).data for k in
                 ["logits", "next_layer_position_ids", *(f"present.{i}.{kv}" for i, kv in names)]}
            feeds = decode_feeds(o, o["logits"].argmax(-1), layers)
        return float(np.median(ts))

    def loop_proto():
        req, (bufs, masks), n, ts = proto.create_infer_request(), fresh_buffers(), list(lengths), []
        bind_proto(req, bufs, masks)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            req.infer(share_outputs=True)
            ts.append((time.perf_counter() - t0) * 1e3)
            for i, kv in names:
                bufs[i, kv][:, :, n[i]] = req.get_tensor(f"present.{i}.{kv}").data[:, :, 0]
            for i in range(layers):
                masks[i][..., n[i]] = 0
                n[i] += 1
            req.set_tensor("input_ids", ov.Tensor(req.get_tensor("logits").data.argmax(-1)[:, None].astype(np.int64)))
            req.set_tensor("layer_position_ids",
                           ov.Tensor(np.ascontiguousarray(req.get_tensor("next_layer_position_ids").data)))
        return float(np.median(ts))

    rounds = {"isolated": {"today": [], "in_place": []}, "generation_like": {"today": [], "in_place": []}}
    for _ in range(args.rounds):
        rounds["isolated"]["today"].append(isolated(rb))
        rounds["isolated"]["in_place"].append(isolated(rp))
        rounds["generation_like"]["today"].append(loop_base())
        rounds["generation_like"]["in_place"].append(loop_proto())
    res = {"folder": str(args.folder), "prefill": args.prefill, "dtype": meta["dtype"], "cache_lengths": lengths,
           "extra_rows": args.extra, "steps": args.steps, "first_step_max_logit_diff": diff,
           "environment": environment(2, pre), "rounds_p50_ms": rounds,
           "median_ms": {k: {e: float(np.median(v)) for e, v in d.items()} for k, d in rounds.items()}}
    print(f"{args.prefill} ({meta['dtype']}), caches {lengths[0]}..{lengths[-1]}, +{args.extra} rows; first-step "
          f"logits differ by {diff:.2e}")
    for k, d in res["median_ms"].items():
        print(f"  {k}: today {d['today']:.2f} ms, in place {d['in_place']:.2f} ms ({d['today'] / d['in_place']:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

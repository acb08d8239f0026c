"""Real checkpoints at scale: a bf16 LLaVA-1.5-7B or -13B architecture checkpoint on disk (random weights,
safetensors shards in the layout `save_pretrained` writes) through the CLI the way a user runs it:

    /usr/bin/time -v vtrcompile optimize DIR --method fastv --keep 64 --dtype bfloat16 --out OUT/f.onnx

Records wall time and peak RSS (from /usr/bin/time), runs the ONNX checker on the graph, and checks that
the weight store holds every weight once (its index spans tile the file exactly, and every large initializer
of both engines points into it). `--one-file` builds one-file engines (`optimize --one-file`; a one-file IR's
constants are those of its `If`'s two bodies, all checked against the store). `--generate N` then runs `vtrcompile generate
--max-new-tokens N --json` on the engine under /usr/bin/time (a prompt of token ids around the image; random
weights, so the tokens mean nothing): whether the process fits, its peak RSS, TTFT and the decode steps. Usage:
    python benchmarks/scale_checkpoint.py --preset llava15-7b --work build/scale7b [--ext .xml] [--one-file]
        [--generate 8] [--weights int8|int4]
`--weights int8` (`int4`) builds with that option and no `--dtype`, so in float32 (optimize's default with --weights:
ONNX Runtime's kernels take no other, and OpenVINO keeps compressed weights compressed only in float32); for .onnx the
compressed weights go to the model's store for them, `weights-<id>-float32-int8.data` (`-int4.data`), and the result
records every file's size instead of the float store's checks. Every command's peak RssAnon (the process tree's,
sampled every 0.5 s) is recorded beside /usr/bin/time's peak RSS, which also counts memory-mapped weights' pages.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import onnx
import torch
from safetensors.torch import save_file

from vtrcompile.models.presets import build_preset

# transformers writes LLaVA checkpoints in the legacy key layout; so do we (the loader renames them back)
LEGACY = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
          ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")]
SHARD_BYTES = 4 * 2**30


def legacy_key(name: str) -> str:
    for new, old in LEGACY:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def make_checkpoint(preset: str, folder: Path, seed: int = 0) -> dict:
    """Random bf16 weights (std 0.02), written shard by shard: at most one shard in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    model = build_preset(preset, device="meta")
    cfg = model.config
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map, total = 0, [], {}, 0

    def flush() -> None:
        nonlocal shard, size
        if not shard:
            return
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, p in model.named_parameters():
        t = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        shard[legacy_key(name)] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"files": len(files), "bytes": total, "params": sum(p.numel() for p in model.parameters())}


def tree_anon_kib(root: int) -> int:
    """RssAnon of `root` and its descendants, KiB (what the kernel cannot drop: /usr/bin/time's peak RSS also counts
    the file-backed pages of memory-mapped weights)."""
    from vtrcompile.engine.resident import status_kib

    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, total = {root}, 0
    for _ in range(4):  # time -> vtrcompile -> its helpers
        tree |= {pid for pid, ppid in parents.items() if ppid in tree}
    for pid in tree:
        try:
            total += status_kib("RssAnon", Path(f"/proc/{pid}/status"))
        except Exception:  # gone meanwhile
            pass
    return total


def time_v(cmd: list[str], keep_stdout: bool = False) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak_anon[0] = max(peak_anon[0], tree_anon_kib(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    out = {"cmd": " ".join(cmd), "exit": r.returncode, "wall_s": wall,
           "peak_rss_gb": int(rss.group(1)) / 2**20 if rss else None,
           "peak_tree_anon_gb_sampled": peak_anon[0] / 2**20,
           "stderr_tail": [line for line in r.stderr.splitlines() if not line.startswith("\t")][-6:]}
    if keep_stdout:
        out["stdout"] = json.loads(r.stdout) if r.returncode == 0 else r.stdout[-2000:]
    return out


def check_store(folder: Path, engines: list[Path]) -> dict:
    from vtrcompile.lower.onnx import read_metadata

    store = folder / read_metadata(engines[0])["weights_file"]
    index = json.loads(store.with_suffix(".json").read_text())["tensors"]
    spans = sorted(index.values())
    tiled = all(o1 + n1 == o2 for (o1, n1), (o2, _) in zip(spans, spans[1:], strict=False)) and \
        sum(n for _, n in spans) == store.stat().st_size
    known = {(o, n) for o, n in spans}
    per_engine = {}
    for e in engines:
        m = onnx.load(str(e), load_external_data=False)
        onnx.checker.check_model(str(e))  # by path: external data resolved beside the engine
        ext = [{d.key: d.value for d in i.external_data} for i in m.graph.initializer if i.data_location == 1]
        pts = [(int(x["offset"]), int(x["length"])) for x in ext]
        per_engine[e.name] = {"external_initializers": len(pts), "all_in_store": all(p in known for p in pts),
                              "distinct": len(set(pts)) == len(pts), "checker": "passed",
                              "inline_initializers": sum(1 for i in m.graph.initializer if i.data_location != 1),
                              "onnx_bytes": e.stat().st_size}
    return {"store": store.name, "store_bytes": store.stat().st_size, "tensors": len(index),
            "spans_tile_the_file": tiled, "engines": per_engine}


def check_ir_store(folder: Path, irs: list[Path], checkpoint: Path) -> dict:
    """Each IR's .bin is the weight store (the same file), every Const of every IR lies inside it, and the
    store's index tiles it: every weight, and each IR's own small constants, once. Then OpenVINO reads each IR
    (memory-mapped) and every constant that is a checkpoint weight under its own name (not a transposed copy) is
    compared, bit for bit, with the checkpoint tensor: these include weights stored past 4 GiB."""
    import os
    import xml.etree.ElementTree as ET

    import numpy as np
    import openvino as ov

    from vtrcompile.lower.openvino import ir_constants, read_ir
    from vtrcompile.models.checkpoint import read_index, read_tensor

    store = folder / read_ir(irs[0])[1]["weights_file"]
    size = store.stat().st_size
    index = json.loads(store.with_suffix(".json").read_text())["tensors"]
    spans = sorted(index.values())
    tiled = all(o1 + n1 == o2 for (o1, n1), (o2, _) in zip(spans, spans[1:], strict=False)) and \
        sum(n for _, n in spans) == size
    entries = {}
    for key, e in read_index(checkpoint).items():  # checkpoint keys in the legacy layout -> the model's names
        for new, old in LEGACY:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        entries[key] = e
    per_ir = {}
    for x in irs:
        consts = [ly for ly in ET.parse(x).getroot().iter("layer") if ly.get("type") == "Const"]  # If bodies too
        offset_of = {}
        for ly in consts:
            port = ly.find("output/port")
            for name in (port.get("names", "") if port is not None else "").split(","):
                offset_of[name] = int(ly.find("data").get("offset"))
        checked, equal, furthest = 0, 0, 0
        for op in ir_constants(ov.Core().read_model(str(x))):  # a one-file IR's two bodies: each mapped block once
            for name in op.output(0).get_names():
                e = entries.get(name.removeprefix("model."))
                if e is None:
                    continue
                want = read_tensor(e).to(torch.bfloat16).view(torch.int16).numpy()
                got = np.ascontiguousarray(op.get_data()).view(np.int16)
                checked += 1
                equal += int(got.shape == want.shape and bool((got == want).all()))
                furthest = max(furthest, offset_of.get(name, 0))
        per_ir[x.name] = {"bin_is_the_store": os.path.samefile(x.with_suffix(".bin"), store), "consts": len(consts),
                          "all_in_store": all(int(ly.find("data").get("offset")) + int(ly.find("data").get("size"))
                                              <= size for ly in consts),
                          "named_weights_checked": checked, "named_weights_equal": equal,
                          "furthest_checked_offset": furthest, "xml_bytes": x.stat().st_size}
    return {"store": store.name, "store_bytes": size, "tensors": len(index), "spans_tile_the_file": tiled,
            "irs": per_ir}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava15-7b", choices=["tiny", "llava15-7b", "llava15-13b"])
    ap.add_argument("--work", default="build/scale")
    ap.add_argument("--keep", type=int, default=64, help="FastV's image-token budget")
    ap.add_argument("--ext", default=".onnx", choices=[".onnx", ".xml"],
                    help="engine type: .onnx (weights streamed into the store) or .xml (an IR whose .bin is that store)")
    ap.add_argument("--keep-checkpoint", action="store_true")
    ap.add_argument("--one-file", action="store_true", help="optimize --one-file (the prefill and decode in one file)")
    ap.add_argument("--generate", type=int, default=0, help="then generate this many tokens with the engine")
    ap.add_argument("--weights", default="none", choices=["none", "int8", "int4"], help="optimize --weights")
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work)
    ckpt, out = work / "checkpoint", work / "engines"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    made = make_checkpoint(args.preset, ckpt) if not (ckpt / "config.json").is_file() else {"reused": True}
    made["seconds"] = time.perf_counter() - t0
    logging.info("checkpoint: %s", made)
    out.mkdir(parents=True)
    compressed = args.weights != "none"
    dtype = [] if compressed else ["--dtype", "bfloat16"]  # compressed: float32 activations, optimize's default
    run = time_v(["vtrcompile", "optimize", str(ckpt), "--method", "fastv", "--keep", str(args.keep), *dtype,
                  "--out", str(out / f"fastv{args.ext}"), *(["--one-file"] if args.one_file else []),
                  *(["--weights", args.weights] if compressed else [])])
    logging.info("optimize: %s", run)
    result = {"preset": args.preset, "checkpoint": made, "optimize": run, "weights": args.weights}
    if run["exit"] == 0 and compressed:
        result["engines"] = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
        result["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    elif run["exit"] == 0 and args.ext == ".xml":
        result["engines"] = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
        result["disk_bytes"] = sum(f.stat().st_size for f in {f.stat().st_ino: f for f in out.iterdir()}.values())
        irs = [out / "fastv.xml", *sorted(out.glob("decode-*.xml"))]
        result["store"] = check_ir_store(out, irs, ckpt)
        result["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    elif run["exit"] == 0:
        engines = [out / "fastv.onnx", *sorted(out.glob("decode-*.onnx"))]
        result["store"] = check_store(out, engines)
        result["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    if run["exit"] == 0 and args.generate:
        image = Path(__file__).resolve().parents[1] / "models/vqa-synth-llava/examples/test-3.png"
        gen = time_v(["vtrcompile", "generate", str(out / f"fastv{args.ext}"), "--image", str(image), "--ids",
                      "1,3,4,5,image,6,7,8,9", "--max-new-tokens", str(args.generate), "--json"], keep_stdout=True)
        logging.info("generate: %s", {k: v for k, v in gen.items() if k != "stdout"})
        result["generate"] = gen
    tag = args.preset.removeprefix("llava15-") + ("" if args.ext == ".onnx" else "-openvino") + \
        ("-one-file" if args.one_file else "") + ("" if args.weights == "none" else "-" + args.weights)
    path = Path(args.result or f"benchmarks/results/scale-checkpoint-{tag}.json")
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if not args.keep_checkpoint:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

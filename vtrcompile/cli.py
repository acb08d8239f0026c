"""The vtrcompile command line: argument parsing and printing only."""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

from .errors import VtrError
from .methods.registry import METHODS

log = logging.getLogger("vtrcompile")

# Upper bounds on counts a user types: far above any real use, low enough that a typo cannot run for days.
MAX_RUNS, MAX_THREADS, MAX_PROMPTS = 100_000, 1024, 1_000_000


class Finite(click.FloatRange):
    """A float range that also refuses nan and inf."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


def _fail(msg: str) -> None:
    click.echo("error: " + " ".join(msg.split()), err=True)  # one line, whatever the message held
    sys.exit(2)


_SIGNAL: list[int] = []  # the signal that interrupted this run, if any


def _on_terminate(signum: int, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so every temporary file and folder is removed on the way out; both are
    recorded, so an interrupt that a library swallowed still ends the run as interrupted."""
    _SIGNAL.append(signum)
    raise KeyboardInterrupt


_REDELIVERY: list[threading.Timer] = []  # interrupts swallowed by a finalizer, to be sent again


def _on_unraisable(hook):
    """An interrupt raised inside a finalizer (`__del__`, a weakref callback) cannot propagate: Python prints it
    as "Exception ignored" with a traceback and runs on. Send the signal again a moment later instead, from
    another thread, so that the handler raises it in ordinary code (sent from here, it would run inside this
    hook and be swallowed again); any other unraisable error goes to the previous hook."""
    def on(u) -> None:
        if isinstance(u.exc_value, KeyboardInterrupt) and _SIGNAL:
            again = threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, _SIGNAL[-1]))
            again.daemon = True
            _REDELIVERY.append(again)
            again.start()
            return
        hook(u)
    return on


class _Cli(click.Group):
    """Every failure ends as one `error: ...` line and exit code 2 (click's usage errors included); an
    interrupt (SIGINT, SIGTERM) removes what it had begun to write and exits 128 + the signal number."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        argv = kwargs.get("args") if "args" in kwargs else (args[0] if args else sys.argv[1:])
        nul = next((a for a in argv or [] if isinstance(a, str) and "\x00" in a), None)
        if nul is not None:
            _fail(f"argument {nul!r} holds a NUL byte, which no file name or option value may contain")
        _SIGNAL.clear()
        main_thread = threading.current_thread() is threading.main_thread()
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
        for s in old:  # SIGINT recorded too: some libraries swallow KeyboardInterrupt
            signal.signal(s, _on_terminate)
        unraisable = sys.unraisablehook
        sys.unraisablehook = _on_unraisable(unraisable)
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as e:
            where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
            _fail(where + e.format_message())
        except (click.Abort, KeyboardInterrupt):
            _interrupted(_SIGNAL[-1] if _SIGNAL else signal.SIGINT)
        except VtrError as e:
            if not _SIGNAL:
                _fail(str(e))
        except Exception:
            if not _SIGNAL:  # after an interrupt, an error a library made of it ends the run as interrupted (below)
                raise
        finally:  # the caller's handlers back (the CLI may run inside another program, e.g. a test runner)
            for s, h in old.items():
                signal.signal(s, h)
            sys.unraisablehook = unraisable
            while _REDELIVERY:
                _REDELIVERY.pop().cancel()
        if _SIGNAL:  # the interrupt arrived where Python could not raise it (inside a C callback), or became another
            _interrupted(_SIGNAL[-1])  # error: still say so
        sys.exit(rv if isinstance(rv, int) else 0)


def _interrupted(signum: int) -> None:
    from .lower.atomic import remove_scratch

    remove_scratch()
    click.echo(f"error: interrupted by {signal.Signals(signum).name}; temporary files were removed and no "
               "partial output was left (a search resumes from its last saved evaluation)", err=True)
    sys.exit(128 + signum)


@click.group(cls=_Cli)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def main(verbose: int, quiet: bool) -> None:
    """Compile visual-token reduction into deployable VLM engines."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("vtrcompile").setLevel(level)
    # torch.onnx warns about optional torchvision ops on every export; not actionable for users.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _method_help(option: str, intro: str) -> str:
    """Help text naming each method that takes `option`, with its default (from the registry)."""
    def default(o) -> str:
        if "default" in o.help:
            return ""
        return f"; default {o.default}" if o.default is not None else "; default: unset"

    takes = [f"{m.name} ({o.help}{default(o)})" for m in METHODS.values() for o in m.options if o.name == option]
    return f"{intro} Taken by: " + "; ".join(takes) + "."


_model_arg = click.argument("model")
_pickle_opt = click.option("--allow-pickle", is_flag=True,
                           help="Allow MODEL to be a pickled nn.Module. Unpickling runs arbitrary code: "
                                "only for files you trust.")
_tiles = click.option("--tiles", default=1, show_default=True, type=click.IntRange(1, 64),
                      help="Images (tiles) per prompt the engine takes, fixed at compile time: InternVL's tile "
                           "count (448 px tiles; above 1, a grid of tiles-1 plus a thumbnail). LLaVA takes 1.")


def _parse_image_size(ctx, param, value):
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", value)
    if not m:
        raise click.BadParameter(f"'{value}': give HxW in pixels, e.g. 448x448")
    return int(m.group(1)), int(m.group(2))


_image_size = click.option("--image-size", default=None, callback=_parse_image_size, metavar="HxW",
                           help="The image size (height x width, px) the engine takes, fixed at compile time, for "
                                "families whose vision tower takes several (Qwen-VL: default 448x448, sides multiples "
                                "of 28 px, of 112 px on Qwen2.5-VL; LLaVA-NeXT / OneVision: any size, default the first square "
                                "pinpoint, padded into its best pinpoint as the model does). Images are resized to it.")


def _tiles_opt(f):
    return _tiles(_image_size(f))


@main.command()
@_model_arg
@_pickle_opt
@click.option("--max-prompt", default=None, type=click.IntRange(3),
              help="Largest prompt length the engine accepts (default: 2048, or the image tokens + 512 when they "
                   "need more; at most the LLM's max_position_embeddings).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_tiles_opt
def inspect(model: str, allow_pickle: bool, max_prompt: int, as_json: bool, tiles: int, image_size) -> None:
    """Show what the analysis passes find in MODEL."""
    from .build import naming_the_model, prompt_range
    from .capture import capture, editable_module
    from .inspect_report import facts_report, format_facts
    from .models.loading import load_model
    from .passes.analysis import analyze
    from .passes.base import run_pipeline
    from .passes.pipeline import normalizing_passes
    from .passes.strip_runtime_asserts import strip_runtime_asserts

    src = load_model(model, allow_pickle, tiles=tiles, image_size=image_size)
    ep = capture(src, max_prompt)
    gm, normalized = editable_module(ep), editable_module(ep)
    strip_runtime_asserts(gm)
    with naming_the_model(src):
        run_pipeline(normalized, normalizing_passes())
        report = facts_report(gm, analyze(gm), prompt_range(ep), analyze(normalized))
    click.echo(json.dumps(report, indent=2) if as_json else format_facts(report))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def methods(as_json: bool) -> None:
    """List every reduction method: site, options and defaults, position policy, source."""
    rows = []
    for m in METHODS.values():
        rows.append({"method": m.name, "title": m.title, "site": m.sites, "positions": m.positions,
                     "options": {o.name.replace("_", "-"): o.default for o in m.options}, "source": m.source})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        opts = ", ".join(f"--{k} {v if v is not None else '(unset)'}" for k, v in r["options"].items()) or "-"
        click.echo(f"{r['method']:<8} {r['title']}\n         site {r['site']}; positions {r['positions']}; "
                   f"options: {opts}\n         source: {r['source']}")


def _method_flags(f):
    """One flag per option that any method declares (methods/<name>.py), typed and described from there."""
    seen: dict[str, object] = {}
    for m in METHODS.values():
        for o in m.options:
            seen.setdefault(o.name, o.type)
    for name, typ in reversed(list(seen.items())):
        intro = {"keep": "Image tokens to keep: a count (PruMerge: also 'auto', with --calibration).",
                 "schedule": "A schedule.json from `vtrcompile search`."}.get(name, "")
        f = click.option(f"--{name.replace('_', '-')}", name, type=typ, default=None,
                         help=_method_help(name, intro))(f)
    return f


def _profile_opts(f):
    f = click.option("--reps", default=20, show_default=True, type=click.IntRange(1, MAX_RUNS), help="Timed runs per engine.")(f)
    f = click.option("--warmup", default=3, show_default=True, type=click.IntRange(0, MAX_RUNS), help="Discarded runs.")(f)
    f = click.option("--threads", default=None, type=click.IntRange(1, MAX_THREADS), help="ONNX Runtime threads (default: all cores).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")(f)
    return f


def _generation_opts(f):
    f = click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(0, MAX_RUNS),
                     help="Also profile generation of this many tokens (TTFT, time per output token, end to end, "
                          "KV-cache bytes); 0 = prefill only.")(f)
    f = click.option("--kv-budget-gb", default=None, type=Finite(0, min_open=True),
                     help="Add a computed line: how many sequences' KV caches fit in this many GB.")(f)
    f = click.option("--memory", is_flag=True,
                     help="Also measure each engine's resident memory once loaded and its peak after prefills and "
                          "generations, in a fresh process per engine (Linux; host memory only).")(f)
    return f


@main.command()
@_model_arg
@click.option("--method", required=True, help="Reduction method (see `vtrcompile methods`); 'none' = baseline.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Calibration folder (images + optional prompts.jsonl), or vqa-synth:val, for PruMerge's "
                   "--keep auto.")
@_method_flags
@click.option("--then", "then", default=None,
              help="Stack a second reduction inside the LLM after a vision/projector method: \"METHOD key=value "
                   "...\", e.g. --method divprune --keep 144 --then \"fastv keep=64\".")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Engine file: .onnx (ONNX Runtime), .xml (OpenVINO IR), .plan/.engine (TensorRT), .pt2 (AOTInductor).")
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt", "aoti"]), default=None,
              help="Override the backend picked by --out's extension.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device an AOTInductor (.pt2) package is compiled for.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Precision the graph is exported in (TensorRT builds strongly typed: this is its precision). "
                   "Default: the model's own (a Hugging Face checkpoint's config dtype; never upcast silently), "
                   "float32 with --weights.")
@click.option("--weights", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Weight-only compression of the linear layers, int8 or int4. ONNX Runtime (.onnx): MatMulNBits, "
                   "blocks of 128 along the input (32 where the width is no multiple of 128), the embeddings left "
                   "float. OpenVINO (.xml): NNCF, int8 per output channel, int4 in groups of 128 with the embeddings "
                   "and lm_head in int8. The activations are float32 unless --dtype says otherwise (OpenVINO keeps "
                   "the weights compressed only in float32).")
@click.option("--one-file/--two-files", "one_file", default=None,
              help="ONNX Runtime (.onnx) and OpenVINO (.xml): one file holds the prefill and the decode engine, "
                   "and each weight once, so a generating process holds the LLM's weights once instead of twice "
                   "(the default for .onnx when the model can decode). --two-files writes the prefill engine alone, "
                   "paired with the decode engine beside it: two copies of the weights, and a decode step without "
                   "the cost of running a subgraph (for .onnx measurable only on tiny models; OpenVINO copies the "
                   "KV cache into the subgraph every step, so two files stay its default). Other backends always "
                   "write two files.")
@click.option("--profile", "do_profile", is_flag=True, help="Also build the unmodified engine and compare latency.")
@click.option("--baseline-out", type=click.Path(path_type=Path), default=None,
              help="Where --profile / --triton-repo write the unmodified engine (default: <out>.baseline.<ext>).")
@click.option("--triton-repo", type=click.Path(path_type=Path), default=None,
              help="Also write a Triton model repository with the reduced and the unmodified TensorRT engines.")
@click.option("--min-prompt", default=None, type=click.IntRange(3),
              help="Shortest prompt the TensorRT profile covers (default: N image tokens + 2).")
@click.option("--max-prompt", default=None, type=click.IntRange(3),
              help="Longest prompt the engine accepts (default: 2048, or the image tokens + 512 when they need "
                   "more; at most the LLM's max_position_embeddings).")
@click.option("--workspace", default=8.0, show_default=True, type=Finite(0.1),
              help="TensorRT builder workspace limit, GiB.")
@click.option("--batch", default=None, type=click.IntRange(1, 256),
              help="Prompts per run the engines take, fixed at compile time (default 1): each row its own image "
                   "and its own selection; prompts of different lengths are left-padded (attention_mask).")
@_pickle_opt
@_tiles_opt
@_profile_opts
@_generation_opts
def optimize(model, method, calibration, then, out, backend, device, dtype, weights, one_file, do_profile, baseline_out,
             triton_repo, min_prompt, max_prompt, workspace, batch, allow_pickle, tiles, image_size, reps, warmup,
             threads, as_json, new_tokens, kv_budget_gb, memory, **method_options) -> None:
    """Insert a token reduction into MODEL and write an engine."""
    import dataclasses

    from .memory import check_fits, eager_estimate, optimize_estimate
    from .methods.options import check_options, prepare_options
    from .models.loading import load_model
    from .optimize import DTYPES, Target, backend_for, check_target, default_dtype, default_one_file
    from .optimize import optimize as run_optimize
    from .profile import compare, format_report

    given = {k: v for k, v in {**method_options, "then": then}.items() if v is not None}
    check_options(method, given, calibration)  # a bad method or option fails before loading anything
    target = Target(backend_for(out, backend), device, dtype or "float32", min_prompt, max_prompt, workspace, weights,
                    bool(one_file))
    if triton_repo is not None and target.backend != "tensorrt":
        raise VtrError("--triton-repo needs a TensorRT engine: write --out engine.plan")
    if min_prompt is not None and max_prompt is not None and min_prompt > max_prompt:
        raise VtrError(f"--min-prompt {min_prompt} is larger than --max-prompt {max_prompt}")
    if memory:
        if not do_profile:
            raise VtrError("--memory measures the engines that --profile compares: add --profile")
        from .engine.resident import check_available

        check_available()  # a system that cannot measure it fails before any work
    check_target(target)  # a missing TensorRT or GPU fails here, before any work
    src = load_model(model, allow_pickle, dtype=DTYPES[dtype] if dtype else None, tiles=tiles, image_size=image_size,
                     batch=batch)
    if dtype is None:  # the model's own precision (float32 activations with --weights)
        own = default_dtype(str(src.dtype).removeprefix("torch."), weights)
        if own not in DTYPES:
            raise VtrError(f"the model's weights are {own}, which vtrcompile does not export; give --dtype")
        target = dataclasses.replace(target, dtype=own)
        check_target(target)
    if one_file is None:  # the default: one file where ONNX Runtime decodes, two files everywhere else
        target = dataclasses.replace(target, one_file=default_one_file(target, src))
    check_fits("optimize", optimize_estimate(src, target.backend, DTYPES[target.dtype], do_profile,
                                                target.weights, target.one_file))
    if given.get("keep") == "auto" and src.weights is not None:  # PruMerge's rule runs the vision tower eagerly
        check_fits("--keep auto", eager_estimate(src, DTYPES[target.dtype]))
    given = prepare_options(src, method, given, calibration)
    res = run_optimize(src, method, given, out, target=target)
    click.echo(f"wrote {', '.join(str(p) for p in res.files)}", err=True)
    if target.one_file:
        click.echo(f"decode engine: in {out} (one file)", err=True)
    elif res.metadata.get("decode"):
        click.echo(f"decode engine: {out.parent / res.metadata['decode']['file']}", err=True)
    tokens = res.build.llm_tokens(res.build.example_inputs[0].shape[1])
    click.echo(f"{res.build.method}: tokens entering each LLM layer (example prompt): {tokens}", err=True)
    if res.findings is None:
        click.echo(f"TensorRT preflight: not run ({target.weights} weights are ONNX Runtime's MatMulNBits; TensorRT "
                   "reads the float engine)", err=True)
    elif res.findings:
        click.echo("TensorRT preflight: " + str(len(res.findings)) + " node(s) TensorRT cannot take:", err=True)
        for f in res.findings:
            click.echo(f"  {f}", err=True)
    else:
        click.echo("TensorRT preflight: passes (no unsupported or data-dependent ops)", err=True)
    if not (do_profile or triton_repo):
        return
    base_path = baseline_out or out.with_name(out.stem + ".baseline" + out.suffix)
    run_optimize(src, "none", {}, base_path, target=target)
    click.echo(f"wrote {base_path}", err=True)
    if triton_repo is not None:
        from .lower.tensorrt import read_sidecar
        from .lower.triton import model_name, write_model

        paths = [out, base_path]
        if res.metadata.get("decode"):  # the decode engine both prefill engines pair with
            paths.append(out.parent / res.metadata["decode"]["file"])
        for path in paths:
            click.echo(f"wrote {write_model(triton_repo, model_name(path.stem), path, read_sidecar(path))}", err=True)
    if not do_profile:
        return
    report = compare(out, base_path, warmup, reps, threads, new_tokens=new_tokens, kv_budget_gb=kv_budget_gb,
                     memory=memory)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@main.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--baseline", required=True, type=click.Path(path_type=Path), help="The unmodified engine.")
@click.option("--prefix", default=35, show_default=True, type=click.IntRange(0), help="Text tokens before the image.")
@click.option("--suffix", default=20, show_default=True, type=click.IntRange(1), help="Text tokens after the image.")
@_profile_opts
@_generation_opts
def profile(engine, baseline, prefix, suffix, reps, warmup, threads, as_json, new_tokens, kv_budget_gb,
            memory) -> None:
    """Compare ENGINE with the unmodified BASELINE: same backend, same inputs."""
    from .profile import compare, format_report

    report = compare(engine, baseline, warmup, reps, threads, prefix, suffix, new_tokens=new_tokens,
                     kv_budget_gb=kv_budget_gb, memory=memory)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@main.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--image", type=click.Path(path_type=Path), required=True, multiple=True,
              help="Image file (PNG, JPEG, ...); an engine built with --batch B takes B of them, one per prompt.")
@click.option("--prompt", default=None, multiple=True,
              help="Text prompt; tokenized with the tokenizer the engine carries. With --batch B: one prompt for "
                   "every image, or B prompts (left-padded to the longest).")
@click.option("--ids", default=None, multiple=True,
              help="Token ids instead of --prompt, e.g. '2,3,image,7' ('image' = the N image tokens).")
@click.option("--max-new-tokens", default=32, show_default=True, type=int, help="Stop after this many tokens.")
@click.option("--temperature", default=0.0, show_default=True, type=Finite(0),
              help="0: greedy; above 0: sample each token from the logits divided by this.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0),
              help="Sample among this many most likely tokens only (0: all; needs --temperature).")
@click.option("--top-p", default=1.0, show_default=True, type=Finite(0, 1, min_open=True),
              help="Sample among the fewest most likely tokens whose probability reaches this (1: all; needs "
                   "--temperature).")
@click.option("--seed", default=None, type=click.IntRange(0), help="Seed of the sampler (the same seed, the same "
              "answer).")
@click.option("--stream", is_flag=True, help="Print the answer as it is generated (one prompt; not with --json).")
@click.option("--threads", default=None, type=click.IntRange(1, MAX_THREADS), help="Runtime threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print tokens, text and timings as JSON.")
def generate(engine, image, prompt, ids, max_new_tokens, temperature, top_k, top_p, seed, stream, threads,
             as_json) -> None:
    """Answer PROMPT about IMAGE with ENGINE (greedy unless --temperature, until EOS or --max-new-tokens)."""
    import numpy as np

    from .engine.generate import load_engine
    from .engine.prompting import TextStream, batch_prompt, image_pixels, load_tokenizer
    from .engine.sampling import Sampling

    if bool(prompt) == bool(ids):
        raise VtrError("give the question as --prompt TEXT or as --ids '2,3,image,7', one of the two")
    if stream and (as_json or len(image) > 1):
        raise VtrError("--stream prints one answer as text: drop --json, and give one --image")
    sampling = Sampling(temperature, top_k, top_p, seed)  # checked before the engine is opened
    eng = load_engine(engine, threads)
    tok = load_tokenizer(eng.path, eng.metadata) if prompt else None
    input_ids, mask = batch_prompt(eng.metadata, len(image), list(prompt or ids), tok)
    pixels = np.concatenate([image_pixels(p, eng.metadata) for p in image])
    padding = {} if mask is None else {"attention_mask": mask}
    text = TextStream(tok) if stream and tok is not None else None
    shown: list[int] = []

    def show(tokens) -> None:  # --stream: the text each token adds, or the ids one by one
        click.echo(text.push(tokens[0]) if text is not None else f"{' ' if shown else ''}{tokens[0]}", nl=False)
        shown.append(int(tokens[0]))

    out = eng.generate(input_ids=input_ids, pixel_values=pixels, max_new_tokens=max_new_tokens,
                       temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                       seed=sampling.seed, on_token=show if stream else None, **padding)
    if stream:
        click.echo(text.rest() if text is not None else "")
    rows = []
    for i, n in enumerate(out.lengths):
        tokens = out.tokens[i, :n].tolist()
        rows.append({"tokens": tokens, "text": tok.decode(tokens, skip_special_tokens=True) if tok else None,
                     "eos": out.ended[i]})
        if mask is not None:
            rows[-1]["prompt_tokens"] = int(mask[i].sum())
    timing = {"prompt_tokens": int(input_ids.shape[1]), "time_to_first_token_ms": out.prefill_ms,
              "time_per_output_token_ms": (sum(out.decode_ms) / len(out.decode_ms)) if out.decode_ms else None,
              "choose_ms_per_token": out.choose_ms / out.tokens.shape[1], "cached_tokens_per_layer": out.cache_lengths}
    if as_json:  # batch 1: the sequence's fields at the top level; a batch: one record per sequence
        click.echo(json.dumps({**rows[0], **timing} if len(rows) == 1 else {"sequences": rows, **timing}, indent=2))
        return
    for r in rows if not stream else []:
        click.echo(r["text"] if r["text"] is not None else " ".join(map(str, r["tokens"])))
    tpot = f", {timing['time_per_output_token_ms']:.1f} ms per output token" if out.decode_ms else ""
    if not sampling.greedy:
        tpot += f" + {timing['choose_ms_per_token']:.2f} ms sampling it"
    ends = "EOS" if out.eos_reached else "max-new-tokens"
    what = f"{len(rows[0]['tokens'])} tokens" if len(rows) == 1 else \
        f"{len(rows)} sequences, {out.tokens.shape[1]} steps"
    click.echo(f"{what} ({ends}); time to first token {out.prefill_ms:.1f} ms{tpot}; prompt "
               f"{timing['prompt_tokens']} tokens", err=True)


@main.command()
@_model_arg
@_pickle_opt
@click.option("--algo", required=True, type=click.Choice(["gsearch", "psigmoid", "vtw"]),
              help="gsearch: greedy per-layer grid; psigmoid: parametric schedule by Bayesian optimisation; "
                   "vtw: VTW's layer K by the KL rule.")
@click.option("--calibration", required=True,
              help="vqa-synth:val (labelled: accuracy) or a folder of images + prompts.jsonl (fidelity).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="schedule.json to write.")
@click.option("--count", default=280, show_default=True, type=click.IntRange(1, MAX_PROMPTS), help="Calibration prompts.")
@click.option("--tolerance", default=0.01, show_default=True, type=Finite(0),
              help="gsearch: allowed drop of the metric (accuracy/agreement: fraction; kl: nats).")
@click.option("--budget", default=None, type=Finite(0, 1, min_open=True),
              help="psigmoid: mean keep fraction over the LLM layers (layer 0 keeps all).")
@click.option("--trials", default=40, show_default=True, type=click.IntRange(1, MAX_RUNS), help="psigmoid: trials.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--storage", default=None,
              help="psigmoid: optuna storage URL (default sqlite next to --out; a postgresql:// or mysql:// URL lets "
                   "several machines run trials of one study).")
@click.option("--metric", type=click.Choice(["accuracy", "agreement", "kl"]), default=None,
              help="Quality metric (default: accuracy with labels, agreement without).")
@click.option("--first", default=None,
              help="A vision or projector method that runs before the LLM, e.g. \"divprune keep=288\" or \"prumerge "
                   "keep=32\": the schedule is searched "
                   "on the tokens it leaves and compiles as --method divprune --keep 288 --then \"schedule "
                   "schedule=FILE\".")
@_tiles_opt
def search(model, allow_pickle, algo, calibration, out, count, tolerance, budget, trials, seed, storage,
           metric, first, tiles, image_size) -> None:
    """Search a per-layer keep schedule for MODEL on calibration data; compile it with --method schedule."""
    from .lower.atomic import check_writable
    from .models.loading import load_model
    from .search.job import run_search

    if algo == "psigmoid" and budget is None:
        raise VtrError("--algo psigmoid needs --budget (mean keep fraction over the layers, e.g. 0.25)")
    if first is not None:
        from .methods.registry import parse_then

        parse_then(first, "--first")  # a bad stage fails before the model loads
    check_writable(out)
    rec = run_search(load_model(model, allow_pickle, tiles=tiles, image_size=image_size), algo, calibration, out, count, tolerance, budget, trials, seed,
                     storage, metric, first)
    m = rec["metric"]
    click.echo(f"{algo}: keep per layer {rec['keep']} (mean keep fraction {rec['budget']:.4f})")
    click.echo(f"{m['name']}: {m['value']:.4f} (unreduced {m['baseline']:.4f}); {rec['evaluated_schedules']} "
               f"schedules evaluated in {rec['seconds']:.0f}s on {rec['calibration']}")
    if algo == "vtw":
        click.echo(f"VTW layer K = {rec['vtw_layer']}: vtrcompile optimize MODEL --method vtw --layer {rec['vtw_layer']}")
    if rec.get("first"):
        head, *opts = rec["first"].split()
        flags = " ".join(f"--{o.split('=')[0].replace('_', '-')} {o.split('=', 1)[1]}" for o in opts)
        click.echo(f"wrote {out}; compile it with: vtrcompile optimize MODEL --method {head} {flags} "
                   f"--then \"schedule schedule={out}\"")
    else:
        click.echo(f"wrote {out}; compile it with: vtrcompile optimize MODEL --method schedule --schedule {out}")


@main.command("eval")
@click.argument("engines", nargs=-1, type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="The unmodified engine (accuracy and speed are reported next to it).")
@click.option("--benchmark", default="vqa-synth", show_default=True,
              help="Labelled benchmark, optionally with a split: vqa-synth or vqa-synth:val.")
@click.option("--split", default=None, help="Benchmark split (train, val, test); default test.")
@click.option("--count", default=700, show_default=True, type=click.IntRange(1, MAX_PROMPTS), help="Prompts to evaluate.")
@click.option("--fidelity", is_flag=True,
              help="Report top-1 agreement and mean KL of the next-token distribution against --baseline "
                   "(no labels needed; with --calibration, on any model).")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Images folder (+ prompts.jsonl) for --fidelity instead of the benchmark.")
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="Also measure the prefill speedup against --baseline.")
@click.option("--sweep", "sweep_model", default=None, metavar="MODEL",
              help="Sweep methods x budgets on MODEL: build, evaluate and profile each; writes a table, JSON and "
                   "a plot to --out-dir.")
@click.option("--methods", default=None, help="Comma-separated methods for --sweep (default: all).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("build/sweep"), show_default=True)
@click.option("--max-new-tokens", default=1, show_default=True, type=click.IntRange(1),
              help="Above 1: answers are generated (prefill + decode engine) until EOS or this many tokens; the "
                   "first generated token is scored.")
@_profile_opts
def eval_cmd(engines, baseline, benchmark, split, count, fidelity, calibration, speed, sweep_model, methods, out_dir,
             max_new_tokens, reps, warmup, threads, as_json) -> None:
    """Accuracy of ENGINE(s) on a benchmark next to the unmodified engine, with the prefill speedup."""
    from .evaluation import evaluate

    spec = benchmark if split is None else f"{benchmark.partition(':')[0]}:{split}"
    if sweep_model is not None:  # the alias of `vtrcompile sweep MODEL`
        if engines:
            raise VtrError("--sweep builds its own engines; give either ENGINE files or --sweep MODEL")
        _sweep(sweep_model, spec, count, methods, out_dir, reps, warmup, threads, as_json)
        return
    if not engines:
        raise VtrError("give ENGINE file(s) to evaluate, or --sweep MODEL")
    report = evaluate(engines, baseline, spec, count, fidelity, calibration, speed, max_new_tokens, reps, warmup,
                      threads)
    click.echo(json.dumps(report, indent=2) if as_json else _format_eval(report))


def _sweep(model, spec, count, methods, out_dir, reps, warmup, threads, as_json) -> None:
    from . import sweep
    from .evaluation import benchmark_items
    from .models.loading import load_model

    chosen = tuple(m.strip() for m in methods.split(",")) if methods is not None else sweep.DEFAULT_METHODS
    sweep.check_methods(chosen)
    items = benchmark_items(spec, count)
    result = sweep.run(load_model(model), items, out_dir, chosen, reps, warmup, threads)
    paths = sweep.write(result, out_dir)
    click.echo(json.dumps(result, indent=2) if as_json else sweep.markdown(result))
    click.echo("wrote " + ", ".join(str(p) for p in paths), err=True)


@main.command("sweep")
@_model_arg
@click.option("--benchmark", default="vqa-synth:test", show_default=True, help="Labelled benchmark and split.")
@click.option("--count", default=700, show_default=True, type=click.IntRange(1, MAX_PROMPTS), help="Prompts to evaluate.")
@click.option("--methods", default=None, help="Comma-separated methods, or stacked pairs 'a+b' (default: all, and "
              "three stacked pairs).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("build/sweep"), show_default=True)
@_profile_opts
def sweep_cmd(model, benchmark, count, methods, out_dir, reps, warmup, threads, as_json) -> None:
    """Methods x budgets on MODEL: build, evaluate and profile each against one baseline; writes a table, JSON
    and an accuracy-vs-speedup plot to --out-dir (`eval --sweep MODEL` is the same)."""
    _sweep(model, benchmark, count, methods, out_dir, reps, warmup, threads, as_json)


def _format_eval(r: dict) -> str:
    from .profile import text_table

    head = ["engine", "method", "coarse", "fine", "overall", "top-1 agree", "mean KL", "prefill p50", "speedup"]
    rows = []
    b = r.get("baseline")
    if b:
        rows.append(["(baseline)", b.get("method", "none"), *(f"{100 * b[k]:.1f}" if b.get(k) is not None else "-"
                                             for k in ("coarse", "fine", "overall")), "", "", "", "1.00x"])
    for e in r["engines"]:
        a, f = e.get("accuracy"), e.get("fidelity")

        def pct(k, a=a):
            if not a or a.get(k) is None:
                return "-" if a else ""
            d = f" ({100 * (a[k] - b[k]):+.1f})" if b and b.get(k) is not None else ""
            return f"{100 * a[k]:.1f}{d}"
        rows.append([e["path"], e["method"], pct("coarse"), pct("fine"), pct("overall"),
                     f"{100 * f['top1_agreement']:.1f}%" if f else "", f"{f['mean_kl']:.4f}" if f else "",
                     f"{e['prefill_p50_ms']:.1f} ms" if "prefill_p50_ms" in e else "",
                     f"{e['speedup_p50']:.2f}x" if "speedup_p50" in e else ""])
    keep = [i for i in range(len(head)) if any(row[i] for row in rows)]
    lines = text_table([[head[i] for i in keep]] + [[row[i] for i in keep] for row in rows])
    gen = [e["accuracy"]["generated"] for e in r["engines"] if e.get("accuracy", {}).get("generated")]
    if gen:
        ended = ", ".join(f"{100 * g['ended_at_eos']:.0f}%" for g in gen)
        lines.append(f"answers generated (prefill + decode engines) until EOS or {gen[0]['max_new_tokens']} tokens; "
                     f"ended at EOS: {ended}; first token scored")
    return f"{r['benchmark']}: accuracy in % (points vs the baseline)\n" + "\n".join(lines)


if __name__ == "__main__":
    main()

"""Fuzzing the CLI and the Python API: damaged files of every input kind, nonsense option values and output
paths the OS refuses. Shared by the test (tests/fuzz/test_fuzz.py, a fixed seeded sample) and the figure
(benchmarks/fuzz.py, more cases per command).

The oracle, for every case: the run ends either with exit 2 and exactly one `error:` line that names the
file (or option) at fault, or with exit 0 (a damaged file that still holds a valid input, such as a flipped
bit in a weight); never another exit code, never a Python traceback, never a hang (a per-case alarm), and
never a file left behind (the folders the case can write to are compared before and after).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from vtrcompile.cli import main

MUTATIONS = ("empty", "truncated", "bitflip", "wrong-format")
WRONG_FORMATS = [b"\x89PNG\r\n\x1a\n" + bytes(40), b'{"hello": [1, 2, 3]}', b"PK\x03\x04" + bytes(60),
                 b"\x80\x04K\x01.", b"\x00" * 64, "añ\u00e9 text \u2603\n".encode()]


def mutate(data: bytes, how: str, rng: np.random.Generator) -> bytes:
    """One damaged version of `data`: emptied, cut at a random point, 1-8 random bits flipped, or replaced by
    a file of another format."""
    if how == "empty":
        return b""
    if how == "truncated":
        return data[:int(rng.integers(0, max(1, len(data))))]
    if how == "bitflip":
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, len(buf)))
            buf[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(buf)
    if how == "wrong-format":
        return WRONG_FORMATS[int(rng.integers(0, len(WRONG_FORMATS)))]
    raise ValueError(how)


@dataclass
class Case:
    """One run: `args` for the CLI (or `call` for the Python API), the folders it may write to, the words the
    error line must hold (the file's or option's name), and what it may leave behind on success."""

    command: str
    label: str
    args: list[str] = field(default_factory=list)
    call: Callable[[], object] | None = None
    names: tuple[str, ...] = ()
    watch: tuple[Path, ...] = ()
    may_create: tuple[str, ...] = ()  # file names (glob) a successful run may leave in `watch`
    isolated: bool = False  # run the CLI in a child process (inputs that load native code may crash it)


@dataclass
class Outcome:
    command: str
    label: str
    exit_code: int
    seconds: float
    problem: str | None  # None: the case passed the oracle

    def as_dict(self) -> dict:
        return self.__dict__.copy()


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    def fire(signum, frame):
        raise _Hang

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _listing(dirs: tuple[Path, ...]) -> set[Path]:
    out: set[Path] = set()
    for d in dirs:
        if d.is_dir():
            out |= set(d.rglob("*"))
    return out


def run_case(case: Case, timeout_s: int = 120) -> Outcome:
    before = _listing(case.watch)
    t0 = time.perf_counter()
    problem = None
    code = -1
    try:
        with _alarm(timeout_s):
            if case.call is not None:
                code, output = _call_api(case.call)
            elif case.isolated:
                code, output = _child(case.args, timeout_s)
            else:
                res = CliRunner().invoke(main, case.args)
                code, output = res.exit_code, res.output
                if res.exception is not None and not isinstance(res.exception, SystemExit):
                    problem = f"uncaught {type(res.exception).__name__}: {res.exception}"
    except _Hang:
        problem, output = f"no answer within {timeout_s}s", ""
    seconds = time.perf_counter() - t0
    if problem is None:
        problem = _judge(case, code, output)
    if problem is None:
        new = _listing(case.watch) - before
        stray = sorted(p for p in new if not any(p.match(g) for g in case.may_create) or code != 0
                       or any(part.startswith(".") for part in p.relative_to(_root(p, case.watch)).parts))
        if stray:
            problem = f"left behind: {[str(p) for p in stray[:3]]}"
    return Outcome(case.command, case.label, code, seconds, problem)


def _root(p: Path, dirs: tuple[Path, ...]) -> Path:
    return next(d for d in dirs if d == p or d in p.parents)


def _child(args: list[str], timeout_s: int) -> tuple[int, str]:
    import subprocess
    import sys

    try:
        p = subprocess.run([sys.executable, "-c", "from vtrcompile.cli import main; main()", *args],
                           capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return -1, f"Traceback: no answer within {timeout_s}s"
    if p.returncode < 0:
        return p.returncode, f"Traceback: killed by signal {-p.returncode}\n{p.stderr[-300:]}"
    return p.returncode, p.stdout + p.stderr


def aoti_cases(package: Path, baseline: Path, work: Path, rng: np.random.Generator, n: int) -> list[Case]:
    """Damaged copies of a real AOTInductor package (native code inside: each run in a child process)."""
    out = []
    for how, p in damaged_copies(package, work / "damaged-aoti", rng, n):
        out.append(Case("profile", f"AOTInductor .pt2 engine {how}",
                        ["profile", str(p), "--baseline", str(baseline), "--reps", "1", "--warmup", "0",
                         "--new-tokens", "0"], names=(p.name,), watch=(p.parent,), isolated=True))
    return out


def _call_api(call: Callable[[], object]) -> tuple[int, str]:
    """The Python API's contract: success, or a VtrError whose message is one line."""
    from vtrcompile.errors import VtrError

    try:
        call()
    except VtrError as e:
        return 2, f"error: {e}\n"
    except Exception as e:  # the oracle's "traceback": anything but the documented error type
        return 1, f"Traceback: uncaught {type(e).__name__}: {e}"
    return 0, ""


def _judge(case: Case, code: int, output: str) -> str | None:
    if "Traceback" in output:
        return "traceback in the output"
    if code == 0:
        return None
    if code != 2:
        return f"exit {code}"
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    if len(lines) != 1:
        return f"{len(lines)} error lines: {output.strip()[-300:]}"
    if case.names and not any(n in lines[0] for n in case.names):
        return f"the error does not name {case.names}: {lines[0][:300]}"
    return None


# ----------------------------------------------------------------------------------------------------------
# Input kinds. Each generator yields Cases for `n` seeded mutations of one kind of input.


def damaged_copies(src: Path, dest_dir: Path, rng: np.random.Generator, n: int) -> Iterator[tuple[str, Path]]:
    """`n` damaged copies of the file `src` (mutations in turn), each in its own folder under dest_dir."""
    data = src.read_bytes()
    for i in range(n):
        how = MUTATIONS[i % len(MUTATIONS)]
        d = dest_dir / f"{src.name}-{next(_SERIAL)}-{how}"
        d.mkdir(parents=True)
        p = d / src.name
        p.write_bytes(mutate(data, how, rng))
        yield how, p


def damaged_folders(src_dir: Path, target: str, dest_dir: Path, rng: np.random.Generator, n: int
                    ) -> Iterator[tuple[str, Path]]:
    """`n` copies of the folder `src_dir` with the file `target` in it damaged (or missing)."""
    data = (src_dir / target).read_bytes()
    for i in range(n):
        how = (*MUTATIONS, "missing")[i % (len(MUTATIONS) + 1)]
        d = dest_dir / f"{src_dir.name}-{target}-{next(_SERIAL)}-{how}"
        shutil.copytree(src_dir, d)
        if how == "missing":
            (d / target).unlink()
        else:
            (d / target).write_bytes(mutate(data, how, rng))
        yield how, d


_SERIAL = itertools.count()

NONSENSE = ["", "abc", "-1", "0", "1.5", "nan", "inf", "-inf", "1e309", "99999999999999999999", "1,2", "../..",
            "\u2603", " ", "--json"]


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------------------------------------
# The valid inputs every damaged one is made from.


@dataclass
class Corpus:
    root: Path
    model_dir: Path  # the tiny preset saved as a Hugging Face directory, with a word-level tokenizer
    program: Path  # its torch.export program (.pt2)
    pickle: Path  # the pickled module
    engines: Path  # folder: prefill.onnx, its decode engine, one.onnx (both as one file), tokenizer-fuzz/,
    # external.onnx(.data)
    int8: Path  # the checkpoint's one-file engine with int8 weights, in a folder with its int8 weight store
    image: Path
    calibration: Path  # images + prompts.jsonl
    schedule: Path  # a complete schedule.json for the tiny preset

    @property
    def prefill(self) -> Path:
        return self.engines / "prefill.onnx"


def _tokenizer(vocab: int, image_id: int, folder: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    words = {("<image>" if i == image_id else w): i for w, i in words.items()}
    words["<unk>"] = words.pop("w0")
    tok = Tokenizer(WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def build_corpus(root: Path, prefill: Path | None = None) -> Corpus:
    """Write the valid inputs under `root`. `prefill`: an ONNX prefill engine of the tiny preset whose decode
    engine sits beside it (built here when not given)."""
    import onnx
    import torch
    from PIL import Image

    from vtrcompile.capture import capture
    from vtrcompile.datasets import vqa_synth as vs
    from vtrcompile.engine.runners import read_engine_metadata
    from vtrcompile.errors import VtrError
    from vtrcompile.lower import onnx as onnx_lower
    from vtrcompile.models.loading import load_model
    from vtrcompile.models.presets import build_preset
    from vtrcompile.optimize import engine_metadata, model_id, write_engine

    root.mkdir(parents=True, exist_ok=True)
    tiny = load_model("tiny")
    cfg = tiny.hf_model.config
    model_dir = root / "tiny-hf"
    build_preset("tiny").save_pretrained(model_dir)
    _tokenizer(cfg.text_config.vocab_size, cfg.image_token_id, model_dir)
    program = root / "tiny.pt2"
    torch.export.save(capture(tiny), program)
    pickle = root / "tiny.pkl"
    torch.save(build_preset("tiny"), pickle)

    engines = root / "engines"
    engines.mkdir()
    if prefill is None:
        from vtrcompile.build import build

        prefill = write_engine(build(tiny, "fastv", {"layer": 2, "keep": 18}), tiny, root / "built" / "p.onnx"
                               ).files[-1]
    meta = read_engine_metadata(prefill)
    shutil.copy(prefill.parent / meta["decode"]["file"], engines / meta["decode"]["file"])
    m = onnx.load(str(prefill))
    meta["processor"] = {**meta["processor"], "tokenizer": "tokenizer-fuzz"}
    for p in m.metadata_props:
        if p.key == onnx_lower.METADATA_KEY:
            p.value = json.dumps(meta, sort_keys=True)
    onnx.save(m, str(engines / "prefill.onnx"))
    shutil.copytree(model_dir, engines / "tokenizer-fuzz",
                    ignore=lambda d, names: [n for n in names if not n.startswith("tokenizer")])
    # the same engines as one file (optimize --one-file)
    from vtrcompile.lower.onnx_phases import write_one_file

    write_one_file(engines / "one.onnx", engines / meta["decode"]["file"],
                   lambda path: shutil.copy(engines / "prefill.onnx", path))
    # an engine whose weights live in external data (normally only above 1.5 GB)
    from vtrcompile.build import build

    b = build(tiny, "none", {})
    old = onnx_lower.EXTERNAL_DATA_BYTES
    onnx_lower.EXTERNAL_DATA_BYTES = 0
    try:
        onnx_lower.export_onnx(b.program, engines / "external.onnx", engine_metadata(b, tiny))
    finally:
        onnx_lower.EXTERNAL_DATA_BYTES = old

    # the checkpoint's engine with int8 weights (optimize --weights int8), streamed: its weights in the model's
    # int8 store beside it
    from vtrcompile.optimize import Target, optimize

    int8 = root / "int8" / "int8.onnx"
    optimize(load_model(str(model_dir)), "none", {}, int8, target=Target(weights="int8", one_file=True))

    try:  # the same engines as OpenVINO IR (when OpenVINO is installed)
        from vtrcompile.lower.openvino import ir_from_onnx

        for f in (engines / "prefill.onnx", engines / meta["decode"]["file"]):
            ir_from_onnx(f, f.with_suffix(".xml"), read_engine_metadata(f))
    except VtrError:
        pass

    image = root / "image.png"
    Image.fromarray(vs.render(vs.sample("val", 0).scene)).save(image)
    calibration = root / "calibration"
    calibration.mkdir()
    for i in range(3):
        Image.fromarray(vs.render(vs.sample("val", i).scene)).save(calibration / f"img{i}.png")
    (calibration / "prompts.jsonl").write_text("".join(
        json.dumps({"image": f"img{i}.png", "prompt": f"w5 w6 <image> w7 w{8 + i}"}) + "\n" for i in range(3)))
    n = meta["n_image"]
    schedule = write_json(root / "schedule.json", {
        "format": "vtrcompile-schedule/1", "complete": True, "algo": "gsearch", "model": "preset:tiny",
        "model_id": model_id(tiny.module, tiny.program), "n_image": n, "llm_layers": meta["llm_layers"],
        "keep": [n, n, n // 2, n // 4], "evaluations": []})
    return Corpus(root, model_dir, program, pickle, engines, int8, image, calibration, schedule)


# ----------------------------------------------------------------------------------------------------------
# Cases per command. `per_kind` damaged copies of each input kind; option values drawn from NONSENSE.

def _options_cases(command: str, base: list[str], options: list[str], rng: np.random.Generator, per_kind: int,
                   watch: tuple[Path, ...], may_create: tuple[str, ...] = ()) -> list[Case]:
    """Each option with `per_kind` values from NONSENSE; a value that happens to be valid may succeed."""
    out = []
    for opt in options:
        for v in map(str, rng.choice(NONSENSE, size=min(per_kind, len(NONSENSE)), replace=False)):
            out.append(Case(command, f"{opt} {v!r}", [*base, opt, str(v)], names=(opt, str(v) or "''"),
                            watch=watch, may_create=may_create))
    return out


def _unwritable(work: Path) -> list[tuple[str, Path]]:
    """Output paths the OS refuses, each with its reason."""
    f = work / "a-file"
    f.write_text("x")
    loop = work / "loop"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    d = work / "a-dir.onnx"
    d.mkdir(exist_ok=True)
    paths = [("parent is a file", f / "x.onnx"), ("a directory", d), ("name too long", work / ("n" * 300 + ".onnx")),
             ("symlink loop", loop / "x.onnx"), ("/proc", Path("/proc/x.onnx")), ("/sys", Path("/sys/x.onnx"))]
    return [(why, p) for why, p in paths if why not in ("/proc", "/sys") or p.parent.is_dir()]


def cases(c: Corpus, rng: np.random.Generator, per_kind: int, work: Path) -> list[Case]:
    """Every command and the Python API, over every input kind."""
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "out"
    out_dir.mkdir(exist_ok=True)
    w = (out_dir, c.engines)
    damaged = work / "damaged"
    res: list[Case] = []

    # -- inspect: a model directory (config.json, safetensors), an exported program, a pickle
    for target in ("config.json", "model.safetensors"):
        for how, d in damaged_folders(c.model_dir, target, damaged, rng, per_kind):
            res.append(Case("inspect", f"{target} {how}", ["inspect", str(d)], names=(target, d.name), watch=w))
    for how, p in damaged_copies(c.program, damaged, rng, per_kind):
        res.append(Case("inspect", f".pt2 program {how}", ["inspect", str(p)], names=(p.name,), watch=w))
    for how, p in damaged_copies(c.pickle, damaged, rng, per_kind):
        res.append(Case("inspect", f"pickle {how}", ["inspect", str(p), "--allow-pickle"], names=(p.name,), watch=w))
    res.append(Case("inspect", "an engine given as a model", ["inspect", str(c.prefill)], names=("engine",), watch=w))
    res += _options_cases("inspect", ["inspect", "tiny"], ["--max-prompt"], rng, per_kind, w)

    # -- optimize: options, schedule.json, calibration folders, output paths (all refused before any build)
    out = out_dir / "x.onnx"
    base = ["optimize", "tiny", "--method", "fastv", "--out", str(out)]
    res += _options_cases("optimize", base, ["--keep", "--layer", "--drop-ratio", "--max-prompt", "--min-prompt",
                                             "--workspace", "--reps", "--kv-budget-gb", "--new-tokens", "--dtype", "--batch",
                                             "--weights"],
                          rng, per_kind, w, may_create=("x.onnx", "decode-*.onnx"))
    res += _options_cases("optimize", ["optimize", "tiny", "--out", str(out)], ["--method"], rng, per_kind, w)
    made = ("x.onnx", "decode-*.onnx")
    for method, opts in (("divprune", ["--then"]), ("random", ["--site", "--seed"]), ("pool", ["--factor"]),
                         ("dart", ["--image-pivots"])):
        res += _options_cases("optimize", ["optimize", "tiny", "--method", method, "--out", str(out)], opts, rng,
                              per_kind, w, may_create=made)
    for how, p in damaged_copies(c.schedule, damaged, rng, per_kind):
        res.append(Case("optimize", f"schedule.json {how}",
                        ["optimize", "tiny", "--method", "schedule", "--schedule", str(p), "--out", str(out)],
                        names=(p.name,), watch=w, may_create=("x.onnx", "decode-*.onnx")))
    for target in ("img0.png", "prompts.jsonl"):
        for how, d in damaged_folders(c.calibration, target, damaged, rng, per_kind):
            res.append(Case("optimize", f"calibration {target} {how}",
                            ["optimize", "tiny", "--method", "prumerge", "--keep", "auto", "--calibration", str(d),
                             "--out", str(out)], names=(target, d.name), watch=w,
                            may_create=("x.onnx", "decode-*.onnx")))
    for why, p in _unwritable(work):
        res.append(Case("optimize", f"--out {why}", [*base[:4], "--out", str(p)], names=(p.name[:40], "--out"),
                        watch=w))
    res.append(Case("optimize", "--out with a NUL byte", [*base[:4], "--out", str(out_dir / "a\x00b.onnx")],
                    names=("--out", "NUL"), watch=w))

    # -- profile: damaged prefill / decode engines, external data, nonsense options
    decode = next(c.engines.glob("decode-*.onnx"))
    prof = ["--reps", "1", "--warmup", "0", "--new-tokens", "2"]
    for how, p in damaged_copies(c.prefill, damaged, rng, per_kind):
        shutil.copy(decode, p.parent / decode.name)
        res.append(Case("profile", f"prefill engine {how}", ["profile", str(p), "--baseline", str(c.prefill), *prof],
                        names=(p.name,), watch=w))
    for how, p in damaged_copies(decode, damaged, rng, per_kind):
        shutil.copy(c.prefill, p.parent / "prefill.onnx")
        res.append(Case("profile", f"decode engine {how}",
                        ["profile", str(p.parent / "prefill.onnx"), "--baseline", str(c.prefill), *prof],
                        names=(p.name,), watch=w))
    for how, p in damaged_copies(c.engines / "one.onnx", damaged, rng, per_kind):  # holds its decode engine
        res.append(Case("profile", f"one-file engine {how}", ["profile", str(p), "--baseline", str(c.prefill), *prof],
                        names=(p.name,), watch=w))
    for how in ("missing", "truncated"):
        d = damaged / f"external-{how}"
        d.mkdir()
        shutil.copy(c.engines / "external.onnx", d / "external.onnx")
        data = (c.engines / "external.onnx.data").read_bytes()
        if how == "truncated":
            (d / "external.onnx.data").write_bytes(data[:len(data) // 2])
        res.append(Case("profile", f"external data {how}", ["profile", str(d / "external.onnx"), "--baseline",
                                                            str(c.prefill), *prof], names=("external.onnx",), watch=w))
    store = next(c.int8.parent.glob("weights-*-int8.data"))  # int8 weights: the store, the engine that reads it
    for target in (store.name, c.int8.name):
        for how, d in damaged_folders(c.int8.parent, target, damaged, rng, per_kind):
            res.append(Case("profile", f"int8 engine's {target.split('-')[0]} {how}",
                            ["profile", str(d / c.int8.name), "--baseline", str(d / c.int8.name), *prof],
                            names=(c.int8.name, target), watch=w))
    res.append(Case("profile", "a decode engine as the baseline",
                    ["profile", str(c.prefill), "--baseline", str(decode), *prof], names=(decode.name,), watch=w))
    for how, p in damaged_copies(c.program, damaged, rng, 2):  # an AOTInductor package that is not one
        q = p.with_name("engine.pt2")
        p.rename(q)
        res.append(Case("profile", f".pt2 engine {how}", ["profile", str(q), "--baseline", str(c.prefill), *prof],
                        names=(q.name,), watch=w))
    xml = c.engines / "prefill.xml"
    if xml.is_file():  # OpenVINO IR: damaged .xml, damaged or missing .bin
        for part in (".xml", ".bin"):
            for how, p in damaged_copies(xml.with_suffix(part), damaged, rng, per_kind):
                for f in c.engines.glob("*"):
                    if f.suffix in (".xml", ".bin") and f.name != p.name:
                        shutil.copy(f, p.parent / f.name)
                res.append(Case("profile", f"OpenVINO {part} {how}",
                                ["profile", str(p.parent / "prefill.xml"), "--baseline", str(xml), *prof],
                                names=("prefill.xml",), watch=w))
        d = damaged / "ir-no-bin"
        d.mkdir()
        shutil.copy(xml, d / xml.name)
        res.append(Case("profile", "OpenVINO .bin missing", ["profile", str(d / xml.name), "--baseline", str(xml),
                                                             *prof], names=("prefill.xml",), watch=w))
    # TensorRT: a .plan with its sidecar (this machine has no TensorRT: the sidecar is still read first)
    plan_dir = damaged / "plan"
    plan_dir.mkdir()
    (plan_dir / "e.plan").write_bytes(bytes(rng.integers(0, 256, 256, dtype=np.uint8)))
    write_json(plan_dir / "e.plan.json", {"vtrcompile_metadata": _meta(c.prefill), "versions": {}})
    for how, p in damaged_copies(plan_dir / "e.plan.json", damaged, rng, per_kind):
        shutil.copy(plan_dir / "e.plan", p.parent / "e.plan")
        res.append(Case("profile", f"TensorRT sidecar {how}", ["profile", str(p.parent / "e.plan"), "--baseline",
                                                               str(p.parent / "e.plan"), *prof],
                        names=("e.plan",), watch=w))
        res.append(Case("inspect", f"TensorRT engine (sidecar {how}) as a model", ["inspect", str(p.parent / "e.plan")],
                        names=("e.plan",), watch=w))
    res += _options_cases("profile", ["profile", str(c.prefill), "--baseline", str(c.prefill)],
                          ["--reps", "--warmup", "--prefix", "--suffix", "--threads", "--new-tokens"], rng, per_kind, w)

    # -- generate: damaged images, tokenizer files, engines; nonsense options
    gen = ["generate", str(c.prefill), "--max-new-tokens", "3", "--ids", "5,image,7"]
    for how, p in damaged_copies(c.image, damaged, rng, per_kind):
        res.append(Case("generate", f"image {how}", [*gen, "--image", str(p)],
                        names=(p.name,), watch=w))
    for target in ("tokenizer.json", "tokenizer_config.json"):
        for how, d in damaged_folders(c.engines / "tokenizer-fuzz", target, damaged, rng, per_kind):
            for f in (c.prefill, next(c.engines.glob("decode-*.onnx"))):
                shutil.copy(f, d.parent / f"{d.name}-{f.name}" if f == c.prefill else d.parent / f.name)
            prefill = d.parent / f"{d.name}-prefill.onnx"
            _retarget_tokenizer(prefill, d.name)
            res.append(Case("generate", f"tokenizer {target} {how}",
                            ["generate", str(prefill), "--image", str(c.image), "--prompt", "w5 w9",
                             "--max-new-tokens", "2"], names=("tokenizer", target), watch=w))
    res += _options_cases("generate", [*gen, "--image", str(c.image)],
                          ["--ids", "--max-new-tokens", "--threads", "--temperature"], rng, per_kind, w)
    res += _options_cases("generate", [*gen, "--image", str(c.image), "--temperature", "1"],  # sampling's own
                          ["--top-k", "--top-p", "--seed"], rng, per_kind, w)

    # -- eval: damaged calibration folders (fidelity), nonsense options
    ev = ["eval", str(c.prefill), "--baseline", str(c.prefill), "--no-speed", "--fidelity"]
    for target in ("img1.png", "prompts.jsonl"):
        for how, d in damaged_folders(c.calibration, target, damaged, rng, per_kind):
            res.append(Case("eval", f"calibration {target} {how}", [*ev, "--calibration", str(d)],
                            names=(target, d.name), watch=w))
    res += _options_cases("eval", ["eval", str(c.prefill), "--baseline", str(c.prefill)],
                          ["--benchmark", "--split"], rng, per_kind, w)
    res += _options_cases("eval", [*ev, "--calibration", str(c.calibration)],  # otherwise valid: values may pass
                          ["--count", "--max-new-tokens", "--threads"], rng, per_kind, w)

    # -- search: damaged calibration, a damaged resume file at --out, output paths, nonsense options
    sched = out_dir / "s.json"
    se = ["search", "tiny", "--algo", "gsearch", "--count", "2", "--out", str(sched)]
    for how, d in damaged_folders(c.calibration, "prompts.jsonl", damaged, rng, per_kind):
        res.append(Case("search", f"calibration prompts.jsonl {how}", [*se, "--calibration", str(d)],
                        names=("prompts.jsonl", d.name), watch=w, may_create=("s.json",)))
    for how, p in damaged_copies(c.schedule, damaged, rng, per_kind):
        res.append(Case("search", f"resume file {how}",
                        [*se[:-2], "--calibration", str(c.calibration), "--out", str(p)],
                        names=(p.name,), watch=(*w, p.parent), may_create=()))
    for why, p in _unwritable(work)[:3]:
        res.append(Case("search", f"--out {why}", [*se[:-2], "--calibration", str(c.calibration), "--out", str(p)],
                        names=(p.name[:40], "--out"), watch=w))
    res += _options_cases("search", [*se, "--calibration", str(c.calibration)],
                          ["--algo", "--tolerance", "--budget", "--trials", "--seed", "--metric", "--count", "--first"],
                          rng, per_kind, w, may_create=("s.json", "s.optuna.db"))

    # -- sweep and methods: nonsense options, output folders
    sw = ["sweep", "tiny", "--out-dir", str(out_dir / "sweep")]
    res += _options_cases("sweep", sw, ["--methods", "--count", "--benchmark"], rng, per_kind, w)
    res.append(Case("sweep", "--out-dir is a file", ["sweep", "tiny", "--out-dir", str(work / "a-file")],
                    names=("a-file",), watch=w))
    res += [Case("methods", f"extra argument {v!r}", ["methods", "--json", v], watch=w)
            for v in map(str, rng.choice(NONSENSE, size=3, replace=False))]

    # -- the Python API
    res += api_cases(c, damaged, rng, per_kind)
    return res


def api_cases(c: Corpus, damaged: Path, rng: np.random.Generator, per_kind: int) -> list[Case]:
    from vtrcompile import load_engine

    res = []
    for how, p in damaged_copies(c.prefill, damaged / "api", rng, per_kind):
        shutil.copy(next(c.engines.glob("decode-*.onnx")), p.parent)
        res.append(Case("load_engine", f"prefill engine {how}",
                        call=lambda p=p: load_engine(p).generate(max_new_tokens=2, **_inputs(c)), names=(p.name,)))
    res.append(Case("load_engine", "missing file", call=lambda: load_engine(damaged / "none.onnx"),
                    names=("none.onnx",)))
    engine = load_engine(c.prefill)
    ids, px = _inputs(c)["input_ids"], _inputs(c)["pixel_values"]
    bad_inputs = {
        "no pixel_values": {"input_ids": ids},
        "an unknown input": {"input_ids": ids, "pixel_values": px, "pixel_mask": px},
        "float ids": {"input_ids": ids.astype(np.float32), "pixel_values": px},
        "1-D ids": {"input_ids": ids[0], "pixel_values": px},
        "no image tokens": {"input_ids": ids[:, :3], "pixel_values": px},
        "pixels of another size": {"input_ids": ids, "pixel_values": px[:, :, :10, :10]},
        "nested lists": {"input_ids": ids.tolist(), "pixel_values": px},
        "string ids": {"input_ids": "1 2 3", "pixel_values": px},
        "attention_mask with zeros": {"input_ids": ids, "pixel_values": px, "attention_mask": np.zeros_like(ids)},
        "batch of two": {"input_ids": np.repeat(ids, 2, 0), "pixel_values": np.repeat(px, 2, 0)},
    }
    for label, inputs in bad_inputs.items():
        res.append(Case("engine()", label, call=lambda i=inputs: engine(**i), names=()))
        res.append(Case("engine.generate", label, call=lambda i=inputs: engine.generate(max_new_tokens=2, **i),
                        names=()))
    for v in (0, -1, 1.5, "3", 10**9):
        res.append(Case("engine.generate", f"max_new_tokens={v!r}",
                        call=lambda v=v: engine.generate(max_new_tokens=v, **_inputs(c)),
                        names=("max_new_tokens", "new tokens")))
    for kw, v in (("temperature", -1.0), ("temperature", "hot"), ("temperature", float("inf")), ("top_k", 2.5),
                  ("top_p", 0), ("top_p", None), ("seed", "x"), ("seed", -1), ("on_token", 3)):
        sampled = {"temperature": 1.0, kw: v} if kw != "temperature" else {kw: v}
        res.append(Case("engine.generate", f"{kw}={v!r}",
                        call=lambda s=sampled: engine.generate(max_new_tokens=2, **s, **_inputs(c)), names=(kw,)))
    return res


def _retarget_tokenizer(engine: Path, folder: str) -> None:
    """Point an ONNX engine's metadata at another tokenizer folder beside it."""
    import onnx

    from vtrcompile.lower.onnx import METADATA_KEY

    m = onnx.load(str(engine))
    for p in m.metadata_props:
        if p.key == METADATA_KEY:
            meta = json.loads(p.value)
            meta["processor"]["tokenizer"] = folder
            p.value = json.dumps(meta, sort_keys=True)
    onnx.save(m, str(engine))


def _meta(engine: Path) -> dict:
    from vtrcompile.engine.runners import read_engine_metadata

    return read_engine_metadata(engine)


def _inputs(c: Corpus) -> dict[str, np.ndarray]:
    from vtrcompile.engine.prompting import image_pixels, parse_ids
    from vtrcompile.engine.runners import read_engine_metadata

    meta = read_engine_metadata(c.prefill)
    return {"input_ids": parse_ids("5 6 image 7", meta), "pixel_values": image_pixels(c.image, meta)}

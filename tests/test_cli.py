"""The CLI end to end on the tiny preset, and every bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from vtrcompile.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _assert_clean_error(res, out_dir: Path, *words: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output and "Usage:" not in res.output, res.output
    for w in words:
        assert w in res.output, res.output
    assert not any(p.suffix in (".onnx", ".data") or p.name.startswith(".") for p in out_dir.rglob("*")), \
        list(out_dir.rglob("*"))


def test_inspect_tiny_json():
    res = _run("inspect", "tiny", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["boundary"]["n_image"] == 36
    assert len(report["decoder_layers"]) == 4
    assert {t["role"] for t in report["sequence"]["side_tensors"]} == {"seq_len", "cos", "sin", "mask"}
    assert report["written_between_layers"] == []  # a reduction may sit at any layer


def test_methods_lists_defaults():
    res = _run("methods", "--json")
    rows = {r["method"]: r for r in json.loads(res.output)}
    assert rows["fastv"]["options"] == {"layer": 2, "drop-ratio": 0.5, "keep": None}
    assert rows["gprune"]["site"] == "projector"


def test_optimize_profile_and_profile_command(tmp_path):
    out = tmp_path / "fastv.onnx"
    res = _run("optimize", "tiny", "--method", "fastv", "--keep", "8", "--out", str(out), "--profile",
               "--reps", "3", "--warmup", "1", "--json")
    assert res.exit_code == 0, res.output
    assert "TensorRT preflight: passes" in res.output
    report = json.loads(res.output[res.output.index("{\n"):])
    assert report["engines"]["reduced"]["llm_tokens_per_layer"][-1] == report["prompt_tokens"] - 28
    assert report["engines"]["baseline"]["method"] == "none"
    assert report["flops_ratio"] > 1
    assert report["engines"]["reduced"]["latency"]["reps"] == 3
    assert (tmp_path / "fastv.baseline.onnx").is_file()
    res = _run("profile", str(out), "--baseline", str(tmp_path / "fastv.baseline.onnx"), "--reps", "2")
    assert res.exit_code == 0, res.output
    assert "prefill speedup (p50)" in res.output and "selector cost" in res.output
    # generation profile (default 32 new tokens): TTFT, TPOT, end to end, KV bytes, computed sequence count
    res = _run("profile", str(out), "--baseline", str(tmp_path / "fastv.baseline.onnx"), "--reps", "2",
               "--new-tokens", "4", "--kv-budget-gb", "1", "--json")
    assert res.exit_code == 0, res.output
    g = json.loads(res.output[res.output.index("{\n"):])["generation"]
    red, base = g["engines"]["reduced"], g["engines"]["baseline"]
    assert red["cached_tokens_per_layer"] == [base["cached_tokens_per_layer"][0]] * 2 + \
        [base["cached_tokens_per_layer"][0] - 28] * 2
    assert red["cache_matches_schedule"] and base["cache_matches_schedule"]
    assert g["kv_ratio"] == pytest.approx(sum(red["cached_tokens_per_layer"]) / sum(base["cached_tokens_per_layer"]))
    assert red["kv_bytes_after_prefill"] == 2 * 2 * 16 * 4 * sum(red["cached_tokens_per_layer"])  # k+v, 2 heads, d 16, f32
    assert g["kv_budget"]["sequences_reduced"] >= g["kv_budget"]["sequences_baseline"] > 0
    # generate from token ids (the tiny preset has no tokenizer)
    from PIL import Image

    img = tmp_path / "img.png"
    Image.new("RGB", (120, 90), (200, 30, 30)).save(img)
    res = _run("generate", str(out), "--image", str(img), "--ids", "5,6,image,7,8", "--max-new-tokens", "5", "--json")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output[res.output.index("{\n"):])
    assert len(rec["tokens"]) == 5 and rec["prompt_tokens"] == 4 + 36 and rec["text"] is None
    assert rec["cached_tokens_per_layer"] == [40, 40, 12, 12]
    # sampled: the same seed, the same tokens; --stream prints them as they come, the same ones
    sample = ("generate", str(out), "--image", str(img), "--ids", "5,6,image,7,8", "--max-new-tokens", "5",
              "--temperature", "3", "--top-p", "0.9", "--seed", "4")
    runs = [_run(*sample, "--json") for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    sampled = [json.loads(r.output[r.output.index("{\n"):])["tokens"] for r in runs]
    assert sampled[0] == sampled[1] != rec["tokens"]
    res = _run(*sample, "--stream")
    assert res.exit_code == 0, res.output
    assert res.stdout == " ".join(map(str, sampled[0])) + "\n"
    # bad generation requests: one line, exit 2
    for args, words in [(("--ids", "5,image,7", "--max-new-tokens", "0"), ("at least 1",)),
                        (("--prompt", "hello"), ("no tokenizer", "--ids")),
                        (("--ids", "5,image,99999"), ("99999",)),
                        ((), ("--prompt", "--ids")),
                        (("--ids", "5,image,7", "--max-new-tokens", "2000"), ("exceed",)),
                        (("--ids", "5,image,7", "--top-k", "3"), ("temperature above 0",)),
                        (("--ids", "5,image,7", "--temperature", "1", "--top-p", "0"), ("--top-p", "0<x<=1")),
                        (("--ids", "5,image,7", "--temperature", "1e309"), ("--temperature", "1e309")),
                        (("--ids", "5,image,7", "--stream", "--json"), ("--stream", "--json"))]:
        _assert_clean_error(_run("generate", str(out), "--image", str(img), *args), tmp_path / "none", *words)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    _assert_clean_error(_run("generate", str(out), "--image", str(broken), "--ids", "5,image,7"), tmp_path / "none",
                        "broken.png", "not a readable image")
    _assert_clean_error(_run("generate", str(out), "--image", str(tmp_path / "nope.png"), "--ids", "5,image,7"),
                        tmp_path / "none", "image not found")


@pytest.mark.parametrize("args,words", [
    (["nope/missing"], ["model not found", "nope/missing"]),
    (["tiny", "--method", "magic"], ["unknown method 'magic'"]),
    (["tiny", "--method", "fastv", "--keep", "37"], ["--keep 37 is outside 1..36"]),
    (["tiny", "--method", "fastv", "--keep", "0"], ["--keep"]),
    (["tiny", "--method", "fastv", "--layer", "9"], ["--layer 9 is outside 1..3"]),
    (["tiny", "--method", "gprune", "--drop-ratio", "0.3"], ["gprune does not take --drop-ratio"]),
    (["tiny", "--method", "fastv", "--drop-ratio", "1.5"], ["--drop-ratio 1.5 is outside [0, 1)"]),
    (["tiny", "--method", "pumer", "--keep", "auto"], ["--keep auto is PruMerge's"]),
    (["tiny", "--method", "fastv", "--weights", "int8", "--dtype", "bfloat16"], ["--weights int8", "float32"]),
    (["tiny", "--method", "fastv", "--weights", "int4", "--dtype", "float16"], ["--weights int4", "float32"]),
    (["tiny", "--method", "fastv", "--weights", "int3"], ["'int3' is not one of 'none', 'int8', 'int4'"]),
])
def test_bad_optimize_arguments(tmp_path, args, words):
    model, *rest = args
    res = _run("optimize", model, *(rest or ["--method", "fastv"]), "--out", str(tmp_path / "x.onnx"))
    _assert_clean_error(res, tmp_path, *words)


def test_a_program_that_is_not_a_vision_language_model_is_named(tmp_path):
    """A torch.export program that loads but whose graph the analysis cannot read (here a text-only LLM; fuzzing
    found one in a bit-flipped program file): `inspect` and `optimize` name the file, then the structure missing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    class TextOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100))

        def forward(self, input_ids, pixel_values):
            return self.lm(input_ids=input_ids, use_cache=False).logits[:, -1]

    program = tmp_path / "text-only.pt2"
    ids = torch.randint(0, 100, (1, 12))
    torch.export.save(torch.export.export(TextOnly().eval(), (ids, torch.zeros(1, 3, 4, 4))), program)
    for cmd in (["inspect", str(program)],
                ["optimize", str(program), "--method", "fastv", "--out", str(tmp_path / "x.onnx")]):
        _assert_clean_error(_run(*cmd), tmp_path, f"error: {program}: ", "visual tokens enter the LLM")


def test_corrupt_and_wrong_format_files(tmp_path):
    bad_pt2 = tmp_path / "broken.pt2"
    bad_pt2.write_bytes(b"PK\x03\x04 this is not a zip")
    _assert_clean_error(_run("optimize", str(bad_pt2), "--method", "fastv", "--out", str(tmp_path / "a.onnx")),
                        tmp_path, "not a readable torch.export program")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _assert_clean_error(_run("optimize", str(text), "--method", "fastv", "--out", str(tmp_path / "b.onnx")),
                        tmp_path, "--allow-pickle")
    _assert_clean_error(_run("optimize", str(text), "--allow-pickle", "--method", "fastv",
                             "--out", str(tmp_path / "c.onnx")), tmp_path, "could not unpickle")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{not json")
    _assert_clean_error(_run("optimize", str(hf), "--method", "fastv", "--out", str(tmp_path / "d.onnx")),
                        tmp_path, "not valid JSON")


def test_unwritable_output_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        res = _run("optimize", "tiny", "--method", "fastv", "--out", str(locked / "x.onnx"))
        _assert_clean_error(res, tmp_path, "not writable")
    finally:
        os.chmod(locked, 0o700)


def test_unwritable_output_directory_reported(tmp_path, monkeypatch):
    """Same check where the tests run as root (who may write anywhere): the directory reads as read-only."""
    real = os.access
    locked = tmp_path / "ro"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    res = _run("optimize", "tiny", "--method", "fastv", "--out", str(locked / "x.onnx"))
    _assert_clean_error(res, tmp_path, "not writable")


def test_output_path_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    res = _run("optimize", "tiny", "--method", "fastv", "--out", str(f / "x.onnx"))
    _assert_clean_error(res, tmp_path, "is not a directory")


def test_os_refuses_the_output_path(tmp_path):
    """/proc looks writable to root but the kernel refuses new files there: one line, before any build."""
    if not Path("/proc").is_dir():
        pytest.skip("no /proc")
    res = _run("optimize", "tiny", "--method", "fastv", "--out", "/proc/x.onnx")
    _assert_clean_error(res, tmp_path, "cannot write /proc/x.onnx")
    assert "built" not in res.output


def test_engine_given_as_a_model_and_invalid_config(tmp_path):
    engine = tmp_path / "e.onnx"
    assert _run("optimize", "tiny", "--method", "none", "--out", str(engine)).exit_code == 0
    res = _run("inspect", str(engine))
    _assert_clean_error(res, tmp_path / "none", "is a vtrcompile prefill engine", "not a model")
    assert "--allow-pickle" not in res.output
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = json.loads((Path(__file__).parents[1] / "models" / "vqa-synth-llava" / "config.json").read_text())
    cfg["text_config"]["num_attention_heads"] = "many"
    (hf / "config.json").write_text(json.dumps(cfg))
    res = _run("inspect", str(hf))
    _assert_clean_error(res, tmp_path / "none", "config.json", "not a valid LlavaConfig")
    assert "safetensors" not in res.output
    # a config that parses but names an activation the model code lacks (found by the fuzz run, seed 23)
    demo = Path(__file__).parents[1] / "models" / "vqa-synth-llava"
    cfg = json.loads((demo / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "quick_g%lu"
    (hf / "config.json").write_text(json.dumps(cfg))
    (hf / "model.safetensors").symlink_to(demo / "model.safetensors")
    res = _run("inspect", str(hf))
    _assert_clean_error(res, tmp_path / "none", "config.json", "does not build a model", "quick_g%lu")


def test_unknown_output_extension(tmp_path):
    res = _run("optimize", "tiny", "--method", "fastv", "--out", str(tmp_path / "x.bin"))
    _assert_clean_error(res, tmp_path, "unknown output type")


def test_the_default_prompt_range_makes_room_for_many_image_tokens():
    """onevision-geometry has 2214 image tokens: without --max-prompt the engine takes up to N + 512 (not 2048,
    which would leave no room for text); a --max-prompt too small for them is refused in one line."""
    r = CliRunner().invoke(main, ["inspect", "onevision-geometry", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["sequence"]["range"] == [2214 + 2, 2214 + 512]
    r = CliRunner().invoke(main, ["inspect", "onevision-geometry", "--max-prompt", "2048"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1].startswith("error: --max-prompt 2048 leaves no room for text around 2214")

"""The shipped demo model loads with plain transformers and answers vqa-synth as its model card says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vtrcompile.datasets import vqa_synth as vs

MODEL = Path(__file__).resolve().parents[2] / "models" / "vqa-synth-llava"


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(MODEL, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(MODEL, local_files_only=True)


def test_checkpoint_is_small_and_complete():
    size = sum(p.stat().st_size for p in MODEL.glob("*.safetensors"))
    assert 0 < size <= 20e6
    for f in ("config.json", "tokenizer.json", "processor_config.json", "README.md", "card.json"):
        assert (MODEL / f).is_file()


def test_tokenizer_speaks_the_benchmark_vocabulary(shipped):
    _, tok = shipped
    s = vs.sample("test", 0)
    assert tok.convert_tokens_to_ids(list(s.prompt)) == vs.encode(s.prompt).tolist()
    assert tok(" ".join(s.prompt), add_special_tokens=False)["input_ids"] == vs.encode(s.prompt).tolist()


@torch.no_grad()
def test_test_split_sample_matches_the_model_card(shipped):
    model, tok = shipped
    card = json.loads((MODEL / "card.json").read_text())["ci_sample"]
    right: dict[str, list[int]] = {"coarse": [], "fine": []}
    by_length: dict[int, list] = {}
    for i in range(card["count"]):
        s = vs.sample("test", i)
        by_length.setdefault(len(s.prompt), []).append(s)
    for group in by_length.values():  # one forward per prompt length: no padding, the model's own numbers
        ids = torch.tensor([tok.convert_tokens_to_ids(list(s.prompt)) for s in group])
        px = torch.from_numpy(vs.pixel_values(np.stack([vs.render(s.scene) for s in group])))
        preds = model(input_ids=ids, pixel_values=px, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1)
        for s, pred in zip(group, preds.tolist(), strict=True):
            right[vs.KINDS[s.kind]].append(int(tok.convert_ids_to_tokens(pred) == s.answer))
    assert sum(map(len, right.values())) == card["count"]
    for cls, hits in right.items():
        # Same prompts, same weights: equal up to an argmax flipped by float noise.
        assert abs(sum(hits) - round(card[cls] * len(hits))) <= 1, cls
    # The targets (>= 90% coarse, >= 70% fine on the test split), on this sample of it; chance is about
    # 40% coarse and 17% fine, so a checkpoint that lost either skill fails here.
    assert sum(right["coarse"]) / len(right["coarse"]) >= 0.90
    assert sum(right["fine"]) / len(right["fine"]) >= 0.70


@pytest.fixture(scope="module")
def fastv288(tmp_path_factory):
    """`vtrcompile optimize` of the demo model: FastV keeping 288 image tokens, one file (the default for .onnx)."""
    from tests.test_cli import _run

    out = tmp_path_factory.mktemp("fastv288") / "fastv.onnx"
    res = _run("optimize", str(MODEL), "--method", "fastv", "--keep", "288", "--out", str(out))
    assert res.exit_code == 0, res.output
    return out


def test_generate_answers_from_the_engine_folder_alone(fastv288, tmp_path):
    """optimize -> generate with an image file and a text prompt: the tokenizer and chat template travel with
    the engine (the model directory is not read by generate); the answer is the benchmark's."""
    from PIL import Image

    from tests.test_cli import _run

    out = fastv288
    assert sorted(p.name for p in out.parent.iterdir() if p.is_dir()) == ["tokenizer-" + json.loads(
        _meta(out))["model_id"][:12]]
    hits = 0
    for i in (3, 10, 17):  # "what colour is the big shape ?" (question kinds cycle with period 7)
        s = vs.sample("test", i)
        assert s.kind == "shape_colour"
        img = tmp_path / f"{i}.png"
        Image.fromarray(vs.render(s.scene)).save(img)
        res = _run("generate", str(out), "--image", str(img), "--prompt", "what colour is the big shape ?",
                   "--max-new-tokens", "3", "--json")
        assert res.exit_code == 0, res.output
        rec = json.loads(res.output[res.output.index("{\n"):])
        assert len(rec["tokens"]) == 3 and rec["cached_tokens_per_layer"][-1] == rec["prompt_tokens"] - 288
        hits += rec["text"].split()[0] == s.answer
    assert hits >= 2  # the model answers this kind at ~96%; one miss is allowed
    res = _run("generate", str(out), "--image", str(img), "--prompt", "what colour is the big shape ?",
               "--max-new-tokens", "3", "--stream")
    assert res.exit_code == 0 and res.stdout == rec["text"] + "\n", res.output  # the same text, as it came


def test_hugging_face_s_processor_feeds_the_engine_as_generate_does(fastv288, tmp_path):
    """The demo model's own processor (AutoProcessor from its directory: LlavaProcessor with CLIP's image
    processor, its settings in processor_config.json) gives for a prompt through the chat template and an image
    of any size the input_ids and pixel_values `generate` builds from the engine folder (the pixels bit for bit:
    the same resize, rounding of the longer side and crop), so `engine.generate(**processor(...))` answers as
    `vtrcompile generate` does."""
    from PIL import Image
    from transformers import AutoProcessor

    from vtrcompile import load_engine
    from vtrcompile.engine.prompting import image_pixels, load_tokenizer, prompt_ids

    processor = AutoProcessor.from_pretrained(MODEL, local_files_only=True)
    engine = load_engine(fastv288, threads=2)
    tokenizer = load_tokenizer(fastv288, engine.metadata)
    question = "what colour is the big shape ?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    # transformers' PIL image processor (no torchvision here) resizes as the family does; with torchvision
    # installed AutoProcessor picks its own resize, whose antialiasing differs slightly
    exact = type(processor.image_processor).__name__.endswith("Pil")
    scene = Image.fromarray(vs.render(vs.sample("test", 3).scene))
    for size in [(336, 336), (500, 333), (333, 500), (1001, 777)]:
        img = tmp_path / f"{size[0]}x{size[1]}.png"
        scene.resize(size, Image.BICUBIC).save(img)
        inputs = processor(images=Image.open(img), text=text, return_tensors="np")
        ids, px = prompt_ids(tokenizer, engine.metadata, question), image_pixels(img, engine.metadata)
        assert np.array_equal(inputs["input_ids"], ids) and inputs["pixel_values"].shape == px.shape
        assert float(np.abs(inputs["pixel_values"] - px).max()) <= (0.0 if exact else 0.1), size
        theirs = engine.generate(**inputs, max_new_tokens=3)
        ours = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=3)
        assert theirs.tokens.tolist() == ours.tokens.tolist(), size
        if exact:
            assert np.array_equal(theirs.logits, ours.logits)


def test_eval_opens_each_engine_once(fastv288, opened_engines):
    """Every open engine holds its own copy of the weights: `eval` with generated answers and the speed profile
    opens each engine once (it opened the prefill engines three times: for generating, for scoring and again for
    the profile). `optimize` wrote one file (its default for .onnx), so the decode phase runs on the prefill's
    session and the decode engine beside it is never opened (engine pairs: tests/engine/test_resident.py)."""
    from vtrcompile.evaluation import evaluate

    # the engine as its own baseline (no second build): two engines all the same, each opened once
    rep = evaluate([fastv288], fastv288, "vqa-synth", 7, False, None, True, max_new_tokens=2, reps=2, warmup=0)
    assert rep["baseline"].pop("method") == "fastv"  # the baseline's own method, named in the table's first row
    assert rep["engines"][0]["speedup_p50"] > 0 and rep["engines"][0]["accuracy"] == rep["baseline"]
    assert json.loads(_meta(fastv288))["decode"]["file"] == "fastv.onnx"  # one file
    assert opened_engines == ["fastv.onnx", "fastv.onnx"], opened_engines


def _meta(path: Path) -> str:
    from vtrcompile.lower.onnx import METADATA_KEY, read_metadata

    assert METADATA_KEY == "vtrcompile"
    return json.dumps(read_metadata(path))


@pytest.mark.slow
def test_a_batch_engine_answers_left_padded_questions_from_the_tokenizer(shipped, tmp_path):
    """Four vqa-synth questions of different lengths, tokenized by the model's own tokenizer with
    padding_side="left" and handed to a batch-4 PruMerge engine as the tokenizer returns them: each row
    generates what the batch-1 engine generates for that question alone."""
    import numpy as np

    from vtrcompile import load_engine
    from vtrcompile.models.loading import load_model
    from vtrcompile.optimize import optimize

    _, tok = shipped
    items = [vs.sample("test", i) for i in (3, 4, 5, 6)]
    batch = tok([" ".join(s.prompt) for s in items], padding=True, padding_side="left", add_special_tokens=False,
                return_tensors="np")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the questions really differ in length
    px = np.concatenate([vs.pixel_values(vs.render(s.scene)[None]) for s in items])
    four = load_engine(optimize(load_model(str(MODEL), batch=4), "prumerge", {}, tmp_path / "b4.onnx").files[-1])
    one = load_engine(optimize(load_model(str(MODEL)), "prumerge", {}, tmp_path / "b1.onnx").files[-1])
    out = four.generate(**batch, pixel_values=px, max_new_tokens=3)
    for r, s in enumerate(items):
        alone = one.generate(input_ids=tok.convert_tokens_to_ids(list(s.prompt)), pixel_values=px[r:r + 1],
                             max_new_tokens=3)
        n = out.lengths[r]
        assert out.tokens[r, :n].tolist() == alone.tokens[0].tolist()
        assert float(np.abs(out.logits[r, :n] - alone.logits[0]).max()) <= 1e-4


@pytest.mark.slow
def test_eval_of_batch_engines_equals_eval_of_batch_1_engines(tmp_path):
    """`eval` on batch-4 engines (the questions left-padded in runs of four, the last run filled up) scores
    exactly what it scores on batch-1 engines, for the prefill's answer and for generated answers."""
    from vtrcompile.evaluation import evaluate
    from vtrcompile.models.loading import load_model
    from vtrcompile.optimize import optimize

    paths = {}
    for b in (1, 4):
        src = load_model(str(MODEL), batch=b)
        paths[b] = [optimize(src, m, o, tmp_path / f"{m}-b{b}.onnx").files[-1]
                    for m, o in (("fastv", {"keep": 64}), ("none", {}))]
    for new_tokens in (1, 3):
        reports = {b: evaluate([p[0]], p[1], "vqa-synth", 30, True, None, False, new_tokens) for b, p in paths.items()}
        one, four = reports[1], reports[4]
        assert four["baseline"] == one["baseline"]
        assert four["engines"][0]["accuracy"] == one["engines"][0]["accuracy"]
        assert four["engines"][0]["fidelity"]["top1_agreement"] == one["engines"][0]["fidelity"]["top1_agreement"]
        assert four["engines"][0]["fidelity"]["mean_kl"] == pytest.approx(one["engines"][0]["fidelity"]["mean_kl"],
                                                                         abs=1e-5)

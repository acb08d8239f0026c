"""Every MODEL form the CLI takes: HF directory, torch.export file, pickle (opt-in), preset; and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REFERENCE_ATOL, max_diff
from vtrcompile.build import build
from vtrcompile.capture import capture
from vtrcompile.errors import UnsupportedModelError, VtrError
from vtrcompile.models.loading import load_model
from vtrcompile.reference.methods import fastv_reference


def test_hf_directory_round_trip(tiny, tmp_path):
    tiny.hf_model.save_pretrained(tmp_path / "m")
    src = load_model(str(tmp_path / "m"), stream=False)  # run eagerly below: weights in memory
    assert src.kind == "hf-dir"
    ids, px = tiny.example_inputs
    b = build(src, "fastv", {"layer": 2, "keep": 7})
    with torch.no_grad():
        assert max_diff(b.program.module()(ids, px)[0], fastv_reference(tiny.hf_model, ids, px, 2, 7)) <= REFERENCE_ATOL


def test_exported_program_file(tiny, tmp_path):
    ep = capture(tiny)
    torch.export.save(ep, tmp_path / "m.pt2")
    src = load_model(str(tmp_path / "m.pt2"))
    assert src.kind == "exported" and src.program is not None
    b = build(src, "gprune", {"keep": 12})
    assert b.facts.boundary.n_image == 36
    assert b.llm_tokens(60) == [36] * 4


def test_pickle_needs_explicit_permission(tiny, tmp_path):
    from vtrcompile.models.presets import build_preset

    path = tmp_path / "m.pkl"
    # A fresh model: once run, transformers 5 installs a local output-capturing hook that cannot be pickled.
    torch.save(build_preset("tiny"), path)
    with pytest.raises(VtrError, match="unpickling runs arbitrary code.*--allow-pickle"):
        load_model(str(path))
    src = load_model(str(path), allow_pickle=True)
    assert src.kind == "pickle"
    ids, px = tiny.example_inputs
    with torch.no_grad():
        assert max_diff(src.module(ids, px), tiny.module(ids, px)) == 0


def test_a_pickle_loads_in_a_process_that_never_built_its_classes(tmp_path):
    """Unpickling runs no __init__, where transformers registers the outputs a model records (the vision tower's
    hidden states that LLaVA's projector reads): in a fresh process the trace failed until the loader registered
    them (models/loading._register_recorded_outputs). The CLI's inspect in a child process traces the pickle."""
    import subprocess
    import sys

    from vtrcompile.models.presets import build_preset

    path = tmp_path / "m.pkl"
    torch.save(build_preset("tiny"), path)
    res = subprocess.run([sys.executable, "-c", "from vtrcompile.cli import main; main()", "inspect", str(path),
                          "--allow-pickle"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "N=36 image tokens" in res.stdout, res.stdout[-2000:]


def test_a_zip_with_a_damaged_directory_is_refused_in_one_line(tmp_path):
    """A torch.save file (a zip) whose central directory is damaged: zipfile.is_zipfile still says yes (it finds
    only the end record), so the loader must not let ZipFile's BadZipFile escape."""
    path = tmp_path / "m.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x01\x02")  # the last central directory entry's signature
    data[at + 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VtrError) as e:
        load_model(str(path), allow_pickle=True)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ['{"image_mean": [0.5, 0.5', '[0.5, 0.5, 0.5]', '{"image_mean": [0.5, 0.5]}',
                                  '{"image_std": [0.5, 0, 0.5]}', '{"image_mean": ["a", 0.5, 0.5]}',
                                  '{"image_mean": [NaN, 0.5, 0.5]}'])
def test_a_damaged_preprocessor_config_is_refused(tiny, tmp_path, text):
    """The engine records the image mean and std and normalises every image with them: a preprocessor config
    that is not JSON, not an object, or holds anything but 3 numbers (std nonzero) is named in one line."""
    (tmp_path / "preprocessor_config.json").write_text(text)
    with pytest.raises(VtrError, match="preprocessor_config.json: not a JSON object") as e:
        tiny.family.processor_facts(tiny.hf_model.config, tmp_path)
    assert "\n" not in str(e.value)


def test_preprocessor_config_values_are_read_or_defaulted(tiny, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": 0.5, "image_std": [0.25, 0.5, 1]}')
    facts = tiny.family.processor_facts(tiny.hf_model.config, tmp_path)
    assert facts["image_mean"] == [0.5] * 3 and facts["image_std"] == [0.25, 0.5, 1.0]  # one number: every channel
    (tmp_path / "preprocessor_config.json").write_text("{}")
    facts = tiny.family.processor_facts(tiny.hf_model.config, tmp_path)
    assert facts["image_mean"] == list(tiny.family.image_mean) and facts["image_std"] == list(tiny.family.image_std)


def test_the_image_processor_settings_are_read_where_transformers_reads_them_first(tiny, tmp_path):
    """transformers 5 saves a processor's image settings inside processor_config.json and reads them there before
    preprocessor_config.json: so does the engine's record; a processor_config.json that is not JSON is refused."""
    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": 0.5, "image_std": 0.5}')
    (tmp_path / "processor_config.json").write_text(
        '{"processor_class": "LlavaProcessor", "image_processor": {"image_mean": [0.1, 0.2, 0.3], "image_std": 1}}')
    facts = tiny.family.processor_facts(tiny.hf_model.config, tmp_path)
    assert facts["image_mean"] == [0.1, 0.2, 0.3] and facts["image_std"] == [1.0] * 3
    (tmp_path / "processor_config.json").write_text('{"processor_class": "LlavaProcessor"}')  # no image settings
    assert tiny.family.processor_facts(tiny.hf_model.config, tmp_path)["image_mean"] == [0.5] * 3
    (tmp_path / "processor_config.json").write_text('{"image_processor": {"image_std": [0, 1, 1]}}')
    with pytest.raises(VtrError, match="processor_config.json: not a JSON object"):
        tiny.family.processor_facts(tiny.hf_model.config, tmp_path)
    (tmp_path / "processor_config.json").write_text('{"image_processor": ')
    with pytest.raises(VtrError, match="processor_config.json: not a JSON object"):
        tiny.family.processor_facts(tiny.hf_model.config, tmp_path)


def _config_dir(tmp_path, cfg: dict):
    d = tmp_path / cfg["model_type"]
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_other_families_are_not_supported_yet(tmp_path):
    with pytest.raises(UnsupportedModelError, match="'llava_next_video' is not supported yet"):
        load_model(_config_dir(tmp_path, {"model_type": "llava_next_video", "vision_config": {}}))


def test_text_only_model_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="text-only model"):
        load_model(_config_dir(tmp_path, {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))


def test_llava_dir_with_corrupt_weights(tiny, tmp_path):
    tiny.hf_model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(VtrError, match="model.safetensors: not a readable safetensors file .*re-save"):
        load_model(str(tmp_path / "m"))  # read lazily: the header is checked when the folder is opened
    with pytest.raises(VtrError, match="could not load the weights.*safetensors"):
        load_model(str(tmp_path / "m"), stream=False)

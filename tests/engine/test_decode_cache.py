"""VTRCOMPILE_DECODE_CACHE: a decode engine built for one folder is copied into another instead of being exported
again; an entry that is incomplete or is not this model's is never used; streamed and TensorRT engines are not
cached."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import prompts
from vtrcompile import decode as decode_mod
from vtrcompile import decode_cache, load_engine
from vtrcompile.optimize import Target, write_engine


class _Built(Exception):
    pass


def _no_build(*args, **kwargs):
    raise _Built


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(decode_cache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _decode_of(opt):
    return opt.files[-1].parent / opt.metadata["decode"]["file"]


def test_a_folder_gets_the_cached_decode_engine_instead_of_building_one(tiny, tiny_build, tiny_engines, cache,
                                                                        tmp_path, monkeypatch):
    decode = _decode_of(tiny_engines["gprune-9"])
    decode_cache.store([decode])
    assert json.loads((decode_cache.cache_folder() / f"{decode.name}.files.json").read_text()) == [decode.name]
    monkeypatch.setattr(decode_mod, "capture_decode", _no_build)
    opt = write_engine(tiny_build("gprune", keep=9), tiny, tmp_path / "out" / "g.onnx")
    restored = _decode_of(opt)
    assert restored.parent == tmp_path / "out" and restored.read_bytes() == decode.read_bytes()
    # copies, not links: editing one folder's engine in place changes neither the cache nor another folder
    entry = decode_cache.cache_folder() / decode.name
    assert not os.path.samefile(entry, restored) and not os.path.samefile(entry, decode)
    assert sorted(p.name for p in restored.parent.iterdir() if not p.name.startswith("tokenizer")) == sorted(
        ["g.onnx", decode.name])  # no scratch file left
    ids, px = prompts(tiny.hf_model.config)[0]
    got, want = (load_engine(e.files[-1], threads=1).generate(input_ids=ids.numpy(), pixel_values=px.numpy(),
                                                              max_new_tokens=4, eos_token_id=[])
                 for e in (opt, tiny_engines["gprune-9"]))
    assert got.tokens.tolist() == want.tokens.tolist() and np.array_equal(got.logits, want.logits)


def test_an_incomplete_or_foreign_entry_is_not_used(tiny, tiny_engines, cache, tmp_path, monkeypatch):
    decode = _decode_of(tiny_engines["fastv-k2-18"])
    args = (tiny.hf_model, tiny_engines["fastv-k2-18"].metadata["model_id"], tiny.label)
    monkeypatch.setattr(decode_mod, "capture_decode", _no_build)
    folder = decode_cache.cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    # a manifest whose file is missing (a store cut short) is no entry
    (folder / "decode-gone.onnx.files.json").write_text(json.dumps(["decode-gone.onnx"]))
    assert decode_cache.restore("decode-gone.onnx", tmp_path) is None and not list(tmp_path.glob("decode-*"))
    # another model's decode engine under this model's name: copied, found not to match, built instead
    (folder / decode.name).write_bytes(_foreign_decode(tiny_engines, tmp_path).read_bytes())
    (folder / f"{decode.name}.files.json").write_text(json.dumps([decode.name]))
    with pytest.raises(_Built):
        decode_mod.ensure_decode_engine(*args, tmp_path / "a", Target(), 1)
    # with the cache off, nothing is read
    monkeypatch.delenv(decode_cache.ENV)
    assert decode_cache.cache_folder() is None and decode_cache.restore(decode.name, tmp_path) is None


def test_a_decode_engine_of_another_opset_is_built_again(tiny, tiny_engines, tmp_path, monkeypatch, no_decode_cache):
    """A folder's ONNX Runtime decode engine is reused only at the opset the prefill engines are written at (a
    one-file engine cannot join two opsets): one an older vtrcompile wrote at the exporter's default is rebuilt."""
    import shutil

    from tests.engine.test_batch import _rewrite_metadata
    from vtrcompile.lower.onnx import ORT_OPSET

    src = _decode_of(tiny_engines["fastv-k2-18"])
    args = (tiny.hf_model, tiny_engines["fastv-k2-18"].metadata["model_id"], tiny.label, tmp_path, Target(), 1)
    shutil.copy(src, tmp_path / src.name)
    monkeypatch.setattr(decode_mod, "capture_decode", _no_build)
    assert decode_mod.ensure_decode_engine(*args) == tmp_path / src.name  # this opset: reused
    _rewrite_metadata(tmp_path / src.name, lambda meta: meta.update(onnx_opset=20))
    assert ORT_OPSET != 20
    with pytest.raises(_Built):
        decode_mod.ensure_decode_engine(*args)


def test_a_compressed_decode_engine_of_other_blocks_is_built_again(tiny, tiny_engines, tmp_path, monkeypatch,
                                                                    no_decode_cache):
    """A folder's ONNX Runtime int8 decode engine is reused only when its weights were blocked by this version's rule
    (`weights_blocks`): one an older vtrcompile compressed in blocks of 32 throughout is rebuilt, so a prefill and
    its decode engine do not store each weight twice, once per block size. (The float decode engine stands in, its
    metadata rewritten: only the metadata is read.)"""
    from tests.engine.test_batch import _rewrite_metadata
    from vtrcompile.decode import decode_file_name
    from vtrcompile.lower.onnx_weights import BLOCK_RULE

    meta = tiny_engines["fastv-k2-18"].metadata
    target = Target(weights="int8")
    path = tmp_path / decode_file_name(meta["model_id"], "float32", ".onnx", target.device, "int8", 1)
    path.write_bytes(_decode_of(tiny_engines["fastv-k2-18"]).read_bytes())
    _rewrite_metadata(path, lambda m: m.update(weights="int8", weights_blocks=BLOCK_RULE))
    monkeypatch.setattr(decode_mod, "capture_decode", _no_build)
    args = (tiny.hf_model, meta["model_id"], tiny.label, tmp_path, target, 1)
    assert decode_mod.ensure_decode_engine(*args) == path  # this rule: reused
    _rewrite_metadata(path, lambda m: m.pop("weights_blocks"))
    with pytest.raises(_Built):
        decode_mod.ensure_decode_engine(*args)


def _foreign_decode(tiny_engines, tmp_path):
    """This model's decode engine with another model identity in its metadata."""
    from tests.engine.test_batch import _rewrite_metadata

    f = tmp_path / "foreign" / _decode_of(tiny_engines["fastv-k2-18"]).name
    f.parent.mkdir()
    f.write_bytes(_decode_of(tiny_engines["fastv-k2-18"]).read_bytes())
    _rewrite_metadata(f, lambda meta: meta.update(model_id="0" * 64))
    return f


@pytest.mark.parametrize("target,weights", [(Target(backend="tensorrt"), None), (Target(), object())])
def test_tensorrt_and_streamed_engines_are_never_cached(tiny, tiny_engines, cache, tmp_path, monkeypatch, target,
                                                         weights):
    decode_cache.store([_decode_of(tiny_engines["fastv-k2-18"])])
    asked = []
    monkeypatch.setattr(decode_cache, "restore", lambda *a: asked.append(a))
    monkeypatch.setattr(decode_mod, "capture_decode", _no_build)
    with pytest.raises(_Built):  # it went to build, without asking the cache
        decode_mod.ensure_decode_engine(tiny.hf_model, tiny_engines["fastv-k2-18"].metadata["model_id"], tiny.label,
                                        tmp_path, target, 1, weights)
    assert not asked


def test_a_failed_store_leaves_no_file_behind(cache, tmp_path, monkeypatch, caplog):
    """A copy that fails half way (a full disk) is logged, and neither its temporary file nor a manifest stays in
    the cache folder; the engine being stored is untouched."""
    src = tmp_path / "engine"
    src.mkdir()
    files = [src / "decode-x-float32.onnx.data", src / "decode-x-float32.onnx"]
    for f in files:
        f.write_bytes(b"w" * 4096)
    real = decode_cache.shutil.copyfile

    def full_disk(a, b):
        if str(a).endswith(".onnx"):  # the second file: part of it is written, then the disk is full
            real(a, b)
            raise OSError(28, "No space left on device")
        return real(a, b)
    monkeypatch.setattr(decode_cache.shutil, "copyfile", full_disk)
    decode_cache.store(files)
    folder = decode_cache.cache_folder()
    assert sorted(p.name for p in folder.iterdir()) == ["decode-x-float32.onnx.data"]
    assert "cannot store decode-x-float32.onnx (" in caplog.text and "No space left" in caplog.text
    assert all(f.read_bytes() == b"w" * 4096 for f in files)

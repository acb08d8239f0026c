"""Calibration folders and PruMerge's compile-time `--keep auto`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from vtrcompile.calibration import load_calibration
from vtrcompile.cli import main
from vtrcompile.errors import VtrError
from vtrcompile.lower.onnx import read_metadata
from vtrcompile.methods.prumerge import iqr_outlier_count
from vtrcompile.methods.prumerge_auto import auto_keep, outlier_counts


def _folder(tmp_path, n=3, prompts=True):
    d = tmp_path / "calib"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 90, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    if prompts:
        lines = [json.dumps({"image": f"img{i}.png", "prompt": f"question {i}"}) for i in range(n)]
        (d / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_iqr_rule_by_hand():
    assert iqr_outlier_count(torch.tensor([1.0] * 7 + [10.0])) == 1
    # Q1 = 2.5, Q3 = 6.5 (linear), fence 12.5: only 20 is above it.
    assert iqr_outlier_count(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 20])) == 1
    assert iqr_outlier_count(torch.arange(8.0)) == 0


def test_load_calibration(tmp_path):
    c = load_calibration(_folder(tmp_path), 84)
    assert c.pixel_values.shape == (3, 3, 84, 84)
    assert c.names == ["img0.png", "img1.png", "img2.png"]
    assert c.prompts[1] == {"image": "img1.png", "prompt": "question 1"}


def test_calibration_errors(tmp_path):
    with pytest.raises(VtrError, match="calibration folder not found"):
        load_calibration(tmp_path / "nope", 84)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VtrError, match="no images"):
        load_calibration(tmp_path / "empty", 84)
    d = _folder(tmp_path)
    (d / "prompts.jsonl").write_text('{"image": "img0.png", "prompt": "q"}\n{oops\n')
    with pytest.raises(VtrError, match="prompts.jsonl:2: not JSON"):
        load_calibration(d, 84)
    (d / "prompts.jsonl").write_text('{"image": "missing.png", "prompt": "q"}\n')
    with pytest.raises(VtrError, match="image 'missing.png' is not in"):
        load_calibration(d, 84)


def test_auto_keep_is_the_median_count(tiny, tmp_path):
    c = load_calibration(_folder(tmp_path, 5, prompts=False), 84)
    counts = outlier_counts(tiny.hf_model, c.pixel_values)
    keep, got = auto_keep(tiny.hf_model, c.pixel_values)
    assert got == counts and len(counts) == 5
    assert keep == max(1, round(float(np.median(counts))))


def test_cli_keep_auto(tiny, tmp_path):
    d = _folder(tmp_path)
    out = tmp_path / "pm.onnx"
    res = CliRunner().invoke(main, ["optimize", "tiny", "--method", "prumerge", "--keep", "auto",
                                    "--calibration", str(d), "--out", str(out)])
    assert res.exit_code == 0, res.output
    c = load_calibration(d, 84)
    keep, _ = auto_keep(tiny.hf_model, c.pixel_values)
    assert read_metadata(out)["reductions"][0]["count"] == keep + 1
    bad = CliRunner().invoke(main, ["optimize", "tiny", "--method", "fastv", "--keep", "auto",
                                    "--calibration", str(d), "--out", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2 and "PruMerge's adaptive count" in bad.output
    bad = CliRunner().invoke(main, ["optimize", "tiny", "--method", "prumerge", "--keep", "auto",
                                    "--out", str(tmp_path / "y.onnx")])
    assert bad.exit_code == 2 and "needs --calibration" in bad.output

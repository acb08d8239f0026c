"""Engine metadata keys are declared once (engine/metadata.py): writers, runners and docs agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vtrcompile.engine.metadata import BOTH, DECODE, KEYS, PREFILL, check_metadata, keys_for, stamp
from vtrcompile.engine.runners import read_engine_metadata
from vtrcompile.errors import VtrError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "engine.md"


def test_docs_metadata_table_lists_exactly_the_declared_keys():
    text = DOCS.read_text().split("## Metadata", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = {k for line in rows for k in re.findall(r"`([a-z_]+)`", line.split("|")[1])}
    assert documented == set(KEYS)


@pytest.mark.parametrize("role", BOTH)
def test_written_engines_carry_exactly_their_roles_keys(tiny_engines, role):
    prefill = tiny_engines["fastv-k2-18"].files[0]
    path = prefill if role == PREFILL else prefill.parent / read_engine_metadata(prefill)["decode"]["file"]
    meta = read_engine_metadata(path)
    assert meta["role"] == role
    assert keys_for(role) <= set(meta) <= keys_for(role, lowering=True)


def test_stamp_refuses_undeclared_and_missing_keys():
    fields = {k: None for k in keys_for(DECODE) if k not in ("vtrcompile", "torch", "format", "role")}
    assert stamp(DECODE, fields)["role"] == DECODE
    with pytest.raises(AssertionError, match="undeclared"):
        stamp(DECODE, {**fields, "colour": "red"})
    with pytest.raises(AssertionError, match="missing.*'io'"):
        stamp(DECODE, {k: v for k, v in fields.items() if k != "io"})


def test_runner_check_refuses_a_missing_key_or_role_in_one_line(tmp_path):
    meta = stamp(DECODE, {k: None for k in keys_for(DECODE) if k not in ("vtrcompile", "torch", "format", "role")})
    check_metadata(meta, tmp_path / "d.onnx")
    for broken in ({k: v for k, v in meta.items() if k != "kv_heads"}, {**meta, "role": "train"}):
        with pytest.raises(VtrError) as e:
            check_metadata(broken, tmp_path / "d.onnx")
        assert "\n" not in str(e.value) and "d.onnx" in str(e.value)

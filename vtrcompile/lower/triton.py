"""A built `.plan` + its sidecar -> a Triton Inference Server model folder (config.pbtxt + 1/model.plan)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import VtrError
from .atomic import scratch_dir

MARKER = "vtrcompile.json"  # our sidecar inside the model folder; also marks folders we may replace
_TRITON_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                 "bfloat16": "TYPE_BF16", "bool": "TYPE_BOOL"}


def model_name(stem: str) -> str:
    """Triton model names become folder names and URL parts: keep letters, digits, '-', '_'."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    if not name:
        raise VtrError(f"cannot make a Triton model name from '{stem}'; name the engine file with letters or digits")
    return name


def config_pbtxt(name: str, sidecar: dict[str, Any]) -> str:
    """Triton's model configuration (protobuf text format) for a vtrcompile TensorRT engine.

    The engine's batch is part of each tensor's shape (fixed at capture), so max_batch_size is 0 and
    dims carry the batch explicitly; -1 marks the prompt length, dynamic within the optimization profile."""

    def tensor(t: dict[str, Any]) -> str:
        dims = ", ".join(str(int(d)) for d in t["shape"])
        return f'  {{\n    name: "{t["name"]}"\n    data_type: {_TRITON_TYPES[t["dtype"]]}\n    dims: [ {dims} ]\n  }}'

    inputs = ",\n".join(tensor(t) for t in sidecar["inputs"])
    outputs = ",\n".join(tensor(t) for t in sidecar["outputs"])
    return (
        f'name: "{name}"\n'
        'platform: "tensorrt_plan"\n'
        "max_batch_size: 0\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )


def write_model(repo: Path, name: str, plan: Path, sidecar: dict[str, Any]) -> Path:
    """Write repo/name/{config.pbtxt, vtrcompile.json, 1/model.plan} in a temp folder, then move it into place.

    An existing folder is replaced only if vtrcompile made it (it holds vtrcompile.json)."""
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise VtrError(f"--triton-repo {repo}: exists and is not a directory")
    repo.mkdir(parents=True, exist_ok=True)
    dest = repo / name
    if dest.exists() and not (dest / MARKER).is_file():
        raise VtrError(f"{dest} exists and was not written by vtrcompile; choose another --triton-repo or remove it")
    with scratch_dir(repo, f".{name}.") as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(plan, tmp / "1" / "model.plan")
        (tmp / "config.pbtxt").write_text(config_pbtxt(name, sidecar))
        (tmp / MARKER).write_text(json.dumps(sidecar, indent=1, sort_keys=True))
        if dest.exists():
            with scratch_dir(repo, f".{name}.old.") as old:
                os.replace(dest, old / name)
                os.replace(tmp, dest)
        else:
            os.replace(tmp, dest)
    return dest

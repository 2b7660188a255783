"""Compiled regions get one static graph per input shape, and Dynamo's packages serve every shape a process met.

Each process is tests/compiled_blocks_probe.py: a small diffusers model of repeated blocks compiled by the worker's
own `model_loading.compile_blocks`, run at given token counts (a two-stage worker meets two: stage 1 at half size,
stage 2 at full size; a group meets one or two per clip size).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from services.compile_packages import SWITCH

PROBE = Path(__file__).with_name("compiled_blocks_probe.py")
REPO = PROBE.parent.parent


def probe(cache: Path, out: Path, tokens: str, package_key: str | None = None) -> dict:
    """One probe process on `cache`; its report (new graphs per token count, fallback, packages loaded)."""
    env = {key: value for key, value in os.environ.items() if key != "LTX2_COMPILE_CACHE_DIR"}
    env.update({"PYTHONPATH": str(REPO), SWITCH: "1" if package_key else ""})
    command = [sys.executable, str(PROBE), str(cache), str(out), tokens, *([package_key] if package_key else [])]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["new_graphs"] = {int(tokens): count for tokens, count in report["new_graphs"].items()}
    return report


def test_each_token_count_gets_a_static_graph_of_its_own(tmp_path: Path):
    """Left to Dynamo, the second shape recompiled as a dynamic graph that then served every later shape: a two-stage
    worker's stage 2 and a group's later clip sizes ran symbolic-shape kernels, and which kernels a clip got depended
    on the shapes its process met first. Now 8, 32 and 16 tokens each compile their own graph."""
    report = probe(tmp_path / "cache", tmp_path / "out.pt", "8,32,16")
    assert report["new_graphs"] == {8: 1, 32: 1, 16: 1}


def test_a_package_short_of_a_shape_gains_it_and_a_later_process_traces_nothing(tmp_path: Path):
    """LTX2_COMPILE_PACKAGES=1: a package saved with one shape (a one-stage clip's full size) met a process that
    traced another (a two-stage clip's half size) after loading it; torch refused the trace ("Name
    '__builtins_dict___0' already exists in scope"), the worker compiled without packages and saved nothing, and
    every later process fell back the same way. Now the package gains the shape and a third process loads both."""
    cache = tmp_path / "cache"
    first = probe(cache, tmp_path / "first.pt", "32", "probe-key")
    assert first["new_graphs"] == {32: 1} and not first["fell_back"]
    second = probe(cache, tmp_path / "second.pt", "8,32", "probe-key")
    assert not second["fell_back"] and second["packages_loaded"] >= 1
    assert second["new_graphs"] == {8: 1, 32: 0}  # 32 tokens from the package, 8 traced and saved beside it
    third = probe(cache, tmp_path / "third.pt", "8,32", "probe-key")
    assert not third["fell_back"] and third["new_graphs"] == {8: 0, 32: 0}
    outputs = [torch.load(tmp_path / f"{name}.pt") for name in ("first", "second", "third")]
    assert torch.equal(outputs[0][32], outputs[1][32]) and torch.equal(outputs[0][32], outputs[2][32])
    assert torch.equal(outputs[1][8], outputs[2][8])

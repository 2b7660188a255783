"""Fault injection lives in protocol/fault_points.py alone: product code only names the points.

The switches stay out of the product so that reading a product module never means reading test
machinery: no `LTX2_FAULT_*` variable, marker file or test-only branch anywhere but the fault module,
which product code reaches through its point functions only.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PRODUCT_PACKAGES = ("orchestrator", "protocol", "config", "services")
FAULT_MODULE = REPO_ROOT / "protocol" / "fault_points.py"
# What product code may take from the fault module: the one-line point call, and the switches a farm
# head passes on to its tasks.
POINT_FUNCTIONS = {"fault_point", "fault_switches"}


def product_modules() -> list[Path]:
    return [
        path
        for package in PRODUCT_PACKAGES
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        if path != FAULT_MODULE
    ]


def fault_machinery_in(path: Path) -> list[str]:
    """Each place `path` mentions a switch variable or takes more than a point function from the fault module."""
    text = path.read_text()
    found = [f"line {n}: mentions LTX2_FAULT" for n, line in enumerate(text.splitlines(), 1) if "LTX2_FAULT" in line]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name == "protocol.fault_points"]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names = {alias.name for alias in node.names}
            if module.endswith("fault_points") and names - POINT_FUNCTIONS:
                found.append(f"line {node.lineno}: from {module} import {sorted(names - POINT_FUNCTIONS)}")
            elif module in ("protocol", ".") and "fault_points" in names:
                found.append(f"line {node.lineno}: from {module} import fault_points")
    return found


def fired_points() -> dict[str, list[str]]:
    """Every point name product code passes to fault_point, with the modules that do."""
    fired: dict[str, list[str]] = {}
    for path in product_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "fault_point":
                name = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else "<not a literal>"
                fired.setdefault(name, []).append(str(path.relative_to(REPO_ROOT)))
    return fired


def test_product_modules_name_fault_points_and_carry_nothing_else_of_fault_injection():
    offences = {
        str(path.relative_to(REPO_ROOT)): found for path in product_modules() if (found := fault_machinery_in(path))
    }
    assert offences == {}


def test_every_point_product_code_fires_exists_is_documented_and_fired():
    from protocol import fault_points

    fired = fired_points()
    assert sorted(fired) == sorted(fault_points.POINTS), fired
    assert [name for name in fault_points.POINTS if f"`{name}`" not in fault_points.__doc__] == []


def test_an_unarmed_point_does_nothing(monkeypatch: pytest.MonkeyPatch):
    from protocol.fault_points import POINTS, fault_point

    for key in [key for key in os.environ if key.startswith("LTX2_FAULT_")]:
        monkeypatch.delenv(key)
    assert [fault_point(name) for name in POINTS] == [""] * len(POINTS)


def test_the_executor_fault_fires_once_per_fault_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from protocol.fault_points import InjectedFault, fault_point

    monkeypatch.setenv("LTX2_FAULT_EXECUTOR", "1")
    monkeypatch.setenv("LTX2_FAULT_DIR", str(tmp_path))
    with pytest.raises(InjectedFault, match="LTX2_FAULT_EXECUTOR"):
        fault_point("executor.claimed")
    fault_point("executor.claimed")  # the restarted daemon goes on
    assert (tmp_path / "executor-raised").exists()


def test_a_hold_for_a_named_job_leaves_its_id_and_passes_other_jobs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from protocol.fault_points import fault_point

    monkeypatch.setenv("LTX2_FAULT_HOLD", "before-audio_decode@wanted")
    monkeypatch.setenv("LTX2_FAULT_DIR", str(tmp_path))
    (tmp_path / "release-before-audio_decode@wanted").touch()  # released already: the hold returns at once
    fault_point("job.before_stage", job_id="job-other", job_name="other", stage="audio_decode")
    fault_point("job.before_stage", job_id="job-wanted", job_name="wanted", stage="audio_decode")
    assert (tmp_path / "held-before-audio_decode@wanted").read_text() == "job-wanted"

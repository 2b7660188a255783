"""The orchestrator, protocol and config stay torch-free, so the CLI and daemon start fast."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT

HEAVY = ("torch", "diffusers", "transformers", "av", "safetensors", "ray")


def test_orchestrator_import_does_not_load_torch_diffusers_or_av():
    modules = [
        "orchestrator.cli",
        "orchestrator.run.pipeline",
        "orchestrator.run.runner",
        "orchestrator.command_line.progress",
        "orchestrator.daemon.server",
        "orchestrator.daemon.executor",
        "orchestrator.daemon.client",
        "orchestrator.command_line.client_commands",
        "orchestrator.daemon.client_front",
        "orchestrator.daemon.front_process",
        "orchestrator.placement.fork_client",
        "orchestrator.placement.lanes",
        "orchestrator.placement.lane_links",
        "orchestrator.placement.ray_farm",  # the Ray backend imports ray only when a farm is used
        "orchestrator.run.stage_major",
        "orchestrator.run.lora_lookup",
        "orchestrator.run.sidecar",
        "orchestrator.daemon.store",
        "orchestrator.daemon.job_views",
        "orchestrator.daemon.state_reader",
        "orchestrator.run.policy",
        "orchestrator.gateway.app",
        "orchestrator.gateway.server",
        "orchestrator.gateway.keys",
        "orchestrator.gateway.store",
        "orchestrator.gateway.metrics",
        "orchestrator.gateway.video_requests",
        "orchestrator.gateway.daemon_pool",
        "orchestrator.gateway.connections",
        "orchestrator.gateway.forms",
        "orchestrator.gateway.uploads",
        "protocol.codec",
        "protocol.jobs",
        "protocol.model_ids",
        "protocol.stages",
        "protocol.spec",
        "protocol.files",
        "protocol.plans",
        "protocol.families",
        "protocol.fault_points",
        "protocol.job_record",
        "protocol.stage_request",
        "config.settings",
        "config.presets",
    ]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + (f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\nprint(','.join(loaded))")
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert result.stdout.strip() == ""


def test_cli_help_runs_without_heavy_imports():
    code = (
        "import sys, runpy\nsys.argv=['ltx2','--help']\n"
        "try:\n    runpy.run_module('orchestrator.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert "generate" in result.stdout
    assert result.stdout.strip().endswith("HEAVY=")


def test_no_torch_free_module_holds_an_import_of_torch_even_inside_a_function():
    """A lazy `import torch` in a function is invisible to the import check above until it runs, and then
    it loads torch into the orchestrator; none may exist (Ray, imported only when a farm is used, may)."""
    import ast

    found = []
    for package in ("orchestrator", "protocol", "config"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                found += [
                    f"{path.relative_to(REPO_ROOT)}:{node.lineno} {name}"
                    for name in names
                    if name.split(".")[0] in HEAVY and name.split(".")[0] != "ray"
                ]
    assert found == []

"""The environment stage workers start with: reproducible CPU maths and a compact CUDA allocator,
unless the user chose otherwise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.placement.fork_client import worker_environment
from orchestrator.run.jobdir import JobDir
from orchestrator.run.model_lookup import ResolvedModel
from protocol.model_ids import TINY_REPO_ID
from protocol.spec import JobSpec


def test_workers_get_expandable_segments_by_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    env = worker_environment()
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_a_batchs_prompt_pre_encoding_computes_in_mkls_reproducible_mode(tiny_model_dir: Path, tmp_path: Path):
    """`ltx2 batch` starts services.prepare_prompts with the CLI's own environment; its GEMMs ran with MKL's
    CNR off, so a clip's embeddings could differ in the last bits from those `generate` computes (issue 23);
    and MKL chose its thread count per call (MKL_DYNAMIC on), which CNR's guarantee does not cover.
    MKL_VERBOSE makes MKL name the mode of every call it makes, in the process itself."""
    spec = JobSpec.from_dict(
        {"prompt": "a forge", "model": TINY_REPO_ID, "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
    )
    job = JobDir.create(tmp_path / "jobs", spec, ResolvedModel(TINY_REPO_ID, tiny_model_dir, "tiny"))
    mkl_settings = ("MKL_CBWR", "MKL_DYNAMIC")
    env = {**{key: value for key, value in os.environ.items() if key not in mkl_settings}, "MKL_VERBOSE": "1"}
    command = [sys.executable, "-m", "services.prepare_prompts", str(job.path)]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "encoded 1 prompt(s)" in result.stdout
    assert set(re.findall(r"CNR:(\S+)", result.stdout)) == {"AUTO,STRICT"}, result.stdout[-2000:]
    # ... on a fixed number of threads (MKL_DYNAMIC off), which CNR's equal results assume.
    assert set(re.findall(r"Dyn:(\d)", result.stdout)) == {"0"}, result.stdout[-2000:]


def test_a_users_allocator_settings_win(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert worker_environment()["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # empty: torch's own defaults
    assert worker_environment()["PYTORCH_CUDA_ALLOC_CONF"] == ""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:256")  # torch's newer name
    env = worker_environment()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env and env["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:256"


def probe_torchao(root: Path, marker: Path) -> Path:
    """An installed package named torchao (with its dist-info, as pip leaves it) whose import writes
    `marker`: whether a process imported torchao shows on disk. Not a stand-in for torchao's API: a
    process of ours must never get as far as using it."""
    site = root / "site"
    (site / "torchao").mkdir(parents=True)
    (site / "torchao" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    info = site / "torchao-0.18.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchao\nVersion: 0.18.0\n")
    (info / "RECORD").write_text("")
    return site


def test_the_fork_server_never_imports_torchao_where_it_is_installed(tmp_path: Path):
    """transformers and diffusers import an installed torchao with their model code, and torchao sets CUDA
    up at import on a GPU host, which turns the fork server off (issue 28: 44.9 s per job instead of
    20.2 s on NGC images). The fork server's imports are every stage's, so none may reach torchao."""
    marker = tmp_path / "torchao-was-imported"
    env = {
        **os.environ,
        "PYTHONPATH": f"{probe_torchao(tmp_path, marker)}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "services.forkserver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    ready, errors = server.communicate(timeout=300)  # EOF on its stdin once its imports are done: it exits
    assert '"ready": true' in ready and '"cuda_initialised_by": ""' in ready, errors[-3000:]
    assert not marker.exists()

"""The environment stage workers start with: reproducible CPU maths and a compact CUDA allocator,
unless the user chose otherwise."""

from __future__ import annotations

import pytest

from orchestrator.fork_client import worker_environment


def test_workers_get_expandable_segments_and_strict_mkl_by_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("MKL_CBWR", raising=False)
    env = worker_environment()
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["MKL_CBWR"] == "AUTO,STRICT"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_a_users_allocator_settings_win(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert worker_environment()["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # empty: torch's own defaults
    assert worker_environment()["PYTORCH_CUDA_ALLOC_CONF"] == ""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:256")  # torch's newer name
    env = worker_environment()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env and env["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:256"

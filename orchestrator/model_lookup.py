"""Resolve a model name to a local diffusers folder, without torch and without the network.

A name is a local folder or a Hugging Face repo id looked up in the local hub cache with
`snapshot_download(local_files_only=True)` (the same lookup diffusers does offline). Weights are
never downloaded during a job: a missing model is an error naming the download command.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from protocol.errors import ModelNotFound
from protocol.model_ids import TINY_REPO_ID, hub_cache_dir


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are and which revision they are."""

    name: str  #: what the user asked for (repo id or folder)
    path: Path  #: the diffusers-layout folder workers load from
    revision: str  #: the cache snapshot's commit hash, or "local"


def resolve_model(name: str) -> ResolvedModel:
    """Find `name` locally; raises ModelNotFound with the command that would fetch it."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ModelNotFound(f"{folder} is not a diffusers model folder (no model_index.json)")
        return ResolvedModel(name, folder.resolve(), "local")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(name, local_files_only=True, cache_dir=hub_cache_dir()))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise ModelNotFound(
            f"model {name!r} is not in the Hugging Face cache; download it first with: hf download {name}"
        ) from exc
    if not (snapshot / "model_index.json").is_file():
        raise ModelNotFound(f"cached snapshot {snapshot} of {name!r} has no model_index.json; re-download it")
    return ResolvedModel(name, snapshot, snapshot.name)


def is_cached(name: str) -> bool:
    """Whether `resolve_model(name)` would succeed."""
    try:
        resolve_model(name)
    except ModelNotFound:
        return False
    return True


def ensure_tiny_model() -> ResolvedModel:
    """Build the tiny random model into the hub cache if missing (a torch process), then resolve it."""
    if not is_cached(TINY_REPO_ID):
        command = [sys.executable, "-m", "services.tiny_model", "--hf-cache"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ModelNotFound(f"could not build the tiny model: {result.stderr.strip()[-2000:]}")
    return resolve_model(TINY_REPO_ID)

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
from protocol.families import CheckpointFamily, detect_family
from protocol.model_ids import TINY_REPO_IDS, TINY_REVISION, hub_cache_dir


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are and which revision they are."""

    name: str  #: what the user asked for (repo id or folder)
    path: Path  #: the diffusers-layout folder workers load from
    revision: str  #: the cache snapshot's commit hash, or "local"
    #: read from the checkpoint's configs; None only for models made up by tests that never run a stage
    family: CheckpointFamily | None = None


def resolve_model(name: str) -> ResolvedModel:
    """Find `name` locally and read its family; raises ModelNotFound with the command that would
    fetch it, or UnsupportedCheckpoint (a SpecError) for a checkpoint of no supported family."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ModelNotFound(f"{folder} is not a diffusers model folder (no model_index.json)")
        return ResolvedModel(name, folder.resolve(), "local", detect_family(folder))
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
    return ResolvedModel(name, snapshot, snapshot.name, detect_family(snapshot))


def is_cached(name: str) -> bool:
    """Whether `resolve_model(name)` would find the model (an unsupported one still raises)."""
    try:
        resolve_model(name)
    except ModelNotFound:
        return False
    return True


def ensure_tiny_model(name: str) -> ResolvedModel:
    """Build tiny model `name` (a value of TINY_REPO_IDS) into the hub cache if missing or of an
    older TINY_REVISION (a torch process), then resolve it.

    An older build lacks what later code loads (revision 1 had no latent_upsampler), so the current
    revision is built beside it and `refs/main` moved to it; jobs recorded with the old snapshot keep it.
    """
    if not is_cached(name) or resolve_model(name).revision != TINY_REVISION:
        family = next(family for family, repo_id in TINY_REPO_IDS.items() if repo_id == name)
        command = [sys.executable, "-m", "services.tiny_model", "--hf-cache", "--family", family]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ModelNotFound(f"could not build the tiny model: {result.stderr.strip()[-2000:]}")
    return resolve_model(name)

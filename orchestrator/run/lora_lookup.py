"""Resolve LoRA requests to local .safetensors files, without torch and without the network.

A source is a file, a folder (with `weight_name`, or holding exactly one .safetensors file) or a
Hugging Face repo id in the local cache. Local paths must lie inside the configured input roots,
so a client of the daemon cannot make it read arbitrary files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.run.inputs import require_inside_roots
from protocol.errors import LoraNotFound
from protocol.model_ids import hub_cache_dir
from protocol.request_fields import flag_of
from protocol.spec_rules import SpecError


def resolve_lora(lora: dict[str, Any], input_roots: tuple[Path, ...], flag: str = "lora") -> dict[str, Any]:
    """`{source, weight_name, scale}` -> the same plus `path` (a file) and `revision`; errors name `--{flag}`.

    A source written as a path (absolute, `~`, `./`, or a .safetensors name) must lie inside the
    input roots, checked before it is looked for, so that an outside path gets one error whether
    or not it exists. Another source is a local path only if it exists inside the roots; else it
    is a repo id.
    """
    source, weight_name = lora["source"], lora.get("weight_name")
    local = Path(source).expanduser()
    if looks_like_path(source):
        local = require_inside_roots(local, input_roots, flag)
        if not local.exists():
            raise lora_not_found(flag, f"{source} does not exist")
    elif inside_roots(local, input_roots) and local.resolve().exists():
        local = local.resolve()
    else:  # a repo id: its cache folder is found by the hub, never by this path
        local = None
    if local is not None:
        folder, revision = (local.parent if local.is_file() else local), "local"
        weight_name = weight_name or (local.name if local.is_file() else None)
    else:
        folder = cached_repo(source, weight_name, flag)
        revision = folder.name  # the snapshot's commit hash
    path = folder / weight_name if weight_name else only_safetensors(folder, source, flag)
    if local is not None:  # a weight file inside the folder may still be a symlink leading out
        require_inside_roots(path, input_roots, flag)
    if not path.is_file():
        fetch = "" if local is not None else f"; download it with: hf download {source} {path.name}"
        raise lora_not_found(flag, f"{source!r} has no file {path.name!r}{fetch}")
    return {**lora, "path": str(path.resolve()), "revision": revision, "scale": float(lora.get("scale", 1.0))}


def lora_not_found(flag: str, message: str) -> LoraNotFound:
    """LoraNotFound (exit 4) whose message and `field` name the spec field `flag` ("lora", "stage2_lora")."""
    error = LoraNotFound(f"{flag_of(flag)}: {message}")
    error.field = flag
    return error


def looks_like_path(source: str) -> bool:
    """True for a source only a file path can mean (repo ids are `owner/name`, never these)."""
    return source.startswith(("/", "~", ".")) or source.endswith(".safetensors")


def inside_roots(path: Path, input_roots: tuple[Path, ...]) -> bool:
    """Whether `path` passes the input-roots check (which looks at nothing outside them)."""
    try:
        require_inside_roots(path, input_roots, "lora")
    except SpecError:
        return False
    return True


def cached_repo(repo_id: str, weight_name: str | None = None, flag: str = "lora") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=hub_cache_dir()))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise lora_not_found(
            flag,
            f"{repo_id!r} is neither a local file nor in the Hugging Face cache; "
            f"download it first with: hf download {repo_id}{' ' + weight_name if weight_name else ''}",
        ) from exc


def only_safetensors(folder: Path, source: str, flag: str = "lora") -> Path:
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) != 1:
        names = ", ".join(p.name for p in candidates) or "none"
        raise SpecError(
            f"{flag}_weight_name",
            f"{source!r} holds {len(candidates)} .safetensors files ({names}); name one with"
            f" --{flag.replace('_', '-')}-weight-name",
        )
    return candidates[0]

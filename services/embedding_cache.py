"""Prompt embeddings cached on disk by (model, prompt, settings), so the text encoder loads once.

At full size the text encoder is 22.7 GiB and one prompt's embeddings about 385 MB (bf16,
1024 tokens x 3840 x 49 layers). Re-rendering a prompt (another seed, another camera LoRA,
`ltx2 decode` never needs it) then skips loading the encoder. Files are safetensors written
atomically; the oldest are evicted beyond a size cap.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from protocol.files import publish, temp_path_for
from protocol.spec import JobSpec
from services.guidance import MAX_SEQUENCE_LENGTH

# About 50 full-size prompts; the cache is a convenience, so it stays well below a disk's size.
MAX_CACHE_BYTES = 20 << 30
KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")


def cache_path(
    directory: Path, model_root: Path, revision: str, spec: JobSpec, dtype: torch.dtype, device: torch.device
) -> Path:
    """The file for one (model, revision, prompt, negative prompt if CFG or NAG, length, dtype, device) combination."""
    identity = {
        "model": str(model_root),
        "revision": revision,
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt if spec.uses_negative_prompt else None,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "dtype": str(dtype),
        "device": device.type,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return directory / f"{digest}.safetensors"


def load(path: Path, device: torch.device) -> dict[str, torch.Tensor | None] | None:
    """Cached embeddings on `device`, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path), device=str(device))
    except (OSError, ValueError, RuntimeError):
        return None
    path.touch()  # recently used files survive eviction
    # Copied into torch's own (64-byte aligned) memory: safetensors hands back views of its file buffer at
    # whatever offset the header left (8-byte aligned here), so a process reading the cache computed on
    # differently aligned inputs than the one that encoded the prompt. Every CPU run-to-run drift seen
    # (issue 23: a compiled worker, a NAG run, a retried diffusion, a second render's WAV) was a process
    # that read cached embeddings against one that had just encoded them.
    return {key: None if tensors.get(key) is None else tensors[key].clone() for key in KEYS}


def store(path: Path, embeddings: dict[str, torch.Tensor | None]) -> None:
    """Write the embeddings (None entries are simply absent), then evict the oldest beyond the cap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in embeddings.items() if v is not None}, str(temp))
    publish(temp, path)
    evict(path.parent, MAX_CACHE_BYTES)


def evict(directory: Path, max_bytes: int) -> None:
    files = sorted(directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for file in files:
        total += file.stat().st_size
        if total > max_bytes:
            file.unlink(missing_ok=True)

"""Prompt embeddings cached on disk by (model, prompt, settings), so the text encoder loads once.

At full size the text encoder is 22.7 GiB and one prompt's embeddings about 385 MB (bf16,
1024 tokens x 3840 x 49 layers). Re-rendering a prompt (another seed, another camera LoRA,
`ltx2 decode` never needs it) then skips loading the encoder. Files are safetensors written
atomically; the oldest are evicted beyond a size cap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from protocol.files import publish, temp_path_for
from protocol.spec import JobSpec
from services.guidance import MAX_SEQUENCE_LENGTH

log = logging.getLogger("ltx2.worker")

# What reading a cache file can raise when it is cut short or garbled (a disk's fault: files are written atomically).
UNREADABLE = (OSError, ValueError, RuntimeError, SafetensorError)

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
    except UNREADABLE:
        return None
    mark_used(path)
    # Copied into torch's own (64-byte aligned) memory: safetensors hands back views of its file buffer at
    # whatever offset the header left (8-byte aligned here), so a process reading the cache computed on
    # differently aligned inputs than the one that encoded the prompt. Every CPU run-to-run drift seen
    # (issue 23: a compiled worker, a NAG run, a retried diffusion, a second render's WAV) was a process
    # that read cached embeddings against one that had just encoded them.
    return {key: None if tensors.get(key) is None else tensors[key].clone() for key in KEYS}


def mark_used(path: Path) -> None:
    """Make `path` the most recently used file, so eviction spares it; one evicted meanwhile stays gone
    (`touch` would make an empty file of it)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def readable(path: Path) -> bool:
    """Whether `path` is a cache file whose header reads (a garbled one is encoded again, as a missing one)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys()) <= set(KEYS)
    except UNREADABLE:
        return False


class ReadAhead:
    """The next job's cached embeddings read into host memory on a thread while this job denoises.

    Why: a group's diffusion process starts each job by loading its prompt's embeddings, 385 MB for LTX-2.3
    at full size, through the file's mapping and then to the GPU; the GPU waits through it (0.05-0.2 s per
    job at 1080p on an H100, session 19, against a warm clip of 10.1-10.3 s). Read ahead, the job finds the
    tensors already in (pinned, on CUDA) host memory and only copies them over. The bytes are the file's
    either way, in torch's own aligned memory as `load` gives them, so the clip is the same. The read starts
    after the current job's first step is queued (WorkerContext.first_step_done says why), by when the
    pinned memory of the current job's copies is free again for torch's host allocator to hand out.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embeddings-read-ahead")
        self._path: Path | None = None
        self._future: Future[dict[str, torch.Tensor]] | None = None

    def start(self, path: Path, pin: bool) -> None:
        """Begin reading `path` (a file of the cache) unless it is already being read; drops any other read."""
        if path == self._path:
            return
        self._path, self._future = path, self._executor.submit(read_to_host, path, pin)

    def take(self, path: Path, device: torch.device) -> dict[str, torch.Tensor | None] | None:
        """`path`'s embeddings on `device` if they were read ahead (and the read worked), else None. A read of
        another file is dropped either way: the job it was for is not next, and its memory is not kept."""
        future, read_path, self._path, self._future = self._future, self._path, None, None
        if future is None or path != read_path:
            return None
        try:
            tensors = future.result()
        except UNREADABLE as exc:  # the job then loads the file itself (or encodes the prompt again)
            log.warning("reading %s ahead failed (%s); loading it now", path.name, exc)
            return None
        mark_used(path)
        return {key: None if key not in tensors else tensors[key].to(device, non_blocking=True) for key in KEYS}


def read_to_host(path: Path, pin: bool) -> dict[str, torch.Tensor]:
    """The file's tensors copied into torch's own host memory (page-locked if `pin`), as `load` would copy them."""
    tensors = load_file(str(path), device="cpu")
    copies = {}
    for key, tensor in tensors.items():
        copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        copies[key] = copy.copy_(tensor)
    return copies


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

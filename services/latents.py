"""Read and write `latents.safetensors`, the hand-over from diffusion to the decoders.

The file holds the video latents `[B, C, F, H, W]` and audio latents `[B, C, L, M]` exactly as
diffusers' LTX2Pipeline returns them with `output_type="latent"` (unpacked, denormalized, fp32),
and string metadata: the full spec and the digest of its latent-shaping fields, seed, model id and
revision, fps, shapes, LoRAs and the memory plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from protocol.errors import InvalidInput
from protocol.files import publish, temp_path_for

LATENTS_FORMAT = "ltx2-stages/latents/1"


def dtype_name(dtype: torch.dtype) -> str:
    """How a latents file names the dtype it was made in ("float32" for torch.float32)."""
    return str(dtype).removeprefix("torch.")


def denoised_metadata(
    latents_digest: str, seed: int, result: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> dict[str, object]:
    """What a file of denoised latents (the final ones, or two-stage's stage 1) records of how they
    were made: the spec's digest and seed, the shapes, dtype and device type, the transformer calls."""
    return {
        "latents_digest": latents_digest,
        "seed": seed,
        "video_shape": list(result["video"].shape),
        "audio_shape": list(result["audio"].shape),
        "dtype": dtype_name(dtype),
        "device": device.type,
        "transformer_calls": result["calls"],
    }


def write_latents(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> None:
    """Write tensors plus metadata atomically (temp name, fsync, rename)."""
    text = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    text["format"] = LATENTS_FORMAT
    temp = temp_path_for(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temp), metadata=text)
    publish(temp, path)


def read_latents(path: Path, latents_digest: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata; refuse files of another format or another spec."""
    if not path.is_file():
        raise InvalidInput(f"latents file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a cut or garbled file
        raise InvalidInput(f"{path} is not a readable latents file (truncated or corrupt: {exc})") from exc
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidInput(f"{path}: the {key} tensor holds NaN or infinite values; regenerate the latents")
    if metadata.get("format") != LATENTS_FORMAT:
        raise InvalidInput(f"{path} is not an ltx2-stages latents file (format {metadata.get('format')!r})")
    if latents_digest is not None and metadata.get("latents_digest") != latents_digest:
        raise InvalidInput(f"{path} was made for another job spec; delete it to regenerate")
    return tensors, metadata

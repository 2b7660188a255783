"""A tiny clip's decoded frames from services.video_decode.decode_frames, alone or as one rank of a parallel decode.

`python tests/context_parallel_decode.py MODEL_DIR OUT.safetensors`: with a group size above 1 in the
environment (protocol.stages.CP_SIZE_ENV, with the rank and the rendezvous address) it joins the group over
gloo and decodes its share of the temporal pieces; rank 0 writes the frames of each plan (PLANS) under the
plan's name. tests/test_context_parallel.py compares them with one process's decode of the same pieces.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKLLTX2Video
from safetensors.torch import save_file

from protocol.plans import DecodePlan
from services import context_parallel
from services.video_decode import decode_frames

# 17 frames at 64x64 of the tiny VAE (temporal ratio 4, spatial 32): 5 latent frames of 2x2.
LATENT_FRAMES, LATENT_SIZE = 5, 2
# The plans decoded: a single pass (the parallel decode cuts it into one piece per rank) and the plan's own
# three pieces (more pieces than ranks: dealt round robin).
PLANS = {"single_pass": DecodePlan(False, None, 2, 512, 128), "three_pieces": DecodePlan(False, 3, 2, 512, 128)}


def latents(channels: int) -> torch.Tensor:
    """Seeded random latents of the clip (the same in every process)."""
    generator = torch.Generator().manual_seed(11)
    return torch.randn(1, channels, LATENT_FRAMES, LATENT_SIZE, LATENT_SIZE, generator=generator)


def decode_all(model_dir: Path) -> dict[str, torch.Tensor]:
    """Each plan's frames `[n, 3, H, W]` (rank 0; an empty dict on the other ranks)."""
    device = torch.device("cpu")
    vae = AutoencoderKLLTX2Video.from_pretrained(model_dir / "vae", torch_dtype=torch.float32).eval()
    ranks, rank = context_parallel.group_size(), context_parallel.group_rank()
    if ranks > 1:
        context_parallel.join_group(device)
    clip = latents(vae.config.latent_channels)
    out = {}
    for name, plan in PLANS.items():
        frames = list(decode_frames(vae, clip, plan, ranks, rank))
        if ranks > 1:
            context_parallel.piece_exchange_done()
        if rank == 0:
            out[name] = torch.cat(frames).contiguous()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    frames = decode_all(args.model_dir)
    if context_parallel.group_rank() == 0:
        save_file(frames, str(args.out))


if __name__ == "__main__":
    main()

"""One tiny clip's latents from diffusers' LTX2Pipeline, alone or as one rank of a context-parallel group.

`python tests/context_parallel_render.py MODEL_DIR OUT.safetensors [--cfg]`: with a group size above 1 in
the environment (protocol.stages.CP_SIZE_ENV, with the rank and the rendezvous address) it joins the group
over gloo and shards the
transformer (services/context_parallel.py); rank 0 writes the latents. tests/test_context_parallel.py
compares a group's file with one process's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import LTX2Pipeline
from safetensors.torch import save_file

from services import context_parallel

PROMPT = "a slow dolly in through a rainy neon alley"


def render(model_dir: Path, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip's (video, audio) latents; the group's when this process is one of several."""
    device = torch.device("cpu")
    pipe = LTX2Pipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size = context_parallel.group_size()
    if size > 1:
        context_parallel.join_group(device)
        context_parallel.parallelize(pipe.transformer, size, device)
    scale = 3.0 if cfg else 1.0
    with torch.no_grad():
        video, audio = pipe(
            prompt=PROMPT,
            negative_prompt="blurry",
            width=64,
            height=64,
            num_frames=17,
            frame_rate=24.0,
            num_inference_steps=2,
            guidance_scale=scale,
            audio_guidance_scale=scale,
            stg_scale=0.0,
            audio_stg_scale=0.0,
            modality_scale=1.0,
            audio_modality_scale=1.0,
            guidance_rescale=0.0,
            audio_guidance_rescale=0.0,
            spatio_temporal_guidance_blocks=[],
            use_cross_timestep=False,
            max_sequence_length=1024,
            generator=torch.Generator(device=device).manual_seed(7),
            output_type="latent",
            return_dict=False,
        )
    if size > 1:
        context_parallel.leave_group()
    return video, audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cfg", action="store_true", help="classifier-free guidance on (a batch of two)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    video, audio = render(args.model_dir, args.cfg)
    if context_parallel.group_rank() == 0:
        save_file({"video": video.contiguous(), "audio": audio.contiguous()}, str(args.out))


if __name__ == "__main__":
    main()

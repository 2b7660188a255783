"""LTX-2.5's diffusion video decoder against the video VAE decode, on one GPU in one call (issue 29).

Full-size random bf16 weights of the real configs: diffusers 0.42.1's `LTX2VideoDiffusionDecoderModel`
at its defaults (the reference configuration, 0.417 B parameters) with its attention on the geometric
block mask (services/neighborhood_attention.py, compiled FlexAttention), and LTX-2.3's video VAE (the
one 2.5 shares, bench/gpu_configs.VAE_CONFIG_2_3). Random latents of each clip are decoded through the
stage's own code: services/diffusion_decode.diffusion_decode_frames and services/video_decode.decode_frames,
then the YUV conversion and copy to the host the encoder is fed, as the stage does.

Per clip and decoder, and for the diffusion decoder per token order of its attention (`--orders`: 3D bricks,
services/brick_order.py, then raster rows): the block-mask build time of the stage-5 grid and the key blocks a
query block reads there, the first decode (compiles included), `--repeats` warm decodes, the peak GPU
memory above the resident weights, the frame count, and whether two runs gave equal frames. The diffusion
decoder tries the VAE ladder's rungs in order (single pass, then spatial tiles, then temporal pieces) until
one does not run out of memory, and records each failure; tiles are decoded with their halos, as the stage
does, unless --no-exact-tiles (seams blended only, as diffusers does). First, a parity check on the GPU: a
small clip decoded by the stage and by diffusers' own LTX2VideoDiffusionDecodePipeline (its uncompiled
FlexAttention, dense scores: small clips only), same weights and seed, the largest and mean difference of
their frames. Writes `diffusion_decode.json` and a line per step to `progress.log` under --out as it goes.

    python3 bench/diffusion_decode_bench.py --out "$OUT" --budget-s 540
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLIPS = ("768x512x121", "1920x1088x121")
# issue 29's bar for making it LTX-2.5's default: the video stage's memory budget and vLLM-Omni's one-H200 time.
BUDGET_GIB = 48.0
TARGET_S = 6.5
STAGE5_CHANNELS = 256  # the reference decoder's last stage (decoder_stage_channels[-1])


class Progress:
    """The JSON result and a progress log under --out, both rewritten as each step ends."""

    def __init__(self, out: Path, result: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.log_path, self.result = out / "diffusion_decode.json", out / "progress.log", result
        self.started = time.monotonic()

    def note(self, line: str) -> None:
        text = f"{time.monotonic() - self.started:7.1f} s  {line}"
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        with self.log_path.open("a") as log:
            log.write(text + "\n")

    def record(self, entry: dict[str, Any]) -> None:
        self.result["runs"].append(entry)
        self.json_path.write_text(json.dumps(self.result, indent=2))
        self.note(json.dumps(entry))


def build_diffusion_decoder() -> Any:
    import torch
    from diffusers import LTX2VideoDiffusionDecoderModel

    from services.neighborhood_attention import use_block_sparse_attention

    with torch.device("cuda"):
        model = LTX2VideoDiffusionDecoderModel().to(torch.bfloat16).eval()
    use_block_sparse_attention(model)
    return model


def build_vae() -> Any:
    import torch
    from diffusers import AutoencoderKLLTX2Video
    from gpu_configs import scaled_configs

    with torch.device("cuda"):
        vae = AutoencoderKLLTX2Video(**scaled_configs("full", family="2.3")["vae"]).to(torch.bfloat16)
    return vae.eval()


def run_once(frames_of: Any) -> tuple[float, int, Any]:
    """Seconds of one decode fed as the stage feeds the encoder, its frame count, and a small checksum."""
    import torch

    from services.color import rgb_to_yuv420
    from services.video_decode import FRAMES_PER_WRITE

    torch.cuda.synchronize()
    started = time.perf_counter()
    count, samples = 0, []
    for frames in frames_of():
        for start in range(0, frames.shape[0], FRAMES_PER_WRITE):
            rgb_to_yuv420(frames[start : start + FRAMES_PER_WRITE]).cpu().numpy()
        count += frames.shape[0]
        samples.append(frames[:, :, ::8, ::8].float().cpu())
    torch.cuda.synchronize()
    return time.perf_counter() - started, count, torch.cat(samples)


def measure(name: str, clip: str, plan: Any, frames_of: Any, expected: int, repeats: int) -> dict[str, Any]:
    import torch

    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    first_s, count, first = run_once(frames_of)
    seconds, last = [], first
    for _ in range(repeats):
        elapsed, count, last = run_once(frames_of)
        seconds.append(round(elapsed, 3))
    peak = torch.cuda.max_memory_allocated()
    median = sorted(seconds)[len(seconds) // 2] if seconds else None
    return {
        "decoder": name,
        "clip": clip,
        "plan": plan.label,
        "first_s": round(first_s, 3),
        "seconds": seconds,
        "median_s": median,
        "peak_gib": round(peak / 2**30, 2),
        "peak_above_weights_gib": round((peak - resident) / 2**30, 2),
        "frames": count,
        "frames_exact": count == expected,
        "repeatable": bool(torch.equal(first, last)),
        "within_budget": (peak - resident) / 2**30 <= BUDGET_GIB,
        "within_target_s": median is not None and median <= TARGET_S,
    }


def mask_build_seconds(model: Any, latent_shape: tuple[int, ...], order: str) -> dict[str, Any]:
    """Seconds to build the block mask of the whole clip's stage-5 grid (the largest grid) in `order`, its size
    and the key blocks a query block reads (the most, and on average: the attention's work)."""
    import torch

    from services.neighborhood_attention import BlockSparseNeighborhoodProcessor
    from services.neighborhood_mask import Neighborhood

    _, _, frames, height, width = latent_shape
    patch = model.decoder.patch_size
    grid = (
        (frames - 1) * model.temporal_compression_ratio + 1,
        height * model.spatial_compression_ratio // patch,
        width * model.spatial_compression_ratio // patch,
    )
    torch.cuda.synchronize()
    started = time.perf_counter()
    neighborhood = Neighborhood.of(grid, model.config.decoder_stage5_kernel)
    mask = BlockSparseNeighborhoodProcessor(order).mask_for(neighborhood, torch.device("cuda"), flex=True)
    torch.cuda.synchronize()
    read = (mask.kv_num_blocks + mask.full_kv_num_blocks).float()
    return {
        "order": order,
        "stage5_grid": list(grid),
        "mask_build_s": round(time.perf_counter() - started, 3),
        "key_blocks_per_query_block": int(read.max()),
        "mean_key_blocks_per_query_block": round(float(read.mean()), 1),
        "query_blocks": int(mask.kv_num_blocks.shape[-1]),
    }


def parity_check(clip: str, model: Any) -> dict[str, Any]:
    """The stage's decode of a small clip against LTX2VideoDiffusionDecodePipeline's, same weights and noise."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2VideoDiffusionDecodePipeline
    from diffusers.models.autoencoders.ltx2_diffusion_decoder import (
        LTX2VideoVaeNeighborhoodAttention,
        LTX2VideoVaeNeighborhoodAttnProcessor,
    )

    from protocol.plans import DecodePlan
    from services.diffusion_decode import diffusion_decode_frames
    from services.neighborhood_attention import use_block_sparse_attention

    width, height, frames = (int(part) for part in clip.split("x"))
    shape = (1, 128, (frames - 1) // 8 + 1, height // 32, width // 32)
    latents = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    whole = DecodePlan(False, None, 1, 512, 128)
    started = time.perf_counter()
    ours = torch.cat(list(diffusion_decode_frames(model, latents, whole, torch.Generator("cuda").manual_seed(5))))
    ours_s = time.perf_counter() - started
    for module in model.modules():  # diffusers' own processor, as the pipeline ships
        if isinstance(module, LTX2VideoVaeNeighborhoodAttention):
            module.set_processor(LTX2VideoVaeNeighborhoodAttnProcessor())
    try:
        pipe = LTX2VideoDiffusionDecodePipeline(diffusion_decoder=model, scheduler=FlowMatchEulerDiscreteScheduler())
        generator = torch.Generator("cuda").manual_seed(5)
        reference = pipe(latents, generator=generator, output_type="pt", denormalize=False).frames[0].float()
    finally:
        use_block_sparse_attention(model)
    difference = (ours - reference.to(ours.device)).abs()
    return {
        "parity_clip": clip,
        "frames": [int(ours.shape[0]), int(reference.shape[0])],
        "max_diff": float(f"{float(difference.max()):.3g}"),
        "mean_diff": float(f"{float(difference.mean()):.3g}"),
        "ours_first_s": round(ours_s, 2),
    }


def measure_clip(clip: str, model: Any, vae: Any, progress: Progress, args: argparse.Namespace) -> None:
    """The VAE decode, the mask build and the diffusion decoder's first rung that fits, of one clip."""
    import torch

    from config.settings import load_settings
    from orchestrator.run.decode_plan import choose_decode_plan
    from services.neighborhood_attention import use_block_sparse_attention
    from services.video_decode import configure_vae, decode_frames

    settings = load_settings(environ={}).decode
    width, height, frames = (int(part) for part in clip.split("x"))
    latent_frames = (frames - 1) // 8 + 1
    shape = (1, 128, latent_frames, height // 32, width // 32)
    latents = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    vae_plan = choose_decode_plan(width, height, frames, settings)
    configure_vae(vae, vae_plan)
    progress.record(measure("vae", clip, vae_plan, lambda: decode_frames(vae, latents, vae_plan), frames, args.repeats))
    tokens_of = stage5_tile_tokens(model, latents, args.exact_tiles)
    for order in args.orders.split(","):
        use_block_sparse_attention(model, order)
        try:
            progress.record({"clip": clip, **mask_build_seconds(model, shape, order)})
        except Exception as exc:  # a failure to build is a result too
            progress.record({"clip": clip, "order": order, "mask_error": f"{type(exc).__name__}: {exc}"[:400]})
        measure_ladder(clip, frames, model, latents, order, settings, tokens_of, progress, args)
        torch.cuda.empty_cache()


def measure_ladder(
    clip: str,
    frames: int,
    model: Any,
    latents: Any,
    order: str,
    settings: Any,
    tokens_of: Any,
    progress: Progress,
    args: argparse.Namespace,
) -> None:
    """The diffusion decoder's first rung of the ladder that fits (`settings`: the decode settings), its attention
    in `order`; `frames`: the clip's frame count; `tokens_of`: a rung's largest stage-5 tile (stage5_tile_tokens)."""
    import torch

    from orchestrator.run.decode_plan import decode_ladder
    from services.diffusion_decode import diffusion_decode_frames

    wanted = [label.strip() for label in args.plans.split(",")] if args.plans else None
    for plan in decode_ladder(latents.shape[2], settings):
        if wanted is not None and plan.label not in wanted:
            continue
        tokens = tokens_of(plan)
        progress.note(
            f"{clip} {order} {plan.label}: largest stage-5 tile {tokens:,} tokens, "
            f"{tokens * STAGE5_CHANNELS:,} elements per activation (int32 ends at {2**31 - 1:,})"
        )
        if time.monotonic() - progress.started > args.budget_s:
            progress.record({"clip": clip, "order": order, "plan": plan.label, "skipped": "out of time"})
            return

        def frames_of(plan: Any = plan) -> Any:
            generator = torch.Generator("cuda").manual_seed(5)
            return diffusion_decode_frames(model, latents, plan, generator, exact_tiles=args.exact_tiles)

        try:
            record = {"order": order, **measure("diffusion", clip, plan, frames_of, frames, args.repeats)}
            record["stage5_tile_tokens"] = tokens
            # True: this torch's Inductor refused the narrow block lists (services/neighborhood_attention.py).
            record["full_width_lists"] = any(
                getattr(m, "processor", None) is not None and getattr(m.processor, "full_width", False)
                for m in model.modules()
            )
            progress.record(record)
            return
        except torch.OutOfMemoryError as exc:
            progress.record({"decoder": "diffusion", "clip": clip, "order": order, "plan": plan.label,
                             "oom": str(exc)[:300]})  # fmt: skip
        except Exception as exc:
            progress.record({"decoder": "diffusion", "clip": clip, "order": order, "plan": plan.label,
                             "error": repr(exc)[:600]})  # fmt: skip
            return
        finally:
            torch.cuda.empty_cache()


def stage5_tile_tokens(model: Any, latents: Any, exact_tiles: bool) -> Any:
    """A function of a plan: the tokens of its largest tile at the decoder's last stage, halo included, as
    services/diffusion_decode.diffusion_decode_frames cuts them (stages 1 to 3 run once here for their grid).
    A stage-5 activation holds that many times STAGE5_CHANNELS elements: past 2**31 a kernel indexing it in
    int32 would read out of bounds, one suspect of version 17's illegal memory access."""
    import math

    import torch

    from services.diffusion_decode import last_stage_axes, plan_tiles

    with torch.no_grad():
        axes = last_stage_axes(model, model.decoder.forward_stages_1_to_3(latents.to(model.dtype)), exact_tiles)
    stride = model.decoder.upsamples[-1].stride

    def tokens(plan: Any) -> int:
        spans = plan_tiles(model, axes, plan)
        widest = (max(tile.decoded[1] - tile.decoded[0] for tile in axis) for axis in spans)
        return math.prod(cells * side for cells, side in zip(widest, stride, strict=True))

    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clips", default=",".join(CLIPS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--exact-tiles",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode tiles with their halos, as the stage does (--no-exact-tiles: seams blended only, as diffusers)",
    )
    parser.add_argument(
        "--orders",
        default="bricks,raster",
        help="token orders of the diffusion decoder's attention to measure, in turn (services/brick_order.py)",
    )
    parser.add_argument(
        "--plans",
        default="",
        help="labels of the ladder's rungs to try, comma-separated (e.g. 'spatial tiling'); empty: every rung in order",
    )
    parser.add_argument("--parity-clip", default="256x256x9", help="clip of the GPU parity check ('' skips it)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip what is left once this much time has gone")
    args = parser.parse_args()

    import torch

    progress = Progress(args.out, {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []})
    torch.manual_seed(0)
    model = build_diffusion_decoder()
    vae = build_vae()
    progress.result["diffusion_decoder_parameters"] = sum(p.numel() for p in model.parameters())
    progress.note(f"built both decoders in {time.monotonic() - progress.started:.1f} s")
    if args.parity_clip:
        try:
            progress.record(parity_check(args.parity_clip, model))
        except Exception as exc:  # a failure of the check is a result too; the clips still run
            progress.record({"parity_clip": args.parity_clip, "error": repr(exc)[:600]})
        torch.cuda.empty_cache()
    for clip in args.clips.split(","):
        if time.monotonic() - progress.started > args.budget_s:
            progress.record({"clip": clip, "skipped": "out of time"})
            continue
        try:
            measure_clip(clip, model, vae, progress, args)
        except Exception as exc:  # the VAE's failure is a result too; the next clip still runs
            progress.record({"clip": clip, "error": repr(exc)[:600]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

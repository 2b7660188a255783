"""The video decode's levers, each measured on its own (issue 28, item 3), on one GPU in one call.

A full-size LTX-2.0/2.3 video VAE with random bf16 weights decodes random latents of a clip through
the stage's own code (services.video_decode.decode_frames with the plan the orchestrator picks, then
the YUV conversion and copy to the host the encoder is fed), for each variant:

- `eager`: the video stage as it is;
- `cudnn_benchmark`: cuDNN picks convolution algorithms by timing them (`cudnn.benchmark`), held to
  deterministic ones (`cudnn.deterministic`), so the deterministic setting's promise is kept;
- `channels_last`: the VAE's weights and inputs in channels-last-3d (NDHWC) memory format;
- `compiled`: the decoder compiled by Inductor (`torch.compile`, deterministic mode on);
  `compiled_autotune` the same in mode max-autotune-no-cudagraphs (Triton and cuBLAS tried per shape);
- `compile_decoder`: the video stage's own `--compile-decoder` (services.model_loading.compile_vae_decoder:
  compiled, channels-last-3d, Inductor's cache where LTX2_COMPILE_CACHE_DIR says, Dynamo's package with
  LTX2_COMPILE_PACKAGES=1); list it last (it compiles the VAE's decoder in place). Run the script again in new
  processes on the same cache to measure what a later stage process pays at its first decode (`first_s`);
- and their combinations as listed in --variants.

Per variant: seconds of each of `--repeats` warm decodes (after one warm-up, whose time is kept as
`first_s`: a compile's cost), peak GPU memory, the largest difference of its frames from `eager`'s
and whether two of its own runs gave equal frames. Writes `vae_decode.json` under --out as it goes.

    python3 bench/vae_decode_bench.py --out "$OUT" --family 2.3 --width 1920 --height 1088 --frames 121
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

VARIANTS = ("eager", "cudnn_benchmark", "channels_last", "channels_last+cudnn_benchmark", "compiled")
# Inductor modes by variant name; `compiled` is its default mode.
COMPILE_MODES = {"compiled": None, "compiled_autotune": "max-autotune-no-cudagraphs"}
# The video stage's own compiled decoder (--compile-decoder).
PRODUCT_VARIANT = "compile_decoder"


def build_vae(family: str) -> Any:
    """The family's full-size video VAE, random bf16 weights, on the GPU."""
    import torch
    from diffusers import AutoencoderKLLTX2Video
    from gpu_configs import scaled_configs

    config = scaled_configs("full", family=family)["vae"]
    with torch.device("cuda"):
        vae = AutoencoderKLLTX2Video(**config).to(torch.bfloat16)
    return vae.eval()


def prepare(vae: Any, variant: str) -> Any:
    """Set the variant's switches on torch and the VAE; returns the VAE (the decoder compiled for `compiled`)."""
    import torch

    torch.backends.cudnn.benchmark = "cudnn_benchmark" in variant
    torch.backends.cudnn.deterministic = "cudnn_benchmark" in variant
    if variant == PRODUCT_VARIANT:
        from services import compile_packages, model_loading

        key = compile_packages.package_key(vae, {"compile": "decoder", "deterministic": True}, {"bench": "vae"})
        model_loading.compile_vae_decoder(vae, None, deterministic=True, package_key=key)
        return vae
    memory_format = torch.channels_last_3d if "channels_last" in variant else torch.contiguous_format
    vae.to(memory_format=memory_format)
    mode = next((mode for name, mode in COMPILE_MODES.items() if name in variant.split("+")), "eager")
    if mode != "eager":
        import torch._inductor.config as inductor_config

        inductor_config.deterministic = True
        decoder = getattr(vae.decoder, "_orig_mod", vae.decoder)  # each compiled variant compiles afresh
        torch._dynamo.reset()
        vae.decoder = torch.compile(decoder, dynamic=False, mode=mode)
    elif hasattr(vae.decoder, "_orig_mod"):
        vae.decoder = vae.decoder._orig_mod
    return vae


def decode_once(vae: Any, latents: Any, plan: Any, memory_format: Any) -> tuple[float, Any]:
    """Seconds of one decode as the video stage does it (frames to YUV on the device, copied to the
    host), and a small checksum tensor of the frames (every 8th pixel of each frame, on the host)."""
    import torch

    from services.color import rgb_to_yuv420
    from services.video_decode import FRAMES_PER_WRITE, decode_frames

    torch.cuda.synchronize()
    started = time.perf_counter()
    samples = []
    for frames in decode_frames(vae, latents.to(memory_format=memory_format), plan):
        for start in range(0, frames.shape[0], FRAMES_PER_WRITE):
            rgb_to_yuv420(frames[start : start + FRAMES_PER_WRITE]).cpu().numpy()
        samples.append(frames[:, :, ::8, ::8].float().cpu())
    torch.cuda.synchronize()
    return time.perf_counter() - started, torch.cat(samples)


def measure(
    vae: Any, latents: Any, plan: Any, variant: str, repeats: int, reference: Any
) -> tuple[dict[str, Any], Any]:
    """One variant's record (see the module's docstring)."""
    import torch

    from services.video_decode import compiled_decode_done

    vae = prepare(vae, variant)
    channels_last = "channels_last" in variant or variant == PRODUCT_VARIANT
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    torch.cuda.reset_peak_memory_stats()
    first_s, first = decode_once(vae, latents, plan, memory_format)
    caches = compiled_decode_done() if variant == PRODUCT_VARIANT else None
    seconds, last = [], first
    for _ in range(repeats):
        elapsed, last = decode_once(vae, latents, plan, memory_format)
        seconds.append(round(elapsed, 4))
    record: dict[str, Any] = {
        "variant": variant,
        "first_s": round(first_s, 3),
        "seconds": seconds,
        "median_s": sorted(seconds)[len(seconds) // 2],
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "repeatable": bool(torch.equal(first, last)),
    }
    if reference is not None:
        record["max_diff_vs_eager"] = float((last - reference).abs().max())
    if caches is not None:
        record["compile_caches"] = caches
    return record, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--family", default="2.3", choices=("2.0", "2.3"))
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1088)
    parser.add_argument("--frames", type=int, default=121)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip variants once this much time has gone")
    args = parser.parse_args()
    started = time.monotonic()

    import torch

    from config.settings import load_settings
    from orchestrator.run.decode_plan import choose_decode_plan

    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "vae_decode.json"
    settings = load_settings(environ={})
    plan = choose_decode_plan(args.width, args.height, args.frames, settings.decode)
    torch.manual_seed(0)
    vae = build_vae(args.family)
    spatial, temporal = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    latent_frames = (args.frames - 1) // temporal + 1
    latent_shape = (1, vae.config.latent_channels, latent_frames, args.height // spatial, args.width // spatial)
    latents = torch.randn(latent_shape, device="cuda", dtype=torch.bfloat16)
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "family": args.family,
        "clip": f"{args.width}x{args.height}x{args.frames}",
        "plan": plan.label,
        "latents": list(latent_shape),
        "build_s": round(time.monotonic() - started, 1),
        "variants": [],
    }
    reference = None
    for variant in args.variants.split(","):
        if time.monotonic() - started > args.budget_s:
            result["variants"].append({"variant": variant, "skipped": "out of time"})
            continue
        try:
            record, frames = measure(vae, latents, plan, variant, args.repeats, reference)
        except Exception as exc:  # one variant's failure (a compile error, an OOM) is a result too
            record, frames = {"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:400]}, None
        if variant == "eager" and frames is not None:
            reference = frames
        result["variants"].append(record)
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
        result_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

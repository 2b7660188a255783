"""encode_diffuse -> latents.safetensors: encode the prompt, then run the denoising loop.

Both halves run in one process because the prompt embeddings (about 385 MB per prompt at full
size) would otherwise make a round trip through disk; the text encoder is dropped before the
transformer is loaded, so the two never share memory. The denoising itself is diffusers'
LTX2Pipeline (0.42.1) called with `output_type="latent"`, which is what makes the staged result
equal the single-process one (DESIGN.md rule 6).

For a group of jobs (stage-major scheduling, services/runtime.py) every prompt not yet in the
embedding cache is encoded first with one text-encoder load, then the transformer is loaded,
LoRA-fused and placed once and denoises each job in turn.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

# Imported at module level on purpose: a prestarted worker pays this before READY, overlapping
# the previous stage (DESIGN.md rule 5).
from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline

from protocol.errors import InvalidInput
from protocol.files import INPUT_IMAGE_FILE, LATENTS_FILE, Stage
from protocol.spec import JobSpec
from services import embedding_cache, guidance, model_loading, nag
from services.latents import write_latents
from services.lora_fusing import fuse_loras
from services.runtime import WorkerContext, run_worker


def embeddings_path(ctx: WorkerContext, device: torch.device, dtype: torch.dtype) -> Path | None:
    """Where the job's prompt embeddings are cached (None for a job made before the cache existed)."""
    if not ctx.job.get("embeddings_dir"):
        return None
    return embedding_cache.cache_path(
        Path(ctx.job["embeddings_dir"]), ctx.model_root, ctx.job.get("revision", ""), ctx.spec, dtype, device
    )


def encode_group_prompts(contexts: list[WorkerContext]) -> None:
    """Before a group's first job: encode every prompt missing from the cache with one encoder load,
    so the text encoder never shares the process's memory with the transformer."""
    device = model_loading.resolve_device()
    missing: dict[Path, WorkerContext] = {}
    for ctx in contexts:
        if ctx.spec is None:
            continue
        path = embeddings_path(ctx, device, model_loading.resolve_dtype(ctx.spec.dtype, device))
        if path is not None and not path.is_file():
            missing.setdefault(path, ctx)
    if not missing:
        return
    first = next(iter(missing.values()))
    first.progress(f"load text encoder for {len(missing)} prompt(s)")
    dtype = model_loading.resolve_dtype(first.spec.dtype, device)
    fill_cache({path: ctx.spec for path, ctx in missing.items()}, first.model_root, dtype, device, first.progress)


def fill_cache(
    wanted: dict[Path, JobSpec],
    model_root: Path,
    dtype: torch.dtype,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Encode each spec's prompt with one text-encoder load and store it at its cache path."""
    specs = list(wanted.values())
    for path, embeddings in zip(wanted, encode_prompts(model_root, dtype, device, specs, progress), strict=True):
        embedding_cache.store(path, embeddings)


def cached_or_encoded_prompt(ctx: WorkerContext, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Prompt embeddings from the on-disk cache, else from the text encoder (then cached)."""
    path = embeddings_path(ctx, device, dtype)
    if path is None:
        ctx.progress("load text encoder")
        return encode_prompts(ctx.model_root, dtype, device, [ctx.spec], ctx.progress)[0]
    cached = embedding_cache.load(path, device)
    if cached is not None:
        ctx.progress("prompt embeddings from cache")
        return cached
    ctx.progress("load text encoder")
    (embeddings,) = encode_prompts(ctx.model_root, dtype, device, [ctx.spec], ctx.progress)
    embedding_cache.store(path, embeddings)
    return embeddings


def encode_prompts(
    model_root: Path,
    dtype: torch.dtype,
    device: torch.device,
    specs: list[JobSpec],
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Embeddings and masks of each spec's prompt (negative ones only with CFG or NAG), loading the text
    encoder once; via LTX2Pipeline.encode_prompt, the code the single-process pipeline runs.
    `progress` hears when the encoder is loaded and encoding starts (the two costs apart)."""
    # The pipeline object is the only holder of the encoder, so releasing it frees the memory.
    encoder_only = model_loading.load_prompt_encoder(model_root, dtype, device)
    if progress is not None:
        progress(f"encode {len(specs)} prompt(s)")
    results = []
    with torch.no_grad():
        for spec in specs:
            embeds, mask, negative_embeds, negative_mask = encoder_only.encode_prompt(
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt,
                # NAG needs the negative prompt's embeddings at CFG = 1 too.
                do_classifier_free_guidance=spec.uses_negative_prompt,
                max_sequence_length=guidance.MAX_SEQUENCE_LENGTH,
                device=device,
            )
            results.append(
                {
                    "prompt_embeds": embeds,
                    "prompt_attention_mask": mask,
                    "negative_prompt_embeds": negative_embeds,
                    "negative_prompt_attention_mask": negative_mask,
                }
            )
    release_text_encoder(encoder_only)
    return results


def release_text_encoder(pipeline: Any) -> None:
    """Free the text encoder before the transformer loads (the one deliberate free in a stage).

    Every other model lives until its process exits; this one must go earlier because the
    transformer follows it in the same process and the two together would double the peak.
    """
    pipeline.text_encoder = None
    pipeline.tokenizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loaded_denoiser(ctx: WorkerContext, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The placed, LoRA-fused denoiser components, loaded once per process and kept in
    `ctx.shared` for the next job of a group (which the orchestrator only groups when model,
    dtype, LoRAs and plan are equal; anything else replaces them)."""
    key = json.dumps([str(ctx.model_root), str(dtype), ctx.job.get("loras", []), ctx.plan], sort_keys=True)
    kept = ctx.shared.get("denoiser")
    if kept is not None and kept["key"] == key:
        return kept
    # Another configuration: drop both references to the old weights before loading new ones.
    ctx.shared.pop("denoiser", None)
    kept = None
    ctx.progress("load transformer")
    connectors, transformer, scheduler = model_loading.load_denoiser(ctx.model_root, dtype, device)
    video_stats, audio_stats = model_loading.load_latent_statistics(ctx.model_root)
    # Order matters: base weights, then LoRAs fused, then FP8 storage / offload.
    if ctx.job.get("loras"):
        ctx.progress("fuse LoRAs")
        base = pipeline(LTX2Pipeline, scheduler, video_stats, audio_stats, connectors, transformer)
        fuse_loras(base, ctx.job["loras"])
    ctx.progress(f"place transformer ({ctx.plan.get('weights', 'native')})")
    model_loading.apply_memory_plan(
        transformer,
        dtype,
        device,
        fp8=ctx.plan.get("weights") == "fp8",
        sequential_offload=ctx.plan.get("offload") == "sequential",
        fp8_matmul=ctx.plan.get("weights") == "fp8-matmul",
        fp8_fast_accumulation=ctx.plan.get("fp8_accumulation") == "fast",
    )
    if ctx.plan.get("compile") == "regional":
        ctx.progress("compile transformer blocks (on the first step)")
        model_loading.compile_blocks(transformer, ctx.job.get("compile_cache_dir"))
    kept = {
        "key": key,
        "connectors": connectors,
        "transformer": transformer,
        "scheduler": scheduler,
        "video_stats": video_stats,
        "audio_stats": audio_stats,
    }
    ctx.shared["denoiser"] = kept
    return kept


def pipeline(cls: type, scheduler: Any, vae: Any, audio_vae: Any, connectors: Any, transformer: Any) -> Any:
    """A diffusers pipeline around already-loaded components (no text encoder, no vocoder)."""
    pipe = cls(
        scheduler=scheduler,
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=None,
        tokenizer=None,
        connectors=connectors,
        transformer=transformer,
        vocoder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoise(ctx: WorkerContext, embeddings: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Run the denoising loop; returns the latents and the number of transformer calls."""
    parts = loaded_denoiser(ctx, device, dtype)
    # A fresh scheduler per job: set_timesteps mutates it, and a group reuses the loaded one.
    fresh = type(parts["scheduler"]).from_config(parts["scheduler"].config)
    scheduler, sigmas = guidance.resolve_schedule(ctx.spec.schedule, fresh)
    image_inputs: dict[str, Any] = {}
    pipeline_cls: type = LTX2Pipeline
    video_stats = parts["video_stats"]
    if ctx.spec.image is not None:
        # Image-to-video encodes the first frame, so it needs the real VAE (its encoder half).
        if "video_vae" not in ctx.shared:
            ctx.progress("load video VAE for the conditioning image")
            ctx.shared["video_vae"] = model_loading.load_video_vae(ctx.model_root, dtype, device)
        video_stats = ctx.shared["video_vae"]
        image_inputs["image"] = load_conditioning_image(ctx.job_dir / INPUT_IMAGE_FILE, ctx.spec.width, ctx.spec.height)
        pipeline_cls = LTX2ImageToVideoPipeline
    transformer = parts["transformer"]
    pipe = pipeline(pipeline_cls, scheduler, video_stats, parts["audio_stats"], parts["connectors"], transformer)
    calls = []
    counter = transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    generator = torch.Generator(device=device).manual_seed(ctx.spec.seed)
    total = ctx.spec.steps

    def on_step_end(_pipe: Any, step: int, _t: Any, _kwargs: dict[str, Any]) -> dict[str, Any]:
        ctx.progress("denoise", step + 1, total)
        return {}

    ctx.progress("denoise", 0, total)
    embeddings, guided = nag_context(ctx.spec, embeddings, transformer, parts["connectors"])
    with torch.no_grad(), guided:
        video, audio = pipe(
            **image_inputs,
            **embeddings,
            **guidance.pinned_guidance(ctx.spec, ctx.job.get("family")),
            width=ctx.spec.width,
            height=ctx.spec.height,
            num_frames=ctx.spec.num_frames,
            frame_rate=ctx.spec.fps,
            num_inference_steps=total,
            sigmas=sigmas,
            generator=generator,
            output_type="latent",
            return_dict=False,
            callback_on_step_end=on_step_end,
        )
    counter.remove()
    return {"video": video, "audio": audio, "calls": len(calls)}


def nag_context(
    spec: JobSpec, embeddings: dict[str, Any], transformer: Any, connectors: Any
) -> tuple[dict[str, Any], contextlib.AbstractContextManager]:
    """(the pipeline's embeddings, a context that applies NAG around its call).

    With NAG the negative embeddings go to services/nag.py instead of the pipeline (which at CFG = 1
    would not use them); without it nothing changes, so such a run stays bit-equal to one before NAG.
    """
    if not spec.uses_nag:
        return embeddings, contextlib.nullcontext()
    negative = {key: embeddings[key] for key in ("negative_prompt_embeds", "negative_prompt_attention_mask")}
    if any(value is None for value in negative.values()):
        raise RuntimeError("NAG needs the negative prompt's embeddings, but the prompt cache entry has none")
    prompt_only = {key: value for key, value in embeddings.items() if key not in negative}
    settings = nag.NagSettings(scale=spec.nag_scale, tau=spec.nag_tau, alpha=spec.nag_alpha)
    # LTX2Pipeline passes its connectors padding_side "left" when it has no tokenizer, as here.
    return prompt_only, nag.nag_guidance(transformer, connectors, negative, settings, spec.nag_step_count)


def load_conditioning_image(path: Path, width: int, height: int) -> Any:
    """The first-frame image, centre-cropped to the clip's aspect ratio (the pipeline then resizes).

    Cropping instead of stretching keeps proportions when the image's shape differs from the clip's.
    """
    from PIL import Image, ImageOps

    try:  # the daemon read only the header; a file broken further in is the user's input to fix
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"--image: cannot decode the conditioning image: {exc}") from exc
    if rgb.width * height == rgb.height * width:
        return rgb
    return ImageOps.fit(rgb, (width, height), method=Image.Resampling.BICUBIC)


def run(ctx: WorkerContext) -> list[str]:
    """The stage: prompt -> embeddings -> latents file."""
    device = model_loading.resolve_device()
    dtype = model_loading.resolve_dtype(ctx.spec.dtype, device)
    embeddings = cached_or_encoded_prompt(ctx, device, dtype)
    result = denoise(ctx, embeddings, device, dtype)
    ctx.progress("write latents")
    write_latents(
        ctx.job_dir / LATENTS_FILE,
        {"video": result["video"], "audio": result["audio"]},
        {
            "latents_digest": ctx.spec.latents_digest(),
            "spec": ctx.spec.to_dict(),
            "seed": ctx.spec.seed,
            "model": ctx.spec.model,
            "revision": ctx.job.get("revision", ""),
            "family": (ctx.job.get("family") or {}).get("name", ""),
            "fps": ctx.spec.fps,
            "num_frames": ctx.spec.num_frames,
            "video_shape": list(result["video"].shape),
            "audio_shape": list(result["audio"].shape),
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
            "transformer_calls": result["calls"],
            "loras": [{k: lora[k] for k in ("source", "scale", "revision")} for lora in ctx.job.get("loras", [])],
            "plan": ctx.plan,
        },
    )
    return [LATENTS_FILE]


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `python -m services.encode_diffuse` and of the fork server's children."""
    run_worker(Stage.ENCODE_DIFFUSE, run, argv, prepare=encode_group_prompts)


if __name__ == "__main__":
    main()

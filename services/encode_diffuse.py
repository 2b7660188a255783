"""encode_diffuse -> latents.safetensors: encode the prompt, then run the denoising loop.

Both halves run in one process because the prompt embeddings (about 385 MB per prompt at full
size) would otherwise make a round trip through disk; the text encoder is dropped before the
transformer is loaded, so the two never share memory. The denoising itself is diffusers'
LTX2Pipeline (0.42.1) called with `output_type="latent"` (services/denoising.py), which is what
makes the staged result equal the single-process one (DESIGN.md rule 6): one pass for a one-stage
job, two over the same loaded transformer for a two-stage one (services/two_stage.py).

For a group of jobs (stage-major scheduling, services/runtime.py) every prompt not yet in the
embedding cache is encoded first with one text-encoder load, then the transformer is loaded,
LoRA-fused and placed once and denoises each job in turn. Dev two-stage jobs run every member's
stage 1 before the first job's turn, so the group loads the transformer with the stage-2 LoRA once
too (services/two_stage.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from protocol.files import LATENTS_FILE, Stage
from protocol.spec import JobSpec
from protocol.spec_rules import TWO_STAGE
from services import context_parallel, embedding_cache, guidance, model_loading

# Imported at module level on purpose (they import diffusers' LTX-2 pipelines): a prestarted worker
# pays this before READY, overlapping the previous stage (DESIGN.md rule 5).
from services.denoising import DenoisePass, denoise, release_memory
from services.latents import denoised_metadata, write_latents
from services.runtime import WorkerContext, run_worker
from services.two_stage import denoise_two_stage, run_group_stage1

log = logging.getLogger("ltx2.worker")
# Keys of WorkerContext.shared: the group's contexts in order, and the read-ahead of the next one's embeddings.
GROUP_KEY = "group"
READ_AHEAD_KEY = "embeddings_read_ahead"


def embeddings_path(ctx: WorkerContext, device: torch.device, dtype: torch.dtype) -> Path | None:
    """Where the job's prompt embeddings are cached (None for a job made before the cache existed)."""
    request = ctx.request
    if request.embeddings_dir is None:
        return None
    return embedding_cache.cache_path(request.embeddings_dir, ctx.model_root, request.revision, ctx.spec, dtype, device)


def encode_group_prompts(contexts: list[WorkerContext]) -> None:
    """Before a group's first job: encode every prompt missing from the cache with one encoder load,
    so the text encoder never shares the process's memory with the transformer."""
    device = model_loading.resolve_device()
    missing: dict[Path, WorkerContext] = {}
    for ctx in contexts:
        if ctx.stage_request is None:
            continue
        path = embeddings_path(ctx, device, model_loading.resolve_dtype(ctx.spec.dtype, device))
        if path is not None and not embedding_cache.readable(path):
            missing.setdefault(path, ctx)
    if not missing:
        return
    first = next(iter(missing.values()))
    first.progress(f"load text encoder for {len(missing)} prompt(s)")
    dtype = model_loading.resolve_dtype(first.spec.dtype, device)
    fill_cache({path: ctx.spec for path, ctx in missing.items()}, first.model_root, dtype, device, first.progress)


def prepare_group(contexts: list[WorkerContext]) -> None:
    """Before a group's first job: its prompts into the cache, then dev two-stage members' stage 1."""
    contexts[0].shared[GROUP_KEY] = contexts  # each job reads the next one's embeddings ahead
    encode_group_prompts(contexts)
    run_group_stage1(contexts, cached_or_encoded_prompt)


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
    read_ahead: embedding_cache.ReadAhead | None = ctx.shared.get(READ_AHEAD_KEY)
    cached = read_ahead.take(path, device) if read_ahead is not None else None
    if cached is not None:
        log.info("%s: prompt embeddings read ahead", ctx.job_id)
    else:
        cached = embedding_cache.load(path, device)
    if cached is not None:
        ctx.after_first_step.append(functools.partial(read_next_prompt_ahead, ctx, device, dtype))
        ctx.progress("prompt embeddings from cache")
        return cached
    ctx.progress("load text encoder")
    (embeddings,) = encode_prompts(ctx.model_root, dtype, device, [ctx.spec], ctx.progress)
    embedding_cache.store(path, embeddings)
    return embeddings


def read_next_prompt_ahead(ctx: WorkerContext, device: torch.device, dtype: torch.dtype) -> None:
    """Start reading the cached embeddings of the group's job after `ctx` (embedding_cache.ReadAhead says why)."""
    group: list[WorkerContext] = ctx.shared.get(GROUP_KEY, [])
    following = next((group[i + 1] for i, member in enumerate(group[:-1]) if member is ctx), None)
    if following is None or following.stage_request is None:
        return
    path = embeddings_path(following, device, dtype)
    if path is not None and path.is_file():
        read_ahead = ctx.shared.setdefault(READ_AHEAD_KEY, embedding_cache.ReadAhead())
        read_ahead.start(path, pin=device.type == "cuda")
        log.info("%s: reading the next job's prompt embeddings ahead", ctx.job_id)


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
    """Free the text encoder before the transformer loads.

    Models otherwise live until their process exits (but for dev two-stage's switch of transformer,
    services/denoising.loaded_denoiser); this one must go earlier because the transformer follows it
    in the same process and the two together would double the peak.
    """
    pipeline.text_encoder = None
    pipeline.tokenizer = None
    release_memory()


def denoise_one_stage(
    ctx: WorkerContext, embeddings: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """One pass at the clip's size with its schedule, steps, guidance and NAG."""
    spec = ctx.spec
    run = DenoisePass(
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        schedule=spec.schedule,
        guidance=guidance.pinned_guidance(spec, ctx.request.family),
        nag=True,
    )
    return denoise(ctx, embeddings, device, dtype, torch.Generator(device=device).manual_seed(spec.seed), run)


def run(ctx: WorkerContext) -> list[str]:
    """The stage: prompt -> embeddings -> latents file."""
    request = ctx.request
    device = model_loading.resolve_device()
    # Context parallel: every rank joins its group before anything is loaded (its device is picked here).
    context_parallel.join_for_plan(ctx.plan, device)
    dtype = model_loading.resolve_dtype(ctx.spec.dtype, device)
    embeddings = cached_or_encoded_prompt(ctx, device, dtype)
    two_stage = ctx.spec.pipeline == TWO_STAGE
    result = (denoise_two_stage if two_stage else denoise_one_stage)(ctx, embeddings, device, dtype)
    if context_parallel.group_rank() > 0:  # every rank holds the gathered latents; rank 0 writes them
        return []
    ctx.progress("write latents")
    write_latents(
        ctx.job_dir / LATENTS_FILE,
        {"video": result["video"], "audio": result["audio"]},
        {
            **denoised_metadata(ctx.spec.latents_digest(), ctx.spec.seed, result, dtype, device),
            "spec": ctx.spec.to_dict(),
            "model": ctx.spec.model,
            "revision": request.revision,
            "family": request.family.name if request.family else "",
            "fps": ctx.spec.fps,
            "num_frames": ctx.spec.num_frames,
            "pipeline": ctx.spec.pipeline,
            # Two-stage: the calls of each stage, and whether stage 1 came from latents_stage1.safetensors.
            **({key: result[key] for key in ("stage_calls", "stage1_reused")} if two_stage else {}),
            "loras": [
                {"source": lora.source, "scale": lora.scale, "revision": lora.revision} for lora in request.loras
            ],
            # Dev two-stage: the distilled LoRA stage 2 ran with (fused at 1.0 on top of `loras`).
            **stage2_lora_metadata(ctx),
            "plan": ctx.plan,
        },
    )
    return [LATENTS_FILE]


def stage2_lora_metadata(ctx: WorkerContext) -> dict[str, Any]:
    """`stage2_lora` (source, weight name, revision) for the latents file of a dev two-stage run; {} otherwise."""
    lora = ctx.request.stage2_lora if ctx.spec.pipeline == TWO_STAGE else None
    if lora is None or ctx.spec.schedule == "distilled":
        return {}
    return {"stage2_lora": {"source": lora.source, "weight_name": lora.weight_name, "revision": lora.revision}}


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `python -m services.encode_diffuse` and of the fork server's children."""
    run_worker(Stage.ENCODE_DIFFUSE, run, argv, prepare=prepare_group)


if __name__ == "__main__":
    main()

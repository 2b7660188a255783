"""Two-stage denoising -> latents_stage1.safetensors, then the full-size latents encode_diffuse writes.

Lightricks' recipe for large clips, as diffusers' LTX-2 docs ("Distilled checkpoint generation",
0.42.1) compose it from library parts: stage 1 denoises at half the width and height with the
run's own schedule, steps and guidance; `LTX2LatentUpsamplePipeline` doubles the latents'
width and height; stage 2 mixes fresh noise at the first of STAGE_2_DISTILLED_SIGMA_VALUES into
them and denoises those three sigmas at the full size with all guidance off. Both stages run in
the encode_diffuse process, over the transformer it loaded once, and draw from one generator,
as the docs pass one generator to both calls.

Stage 1's result is written to latents_stage1.safetensors together with the generator's state,
so an attempt that dies in the upsampler or stage 2 is retried from stage 2 and still gives the
latents an undisturbed run gives (the file is verified as latents.safetensors is: its format, its
spec digest, finite values).

With a dev (non-distilled) schedule the recipe is the docs' "Two-stages Generation": stage 1 runs
the dev schedule with its guidance on the job's transformer, and stage 2 the same three distilled
sigmas with guidance off, but on the transformer with Lightricks' distilled LoRA (the job record's
`stage2_lora`) fused at 1.0 on top of the job's own LoRAs. LoRAs are fused before any FP8 cast, so
that is a second load of the transformer, made after the first is released (never two at once).
With an IC-LoRA control video the recipe is Lightricks' ICLoraPipeline (ltx-pipelines' ic_lora.py): stage 1
runs with the job's LoRAs and the control clip (LTX2InContextPipeline at half the size, the control encoded at
that size / its factor), stage 2 on the transformer loaded again without the job's LoRAs (its `loras=()`) and
without the control clip, the image and keyframes alone conditioning it at the full size.

A group of such jobs (stage-major) runs every member's stage 1 first, from the group's `prepare`
(`run_group_stage1`), each written to its latents_stage1.safetensors, then switches once: each
job's own turn finds its stage 1 there and runs the upsampler and stage 2 on the LoRA'd transformer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import LTX2LatentUpsamplePipeline
from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES

from protocol.errors import InvalidInput
from protocol.families import CheckpointFamily
from protocol.files import STAGE1_LATENTS_FILE
from protocol.job_record import ResolvedLora
from protocol.spec_rules import TWO_STAGE
from services import context_parallel, guidance, model_loading
from services.denoising import DenoisePass, denoise, loaded_denoiser
from services.latents import denoised_metadata, dtype_name, read_latents, write_latents
from services.runtime import WorkerContext

log = logging.getLogger("ltx2.worker")
# ctx.shared: the job folders whose stage 1 this process ran in the group's prepare (not reused from
# an earlier attempt, though their turn reads it back from latents_stage1.safetensors).
STAGE1_MADE_HERE = "stage1_made_here"


def denoise_two_stage(
    ctx: WorkerContext, embeddings: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Stage 1 (or its verified file), the upsampler, stage 2; returns the full-size latents, the
    transformer calls of both stages and whether stage 1 came from its file."""
    family = ctx.request.family
    lora = stage2_lora(ctx)
    first, reused = stage1(ctx, embeddings, device, dtype)
    generator = torch.Generator(device=device)
    generator.set_state(first["generator_state"])
    job_loras = stage2_in_context(ctx)
    if lora is not None or not job_loras:  # switch before upsampling, which needs only the latent statistics
        loaded_denoiser(ctx, device, dtype, lora, job_loras)
    upsampled = upsample(ctx, first["video"], device, dtype, lora, job_loras)
    run = stage2_pass(ctx, family, upsampled, first["audio"])
    second = denoise(ctx, embeddings, device, dtype, generator, run, lora)
    return {
        "video": second["video"],
        "audio": second["audio"],
        "calls": first["calls"] + second["calls"],
        "stage_calls": [first["calls"], second["calls"]],
        "stage1_reused": reused,
    }


def stage2_lora(ctx: WorkerContext) -> ResolvedLora | None:
    """The resolved distilled LoRA stage 2 fuses (dev two-stage), None for a distilled run."""
    if ctx.spec.schedule == "distilled":
        return None
    lora = ctx.request.stage2_lora
    if lora is None:  # the orchestrator resolves it with the spec; never run stage 2 without it
        raise InvalidInput("job.json has no resolved stage2_lora for this dev two-stage job (see --stage2-lora)")
    return lora


def stage1(
    ctx: WorkerContext, embeddings: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Any], bool]:
    """(stage 1's result with the generator's state after it, whether it came from an earlier attempt)."""
    first = verified_stage1(ctx, device, dtype)
    if first is not None:
        if str(ctx.job_dir) in ctx.shared.get(STAGE1_MADE_HERE, ()):
            return first, False
        ctx.progress("stage 1 latents verified, skipped")
        return first, True
    generator = torch.Generator(device=device).manual_seed(ctx.spec.seed)
    first = denoise(ctx, embeddings, device, dtype, generator, stage1_pass(ctx, ctx.request.family))
    first["generator_state"] = generator.get_state()
    write_stage1(ctx, first, device, dtype)
    return first, False


def run_group_stage1(contexts: list[WorkerContext], prompt_embeddings: Any) -> None:
    """Before a group's first job: stage 1 of every member whose stage 2 runs on another transformer (dev
    two-stage, two-stage IC-LoRA), on the job's.

    Each result goes to its latents_stage1.safetensors, so the members' own turns switch to the
    stage-2 transformer once, for all of them. `prompt_embeddings(ctx, device, dtype)`
    gives a member's embeddings. A member whose input is invalid is left to fail in its own turn.
    """
    members = [ctx for ctx in contexts if ctx.stage_request is not None and switches_transformer(ctx)]
    if not members:
        return
    device = model_loading.resolve_device()
    made = members[0].shared.setdefault(STAGE1_MADE_HERE, set())
    for ctx in members:
        dtype = model_loading.resolve_dtype(ctx.spec.dtype, device)
        if verified_stage1(ctx, device, dtype) is not None:
            continue
        try:
            stage1(ctx, prompt_embeddings(ctx, device, dtype), device, dtype)
        except InvalidInput as exc:
            log.warning("%s: stage 1 left to the job's own turn: %s", ctx.job_dir.name, exc)
            continue
        made.add(str(ctx.job_dir))


def stage2_in_context(ctx: WorkerContext) -> bool:
    """Whether stage 2 runs with the job's LoRAs and control video: not with a control video, whose stage 2
    Lightricks' ICLoraPipeline refines on the transformer without LoRAs (`loras=()`) and without the control."""
    return ctx.request.reference is None


def switches_transformer(ctx: WorkerContext) -> bool:
    """Whether the job's stage 2 runs on another transformer than its stage 1: dev two-stage (the distilled LoRA
    fused too) and two-stage IC-LoRA (without the job's LoRAs)."""
    spec = ctx.spec
    return spec.pipeline == TWO_STAGE and (spec.schedule != "distilled" or ctx.request.reference is not None)


def stage1_pass(ctx: WorkerContext, family: CheckpointFamily | None) -> DenoisePass:
    """Half the width and height, the run's own schedule, steps, guidance and NAG."""
    spec = ctx.spec
    return DenoisePass(
        width=spec.width // 2,
        height=spec.height // 2,
        steps=spec.steps,
        schedule=spec.schedule,
        guidance=guidance.pinned_guidance(spec, family),
        nag=True,
        phase="denoise stage 1",
    )


def stage2_pass(
    ctx: WorkerContext, family: CheckpointFamily | None, video: torch.Tensor, audio: torch.Tensor
) -> DenoisePass:
    """The full size from the upsampled video and stage 1's audio, re-noised to the first stage-2 sigma
    (Lightricks' ti2vid_two_stages.py and distilled.py do the same), three steps, guidance off; with a control
    video, on the transformer without the job's LoRAs and without the control (Lightricks' ic_lora.py)."""
    return DenoisePass(
        width=ctx.spec.width,
        height=ctx.spec.height,
        steps=len(STAGE_2_DISTILLED_SIGMA_VALUES),
        schedule=guidance.STAGE_2_SCHEDULE,
        guidance=guidance.guidance_off(family),
        nag=False,
        phase="denoise stage 2",
        latents=video,
        audio_latents=audio,
        noise_scale=STAGE_2_DISTILLED_SIGMA_VALUES[0],
        in_context=stage2_in_context(ctx),
    )


def upsample(
    ctx: WorkerContext,
    video: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    lora: ResolvedLora | None = None,
    job_loras: bool = True,
) -> torch.Tensor:
    """Stage 1's (denormalized) video latents at twice the width and height, still denormalized.

    The upsampler loads only now, after stage 1, and stays for a group's next job. The pipeline's
    `vae` serves only its compression ratios here, so the latent statistics stand in for it (taken
    from the denoiser stage 2 runs on: `lora` names its stage-2 LoRA, if any; without `job_loras`, the
    job's own are left out).
    """
    ctx.progress("upsample latents")
    key = (str(ctx.model_root), str(dtype))
    kept = ctx.shared.get("latent_upsampler")
    if kept is None or kept[0] != key:
        ctx.progress("load latent upsampler")
        kept = (key, model_loading.load_latent_upsampler(ctx.model_root, dtype, device))
        ctx.shared["latent_upsampler"] = kept
    video_stats = loaded_denoiser(ctx, device, dtype, lora, job_loras)["video_stats"]
    pipe = LTX2LatentUpsamplePipeline(vae=video_stats, latent_upsampler=kept[1])
    pipe.set_progress_bar_config(disable=True)
    (upsampled,) = pipe(
        latents=video, width=ctx.spec.width // 2, height=ctx.spec.height // 2, output_type="latent", return_dict=False
    )
    return upsampled


def write_stage1(ctx: WorkerContext, first: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
    """latents_stage1.safetensors: stage 1's latents and the generator's state after it (by context-parallel
    rank 0 alone: every rank holds the same gathered latents, and one writer keeps the file whole)."""
    if context_parallel.group_rank() > 0:
        return
    ctx.progress("write stage 1 latents")
    write_latents(
        ctx.job_dir / STAGE1_LATENTS_FILE,
        {"video": first["video"], "audio": first["audio"], "generator_state": first["generator_state"]},
        {**denoised_metadata(ctx.spec.latents_digest(), ctx.spec.seed, first, dtype, device), "stage": 1},
    )


def verified_stage1(ctx: WorkerContext, device: torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    """Stage 1's result from its file when an earlier attempt wrote it for this spec, dtype and
    device type (a generator's state does not carry across device types); None to run stage 1."""
    path = ctx.job_dir / STAGE1_LATENTS_FILE
    if not path.is_file():
        return None
    try:
        tensors, metadata = read_latents(path, ctx.spec.latents_digest())
    except InvalidInput as exc:  # an intermediate file: redo the stage rather than fail the job
        log.warning("not reusing %s: %s", path, exc)
        return None
    made_here = metadata.get("dtype") == dtype_name(dtype) and metadata.get("device") == device.type
    if not made_here or set(tensors) != {"video", "audio", "generator_state"}:
        log.warning("not reusing %s: written for %s on %s", path, metadata.get("dtype"), metadata.get("device"))
        return None
    return {**tensors, "calls": int(metadata["transformer_calls"])}

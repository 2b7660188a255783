"""One denoising pass of diffusers' LTX-2 pipeline over the loaded, LoRA-fused, placed transformer.

A one-stage run is one pass at the clip's size; a two-stage run (services/two_stage.py) is two, at
half and at full size, over the same transformer (with a dev schedule, stage 2 runs over a second
load of it with the distilled LoRA fused as well). Each pass is LTX2Pipeline (or, with a
conditioning image, LTX2ImageToVideoPipeline; with keyframes or a video to extend, LTX2ConditionPipeline; for a
retake, services/retake_pipeline.py's subclass of it) of diffusers
0.42.1 called with `output_type="latent"`, which is what makes the staged result equal the
single-process one (DESIGN.md rule 6).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import LTX2ConditionPipeline, LTX2ImageToVideoPipeline, LTX2InContextPipeline, LTX2Pipeline
from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

from protocol.errors import InvalidInput
from protocol.families import CheckpointFamily
from protocol.files import INPUT_IMAGE_FILE
from protocol.job_record import ResolvedCondition, ResolvedLora
from protocol.retake import VIDEO_SOURCE
from protocol.spec import JobSpec
from services import (
    cfg_parallel,
    compile_packages,
    context_parallel,
    control_video,
    guidance,
    media,
    model_loading,
    nag,
    retake_source,
    soundtrack,
)
from services.cfg_parallel import CFG_MODE
from services.held_audio import audio_held, held_audio_pipeline, held_guidance
from services.held_audio_tokens import HeldAudioTokens, held_tokens_pipeline
from services.latents import read_latents
from services.lora_fusing import fuse_loras
from services.overlap_audio import overlap_audio_latents
from services.overlap_frames import load_overlap_frames
from services.retake_pipeline import LTX2RetakePipeline, RetakeRegion
from services.runtime import WorkerContext
from services.step_profile import StepProfiler, profiled_step

# Embedding keys of the negative prompt: only CFG and NAG read them.
NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_prompt_attention_mask")


@dataclasses.dataclass(frozen=True)
class DenoisePass:
    """What one pipeline call denoises, and how: all that differs between a one-stage run and the
    two stages of a two-stage one."""

    width: int
    height: int
    steps: int
    schedule: str  #: a JobSpec schedule, or guidance.STAGE_2_SCHEDULE
    guidance: dict[str, Any]  #: every guidance keyword of the call (services/guidance.py)
    nag: bool  #: apply the spec's NAG around the call
    phase: str = "denoise"  #: the progress phase its steps are reported under
    latents: torch.Tensor | None = None  #: video latents to start from (denormalized, 5-D), else noise
    audio_latents: torch.Tensor | None = None  #: audio latents to start from (denormalized, 4-D), else noise
    noise_scale: float = 0.0  #: how much fresh noise is mixed into given latents (the first sigma)
    #: over the transformer with the job's LoRAs fused, and conditioned on its control video: all but the second
    #: pass of a two-stage IC-LoRA run (ltx-pipelines' ICLoraPipeline refines without either; services/two_stage.py)
    in_context: bool = True


def loaded_denoiser(
    ctx: WorkerContext,
    device: torch.device,
    dtype: torch.dtype,
    stage2_lora: ResolvedLora | None = None,
    job_loras: bool = True,
) -> dict[str, Any]:
    """The placed, LoRA-fused denoiser components, loaded once per process and kept in
    `ctx.shared` for the next job of a group (which the orchestrator only groups when model,
    dtype, LoRAs and plan are equal; anything else replaces them).

    `stage2_lora` (dev two-stage's stage 2) is fused on top of the job's LoRAs: another set of weights,
    so another key; without `job_loras` (two-stage IC-LoRA's stage 2) the job's LoRAs are left out. Only one
    denoiser is ever held: the old one is released before the next loads.
    """
    request = ctx.request
    own = list(request.loras) if job_loras else []
    fields: list[Any] = [str(ctx.model_root), str(dtype), [lora.to_json() for lora in own], ctx.plan]
    if stage2_lora is not None:  # left out otherwise, so the key of every other run stays as it was
        fields.append(stage2_lora.to_json())
    key = json.dumps(fields, sort_keys=True)
    kept = ctx.shared.get("denoiser")
    if kept is not None and kept["key"] == key:
        return kept
    # Another configuration: drop both references to the old weights before loading new ones.
    kept = None
    if ctx.shared.pop("denoiser", None) is not None:
        release_memory()
    ctx.progress("load transformer" if stage2_lora is None else "load transformer with stage-2 distilled LoRA")
    connectors, transformer, scheduler = model_loading.load_denoiser(ctx.model_root, dtype, device)
    video_stats, audio_stats = model_loading.load_latent_statistics(ctx.model_root)
    # Order matters: base weights, then LoRAs fused, then FP8 storage / offload.
    loras = [*own, *([stage2_lora] if stage2_lora is not None else [])]
    if loras:
        ctx.progress("fuse LoRAs")
        base = pipeline(LTX2Pipeline, scheduler, video_stats, audio_stats, connectors, transformer)
        fuse_loras(base, loras)
    ctx.progress(f"place transformer ({ctx.plan.get('weights', 'native')})")
    model_loading.apply_memory_plan(
        transformer,
        dtype,
        device,
        fp8=ctx.plan.get("weights") == "fp8",
        sequential_offload=ctx.plan.get("offload") == "sequential",
        fp8_matmul=ctx.plan.get("weights") == "fp8-matmul",
        fp8_fast_accumulation=ctx.plan.get("fp8_accumulation") == "fast",
        fp8_gelu_kernel=ctx.plan.get("fp8_gelu") == "kernel",
    )
    if ctx.plan.get("attention") == "fp8":
        use_fp8_attention(ctx, transformer, device)
    if (ranks := context_parallel.plan_ranks(ctx.plan)) > 1 and ctx.plan.get("context_parallel_mode") == CFG_MODE:
        ctx.progress(f"split the guidance batch over {ranks} processes (CFG parallel)")
        cfg_parallel.split_batches(transformer, ranks, context_parallel.group_rank())
    elif ranks > 1:
        ctx.progress(f"shard the tokens over {ranks} processes (context parallel)")
        context_parallel.parallelize(transformer, ranks, device)
    if ctx.plan.get("compile") == "regional":
        deterministic = bool(ctx.plan.get("deterministic"))
        ctx.progress(f"compile transformer blocks (on the first step{', deterministic' if deterministic else ''})")
        package = compile_packages.package_key(transformer, ctx.plan, compiled_shape(ctx.spec))
        whole_rows = ctx.plan.get("row_reductions") == "whole"
        model_loading.compile_blocks(transformer, request.compile_cache_dir, deterministic, package, whole_rows)
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


def use_fp8_attention(ctx: WorkerContext, transformer: Any, device: torch.device) -> None:
    """Self-attention in FP8 (`--fp8-attention`), or a notice of why it stays bf16 on this machine; with the plan's
    "qk_norm_rope" the query's and key's norms and rotary embedding in one pass (services/qk_norm_rope.py), or a
    notice of why Inductor's kernels stay."""
    from services import fp8_attention, qk_norm_rope

    qk_kernel = ctx.plan.get("qk_norm_rope") == "kernel"
    if qk_kernel and device.type == "cuda" and (why := qk_norm_rope.qk_kernel_unavailable(str(device))) is not None:
        ctx.progress(f"one-pass query/key norm and rotary embedding unavailable, Inductor's kernels instead: {why}")
        qk_kernel = False
    elif qk_kernel:
        runs = "Triton" if device.type == "cuda" else "torch"
        ctx.progress(f"query/key norms and rotary embedding in one pass per token ({runs})")
    count = fp8_attention.install(transformer, qk_kernel)
    reason = fp8_attention.kernel_unavailable()
    if reason is None:
        ctx.progress(f"FP8 self-attention in {count} attention layers (cuDNN)")
    else:
        ctx.progress(f"FP8 self-attention unavailable, bf16 attention instead: {reason}")


def release_memory() -> None:
    """Return what dropped weights held (host and GPU) before another transformer loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def denoise(
    ctx: WorkerContext,
    embeddings: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator,
    run: DenoisePass,
    stage2_lora: ResolvedLora | None = None,
) -> dict[str, Any]:
    """Run one pass; returns its latents (denormalized, fp32) and the number of transformer calls.

    `generator` is the job's, shared by the passes of a two-stage run as one diffusers script
    would pass one generator to both calls. `stage2_lora`: run over the transformer with that LoRA
    fused too (dev two-stage's stage 2).
    """
    parts = loaded_denoiser(ctx, device, dtype, stage2_lora, job_loras=run.in_context)
    # A fresh scheduler per pass: set_timesteps mutates it, and a group reuses the loaded one.
    fresh = type(parts["scheduler"]).from_config(parts["scheduler"].config)
    scheduler, sigmas = guidance.resolve_schedule(run.schedule, fresh)
    pipeline_cls, video_stats, image_inputs = conditioning(ctx, device, dtype, parts["video_stats"], run)
    transformer = parts["transformer"]
    held = soundtrack_latents(ctx, device, dtype) if ctx.request.audio is not None else None
    if held is not None:  # audio-to-video: the soundtrack's latents held through the pass (services/held_audio.py)
        pipeline_cls = held_audio_pipeline(pipeline_cls)
        run = dataclasses.replace(run, audio_latents=held, guidance=held_guidance(run.guidance))
    overlap_audio = extension_audio(ctx, device, dtype) if ctx.request.extension is not None else None
    if overlap_audio is not None:  # extension: the first audio tokens held (services/held_audio_tokens.py)
        pipeline_cls = held_tokens_pipeline(pipeline_cls)
        image_inputs = {**image_inputs, "held_audio": HeldAudioTokens(overlap_audio)}
    pipe = pipeline(pipeline_cls, scheduler, video_stats, parts["audio_stats"], parts["connectors"], transformer)
    ranks = context_parallel.plan_ranks(ctx.plan)
    if ranks > 1 and ctx.plan.get("context_parallel_mode") != CFG_MODE:  # Ulysses shares the tokens and heads
        tokens = video_tokens(pipe, run, ctx.spec)
        context_parallel.require_shardable(transformer, tokens, guidance.MAX_SEQUENCE_LENGTH, ranks)
    calls = []
    counter = transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    starts = {"latents": run.latents, "audio_latents": run.audio_latents}
    if run.latents is not None:
        # Only with latents to start from: without them LTX2ConditionPipeline's noise_scale must stay at its
        # default (the first sigma: pure noise where nothing is conditioned), which 0.0 would turn into zeros;
        # the other pipelines ignore it then.
        starts["noise_scale"] = run.noise_scale

    rank = context_parallel.group_rank() if ranks > 1 else None
    profiler = StepProfiler(profiled_step(), ctx.job_dir, run.phase, device, rank)

    def on_step_end(_pipe: Any, step: int, _t: Any, _kwargs: dict[str, Any]) -> dict[str, Any]:
        profiler.after_step(step)
        ctx.progress(run.phase, step + 1, run.steps)
        if step == 0:
            ctx.first_step_done()
            if ctx.plan.get("compile") == "regional":
                first_compiled_step_done()
        profiler.before_step(step + 1)
        return {}

    ctx.progress(run.phase, 0, run.steps)
    embeddings, guided = nag_context(ctx.spec, embeddings, transformer, parts["connectors"], run.nag, ranks)
    holding = audio_held(transformer) if held is not None else contextlib.nullcontext()
    with contextlib.closing(profiler), torch.no_grad(), guided, holding:
        profiler.before_step(0)  # step 0's span includes the pipeline's setup before its first model call
        video, audio = pipe(
            **image_inputs,
            **embeddings,
            **run.guidance,
            **starts,
            width=run.width,
            height=run.height,
            num_frames=ctx.spec.num_frames,
            frame_rate=ctx.spec.fps,
            num_inference_steps=run.steps,
            sigmas=sigmas,
            generator=generator,
            output_type="latent",
            return_dict=False,
            callback_on_step_end=on_step_end,
        )
    counter.remove()
    profiler.finish(run.steps)
    if ctx.plan.get("compile") == "regional" and compile_packages.wanted() and compile_packages.available():
        # At the pass's end, not its first step: NAG's first steps and the rest are two graphs.
        compile_packages.save()
    if held is not None:  # the encoded values themselves, not their normalized-and-back copy (equal up to rounding)
        audio = held.to(audio)
    return {"video": video, "audio": audio, "calls": len(calls)}


def compiled_shape(spec: JobSpec) -> dict[str, Any]:
    """What of the clip decides the compiled blocks' graphs beyond the plan: its size (two-stage's half
    size follows from it) and whether NAG's attention processor is in the blocks."""
    return {"width": spec.width, "height": spec.height, "frames": spec.num_frames, "nag": spec.nag_scale > 1}


def first_compiled_step_done() -> None:
    """After a pass's first compiled step, where the blocks were compiled or loaded: say what the compile
    caches served (tests and benchmarks read the line)."""
    logging.getLogger("ltx2.worker").info(compile_packages.cache_report())


def video_tokens(pipe: Any, run: DenoisePass, spec: JobSpec) -> int:
    """The transformer's video tokens in this pass: latent frames x latent rows x latent columns (patch size 1)."""
    frames = (spec.num_frames - 1) // pipe.vae_temporal_compression_ratio + 1
    spatial = pipe.vae_spatial_compression_ratio
    return frames * (run.height // spatial) * (run.width // spatial)


def soundtrack_latents(ctx: WorkerContext, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The job's soundtrack encoded by the audio VAE (services/soundtrack.py), once per job: both passes of a
    two-stage run hold the same latents, as the reference gives both stages `initial_latent=encoded`."""

    def encoded() -> torch.Tensor:
        encoder = audio_vae(ctx, device, dtype, "the soundtrack")
        ctx.progress("encode the soundtrack")
        spec = ctx.spec
        waveform, rate = soundtrack.read_job_track(ctx.job_dir, ctx.request.audio, spec.num_frames, spec.fps)
        frames = soundtrack.clip_audio_latents(encoder, spec.num_frames, spec.fps)
        return soundtrack.encode_track(encoder, waveform, rate, frames, device)

    return once_per_job(ctx, "soundtrack", encoded)


def extension_audio(ctx: WorkerContext, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The source's audio under an extension's overlap, encoded into the latents the clip's first audio tokens
    hold (services/overlap_audio.py; None: the source has no audio), once per job: both passes of a two-stage
    run hold them, as the reference conditions both stages."""

    def encoded() -> torch.Tensor | None:
        encoder = audio_vae(ctx, device, dtype, "the source's audio")
        ctx.progress("encode the source's audio under the overlap")
        spec, extension = ctx.spec, ctx.request.extension
        return overlap_audio_latents(encoder, ctx.job_dir, extension, spec.num_frames, spec.fps, device)

    return once_per_job(ctx, "overlap_audio", encoded)


def overlap_frames(ctx: WorkerContext) -> Any:
    """The extended source's last frames at the clip's size (services/overlap_frames.py), decoded once per job:
    both passes of a two-stage run hold them (each resizes them to its own size), and a 1080p source decodes
    in seconds."""

    def decoded() -> Any:
        ctx.progress("decode the source's last frames")
        return load_overlap_frames(ctx.job_dir, ctx.request.extension, ctx.spec)

    return once_per_job(ctx, "overlap_frames", decoded)


def once_per_job(ctx: WorkerContext, key: str, make: Callable[[], Any]) -> Any:
    """`make()`'s value for this job, kept in the process's `shared` under `key` so a two-stage run's second pass
    (and nothing of a group's next job) reuses it."""
    kept = ctx.shared.get(key)
    if kept is not None and kept[0] == ctx.request.job_id:
        return kept[1]
    value = make()
    ctx.shared[key] = (ctx.request.job_id, value)
    return value


def conditioning(
    ctx: WorkerContext, device: torch.device, dtype: torch.dtype, video_stats: Any, run: DenoisePass
) -> tuple[type, Any, dict[str, Any]]:
    """(pipeline class, its `vae`, its conditioning keywords) for the job: text-to-video needs only the
    VAE's statistics; image-to-video and keyframes encode pixels, so they need the real VAE (its encoder).

    Given latents to start from, LTX2ImageToVideoPipeline encodes no image: it keeps their first
    latent frame clean and unnoised, which is how diffusers conditions two-stage's second pass.
    LTX2ConditionPipeline encodes its conditions again at the pass's size and places them on the given
    latents, as it does on noise: two-stage conditions both passes.
    An IC-LoRA control video runs LTX2InContextPipeline, the keyframes (and the image) as its frame conditions;
    two-stage's second pass runs without it (DenoisePass.in_context), those frame conditions alone.
    A retake runs services/retake_pipeline.py's LTX2RetakePipeline from the source's latents, which it only
    normalizes: the VAE's statistics suffice.
    """
    if ctx.request.retake is not None:  # the source's latents, its frames outside the range held
        return LTX2RetakePipeline, video_stats, {"retake": retake_region(ctx, device, dtype)}
    conditions = [keyframe(ctx, condition) for condition in ctx.request.conditions]
    extension = ctx.request.extension
    if extension is not None:  # the source's last frames, held at full strength from frame 0 (protocol/extension.py)
        conditions.insert(0, LTX2VideoCondition(frames=overlap_frames(ctx), index=0, strength=1.0))
    if ctx.request.reference is not None and run.in_context:  # the keyframes (and image) are its frame conditions
        inputs = control_video.in_context_inputs(ctx.job_dir, ctx.request.reference, conditions)
        return LTX2InContextPipeline, video_vae(ctx, device, dtype, "the control video"), inputs
    if conditions:
        purpose = "the keyframes" if extension is None else "the extension's frames"
        return LTX2ConditionPipeline, video_vae(ctx, device, dtype, purpose), {"conditions": conditions}
    if ctx.spec.image is None:
        return LTX2Pipeline, video_stats, {}
    vae = video_vae(ctx, device, dtype, "the conditioning image")
    image = load_conditioning_image(ctx.job_dir / INPUT_IMAGE_FILE, run.width, run.height)
    crf = image_crf(ctx.request.family)
    return LTX2ImageToVideoPipeline, vae, {"image": image, "image_crf": crf}


def retake_region(ctx: WorkerContext, device: torch.device, dtype: torch.dtype) -> RetakeRegion:
    """The retaken source's latents (a job's, as the job holds them; a video file's, encoded now) and the range
    it regenerates."""
    retake = ctx.request.retake
    if retake.kind == VIDEO_SOURCE:
        video, audio = encoded_retake_file(ctx, device, dtype)
    else:
        tensors, _ = read_latents(ctx.job_dir / retake.file)
        video, audio = tensors["video"].to(device), tensors["audio"].to(device)
    return RetakeRegion(
        video=video,
        audio=audio,
        start=retake.start,
        stop=retake.stop,
        first=retake.from_frame,
        last=retake.to_frame,
    )


def encoded_retake_file(
    ctx: WorkerContext, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The retaken video file's latents (services/retake_source.py): its frames through the video VAE, its audio
    (None without an audio stream) through the audio VAE, written into the job as retake_encoded.safetensors."""
    retake, spec = ctx.request.retake, ctx.spec
    path = ctx.job_dir / retake.file
    ctx.progress("encode the video to retake")
    video = retake_source.encode_video_file(video_vae(ctx, device, dtype, "the video to retake"), path, device)
    audio = None
    if retake.has_audio:
        vae = audio_vae(ctx, device, dtype, "the video to retake")
        frames = soundtrack.clip_audio_latents(vae, spec.num_frames, spec.fps)
        audio = retake_source.encode_audio_file(vae, path, spec.num_frames / spec.fps, frames, device)
    retake_source.write_encoded(ctx.job_dir, retake, video, audio)
    return video, audio


def video_vae(ctx: WorkerContext, device: torch.device, dtype: torch.dtype, purpose: str) -> Any:
    """The video VAE, loaded once per process (a group's next job reuses it)."""
    if "video_vae" not in ctx.shared:
        ctx.progress(f"load video VAE for {purpose}")
        ctx.shared["video_vae"] = model_loading.load_video_vae(ctx.model_root, dtype, device)
    return ctx.shared["video_vae"]


def audio_vae(ctx: WorkerContext, device: torch.device, dtype: torch.dtype, purpose: str) -> Any:
    """The audio VAE, loaded once per process (a group's next job reuses it)."""
    if "audio_vae" not in ctx.shared:
        ctx.progress(f"load audio VAE for {purpose}")
        ctx.shared["audio_vae"] = model_loading.load_audio_vae(ctx.model_root, dtype, device)
    return ctx.shared["audio_vae"]


def keyframe(ctx: WorkerContext, condition: ResolvedCondition) -> LTX2VideoCondition:
    """A recorded condition as diffusers takes it: the file's pixels as they are (the pipeline resizes
    and centre-crops them itself), the latent index the orchestrator placed it at, and the CRF a single
    frame is re-compressed at (the request's, else the family's: the pipeline has no text encoder here
    to pick it from)."""
    path = ctx.job_dir / condition.file
    frames = load_keyframe_pixels(path, condition.kind)
    crf = condition.crf if condition.crf is not None else image_crf(ctx.request.family)
    return LTX2VideoCondition(frames=frames, index=condition.latent_index, strength=condition.strength, crf=crf)


def load_keyframe_pixels(path: Path, kind: str) -> Any:
    """An image as RGB (PIL), or a video's frames as a `[F, H, W, 3]` uint8 array; InvalidInput when the
    file does not decode (the orchestrator read only its header)."""
    from PIL import Image

    try:
        if kind == "video":
            return media.read_video_frames(path)
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"--condition: cannot decode {path.name}: {exc}") from exc


# Text encoders whose model_type diffusers' resolve_default_image_crf (0.42.1) treats as LTX-2.5's
# ("gemma4_unified" / "gemma4"), by the model_index.json class names that carry those types.
GEMMA_4_ENCODERS = ("Gemma4UnifiedForConditionalGeneration", "Gemma4ForConditionalGeneration")


def image_crf(family: CheckpointFamily | None) -> int:
    """The H.264 CRF the conditioning image is re-compressed at before it is encoded.

    LTX2ImageToVideoPipeline picks it from its text encoder (`resolve_default_image_crf`: 18, the CRF
    LTX-2.5 was trained with, for a Gemma 4 encoder; 33 otherwise). The denoising process holds no text
    encoder, so left to itself the pipeline would always pick 33; the class comes from the family
    job.json recorded instead (none recorded: LTX-2.0, a Gemma 3).
    """
    from diffusers.pipelines.ltx2.utils import DEFAULT_IMAGE_CRF, LTX2_5_IMAGE_CRF

    encoder = family.text_encoder if family is not None else None
    return LTX2_5_IMAGE_CRF if encoder in GEMMA_4_ENCODERS else DEFAULT_IMAGE_CRF


def nag_context(
    spec: JobSpec,
    embeddings: dict[str, Any],
    transformer: Any,
    connectors: Any,
    apply: bool = True,
    shards: int = 1,
) -> tuple[dict[str, Any], contextlib.AbstractContextManager]:
    """(the pipeline's embeddings, a context that applies NAG around its call); `shards`: the
    context-parallel ranks the transformer's tokens are split between.

    With NAG the negative embeddings go to services/nag.py instead of the pipeline (which at CFG = 1
    would not use them); without it nothing changes, so such a run stays bit-equal to one before NAG.
    A pass that does not `apply` it (two-stage's guidance-free second pass) gets the prompt alone.
    """
    if not spec.uses_nag:
        return embeddings, contextlib.nullcontext()
    prompt_only = {key: value for key, value in embeddings.items() if key not in NEGATIVE_KEYS}
    if not apply:
        return prompt_only, contextlib.nullcontext()
    negative = {key: embeddings[key] for key in NEGATIVE_KEYS}
    if any(value is None for value in negative.values()):
        raise RuntimeError("NAG needs the negative prompt's embeddings, but the prompt cache entry has none")
    settings = nag.NagSettings(scale=spec.nag_scale, tau=spec.nag_tau, alpha=spec.nag_alpha)
    # LTX2Pipeline passes its connectors padding_side "left" when it has no tokenizer, as here.
    guided = nag.nag_guidance(transformer, connectors, negative, settings, spec.nag_step_count, shards=shards)
    return prompt_only, guided


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

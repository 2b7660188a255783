"""The record published next to each video: what made it, how long each stage took, peak memory.

`<name>_<stamp>.json` holds the full spec (seed included), the rendered and delivered size, the
model and LoRAs with their revisions, the keyframes (file hash, frame, strength), the video it extends
(job or file, hash, overlap, what became of the audio), the versions of the packages that ran, and per-stage
seconds, attempts, final plan and peak GPU/host memory, so a clip can be reproduced or its cost compared later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.run.jobdir import JobDir
from orchestrator.run.request_digest import installed_versions
from orchestrator.run.reuse import reproducibility
from protocol.extension import AUDIO_NOTE, joined_frames
from protocol.files import RETAKE_ENCODED_FILE, Stage
from protocol.job_record import (
    ResolvedAudio,
    ResolvedCondition,
    ResolvedExtension,
    ResolvedLora,
    ResolvedReference,
    ResolvedRetake,
)
from protocol.retake import RETAKE_AUDIO_NOTE, RETAKE_NO_AUDIO_NOTE, VIDEO_SOURCE

PACKAGES = (
    "ltx2-stages",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "av",
    "pyzmq",
    "msgpack",
    "numpy",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of PACKAGES, read from package metadata (nothing is imported)."""
    return installed_versions(PACKAGES)


def stage_summary(job: JobDir, stage: Stage) -> dict[str, Any]:
    attempts = job.stage_record(stage).attempts
    return {
        "attempts": len(attempts),
        "results": [attempt.result for attempt in attempts],
        # From GO: a worker started ahead of its turn waited `waited_s` before it (imports, the stage before).
        "seconds": round(sum(attempt.seconds or 0.0 for attempt in attempts), 3),
        "waited_s": round(sum(attempt.waited_s or 0.0 for attempt in attempts), 3),
        "final_plan": attempts[-1].plan if attempts else None,
        "peak_gpu_bytes": max((attempt.peak_gpu_bytes or 0 for attempt in attempts), default=0),
        "peak_rss_bytes": max((attempt.peak_rss_bytes or 0 for attempt in attempts), default=0),
    }


def build_sidecar(job: JobDir, video: Path) -> dict[str, Any]:
    record = job.record
    return {
        "video": video.name,
        "job_id": job.id,
        "job_dir": str(job.path),
        "created": record.created,
        "spec": record.spec.to_dict(),
        "seed": record.spec.seed,
        "model": {"name": record.spec.model, "path": record.model_path, "revision": record.revision},
        # Jobs recorded before families existed have none: they ran LTX-2.0.
        "family": record.family.to_record() if record.family else None,
        # one-stage or two-stage (services/two_stage.py); jobs recorded before the field ran one-stage (its default).
        "pipeline": record.spec.pipeline,
        # The video decoder (--decoder): the VAE, or LTX-2.5's diffusion decoder (seeded by `seed`).
        "decoder": record.spec.decoder,
        # The frames as rendered and as delivered (centre-cropped: --crop-width/--crop-height, OpenAI's sizes).
        "size": size_summary(job),
        "loras": [lora_summary(lora) for lora in record.loras],
        # Dev two-stage: the distilled LoRA fused for stage 2 only; None for every other run.
        "stage2_lora": lora_summary(record.stage2_lora) if record.stage2_lora else None,
        # Keyframes (with --image first when both were given), in the order the pipeline applied them.
        "conditions": [condition_summary(condition) for condition in record.conditions or ()],
        # The video it continues (None: not an extension): where it came from, its hash, the overlap, the audio.
        "extension": extension_summary(record.extension, record.spec.num_frames) if record.extension else None,
        # The IC-LoRA control video (by file name, not its local path); None without one.
        "reference_video": reference_summary(record.reference) if record.reference else None,
        # The clip it retakes (only for a retake): the source job or file and its hash, the range, the audio.
        **({"retake": retake_summary(record.retake)} if record.retake else {}),
        # The soundtrack of audio-to-video (only then): the file it was, by name, and its bytes' SHA-256.
        **({"audio": audio_summary(record.audio)} if record.audio else {}),
        "versions": package_versions(),
        # Same request, same bits (DESIGN.md rule 6): the digest of what decided these bits, the mode it ran in,
        # and whether the files are what a fresh render of the request makes (not after a lower-memory plan).
        "request_digest": record.request_digest,
        "deterministic": record.deterministic,
        "reproducible": reproducibility(job),
        "stages": {stage.value: stage_summary(job, stage) for stage in Stage},
    }


def size_summary(job: JobDir) -> dict[str, list[int]]:
    """The rendered size, the delivered one and where it lies in the rendered frames (left, top, width, height)."""
    spec = job.spec
    box = spec.crop_box
    return {"rendered": [spec.width, spec.height], "delivered": [box[2], box[3]], "crop_box": list(box)}


def lora_summary(lora: ResolvedLora) -> dict[str, Any]:
    """What the sidecar says of a LoRA: where it came from, which file, how strongly (not its local path)."""
    return {"source": lora.source, "weight_name": lora.weight_name, "scale": lora.scale, "revision": lora.revision}


def audio_summary(audio: ResolvedAudio) -> dict[str, Any]:
    """What the sidecar says of a soundtrack: the file it was (by name, not its local path), its copy in the job
    and its bytes' SHA-256; the MP4's audio is its first seconds (protocol/soundtrack.py)."""
    return {**audio.to_json(), "source": Path(audio.source).name}


def reference_summary(reference: ResolvedReference) -> dict[str, Any]:
    """What the sidecar says of a control video: the file it was (by name) and its bytes' SHA-256, its frames
    and size, the frames used, how strongly and at which downscale factor it was applied."""
    return {**reference.to_json(), "source": Path(reference.source).name}


def condition_summary(condition: ResolvedCondition) -> dict[str, Any]:
    """What the sidecar says of a keyframe: the file it was (by name, not its local path) and its bytes'
    SHA-256, what it is, where it starts (pixel frame and latent index), how strongly, at which CRF."""
    return {
        "source": Path(condition.source).name,
        "sha256": condition.sha256,
        "kind": condition.kind,
        "frames": condition.frames,
        "frame": condition.frame,
        "latent_index": condition.latent_index,
        "strength": condition.strength,
        "crf": condition.crf,
    }


def retake_summary(retake: ResolvedRetake) -> dict[str, Any]:
    """What the sidecar says of the clip a job retakes: its job and its latents' SHA-256, or its file (by name, not
    its local path), the file's SHA-256 and where the job keeps its VAE encoding; the frames and latent frames
    regenerated, and what became of the audio."""
    if retake.kind == VIDEO_SOURCE:
        where = {"source_file": Path(retake.source).name, "encoded": RETAKE_ENCODED_FILE}
    else:
        where = {"source_job": retake.source}
    return {
        **where,
        "sha256": retake.sha256,
        "frames": retake.frames,
        "from_frame": retake.from_frame,
        "to_frame": retake.to_frame,
        "latent_frames": [retake.start, retake.stop - 1],
        "audio": RETAKE_AUDIO_NOTE if retake.has_audio else RETAKE_NO_AUDIO_NOTE,
    }


def extension_summary(extension: ResolvedExtension, num_frames: int) -> dict[str, Any]:
    """What the sidecar says of the video a clip extends: the job or file it was (a file by name, not its
    local path) and its bytes' SHA-256, its frames and rate, the overlap, the joined video's frames and
    what was done with the audio."""
    return {
        "source": extension.source if extension.source_job else Path(extension.source).name,
        "source_job": extension.source_job,
        "sha256": extension.sha256,
        "source_frames": extension.frames,
        "fps": extension.fps,
        "overlap": extension.overlap,
        "new_frames": num_frames,
        "joined_frames": joined_frames(extension.frames, num_frames, extension.overlap),
        "audio": AUDIO_NOTE,
    }

"""The record published next to each video: what made it, how long each stage took, peak memory.

`<name>_<stamp>.json` holds the full spec (seed included), the rendered and delivered size, the
model and LoRAs with their revisions, the versions of the packages that ran, and per-stage seconds,
attempts, final plan and peak GPU/host memory, so a clip can be reproduced or its cost compared later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.jobdir import JobDir
from orchestrator.request_digest import installed_versions
from orchestrator.reuse import reproducibility
from protocol.files import Stage
from protocol.spec_rules import ONE_STAGE

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
    attempts = job.stage_record(stage)["attempts"]
    return {
        "attempts": len(attempts),
        "results": [attempt["result"] for attempt in attempts],
        # From GO: a worker started ahead of its turn waited `waited_s` before it (imports, the stage before).
        "seconds": round(sum(attempt.get("seconds", 0.0) for attempt in attempts), 3),
        "waited_s": round(sum(attempt.get("waited_s", 0.0) for attempt in attempts), 3),
        "final_plan": attempts[-1]["plan"] if attempts else None,
        "peak_gpu_bytes": max((attempt.get("peak_gpu_bytes", 0) for attempt in attempts), default=0),
        "peak_rss_bytes": max((attempt.get("peak_rss_bytes", 0) for attempt in attempts), default=0),
    }


def build_sidecar(job: JobDir, video: Path) -> dict[str, Any]:
    record = job.record
    return {
        "video": video.name,
        "job_id": job.id,
        "job_dir": str(job.path),
        "created": record["created"],
        "spec": record["spec"],
        "seed": record["spec"]["seed"],
        "model": {"name": record["spec"]["model"], "path": record["model_path"], "revision": record["revision"]},
        # Jobs recorded before families existed have none: they ran LTX-2.0.
        "family": record.get("family"),
        # one-stage or two-stage (services/two_stage.py); jobs recorded before the field ran one-stage.
        "pipeline": record["spec"].get("pipeline", ONE_STAGE),
        # The frames as rendered and as delivered (centre-cropped: --crop-width/--crop-height, OpenAI's sizes).
        "size": size_summary(job),
        "loras": [
            {k: lora.get(k) for k in ("source", "weight_name", "scale", "revision")} for lora in record.get("loras", [])
        ],
        # Dev two-stage: the distilled LoRA fused for stage 2 only; None for every other run.
        "stage2_lora": stage2_lora_summary(record.get("stage2_lora")),
        "versions": package_versions(),
        # Same request, same bits (DESIGN.md rule 6): the digest of what decided these bits, the mode it ran in,
        # and whether the files are what a fresh render of the request makes (not after a lower-memory plan).
        "request_digest": record.get("request_digest"),
        "deterministic": record.get("deterministic", False),
        "reproducible": reproducibility(job),
        "stages": {stage.value: stage_summary(job, stage) for stage in Stage},
    }


def size_summary(job: JobDir) -> dict[str, list[int]]:
    """The rendered size, the delivered one and where it lies in the rendered frames (left, top, width, height)."""
    spec = job.spec
    box = spec.crop_box
    return {"rendered": [spec.width, spec.height], "delivered": [box[2], box[3]], "crop_box": list(box)}


def stage2_lora_summary(lora: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the sidecar says of a dev two-stage run's stage-2 LoRA: where it came from and which file."""
    if lora is None:
        return None
    return {k: lora.get(k) for k in ("source", "weight_name", "scale", "revision")}

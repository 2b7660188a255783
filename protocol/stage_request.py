"""What a stage worker reads of its job: a typed request, never job.json's keys (DESIGN.md rule 11).

A worker needs the request and what the orchestrator resolved for it before any worker started (the
model folder, the LoRA files, the model family); not the job's states, attempts or publish step, which
belong to the orchestrator and change while the worker runs. So a worker sees this view of the job
record (protocol/job_record.py), taken once as it starts; its memory plan comes on its command line
(`--plan`) and the conditioning image is the job directory's INPUT_IMAGE_FILE (protocol/files.py); keyframes
are files of the job directory too, each named by its ResolvedCondition, and so is the video an extension
continues (its ResolvedExtension).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from protocol.families import CheckpointFamily
from protocol.files import JOB_FILE
from protocol.job_record import (
    JobRecord,
    ResolvedAudio,
    ResolvedCondition,
    ResolvedExtension,
    ResolvedLora,
    ResolvedReference,
    ResolvedRetake,
    load_record,
)
from protocol.spec import JobSpec


@dataclasses.dataclass(frozen=True)
class StageRequest:
    """One job's inputs to a stage worker, as the orchestrator recorded them when it created the job."""

    job_id: str  #: the job's id; every message the worker sends about the job names it
    spec: JobSpec  #: the validated request (prompt, sizes, seed, guidance, decode settings)
    model_path: Path  #: the diffusers-layout folder to load from; workers never look a model up
    revision: str  #: the model snapshot's commit hash, or "local": keys the embedding cache, goes into the latents
    family: CheckpointFamily | None  #: the checkpoint's family; None: recorded before families existed (LTX-2.0)
    loras: tuple[ResolvedLora, ...]  #: the LoRA files fused into the transformer, in this order
    stage2_lora: ResolvedLora | None  #: dev two-stage: the distilled LoRA fused for stage 2 only
    embeddings_dir: Path | None  #: the prompt-embedding cache; None: a job made before it (encode every time)
    compile_cache_dir: Path | None  #: where --compile's code is cached; None: a job made before it
    request_digest: str | None  #: the request's digest, written into the MP4's tags (None: none recorded)
    #: keyframes to encode, each a file in the job directory at a latent index (empty: text- or image-to-video)
    conditions: tuple[ResolvedCondition, ...] = ()
    #: the video this clip continues (None: not an extension)
    extension: ResolvedExtension | None = None
    #: the IC-LoRA control video in the job directory (None: none)
    reference: ResolvedReference | None = None
    #: the clip whose latents this one regenerates in part (None: not a retake)
    retake: ResolvedRetake | None = None
    #: the soundtrack the clip is generated to fit, in the job directory (None: its audio is generated)
    audio: ResolvedAudio | None = None

    @classmethod
    def of(cls, record: JobRecord) -> StageRequest:
        """The worker's view of a job record."""
        return cls(
            job_id=record.id,
            spec=record.spec,
            model_path=Path(record.model_path),
            revision=record.revision,
            family=record.family,
            loras=tuple(record.loras),
            stage2_lora=record.stage2_lora,
            embeddings_dir=Path(record.embeddings_dir) if record.embeddings_dir else None,
            compile_cache_dir=Path(record.compile_cache_dir) if record.compile_cache_dir else None,
            request_digest=record.request_digest,
            conditions=tuple(record.conditions or ()),
            extension=record.extension,
            reference=record.reference,
            retake=record.retake,
            audio=record.audio,
        )


def read_stage_request(job_dir: Path) -> StageRequest:
    """The request of the job in `job_dir` (OSError or ValueError as protocol.job_record.load_record)."""
    return StageRequest.of(load_record(job_dir / JOB_FILE))

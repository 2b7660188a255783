"""A job's first record (protocol.job_record.JobRecord) from a built request: what JobDir.create writes,
and what a WAITING job's record becomes once the job it extends is done and its request is built
(JobDir.queue_built). One function for both, so a job built late holds exactly what one built at submit does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.request_digest import RequestIdentity
from orchestrator.run.states import JobState, StageState
from protocol.files import Stage
from protocol.job_record import (
    JobRecord,
    OwnerRecord,
    ResolvedAudio,
    ResolvedCondition,
    ResolvedExtension,
    ResolvedLora,
    ResolvedReference,
    ResolvedRetake,
    StageRecord,
)
from protocol.spec import JobSpec


class BuiltInputs(Protocol):
    """A request built into everything a job record holds and the files it copies in
    (orchestrator.run.jobspec.BuiltSpec, which this module cannot import: jobspec imports it)."""

    spec: JobSpec
    model: ResolvedModel
    loras: tuple[dict[str, Any], ...]
    image: Path | None
    stage2_lora: dict[str, Any] | None
    identity: RequestIdentity | None
    conditions: tuple[tuple[Path, ResolvedCondition], ...]
    extension: tuple[Path, ResolvedExtension] | None
    reference: tuple[Path, ResolvedReference] | None
    retake: tuple[Path, ResolvedRetake] | None
    audio: tuple[Path, ResolvedAudio] | None


@dataclasses.dataclass(frozen=True)
class JobInputs:
    """BuiltInputs given one by one (JobDir.create's arguments)."""

    spec: JobSpec
    model: ResolvedModel
    loras: tuple[dict[str, Any], ...] = ()
    image: Path | None = None
    stage2_lora: dict[str, Any] | None = None
    identity: RequestIdentity | None = None
    conditions: tuple[tuple[Path, ResolvedCondition], ...] = ()
    extension: tuple[Path, ResolvedExtension] | None = None
    reference: tuple[Path, ResolvedReference] | None = None
    retake: tuple[Path, ResolvedRetake] | None = None
    audio: tuple[Path, ResolvedAudio] | None = None


def new_record(
    job_id: str, created: str, jobs_dir: Path, inputs: BuiltInputs, state: JobState, owner: OwnerRecord | None
) -> JobRecord:
    """A job's first record, every stage pending: what JobDir.create writes, and what a WAITING job
    becomes once built (JobDir.queue_built)."""
    identity, stage2_lora = inputs.identity, inputs.stage2_lora
    return JobRecord(
        id=job_id,
        created=created,
        spec=inputs.spec,
        spec_digest=inputs.spec.digest(),
        request_digest=identity.digest if identity else None,
        digest_inputs=identity.inputs if identity else None,
        deterministic=identity.deterministic if identity else True,
        model_path=str(inputs.model.path),
        revision=inputs.model.revision,
        family=inputs.model.family,
        loras=[ResolvedLora.from_json(lora, at=f"loras[{index}]") for index, lora in enumerate(inputs.loras)],
        stage2_lora=ResolvedLora.from_json(stage2_lora, at="stage2_lora") if stage2_lora is not None else None,
        conditions=[record for _, record in inputs.conditions] or None,
        extension=inputs.extension[1] if inputs.extension is not None else None,
        reference=inputs.reference[1] if inputs.reference is not None else None,
        retake=inputs.retake[1] if inputs.retake is not None else None,
        audio=inputs.audio[1] if inputs.audio is not None else None,
        # Prompt embeddings and code compiled by --compile are cached beside the jobs, shared by later ones.
        embeddings_dir=str(jobs_dir.parent / "embeddings"),
        compile_cache_dir=str(jobs_dir.parent / "compile-cache"),
        status=state.value,
        stages={stage: StageRecord(status=StageState.PENDING.value) for stage in Stage},
        owner=owner,
    )

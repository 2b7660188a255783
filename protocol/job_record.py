"""The job record: what a job's `job.json` holds, typed and versioned (DESIGN.md rules 1, 7 and 11).

job.json is a job's durable truth: the validated spec, the model and LoRAs it resolved to, the request
digest, each stage's attempts and output fingerprints, the publish step. The classes here are its only
schema. orchestrator/run/jobdir.py is its one writer (under the job's lock, each state change checked against
orchestrator/run/states.py); workers read it only through protocol/stage_request.py's `StageRequest`. States
are kept as their enum values (str) because the enums live in orchestrator/, which protocol/ and the
workers never import.

On disk, `to_text` writes the keys job.json has always had, in the same format (sorted keys, two-space
indent), plus `schema_version`, so tools and tests that read it as plain JSON keep working. An optional
field that is None is left out, as it always was (a queued job has no `error`, a running attempt no
`ended`); only the four fields JobDir.create has always written as null (`request_digest`,
`digest_inputs`, `family`, `stage2_lora`) are written as null.

Versions. A record without `schema_version` was written before the field existed, in today's shape or
an earlier subset of it: it is version 1, and each key it lacks takes the default its readers used
before this module (`deterministic` absent: False, `revision`: "", `loras`: none, `embeddings_dir`:
no cache). Adding an optional field needs no new version, since an older reader keeps it (below). A
change an older reader would misread (a key renamed, a meaning changed) raises SCHEMA_VERSION, and a
record newer than this code knows is refused, naming the file and both versions, rather than half read
and rewritten by a job that then runs on what it misread. Version 2 is written only where it is needed:
by a job still waiting for the job it extends (`waits_for`, WAITING_SCHEMA_VERSION).

Unknown keys are kept, not refused: each class holds the keys it does not know in `extra` and writes
them back unchanged. The orchestrator rewrites job.json on every change, so a key it dropped would be
lost for good (one written by a build of another branch, or by a tool); nothing here reads them, so
keeping them costs nothing, and it is the version, not a strange key, that marks a record this code
cannot read. Unknown *stages* are the exception: a job with a stage this version does not run cannot be
resumed correctly, so it is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from protocol.codec import is_instance_of
from protocol.families import CheckpointFamily
from protocol.files import JOB_FILE, Stage
from protocol.spec import JobSpec

#: The version `to_json` writes. 1: the shape job.json has had since the first release (fields added
#: since then are optional and default to how jobs without them ran).
SCHEMA_VERSION = 1
#: The version of a record with `waits_for`, and the newest this code reads. A WAITING job's spec is
#: provisional (WaitRecord): a reader of version 1 would take it for the job's and could run it as a plain
#: clip, so such a record must be refused there. Every other record is still written as version 1, so
#: builds from before waiting jobs keep reading them.
WAITING_SCHEMA_VERSION = 2
VERSION_KEY = "schema_version"
#: `protocol.files.fingerprint_file`: {"size": bytes, "sha256": hex}.
Fingerprint = dict[str, int | str]
#: dataclass metadata of a field that is written as null when None (left out otherwise).
WRITTEN_AS_NULL = {"written_as_null": True}
# Error messages quote a bad value up to this length: enough to recognise it, never a page of JSON.
SHOWN_CHARS = 80
#: Reads a field's JSON value found at a path (`at`) inside the file `where`.
Reader = Callable[[Any, str, str], Any]


class JobRecordError(ValueError):
    """A job.json that is not a job record this code reads: `where` (the file) and `problem` (naming the
    field, or the version).

    A ValueError, like a job.json that is not JSON at all, so callers handle every unreadable record
    alike (the daemon marks the job failed, `ltx2 decode` names the file as invalid input)."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


class NewerRecordError(JobRecordError):
    """A job.json written by a newer ltx2-stages, in a schema version this code does not know."""


class RecordFields:
    """JSON in and out for the record classes below: each known key becomes a field (its type checked),
    each unknown key goes to `extra` and back out unchanged."""

    #: field name -> how its JSON value (in file `where`, at `at`) becomes the field's value: a nested
    #: record, the spec, the family
    readers: ClassVar[Mapping[str, Reader]] = {}
    extra: dict[str, Any]

    @classmethod
    def from_json(cls, raw: object, where: str = JOB_FILE, at: str = "") -> Self:
        """Read one JSON object found at `at` (e.g. "stages.audio_decode") in the file `where`; both
        start every error message."""
        if not isinstance(raw, dict):
            raise JobRecordError(where, f"{at or 'the record'} must be a JSON object, got {type(raw).__name__}")
        fields, hints = record_fields(cls)
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name in cls.readers:
                values[name] = cls.readers[name](value, where, join(at, name))
            elif name in fields:
                if not is_instance_of(value, hints[name]):
                    raise JobRecordError(where, f"{join(at, name)} must be {describe(hints[name])}, got {shown(value)}")
                values[name] = value
        missing = [name for name, field in fields.items() if name not in raw and is_required(field)]
        if missing:
            raise JobRecordError(where, f"{join(at, missing[0])} is missing")
        return cls(**values, extra={k: v for k, v in raw.items() if k not in fields})

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data: the fields by their names, None left out unless WRITTEN_AS_NULL, then `extra`."""
        data = dict(self.extra)
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if field.name != "extra" and (value is not None or field.metadata.get("written_as_null")):
                data[field.name] = plain(value)
        return data

    def note(self, **fields: Any) -> bool:
        """Set fields by name (TypeError for a name the record does not have); True if any changed."""
        names = {field.name for field in dataclasses.fields(self)} - {"extra"}  # type: ignore[arg-type]
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {unknown[0]!r}")
        changed = any(getattr(self, name) != value for name, value in fields.items())
        for name, value in fields.items():
            setattr(self, name, value)
        return changed


@functools.cache
def record_fields(cls: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    """(field name -> field, field name -> type hint) of a record class, `extra` left out; computed once
    per class, because the daemon reads every job's record at each start and at each state change."""
    fields = {field.name: field for field in dataclasses.fields(cls) if field.name != "extra"}
    return fields, typing.get_type_hints(cls)


def join(at: str, name: str) -> str:
    """The path of a field inside job.json, as error messages name it ("stages.audio_decode.attempts[0]")."""
    return f"{at}.{name}" if at else name


def is_required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def shown(value: object) -> str:
    """A value as an error message quotes it: its repr, cut short (a hand-edited job.json may hold anything)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def describe(hint: object) -> str:
    """A type hint as an error message says it ("str | None", "list[str]")."""
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def plain(value: object) -> object:
    """A field's value as JSON data (records, the spec and the family by their own writers)."""
    if isinstance(value, RecordFields):
        return value.to_json()
    if isinstance(value, JobSpec):
        return value.to_dict()
    if isinstance(value, CheckpointFamily):
        return value.to_record()
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class ResolvedLora(RecordFields):
    """A LoRA of the spec resolved to one local file by the orchestrator (orchestrator/run/lora_lookup.py),
    before any worker starts: workers never look a LoRA up, they fuse the file named here."""

    source: str  #: what the request named: a repo id in the local cache, or a path inside the input roots
    path: str  #: the resolved .safetensors file, absolute
    revision: str  #: the cache snapshot's commit hash, or "local" for a file or folder
    scale: float  #: how strongly it is fused (0..1; the stage-2 distilled LoRA always 1.0)
    weight_name: str | None = None  #: the file named inside the repo or folder, when the request named one
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


def read_optional_lora(raw: object, where: str, at: str) -> ResolvedLora | None:
    return None if raw is None else ResolvedLora.from_json(raw, where, at)


def read_loras(raw: object, where: str, at: str) -> list[ResolvedLora]:
    if not isinstance(raw, list):
        raise JobRecordError(where, f"{at} must be a list of LoRAs, got {shown(raw)}")
    return [ResolvedLora.from_json(item, where, f"{at}[{index}]") for index, item in enumerate(raw)]


@dataclasses.dataclass(frozen=True)
class ResolvedCondition(RecordFields):
    """A condition (keyframe) of the request as the orchestrator checked and stored it before any worker
    started (orchestrator/run/jobspec.py): the diffusion stage encodes `file` at `latent_index` and never
    redoes the frame math; the sidecar reports it."""

    source: str  #: what the request named (a path inside the input roots, or the gateway's upload)
    file: str  #: its copy inside the job directory (protocol.conditions.stored_name; the image's own file)
    sha256: str  #: the SHA-256 of its bytes, as the request digest holds it
    kind: str  #: "image" (one frame, re-compressed at the CRF) or "video" (its frames, as they are)
    frames: int  #: the frames in the file (1 for an image)
    frame: int  #: the pixel frame it starts at (-1 resolved)
    latent_index: int  #: diffusers' LTX2VideoCondition.index: the latent frame starting at `frame`
    strength: float  #: 0..1
    crf: int | None = None  #: an image's re-compression CRF as requested; None: the family's (diffusers' default)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


def read_conditions(raw: object, where: str, at: str) -> list[ResolvedCondition] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise JobRecordError(where, f"{at} must be a list of conditions, got {shown(raw)}")
    return [ResolvedCondition.from_json(item, where, f"{at}[{index}]") for index, item in enumerate(raw)]


@dataclasses.dataclass(frozen=True)
class ResolvedExtension(RecordFields):
    """The video a job extends, as the orchestrator checked and stored it before any worker started
    (orchestrator/run/extension_lookup.py): the diffusion stage holds the clip's first `overlap` frames at
    the last `overlap` frames of `file`; the video stage writes the joined video from it; the sidecar reports
    where it came from."""

    source: str  #: what the request named: a job id, or a path inside the input roots
    #: the job whose video it is (None: a file; written as null, as the field has no default to read back)
    source_job: str | None = dataclasses.field(metadata=WRITTEN_AS_NULL)
    file: str  #: its copy inside the job directory (protocol.files.EXTEND_SOURCE_FILE)
    sha256: str  #: the SHA-256 of its bytes, as the request digest holds it
    frames: int  #: the source's frame count, from its header
    width: int  #: its picture size, which the clip delivers too
    height: int
    fps: float  #: its frame rate, which the clip plays at too
    overlap: int  #: K: the clip's first K frames are the source's last K
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def skipped(self) -> int:
        """The source's frames before the overlap (its first frame of the condition's)."""
        return self.frames - self.overlap


def read_extension(raw: object, where: str, at: str) -> ResolvedExtension | None:
    return None if raw is None else ResolvedExtension.from_json(raw, where, at)


@dataclasses.dataclass(frozen=True)
class ResolvedRetake(RecordFields):
    """The clip a job retakes, as the orchestrator checked and stored it (orchestrator/run/retake_lookup.py): the
    diffusion stage starts from `file`'s latents (a video file's: its VAE encoding), regenerates latent frames
    [start, stop) and holds the rest."""

    source: str  #: what the request named: the source job's id, or a video file's path
    file: str  #: the source inside the job directory (protocol.files.RETAKE_SOURCE_FILE or RETAKE_SOURCE_VIDEO_FILE)
    sha256: str  #: the SHA-256 of its bytes (the latents', or the video file's), as the request digest holds it
    frames: int  #: the source's frame count (the retake's too)
    from_frame: int  #: the first pixel frame regenerated
    to_frame: int  #: the last pixel frame regenerated
    start: int  #: the first latent frame regenerated
    stop: int  #: one past the last latent frame regenerated
    #: protocol.retake.LATENTS_SOURCE (a finished job's latents, held as they are) or VIDEO_SOURCE (a video file
    #: the diffusion stage encodes with the VAEs first); absent in records made before files could be retaken
    kind: str = "latents"
    has_audio: bool = True  #: whether the source holds audio to keep (a video file without an audio stream: no)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


def read_retake(raw: object, where: str, at: str) -> ResolvedRetake | None:
    return None if raw is None else ResolvedRetake.from_json(raw, where, at)


@dataclasses.dataclass(frozen=True)
class ResolvedReference(RecordFields):
    """The IC-LoRA control video as the orchestrator checked and stored it (orchestrator/run/reference_lookup.py):
    the diffusion stage hands `file`'s first `frames_used` frames to LTX2InContextPipeline; the sidecar reports it."""

    source: str  #: what the request named (a path inside the input roots, or the gateway's upload)
    file: str  #: its copy inside the job directory (protocol.control_video.stored_reference_name)
    sha256: str  #: the SHA-256 of its bytes, as the request digest holds it
    frames: int  #: the frames in the file
    width: int  #: its picture size, as its header states it
    height: int
    frames_used: int  #: its first frames the pipeline encodes: the clip's frame count
    strength: float  #: 0..1 (diffusers' LTX2ReferenceCondition.strength)
    downscale: int  #: the factor it is encoded at (diffusers' reference_downscale_factor), resolved
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


def read_optional_reference(raw: object, where: str, at: str) -> ResolvedReference | None:
    return None if raw is None else ResolvedReference.from_json(raw, where, at)


@dataclasses.dataclass(frozen=True)
class ResolvedAudio(RecordFields):
    """The soundtrack of an audio-to-video job as the orchestrator checked and stored it
    (orchestrator/run/soundtrack_lookup.py): the diffusion stage encodes and holds `file`'s first seconds, the
    audio stage delivers them (protocol/soundtrack.py); the sidecar reports it."""

    source: str  #: what the request named (a path inside the input roots, or the gateway's upload)
    file: str  #: its copy inside the job directory (protocol.soundtrack.stored_audio_name)
    sha256: str  #: the SHA-256 of its bytes, as the request digest holds it
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


def read_optional_audio(raw: object, where: str, at: str) -> ResolvedAudio | None:
    return None if raw is None else ResolvedAudio.from_json(raw, where, at)


@dataclasses.dataclass(frozen=True)
class WaitRecord(RecordFields):
    """What a WAITING job waits for, and the request it is built from once that job is done.

    An extension cannot be built before its source is done: the joined video's frames, size and the
    digest come from the source's finished video (its header and its SHA-256). So the daemon keeps the
    request as it was submitted (with the seed it drew, so the job renders what `ltx2 status` showed) and
    builds it then (orchestrator/daemon/waiting_jobs.py). Until that, the record's `spec` is provisional:
    the request checked without the video it extends. A built job has no `waits_for`.
    """

    job: str  #: the id of the job whose video this one extends (the daemon's, queued, running or waiting)
    request: dict[str, Any]  #: the request as submitted, less `extend` (it is `job`), its seed drawn
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


def read_wait(raw: object, where: str, at: str) -> WaitRecord | None:
    return None if raw is None else WaitRecord.from_json(raw, where, at)


@dataclasses.dataclass(frozen=True)
class PublishRecord(RecordFields):
    """The publish step of orchestrator/run/publishing.py, recorded before the output folder is touched so a
    re-run finishes or undoes a publish cut short instead of copying the clip twice."""

    video: str  #: the MP4's final path; its companions are derived from it (publishing.companions)
    files: list[str]  #: every file of the publish in the order they land: sidecar, first and last PNG, the MP4
    explicit: bool  #: a target the user named (`ltx2 decode --output`), replaced if it existed
    source: Fingerprint  #: size and SHA-256 of the job's video.mp4 it published; a changed video publishes again
    complete: bool  #: every file landed; False while (or if a crash cut short while) it was landing them
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


@dataclasses.dataclass
class AttemptRecord(RecordFields):
    """One run of a stage's worker for this job (orchestrator/run/stage_attempt.py follows it; JobDir records it)."""

    attempt: int  #: its number, from 1 (JobDir.start_attempt)
    plan: dict[str, Any]  #: the memory plan it ran (orchestrator.run.policy); {} for outputs adopted from a file
    started: str  #: ISO time it was recorded as running
    result: str  #: an AttemptResult value (orchestrator/run/states.py): "running" until JobDir.finish_attempt
    ended: str | None = None  #: ISO time it ended
    reason: str | None = None  #: one line on why it ended so ("" when ok); for adopted outputs, where they came from
    returncode: int | None = None  #: the worker's exit status (negative: the signal that killed it)
    seconds: float | None = None  #: the stage's own time, from GO (a worker started ahead waited before it)
    waited_s: float | None = None  #: how long its worker waited for GO: imports, and the stage before it
    peak_gpu_bytes: int | None = None  #: the worker's peak accelerator memory, as it reported it
    peak_rss_bytes: int | None = None  #: the worker's peak resident host memory
    device_memory_bytes: int | None = None  #: the memory its peaks count against: its GPU's, or the host's RAM
    group: list[str] | None = None  #: stage-major: the ids of every job its one process ran, in order
    lane: int | None = None  #: the lane that ran it, when its lane pins a device (orchestrator/placement/lanes.py)
    device: str | None = None  #: that lane's device ("cuda:1")
    pid: int | None = None  #: the worker's pid on this host, 0 on a farm node; a restarted daemon stops an orphan by it
    #: context parallel (orchestrator/placement/worker_gang.py): every rank's pid, rank 0's first (it is `pid`)
    rank_pids: list[int] | None = None
    cpu_threads: int | None = None  #: torch's CPU threads in the worker (its lane's share), from its READY
    node: str | None = (
        None  #: Ray farm (orchestrator/placement/ray_farm.py): the node it ran on (its id's first 12 characters)
    )
    host: str | None = None  #: Ray farm: that node's host name
    node_ip: str | None = None  #: Ray farm: that node's address
    ray_worker_pid: int | None = None  #: Ray farm: the pid of the Ray task that started the stage
    remote_pid: int | None = None  #: Ray farm: the stage's pid on its node
    forked: bool | None = None  #: Ray farm: whether the node's fork server forked the stage (else a new process)
    ranks: int | None = None  #: Ray farm: a context-parallel stage's processes on its node (remote_pid: rank 0's)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)


def read_attempts(raw: object, where: str, at: str) -> list[AttemptRecord]:
    if not isinstance(raw, list):
        raise JobRecordError(where, f"{at} must be a list of attempts, got {shown(raw)}")
    return [AttemptRecord.from_json(item, where, f"{at}[{index}]") for index, item in enumerate(raw)]


@dataclasses.dataclass
class StageRecord(RecordFields):
    """One stage of the job: its state, every attempt, and the fingerprints that let a re-run skip it."""

    status: str  #: a StageState value (orchestrator/run/states.py), changed only by JobDir
    attempts: list[AttemptRecord] = dataclasses.field(default_factory=list)  #: oldest first, numbered from 1
    #: output file name -> its fingerprint, recorded when the stage succeeded; outputs that still match
    #: are not made again (DESIGN.md rule 1)
    outputs: dict[str, Fingerprint] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    readers: ClassVar[Mapping[str, Reader]] = {"attempts": read_attempts}


def read_stages(raw: object, where: str, at: str) -> dict[Stage, StageRecord]:
    """Every stage's record, in Stage order; a stage missing or unknown is refused (see the module docstring)."""
    if not isinstance(raw, dict):
        raise JobRecordError(where, f"{at} must be a JSON object of stages, got {shown(raw)}")
    known = [stage.value for stage in Stage]
    if unknown := sorted(set(raw) - set(known)):
        raise JobRecordError(where, f"{at} has unknown stage {unknown[0]!r}; this version runs {', '.join(known)}")
    if missing := [name for name in known if name not in raw]:
        raise JobRecordError(where, f"{join(at, missing[0])} is missing")
    return {stage: StageRecord.from_json(raw[stage.value], where, join(at, stage.value)) for stage in Stage}


def read_spec(raw: object, where: str, at: str) -> JobSpec:
    """The validated spec; its SpecError goes out as it is, naming the spec field (a ValueError too)."""
    return JobSpec.from_dict(raw)  # type: ignore[arg-type]


def read_family(raw: object, where: str, at: str) -> CheckpointFamily | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise JobRecordError(where, f"{at} must be a model family record, got {shown(raw)}")
    try:
        return CheckpointFamily.from_record(raw)
    except (TypeError, KeyError) as exc:
        raise JobRecordError(where, f"{at} is not a model family record ({exc})") from None


def read_publish(raw: object, where: str, at: str) -> PublishRecord | None:
    return None if raw is None else PublishRecord.from_json(raw, where, at)


#: OwnerRecord.command of a job in the daemon's queue; any other is the `ltx2` command running it itself.
DAEMON_OWNER = "daemon"


@dataclasses.dataclass(frozen=True)
class OwnerRecord(RecordFields):
    """Who runs the job: the daemon's queue, or an `ltx2` command that runs it in its own process.

    The daemon runs only its own jobs and lists the others; a job found running is another process's
    while the process named here is alive (its pid, with its start time against pid reuse), so no second
    orchestrator takes it (orchestrator/run/jobdir.py: JobDir.live_runner)."""

    command: str  #: DAEMON_OWNER, or the command running it itself: "generate", "batch", "decode", "resume"
    pid: int  #: the process that made the job or last took it to run, on `host`
    host: str  #: that process's host name (a pid says nothing about another host)
    pid_started: int | None = None  #: its start time in clock ticks after boot (/proc/PID/stat), against pid reuse
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


def read_owner(raw: object, where: str, at: str) -> OwnerRecord | None:
    return None if raw is None else OwnerRecord.from_json(raw, where, at)


@dataclasses.dataclass
class JobRecord(RecordFields):
    """One job's job.json. Changed in place and saved by JobDir (orchestrator/run/jobdir.py) alone."""

    id: str  #: `YYYYmmdd-HHMMSS-<6 hex>`, the job directory's name (JobDir.create)
    created: str  #: ISO time (UTC, milliseconds) JobDir.create made the job
    spec: JobSpec  #: the validated request; JobDir.replace_spec changes only decode settings (`ltx2 decode`)
    spec_digest: str  #: JobSpec.digest() of `spec`, kept equal to it by JobDir
    model_path: str  #: the diffusers-layout folder the model resolved to (orchestrator/run/model_lookup.py)
    status: str  #: a JobState value (orchestrator/run/states.py); only JobDir.transition changes it
    stages: dict[Stage, StageRecord]  #: every Stage, in order: attempts and output fingerprints (JobDir)
    revision: str = ""  #: the model's cache snapshot (its commit hash), or "local" for a folder
    #: SHA-256 of everything that decides the output's bits (orchestrator/run/request_digest.py; DESIGN.md rule 6),
    #: by which `--reuse` finds a render; None: made before digests, by a test, or its spec changed since
    request_digest: str | None = dataclasses.field(default=None, metadata=WRITTEN_AS_NULL)
    #: what the digest was computed from (request, model, files, plans, versions, device), for a person
    #: asking why two digests differ; None with the digest
    digest_inputs: dict[str, Any] | None = dataclasses.field(default=None, metadata=WRITTEN_AS_NULL)
    #: compiled kernels in Inductor's deterministic mode, x264 on fixed threads (`[worker] deterministic`
    #: when it was created); jobs made before the setting ran without it
    deterministic: bool = False
    #: read from the checkpoint's configs at creation (protocol/families.py): the denoiser's STG blocks and
    #: cross-timestep come from here; None: recorded before families existed (LTX-2.0), or a test's model
    family: CheckpointFamily | None = dataclasses.field(default=None, metadata=WRITTEN_AS_NULL)
    loras: list[ResolvedLora] = dataclasses.field(default_factory=list)  #: the spec's LoRAs, resolved; fused in order
    #: dev two-stage: the distilled LoRA fused for stage 2 only (services/two_stage.py), resolved like `loras`
    stage2_lora: ResolvedLora | None = dataclasses.field(default=None, metadata=WRITTEN_AS_NULL)
    #: the keyframes, resolved and copied into the job (with the image first when both were given), in the order
    #: diffusers applies them; None: none (left out of job.json, as for jobs made before conditions existed)
    conditions: list[ResolvedCondition] | None = None
    #: the video it extends, copied into the job; None: not an extension (left out of job.json)
    extension: ResolvedExtension | None = None
    #: the IC-LoRA control video, resolved and copied into the job; None: none (left out of job.json)
    reference: ResolvedReference | None = None
    #: the clip it retakes (its latents copied into the job); None: not a retake (left out of job.json)
    retake: ResolvedRetake | None = None
    #: the soundtrack of audio-to-video, copied into the job; None: none (left out of job.json)
    audio: ResolvedAudio | None = None
    #: the prompt-embedding cache beside the jobs (services/embedding_cache.py); None: made before it existed
    embeddings_dir: str | None = None
    compile_cache_dir: str | None = None  #: where --compile's code is cached for later jobs; None: made before it
    error: str | None = None  #: why it failed or was cancelled; "" once it ran; None: it never left QUEUED
    #: the protocol.errors.Failure value its run ended with (orchestrator/run/job_end.py), when it ended
    #: FAILED, CANCELLED or back to QUEUED (interrupted); None: done, running, never run, or ended before this
    failure: str | None = None
    output: str | None = None  #: the published MP4, set when it became DONE
    finished: str | None = None  #: ISO time it last entered a terminal state
    finishing: str | None = None  #: ISO time its run passed the last point of cancel (JobDir.commit_to_finish)
    publish: PublishRecord | None = None  #: the publish step (orchestrator/run/publishing.py); None before the first
    #: who runs it: set by JobDir.create and by each orchestrator that takes it to run or into its queue;
    #: None: recorded before owners were, a job of the daemon's queue (every daemon adopted them at its start)
    owner: OwnerRecord | None = None
    #: WAITING: the job it waits for and its unbuilt request; None once built (or never waited)
    waits_for: WaitRecord | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    readers: ClassVar[Mapping[str, Reader]] = {
        "spec": read_spec,
        "stages": read_stages,
        "family": read_family,
        "loras": read_loras,
        "stage2_lora": read_optional_lora,
        "conditions": read_conditions,
        "extension": read_extension,
        "reference": read_optional_reference,
        "retake": read_retake,
        "audio": read_optional_audio,
        "publish": read_publish,
        "owner": read_owner,
        "waits_for": read_wait,
    }

    @classmethod
    def from_json(cls, raw: object, where: str = JOB_FILE, at: str = "") -> Self:
        """Read a job.json of this schema version or an earlier one (JobRecordError, NewerRecordError, or
        the spec's SpecError otherwise)."""
        if isinstance(raw, dict):
            version = raw.get(VERSION_KEY, 1)
            if not is_instance_of(version, int) or version < 1:
                raise JobRecordError(where, f"{VERSION_KEY} must be a positive integer, got {shown(version)}")
            if version > WAITING_SCHEMA_VERSION:
                raise NewerRecordError(
                    where,
                    f"job record schema version {version} is newer than this ltx2-stages reads (up to"
                    f" {WAITING_SCHEMA_VERSION}); open the job with the ltx2-stages that wrote it, or a newer one",
                )
            raw = {key: value for key, value in raw.items() if key != VERSION_KEY}
        return super().from_json(raw, where, at)

    def to_json(self) -> dict[str, Any]:
        version = WAITING_SCHEMA_VERSION if self.waits_for is not None else SCHEMA_VERSION
        return {**super().to_json(), VERSION_KEY: version}

    def to_text(self) -> str:
        """job.json's text, as it has always been written: sorted keys, two-space indent, no final newline."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True)


def load_record(path: Path) -> JobRecord:
    """Read a job.json: OSError when it cannot be read, ValueError (JobRecordError, the spec's SpecError,
    a JSON or UTF-8 error) when it is not a job record this version reads."""
    return JobRecord.from_json(json.loads(path.read_text()), str(path))

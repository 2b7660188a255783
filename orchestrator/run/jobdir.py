"""A job directory and its `job.json`: the durable record of one clip, and its only writer.

Only the orchestrator writes job.json (atomically); workers read it (as a protocol.stage_request.
StageRequest). Its schema is protocol/job_record.py's `JobRecord`: the validated spec, the resolved
model, each stage's attempts (plan, result, time, peak memory, worker pid) and the fingerprints of
finished outputs, which is how a re-run knows which stages to skip (DESIGN.md rule 1). A JobDir holds
the record typed and is the one place that reads job.json into it and writes it back. `events.log`
beside it gets one JSON line per event, for `ltx2 logs` and post-mortems.

Every state in job.json (the job's, each stage's, each attempt's result) is changed here and only
here, each change checked against orchestrator/run/states.py (DESIGN.md rule 7). A job's state
changes under an flock of the job directory and against the state on disk, so two threads or
processes (the daemon's request loop cancelling a queued job while its executor claims it) cannot
both move it; the daemon's sqlite queue is told of each change through `mirror`.

Each job records its owner (protocol.job_record.OwnerRecord): the daemon's queue, or the `ltx2` command
(`generate`, `batch`, `decode`, `resume`) that runs it in its own process. The daemon runs only its own
jobs and lists the others. Whoever takes a job to run it becomes its owner, with its pid, so a job found
running is known to be another live process's (`live_runner`) rather than one its orchestrator left
behind when it died.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchestrator.placement.processes import start_time
from orchestrator.run.first_record import BuiltInputs, JobInputs, new_record
from orchestrator.run.inputs import store_image, store_video
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.request_digest import RequestIdentity
from orchestrator.run.states import (
    ATTEMPT_TRANSITIONS,
    JOB_TRANSITIONS,
    STAGE_TRANSITIONS,
    AttemptResult,
    EventKind,
    JobState,
    StageState,
    TransitionError,
    attempt_result,
    require_transition,
)
from protocol.errors import Failure
from protocol.files import (
    EVENTS_FILE,
    INPUT_IMAGE_FILE,
    JOB_FILE,
    JOINED_FILE,
    Stage,
    fingerprint_file,
    matches_fingerprint,
    publish,
    temp_path_for,
)
from protocol.job_record import (
    DAEMON_OWNER,
    AttemptRecord,
    JobRecord,
    OwnerRecord,
    PublishRecord,
    ResolvedAudio,
    ResolvedCondition,
    ResolvedExtension,
    ResolvedReference,
    ResolvedRetake,
    StageRecord,
    WaitRecord,
    load_record,
)
from protocol.retake import LATENTS_SOURCE
from protocol.spec import JobSpec
from protocol.spec_rules import SpecError

#: Told of every job state change after job.json is saved (the daemon's sqlite mirror).
Mirror = Callable[["JobDir"], None]
# A lock file in each job directory serialises changes of the job's state between threads and
# processes (flock: released by the kernel when its holder dies, so it can never go stale).
LOCK_FILE = ".lock"
# A cancel of a running job, asked for (under the lock) and not yet carried out: the job's orchestrator
# stops its worker when it sees it. A file, not a job.json field: job.json is written by the
# orchestrator running the job, which would overwrite a field another process set.
CANCEL_FILE = "cancel-requested"
CANCEL_REASON = "cancelled on request"


def new_job_id(now: dt.datetime | None = None) -> str:
    """Sortable and unique: `YYYYmmdd-HHMMSS-<6 hex>`."""
    now = now or dt.datetime.now()
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def job_stamp(job_id: str) -> str:
    """The `YYYYmmdd-HHMMSS` a job id starts with: when the job was made. Its published files carry
    the same stamp (`<name>_<stamp>.mp4`, orchestrator.run.publishing), so a file in the output folder
    and its line in `ltx2 jobs` are found by one search, and a re-publish keeps the stamp."""
    return job_id[:STAMP_LENGTH]


#: The length of the stamp a job id starts with (`YYYYmmdd-HHMMSS`).
STAMP_LENGTH = len("YYYYmmdd-HHMMSS")
#: What `new_job_id` makes; an id a client chose (protocol.jobs.Submit.job_id) must look the same, so it
#: names a directory under the jobs folder and nothing else.
JOB_ID_PATTERN = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")


# Ids suggested for an id that names no job: enough to spot a typo, few enough for one line.
NEAREST_IDS = 3
# Characters of an unknown id quoted back (a client may send anything).
SHOWN_ID_CHARS = 80


def job_ids(jobs_dir: Path) -> list[str]:
    """Every job id with a directory under `jobs_dir`, oldest first (ids begin with their creation time)."""
    try:
        names = [path.name for path in jobs_dir.iterdir() if JOB_ID_PATTERN.fullmatch(path.name)]
    except OSError:  # no jobs folder yet: no jobs
        return []
    return sorted(names)


def unknown_job_message(jobs_dir: Path, job_id: str) -> str:
    """ "no job 'X' in DIR; nearest: A, B (`ltx2 jobs` lists them)": a typo is seen at a glance."""
    nearest = difflib.get_close_matches(job_id, job_ids(jobs_dir), n=NEAREST_IDS, cutoff=0.6)
    hint = f"; nearest: {', '.join(nearest)}" if nearest else ""
    return f"no job {job_id[:SHOWN_ID_CHARS]!r} in {jobs_dir}{hint} (`ltx2 jobs` lists them)"


def finished_job_record(jobs_dir: Path, job_id: str, field: str, refused: str) -> JobRecord:
    """The record of finished job `job_id`, for a request whose `field` names it as its source (extend,
    retake); SpecError naming `field` when there is no such job, its job.json is unreadable, or it is not
    done (`refused` says what only a finished job allows, e.g. "only a finished job can be retaken")."""
    folder = jobs_dir / job_id
    if not (folder / JOB_FILE).is_file():
        raise SpecError(field, unknown_job_message(jobs_dir, job_id))
    try:
        record = load_record(folder / JOB_FILE)
    except (OSError, ValueError) as exc:
        raise SpecError(field, f"job {job_id}'s {JOB_FILE} cannot be read ({exc})") from None
    if record.status != JobState.DONE:
        raise SpecError(
            field,
            f"job {job_id} is {record.status}, not done: {refused}"
            f" (ltx2 watch {job_id} follows it; ltx2 resume {job_id} goes on with a stopped one)",
        )
    return record


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def owner_here(command: str) -> OwnerRecord:
    """This process as a job's owner, for `command` (DAEMON_OWNER or the `ltx2` command running the job)."""
    pid = os.getpid()
    return OwnerRecord(command=command, pid=pid, host=socket.gethostname(), pid_started=start_time(pid))


def is_alive(owner: OwnerRecord) -> bool:
    """Whether the owner's process still runs. A process of another host cannot be checked from here:
    it counts as alive, so nothing here takes a job another host may be running."""
    if owner.host != socket.gethostname():
        return True
    return owner.pid_started is not None and start_time(owner.pid) == owner.pid_started


def describe_owner(owner: OwnerRecord) -> str:
    """Who runs a job, as a person reads it: "the daemon (pid 12)", "`ltx2 generate` (pid 34 on gpu-07)"."""
    where = f"pid {owner.pid}" + (f" on {owner.host}" if owner.host != socket.gethostname() else "")
    who = "the daemon" if owner.command == DAEMON_OWNER else f"`ltx2 {owner.command}`"
    return f"{who} ({where})"


class JobDir:
    """Read and update one job's directory."""

    def __init__(self, path: Path, record: JobRecord, mirror: Mirror | None = None) -> None:
        self.path = path
        self.record = record
        self.mirror = mirror

    @property
    def spec(self) -> JobSpec:
        return self.record.spec

    @property
    def state(self) -> JobState:
        return JobState(self.record.status)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def owner_command(self) -> str:
        """DAEMON_OWNER for a job of the daemon's queue (and for one recorded before owners), else the
        `ltx2` command that runs it in its own process."""
        return self.record.owner.command if self.record.owner else DAEMON_OWNER

    @property
    def in_daemon_queue(self) -> bool:
        """The daemon runs this job; a job of any other owner it lists, never runs."""
        return self.owner_command == DAEMON_OWNER

    def live_runner(self) -> OwnerRecord | None:
        """The live process running this job, when it is RUNNING and its owner's process is alive
        (this process included); None for a job that is not running or whose orchestrator died."""
        owner = self.record.owner
        if self.state is not JobState.RUNNING or owner is None or not is_alive(owner):
            return None
        return owner

    @property
    def deterministic(self) -> bool:
        """Whether its stages run in deterministic mode; jobs recorded before the setting ran without it."""
        return self.record.deterministic

    @classmethod
    def create(
        cls,
        jobs_dir: Path,
        spec: JobSpec,
        model: ResolvedModel,
        job_id: str | None = None,
        loras: tuple[dict[str, Any], ...] = (),
        image: Path | None = None,
        stage2_lora: dict[str, Any] | None = None,
        identity: RequestIdentity | None = None,
        owner: str = DAEMON_OWNER,
        conditions: tuple[tuple[Path, ResolvedCondition], ...] = (),
        extension: tuple[Path, ResolvedExtension] | None = None,
        reference: tuple[Path, ResolvedReference] | None = None,
        retake: tuple[Path, ResolvedRetake] | None = None,
        audio: tuple[Path, ResolvedAudio] | None = None,
        waits_for: WaitRecord | None = None,
    ) -> JobDir:
        """Make the directory, copy the conditioning image and the keyframes in, write the first job.json.

        `owner` is who will run it: DAEMON_OWNER (its queue), or the `ltx2` command that made it to run it
        in its own process ("generate", "batch", "decode"), recorded with this process.

        `identity` (orchestrator.run.request_digest) gives the request digest and the deterministic mode;
        without one (jobs made up by tests) there is no digest and the mode is on, the shipped default.
        `loras` and `stage2_lora` are orchestrator.run.lora_lookup.resolve_lora's results, recorded as
        protocol.job_record.ResolvedLora; `conditions` orchestrator.run.condition_lookup.resolve_conditions's
        (each file copied under its record's `file`, the image's by `image` already); `extension`
        orchestrator.run.extension_lookup's source video and its record (the video stored under its `file`);
        `reference` orchestrator.run.reference_lookup.resolve_reference's control video (copied likewise);
        `retake` orchestrator.run.retake_lookup's source (a job's latents, or a video file) and its record
        (stored under its `file`).
        `audio` orchestrator.run.soundtrack_lookup.resolve_audio's soundtrack (copied under its record's `file`).

        With `waits_for` the job is made WAITING, its `spec` provisional and no file copied: it is built
        (`queue_built`) once the job it waits for is done.
        """
        job_id = job_id or new_job_id()
        path = jobs_dir / job_id
        (path / "logs").mkdir(parents=True, exist_ok=False)
        inputs = JobInputs(
            spec, model, loras, image, stage2_lora, identity, conditions, extension, reference, retake, audio
        )
        state = JobState.QUEUED if waits_for is None else JobState.WAITING
        record = new_record(job_id, utc_now(), jobs_dir, inputs, state, owner_here(owner))
        record.waits_for = waits_for
        job = cls(path, record)
        try:
            job.store_inputs(inputs)
            job.save()
            job.log_event(EventKind.for_job(state), **({"waits_for": waits_for.job} if waits_for else {}))
        except OSError:  # a full state dir: no directory without a job.json is left behind
            shutil.rmtree(path, ignore_errors=True)
            raise
        return job

    def store_inputs(self, inputs: BuiltInputs) -> None:
        """Copy the request's files into the job directory, each under the name its record gives."""
        path = self.path
        if inputs.image is not None:
            store_image(inputs.image, path / INPUT_IMAGE_FILE)
        for source, condition in inputs.conditions:
            if condition.file != INPUT_IMAGE_FILE:
                store_image(source, path / condition.file)
        if inputs.extension is not None:
            store_video(inputs.extension[0], path / inputs.extension[1].file)
        if inputs.reference is not None:
            store_image(inputs.reference[0], path / inputs.reference[1].file)
        if inputs.retake is not None:  # a job's latents linked (never rewritten in place), a user's file copied
            store = store_video if inputs.retake[1].kind == LATENTS_SOURCE else store_image
            store(inputs.retake[0], path / inputs.retake[1].file)
        if inputs.audio is not None:
            store_image(inputs.audio[0], path / inputs.audio[1].file)

    def queue_built(self, inputs: BuiltInputs) -> None:
        """WAITING -> QUEUED, built: the job it waited for is done and its request was built into `inputs`
        (orchestrator/daemon/waiting_jobs.py). The files are stored first, so a crash before the state
        changes leaves the job WAITING, built again at the daemon's next start (the copies overwritten).
        Its id, creation time and owner stay; `waits_for` goes, as the record is whole now."""
        self.store_inputs(inputs)
        built = new_record(self.id, self.record.created, self.path.parent, inputs, JobState.WAITING, self.record.owner)
        self.transition(JobState.QUEUED, built=built)

    @classmethod
    def load(cls, path: Path, mirror: Mirror | None = None) -> JobDir:
        """Open an existing job directory (OSError, or ValueError for a job.json that is not a readable
        job record: protocol.job_record.load_record)."""
        return cls(path, load_record(path / JOB_FILE), mirror)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the job directory's lock (see LOCK_FILE)."""
        with (self.path / LOCK_FILE).open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def transition(
        self,
        target: JobState,
        error: str | None = None,
        output: str | None = None,
        failure: Failure | None = None,
        owner: str | None = None,
        built: JobRecord | None = None,
    ) -> None:
        """Move the job to `target`: checked against JOB_TRANSITIONS and the state on disk, saved
        atomically, logged, mirrored. The only code that changes a job's state; a run's end comes here
        through orchestrator/run/job_end.py.

        `error`, `output` and `failure` are set with it (and logged); entering QUEUED or RUNNING clears
        `error` and `failure` unless given (an interrupted run says why it was queued again), and a
        terminal state stamps `finished`. `owner` hands the job to that owner, this process: the daemon
        queueing a job a command left, a command taking a job to run it. Entering RUNNING always records
        this process as the owner's (keeping the recorded command unless `owner` names one), since the
        process that takes a job runs it.

        `built` is a WAITING job's whole record, its request built (`queue_built`): it replaces the record as
        the job leaves WAITING. A job still waiting for another (`waits_for`) never enters QUEUED or
        RUNNING without it, since its spec is only provisional (TransitionError).
        """
        given = (("error", error), ("output", output), ("failure", failure and failure.value), ("owner", owner))
        details = {name: value for name, value in given if value is not None}
        with self.locked():
            on_disk = load_record(self.path / JOB_FILE)
            if on_disk.status != self.record.status:
                # Another thread or process moved the job while it was not running here: its
                # record is the truth (nothing else of a job that is not running changes).
                self.record = on_disk
            require_transition(JOB_TRANSITIONS, self.state, target)
            if built is not None:
                if self.state is not JobState.WAITING:  # only a waiting job is built late
                    raise TransitionError(f"job {self.id} is {self.state.value}: only a waiting job is built")
                self.record = built
            elif self.record.waits_for is not None and target in (JobState.QUEUED, JobState.RUNNING):
                raise TransitionError(
                    f"job {self.id} is not built yet: it waits for job {self.record.waits_for.job} to be done"
                )
            self.record.status = target.value
            if target in (JobState.WAITING, JobState.QUEUED, JobState.RUNNING):
                self.record.error = ""
                self.record.failure = None
                self.record.finishing = None  # a new run has its own point of no cancel
            if error is not None:
                self.record.error = error
            if failure is not None:
                self.record.failure = failure.value
            if output is not None:
                self.record.output = output
            if target.is_terminal:
                self.record.finished = utc_now()
            if owner is not None or target is JobState.RUNNING:
                self.record.owner = owner_here(owner or self.owner_command)
            self.save()
            if target is not JobState.RUNNING:  # a cancel asked of this run is carried out or moot now
                (self.path / CANCEL_FILE).unlink(missing_ok=True)
            self.log_event(EventKind.for_job(target), **details)
            if self.mirror is not None:
                self.mirror(self)

    @property
    def cancel_requested(self) -> bool:
        """A person asked to cancel this running job and its orchestrator has not ended it yet."""
        return (self.path / CANCEL_FILE).exists()

    def request_cancel(self) -> bool:
        """Ask the orchestrator running this job to cancel it; True when the request is recorded.

        False when it is too late: the job is no longer RUNNING (`state` says what it became) or it
        already passed its last point of cancel (`finishing`: its stages are done and its video is
        being published). Decided under the job's lock against job.json on disk, the same lock
        `commit_to_finish` holds, so a cancel answered "cancelling" is always carried out.
        """
        with self.locked():
            self.record = load_record(self.path / JOB_FILE)
            if self.state is not JobState.RUNNING or self.finishing:
                return False
            (self.path / CANCEL_FILE).touch()
        self.log_event(EventKind.CANCEL_REQUESTED)
        return True

    @property
    def finishing(self) -> bool:
        """Its stages succeeded and it passed the point after which a cancel is too late."""
        return self.record.finishing is not None

    def commit_to_finish(self) -> bool:
        """Pass the last point of cancel before publishing, unless a cancel came first (False).

        After this, `request_cancel` answers too late; before it, a recorded cancel wins and the
        job must end CANCELLED instead of publishing (its finished stages stay in the directory).
        """
        with self.locked():
            if self.cancel_requested:
                return False
            self.record.finishing = utc_now()
            self.save()
        return True

    def _set_stage_state(self, stage: Stage, target: StageState) -> StageRecord:
        """Change a stage's state (checked against STAGE_TRANSITIONS); returns its record, unsaved."""
        record = self.stage_record(stage)
        require_transition(STAGE_TRANSITIONS, StageState(record.status), target)
        record.status = target.value
        return record

    def record_publish(self, publish: PublishRecord) -> None:
        """Record the publish step's names and progress (orchestrator/run/publishing.py), saved at once:
        a publish cut short finds what it had reserved and placed."""
        self.record.publish = publish
        self.save()

    def save(self) -> None:
        """Write job.json atomically."""
        target = self.path / JOB_FILE
        temp = temp_path_for(target)
        try:
            temp.write_text(self.record.to_text())
            publish(temp, target)
        except OSError:  # a full disk: the half-written copy must not take what little is left
            temp.unlink(missing_ok=True)
            raise

    def log_event(self, kind: EventKind, **fields: Any) -> None:
        """Append one line to events.log (appends of one short line are atomic on POSIX)."""
        line = json.dumps({"t": utc_now(), "event": kind.value, **fields}, sort_keys=True)
        with (self.path / EVENTS_FILE).open("a") as handle:
            handle.write(line + "\n")

    def stage_record(self, stage: Stage) -> StageRecord:
        return self.record.stages[stage]

    def outputs_of(self, stage: Stage) -> tuple[str, ...]:
        """The files `stage` writes for this job: its declared outputs, and for an extension's video stage
        the joined video too."""
        if stage is Stage.VIDEO_DECODE and self.record.extension is not None:
            return (*stage.outputs, JOINED_FILE)
        return stage.outputs

    def has_outputs(self, stage: Stage) -> bool:
        """True when the stage succeeded earlier and its outputs still match their fingerprints."""
        record = self.stage_record(stage)
        recorded = record.outputs
        outputs = self.outputs_of(stage)
        if record.status != StageState.SUCCEEDED or set(recorded) != set(outputs):
            return False
        return all(matches_fingerprint(self.path / name, recorded[name]) for name in outputs)

    def clean_partial_files(self) -> None:
        """Delete temp files a killed worker left behind (call only while no worker of the job runs).

        This process's own temp files are left alone: each is a save under way in another of its threads
        (the daemon's request loop cancelling the job while the executor starts its worker ahead), whose
        rename would find its file gone (CI: a gateway delete answered 502 FileNotFoundError). A dead
        process's temp files carry its pid, never ours.
        """
        ours = f".tmp-{os.getpid()}-"
        for partial in self.path.glob(".*.tmp-*"):
            if ours in partial.name:
                continue
            partial.unlink(missing_ok=True)
            self.log_event(EventKind.PARTIAL_FILE_REMOVED, name=partial.name)

    def start_attempt(self, stage: Stage, plan: dict[str, Any], clean: bool = True, **details: Any) -> int:
        """Record a new attempt as running; returns its number (1-based). `details` (e.g. the
        group a stage-major attempt ran in) are kept in the attempt's record.

        With `clean`, temp files of a killed earlier worker are removed first; a group's later
        members pass False because their worker is already running (it cleans up front instead).
        """
        if clean:
            self.clean_partial_files()
        record = self._set_stage_state(stage, StageState.RUNNING)
        attempt = len(record.attempts) + 1
        started = AttemptRecord(attempt=attempt, plan=plan, started=utc_now(), result=AttemptResult.RUNNING.value)
        started.note(**details)
        record.attempts.append(started)
        self.save()
        self.log_event(EventKind.STAGE_STARTED, stage=stage.value, attempt=attempt, plan=plan, **details)
        return attempt

    def note_worker(self, stage: Stage, pid: int, **where: Any) -> None:
        """Record the pid of the process running the stage's current attempt: a daemon restarted
        after a crash reads it to stop that orphan before the job runs again. A process of another
        host has pid 0 here; `where` records its node, host and pids there."""
        attempt = self.stage_record(stage).attempts[-1]
        if attempt.result == AttemptResult.RUNNING and attempt.note(pid=pid, **where):
            self.save()

    def note_where(self, stage: Stage, attempt: int, **where: Any) -> None:
        """Record where attempt `attempt` of the stage ran (a farm's node, host, pids there), whatever its
        result: `ltx2 status` names the host of each attempt, also of one that ended before it was known."""
        record = next(record for record in self.stage_record(stage).attempts if record.attempt == attempt)
        if record.note(**where):
            self.save()

    def finish_attempt(self, stage: Stage, result: AttemptResult, **details: Any) -> None:
        """Close the latest attempt with `result` and details; OK records the outputs' fingerprints."""
        record = self.stage_record(stage)
        attempt = record.attempts[-1]
        require_transition(ATTEMPT_TRANSITIONS, AttemptResult(attempt.result), result)
        attempt.note(result=result.value, ended=utc_now(), **details)
        if result is AttemptResult.OK:
            self._set_stage_state(stage, StageState.SUCCEEDED)
            record.outputs = {name: fingerprint_file(self.path / name) for name in self.outputs_of(stage)}
        else:
            self._set_stage_state(stage, StageState.FAILED)
        self.save()
        self.log_event(EventKind.STAGE_FINISHED, stage=stage.value, result=result.value, **details)

    def adopt_outputs(self, stage: Stage, note: str) -> None:
        """Record outputs placed in the directory by hand (e.g. saved latents) as the stage's result."""
        record = self._set_stage_state(stage, StageState.SUCCEEDED)
        record.attempts.append(
            AttemptRecord(
                attempt=len(record.attempts) + 1,
                plan={},
                result=AttemptResult.OK.value,
                reason=note,
                started=utc_now(),
                ended=utc_now(),
                seconds=0.0,
            )
        )
        record.outputs = {name: fingerprint_file(self.path / name) for name in self.outputs_of(stage)}
        self.save()
        self.log_event(EventKind.STAGE_ADOPTED, stage=stage.value, note=note)

    def replace_spec(self, spec: JobSpec) -> None:
        """Change decode-only settings of an existing job (the latents stay valid)."""
        self.record.spec = spec
        self.record.spec_digest = spec.digest()
        # The request digest was of the spec as created: a changed job is no longer the request it names.
        self.record.request_digest = self.record.digest_inputs = None
        self.save()

    def invalidate(self, stage: Stage) -> None:
        """Forget a stage's recorded outputs: it is about to run again (attempts are kept)."""
        record = self.stage_record(stage)
        if record.status in (StageState.SUCCEEDED, StageState.FAILED):
            self._set_stage_state(stage, StageState.PENDING)
            record.outputs = {}
            self.save()
            self.log_event(EventKind.STAGE_INVALIDATED, stage=stage.value)

    def close_running_attempts(self, failure: Failure, reason: str) -> list[int]:
        """Close attempts left running by an orchestrator that stopped, died or broke mid-stage, with
        `failure` as their result; returns the worker pids they recorded (the caller stops any that
        still run)."""
        pids = []
        for stage in Stage:
            attempts = self.stage_record(stage).attempts
            if attempts and attempts[-1].result == AttemptResult.RUNNING:
                pids.append(attempts[-1].pid or 0)
                pids.extend((attempts[-1].rank_pids or [])[1:])  # a context-parallel attempt's other ranks
                self.finish_attempt(stage, attempt_result(failure), reason=reason)
        if pids:
            self.log_event(EventKind.JOB_INTERRUPTED, reason=reason)
        return [pid for pid in pids if pid > 0]

    def mark_skipped(self, stage: Stage) -> None:
        self.log_event(EventKind.STAGE_SKIPPED, stage=stage.value, reason="outputs verified")

    def log_path(self, stage: Stage, attempt: int) -> Path:
        return self.path / "logs" / f"{stage.value}-{attempt}.log"


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a text file (empty if it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])

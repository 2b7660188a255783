"""Jobs that wait for the job whose video they extend (JobState.WAITING): made at submit, built when it is done.

An extension is built from its source's finished video (its header gives the frames the overlap is
checked against, its SHA-256 enters the request digest: orchestrator/run/extension_lookup.py), so a
request that extends a job still queued, running or itself waiting (`Submit.after`, `ltx2 extend
--chain`) cannot be built yet. `create_waiting` checks what it can now (the request with the size, frame
rate and model the source lends it, without the source's video), draws its seed, and makes the job
WAITING with the request kept in job.json (protocol.job_record.WaitRecord).

`release_ready` then looks at every waiting job of the daemon's queue: once its source is done the request
is built the normal way (orchestrator.run.jobspec.build_spec, `extend` = the source) and the job becomes
QUEUED with the source's video copied in (JobDir.queue_built); once its source failed or was cancelled, or is
gone, it fails naming it (orchestrator.run.job_end.fail_waiting); otherwise it waits on. The daemon's
main thread calls it at its start and on every turn of its loop, rather than when a job ends: it looks
at the states on disk, not at an event, so a source that ended between a submit's check and the waiting
job's creation, or while the daemon was down (its durability: job.json is the truth), is seen all the
same. A waiting job's own waiters follow in the same turn, as the store lists them in submission order.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.daemon.store import JobStore
from orchestrator.run.extension_lookup import JOB_DEFAULTS
from orchestrator.run.job_end import fail_waiting
from orchestrator.run.jobdir import JOB_ID_PATTERN, JobDir, describe_owner, unknown_job_message
from orchestrator.run.jobspec import BuiltSpec, build_spec
from orchestrator.run.states import JobState, TransitionError
from protocol.codec import ErrorCode, ProtocolError
from protocol.errors import Failure, ModelNotFound
from protocol.extension import EXTEND_FIELD, OVERLAP_FIELD
from protocol.files import JOB_FILE
from protocol.job_record import DAEMON_OWNER, WaitRecord
from protocol.spec_rules import SpecError

log = logging.getLogger("ltx2.waiting")
#: The field of a submit that names the job to wait for (protocol.jobs.Submit.after).
AFTER_FIELD = "after"
#: The states of a source worth waiting for: it may still become done.
WAITABLE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.WAITING})


def with_source(request: dict[str, Any], after: str) -> dict[str, Any]:
    """The request extending `after`; ProtocolError when it names another video to extend."""
    named = request.get(EXTEND_FIELD)
    if named is not None and named != after:
        raise ProtocolError(
            ErrorCode.INVALID_SPEC,
            f"after names job {after}, which the request extends; it cannot extend {named!r} too",
            AFTER_FIELD,
        )
    return {**request, EXTEND_FIELD: after}


def pending_source(after: str, settings: Settings) -> JobDir | None:
    """The daemon's job `after` names when it is not done yet (the new job waits for it); None when it is
    done (the request is built at once). ProtocolError for an unknown id, a job that failed or was
    cancelled (nothing to extend), or one another `ltx2` command runs (the daemon sees only its own end)."""
    path = settings.jobs_dir / after
    if not JOB_ID_PATTERN.fullmatch(after) or not (path / JOB_FILE).is_file():
        raise ProtocolError(ErrorCode.NOT_FOUND, unknown_job_message(settings.jobs_dir, after), AFTER_FIELD)
    try:
        source = JobDir.load(path)
    except (OSError, ValueError) as exc:
        raise ProtocolError(
            ErrorCode.CONFLICT, f"job {after}'s {JOB_FILE} cannot be read: {exc}", AFTER_FIELD
        ) from None
    if source.state is JobState.DONE:
        return None
    if source.state not in WAITABLE:
        raise ProtocolError(
            ErrorCode.CONFLICT,
            f"job {after} is {source.state.value}: it has no video to extend (ltx2 resume {after} first)",
            AFTER_FIELD,
        )
    if not source.in_daemon_queue:
        runner = source.record.owner
        who = describe_owner(runner) if runner else "another process"
        raise ProtocolError(
            ErrorCode.CONFLICT,
            f"job {after} is run by {who}, not by the daemon, which can wait only for jobs of its own queue",
            AFTER_FIELD,
        )
    return source


def provisional_request(request: dict[str, Any], source: JobDir) -> dict[str, Any]:
    """The request as it can be checked before its source is done: without the video it extends (nor the
    overlap, which is checked against that video), with the model, size, crop and frame rate the source
    lends a request that leaves them out (extension_lookup.source_defaults, which needs the video)."""
    checked = {name: value for name, value in request.items() if name not in (EXTEND_FIELD, OVERLAP_FIELD)}
    lent = {name: getattr(source.spec, name) for name in JOB_DEFAULTS}
    if request.get("width") is not None or request.get("height") is not None:
        lent.pop("crop_width")  # a size of the request's own is delivered whole unless it crops itself
        lent.pop("crop_height")
    return checked | {name: value for name, value in lent.items() if request.get(name) is None and value is not None}


def create_waiting(
    request: dict[str, Any], source: JobDir, settings: Settings, job_id: str | None
) -> tuple[JobDir, BuiltSpec]:
    """A WAITING job for `request` (which extends `source`), and its provisional build (SpecError or
    ModelNotFound when the request is wrong whatever the source's video). The seed is drawn now and kept,
    so the job renders the seed `ltx2 status` shows while it waits."""
    built = build_spec(provisional_request(request, source), settings)
    unbuilt = {name: value for name, value in request.items() if name != EXTEND_FIELD} | {"seed": built.spec.seed}
    job = JobDir.create(
        settings.jobs_dir,
        built.spec,
        built.model,
        job_id=job_id,
        owner=DAEMON_OWNER,
        waits_for=WaitRecord(job=source.id, request=unbuilt),
    )
    return job, built


def release_ready(settings: Settings, store: JobStore) -> None:
    """Build and queue each waiting job whose source is done; fail each whose source failed, was
    cancelled or is gone; leave the rest waiting."""
    for row in store.waiting():
        try:
            job = JobDir.load(Path(row["job_dir"]), mirror=store.mirror)
        except (OSError, ValueError, KeyError) as exc:
            store.mark_unreadable(row["id"], f"job.json unreadable: {exc}")
            continue
        if job.state is not JobState.WAITING or job.record.waits_for is None:
            store.mirror(job)  # a row behind its job.json: it is no longer looked at
            continue
        try:
            follow_source(job, job.record.waits_for, settings)
        except TransitionError as exc:  # moved meanwhile by another process; its row was mirrored
            log.warning("job %s: %s", job.id, exc)
        except OSError as exc:  # its files could not be copied in (a full disk): it waits, tried again
            log.warning("job %s: not released yet: %s", job.id, exc)
        except Exception as exc:  # a bug fails this job, never the daemon's loop (as Daemon.answer keeps it)
            log.exception("job %s: building it failed", job.id)
            with contextlib.suppress(TransitionError):  # it left WAITING before the error: that end stands
                fail_waiting(job, f"orchestration error while building it: {exc}", Failure.INTERNAL)


def follow_source(job: JobDir, waits: WaitRecord, settings: Settings) -> None:
    """Move one waiting job on as its source's state says."""
    try:
        source = JobDir.load(settings.jobs_dir / waits.job)
    except (OSError, ValueError, KeyError) as exc:
        fail_waiting(job, f"its source job {waits.job} is gone or unreadable ({exc})")
        log.info("job %s: failed: source job %s unreadable", job.id, waits.job)
        return
    if source.state is JobState.FAILED:
        fail_waiting(job, f"its source job {waits.job} failed: {source.record.error or 'no reason recorded'}")
    elif source.state is JobState.CANCELLED:
        fail_waiting(job, f"its source job {waits.job} was cancelled")
    elif source.state is JobState.DONE:
        build_and_queue(job, waits, settings)
    else:
        return
    log.info("job %s: %s (source job %s %s)", job.id, job.state.value, waits.job, source.state.value)


def build_and_queue(job: JobDir, waits: WaitRecord, settings: Settings) -> None:
    """Build the request against its source's finished video and queue the job; a request that does not
    fit that video (an --overlap longer than it) fails the job with the reason build_spec gives."""
    try:
        built = build_spec(with_source(waits.request, waits.job), settings)
    except (SpecError, ModelNotFound, ProtocolError) as exc:
        fail_waiting(job, f"extending its source job {waits.job}: {exc}")
        return
    for line in built.notices:
        log.info("job %s: %s", job.id, line)
    job.queue_built(built)

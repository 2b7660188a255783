"""The orchestrator daemon: answers clients over ZeroMQ while the executor runs the queue.

Life of a job: `submit` validates the spec, creates the job directory and queues it in the store
(QUEUED). The executor thread claims it (RUNNING) and runs its stages as worker processes
(orchestrator.run.pipeline); it ends DONE, FAILED or CANCELLED. If the daemon dies meanwhile,
supervisord restarts it and `recover_interrupted` kills the orphaned worker and re-queues the job,
which then resumes at its first unfinished stage.

Guards: one daemon per state dir (orchestrator.daemon.state_lock, taken before anything touches the
store), and a daemon whose executor thread died exits non-zero instead of queueing jobs that never
run, so supervisord restarts it and the restarted daemon resumes the queue.

Clients never reach this process directly: a client front process (orchestrator.daemon.client_front)
binds the public endpoint under a memory bound and passes on one-frame requests over a private ipc
socket, so a multipart flood exhausts the front, which is restarted, never the daemon.

The main loop never blocks on a peer: it polls with a timeout, every frame is decoded and
validated (protocol.codec), and every request gets exactly one reply, `ok` or a typed `error`.
Nothing a client sends can raise past `answer`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from config.settings import Settings
from orchestrator.daemon import job_views, waiting_jobs
from orchestrator.daemon.executor import Executor, ProgressBoard, recover_interrupted
from orchestrator.daemon.front_process import ClientFront
from orchestrator.daemon.job_views import MAX_LIST, Listed, UnknownJob
from orchestrator.daemon.lane_occupancy import LaneOccupancy
from orchestrator.daemon.replies import encode_reply, fit_listing
from orchestrator.daemon.state_lock import lock_state_dir
from orchestrator.daemon.store import JobStore, open_store
from orchestrator.daemon.transport import DaemonAddress, bind_core, core_endpoint, receive_from_front
from orchestrator.placement.lane_links import LaneSource, open_lanes
from orchestrator.placement.lanes import widest_lane
from orchestrator.run import reuse
from orchestrator.run.job_end import cancel_waiting, release_orphaned
from orchestrator.run.jobdir import JOB_ID_PATTERN, JobDir, describe_owner
from orchestrator.run.jobspec import build_spec
from orchestrator.run.states import JobState, TransitionError
from protocol import codec, jobs
from protocol.codec import ErrorCode, ProtocolError
from protocol.errors import ModelNotFound
from protocol.files import JOB_FILE
from protocol.job_record import DAEMON_OWNER
from protocol.spec_rules import SpecError

log = logging.getLogger("ltx2.daemon")
# Poll timeout of the main loop: how fast a stop request is noticed.
POLL_MS = 500
STORE_FILE = "jobs.sqlite"
# How often the main loop looks at the waiting jobs' sources (orchestrator.daemon.waiting_jobs): a chain's
# next segment is queued within this of its source's end, and a loop busy answering requests reads the
# waiting jobs' records no more often than this.
RELEASE_CHECK_S = 0.5


class ExecutorDied(RuntimeError):
    """The executor thread ended while the daemon was serving: queued jobs would never run."""


class Daemon:
    """Serves requests until `stop` is set."""

    def __init__(self, settings: Settings, address: DaemonAddress) -> None:
        self.settings = settings
        self.address = address
        self.board = ProgressBoard()
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.store_path = settings.state_dir / STORE_FILE
        self.executors: list[Executor] = []  #: one per lane (orchestrator.placement.lanes)
        self.handlers: dict[type[codec.Message], Callable[[Any, JobStore], codec.Message]] = {
            jobs.Submit: self.submit,
            jobs.Status: self.status,
            jobs.ListJobs: self.list_jobs,
            jobs.Cancel: self.cancel,
            jobs.Resume: self.resume,
            jobs.Logs: self.logs,
            jobs.Ping: self.ping,
        }

    def serve(self) -> None:
        """Serve until `stop` is set; raises StateDirLocked if another daemon has the state dir and
        ExecutorDied if the executor thread ends on its own."""
        with lock_state_dir(self.settings.state_dir):
            self._serve()

    def _serve(self) -> None:
        store = open_store(self.store_path, self.settings.jobs_dir)
        for job_id in recover_interrupted(store, self.settings.jobs_dir):
            log.warning("job %s was interrupted; re-queued to resume", job_id)
        waiting_jobs.release_ready(self.settings, store)  # sources that ended while the daemon was down
        context = zmq.Context()
        endpoint = core_endpoint(os.getpid())
        socket = bind_core(context, endpoint)
        front = ClientFront(self.address, endpoint)
        source: LaneSource | None = None
        try:
            front.start()  # TransportError if the public endpoint or its keys cannot be used
            source = open_lanes(self.settings, context)  # FarmUnusable if a Ray farm cannot run
            lanes = source.lanes
            occupancy = LaneOccupancy(len(lanes), widest_lane(lanes))
            self.executors = [
                Executor(self.settings, self.store_path, source, self.board, self.stop, lane, occupancy)
                for lane in lanes
            ]
            for executor in self.executors:
                executor.start()
            log.info("lanes: %s", ", ".join(lane.device or "one lane, every device" for lane in lanes))
            log.info("listening on %s (pid %d, client front %d)", self.address.endpoint, os.getpid(), front.pid)
            self.ready.set()
            release_at = 0.0
            while not self.stop.is_set():
                if not all(executor.is_alive() for executor in self.executors) and not self.stop.is_set():
                    log.error("executor thread died; exiting so that supervisord restarts the daemon")
                    raise ExecutorDied("the executor thread died (its traceback is in the daemon's log)")
                front.keep_running()
                if socket.poll(POLL_MS):
                    self.serve_one(socket, front.token, store)
                if time.monotonic() >= release_at:
                    waiting_jobs.release_ready(self.settings, store)
                    release_at = time.monotonic() + RELEASE_CHECK_S
        finally:
            self.stop.set()
            for executor in self.executors:
                executor.join()
            if source is not None:
                source.close()
            front.stop()
            socket.close()
            # destroy, not term: a dead executor may have left its worker socket open, and term
            # would wait for it forever. The executor has ended, so every socket left is ours.
            context.destroy(linger=0)
            store.close()
            Path(endpoint.removeprefix("ipc://")).unlink(missing_ok=True)
            if self.address.endpoint.startswith("ipc://"):
                Path(self.address.endpoint.removeprefix("ipc://")).unlink(missing_ok=True)
            log.info("stopped")

    def serve_one(self, socket: zmq.Socket, token: bytes, store: JobStore) -> None:
        """Answer one request of the client front; a message without the front's token (another
        process of this user connected to the private socket) is dropped unanswered."""
        received = receive_from_front(socket, token)  # the front forwards one-frame requests only
        if received is None:
            log.warning("dropped a message on the daemon's private socket that did not come from its client front")
            return
        front, identity, payload = received
        reply = payload if isinstance(payload, jobs.Error) else self.answer([identity, payload], store)
        try:
            socket.send_multipart([front, identity, encode_reply(reply)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # the front died since it asked: its clients reconnect and ask again
            log.warning("reply to a %s request dropped: its client front is gone", type(reply).__name__)

    def answer(self, frames: list[bytes], store: JobStore) -> codec.Message:
        """The one reply to one request; never raises."""
        if len(frames) != 2:
            return jobs.Error("", ErrorCode.MALFORMED, f"expected one message frame, got {len(frames) - 1}")
        try:
            request = codec.decode(frames[1])
        except ProtocolError as exc:
            return jobs.Error("", exc.code, str(exc), exc.field)
        handler = self.handlers.get(type(request))
        if handler is None:
            return jobs.Error(request.id, ErrorCode.UNKNOWN_TYPE, f"{request.TYPE!r} is not a request", "type")
        try:
            return handler(request, store)
        except ProtocolError as exc:
            return jobs.Error(request.id, exc.code, str(exc), exc.field)
        except Exception as exc:  # the socket loop must survive any handler bug
            log.exception("request %s failed", request.TYPE)
            return jobs.Error(request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def submit(self, request: jobs.Submit, store: JobStore) -> codec.Message:
        if request.job_id:
            if not JOB_ID_PATTERN.fullmatch(request.job_id):
                message = (
                    f"job_id must look like {JOB_ID_PATTERN.pattern} (what the daemon makes); got {request.job_id!r}"
                )
                return jobs.Error("", ErrorCode.INVALID_SPEC, message, "job_id")
            if (self.settings.jobs_dir / request.job_id / JOB_FILE).is_file():
                return self.submitted_before(request.job_id, store)
        spec = dict(request.spec)
        try:
            if request.after:
                spec = waiting_jobs.with_source(spec, request.after)
                source = waiting_jobs.pending_source(request.after, self.settings)
                if source is not None:
                    return self.submit_waiting(spec, source, request.job_id, store)
            built = build_spec(spec, self.settings)
        except SpecError as exc:
            return jobs.Error("", ErrorCode.INVALID_SPEC, str(exc), exc.field)
        except ModelNotFound as exc:
            return jobs.Error("", ErrorCode.NOT_FOUND, str(exc), exc.field)  # "model" or "lora"
        if request.reuse and built.identity and (found := reuse.find(built.identity.digest, self.settings)):
            # It may be a job `ltx2 generate` rendered into this state dir: `status` finds it by its directory.
            notices = [*built.notices, f"{reuse.describe(found)}: nothing queued"]
            return jobs.Ok(
                found.id,
                {
                    "id": found.id,
                    "seed": found.spec.seed,
                    "model": found.spec.model,
                    "notices": notices,
                    "reused": True,
                },
            )
        job = JobDir.create(
            self.settings.jobs_dir,
            built.spec,
            built.model,
            job_id=request.job_id or None,
            loras=built.loras,
            image=built.image,
            conditions=built.conditions,
            extension=built.extension,
            reference=built.reference,
            retake=built.retake,
            audio=built.audio,
            stage2_lora=built.stage2_lora,
            identity=built.identity,
            owner=DAEMON_OWNER,
        )
        store.mirror(job)
        log.info("job %s: queued (%s)", job.id, built.spec.prompt[:60])
        return jobs.Ok(
            job.id, {"id": job.id, "seed": built.spec.seed, "model": built.model.name, "notices": list(built.notices)}
        )

    def submit_waiting(self, spec: dict[str, Any], source: JobDir, job_id: str, store: JobStore) -> codec.Message:
        """A job that waits for `source`, which it extends, to be done (orchestrator.daemon.waiting_jobs)."""
        job, built = waiting_jobs.create_waiting(spec, source, self.settings, job_id or None)
        store.mirror(job)
        log.info("job %s: waiting for job %s (%s)", job.id, source.id, built.spec.prompt[:60])
        data = {"id": job.id, "seed": built.spec.seed, "model": built.model.name, "waits_for": source.id}
        return jobs.Ok(job.id, {**data, "notices": list(built.notices)})

    def submitted_before(self, job_id: str, store: JobStore) -> codec.Message:
        """The answer to a submit whose job exists (a resend after a lost reply): that job, nothing queued."""
        try:
            job = JobDir.load(self.settings.jobs_dir / job_id)
        except (OSError, ValueError, KeyError) as exc:
            raise ProtocolError(
                ErrorCode.CONFLICT, f"job {job_id} exists but its job.json is unreadable: {exc}"
            ) from None
        store.mirror(job)
        log.info("job %s: submitted again; answered with the job it made", job_id)
        return jobs.Ok(job.id, {"id": job.id, "seed": job.spec.seed, "model": job.spec.model, "notices": []})

    def status(self, request: jobs.Status, store: JobStore) -> codec.Message:
        return jobs.Ok(request.id, {"job": self.summary(self.find(request.id, store), detailed=True)})

    def list_jobs(self, request: jobs.ListJobs, store: JobStore) -> codec.Message:
        """The newest jobs of the state dir: the daemon's (its store) and those `ltx2 generate`, `batch`
        or `resume` run in their own processes (their directories; the daemon never runs them)."""
        limit = max(1, min(request.limit, MAX_LIST))
        ours = [(row, job_views.load_job(Path(row["job_dir"]))) for row in store.list(limit)]
        theirs = job_views.jobs_outside(self.settings.jobs_dir, store.ids(), limit)
        listed = job_views.newest([*ours, *theirs], limit)
        return jobs.Ok("", fit_listing([self.summary(entry, detailed=False) for entry in listed]))

    def cancel(self, request: jobs.Cancel, store: JobStore) -> codec.Message:
        """Cancel a queued job at once; ask the executor to stop a running one ("cancelling", always
        carried out); or answer conflict: already finished, too late (publishing has begun), or running
        in another process (`ltx2 generate`), which only that process can stop."""
        job = self.require_job_dir(request.id, store)
        if cancel_waiting(job):  # under the job's lock: if the executor claimed it just now, this fails cleanly
            return jobs.Ok(request.id, {"state": JobState.CANCELLED.value})
        if not job.in_daemon_queue and (runner := job.live_runner()) is not None:
            raise ProtocolError(
                ErrorCode.CONFLICT,
                f"job {request.id} runs in {describe_owner(runner)}, not in the daemon: stop it there (Ctrl-C)",
            )
        if job.request_cancel():  # under the lock the executor takes to begin publishing
            return jobs.Ok(request.id, {"state": "cancelling"})  # the executor stops the worker within a poll
        if job.state is JobState.RUNNING:
            raise ProtocolError(
                ErrorCode.CONFLICT,
                f"too late: job {request.id} is done with its stages and its video is being published",
            )
        raise ProtocolError(ErrorCode.CONFLICT, f"job {request.id} is already {job.state.value}")

    def resume(self, request: jobs.Resume, store: JobStore) -> codec.Message:
        """Queue a failed, cancelled or interrupted job again; it restarts at its first unfinished stage.

        A job another process left (an interrupted `ltx2 generate`, one whose `ltx2` process died) is
        taken into the daemon's queue. Refused: a done job (its video is named), a queued one of the
        daemon's, and one running in a live process (the daemon's executor, or an `ltx2` command).
        """
        job = self.require_job_dir(request.id, store)
        if job.state is JobState.DONE:  # allowed for `ltx2 decode`, which decodes again; not here
            output = f"; its video: {job.record.output}" if job.record.output else ""
            raise ProtocolError(ErrorCode.CONFLICT, f"job {request.id} is already done{output}; nothing to resume")
        if (runner := job.live_runner()) is not None:
            raise ProtocolError(ErrorCode.CONFLICT, f"job {request.id} is running in {describe_owner(runner)}")
        if job.state is JobState.QUEUED and job.in_daemon_queue:
            raise ProtocolError(ErrorCode.CONFLICT, f"job {request.id} is already queued")
        if (waits := job.record.waits_for) is not None:
            return self.wait_again(job, waits.job)
        try:
            if job.state is JobState.RUNNING:  # its orchestrator died: stop what it left, then queue it here
                release_orphaned(job, owner=DAEMON_OWNER)
            else:
                job.transition(JobState.QUEUED, owner=DAEMON_OWNER)
        except TransitionError as exc:  # moved by another process since it was read
            raise ProtocolError(ErrorCode.CONFLICT, f"job {request.id}: {exc}") from None
        log.info("job %s: queued again on request", job.id)
        return jobs.Ok(request.id, {"state": JobState.QUEUED.value})

    def wait_again(self, job: JobDir, source: str) -> codec.Message:
        """Resume a job that never got past waiting (its source failed or it was cancelled while it waited):
        it waits for its source again, and is built once that is done (resume the source too)."""
        if job.state is JobState.WAITING:
            raise ProtocolError(ErrorCode.CONFLICT, f"job {job.id} is already waiting for job {source}")
        try:
            job.transition(JobState.WAITING, owner=DAEMON_OWNER)
        except TransitionError as exc:  # moved by another process since it was read
            raise ProtocolError(ErrorCode.CONFLICT, f"job {job.id}: {exc}") from None
        log.info("job %s: waiting again for job %s, on request", job.id, source)
        return jobs.Ok(job.id, {"state": JobState.WAITING.value, "waits_for": source})

    def logs(self, request: jobs.Logs, store: JobStore) -> codec.Message:
        row, _ = self.find(request.id, store)
        return jobs.Ok(request.id, job_views.logs_reply(Path(row["job_dir"]), request.lines))

    def ping(self, request: jobs.Ping, store: JobStore) -> codec.Message:
        alive = bool(self.executors) and all(executor.is_alive() for executor in self.executors)
        return jobs.Ok("", {"pid": os.getpid(), "protocol": codec.PROTOCOL_VERSION, "executor_alive": alive})

    def find(self, job_id: str, store: JobStore) -> Listed:
        """A job's row and directory: the store's, or, for a job the store does not hold (one `ltx2
        generate` ran into this state dir), read from its directory; not_found names the nearest ids."""
        row = store.get(job_id)
        if row is not None:
            return row, job_views.load_job(Path(row["job_dir"]))
        try:
            path = job_views.job_path(self.settings.jobs_dir, job_id)
        except UnknownJob as exc:
            raise ProtocolError(ErrorCode.NOT_FOUND, str(exc), "id") from None
        job = job_views.load_job(path)
        if job is None:
            raise ProtocolError(ErrorCode.CONFLICT, f"job {job_id}: job.json unreadable")
        return job_views.directory_row(job), job

    def require_job_dir(self, job_id: str, store: JobStore) -> JobDir:
        """The job's directory, its state changes mirrored into `store` (for the daemon's jobs)."""
        row, _ = self.find(job_id, store)
        try:
            return JobDir.load(Path(row["job_dir"]), mirror=store.mirror)
        except (OSError, ValueError, KeyError) as exc:
            raise ProtocolError(ErrorCode.CONFLICT, f"job {job_id}: job.json unreadable: {exc}") from None

    def summary(self, entry: Listed, detailed: bool) -> dict[str, Any]:
        """What `status` and `jobs` show about a job, with its live progress when it runs here."""
        row, job = entry
        return job_views.summary(row, job, detailed, self.board.get(row["id"]) if detailed else None)

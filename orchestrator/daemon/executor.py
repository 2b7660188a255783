"""The daemon's executor thread: runs queued jobs one at a time, in submission order.

A GPU runs one clip at a time, so one thread suffices. It claims the oldest queued job in the
store, runs it (orchestrator.pipeline.run_job: stage processes, retries by the policy) and
records the end state. When the jobs queued right behind it use the same model (and dtype), it
claims those too, up to `[worker] group_size`, and runs them stage-major
(orchestrator.stage_major): each stage's models load once for the group. Jobs are never taken
out of submission order for this. It owns its own sqlite connection and worker socket; the daemon's main
thread talks to it only through the store (cancel requests) and the progress board.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from config.settings import Settings
from orchestrator.daemon import fault_switches
from orchestrator.daemon.store import JobStore
from orchestrator.jobdir import JobDir
from orchestrator.pipeline import JobFailed, JobHooks, StageEvent, next_attempt, run_job
from orchestrator.policy import describe_plan
from orchestrator.runner import SpawnedWorker, StageOutcome, WorkerLink, discard_worker, spawn_worker
from orchestrator.stage_major import run_stage_major
from orchestrator.states import JobState
from protocol import codec, stages
from protocol.errors import Failure
from protocol.files import STAGE_ORDER, Stage

log = logging.getLogger("ltx2.executor")
# How often an idle executor looks for queued jobs; submit latency is at most this.
IDLE_POLL_S = 0.2
# How long recovery waits for a killed orphan worker to disappear.
ORPHAN_EXIT_WAIT_S = 10.0


class ProgressBoard:
    """The latest progress of each running job, shared with the daemon's main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, dict[str, Any]] = {}

    def update(self, job_id: str, event: codec.Message | StageEvent) -> None:
        with self._lock:
            entry = self._latest.setdefault(job_id, {})
            if isinstance(event, StageEvent):
                entry.update(
                    stage=event.stage, phase=event.kind, step=0, total=0, detail=event.detail, attempt=event.attempt
                )
            elif isinstance(event, stages.Progress):
                entry.update(
                    stage=event.stage,
                    phase=event.phase,
                    step=event.step,
                    total=event.total,
                    gpu_bytes=event.gpu_bytes,
                    rss_bytes=event.rss_bytes,
                )
            elif isinstance(event, stages.Heartbeat):
                entry.update(gpu_bytes=event.gpu_bytes, rss_bytes=event.rss_bytes)
            entry["updated"] = time.time()

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._latest.get(job_id)
            return dict(entry) if entry else None

    def clear(self, job_id: str) -> None:
        with self._lock:
            self._latest.pop(job_id, None)


class Executor(threading.Thread):
    """Runs jobs until `stop` is set; a job interrupted by the stop goes back to the queue."""

    def __init__(
        self, settings: Settings, store_path: Path, context: zmq.Context, board: ProgressBoard, stop: threading.Event
    ) -> None:
        super().__init__(name="executor", daemon=True)
        self.settings, self.store_path, self.context, self.board, self.stop = settings, store_path, context, board, stop
        # The next queued job's first worker, started while the current job's last stage runs.
        self.next_worker: tuple[str, SpawnedWorker] | None = None

    def run(self) -> None:
        store = JobStore(self.store_path)
        link = WorkerLink(self.context, fork_server=self.settings.fork_server)
        try:
            while not self.stop.is_set():
                row = store.claim_next()
                if row is None:
                    self.stop.wait(IDLE_POLL_S)
                    continue
                fault_switches.raise_in_executor_if_requested()
                group = [row, *self.claim_followers(store, row)]
                if len(group) == 1:
                    self.run_one(store, link, row)
                else:
                    self.run_group(store, link, group)
        finally:
            if self.next_worker is not None:
                discard_worker(self.next_worker[1], link, self.next_worker[0])
            link.close()
            store.close()

    def run_one(self, store: JobStore, link: WorkerLink, row: dict[str, Any]) -> None:
        job_id = row["id"]
        log.info("job %s: running", job_id)
        prestarted = None
        if self.next_worker is not None:
            owner, worker = self.next_worker
            self.next_worker = None
            if owner == job_id:
                prestarted = worker
            else:
                discard_worker(worker, link, owner)
        try:
            job = JobDir.load(Path(row["job_dir"]))
            output = run_job(job, self.settings, link, self.hooks(store, link, job_id), prestarted)
            store.transition(job_id, JobState.DONE, output=str(output), worker_pid=0)
            log.info("job %s: done -> %s", job_id, output)
        except JobFailed as exc:
            self.record_failure(store, job_id, exc)
        except Exception as exc:  # a job must never take the executor down with it
            log.exception("job %s: orchestration error", job_id)
            store.transition(job_id, JobState.FAILED, error=f"orchestration error: {exc}", worker_pid=0)
        finally:
            self.board.clear(job_id)

    def claim_followers(self, store: JobStore, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Claim the queued jobs right behind `row` that use the same model, for a stage-major group."""
        try:
            key = model_key(JobDir.load(Path(row["job_dir"])))
        except (OSError, ValueError):
            return []
        followers: list[dict[str, Any]] = []
        while len(followers) + 1 < self.settings.group_size and (following := store.peek_next()) is not None:
            try:
                same = model_key(JobDir.load(Path(following["job_dir"]))) == key
            except (OSError, ValueError):
                same = False
            claimed = store.claim_next(following["id"]) if same else None
            if claimed is None:
                break
            followers.append(claimed)
        return followers

    def run_group(self, store: JobStore, link: WorkerLink, rows: list[dict[str, Any]]) -> None:
        """Run several claimed jobs stage-major and record each one's end state."""
        if self.next_worker is not None:  # prestarted for a single job; the group starts its own
            discard_worker(self.next_worker[1], link, self.next_worker[0])
            self.next_worker = None
        ids = [row["id"] for row in rows]
        log.info("jobs %s: running as one stage-major group", ", ".join(ids))
        hooks = {job_id: self.hooks(store, link, job_id) for job_id in ids}
        try:
            jobs = [JobDir.load(Path(row["job_dir"])) for row in rows]
            results = run_stage_major(jobs, self.settings, link, lambda job: hooks[job.id])
        except Exception as exc:  # a group must never take the executor down with it
            log.exception("jobs %s: orchestration error", ", ".join(ids))
            for job_id in ids:
                store.transition(job_id, JobState.FAILED, error=f"orchestration error: {exc}", worker_pid=0)
            results = {}
        for job_id, result in results.items():
            if isinstance(result, JobFailed):
                self.record_failure(store, job_id, result)
            else:
                store.transition(job_id, JobState.DONE, output=str(result), worker_pid=0)
                log.info("job %s: done -> %s", job_id, result)
            self.board.clear(job_id)

    def prestart_next_job(self, store: JobStore, link: WorkerLink) -> None:
        """Start the next queued job's first worker so its imports overlap this job's last stage."""
        row = store.peek_next()
        if row is None or self.next_worker is not None:
            return
        try:
            job = JobDir.load(Path(row["job_dir"]))
            stage = next((s for s in STAGE_ORDER if not job.has_outputs(s)), None)
            if stage is not None:
                worker = spawn_worker(
                    job, stage, *next_attempt(job, stage, self.settings), link, self.settings.heartbeat_s
                )
                self.next_worker = (job.id, worker)
        except (OSError, ValueError) as exc:
            log.warning("could not prestart job %s: %s", row["id"], exc)

    def hooks(self, store: JobStore, link: WorkerLink, job_id: str) -> JobHooks:
        def on_attempt(stage: Stage, attempt: int, plan: dict[str, Any], outcome: StageOutcome) -> None:
            result = "ok" if outcome.ok else outcome.failure.value
            store.record_attempt(job_id, stage.value, attempt, plan, result, outcome.reason, outcome.seconds)
            store.set_worker_pid(job_id, 0)
            log.info(
                "job %s: %s attempt %d (%s): %s %s",
                job_id,
                stage.value,
                attempt,
                describe_plan(stage, plan),
                result,
                outcome.reason,
            )

        return JobHooks(
            listener=lambda event: self.board.update(job_id, event),
            should_cancel=lambda: self.stop.is_set() or store.is_cancel_requested(job_id),
            on_spawn=lambda pid: store.set_worker_pid(job_id, pid),
            on_attempt=on_attempt,
            on_last_stage=lambda: self.prestart_next_job(store, link),
        )

    def record_failure(self, store: JobStore, job_id: str, exc: JobFailed) -> None:
        if exc.failure is Failure.CANCELLED and not store.is_cancel_requested(job_id):
            # RUNNING -> QUEUED: the daemon is stopping; the job resumes at its next start.
            store.transition(job_id, JobState.QUEUED, worker_pid=0)
            log.info("job %s: interrupted by shutdown, re-queued", job_id)
        elif exc.failure is Failure.CANCELLED:
            store.transition(job_id, JobState.CANCELLED, error="cancelled on request", worker_pid=0)
        else:
            store.transition(job_id, JobState.FAILED, error=str(exc), worker_pid=0)
            log.info("job %s: failed: %s", job_id, exc)


def model_key(job: JobDir) -> tuple[str, str, str]:
    """Jobs with equal keys load the same weights: they may share stage processes."""
    return (job.record["model_path"], job.record.get("revision", ""), job.spec.dtype)


def recover_interrupted(store: JobStore) -> list[str]:
    """After a daemon crash: kill orphaned workers and put RUNNING jobs back in the queue."""
    recovered = []
    for row in store.in_state(JobState.RUNNING):
        kill_orphan(int(row["worker_pid"]), row["job_dir"])
        try:
            JobDir.load(Path(row["job_dir"])).interrupt_running_attempts()
        except (OSError, ValueError) as exc:
            log.warning("job %s: cannot update job.json: %s", row["id"], exc)
        # RUNNING -> QUEUED: resumes at its first unfinished stage.
        store.transition(row["id"], JobState.QUEUED, worker_pid=0)
        recovered.append(row["id"])
    return recovered


def kill_orphan(pid: int, job_dir: str) -> None:
    """SIGKILL a previous daemon's worker, if `pid` is still that worker (not a reused pid).

    A worker's stdout is its log file inside the job directory, whether it was forked or exec'd,
    which tells it apart from an unrelated process that reused the pid.
    """
    if pid <= 0:
        return
    try:
        stdout = os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return
    if not stdout.startswith(job_dir):
        return
    log.warning("killing orphaned worker %d of %s", pid, job_dir)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + ORPHAN_EXIT_WAIT_S
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for its new parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"

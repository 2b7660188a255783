"""The daemon's executor threads: one per lane, each running queued jobs one at a time, in
submission order.

A lane (a GPU: DESIGN.md rule 8) runs one clip's stage at a time, so one thread per lane suffices;
every worker it starts runs on its lane's device, over its own worker socket and fork server. Each
claims the oldest queued job in the store (QUEUED -> RUNNING through JobDir.transition, which the
store mirrors) and runs it (orchestrator.run.stage_major.run_job_stage_major: stage processes; the
policy decides retries and how the job ends, including INTERRUPTED -> QUEUED when the daemon
stops). When the jobs queued right behind it have the same claim_key (model, revision, dtype), it
claims those too, up to `[worker] group_size`, and runs them stage-major
(orchestrator.run.stage_major): each stage's models load once for the group. Jobs are never taken
out of submission order for this; with several lanes a claim takes at most its share of the queue
(queued jobs / lanes), so that the other lanes get work too. Two lanes never both claim a job: the
claim is the QUEUED -> RUNNING transition, checked against job.json under the job's lock. A job
stays on the lane that claimed it for all its stages. Each thread owns its own sqlite connection
and worker socket; the daemon's main thread talks to them only through the store, the job
directories (transitions and cancel requests, under their lock) and the progress board.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.daemon.lane_occupancy import LaneOccupancy
from orchestrator.daemon.store import JobStore, read_job_dirs
from orchestrator.placement.lane_links import LaneSource, LocalLanes
from orchestrator.placement.lanes import Lane, lane_width, runs_here
from orchestrator.placement.processes import kill_orphan
from orchestrator.placement.worker_link import SpawnedWorker, WorkerLink, discard_worker
from orchestrator.run.job_end import JobStopped, internal_error, requeue_orphan
from orchestrator.run.job_hooks import HooksFor, JobHooks, StageEvent
from orchestrator.run.jobdir import JobDir
from orchestrator.run.pipeline import next_attempt
from orchestrator.run.policy import describe_plan
from orchestrator.run.runner import StageOutcome, spawn_worker
from orchestrator.run.stage_major import run_job_stage_major, run_stage_major
from orchestrator.run.stage_overlap import MeasuredPeaks, OverlappedLane
from orchestrator.run.states import JobState, TransitionError
from protocol import codec, stages
from protocol.errors import Failure
from protocol.fault_points import fault_point
from protocol.files import STAGE_ORDER, Stage

log = logging.getLogger("ltx2.executor")
# How often an idle executor looks for queued jobs; submit latency is at most this.
IDLE_POLL_S = 0.2
# How often a running lane checks that the job it started a worker ahead for is still queued.
STALE_CHECK_S = 1.0


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
                if (entry.get("stage"), entry.get("phase")) != (event.stage, event.phase):
                    # A new phase: its step rate (for the ETA) is measured from here.
                    entry.update(phase_started=time.time(), phase_first_step=event.step)
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
        """The job's latest progress, with `eta_s` (seconds left in the current phase) once a step was timed."""
        with self._lock:
            entry = self._latest.get(job_id)
            return {**entry, "eta_s": phase_eta(entry)} if entry else None

    def clear(self, job_id: str) -> None:
        with self._lock:
            self._latest.pop(job_id, None)


def phase_eta(entry: dict[str, Any]) -> float | None:
    """Seconds left in the current phase at its mean step time so far; None before a step is timed.

    Measured from the phase's first report, so a model load before step 1 does not count as a step.
    """
    step, total = entry.get("step", 0), entry.get("total", 0)
    done = step - entry.get("phase_first_step", step)
    if not total or done <= 0 or "phase_started" not in entry:
        return None
    per_step = (entry["updated"] - entry["phase_started"]) / done
    return round(max(0.0, per_step * (total - step)), 1)


class Executor(threading.Thread):
    """Runs jobs until `stop` is set; a job interrupted by the stop goes back to the queue."""

    def __init__(
        self,
        settings: Settings,
        store_path: Path,
        lane_source: LaneSource,
        board: ProgressBoard,
        stop: threading.Event,
        lane: Lane | None = None,
        occupancy: LaneOccupancy | None = None,
    ) -> None:
        self.lane = lane or Lane(0, "", None)
        self.occupancy = occupancy or LaneOccupancy(1, lane_width(self.lane))
        super().__init__(name=f"executor-{self.lane.device or self.lane.index}", daemon=True)
        self.settings, self.store_path, self.board, self.stop = settings, store_path, board, stop
        self.lane_source = lane_source
        # The next queued job's first worker, started while the current job's last stage runs.
        self.next_worker: SpawnedWorker | None = None
        self.stale_check_at = 0.0  #: when drop_stale_prestart looks at the next job's state again
        self.peaks = MeasuredPeaks()  #: the GPU peaks of this lane's jobs, which "auto" overlap plans with

    def run(self) -> None:
        store = JobStore(self.store_path, self.settings.jobs_dir)
        link = self.lane_source.link(self.lane)
        overlapped: OverlappedLane | None = None
        try:
            while not self.stop.is_set():
                if overlapped is None and self.may_overlap():
                    overlapped = self.overlapped_lane(store, link)
                jobs = self.claim(store)
                if not jobs:
                    # The job a worker was prestarted for went to another lane (or was cancelled).
                    discard_worker(self.next_worker, link)
                    self.next_worker = None
                    if overlapped is not None and overlapped.decoded:
                        self.log_results(overlapped.collect())
                    self.stop.wait(IDLE_POLL_S)
                    continue
                try:
                    fault_point("executor.claimed")
                    if overlapped is not None:
                        self.log_results(overlapped.run_wave(jobs))
                    elif len(jobs) == 1:
                        self.run_one(store, link, jobs[0])
                    else:
                        self.run_group(store, link, jobs)
                finally:
                    self.occupancy.release(self.lane.index)
                    self.peaks.add(jobs)
        finally:
            if overlapped is not None:  # the last claim's decoders (stopped by the stop, if it is set)
                self.log_results(overlapped.close())
                overlapped.links["decoders"].close()
            discard_worker(self.next_worker, link)
            link.close()
            store.close()

    def may_overlap(self) -> bool:
        """Whether this lane's claims go on overlapped (orchestrator.run.stage_overlap): `overlap_stages`
        "on", or "auto" once the jobs run here measured GPU peaks that fit its GPU together. Never a
        farm's lane (one slot of a GPU resource, whose second task would only queue behind the first).
        Until then each claim runs stage-major, its next stages' workers started ahead."""
        if not isinstance(self.lane_source, LocalLanes):
            return False
        return self.settings.overlap_stages == "on" or (self.settings.overlap_stages == "auto" and self.peaks.fit())

    def overlapped_lane(self, store: JobStore, link: WorkerLink) -> OverlappedLane:
        """This lane's diffusion beside its decoders, from the next claim on.

        Each claim is a wave: its diffusion runs on this thread, its decoders on the lane's decoder
        thread, beside the next claim's diffusion when the plan allows. The decoder thread has its own
        worker link and its own store connection (sqlite's and ZeroMQ's objects stay on one thread), and
        its jobs' hooks neither start nor stop the next job's worker, which this thread's link owns."""
        log.info("lane %s: the next jobs' diffusion runs beside the last jobs' decoders", self.lane.index)
        decoder_link = self.lane_source.link(self.lane, role="decoders")

        def run_part(
            jobs: list[JobDir], settings: Settings, part_link: WorkerLink, hooks_for: HooksFor, part: tuple[Stage, ...]
        ) -> dict[str, Path | JobStopped]:
            if part[0] is not STAGE_ORDER[0]:
                return self.decode_part(jobs, part_link, hooks_for, part)
            prestarted, self.next_worker = self.next_worker, None  # started for the first queued job
            if len(jobs) > 1:
                discard_worker(prestarted, part_link)
                prestarted = None
            started = prestarted

            def diffuse() -> dict[str, Path | JobStopped]:
                return run_stage_major(jobs, settings, part_link, hooks_for, started, stages=part)

            return self.guarded(jobs, diffuse)

        return OverlappedLane(
            self.settings,
            link,
            decoder_link,
            lambda job: self.hooks(store, link, job),
            run_part,
            decoder_hooks_for=lambda job: self.hooks(None, None, job),
            peaks=self.peaks,
        )

    def decode_part(
        self, jobs: list[JobDir], link: WorkerLink, hooks_for: HooksFor, part: tuple[Stage, ...]
    ) -> dict[str, Path | JobStopped]:
        """A claim's decoders on the decoder thread, whose job transitions go through its own store connection."""
        store = JobStore(self.store_path, self.settings.jobs_dir)
        try:
            for job in jobs:
                job.mirror = store.mirror
            return self.guarded(jobs, lambda: run_stage_major(jobs, self.settings, link, hooks_for, stages=part))
        finally:
            store.close()

    def guarded(
        self, jobs: list[JobDir], run: Callable[[], dict[str, Path | JobStopped]]
    ) -> dict[str, Path | JobStopped]:
        """`run`'s results; an orchestration error fails its jobs instead of taking the executor down."""
        try:
            return run()
        except Exception as exc:
            ids = ", ".join(job.id for job in jobs)
            log.exception("jobs %s: orchestration error", ids)
            for job in jobs:
                internal_error(job, f"orchestration error: {exc}")
            return {}

    def log_results(self, results: dict[str, Path | JobStopped]) -> None:
        for job_id, result in results.items():
            if isinstance(result, JobStopped):
                log.info("job %s: %s: %s", job_id, result.job_state.value, result)
            else:
                log.info("job %s: done -> %s", job_id, result)
            self.board.clear(job_id)

    def claim(self, store: JobStore) -> list[JobDir]:
        """Take the oldest queued job, and the jobs queued right behind it that use the same model
        (up to `group_size` and this lane's share of the queue among the lanes free to take work,
        never out of order), moving each to RUNNING; the lane counts as busy until its run ends
        (`run` releases it). A job another lane claimed first is passed over."""
        with self.occupancy.claiming(self.lane.index) as free_lanes:
            claimed = self._claim(store, free_lanes)
            if claimed:
                self.occupancy.mark_busy(self.lane.index)
        return claimed

    def _claim(self, store: JobStore, free_lanes: int) -> list[JobDir]:
        claimed: list[JobDir] = []
        rows = store.queued(self.settings.group_size * self.occupancy.lanes)
        share = min(self.settings.group_size, max(1, math.ceil(len(rows) / free_lanes)))
        for row in rows:
            if len(claimed) >= share:
                break
            try:
                job = JobDir.load(Path(row["job_dir"]), mirror=store.mirror)
            except (OSError, ValueError, KeyError) as exc:
                if claimed:
                    break
                store.mark_unreadable(row["id"], f"job.json unreadable: {exc}")
                continue
            if not job.in_daemon_queue:  # `ltx2 resume` took it to run in its own process
                store.forget(job.id)
                continue
            if claimed and claim_key(job) != claim_key(claimed[0]):
                break
            if not runs_here(self.lane, self.occupancy.widest, job.spec.context_parallel):
                if claimed:
                    break
                continue  # a wider lane's job (context parallel): left queued for it
            try:
                job.transition(JobState.RUNNING)
            except TransitionError:
                if job.state is JobState.RUNNING and not claimed:  # another lane's now; it mirrors it
                    continue
                if job.state is not JobState.RUNNING:  # cancelled meanwhile; its row was mirrored then
                    store.mirror(job)
                break
            claimed.append(job)
        return claimed

    def run_one(self, store: JobStore, link: WorkerLink, job: JobDir) -> None:
        log.info("job %s: running", job.id)
        prestarted, self.next_worker = self.next_worker, None
        try:
            output = run_job_stage_major(job, self.settings, link, self.hooks(store, link, job), prestarted)
            log.info("job %s: done -> %s", job.id, output)
        except JobStopped as exc:
            log.info("job %s: %s: %s", job.id, exc.job_state.value, exc)
        except Exception as exc:  # a job must never take the executor down with it
            log.exception("job %s: orchestration error", job.id)
            internal_error(job, f"orchestration error: {exc}")
        finally:
            self.board.clear(job.id)

    def run_group(self, store: JobStore, link: WorkerLink, jobs: list[JobDir]) -> None:
        """Run several claimed jobs stage-major; each ends through the policy (or fails here)."""
        discard_worker(self.next_worker, link)  # prestarted for a single job; the group starts its own
        self.next_worker = None
        ids = [job.id for job in jobs]
        log.info("jobs %s: running as one stage-major group", ", ".join(ids))
        hooks = {job.id: self.hooks(store, link, job) for job in jobs}
        try:
            results = run_stage_major(jobs, self.settings, link, lambda job: hooks[job.id])
        except Exception as exc:  # a group must never take the executor down with it
            log.exception("jobs %s: orchestration error", ", ".join(ids))
            for job in jobs:
                internal_error(job, f"orchestration error: {exc}")
            results = {}
        for job_id, result in results.items():
            if isinstance(result, JobStopped):
                log.info("job %s: %s: %s", job_id, result.job_state.value, result)
            else:
                log.info("job %s: done -> %s", job_id, result)
            self.board.clear(job_id)

    def drop_stale_prestart(self, store: JobStore, link: WorkerLink) -> None:
        """Stop the worker started ahead for the next queued job once that job is no longer queued
        here: another lane claimed it (it runs its own workers there) or it was cancelled. Checked
        at most every STALE_CHECK_S while this lane's current job runs, so the worker never waits
        for the end of that job."""
        worker = self.next_worker
        if worker is None or time.monotonic() < self.stale_check_at:
            return
        self.stale_check_at = time.monotonic() + STALE_CHECK_S
        row = store.get(worker.job_ids[0])
        if row is None or row["state"] != JobState.QUEUED:
            log.info("job %s left the queue; stopping the worker started ahead for it", worker.job_ids[0])
            discard_worker(worker, link)
            self.next_worker = None

    def prestart_next_job(self, store: JobStore, link: WorkerLink) -> None:
        """Start the next queued job's first worker so its imports overlap this job's last stage."""
        queued = store.queued(1)
        if not queued or self.next_worker is not None or not link.prestarts:
            return
        try:
            job = JobDir.load(Path(queued[0]["job_dir"]))
            stage = next((s for s in STAGE_ORDER if not job.has_outputs(s)), None)
            if stage is not None:
                self.next_worker = spawn_worker(
                    job, stage, *next_attempt(job, stage, self.settings), link, self.settings.heartbeat_s
                )
        except (OSError, ValueError) as exc:
            log.warning("could not prestart job %s: %s", queued[0]["id"], exc)

    def hooks(self, store: JobStore | None, link: WorkerLink | None, job: JobDir) -> JobHooks:
        """A job's hooks: progress to the board, stop requests, and (given this thread's `store` and
        `link`) the worker started ahead for the next queued job, kept or dropped as the queue moves."""
        job_id = job.id

        def on_attempt(stage: Stage, attempt: int, plan: dict[str, Any], outcome: StageOutcome) -> None:
            result = "ok" if outcome.ok else outcome.failure.value
            log.info("job %s: %s attempt %d (%s): %s %s", job_id, stage.value, attempt,
                     describe_plan(stage, plan), result, outcome.reason)  # fmt: skip

        def should_stop() -> Failure | None:
            if store is not None and link is not None:
                self.drop_stale_prestart(store, link)
            if self.stop.is_set():
                return Failure.INTERRUPTED
            return Failure.CANCELLED if job.cancel_requested else None

        def on_last_stage() -> None:
            if store is not None and link is not None:
                self.prestart_next_job(store, link)

        return JobHooks(
            listener=lambda event: self.board.update(job_id, event),
            should_stop=should_stop,
            on_attempt=on_attempt,
            on_last_stage=on_last_stage,
        )


def claim_key(job: JobDir) -> tuple[str, str, str]:
    """Jobs with equal keys may be claimed together: same model, revision and dtype, so some of
    their stages can share a worker. Which ones do is decided per stage by
    orchestrator.run.stage_major.group_key (plan and LoRAs too); a claimed job that shares
    nothing runs alone."""
    return (job.record.model_path, job.record.revision, job.spec.dtype)


def recover_interrupted(store: JobStore, jobs_dir: Path) -> list[str]:
    """After a daemon crash: stop orphaned workers and put RUNNING jobs back in the queue.

    Runs before the executor starts, on the job directories (the truth): each attempt a dead
    daemon left running names its worker's pid, which is killed if it still runs. The run ends
    through orchestrator.run.job_end like any other: QUEUED to resume at its first unfinished stage,
    or CANCELLED when a person was answered "cancelling" before the daemon died. Only the daemon's
    own jobs: a job `ltx2 generate` (or batch, decode, resume) runs is that process's, alive or not.
    """
    recovered = []
    for job in read_job_dirs(jobs_dir):
        if job.state is not JobState.RUNNING or not job.in_daemon_queue:
            continue
        job.mirror = store.mirror
        for pid in requeue_orphan(job, "the daemon stopped during this attempt"):
            kill_orphan(pid, str(job.path))
        if job.state is JobState.QUEUED:
            recovered.append(job.id)
    return recovered

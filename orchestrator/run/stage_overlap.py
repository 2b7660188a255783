"""Stage overlap on one lane: the next group diffuses while the last group's decoders run.

A lane's stages otherwise run one after another: while a group's video is decoded the GPU's tensor
cores idle, and while the next group diffuses its decoders wait (issue 28: at 1080p the decode is 18 %
of a clip). Here a lane's jobs go in waves of `group_size`: a wave's diffusion (one stage-major group
process) runs beside the previous wave's audio and video decoders (their group processes, over a
second WorkerLink of the same lane, so on the same device), so a long run costs about the longer of
the two per clip instead of their sum. At most one diffusion and one decoder process run at a time,
and a wave's decoders start only after its own diffusion ended.

Whether two stages may share the device is the plan's call (DESIGN.md rule 8): `[worker]
overlap_stages = "auto"` overlaps once this lane has measured a diffusion and a decoder peak on its GPU
and both fit the GPU's memory (which the workers report with their peaks) with OVERLAP_MARGIN to spare,
so the first wave's decoders run alone; on a CPU lane, where both sides would share the same cores and
nothing idles, it never overlaps. "on" always overlaps; "off" never does. The OOM ladder stays
the net: an attempt that fails for memory while the other side runs waits until the other side has
finished its wave (OverlapGate), then retries alone, and the rest of the run is not overlapped.
Nothing of a job is lost either way: each job still goes through stage_major's paths, which the
policy ends.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from config.settings import Settings
from orchestrator.placement.worker_link import WorkerLink
from orchestrator.run.job_end import JobStopped
from orchestrator.run.job_hooks import HooksFor, JobHooks
from orchestrator.run.jobdir import JobDir
from orchestrator.run.states import AttemptResult
from protocol.errors import Failure
from protocol.files import STAGE_ORDER, Stage

#: Share of the device's memory an overlap leaves free: allocator slack, and peaks that vary by clip.
OVERLAP_MARGIN = 0.10
DIFFUSION: tuple[Stage, ...] = STAGE_ORDER[:1]
DECODERS: tuple[Stage, ...] = STAGE_ORDER[1:]
#: Failures that say the device's memory ran short (the host's, for SIGKILL by the OOM killer).
MEMORY_FAILURES = frozenset({Failure.CUDA_OOM, Failure.HOST_OOM})
#: Runs stages for some jobs over a link; stage_major.run_stage_major with `stages` given.
StageRunner = Callable[[list[JobDir], Settings, WorkerLink, HooksFor, tuple[Stage, ...]], dict[str, Path | JobStopped]]


@dataclasses.dataclass
class MeasuredPeaks:
    """The highest peak of each side measured on this lane in this run, and the device's memory."""

    diffusion: int = 0
    decoders: int = 0
    device_memory: int = 0

    def add(self, jobs: list[JobDir]) -> None:
        """Take the GPU peaks of the jobs' successful attempts. Stages that used no GPU count for
        nothing: on the CPU the two sides would share the same cores, so "auto" never overlaps there."""
        for job in jobs:
            for stage in STAGE_ORDER:
                for attempt in job.stage_record(stage).attempts:
                    if attempt.result != AttemptResult.OK.value or not attempt.device_memory_bytes:
                        continue
                    peak = attempt.peak_gpu_bytes or 0
                    if not peak:
                        continue
                    if stage in DIFFUSION:
                        self.diffusion = max(self.diffusion, peak)
                    else:
                        self.decoders = max(self.decoders, peak)
                    self.device_memory = max(self.device_memory, attempt.device_memory_bytes)

    def fit(self) -> bool:
        """Both sides measured, and together they leave OVERLAP_MARGIN of the device free."""
        if not (self.diffusion and self.decoders and self.device_memory):
            return False
        return self.diffusion + self.decoders <= (1 - OVERLAP_MARGIN) * self.device_memory


class OverlapGate:
    """Which side of a lane is running a wave, so an attempt that ran out of memory can wait to run alone.

    Only a failure while the other side's wave runs counts against overlapping (`memory_failed`); one
    of a side running alone (the first wave's diffusion, say) is the OOM ladder's ordinary business and
    is retried at once. A side waiting to retry alone waits until the other side's wave ended; if both
    sides wait, the decoders go first (their worker is the smaller one, and diffusion's waiting worker
    already exited), so neither waits for the other forever. A stop request (`should_stop`) ends the wait at once.
    """

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.busy: set[str] = set()
        self.waiting: set[str] = set()
        self.memory_failed = False  #: an overlapped attempt ran out of memory: overlap no more in this run
        self.ended: dict[str, float] = {}  #: when each side's last wave ended (time.time())

    def running(self, side: str) -> _Running:
        return _Running(self, side)

    def wait_alone(self, side: str, should_stop: Callable[[], Failure | None], since: float | None = None) -> None:
        """Wait until `side` may retry alone; `since` is when its failed attempt started (time.time()),
        if known: the other side's wave that ended after it still ran beside the attempt."""
        other = "decoders" if side == "diffusion" else "diffusion"
        with self.condition:
            beside = other in self.busy or (since is not None and self.ended.get(other, 0.0) > since)
            if not beside:  # it failed alone: overlap had no part in it, and goes on
                return
            self.memory_failed = True
            self.waiting.add(side)
            try:
                while other in self.busy and not (side == "decoders" and other in self.waiting):
                    if should_stop() is not None:
                        return
                    self.condition.wait(timeout=0.5)
            finally:
                self.waiting.discard(side)
                self.condition.notify_all()


class _Running:
    """The context of one side's wave: marks the side busy in its gate while the wave runs."""

    def __init__(self, gate: OverlapGate, side: str) -> None:
        self.gate, self.side = gate, side

    def __enter__(self) -> None:
        with self.gate.condition:
            self.gate.busy.add(self.side)

    def __exit__(self, *exc_info: object) -> None:
        with self.gate.condition:
            self.gate.busy.discard(self.side)
            self.gate.ended[self.side] = time.time()
            self.gate.condition.notify_all()


def attempt_started(job: JobDir, stage: Stage) -> float | None:
    """When the job's last attempt of `stage` started (time.time()), if it was recorded."""
    attempts = job.stage_record(stage).attempts
    try:
        return dt.datetime.fromisoformat(attempts[-1].started).timestamp() if attempts else None
    except (TypeError, ValueError):
        return None


def overlapping(settings: Settings, jobs: list[JobDir]) -> bool:
    """Whether a lane's run of `jobs` goes in overlapped waves: more than one wave, overlap not off."""
    return settings.overlap_stages != "off" and len(jobs) > settings.group_size


class OverlappedLane:
    """One lane's diffusion and decoders, side by side: `run_wave` diffuses a wave (on the caller's
    thread) and hands it to the lane's decoder thread, first waiting for the wave before it to be
    decoded unless the plan lets the two overlap. `ltx2 batch` gives it its lane's waves; the daemon's
    executor gives it each claim of queued jobs. `run_stages` is stage_major's runner of part of the
    stages (the daemon's turns an orchestration error into the jobs' failure)."""

    def __init__(
        self,
        settings: Settings,
        diffusion_link: WorkerLink,
        decoder_link: WorkerLink,
        hooks_for: HooksFor,
        run_stages: StageRunner,
        decoder_hooks_for: HooksFor | None = None,
        peaks: MeasuredPeaks | None = None,
    ) -> None:
        self.settings, self.run_stages = settings, run_stages
        #: each side's hooks (the daemon's decoder thread gets hooks that leave the other thread's objects alone)
        self.hooks_for = {"diffusion": hooks_for, "decoders": decoder_hooks_for or hooks_for}
        self.links = {"diffusion": diffusion_link, "decoders": decoder_link}
        self.gate, self.peaks = OverlapGate(), peaks or MeasuredPeaks()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{threading.current_thread().name}-decoders")
        self.decoding: Future[dict[str, Path | JobStopped]] | None = None
        self.decoding_wave: list[JobDir] = []

    def hooks_of(self, side: str) -> HooksFor:
        """The caller's hooks, with a retry after a memory failure waiting until it can run alone."""

        def hooks(job: JobDir) -> JobHooks:
            own = self.hooks_for[side](job)

            def before_retry(stage: Stage, failure: Failure | None) -> None:
                own.before_retry(stage, failure)
                if failure in MEMORY_FAILURES:
                    self.gate.wait_alone(side, own.should_stop, attempt_started(job, stage))

            return dataclasses.replace(own, before_retry=before_retry)

        return hooks

    def overlap_now(self) -> bool:
        if self.gate.memory_failed or self.settings.overlap_stages == "off":
            return False
        return self.settings.overlap_stages == "on" or self.peaks.fit()

    def run_wave(self, wave: list[JobDir]) -> dict[str, Path | JobStopped]:
        """Diffuse `wave` and start its decoders; returns what ended meanwhile: the wave's jobs that ended
        in diffusion, and every job of the wave decoded before it (each one's MP4 path or failure)."""
        results: dict[str, Path | JobStopped] = {}
        if not self.overlap_now():
            results.update(self.collect())
        with self.gate.running("diffusion"):
            stopped = self.run_stages(
                wave, self.settings, self.links["diffusion"], self.hooks_of("diffusion"), DIFFUSION
            )
        results.update(stopped)
        self.peaks.add(wave)
        results.update(self.collect())
        self.decoding_wave = [job for job in wave if job.id not in stopped]
        if self.decoding_wave:
            self.decoding = self.pool.submit(self.decode, self.decoding_wave)
        return results

    def decode(self, wave: list[JobDir]) -> dict[str, Path | JobStopped]:
        with self.gate.running("decoders"):
            return self.run_stages(wave, self.settings, self.links["decoders"], self.hooks_of("decoders"), DECODERS)

    @property
    def decoded(self) -> bool:
        """Whether no wave is being decoded (so `collect` returns at once)."""
        return self.decoding is None or self.decoding.done()

    def collect(self) -> dict[str, Path | JobStopped]:
        """Wait for the wave being decoded, if any; its jobs' MP4 paths or failures."""
        if self.decoding is None:
            return {}
        decoding, self.decoding = self.decoding, None
        results = decoding.result()
        self.peaks.add(self.decoding_wave)
        return results

    def close(self) -> dict[str, Path | JobStopped]:
        """Finish the last wave's decoders and stop the decoder thread."""
        try:
            return self.collect()
        finally:
            self.pool.shutdown(wait=True)


def run_overlapped(
    jobs: list[JobDir],
    settings: Settings,
    diffusion_link: WorkerLink,
    decoder_link: WorkerLink,
    hooks_for: HooksFor,
    run_stages: StageRunner,
) -> dict[str, Path | JobStopped]:
    """Run every job to its published MP4 in waves of `group_size`, each wave's diffusion beside the
    previous wave's decoders when the plan allows; returns each job's MP4 path or failure, as
    stage_major.run_stage_major does."""
    lane = OverlappedLane(settings, diffusion_link, decoder_link, hooks_for, run_stages)
    results: dict[str, Path | JobStopped] = {}
    try:
        for start in range(0, len(jobs), settings.group_size):
            results.update(lane.run_wave(jobs[start : start + settings.group_size]))
    finally:  # the last wave's decoders, or those beside an orchestration error
        results.update(lane.close())
    return results

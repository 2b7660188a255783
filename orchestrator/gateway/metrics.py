"""`GET /metrics`: Prometheus text made at scrape time from the daemon's own listing.

Job counts and the queue depth are read from the daemon at each scrape (the daemon is the truth;
the gateway caches nothing). Stage seconds and memory peaks come from the attempts of jobs this
gateway saw end, so they start empty when the gateway starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from orchestrator.run.states import JobState
from protocol import jobs
from protocol.job_record import DAEMON_OWNER

JOB_STATES = tuple(state.value for state in JobState)
# The daemon lists at most this many jobs; counts cover the newest ones.
LISTED_JOBS = 1000
STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600)


class DaemonJobsCollector:
    """Jobs by state and the queue depth, asked of the daemon when Prometheus scrapes."""

    def __init__(self, request: Callable[[Any], dict[str, Any]]) -> None:
        self.request = request

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ltx2_daemon_up", "1 if the daemon answered this scrape")
        try:
            listed = self.request(jobs.ListJobs("", LISTED_JOBS))["jobs"]
        except Exception:  # a scrape must answer even while the daemon is down
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        by_state = GaugeMetricFamily(
            "ltx2_jobs", f"jobs by state among the daemon's newest {LISTED_JOBS}", labels=["state"]
        )
        for state in JOB_STATES:
            by_state.add_metric([state], sum(1 for job in listed if job["state"] == state))
        yield by_state
        depth = GaugeMetricFamily("ltx2_queue_depth", "jobs waiting for a lane")
        # A queued job of another owner (an interrupted `ltx2 generate`) is listed, but waits for no lane.
        waiting = [job for job in listed if job.get("owner", DAEMON_OWNER) == DAEMON_OWNER]
        depth.add_metric([], sum(1 for job in waiting if job["state"] == JobState.QUEUED))
        yield depth


class GatewayMetrics:
    """The gateway's registry: the daemon's job counts and the stage seconds of jobs seen ending."""

    def __init__(self, request: Callable[[Any], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(DaemonJobsCollector(request))
        self.stage_seconds = Histogram(
            "ltx2_stage_seconds",
            "seconds of each stage attempt of the jobs this gateway saw end",
            ["stage", "result"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )

        # The highest memory a stage's process reached, over the jobs seen ending: what to size a
        # GPU (or a unified-memory box) for; workers report both peaks with each Done.
        self.peak_gpu = Gauge(
            "ltx2_stage_peak_gpu_bytes", "highest GPU memory of a stage attempt seen ending", ["stage"],
            registry=self.registry,
        )  # fmt: skip
        self.peak_rss = Gauge(
            "ltx2_stage_peak_rss_bytes", "highest resident memory of a stage attempt seen ending", ["stage"],
            registry=self.registry,
        )  # fmt: skip
        self.peaks: dict[tuple[str, str], int] = {}

    def observe_attempts(self, attempts: list[dict[str, Any]]) -> None:
        for attempt in attempts:
            self.stage_seconds.labels(attempt["stage"], attempt["result"]).observe(float(attempt["seconds"]))
            for kind, gauge in (("peak_gpu_bytes", self.peak_gpu), ("peak_rss_bytes", self.peak_rss)):
                key = (attempt["stage"], kind)
                self.peaks[key] = max(self.peaks.get(key, 0), int(attempt.get(kind) or 0))
                gauge.labels(attempt["stage"]).set(self.peaks[key])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

"""Stage-major scheduling: each stage runs once for a group of jobs, so each model loads once.

A batch (or several queued daemon jobs) goes stage by stage. Jobs whose next stage can share one
set of loaded weights (same model, revision, dtype, memory plan and, for diffusion, the same
fused LoRAs) run that stage in one worker process started with `--job-dir` repeated; it loads
the models once and writes each job's outputs into that job's directory, reporting each job's
start, progress and end on its own. Still one process per stage: the group processes run one
after another, and each exits before the next stage's process starts.

A job the group process did not finish (it crashed, ran out of memory or was killed) is given to
the policy with that attempt (orchestrator.run.job_end.after_failed_attempt); if it may try again it runs the stage
on its own through the ordinary path (orchestrator.run.pipeline); jobs it never reached form a new
group. The worker is followed by the same code as a single job's (orchestrator.run.stage_attempt).
Finished outputs are never redone, and a group never does worse than one process per clip.

This is the only scheduler: `run_job_stage_major` (`ltx2 generate`, `decode`, the daemon's lone
jobs) is a stage-major run of one job, which also starts its next stage's worker while a stage runs.

With several lanes (orchestrator.placement.lanes), `run_across_lanes` splits the jobs into one contiguous
run per lane, in order, and runs each stage-major in its own thread over its own WorkerLink: the
lanes work at the same time, each one stage process at a time, and a job stays on its lane.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.placement.lane_links import LaneSource, LocalLanes
from orchestrator.placement.lanes import Lane, split_for_lanes
from orchestrator.placement.worker_link import SpawnedWorker, WorkerLink, discard_worker
from orchestrator.run.job_end import JobStopped, after_failed_attempt, take_job
from orchestrator.run.job_hooks import HooksFor, JobHooks
from orchestrator.run.jobdir import JobDir
from orchestrator.run.pipeline import finish_job, next_attempt, pending_stages, run_stage_until_done
from orchestrator.run.policy import Attempt
from orchestrator.run.runner import StageOutcome
from orchestrator.run.stage_attempt import STOPS, run_attempt
from orchestrator.run.stage_overlap import overlapping, run_overlapped
from orchestrator.run.states import JobState
from protocol.files import STAGE_ORDER, Stage


def group_key(job: JobDir, stage: Stage, plan: dict[str, Any]) -> str:
    """Jobs with equal keys can share one worker process for `stage`: same weights, same placement.

    LoRAs count only for diffusion, where they are fused into the transformer; the decoders
    never see them. So does a dev two-stage run's stage-2 LoRA: its group switches once to the
    transformer with it fused (services/two_stage.py), which other jobs would have to switch back from.
    The daemon claims queued jobs together by a coarser key (model, revision, dtype: claim_key in
    orchestrator/daemon/executor.py); this one decides which of them share a worker, stage by stage.
    """
    diffusion = stage is Stage.ENCODE_DIFFUSE
    loras = [lora.to_json() for lora in job.record.loras] if diffusion else []
    stage2_lora = job.record.stage2_lora if diffusion else None
    fields = [job.record.model_path, job.record.revision, job.spec.dtype, plan, loras]
    if stage2_lora is not None:  # left out otherwise, so other jobs' keys stay as they were
        fields.append(stage2_lora.to_json())
    return json.dumps(fields, sort_keys=True)


def form_groups(jobs: list[JobDir], stage: Stage, settings: Settings) -> list[tuple[dict[str, Any], list[JobDir]]]:
    """(plan, members) of each group of two or more jobs, in the jobs' order, at most
    `settings.group_size` members each; a job that shares nothing runs the ordinary way."""
    by_key: dict[str, tuple[dict[str, Any], list[JobDir]]] = {}
    for job in jobs:
        _, plan = next_attempt(job, stage, settings)
        by_key.setdefault(group_key(job, stage, plan), (plan, []))[1].append(job)
    groups = []
    for plan, members in by_key.values():
        for start in range(0, len(members), settings.group_size):
            chunk = members[start : start + settings.group_size]
            if len(chunk) > 1:
                groups.append((plan, chunk))
    return groups


def diffusion_processes(jobs: list[JobDir], settings: Settings) -> int:
    """How many encode_diffuse processes a stage-major run of `jobs` starts (one per group or lone
    job, if nothing fails); each loads the text encoder for its prompts not yet cached."""
    stage = Stage.ENCODE_DIFFUSE
    keys = Counter(group_key(job, stage, next_attempt(job, stage, settings)[1]) for job in jobs)
    return sum(math.ceil(count / settings.group_size) for count in keys.values())


def run_job_stage_major(
    job: JobDir,
    settings: Settings,
    link: WorkerLink,
    hooks: JobHooks,
    prestarted: SpawnedWorker | None = None,
    target: Path | None = None,
) -> Path:
    """Run one job to its published MP4 (at `target` if given): a stage-major run of one job.
    Raises JobStopped when the policy ends it otherwise."""
    result = run_stage_major([job], settings, link, lambda _: hooks, prestarted, target)[job.id]
    if isinstance(result, JobStopped):
        raise result
    return result


def run_stage_major(
    jobs: list[JobDir],
    settings: Settings,
    link: WorkerLink,
    hooks_for: HooksFor,
    prestarted: SpawnedWorker | None = None,
    target: Path | None = None,
    stages: tuple[Stage, ...] = STAGE_ORDER,
) -> dict[str, Path | JobStopped]:
    """Run every job to its published MP4, stage by stage; returns each job's MP4 path or failure.

    `stages`, a run of consecutive stages, limits it to part of the way (orchestrator.run.stage_overlap
    runs diffusion and the decoders of different groups at the same time): jobs are taken and their
    pending stages reported only by the part that begins with the first stage, published only by the
    part that ends with the last; a job that got through its part is not in the result.

    Each job resumes at its first stage whose outputs do not verify. A group member that failed
    is given to the policy with that attempt; if it may try again, it runs the stage on its own.
    A single job has its next stage's worker started while a stage runs (imports done, waiting
    for GO: DESIGN.md rule 5); `prestarted` is such a worker for its first stage, started during
    the job before. Each job's last stage tells its hooks (`on_last_stage`) as it begins.
    """
    results: dict[str, Path | JobStopped] = {}
    if stages[0] is STAGE_ORDER[0]:
        begin_jobs(jobs, hooks_for)
    handed = {jobs[0].id: prestarted} if prestarted is not None else {}
    active = list(jobs)
    try:
        for index, stage in enumerate(STAGE_ORDER):
            if stage not in stages:
                continue
            following = STAGE_ORDER[index + 1] if len(jobs) == 1 and index + 1 < len(STAGE_ORDER) else None
            following = following if following in stages else None
            needing = [job for job in active if not job.has_outputs(stage)]
            if index == len(STAGE_ORDER) - 1:
                for job in needing:
                    hooks_for(job).on_last_stage()
            failed_in_group = run_groups(needing, stage, settings, link, hooks_for)
            for job in needing:
                worker, failed = handed.pop(job.id, None), failed_in_group.get(job.id)
                try:
                    next_worker = run_outside_group(
                        job, stage, failed, settings, link, hooks_for(job), worker, following
                    )
                except JobStopped as exc:
                    results[job.id] = exc
                    continue
                if next_worker is not None:
                    handed[job.id] = next_worker
            active = [job for job in active if job.id not in results]
        if stages[-1] is STAGE_ORDER[-1]:
            results.update(publish_jobs(active, settings, hooks_for, target))
    finally:
        for worker in handed.values():
            discard_worker(worker, link)
        # Every job of the run has ended (done, failed, cancelled or interrupted): none of its
        # workers may go on waiting for a GO, whichever path it ended by.
        link.stop_workers_of([job.id for job in jobs])
    return results


def begin_jobs(jobs: list[JobDir], hooks_for: HooksFor) -> None:
    """Take each job (unless the daemon's executor did) and report the stages it skips."""
    for job in jobs:
        if job.state is not JobState.RUNNING:  # the daemon's executor claimed them already
            take_job(job)
        pending_stages(job, hooks_for(job))


def publish_jobs(
    jobs: list[JobDir], settings: Settings, hooks_for: HooksFor, target: Path | None
) -> dict[str, Path | JobStopped]:
    """Publish every job whose stages all succeeded; each one's MP4 path, or why it ended otherwise."""
    results: dict[str, Path | JobStopped] = {}
    for job in jobs:
        try:
            results[job.id] = finish_job(job, settings, hooks_for(job), target)
        except JobStopped as exc:  # publishing failed or a late cancel: the other clips still publish
            results[job.id] = exc
    return results


def run_across_lanes(
    jobs: list[JobDir], settings: Settings, source: LaneSource, hooks_for: HooksFor
) -> dict[str, Path | JobStopped]:
    """Run every job to its published MP4 on the lanes of `source`: one contiguous run of the jobs
    per lane, each a stage-major run in its own thread (its own WorkerLink, and locally its own
    fork server); returns each job's MP4 path or failure. `hooks_for` is called from every lane's
    thread.

    An error of the orchestration itself (not a job's failure) in any lane is raised here once
    every lane has ended; the other lanes finish their jobs first.
    """
    lanes = source.lanes
    runs = split_for_lanes(jobs, len(lanes))
    results: dict[str, Path | JobStopped] = {}
    errors: list[BaseException] = []

    def run_lane(lane: Lane, lane_jobs: list[JobDir]) -> None:
        link = source.link(lane)
        # Locally a lane's decoders may run beside its diffusion (orchestrator.run.stage_overlap); a farm's
        # lane is one slot of a GPU resource, whose second task would only queue behind the first.
        overlapped = isinstance(source, LocalLanes) and overlapping(settings, lane_jobs)
        decoder_link = source.link(lane, role="decoders") if overlapped else None
        try:
            if decoder_link is not None:
                results.update(run_overlapped(lane_jobs, settings, link, decoder_link, hooks_for, run_part))
            else:
                results.update(run_stage_major(lane_jobs, settings, link, hooks_for))
        except BaseException as exc:  # re-raised by the caller's thread below
            errors.append(exc)
        finally:
            link.close()
            if decoder_link is not None:
                decoder_link.close()

    threads = [
        threading.Thread(target=run_lane, args=(lane, lane_jobs), name=f"lane-{lane.device or lane.index}")
        for lane, lane_jobs in zip(lanes, runs, strict=False)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def run_part(
    jobs: list[JobDir], settings: Settings, link: WorkerLink, hooks_for: HooksFor, stages: tuple[Stage, ...]
) -> dict[str, Path | JobStopped]:
    """`stages` of a stage-major run of `jobs` (the parts orchestrator.run.stage_overlap runs side by side)."""
    return run_stage_major(jobs, settings, link, hooks_for, stages=stages)


def run_outside_group(
    job: JobDir,
    stage: Stage,
    failed: tuple[Attempt, StageOutcome] | None,
    settings: Settings,
    link: WorkerLink,
    hooks: JobHooks,
    worker: SpawnedWorker | None,
    following: Stage | None,
) -> SpawnedWorker | None:
    """A job's stage after the groups ran: nothing if a group did it, the policy's decision if its
    group attempt `failed`, else the stage alone (adopting `worker`, prestarting `following`).
    Returns the next stage's prestarted worker, if one was started."""
    if failed is not None or job.has_outputs(stage):
        discard_worker(worker, link)
        if failed is not None:
            run_after_group(job, stage, failed, settings, link, hooks)
        return None
    return run_stage_until_done(job, stage, settings, link, hooks, worker, following)


def run_after_group(
    job: JobDir,
    stage: Stage,
    failed: tuple[Attempt, StageOutcome],
    settings: Settings,
    link: WorkerLink,
    hooks: JobHooks,
) -> None:
    """The policy's decision for a member whose group attempt failed: end the job (JobStopped),
    or run the stage alone from the plan it chose."""
    attempt, outcome = failed
    after_failed_attempt(job, stage, [attempt], outcome, settings)
    hooks.before_retry(stage, outcome.failure)
    run_stage_until_done(job, stage, settings, link, hooks, history=(attempt,))


def run_groups(
    jobs: list[JobDir], stage: Stage, settings: Settings, link: WorkerLink, hooks_for: HooksFor
) -> dict[str, tuple[Attempt, StageOutcome]]:
    """Run `stage` for `jobs` in group processes until no two unfinished, untried jobs can share
    one; returns the members whose group attempt failed, with that attempt. The rest either have
    their outputs now or are left for the ordinary per-job path."""
    failed: dict[str, tuple[Attempt, StageOutcome]] = {}
    tried: set[str] = set()
    while groups := form_groups([j for j in jobs if j.id not in tried and not j.has_outputs(stage)], stage, settings):
        for plan, members in groups:
            if any(hooks_for(job).should_stop() for job in members):
                return failed  # each member meets its stop request on the ordinary path
            outcomes = run_attempt(members, stage, plan, settings, link, hooks_for)
            tried.update(outcomes)
            failed.update(
                (job_id, (Attempt(plan, outcome.failure), outcome))
                for job_id, outcome in outcomes.items()
                if not outcome.ok
            )
        if any(outcome.failure in STOPS for _, outcome in failed.values()):
            break  # the rest run (and see the cancellation or the stop) the ordinary way
    return failed

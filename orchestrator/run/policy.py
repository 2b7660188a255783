"""The retry policy: after a failed attempt, which plan runs next, or how the job ends.

`decide` answers it after a failed stage attempt, `decide_run_end` when a run ends without one (a
publish that failed, an internal error, an orchestrator found gone); orchestrator.run.job_end carries
out both (DESIGN.md rule 7). After an attempt: a cancelled attempt ends the job CANCELLED; an
interrupted one (the orchestrator is stopping: SIGTERM, Ctrl-C) puts it back to QUEUED, to resume at
its next start; invalid input and missing models are never retried; a full disk (no space) ends the
job naming the path and never lowers the plan; a CUDA OOM moves straight to the next lower-memory
plan; the first host-OOM kill, crash or hang of a stage retries the same plan (a SIGKILL may come from
another process's memory pressure or a person, and a deterministic run repeats bit for bit); later
ones move down the ladder. The ladders are data:

- encode_diffuse: native weights -> fp8 weight storage -> fp8 + sequential offload (a user's
  --fp8 / --sequential-offload start further down; --fp8-matmul starts with FP8 weights and
  steps down to offloading them; --compile is dropped below the first rung)
- audio_decode:   on the accelerator -> on the CPU (the audio decoder is small)
- video_decode:   single pass -> spatial tiling -> temporal pieces of 11 -> 8 -> 4 latent frames
"""

from __future__ import annotations

import dataclasses
from typing import Any

from config.settings import Settings
from orchestrator.run.decode_plan import choose_decode_plan, next_decode_plan
from orchestrator.run.states import JobState
from protocol.errors import Failure
from protocol.files import Stage
from protocol.plans import DecodePlan
from protocol.spec import JobSpec
from protocol.spec_rules import TWO_STAGE

AUDIO_LADDER: tuple[dict[str, str], ...] = ({"device": "auto"}, {"device": "cpu"})
# x264's output depends on its thread count, which it otherwise takes from the cores it may run on
# (the same frames gave five different files for 1, 2, 4, 8 and 16 threads): a fixed count makes the MP4
# the same on every host and lane. 24 is what x264 picks by itself on a 16-core host (1.5 per core), the
# lent H100/H200 machines: 16 there cost 0.09 s of video stage per 768x512x121 clip (docs/benchmarks.md,
# version 11). It caps the count further for small frames, identically everywhere.
X264_THREADS = 24
# Plan keys of the one-pass kernels (services/fp8_rows.py, services/qk_norm_rope.py): dropped on the offload rung.
ONE_PASS_KERNELS = frozenset({"fp8_gelu", "qk_norm_rope"})
# Plan keys of a compiled stage (the blocks', the decoder's): dropped with "compile" below the top rung.
COMPILE_KEYS = frozenset({"compile", "deterministic", "row_reductions"})
# Failures that may not recur with the same plan.
TRANSIENT = frozenset({Failure.HOST_OOM, Failure.CRASH, Failure.HUNG})


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What the policy needs to know about one finished attempt."""

    plan: dict[str, Any]
    failure: Failure | None


def initial_plan(stage: Stage, spec: JobSpec, settings: Settings, deterministic: bool | None = None) -> dict[str, Any]:
    """The first plan of a stage: the best quality that the user's flags and the size allow.

    `deterministic` is the job's (recorded at its creation; None: the settings'): when on, a compiled
    transformer runs Inductor's deterministic mode and x264 a fixed number of threads (DESIGN.md rule 6).
    Being part of the plan, it keeps jobs that differ in it out of one group process.
    """
    deterministic = settings.deterministic if deterministic is None else deterministic
    if stage is Stage.VIDEO_DECODE:
        plan = choose_decode_plan(
            spec.width, spec.height, spec.num_frames, settings.decode, spec.vae_chunk_frames, spec.vae_tiling
        )
        decode = {"decode": plan.to_dict(), "x264_preset": settings.decode.x264_preset}
        if spec.compile_decoder:  # the VAE's decoder compiled, Inductor's deterministic mode with it (as the blocks')
            decode.update({"compile": "decoder", **({"deterministic": True} if deterministic else {})})
        if spec.context_parallel > 1:  # the pieces over the lane's N devices too (protocol.plans.parallel_piece_ranges)
            decode["context_parallel"] = spec.context_parallel
        return {**decode, "x264_threads": X264_THREADS} if deterministic else decode
    if stage is Stage.AUDIO_DECODE:
        return dict(AUDIO_LADDER[0])
    weights = "fp8-matmul" if spec.fp8_matmul else "fp8" if spec.fp8 else "native"
    plan = {"weights": weights, "offload": "sequential" if spec.sequential_offload else "none"}
    if spec.fp8_matmul:
        plan["fp8_accumulation"] = "fast" if settings.fp8_fast_accumulation else "exact"
        # Absent when off (the plans and keys of such jobs stay as they were) and under sequential offload, whose
        # per-layer hooks the one-pass feed-forward would bypass (lower_plan drops it on that rung too).
        if settings.fp8_gelu_kernel and not spec.sequential_offload:
            plan["fp8_gelu"] = "kernel"
    if spec.fp8_attention:
        plan["attention"] = "fp8"
        # Absent when off, and under sequential offload (the kernel reads the norms' weights past their hooks).
        if settings.qk_norm_rope_kernel and not spec.sequential_offload:
            plan["qk_norm_rope"] = "kernel"
    if spec.context_parallel > 1:  # N processes for the stage (orchestrator.placement.worker_gang), on every rung
        plan["context_parallel"] = spec.context_parallel
        plan["context_parallel_mode"] = context_parallel_mode(spec)
    if spec.compile and not spec.fp8 and not spec.sequential_offload:
        plan["compile"] = "regional"
        if deterministic:
            plan["deterministic"] = True
        if settings.whole_row_reductions:  # services/whole_row_reductions.py; absent when off, as the kernels' keys
            plan["row_reductions"] = "whole"
    return plan


def context_parallel_mode(spec: JobSpec) -> str:
    """How a context-parallel diffusion shares its work: "cfg" (services/cfg_parallel.py: each of two processes runs
    one of the guidance batch's two rows, one all-gather per call) for a guided one-stage run of two processes,
    where every step's main call is that batch; else "ulysses" (services/context_parallel.py: the tokens and
    heads shared, all-to-alls in every attention layer), which also shares two-stage's unguided stage 2, an
    unguided (distilled or NAG) run's batch of one, and four or eight processes."""
    cfg = spec.context_parallel == 2 and spec.uses_cfg and spec.pipeline != TWO_STAGE
    return "cfg" if cfg else "ulysses"


def lower_plan(stage: Stage, plan: dict[str, Any], spec: JobSpec, settings: Settings) -> dict[str, Any] | None:
    """The next rung below `plan` on the stage's ladder, or None at the bottom."""
    if stage is Stage.VIDEO_DECODE:
        lower = next_decode_plan(DecodePlan.from_dict(plan["decode"]), spec.latent_frames, settings.decode)
        eager = {key: value for key, value in plan.items() if key not in COMPILE_KEYS}
        return {**eager, "decode": lower.to_dict()} if lower else None
    if stage is Stage.AUDIO_DECODE:
        rung = AUDIO_LADDER.index(plan) if plan in AUDIO_LADDER else 0
        return dict(AUDIO_LADDER[rung + 1]) if rung + 1 < len(AUDIO_LADDER) else None
    # Eager below the top rung (Inductor's deterministic mode and its row reductions go with the compile).
    plan = {key: value for key, value in plan.items() if key not in COMPILE_KEYS}
    if plan.get("weights") not in ("fp8", "fp8-matmul"):
        return {**plan, "weights": "fp8"}
    if plan.get("offload") != "sequential":
        # The one-pass kernels read their weights past the offload's per-layer hooks: not on that rung.
        kept = {key: value for key, value in plan.items() if key not in ONE_PASS_KERNELS}
        return {**kept, "offload": "sequential"}
    return None


def next_plan(stage: Stage, attempts: list[Attempt], spec: JobSpec, settings: Settings) -> dict[str, Any] | None:
    """The plan of the next attempt after the last of `attempts` failed; None means give up."""
    last = attempts[-1]
    if last.failure is None or not last.failure.is_retryable or len(attempts) >= settings.max_attempts_per_stage:
        return None
    if last.failure in TRANSIENT and sum(a.failure in TRANSIENT for a in attempts) <= settings.same_plan_retries:
        return last.plan
    return lower_plan(stage, last.plan, spec, settings)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What follows a failed attempt: another attempt with `plan`, or the job ends in `job_state`
    (FAILED, CANCELLED, or QUEUED to resume later) with `reason` as its error."""

    plan: dict[str, Any] | None
    job_state: JobState | None = None
    reason: str = ""


def decide(stage: Stage, attempts: list[Attempt], reason: str, spec: JobSpec, settings: Settings) -> Decision:
    """The one retry-or-end decision after the last of `attempts` failed with `reason`."""
    failure = attempts[-1].failure
    if failure is Failure.CANCELLED:
        return Decision(None, JobState.CANCELLED, "cancelled on request")
    if failure is Failure.INTERRUPTED:
        return Decision(None, JobState.QUEUED, f"interrupted ({reason}); resumes at its first unfinished stage")
    if failure is Failure.NO_SPACE:  # a full disk: no plan uses less of it, so the job ends now
        return Decision(None, JobState.FAILED, f"{reason}; free space there, then resume the job")
    plan = next_plan(stage, attempts, spec, settings)
    if plan is not None:
        return Decision(plan)
    if failure is not None and failure.is_retryable:
        reason += f" (after {len(attempts)} attempt(s); no lower-memory plan left)"
    return Decision(None, JobState.FAILED, reason)


def decide_run_end(failure: Failure, reason: str, cancel_requested: bool = False) -> Decision:
    """How a run ends when no stage attempt is left to retry: a cancel before publishing, a publish
    that failed, the orchestrator breaking on the job (INTERNAL) or found gone (INTERRUPTED).

    Nothing here is retried: a failed publish leaves the video safe in the job (its reason says how to
    recover it), an internal error is a bug that would recur. An interrupted run resumes at its next
    start (QUEUED), unless a person had asked to cancel it, which is carried out now.
    """
    if failure is Failure.CANCELLED or (failure is Failure.INTERRUPTED and cancel_requested):
        return Decision(None, JobState.CANCELLED, "cancelled on request")
    if failure is Failure.INTERRUPTED:
        return Decision(None, JobState.QUEUED, f"interrupted ({reason}); resumes at its first unfinished stage")
    return Decision(None, JobState.FAILED, reason)


def describe_plan(stage: Stage, plan: dict[str, Any]) -> str:
    """A short human label for progress lines and `ltx2 status`."""
    if stage is Stage.VIDEO_DECODE:
        label = DecodePlan.from_dict(plan["decode"]).label
        return f"{label}, decoder compiled" if plan.get("compile") else label
    return ", ".join(f"{key} {value}" for key, value in sorted(plan.items()))

"""One staged run: the project's CLI (`python -m orchestrator.cli generate`) in a fresh process tree.

It exists to measure the pipeline as a user runs it: its own state and output folders, the fork
server on or off, a timeout that kills the CLI and every worker it left, and a check that nothing of
the run outlives the CLI. The per-stage numbers come from the job directory the orchestrator wrote
(events.log and job.json, read by event_timings), never from the worker logs' text; the logs'
tails are kept only for the failure report.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from event_timings import AttemptTiming, JobTiming, first_mark, progress_rows, read_events, read_job
from gpu_common import PROMPT, REPO, SEED, STEPS, log, size_label

from orchestrator.run.states import JobState


def worker_pids(job_root: Path) -> dict[int, str]:
    """pid -> command line of the processes of one staged run: exec'd workers name a job directory
    under `job_root` on their command line; the fork server and its forked workers (and the CLI)
    carry LTX2_STATE_DIR=`job_root` in their environment."""
    pids = {}
    marker = f"LTX2_STATE_DIR={job_root}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (str(job_root) in cmdline and "services." in cmdline) or marker in environ:
            pids[int(proc.name)] = cmdline.strip()
    return pids


def kill_pids(pids: dict[int, str]) -> None:
    """SIGKILL each pid (gone or not ours: ignored)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def phase_times(name: str, rows: list[tuple[float, str, int]], started: float | None, ended: float | None) -> dict:
    """Load, encode and step times of a stage from its progress events (the phases each stage reports)."""
    if name == "encode_diffuse":
        text_load, encode, load = (
            first_mark(rows, p) for p in ("load text encoder", "encode prompt", "load transformer")
        )
        step0, step1, last_step = (first_mark(rows, "denoise", step) for step in (0, 1, STEPS))
        write = first_mark(rows, "write latents")
        denoise = between(step0, write)
        steady = between(step1, last_step)
        return {
            "start_import_handshake_s": between(started, text_load or load),
            # Without an "encode prompt" phase, text_encode_s holds the text encoder's load too.
            "text_encoder_load_s": between(text_load, encode),
            "text_encode_s": between(encode or text_load, load),
            "transformer_load_s": between(load, step0),
            "denoise_s": denoise,
            "s_per_step": None if denoise is None else denoise / STEPS,
            "s_per_step_steady": None if steady is None else steady / (STEPS - 1),
            "first_step_s": between(step0, step1),
            "write_latents_and_exit_s": between(write, ended),
        }
    prefix = "load audio decoder" if name == "audio_decode" else "load video VAE"
    load = first_mark(rows, prefix)
    decode0 = first_mark(rows, "decode", 0)
    return {
        "until_load_s": between(started, load),
        "load_s": between(load, decode0),
        "decode_s": between(decode0, ended),
    }


def stage_entry(job: JobTiming, name: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    """One stage of the job: its last attempt's numbers, every attempt's outcome, the lead-in, and
    the phase times its progress events give."""
    stage = job.stages[name]
    last = stage.last or AttemptTiming(attempt=0)
    return {
        **phase_times(name, progress_rows(events, name), last.started, last.ended),
        "attempts": len(stage.attempts),
        "result": last.result,
        "reason": last.reason,
        "all_attempts": [
            {"attempt": a.attempt, "result": a.result, "reason": a.reason, "seconds": a.seconds} for a in stage.attempts
        ],
        "plan": last.plan,
        "seconds": last.seconds,
        "peak_gpu_bytes": last.peak_gpu_bytes,
        "peak_rss_bytes": last.peak_rss_bytes,
        "started": last.started,
        "finished": last.ended,
        "wall_s": last.wall_s,
        "lead_in_s": job.lead_in_s(name),
        "skipped": stage.skipped,
    }


def summarize_job(job_dir: Path, spawned: float, exited: float) -> dict[str, Any]:
    """The job's stages and marks from its events.log and job.json, against the CLI's spawn and exit.

    lead_in_s: from the job's creation (first stage) or the stage before's end to the stage's start
    (the orchestrator's own time between stages); publish_s: video_decode's end to job_done.
    """
    job = read_job(job_dir)
    events = read_events(job_dir)
    video_end = job.stages["video_decode"].ended if "video_decode" in job.stages else None
    done = job.ended if job.status == JobState.DONE else None
    return {
        "job_id": job.job_id,
        "status": job.status,
        "cli_wall_s": exited - spawned,
        "cli_start_to_job_created_s": None if job.created is None else job.created - spawned,
        "stages": {name: stage_entry(job, name, events) for name in job.stages},
        "events": events,
        "publish_s": None if video_end is None or done is None else done - video_end,
        "job_end_to_cli_exit_s": None if job.ended is None else exited - job.ended,
        "output": job.output,
    }


def staged_environment(state: Path, outputs: Path, fork_server: bool, profile: str) -> dict[str, str]:
    """The CLI's environment: its own state and output folders, the fork server on or off."""
    env = {
        **os.environ,
        "LTX2_STATE_DIR": str(state),
        "LTX2_OUTPUT_DIR": str(outputs),
        "LTX2_FORK_SERVER": "true" if fork_server else "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if profile:
        env["LTX2_PROFILE"] = profile
    return env


def staged_command(root: str, size: tuple[int, int, int], dtype: str) -> list[str]:
    """`generate` of one clip at `size`, the baseline's prompt, seed, steps and schedule."""
    command = [
        sys.executable, "-m", "orchestrator.cli", "generate", "--model", root, "--prompt", PROMPT,
        "--width", str(size[0]), "--height", str(size[1]), "--num-frames", str(size[2]),
        "--steps", str(STEPS), "--schedule", "distilled", "--seed", str(SEED), "--quiet",
    ]  # fmt: skip
    return command + (["--dtype", dtype] if dtype else [])


def run_cli(command: list[str], env: dict[str, str], state: Path, timeout_s: float) -> dict[str, Any]:
    """Run the CLI to its end or to the timeout (then it and every worker of `state` are killed)."""
    spawned = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        process.kill()
        kill_pids(worker_pids(state))
        stdout, stderr = process.communicate()
    exited = time.time()
    return {
        "returncode": process.returncode,
        "timed_out": timed_out,
        "stdout": stdout[-2000:],
        "stderr_tail": stderr[-3000:],
        "spawn_t": spawned,
        "exit_t": exited,
    }


def reap_leftovers(state: Path, name: str) -> dict[int, str]:
    """Processes of the run still alive 5 s after the CLI exited (killed; the fork server ends on
    EOF and workers exit, so there should be none)."""
    leftover: dict[int, str] = {}
    for _ in range(20):
        leftover = worker_pids(state)
        if not leftover:
            break
        time.sleep(0.25)
    if leftover:
        log(f"{name}: processes left after the CLI exited (killed): {leftover}")
        kill_pids(leftover)
    return leftover


def job_results(state: Path, spawned: float, exited: float) -> dict[str, Any]:
    """The summary of the run's (last) job and the tails of its worker logs; empty without a job."""
    jobs = sorted((state / "jobs").glob("*")) if (state / "jobs").is_dir() else []
    if not jobs:
        return {}
    result: dict[str, Any] = {}
    try:
        result.update(summarize_job(jobs[-1], spawned, exited))
    except (OSError, ValueError, KeyError) as exc:
        result["parse_error"] = repr(exc)
    result["worker_logs_tail"] = {
        path.name: path.read_text(errors="replace")[-6000:] for path in sorted((jobs[-1] / "logs").glob("*.log"))
    }
    return result


def run_staged(
    size: tuple[int, int, int], args: argparse.Namespace, timeout_s: float, work: Path, fork_server: bool = True
) -> dict[str, Any]:
    """One staged clip at `size`, from fresh state and output folders; returns everything measured."""
    label = size_label(size)
    suffix = "" if fork_server else "-nofork"
    state, outputs = work / f"state-{label}{suffix}", work / f"outputs-{label}{suffix}"
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(outputs, ignore_errors=True)  # mp4_check then sees this run's MP4 alone
    env = staged_environment(state, outputs, fork_server, args.profile)
    command = staged_command(args.root, size, args.staged_dtype)
    log(
        f"staged {label}{suffix} (LTX2_FORK_SERVER={env['LTX2_FORK_SERVER']}): {' '.join(command[:4])} ... "
        f"(timeout {timeout_s:.0f} s)"
    )
    cli = run_cli(command, env, state, timeout_s)
    leftover = reap_leftovers(state, f"staged {label}{suffix}")
    result: dict[str, Any] = {
        "size": label,
        "fork_server": fork_server,
        **cli,
        "leftover_processes": {str(k): v for k, v in leftover.items()},
        "children_maxrss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }
    result.update(job_results(state, cli["spawn_t"], cli["exit_t"]))
    result["mp4"] = [str(p) for p in outputs.glob("*.mp4")]
    if cli["returncode"] != 0 or cli["timed_out"]:
        print_failure(f"staged {label}{suffix}", result)
    return result


def print_failure(name: str, result: dict[str, Any]) -> None:
    """A failed staged run: the CLI's stderr (the fork server's too), attempts and worker-log tails."""
    lines = [f"---- {name} FAILED: rc {result.get('returncode')}, timed out {result.get('timed_out')}"]
    lines.append("-- CLI stderr (tail):")
    lines.append(result.get("stderr_tail", "")[-2500:])
    for stage, entry in result.get("stages", {}).items():
        lines.append(f"-- {stage}: attempts {entry.get('attempts')}, last result {entry.get('result')!r}, "
                     f"reason {entry.get('reason')!r}")  # fmt: skip
    for name_, text in result.get("worker_logs_tail", {}).items():
        lines.append(f"-- worker log {name_} (tail):")
        lines.append(text[-2500:])
    if result.get("parse_error"):
        lines.append(f"-- job directory not parsed: {result['parse_error']}")
    lines.append("---- end of failure report")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()

#!/usr/bin/env python3
"""GPU benchmark, version 3: stage-major batches and regional compile on the full-size model.

    python bench/batch_bench.py --out DIR [--budget-s 560] [--scale full|smoke|tiny]
                                [--sequence batch,batch_compile,batch_compile_warm,large_compile]

Builds the full-size LTX-2.0 folder with random weights (bench/gpu_bench.py `build`, reused when
an earlier call on the machine left one), then runs, each as a fresh `ltx2` CLI process:

- batch: `ltx2 batch` of --clips clips at --small (different prompts and seeds), stage-major, eager;
- batch_compile: the same clips with `compile = true` (regional compile of the transformer's
  repeated blocks), starting from an empty compile cache;
- batch_compile_warm: the same again, the compile cache left by batch_compile kept (what every
  later batch on the machine sees);
- large_compile: one clip at --large with `--compile` (denoise seconds per step at 1080p);
- batch_fp8mm: the batch clips with `--fp8-matmul` and `--compile` (warm compile cache), PSNR
  against the eager bf16 clips;
- large_fp8mm: one clip at --large with `--fp8-matmul --compile` (s/step and peak memory at 1080p);
- large_fp8mm_exact: large_fp8mm with `LTX2_FP8_FAST_ACCUMULATION=false` (every FP8 product
  accumulated in fp32), to price the tensor cores' fast accumulation in speed and PSNR;
- large_eager: the same clip in eager bf16, the reference of the large clips' PSNR;
- large_eager_plain: large_eager with `PYTORCH_CUDA_ALLOC_CONF` emptied, i.e. torch's default
  allocator instead of the workers' expandable segments (peak memory as nvidia-smi sees it).

Per run: wall time from process start to exit, per-clip time (wall / clips, and the warm per-clip
cost: what each clip after the first adds inside the group processes, both as the sum of its
stage attempts' seconds and as the spacing of the clips' stage ends, which is the honest figure
once the video stage overlaps clips), model loads per stage,
denoise s/step and MFU, peak GPU memory (nvidia-smi, every 250 ms) and per stage (torch).
Compiled clips are compared with the eager ones of the same seed by the PSNR of their decoded
frames. Results go to DIR/results.json as each run ends; the last thing printed is a table.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench as gb  # noqa: E402

PROMPTS = [
    gb.PROMPT,
    "A paper lantern drifts over a night market, vendors calling out as oil sizzles in woks.",
    "Waves break against a basalt cliff at dawn, gulls wheeling and spray hissing on the rocks.",
    "A potter's wheel spins in a sunlit workshop while clay slaps and a radio hums softly.",
    "Snow falls on an empty tram stop, a bell rings and a distant train rumbles past.",
    "A drummer counts in on a rooftop at sunset, traffic murmuring in the street below.",
]


def write_batch(
    path: Path, root: str, size: tuple[int, int, int], clips: int, compile_: bool, fp8_matmul: bool = False
) -> Path:
    """A batch TOML of `clips` clips (prompt i, seed i) at `size`."""
    width, height, frames = size
    lines = [
        "[defaults]",
        f"model = {json.dumps(root)}",
        f"width = {width}\nheight = {height}\nnum_frames = {frames}",
        f'steps = {gb.STEPS}\nschedule = "distilled"',
        f"compile = {'true' if compile_ else 'false'}",
        f"fp8_matmul = {'true' if fp8_matmul else 'false'}",
        "",
    ]
    for index in range(clips):
        lines += ["[[clips]]", f'name = "clip{index + 1}"', f"prompt = {json.dumps(PROMPTS[index % len(PROMPTS)])}"]
        lines += [f"seed = {index + 1}", ""]
    path.write_text("\n".join(lines))
    return path


LARGE_RUNS = {
    "large_compile": ["--compile"],
    "large_fp8mm": ["--fp8-matmul", "--compile"],
    "large_fp8mm_exact": ["--fp8-matmul", "--compile"],
    "large_eager": [],
    "large_eager_plain": [],
}
# Runs that change a setting through the environment: the FP8 GEMMs without fast accumulation;
# torch's default CUDA allocator instead of the expandable segments the workers get.
RUN_ENV = {
    "large_fp8mm_exact": {"LTX2_FP8_FAST_ACCUMULATION": "false"},
    "large_eager_plain": {"PYTORCH_CUDA_ALLOC_CONF": ""},
}


def split_jobs(rows: list[tuple[float, str, int, int]]) -> list[list[tuple[float, str, int, int]]]:
    """A group worker's progress rows cut at each "job started" line (rows before it go to job 1)."""
    parts: list[list[tuple[float, str, int, int]]] = [[]]
    for row in rows:
        if row[1] == "job started" and parts[-1] and any(r[1] == "job started" for r in parts[-1]):
            parts.append([])
        parts[-1].append(row)
    return parts


def denoise_rate(rows: list[tuple[float, str, int, int]]) -> dict[str, float | None]:
    """Seconds per step over the whole loop, and over steps 2..8 (without the first, compiling, one)."""
    t0, t1, tn = gb.first(rows, "denoise", 0), gb.first(rows, "denoise", 1), gb.first(rows, "denoise", gb.STEPS)
    return {
        "s_per_step": gb.diff(t0, tn) / gb.STEPS if t0 and tn else None,
        "s_per_step_steady": gb.diff(t1, tn) / (gb.STEPS - 1) if t1 and tn else None,
        "first_step_s": gb.diff(t0, t1),
    }


def summarize(state: Path) -> dict[str, Any]:
    """Per job and per stage: attempts, group, seconds, peaks; per group log: loads and phases."""
    jobs = sorted((state / "jobs").glob("*")) if (state / "jobs").is_dir() else []
    out: dict[str, Any] = {"jobs": {}, "stages": {}}
    for job_dir in jobs:
        record = json.loads((job_dir / "job.json").read_text())
        out["jobs"][record["spec"]["name"]] = {
            "status": record["status"],
            "output": record.get("output"),
            "finished_at": stage_finish_times(job_dir),
            "stages": {
                stage: [
                    {
                        k: a.get(k)
                        for k in ("result", "seconds", "peak_gpu_bytes", "peak_rss_bytes", "group", "reason", "plan")
                    }
                    for a in data["attempts"]
                ]
                for stage, data in record["stages"].items()
            },
        }
    for stage in ("encode_diffuse", "audio_decode", "video_decode"):
        # Members of a group share the group's log through hard links: one file per process.
        by_inode = {}
        for job_dir in jobs:
            for path in sorted((job_dir / "logs").glob(f"{stage}-*.log")):
                by_inode.setdefault((path.stat().st_dev, path.stat().st_ino), path)
        logs = sorted(by_inode.values())
        entry: dict[str, Any] = {"processes": len(logs), "loads": {}, "per_job": []}
        for path in logs:
            rows = gb.parse_worker_log(path)
            for _t, phase, _i, _n in rows:
                if phase.startswith("load "):
                    entry["loads"][phase] = entry["loads"].get(phase, 0) + 1
            for part in split_jobs(rows):
                item = {"start": part[0][0] if part else None, "end": part[-1][0] if part else None}
                if stage == "encode_diffuse":
                    item.update(denoise_rate(part))
                    load = gb.first(part, "load transformer")
                    item["transformer_load_s"] = gb.diff(load, gb.first(part, "denoise", 0))
                if stage == "video_decode":  # the main thread's share: VAE decode, YUV, PNGs
                    item["decode_s"] = gb.diff(gb.first(part, "decode video", 0), gb.first(part, "encode H.264"))
                entry["per_job"].append(item)
        out["stages"][stage] = entry
    return out


def stage_finish_times(job_dir: Path) -> dict[str, float]:
    """Stage -> UNIX time of its last successful attempt's end, from the job's events.log."""
    finished: dict[str, float] = {}
    for line in (job_dir / "events.log").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "stage_finished" and event["result"] == "ok":
            finished[event["stage"]] = dt.datetime.fromisoformat(event["t"]).timestamp()
    return finished


def stage_gaps(jobs: dict[str, Any]) -> dict[str, float]:
    """Per stage, the wall time each clip after the first adds: (last end - first end) / (clips - 1).

    A group worker may overlap clips (the video stage encodes clip N while it decodes clip N+1),
    so summing each clip's attempt seconds would count the overlap twice; the spacing of the
    clips' ends is what a longer batch pays per clip.
    """
    gaps: dict[str, float] = {}
    for stage in ("encode_diffuse", "audio_decode", "video_decode"):
        ends = sorted(job["finished_at"][stage] for job in jobs.values() if stage in job.get("finished_at", {}))
        if len(ends) > 1:
            gaps[stage] = (ends[-1] - ends[0]) / (len(ends) - 1)
    return gaps


def run_cli(name: str, command: list[str], env: dict[str, str], timeout_s: float, log_path: Path) -> dict[str, Any]:
    gb.log(f"{name}: {' '.join(command[3:6])} ... (timeout {timeout_s:.0f} s)")
    started = time.time()
    with log_path.open("a") as handle:
        handle.write(f"\n===== {name}\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=gb.REPO, env=env, stdout=subprocess.PIPE, stderr=handle, text=True)
        try:
            stdout, _ = process.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            process.kill()
            gb.kill_pids(gb.worker_pids(Path(env["LTX2_STATE_DIR"])))
            stdout, _ = process.communicate()
            timed_out = True
    ended = time.time()
    gb.log(f"{name}: rc {process.returncode} in {ended - started:.1f} s")
    if process.returncode != 0:
        sys.stdout.write(log_path.read_text(errors="replace")[-4000:] + "\n")
    return {"returncode": process.returncode, "timed_out": timed_out, "t0": started, "t1": ended, "stdout": stdout}


def psnr(first: Path, second: Path) -> float | None:
    """PSNR (dB) between two MP4s' decoded frames (8-bit RGB), over the whole clip."""
    import av
    import numpy as np

    def frames(path: Path) -> Any:
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float64)

    a, b = frames(first), frames(second)
    if a.shape != b.shape:
        return None
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0912, PLR0915 - one linear script
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench-out"))
    # Job folders, MP4s and the compile cache live in RAM: the model folder fills the lent machine's disk.
    shm = Path("/dev/shm")
    parser.add_argument("--work", default=str(shm / "ltx2-bench-work") if shm.is_dir() else "/tmp/bench-work")
    parser.add_argument("--root", default="auto")
    parser.add_argument("--scale", choices=["full", "smoke", "tiny"], default="full")
    parser.add_argument("--small", default="768x512x121")
    parser.add_argument("--large", default="1920x1088x161")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--sequence", default="batch,batch_compile,batch_compile_warm,large_compile")
    parser.add_argument("--budget-s", type=float, default=560.0)
    parser.add_argument("--host-ram-gib", type=float, default=0.0)
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    deadline = T_PROCESS + args.budget_s
    results: dict[str, Any] = {"args": vars(args), "runs": {}}
    sampler = gb.GpuSampler()
    sampler.start()
    child_log = out / "children.log"

    def save() -> None:
        gb.write_json(out / "results.json", results)
        gb.write_json(work / "results.json", results)

    # A later call on the same warm machine adds its runs to the earlier call's (its MP4s are
    # still in the work folder, so the PSNR pass can pair runs of both calls).
    if (work / "results.json").is_file():
        earlier = json.loads((work / "results.json").read_text())
        results["runs"] = earlier.get("runs", {})
        results["earlier_calls"] = [*earlier.get("earlier_calls", []), earlier.get("args")]

    root = gb.choose_root(args.root, name=f"ltx2-{args.scale}")
    marker = root / "BUILD_OK"
    if not (marker.is_file() and json.loads(marker.read_text()).get("scale") == args.scale):
        build = [sys.executable, str(Path(gb.__file__)), "build", "--root", str(root), "--scale", args.scale]
        build += ["--result", str(work / "build.json")]
        build += ["--host-ram-gib", str(args.host_ram_gib)] if args.host_ram_gib else []
        rc, t0, t1, _ = gb.run_child(build, max(deadline - time.time() - 60, 10), child_log)
        results["build"] = {"returncode": rc, "wall_s": t1 - t0}
        if rc != 0:
            save()
            return 1
    else:
        results["build"] = {"reused": True}
    results["environment"] = gb.probe_environment()
    save()
    small, large = gb.parse_size(args.small), gb.parse_size(args.large)
    cache = work / "compile-cache"
    if not results.get("earlier_calls"):
        shutil.rmtree(cache, ignore_errors=True)
    for name in args.sequence.split(","):
        left = deadline - time.time() - 20
        if left < 60:
            results["runs"][name] = {"skipped": f"only {left:.0f} s left"}
            continue
        state, outputs = work / f"state-{name}", work / f"outputs-{name}"
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(outputs, ignore_errors=True)
        env = {
            **os.environ,
            "LTX2_STATE_DIR": str(state),
            "LTX2_OUTPUT_DIR": str(outputs),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "LTX2_COMPILE_CACHE_DIR": str(cache),
            **RUN_ENV.get(name, {}),
        }
        cli = [sys.executable, "-m", "orchestrator.cli"]
        if name.startswith("batch"):
            size = small
            fp8mm = name == "batch_fp8mm"
            batch = write_batch(work / f"{name}.toml", str(root), size, args.clips, name != "batch", fp8mm)
            command = [*cli, "batch", str(batch), "--quiet"]
        elif name in LARGE_RUNS:
            size = large
            command = [*cli, "generate", "--model", str(root), "--prompt", gb.PROMPT, "--seed", "1", "--name", "clip1"]
            command += ["--width", str(size[0]), "--height", str(size[1]), "--num-frames", str(size[2]), "--quiet"]
            command += LARGE_RUNS[name]
        else:
            raise SystemExit(f"unknown run {name!r}")
        run = run_cli(name, command, env, left, child_log)
        run["gpu_peak_mib"] = sampler.peak_mib(run["t0"], run["t1"])
        run["wall_s"] = run["t1"] - run["t0"]
        run["size"] = gb.size_label(size)
        run.update(summarize(state))
        clips = len(run["jobs"]) or 1
        run["per_clip_wall_s"] = run["wall_s"] / clips
        # What each clip after the first adds inside the group processes (its loads are shared).
        later = [
            sum(attempts[-1]["seconds"] or 0 for attempts in job["stages"].values() if attempts)
            for job_name, job in sorted(run["jobs"].items())
            if job_name != "clip1"
        ]
        run["warm_per_clip_s"] = sum(later) / len(later) if later else None
        run["stage_gap_s"] = stage_gaps(run["jobs"])
        run["warm_per_clip_wall_s"] = sum(run["stage_gap_s"].values()) if run["stage_gap_s"] else None
        flops = gb.transformer_flops(gb.TRANSFORMER_CONFIG, *size, gb.MAX_SEQUENCE_LENGTH)
        peak = gb.peak_flops(results["environment"].get("versions", {}).get("gpu", ""))
        per_job = run["stages"]["encode_diffuse"]["per_job"]
        rates = [j["s_per_step_steady"] for j in per_job if j.get("s_per_step_steady")]
        if rates and peak:
            run["mfu_steady"] = flops["flops"] / (sum(rates) / len(rates)) / peak
        results["runs"][name] = run
        save()
    sampler.stop()
    for name, run in results["runs"].items():
        reference = results["runs"].get("large_eager" if name.startswith("large") else "batch", {})
        if name in ("batch", "large_eager") or "jobs" not in run or "jobs" not in reference:
            continue
        eager = reference["jobs"]
        run["psnr_vs_eager_db"] = {
            job: psnr(Path(eager[job]["output"]), Path(data["output"]))
            for job, data in run["jobs"].items()
            if data.get("output") and eager.get(job, {}).get("output")
        }
    save()
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    """One line per run: the numbers docs/benchmarks.md quotes."""
    for name, run in results["runs"].items():
        if "skipped" in run:
            sys.stdout.write(f"{name}: skipped ({run['skipped']})\n")
            continue
        diffusion = run["stages"]["encode_diffuse"]
        rates = [j.get("s_per_step_steady") for j in diffusion["per_job"]]
        firsts = [j.get("first_step_s") for j in diffusion["per_job"]]
        peaks = {
            stage: max((a[-1]["peak_gpu_bytes"] or 0) for a in (job["stages"][stage] for job in run["jobs"].values()))
            / gb.GIB
            for stage in ("encode_diffuse", "audio_decode", "video_decode")
        }
        sys.stdout.write(
            f"{name} [{run['size']}, {len(run['jobs'])} clip(s)]: rc {run['returncode']}, wall {run['wall_s']:.1f} s, "
            f"per clip {run['per_clip_wall_s']:.2f} s, warm per clip {gb.fmt(run.get('warm_per_clip_s'), 's', 2)} "
            f"(attempt seconds) / {gb.fmt(run.get('warm_per_clip_wall_s'), 's', 2)} (wall, per stage "
            f"{ {k: round(v, 2) for k, v in run.get('stage_gap_s', {}).items()} }); "
            f"processes per stage {[s['processes'] for s in run['stages'].values()]}, loads {diffusion['loads']}; "
            f"steady s/step {[gb.fmt(r, '', 3) for r in rates]}, first step {[gb.fmt(f, '', 2) for f in firsts]}, "
            f"MFU {gb.fmt(run.get('mfu_steady'), '', 3)}; peak GPU nvidia-smi {run['gpu_peak_mib']} MiB, "
            f"torch per stage {', '.join(f'{k} {v:.1f} GiB' for k, v in peaks.items())}; "
            f"PSNR vs eager {run.get('psnr_vs_eager_db')}\n"
        )


if __name__ == "__main__":
    sys.exit(main())

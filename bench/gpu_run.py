"""`gpu_bench.py all`: the whole benchmark in one process tree, within one wall-clock budget.

It exists to run, on a lent machine and inside one call's time, the build (a child process), the
environment probe beside it, then the measured runs of --sequence in order, each in fresh
processes: staged runs (gpu_staged), the single-process baseline (a `gpu_bench.py baseline` child,
gpu_baseline) and import timings. It samples the GPU's memory all along, writes results.json after
every run and ends with gpu_report's table. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpu_common import ENTRY, REPO, T_PROCESS, log, parse_size, size_label, write_json
from gpu_report import derive, print_table
from gpu_staged import run_staged
from gpu_storage import choose_root, fs_free, fs_type, mem_total_bytes, storage_report

STAGED_TOKENS = ("staged_small", "staged_large", "staged_small_nofork", "staged_large_nofork")


class GpuSampler:
    """nvidia-smi memory.used every 250 ms (device memory as the driver sees it, all processes)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        if not shutil.which("nvidia-smi"):
            return
        self.process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "250"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.samples.append((time.time(), int(line.strip().split(",")[0])))
            except ValueError:
                continue

    def peak_mib(self, t0: float | None, t1: float | None) -> int | None:
        """The highest sample between t0 and t1 (None without one)."""
        if t0 is None or t1 is None:
            return None
        window = [mib for t, mib in self.samples if t0 <= t <= t1]
        return max(window) if window else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()


VERSIONS_PROBE = (
    "import json,sys,torch,diffusers,transformers,av,zmq;print(json.dumps({'python':sys.version.split()[0],"
    "'torch':torch.__version__,'cuda':torch.version.cuda,'diffusers':diffusers.__version__,"
    "'transformers':transformers.__version__,'av':av.__version__,'pyzmq':zmq.__version__,"
    "'gpu':torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}))"
)


def probe_environment() -> dict[str, Any]:
    """Date, CPUs, the card (nvidia-smi), library versions (a fresh interpreter), memory, disks, commit."""
    env: dict[str, Any] = {"date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "nproc": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        query = "name,memory.total,driver_version,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, check=False
        )
        env["nvidia_smi"] = out.stdout.strip()
    versions = subprocess.run([sys.executable, "-c", VERSIONS_PROBE], capture_output=True, text=True, check=False)
    try:
        env["versions"] = json.loads(versions.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        env["versions_error"] = versions.stderr[-2000:]
    env["mem_total_bytes"] = mem_total_bytes()
    env["storage"] = storage_report()
    env["git_head"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    return env


def run_child(command: list[str], timeout_s: float, log_path: Path) -> tuple[int, float, float, bool]:
    """Run a sub-command of gpu_bench.py; output appended to log_path and echoed; kill at timeout.

    Returns (exit status, spawn time, end time, timed out).
    """
    spawned = time.time()
    env = {**os.environ, "BENCH_SPAWN_T": repr(spawned), "PYTHONUNBUFFERED": "1"}
    with log_path.open("a") as handle:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        reader = threading.Thread(target=pump_output, args=(process, handle), daemon=True)
        reader.start()
        timed_out = False
        try:
            process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=5)
    return process.returncode, spawned, time.time(), timed_out


def pump_output(process: subprocess.Popen[str], handle: Any) -> None:
    """Copy a child's output into its log; echo its [bench ...] lines and errors."""
    assert process.stdout is not None
    for line in process.stdout:
        handle.write(line)
        handle.flush()
        if line.startswith("[bench") or "Error" in line or "error:" in line:
            sys.stdout.write("    | " + line[-400:])
            sys.stdout.flush()


IMPORT_PROBE = """
import json, sys, time
t = [time.time()]
import torch
t.append(time.time())
import transformers
t.append(time.time())
from diffusers import LTX2Pipeline
t.append(time.time())
import av, zmq, services.encode_diffuse
t.append(time.time())
names = ["torch", "transformers", "diffusers LTX2Pipeline", "av+zmq+services.encode_diffuse"]
print(json.dumps({n: t[i + 1] - t[i] for i, n in enumerate(names)}))
"""


def measure_imports() -> dict[str, Any]:
    """Where a stage process's start-up goes: import times, twice (the second with warm caches)."""
    result: dict[str, Any] = {}
    for attempt in (1, 2):
        spawned = time.time()
        out = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE], cwd=REPO, capture_output=True, text=True, check=False
        )
        try:
            result[f"run{attempt}"] = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result[f"run{attempt}"] = {"error": out.stderr[-1000:]}
        result[f"run{attempt}"]["process_wall_s"] = time.time() - spawned
    log(f"import times: {result}")
    return result


def check_mp4(path: Path) -> dict[str, Any]:
    """What PyAV sees in an MP4: frames, size, codecs, bytes (or the error)."""
    try:
        import av

        with av.open(str(path)) as container:
            video = container.streams.video[0]
            audio = container.streams.audio[0] if container.streams.audio else None
            return {
                "frames": video.frames,
                "size": [video.codec_context.width, video.codec_context.height],
                "codec": video.codec_context.name,
                "audio": None if audio is None else [audio.codec_context.name, audio.rate],
                "bytes": path.stat().st_size,
            }
    except Exception as exc:  # noqa: BLE001 - a report, not a test
        return {"error": repr(exc)}


@dataclasses.dataclass
class Bench:
    """The state of one `all` call: arguments, folders, deadline, results so far, the GPU sampler."""

    args: argparse.Namespace
    out: Path
    work: Path
    root: Path
    deadline: float
    results: dict[str, Any]
    sampler: GpuSampler
    seen: dict[str, int] = dataclasses.field(default_factory=dict)
    fork_failed: str = ""  #: set by the first failed fork-server run: later ones are skipped or run without it

    @property
    def child_log(self) -> Path:
        return self.out / "children.log"

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.results["gpu_samples_mib"] = self.sampler.samples[::4]
        write_json(self.out / "results.json", self.results)

    def key_for(self, name: str) -> str:
        """The results key of a run: a repeated name gets "name#n"."""
        self.seen[name] = self.seen.get(name, 0) + 1
        return name if self.seen[name] == 1 else f"{name}#{self.seen[name]}"


def start_bench(args: argparse.Namespace) -> Bench:
    """Folders, the model folder's place (args.root becomes it), the results and the GPU sampler."""
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    root = choose_root(args.root)
    args.root = str(root)
    sampler = GpuSampler()
    sampler.start()
    results: dict[str, Any] = {"args": vars(args), "phases": {}, "root": str(root)}
    log(f"model folder: {root} ({fs_type(root.parent)}, {fs_free(root.parent) / 1e9:.1f} GB free)")
    return Bench(args, out, work, root, T_PROCESS + args.budget_s, results, sampler)


def build_phase(bench: Bench) -> bool:
    """Build the model folder in a child unless a finished one of the same scale is there (a warm
    machine); False when the build failed."""
    args, marker, build_file = bench.args, bench.root / "BUILD_OK", bench.work / "build.json"
    reuse = marker.is_file() and json.loads(marker.read_text()).get("scale") == args.scale
    if reuse:
        bench.results["phases"]["build"] = {**json.loads(marker.read_text()), "reused": True}
        return True
    if "build" not in set(args.phases.split(",")):
        return True
    command = [sys.executable, str(ENTRY), "build", "--root", str(bench.root), "--scale", args.scale]
    command += ["--result", str(build_file)]
    command += ["--host-ram-gib", str(args.host_ram_gib)] if args.host_ram_gib else []
    rc, t0, t1, timed_out = run_child(command, min(args.build_timeout_s, bench.left() - 60), bench.child_log)
    build = json.loads(build_file.read_text()) if build_file.is_file() else {}
    build.update(returncode=rc, wall_s=t1 - t0, timed_out=timed_out, gpu_peak_mib=bench.sampler.peak_mib(t0, t1))
    bench.results["phases"]["build"] = build
    bench.save()
    if rc != 0 or not marker.is_file():
        log(f"build failed (rc {rc}); see children.log")
        return False
    return True


def staged_phase(bench: Bench, token: str) -> None:
    """One staged_* entry of --sequence: skipped, run without the fork server, or run as asked."""
    args = bench.args
    is_small = token.startswith("staged_small")
    fork = not token.endswith("_nofork")
    size = parse_size(args.small if is_small else args.large)
    if fork and bench.fork_failed:
        if is_small:
            bench.results["phases"][bench.key_for(f"staged_{size_label(size)}")] = {"skipped": bench.fork_failed}
            return
        fork = False  # the large clip still gets measured, the old way
    key = bench.key_for(f"staged_{size_label(size)}" + ("" if fork else "_nofork"))
    need = args.min_small_staged_s if is_small else args.min_large_staged_s
    if bench.left() < need:
        bench.results["phases"][key] = {"skipped": f"only {bench.left():.0f} s left (needs {need:.0f})"}
        return
    limit = args.stage_timeout_s if is_small else bench.left() - 15
    staged = run_staged(size, args, min(limit, bench.left() - 30), bench.work, fork_server=fork)
    staged["gpu_peak_mib"] = bench.sampler.peak_mib(staged["spawn_t"], staged["exit_t"])
    staged["mp4_check"] = [check_mp4(Path(mp4)) for mp4 in staged.get("mp4", [])]
    bench.results["phases"][key] = staged
    log(f"{key}: rc {staged['returncode']}, {staged['exit_t'] - staged['spawn_t']:.1f} s")
    if fork and (staged["returncode"] != 0 or staged["timed_out"]) and not bench.fork_failed:
        bench.fork_failed = f"fork-server run {key} failed (rc {staged['returncode']})"


def run_baseline(bench: Bench) -> dict[str, Any]:
    """The single-process baseline in a fresh process: cold + warm small clip (+ the large clip)."""
    args, work = bench.args, bench.work
    base_file = work / "baseline.json"
    base_file.unlink(missing_ok=True)
    phases = set(args.phases.split(","))
    runs = f"{args.small}:cold" + ("" if "baseline_cold_only" in phases else f",{args.small}:warm")
    if "baseline_large" in phases:
        runs += f",{args.large}:large"
    staged_large_left = "staged_large" in args.sequence.split(",")[-1:]
    child_deadline = bench.deadline - (args.reserve_large_staged_s if staged_large_left else 0) - 15
    command = [
        sys.executable, str(ENTRY), "baseline", "--root", str(bench.root), "--runs", runs,
        "--result", str(base_file), "--work", str(work), "--deadline", repr(child_deadline),
    ]  # fmt: skip
    timeout = min(args.stage_timeout_s * 2, bench.deadline - time.time() - 20)
    rc, t0, t1, timed_out = run_child(command, timeout, bench.child_log)
    base = json.loads(base_file.read_text()) if base_file.is_file() else {}
    base.update(returncode=rc, wall_s=t1 - t0, timed_out=timed_out, gpu_peak_mib=bench.sampler.peak_mib(t0, t1))
    for run in base.get("runs", []):
        if "t_call" in run:
            run["gpu_peak_mib_call"] = bench.sampler.peak_mib(run["t_call"], run["t_mp4"])
            run["mp4_check"] = check_mp4(Path(run["mp4"]))
    return base


def run_sequence(bench: Bench) -> None:
    """The measured runs, in the order --sequence gives; results saved after each."""
    for token in bench.args.sequence.split(","):
        if token == "imports":
            bench.results["phases"][bench.key_for("imports")] = measure_imports()
        elif token in STAGED_TOKENS:
            staged_phase(bench, token)
        elif token == "baseline" and bench.left() > 60:
            bench.results["phases"][bench.key_for("baseline")] = run_baseline(bench)
        elif token != "baseline":
            raise SystemExit(f"unknown --sequence entry {token!r}")
        bench.save()


def cmd_all(args: argparse.Namespace) -> int:
    """1 set up, 2 environment probe beside 3 the build, 4 the measured runs, 5 derived numbers + table."""
    bench = start_bench(args)  # 1
    bench.results["environment"] = {}
    probe = threading.Thread(  # 2: a fresh interpreter importing torch + diffusers, beside the build
        target=lambda: bench.results.__setitem__("environment", probe_environment()), daemon=True
    )
    probe.start()
    built = build_phase(bench)  # 3
    probe.join()
    log(f"environment: {json.dumps(bench.results['environment'])}")
    bench.save()
    if not built:
        print_table(bench.results)
        return 1
    run_sequence(bench)  # 4
    bench.results["derived"] = derive(bench.results)  # 5
    bench.sampler.stop()
    bench.save()
    print_table(bench.results)
    return 0

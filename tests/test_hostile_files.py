"""Hostile files and environments: the seed's command line, unwritable output folders, full disks
and corrupt files are each found where they are read, classified, and reported in one line.

Real processes on the tiny model throughout; a full disk in a worker is a fault switch
(LTX2_FAULT_ENOSPC), a full output folder a real 1 MiB tmpfs where mounting one is allowed.
"""

from __future__ import annotations

import errno
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_ARGS, RunAhead, ltx2_environment, run_ltx2
from safetensors.torch import save_file
from test_loras import CAMERA_FILE, CAMERA_REPO, lora_tensors

from orchestrator.run.jobdir import JobDir
from protocol.files import JOB_FILE, LATENTS_FILE, Stage

# The cheapest clip: 9 frames are 3 latent frames.
SMALL_ARGS = [*TINY_ARGS[:4], "--num-frames", "9"]
# The generate command line of the seed README (section "3. Generate a video"), after the image
# name `ltx2`, with the seed's default `--output` written out.
SEED_COMMAND = (
    '--prompt "A slow dolly-in through a rain-soaked alleyway in Taipei at 2 AM. Neon signs reflect off wet'
    " cobblestones in smeared reds and electric blues. Steam rises from a vendor cart, catching the colored"
    ' light. 35mm f/2.8, shallow depth of field, Kodak Vision3 500T, 180-degree shutter, natural motion blur."'
    " --lora Lightricks/LTX-2-19b-LoRA-Camera-Control-Dolly-In"
    " --lora-weight-name ltx-2-19b-lora-camera-control-dolly-in.safetensors"
    " --width 1920 --height 1088 --num-frames 161 --no-fp8 --seed 101"
    " --output /outputs/video.mp4"
)


def jobs_of(env: dict[str, str]) -> list[JobDir]:
    jobs = Path(env["LTX2_STATE_DIR"]) / "jobs"
    return [JobDir.load(path) for path in sorted(jobs.iterdir())] if jobs.is_dir() else []


def attempts_of(job: JobDir) -> dict[str, int]:
    """Attempts per stage that ran at least once (saved latents adopted by `decode` are not run)."""
    counts = {
        name.value: sum(not (attempt.reason or "").startswith("copied from") for attempt in record.attempts)
        for name, record in job.record.stages.items()
    }
    return {name: count for name, count in counts.items() if count}


@pytest.fixture
def camera_lora(hf_home: Path, tmp_path: Path) -> Path:
    """Lightricks' dolly-in repo in the HF cache layout, holding a synthetic LoRA for the tiny model."""
    repo = hf_home / "hub" / ("models--" + CAMERA_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors("diffusion_model."), str(snapshot / CAMERA_FILE))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("c" * 40)
    return snapshot / CAMERA_FILE


def test_the_seed_readme_generate_command_line_writes_a_timestamped_mp4(
    ltx2_env: dict, tmp_path: Path, camera_lora: Path
):
    # Changed from the seed: its docker mount /outputs is tmp_path/outputs, and its 1920x1088x161
    # clip is 64x64x17 (the tiny model on two CPU cores). No --model: as in the seed, the default.
    words = shlex.split(SEED_COMMAND.replace("/outputs/", f"{tmp_path}/outputs/"))
    size = words.index("--width")
    words[size : size + 6] = TINY_ARGS
    result = run_ltx2(["generate", *words, "--quiet"], ltx2_env)
    assert result.returncode == 0, result.stderr
    video = Path(result.stdout.strip())
    assert video.parent == tmp_path / "outputs"
    assert video.is_file()
    assert not (tmp_path / "outputs" / "video.mp4").exists()
    (job,) = jobs_of(ltx2_env)
    assert video.name == f"video_{job.id[:15]}.mp4"  # the stem given, the stamp of the job's id
    assert job.record.loras[0].source == CAMERA_REPO
    assert job.spec.fp8 is False and job.spec.seed == 101


@pytest.mark.parametrize("flag", ["--out", "--output-d", "--neg"])
def test_abbreviated_flags_are_refused(ltx2_env: dict, flag: str):
    result = run_ltx2(["generate", "--prompt", "x", flag, "y", *TINY_ARGS], ltx2_env)
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
    assert jobs_of(ltx2_env) == []


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 1 MiB tmpfs (skipped where mounting is not allowed); `remount(options)` changes it."""
    mount = tmp_path / "small-disk"
    mount_tmpfs(mount, "1m")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Write a file into `folder` until its filesystem is full, then give `leave` bytes back."""
    filler = folder / "filler.bin"
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        handle.truncate(max(0, handle.tell() - leave))
    return filler


def mount_tmpfs(mount: Path, size: str) -> None:
    """A real tmpfs of `size` at `mount` (the test is skipped where mounting is not allowed)."""
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=False, capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")


@pytest.mark.parametrize("where", ["file-in-the-way", "proc", "read-only"])
def test_an_unwritable_output_folder_is_refused_before_any_stage(
    ltx2_env: dict, tmp_path: Path, small_disk: Path, where: str
):
    if where == "file-in-the-way":
        folder = tmp_path / "taken"
        folder.write_text("not a folder")
    elif where == "proc":
        folder = Path("/proc/ltx2-outputs")
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        folder = small_disk
    result = run_ltx2(["generate", "--prompt", "x", "--output-dir", str(folder), *TINY_ARGS], ltx2_env)
    assert result.returncode == 2, result.stderr
    assert f"--output-dir: cannot write the video into {folder}" in result.stderr
    assert "Traceback" not in result.stderr
    assert jobs_of(ltx2_env) == []  # nothing ran


def test_a_full_output_folder_fails_the_job_with_the_recovery_command_and_leaves_nothing_there(
    ltx2_env: dict, small_disk: Path
):
    # Room for the sidecar and both PNGs (4 KiB pages: 1 + 3 + 3), not for the MP4 after them.
    filler = fill(small_disk, leave=32 * 1024)
    result = run_ltx2(["generate", "--prompt", "x", "--output-dir", str(small_disk), "--quiet", *TINY_ARGS], ltx2_env)
    assert result.returncode == 5, result.stderr
    assert "Traceback" not in result.stderr
    (job,) = jobs_of(ltx2_env)
    assert job.state.value == "failed"
    recover = f"ltx2 decode --input {job.path} --output PATH.mp4"
    assert recover in job.record.error and "No space left on device" in job.record.error
    (line,) = [line for line in result.stderr.splitlines() if recover in line]
    assert f"cannot publish the video to {small_disk}: No space left on device" in line  # the folder, not a job file
    # All or nothing: the sidecar and PNGs that fitted were taken back with the temp files.
    assert sorted(path.name for path in small_disk.iterdir()) == ["filler.bin"]
    events = [json.loads(line)["event"] for line in (job.path / "events.log").read_text().splitlines()]
    assert "publish_undone" in events
    # The command it names recovers the video once there is space.
    filler.unlink()
    recovered = small_disk / "recovered.mp4"
    result = run_ltx2(["decode", "--input", str(job.path), "--output", str(recovered), "--quiet"], ltx2_env)
    assert result.returncode == 0, result.stderr
    assert recovered.is_file()
    assert JobDir.load(job.path).state.value == "done"


def full_state_disk_run(root: Path, hf_home: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """`generate` whose diffusion stage finds the state disk full (LTX2_FAULT_ENOSPC) in every attempt;
    its result and environment."""
    env = {**ltx2_environment(hf_home, root), "LTX2_FAULT_ENOSPC": "encode_diffuse:9"}
    return run_ltx2(["generate", "--prompt", "x", "--quiet", *TINY_ARGS], env), env


def test_a_full_state_disk_in_a_stage_fails_once_without_lowering_the_plan(ran_ahead: tuple):
    result, env = ran_ahead
    assert result.returncode == 5, result.stderr
    (job,) = jobs_of(env)
    assert job.state.value == "failed"
    assert attempts_of(job) == {"encode_diffuse": 1}
    (attempt,) = job.stage_record(Stage.ENCODE_DIFFUSE).attempts
    assert attempt.result == "no_space"
    assert attempt.plan["weights"] == "native" and attempt.plan["offload"] == "none"
    assert "No space left on device" in job.record.error and str(job.path) in job.record.error
    assert "no lower-memory plan" not in job.record.error
    assert list(job.path.rglob("*.tmp-*")) == []  # the half-written temp file was removed


def test_a_full_state_dir_is_exit_5_in_one_line_never_a_retried_crash(ltx2_env: dict, tmp_path: Path):
    """A real 300 KiB state dir: the job directory fits, the diffusion stage's first write does not
    (safetensors' own error, not an OSError); then a state dir too full for a job.json at all."""
    state = tmp_path / "small-state"
    mount_tmpfs(state, "300k")
    try:
        command = ["--state-dir", str(state), "generate", "--prompt", "x", "--quiet", *SMALL_ARGS]
        result = run_ltx2(command, ltx2_env)
        assert result.returncode == 5, result.stderr
        assert "Traceback" not in result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("ltx2: error:")]
        (job_dir,) = (state / "jobs").iterdir()
        job = JobDir.load(job_dir)
        assert attempts_of(job) == {"encode_diffuse": 1}  # no retry, no lower-memory plan
        (attempt,) = job.stage_record(Stage.ENCODE_DIFFUSE).attempts
        assert (attempt.result, attempt.returncode) == ("no_space", 5)
        assert "No space left on device" in line and str(job_dir) in line
        # Full before the job directory can be written: the orchestrator's own write, the same exit.
        shutil.rmtree(job_dir)
        fill(state)
        result = run_ltx2(command, ltx2_env)
        assert result.returncode == 5, result.stderr
        assert "Traceback" not in result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("ltx2: error:")]
        assert f"no space left on the disk of {state}" in line
        assert list((state / "jobs").iterdir()) == []  # no half-made job directory left behind
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def finished_job_run(root: Path, hf_home: Path) -> subprocess.CompletedProcess[str]:
    return run_ltx2(
        ["generate", "--prompt", "x", "--seed", "5", "--quiet", *TINY_ARGS], ltx2_environment(hf_home, root)
    )


@pytest.fixture(scope="module")
def finished_job(runs_ahead: dict) -> Path:
    """One finished tiny job (its latents are the raw material for the corrupt ones), run ahead."""
    future, root = runs_ahead["finished_job"]
    result = future.result()
    assert result.returncode == 0, result.stderr
    (job_dir,) = (root / "state" / "jobs").iterdir()
    return job_dir


def assert_invalid_input_once(result: subprocess.CompletedProcess[str], env: dict, named: Path, stage: str) -> None:
    """Exit 2 with one error line naming the file and the worker log, the stage that read it
    attempted once; the worker's traceback is in its log, never on the terminal."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("ltx2: error:")]
    assert str(named) in line
    assert not [line for line in result.stderr.splitlines() if not line.startswith("ltx2: ")], result.stderr
    (job,) = jobs_of(env)
    assert job.state.value == "failed"
    assert attempts_of(job) == {stage: 1}
    (attempt,) = job.stage_record(Stage(stage)).attempts
    assert attempt.result == "invalid_input"
    log = job.log_path(Stage(stage), 1)
    assert line.endswith(f"; worker log: {log}") and "Traceback" in log.read_text()


def garbage_lora_run(root: Path, hf_home: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, str], Path]:
    """`generate` with a LoRA file of garbage; its result, environment and that file."""
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 64)
    env = ltx2_environment(hf_home, root)
    return run_ltx2(["generate", "--prompt", "x", "--lora", str(garbage), "--quiet", *TINY_ARGS], env), env, garbage


def test_a_garbage_lora_file_is_invalid_input_after_one_attempt(ran_ahead: tuple):
    result, env, garbage = ran_ahead
    assert_invalid_input_once(result, env, garbage, "encode_diffuse")


def cut_short(latents: Path, into: Path) -> Path:
    """A copy of a latents file whose header parses but whose tensor data is half missing."""
    data = latents.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    into.write_bytes(data[: header + (len(data) - header) // 2])
    return into


def test_truncated_latents_file_is_refused_before_any_stage(ltx2_env: dict, tmp_path: Path, finished_job: Path):
    cut = cut_short(finished_job / LATENTS_FILE, tmp_path / "cut.safetensors")
    result = run_ltx2(["decode", "--input", str(cut), "--output", str(tmp_path / "out.mp4"), "--quiet"], ltx2_env)
    assert result.returncode == 2, result.stderr
    assert f"--input: {cut} is not a latents file written by ltx2-stages" in result.stderr
    assert "cut short" in result.stderr
    assert jobs_of(ltx2_env) == []


def test_latents_full_of_nan_are_invalid_input_after_one_attempt(ltx2_env: dict, tmp_path: Path, finished_job: Path):
    import torch
    from safetensors import safe_open

    with safe_open(str(finished_job / LATENTS_FILE), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: torch.full_like(handle.get_tensor(key), float("nan")) for key in handle.keys()}
    nan = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan), metadata=metadata)
    result = run_ltx2(["decode", "--input", str(nan), "--output", str(tmp_path / "out.mp4"), "--quiet"], ltx2_env)
    (job,) = jobs_of(ltx2_env)  # the stage names the job's copy of the file
    assert_invalid_input_once(result, ltx2_env, job.path / LATENTS_FILE, "audio_decode")
    assert "NaN" in result.stderr


@pytest.mark.parametrize("damage", ["zero-filled", "spec-without-model"])
def test_a_corrupt_job_file_given_to_decode_is_invalid_input_naming_it(
    ltx2_env: dict, tmp_path: Path, finished_job: Path, damage: str
):
    job_dir = tmp_path / "copied-job"
    shutil.copytree(finished_job, job_dir)
    job_file = job_dir / JOB_FILE
    if damage == "zero-filled":
        job_file.write_bytes(b"\0" * job_file.stat().st_size)
    else:
        record = json.loads(job_file.read_text())
        del record["spec"]["model"]
        job_file.write_text(json.dumps(record))
    before = job_file.read_bytes()
    result = run_ltx2(["decode", "--input", str(job_dir), "--output", str(tmp_path / "out.mp4")], ltx2_env)
    assert result.returncode == 2, result.stderr
    assert f"--input: {job_file} is not a readable ltx2-stages job file" in result.stderr
    assert "Traceback" not in result.stderr and "--model" not in result.stderr
    assert job_file.read_bytes() == before  # nothing ran, nothing was rewritten
    assert not (tmp_path / "out.mp4").exists()


# The runs this module starts ahead (conftest's `runs_ahead`), by the name of the test or fixture that
# checks each, in the order the tests need them.
RUNS_AHEAD: dict[str, RunAhead] = {
    "test_a_full_state_disk_in_a_stage_fails_once_without_lowering_the_plan": full_state_disk_run,
    "finished_job": finished_job_run,
    "test_a_garbage_lora_file_is_invalid_input_after_one_attempt": garbage_lora_run,
}

"""Hostile inputs and environments: names and models that slip past a loose check, size hints
that suggest invalid sizes, missing LoRAs reported as models, file probing through error
messages, a huge image decoded inside the daemon, a cancel racing a worker's successful exit, and a farm
stage that finishes before its placement is read.

Real processes throughout: the CLI, a daemon as a child process, a real short-lived worker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from conftest import TINY_ARGS, run_ltx2
from daemon_process import DaemonProcess, kill_group, running_writers_into
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from config.settings import Settings, load_settings
from orchestrator.daemon.client import DaemonError
from orchestrator.placement.worker_link import RemoteProcess, SpawnedWorker, WorkerLink, WorkerProcess
from orchestrator.run.job_hooks import JobHooks
from orchestrator.run.jobdir import JobDir
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.stage_attempt import run_attempt
from orchestrator.run.states import AttemptResult
from protocol import jobs
from protocol.errors import Failure
from protocol.files import AUDIO_FILE, Stage
from protocol.spec import JobSpec
from protocol.spec_rules import SpecError

TINY = "ltx2-stages/tiny-random-ltx2"
SPEC = {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
# The daemon's resident memory must stay well below one decoded 8192x8192 RGB image (192 MiB);
# the daemon itself (zmq, msgpack, PIL's header reader, no torch) needs far less than this.
DAEMON_RSS_LIMIT_BYTES = 150 << 20
HUGE_SIDE = 8192


def test_name_with_a_trailing_newline_exits_2_naming_name(ltx2_env: dict):
    result = run_ltx2(["generate", "--prompt", "x", "--model", TINY, "--name", "clip\n", *TINY_ARGS], ltx2_env)
    assert result.returncode == 2, result.stdout
    assert "--name: must match" in result.stderr, result.stderr
    assert not (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").exists()


def test_empty_model_exits_2_naming_model_instead_of_meaning_the_default(ltx2_env: dict):
    result = run_ltx2(["generate", "--prompt", "x", "--model", "", *TINY_ARGS], ltx2_env)
    assert result.returncode == 2, result.stdout
    assert "--model: " in result.stderr, result.stderr
    assert not (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").exists()


@given(st.sampled_from(["width", "height", "num_frames"]), st.integers(-(10**6), 10**6))
def test_every_suggested_size_or_frame_count_is_itself_allowed(field: str, value: int):
    try:
        JobSpec.from_dict({**SPEC, field: value})
        return
    except SpecError as exc:
        message = str(exc)
    hint = re.search(r"nearest allowed: (-?\d+)(?: or (-?\d+))?\)", message)
    assert hint, message
    suggestions = [int(group) for group in hint.groups() if group is not None]
    assert len(set(suggestions)) == len(suggestions), message  # never "1025 or 1025"
    for suggestion in suggestions:
        JobSpec.from_dict({**SPEC, field: suggestion})  # raises if the hint suggested an invalid value


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single `ltx2: error:` line of a refused command (and no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ltx2: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_prompt_that_is_not_utf8_exits_2_naming_it_in_submit_generate_and_batch(daemon, tmp_path: Path):
    not_utf8 = b"\xff\xfe a cat".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    for command in (["submit"], ["generate", "--model", TINY, *TINY_ARGS]):
        refused = run_ltx2([*command, "--prompt", not_utf8], daemon.env)
        assert refused.returncode == 2, refused.stderr
        line = one_error_line(refused)
        assert "--prompt" in line and "UTF-8" in line, line
    with daemon.client() as client:
        assert client.request(jobs.ListJobs("", 10))["jobs"] == []
    batch = tmp_path / "latin1.toml"
    batch.write_bytes('[[clips]]\nprompt = "un caf\u00e9 au lait"\n'.encode("latin-1"))
    refused = run_ltx2(["batch", str(batch)], daemon.env)
    assert refused.returncode == 2, refused.stderr
    line = one_error_line(refused)
    assert str(batch) in line and "UTF-8" in line, line


@pytest.fixture
def daemon(ltx2_env: dict, tmp_path: Path):  # noqa: ANN201 - a generator of DaemonProcess
    """A daemon as a child process whose only input roots are the test's folder (HOME) and /tmp."""
    runtime = Path(f"/tmp/ltx2-test-{os.getpid()}-{tmp_path.name[-12:]}")
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**ltx2_env, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    try:
        with DaemonProcess(env, tmp_path / "daemon.log") as running:
            yield running
    finally:
        for pid in running_writers_into(Path(env["LTX2_STATE_DIR"])):
            kill_group(pid)


def submit_error(daemon: DaemonProcess, **fields: object) -> DaemonError:
    """The daemon's typed error for a submit that must be refused."""
    with daemon.client() as client, pytest.raises(DaemonError) as refused:
        client.request(jobs.Submit("", {"prompt": "x", "model": TINY, **fields}))
    return refused.value


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"image": "/tmp/a\0b.png"}, "image"),
        ({"loras": [{"source": "/tmp/a\0b.safetensors"}]}, "lora"),
        ({"model": "ltx2-stages/tiny\0"}, "model"),
    ],
)
def test_a_nul_byte_in_a_path_is_an_invalid_spec_naming_the_field(daemon: DaemonProcess, fields: dict, field: str):
    """No file name can hold a NUL byte; the OS refuses one with a ValueError deep in the lookup,
    which reached clients as `internal: ValueError: embedded null byte`."""
    refused = submit_error(daemon, **fields)
    assert (refused.code, refused.field) == ("invalid_spec", field), refused
    assert "NUL byte" in str(refused)


def test_missing_lora_names_lora_and_a_missing_model_names_model_both_exit_4(daemon: DaemonProcess, tmp_path: Path):
    lora = submit_error(daemon, loras=[{"source": "Nobody/NoSuchLoRA"}])
    assert (lora.code, lora.field) == ("not_found", "lora"), str(lora)
    model = submit_error(daemon, model="Nobody/NoSuchModel")
    assert (model.code, model.field) == ("not_found", "model"), str(model)

    submitted = run_ltx2(["submit", "--prompt", "x", "--model", TINY, "--lora", "Nobody/NoSuchLoRA"], daemon.env)
    assert submitted.returncode == 4, submitted.stderr
    assert "--lora" in submitted.stderr
    embedded = run_ltx2(["generate", "--prompt", "x", "--model", TINY, "--lora", "Nobody/NoSuchLoRA"], daemon.env)
    assert embedded.returncode == 4, embedded.stderr
    assert "--lora: " in embedded.stderr and "hf download Nobody/NoSuchLoRA" in embedded.stderr


@pytest.mark.parametrize("field", ["image", "lora"])
def test_paths_outside_the_input_roots_get_one_error_whether_or_not_they_exist(daemon: DaemonProcess, field: str):
    existing, missing = "/etc/passwd", "/etc/no-such-file-here"
    assert Path(existing).exists() and not Path(missing).exists()

    def refusal(path: str) -> tuple[str, str, str]:
        fields = {"image": path} if field == "image" else {"loras": [{"source": path}]}
        error = submit_error(daemon, **fields)
        return error.code, error.field, str(error).replace(path, "PATH")

    assert refusal(existing) == refusal(missing)
    assert "outside the allowed input folders" in refusal(missing)[2]


def test_symlink_inside_the_roots_to_a_file_outside_is_refused_like_any_outside_path(
    daemon: DaemonProcess, tmp_path: Path
):
    (tmp_path / "innocent.png").symlink_to("/etc/passwd")
    error = submit_error(daemon, image=str(tmp_path / "innocent.png"))
    assert error.field == "image" and "outside the allowed input folders" in str(error)


def vm_kib(pid: int, key: str) -> int:
    """A memory figure of a live process from /proc/PID/status (VmRSS now, VmHWM its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for process {pid}")


def test_daemon_reads_only_the_header_of_a_huge_image_and_i2v_still_works(daemon: DaemonProcess, tmp_path: Path):
    huge = tmp_path / "huge.png"
    Image.new("RGB", (HUGE_SIDE, HUGE_SIDE), (40, 90, 160)).save(huge)  # compresses to a small file
    normal = tmp_path / "normal.jpg"
    Image.new("RGB", (96, 64), (200, 120, 30)).save(normal)
    with daemon.client() as client:
        args = {"width": 64, "height": 64, "num_frames": 9, "seed": 3}
        huge_id = client.request(jobs.Submit("", {"prompt": "sky", "model": TINY, "image": str(huge), **args}))["id"]
        rss, peak = vm_kib(daemon.pid, "VmRSS") * 1024, vm_kib(daemon.pid, "VmHWM") * 1024
        client.request(jobs.Cancel(huge_id))  # only its acceptance mattered; a worker may decode it
        normal_id = client.request(jobs.Submit("", {"prompt": "sun", "model": TINY, "image": str(normal), **args}))
    assert rss < DAEMON_RSS_LIMIT_BYTES and peak < DAEMON_RSS_LIMIT_BYTES, (rss >> 20, peak >> 20)
    job = daemon.wait_for_state(normal_id["id"], {"done", "failed", "cancelled"})
    assert job["state"] == "done", (job["error"], daemon.log()[-3000:])
    job_dir = Path(job["job_dir"])
    assert (job_dir / "input_image.png").read_bytes() == normal.read_bytes()  # as given; the worker decodes it
    assert "load video VAE for the conditioning image" in (job_dir / "logs" / "encode_diffuse-1.log").read_text()


def audio_job(tmp_path: Path) -> tuple[Settings, JobDir]:
    """Settings of a state dir under `tmp_path` and one job in it, for a stand-in audio-stage worker."""
    settings = load_settings(environ={"LTX2_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)})
    return settings, JobDir.create(
        settings.jobs_dir, JobSpec.from_dict(SPEC), ResolvedModel("m", tmp_path / "model", "abc")
    )


def run_audio_attempt(
    settings: Settings,
    job: JobDir,
    process: subprocess.Popen,
    hooks: JobHooks,
    endpoint: str,
    worker: WorkerProcess | None = None,
) -> dict:
    """The audio stage's attempt followed on `endpoint`, `process` adopted as its prestarted worker (`worker`: as
    the runner sees it, when not the process itself), killed if it outlives the attempt."""
    plan: dict = {}
    prestarted = SpawnedWorker(worker or process, Stage.AUDIO_DECODE, 1, plan, (job.id,))
    context = zmq.Context()
    link = WorkerLink(context, endpoint=endpoint, fork_server=False)
    try:
        return run_attempt([job], Stage.AUDIO_DECODE, plan, settings, link, lambda _: hooks, prestarted)
    finally:
        link.close()
        context.term()
        if process.poll() is None:
            process.kill()


def worker_endpoint(tmp_path: Path) -> str:
    """The socket a test's stand-in worker connects to (run_audio_attempt binds it): short, as ipc paths must be."""
    return f"ipc://{tmp_path}/w.sock"


# A stand-in worker: waits until released, writes the stage's output and exits 0. It never speaks
# ZeroMQ, so its Done is "lost": only its exit status and its file say it finished.
FINISHING_WORKER = """
import pathlib, sys, time
job_dir, release = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
while not release.exists():
    time.sleep(0.01)
(job_dir / "audio.wav").write_bytes(b"RIFF")
"""


def test_cancel_arriving_as_the_worker_exits_0_with_its_outputs_does_not_relabel_the_attempt(tmp_path: Path):
    settings, job = audio_job(tmp_path)
    release = tmp_path / "release"
    process = subprocess.Popen([sys.executable, "-c", FINISHING_WORKER, str(job.path), str(release)])

    def cancel_as_it_exits() -> Failure | None:
        """The cancel request that is read just after the worker finished (the race, made certain)."""
        release.touch()
        process.wait()
        return Failure.CANCELLED

    hooks = JobHooks(should_stop=cancel_as_it_exits)
    outcomes = run_audio_attempt(settings, job, process, hooks, worker_endpoint(tmp_path))
    attempt = JobDir.load(job.path).stage_record(Stage.AUDIO_DECODE).attempts[-1]
    assert (attempt.result, attempt.returncode) == (AttemptResult.OK, 0), attempt
    assert outcomes[job.id].ok and (job.path / AUDIO_FILE).is_file()


def test_cancel_of_a_worker_that_had_not_finished_still_cancels(tmp_path: Path):
    settings, job = audio_job(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
    hooks = JobHooks(should_stop=lambda: Failure.CANCELLED)
    outcomes = run_audio_attempt(settings, job, process, hooks, worker_endpoint(tmp_path))
    assert outcomes[job.id].failure is Failure.CANCELLED
    attempt = JobDir.load(job.path).stage_record(Stage.AUDIO_DECODE).attempts[-1]
    assert attempt.result == AttemptResult.CANCELLED and attempt.returncode != 0, attempt


# A stand-in worker that speaks the protocol: READY, waits for GO, opens the job, writes the audio, says
# Done and exits 0, all in a few milliseconds.
QUICK_WORKER = """
import os, pathlib, sys, zmq
from protocol import codec, stages
job_id, job_dir, endpoint = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
socket = zmq.Context().socket(zmq.DEALER)
socket.connect(endpoint)
socket.send(codec.encode(stages.Ready(job_id, "audio_decode", 1, os.getpid())))
assert isinstance(codec.decode(socket.recv()), stages.Go)
socket.send(codec.encode(stages.Progress(job_id, "audio_decode", stages.JOB_STARTED_PHASE, 0, 0)))
(job_dir / "audio.wav").write_bytes(b"RIFF")
socket.send(codec.encode(stages.Done(job_id, "audio_decode", ["audio.wav"], 0.01)))
socket.close(linger=5000)
"""


class PlacedAtExit:
    """A farm stage whose placement (a Ray task's first yield) is read only with its exit status: the
    order a loaded Ray owner can deliver them in, made certain (worker_link.RemoteProcess)."""

    pid = 0
    queued = False
    WHERE = {"node": "node-a", "host": "gpu-07", "remote_pid": 4242, "forked": True}

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self._placement: dict | None = None

    @property
    def placement(self) -> dict | None:
        return self._placement

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None:
            self._placement = self.WHERE
        return code

    def wait(self, timeout: float | None = None) -> int:
        code = self.process.wait(timeout)
        self._placement = self.WHERE
        return code

    def stop(self) -> int:
        self.process.kill()
        return self.wait()


def test_a_farm_stage_that_finishes_before_its_placement_is_read_still_records_its_host(tmp_path: Path):
    settings, job = audio_job(tmp_path)
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-c", QUICK_WORKER, job.id, str(job.path), worker_endpoint(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    remote = PlacedAtExit(process)
    assert isinstance(remote, RemoteProcess)
    outcomes = run_audio_attempt(settings, job, process, JobHooks(), worker_endpoint(tmp_path), remote)
    assert outcomes[job.id].ok, outcomes
    attempt = JobDir.load(job.path).stage_record(Stage.AUDIO_DECODE).attempts[-1]
    assert attempt.result == AttemptResult.OK, attempt
    assert (attempt.host, attempt.node, attempt.remote_pid) == ("gpu-07", "node-a", 4242), attempt

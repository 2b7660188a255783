"""Shared fixtures: a tiny random LTX-2 in a real Hugging Face cache layout, and isolated state.

Every end-to-end test runs real worker processes on that model; nothing in diffusers, torch,
ZeroMQ or PyAV is mocked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from orchestrator.placement.fork_client import ForkServer
from protocol.model_ids import TINY_REPO_ID

REPO_ROOT = Path(__file__).resolve().parents[1]

# Inductor compiles a graph's C++ kernels in a pool of processes when the host has more than one CPU: on
# CI's two cores, starting that pool (a process importing torch, and its workers) for every compiling
# process, this one included, costs more than the tiny model's few kernels take to compile in the process
# itself. The kernels, and the bits they compute, are the same either way. (The environment of every
# `ltx2` and stage process the tests start inherits it.)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# OpenMP's threads (torch's and MKL's intra-op pool, two on CI) spin for a while after every parallel
# region before they sleep. The tiny model's ops are over in microseconds, so a worker's second thread
# spent most of its time spinning, on the core the process beside it needed: an `ltx2 generate` of a tiny
# clip took 6.5-6.9 s of CPU with the threads sleeping at once (`PASSIVE`) against 9.6-12.4 s. The maths,
# and so the bits, are the same (the latents and the MP4 were identical).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Small enough for two CPU cores, large enough to exercise every path (17 frames = 5 tiny latents).
TINY_ARGS = ["--width", "64", "--height", "64", "--num-frames", "17"]


def build_tiny_family(hf_home: Path, family: str) -> Path:
    """`ltx2 tiny-model --family FAMILY --hf-cache` into `hf_home`'s hub cache; its snapshot folder."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "tiny-model", "--family", family, "--hf-cache"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    snapshot = Path(result.stdout.strip())
    assert snapshot.parent.parent.name == f"models--ltx2-stages--tiny-random-ltx{family}"
    return snapshot


# The families whose tiny models the session builds beside its first tests, and the fixture of each.
OTHER_FAMILY_FIXTURES = {"2.3": "tiny_23_model_dir", "2.5": "tiny_25_model_dir"}


@dataclasses.dataclass
class TinyModels:
    """The session's HF_HOME and the builds of the other families' tiny models started in it."""

    home: Path
    builds: dict[str, Future[Path]]

    def snapshot(self, family: str) -> Path:
        """The family's snapshot folder, from its build started at the session's start, or built now."""
        build = self.builds.get(family)
        return build.result() if build is not None else build_tiny_family(self.home, family)


def other_families_needed(session: pytest.Session) -> list[str]:
    """The families of OTHER_FAMILY_FIXTURES whose tiny model a selected test uses: through its fixture,
    or as a family parameter (the fixtures that pick a model by family as the test runs)."""
    needed = set()
    for item in session.items:
        params = item.callspec.params.values() if hasattr(item, "callspec") else ()
        for family, fixture in OTHER_FAMILY_FIXTURES.items():
            if fixture in item.fixturenames or any(value == family for value in params):
                needed.add(family)
    return sorted(needed)


@pytest.fixture(scope="session")
def tiny_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyModels]:
    """An HF_HOME whose hub cache holds the tiny model under its repo id, built first; the other families'
    models the session needs are built one at a time beside it and the tests that need only it (each
    build is a process importing torch and diffusers on one core), for their fixtures to take."""
    home = tmp_path_factory.mktemp("hf_home")
    with ThreadPoolExecutor(max_workers=1) as beside:
        builds = {
            family: beside.submit(build_tiny_family, home, family) for family in other_families_needed(request.session)
        }
        env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            [sys.executable, "-m", "services.tiny_model", "--hf-cache"], env=env, check=True, capture_output=True
        )
        yield TinyModels(home, builds)


@pytest.fixture(scope="session")
def hf_home(tiny_models: TinyModels) -> Path:
    """An HF_HOME whose hub cache holds the tiny model under its repo id."""
    return tiny_models.home


@pytest.fixture(scope="session")
def tiny_model_dir(hf_home: Path) -> Path:
    """The tiny model's snapshot folder inside the hub cache."""
    snapshots = list((hf_home / "hub").glob("models--ltx2-stages--tiny-random-ltx2/snapshots/*"))
    assert len(snapshots) == 1
    return snapshots[0]


@pytest.fixture(scope="session")
def tiny_23_model_dir(tiny_models: TinyModels) -> Path:
    """The tiny LTX-2.3 model (BWE vocoder, 2.3 transformer flags), built into the same hub cache
    under its own repo id by `ltx2 tiny-model --family 2.3 --hf-cache`."""
    return tiny_models.snapshot("2.3")


@pytest.fixture(scope="session")
def tiny_25_model_dir(tiny_models: TinyModels) -> Path:
    """The tiny LTX-2.5 model (Gemma 4 unified text encoder, 2.5 transformer flags), built by
    `ltx2 tiny-model --family 2.5 --hf-cache`."""
    return tiny_models.snapshot("2.5")


@pytest.fixture(scope="session")
def fork_server() -> Iterator[ForkServer]:
    """One fork server for the orchestrators that tests run inside this process (pass it to
    `WorkerLink(shared_fork_server=...)`), as a daemon's lanes share theirs.

    A link with a server of its own starts one per job, and each imports torch, diffusers and every
    stage module before its first fork: 4-5 s of one of CI's two cores, a dozen times a session. The
    workers are the same either way: forked from those modules, with this process's environment.
    """
    server = ForkServer()
    server.warm()  # the imports overlap whatever the first user does before its first worker
    yield server
    server.close()


def render_in_process(job: Any, settings: Any, fork_server: ForkServer) -> None:
    """Run `job` (a JobDir) to its MP4 in this process, as `ltx2 generate` would, its workers forked
    from the session's `fork_server`."""
    import zmq

    from orchestrator.placement.worker_link import WorkerLink
    from orchestrator.run.job_hooks import JobHooks
    from orchestrator.run.stage_major import run_job_stage_major

    context = zmq.Context()
    link = WorkerLink(context, shared_fork_server=fork_server)
    try:
        run_job_stage_major(job, settings, link, JobHooks())
    finally:
        link.close()
        context.term()


# The fixture holding each family's tiny model.
FAMILY_MODEL_FIXTURES = {"2.0": "tiny_model_dir", "2.3": "tiny_23_model_dir", "2.5": "tiny_25_model_dir"}


@pytest.fixture(scope="module", params=tuple(FAMILY_MODEL_FIXTURES))
def family(request: pytest.FixtureRequest) -> str:
    """A test (or module fixture) that uses it runs once per supported model family."""
    return request.param


@pytest.fixture(scope="module")
def family_model_dir(family: str, request: pytest.FixtureRequest) -> Path:
    """The tiny model of `family`."""
    return request.getfixturevalue(FAMILY_MODEL_FIXTURES[family])


def ltx2_environment(hf_home: Path, root: Path) -> dict[str, str]:
    """Environment for running `ltx2` in a subprocess: offline tiny cache, private state and outputs."""
    return {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "LTX2_STATE_DIR": str(root / "state"),
        "LTX2_OUTPUT_DIR": str(root / "outputs"),
        "LTX2_CONFIG": "",
        "XDG_CONFIG_HOME": str(root / "xdg-config"),
        "LTX2_DEVICES": "1",  # one lane whatever GPUs the host has; tests of lanes set their own
    }


@pytest.fixture
def ltx2_env(hf_home: Path, tmp_path: Path) -> dict[str, str]:
    return ltx2_environment(hf_home, tmp_path)


def daemon_environment(hf_home: Path, root: Path) -> dict[str, str]:
    """ltx2_environment plus a short private runtime dir (ipc paths must stay under 108 bytes) and a
    fault dir for the LTX2_FAULT_* switches (`root`/faults)."""
    runtime = Path(f"/tmp/ltx2-test-{os.getpid()}-{root.name[-12:]}")
    runtime.mkdir(mode=0o700, exist_ok=True)
    (root / "faults").mkdir()
    return {**ltx2_environment(hf_home, root), "XDG_RUNTIME_DIR": str(runtime), "LTX2_FAULT_DIR": str(root / "faults")}


@pytest.fixture
def daemon_env(hf_home: Path, tmp_path: Path) -> dict[str, str]:
    return daemon_environment(hf_home, tmp_path)


def submit_tiny(env: dict[str, str], prompt: str, *extra: str) -> str:
    """`ltx2 submit` of a tiny clip (seed 11 unless `extra` says otherwise); returns the job id."""
    result = run_ltx2(["submit", "--prompt", prompt, "--seed", "11", *TINY_ARGS, *extra], env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def run_ltx2(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def run_ltx2_two_at_a_time(runs: list[tuple[list[str], dict[str, str]]]) -> list[subprocess.CompletedProcess[str]]:
    """`run_ltx2(args, env)` of each independent run, two at a time; the results in the order given.

    Each `ltx2` process spends seconds on one core (its fork server importing torch and diffusers,
    the tiny model's mostly single-threaded stages) and idles between stages, so two side by side
    keep CI's two cores busy. Give each run its own state dir: nothing is shared but the model cache.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda run: run_ltx2(*run), runs))


# One tiny request that two modules render eagerly: test_reproducible renders it twice, test_compile
# compares its compiled render with it.
LIGHTHOUSE_FLAGS = ["--model", TINY_REPO_ID, "--prompt", "a lighthouse in a gale", "--seed", "7"]
LIGHTHOUSE_FLAGS += ["--width", "64", "--height", "64", "--num-frames", "9", "--quiet"]


@dataclasses.dataclass
class StartedRender:
    """An `ltx2 generate` running in the background, in a state dir and output folder of its own."""

    env: dict[str, str]  #: its environment: another render of the same request may go beside it
    run: Future[subprocess.CompletedProcess[str]]

    def finished(self) -> tuple[subprocess.CompletedProcess[str], Path]:
        """Its result, once it succeeded, and its job's directory (from the sidecar of its MP4)."""
        result = self.run.result()
        assert result.returncode == 0, result.stderr
        return result, job_dir_of(result)


def job_dir_of(result: subprocess.CompletedProcess[str]) -> Path:
    """The job directory of a finished `ltx2 generate`, named by the sidecar beside the MP4 it printed."""
    return Path(json.loads(Path(result.stdout.strip()).with_suffix(".json").read_text())["job_dir"])


@pytest.fixture(scope="session")
def eager_lighthouse(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartedRender]:
    """LIGHTHOUSE_FLAGS rendered once for the session, started in the background when first asked
    for: test_compile renders the compiled variant meanwhile (two processes keep CI's two cores busy),
    and test_reproducible takes it as the first of its two renders."""
    env = ltx2_environment(hf_home, tmp_path_factory.mktemp("lighthouse"))
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield StartedRender(env, pool.submit(run_ltx2, ["generate", *LIGHTHOUSE_FLAGS], env))


@dataclasses.dataclass
class CompiledRender:
    """A finished `ltx2 generate --compile` and the environment it ran in (its state dir holds the
    inductor cache it wrote, `compile-cache`)."""

    result: subprocess.CompletedProcess[str]
    env: dict[str, str]

    @property
    def compile_cache(self) -> Path:
        """The inductor cache the run left in its state dir (the run must have succeeded)."""
        assert self.result.returncode == 0, self.result.stderr
        return Path(self.env["LTX2_STATE_DIR"]) / "compile-cache"


@pytest.fixture(scope="session")
def compiled_lighthouse(
    hf_home: Path, tmp_path_factory: pytest.TempPathFactory, eager_lighthouse: StartedRender
) -> CompiledRender:
    """LIGHTHOUSE_FLAGS rendered with --compile, beside `eager_lighthouse` (which it starts): test_compile's
    first compiled render. test_nag's compiled run starts from a copy of its inductor cache, as a later
    job of the same state dir would: the kernels both graphs share are compiled once a session. It runs
    with LTX2_COMPILE_PACKAGES=1, so its cache also holds the blocks' Dynamo package, which test_compile's
    package test loads in one more run (the later runs without the switch use Inductor's cache alone)."""
    env = {
        **ltx2_environment(hf_home, tmp_path_factory.mktemp("compiled-lighthouse")),
        "LTX2_COMPILE_PACKAGES": "1",
    }
    return CompiledRender(run_ltx2(["generate", *LIGHTHOUSE_FLAGS, "--compile"], env), env)


def selected_in_module(request: pytest.FixtureRequest) -> list[pytest.Function]:
    """The tests of the requesting fixture's module that this session runs (after -k, node ids, ...):
    a module fixture that starts the tests' runs ahead of them starts only those."""
    return [item for item in request.session.items if item.module is request.module]


#: What a module starts ahead of the tests that check it (an `ltx2` run, or a daemon's whole scene): a
#: function of a root folder of its own (state, outputs, a daemon's files) and the HF_HOME, returning
#: what the test checks.
RunAhead = Callable[[Path, Path], Any]


def start_runs_ahead(
    runs: dict[str, RunAhead], hf_home: Path, tmp_path_factory: pytest.TempPathFactory, workers: int
) -> Iterator[dict[str, tuple[Future[Any], Path]]]:
    """For a module fixture: start `runs` in the background, `workers` at a time in the order given, each
    in a root folder of its own; yields each one's (future, root) by its name until the module ends.

    An `ltx2` run spends seconds on one core (its fork server importing torch and diffusers, the tiny
    model's mostly single-threaded stages) and a daemon's scene mostly waits (on a pause, a kill, a
    restart), so a run beside another, or beside the tests that need no run of their own, keeps CI's two
    cores busy."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        started = {}
        for name, run in runs.items():
            root = tmp_path_factory.mktemp("run")
            started[name] = (pool.submit(run, root, hf_home), root)
        yield started


@pytest.fixture(scope="module", autouse=True)
def runs_ahead(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Future[Any], Path]]]:
    """The module's RUNS_AHEAD, if it has any (a dict of RunAhead by the name of the test, or of the
    fixture, that checks each), that this session needs: started from the module's first test on,
    RUNS_AHEAD_AT_ONCE (default 1) at a time in the order given, beside the tests that make their own
    runs (start_runs_ahead). A test gets its own with `ran_ahead`."""
    registry: dict[str, RunAhead] = getattr(request.module, "RUNS_AHEAD", {})
    selected = selected_in_module(request)
    wanted = {item.originalname for item in selected} | {name for item in selected for name in item.fixturenames}
    runs = {name: run for name, run in registry.items() if name in wanted}
    if not runs:
        yield {}
        return
    at_once = getattr(request.module, "RUNS_AHEAD_AT_ONCE", 1)
    yield from start_runs_ahead(runs, request.getfixturevalue("hf_home"), tmp_path_factory, at_once)


@pytest.fixture
def ran_ahead(runs_ahead: dict[str, tuple[Future[Any], Path]], request: pytest.FixtureRequest) -> Any:
    """What this test's run in its module's RUNS_AHEAD returned, once it has finished (or its exception)."""
    return runs_ahead[request.node.originalname][0].result()


def probe_mp4(path: Path) -> dict[str, object]:
    """What a player sees in an MP4: streams, decoded frame count and durations (via PyAV)."""
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        info = {
            "video_codec": video.codec_context.name,
            "width": video.width,
            "height": video.height,
            "fps": float(video.average_rate),
            "video_seconds": float(video.duration * video.time_base),
            "audio_codec": audio.codec_context.name if audio else None,
            "audio_rate": audio.rate if audio else None,
            "audio_seconds": float(audio.duration * audio.time_base) if audio else 0.0,
        }
        info["frames"] = sum(1 for _ in container.decode(video=0))
    return info


def start_mps_stand_in(directory: Path) -> subprocess.Popen[bytes]:
    """A process standing in for a running CUDA MPS control daemon (protocol/cuda_mps.py recognises one by the live
    pid in `directory`'s pid file, named `nvidia-cuda-mps-control`): `sleep` started through a link of that name,
    its pid written where the daemon writes its own. This machine has no GPU and no MPS; CUDA joins a daemon by
    itself, and what the project decides (which pipe directory and priority each stage process gets) is what the
    tests check. The caller kills it."""
    from protocol import cuda_mps

    directory.mkdir(parents=True, exist_ok=True)
    program = directory / "bin" / "nvidia-cuda-mps-control"
    program.parent.mkdir(exist_ok=True)
    program.symlink_to("/bin/sleep")
    stand_in = subprocess.Popen([str(program), "3600"])
    comm, deadline = Path("/proc") / str(stand_in.pid) / "comm", time.monotonic() + 10
    while not comm.read_text().startswith(cuda_mps.DAEMON_PROGRAM):  # forked, not yet exec'd: python's name
        assert time.monotonic() < deadline, f"the stand-in never became {program.name}: {comm.read_text()!r}"
        time.sleep(0.01)
    (directory / cuda_mps.PID_FILE).write_text(f"{stand_in.pid}\n")
    return stand_in

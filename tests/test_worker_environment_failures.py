"""Environments lie (DESIGN.md rule 10): CUDA initialised by an import, a worker that cannot import.

On a GPU host torchao (imported by diffusers) or Transformer Engine may initialise CUDA at import;
a worker forked from the fork server then dies at its first CUDA call. Here the fault switch
LTX2_FAULT_CUDA_AT_IMPORT makes the server and its children behave exactly so (torch's own error
message), since a CPU cannot initialise CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import (
    REPO_ROOT,
    TINY_ARGS,
    RunAhead,
    ltx2_environment,
    probe_mp4,
    run_ltx2,
    selected_in_module,
    start_runs_ahead,
)

from protocol.errors import ExitCode
from protocol.files import JOB_FILE

FORK_WARNING = "fork server"
T = TypeVar("T")


def job_records(root: Path) -> list[dict]:
    return [json.loads((path / JOB_FILE).read_text()) for path in sorted((root / "state" / "jobs").iterdir())]


GENERATE = ["generate", "--prompt", "a harbour", "--seed", "3", *TINY_ARGS, "--quiet"]
# The `ltx2` run of each test below (a function of the run's root folder and the HF_HOME), by test name:
# started ahead of the tests, two at a time (`started_runs`).
RUNS: dict[str, RunAhead] = {}


def run_ahead(run: RunAhead) -> Callable[[T], T]:
    """Register `run` as the decorated test's `ltx2` run; the test gets it as `finished`."""

    def register(test: T) -> T:
        RUNS[test.__name__] = run
        return test

    return register


def run_in(root: Path, hf_home: Path, args: list[str], **environ: str) -> subprocess.CompletedProcess[str]:
    """`ltx2 ARGS` with state and outputs under `root`, plus `environ`."""
    return run_ltx2(args, {**ltx2_environment(hf_home, root), **environ})


@pytest.fixture(scope="module")
def started_runs(
    request: pytest.FixtureRequest, hf_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Future, Path]]]:
    """The runs of the tests this session runs, two at a time, in test order: with the fork server unusable
    every stage imports torch anew, and a process importing holds one core, so two runs take little longer
    than one on CI's two cores. Each run has its own root folder (state, outputs)."""
    selected = {item.originalname for item in selected_in_module(request)}
    runs = {name: run for name, run in RUNS.items() if name in selected}
    yield from start_runs_ahead(runs, hf_home, tmp_path_factory, workers=2)


@pytest.fixture
def finished(started_runs: dict, request: pytest.FixtureRequest) -> tuple[subprocess.CompletedProcess[str], Path]:
    """This test's run (its result, or the exception it raised) and its root folder."""
    future, root = started_runs[request.node.originalname]
    return future.result(), root


@run_ahead(
    lambda root, hf_home: run_in(root, hf_home, GENERATE, LTX2_FAULT_CUDA_AT_IMPORT="torchao", LTX2_FORK_SERVER="true")
)
def test_fork_server_whose_imports_initialise_cuda_gives_way_to_fresh_workers(finished: tuple):
    result, root = finished
    assert result.returncode == 0, result.stderr
    assert probe_mp4(Path(result.stdout.strip()))["frames"] == 17
    warnings = [line for line in result.stderr.splitlines() if FORK_WARNING in line]
    assert len(warnings) == 1 and "torchao" in warnings[0], result.stderr
    (record,) = job_records(root)
    assert [len(stage["attempts"]) for stage in record["stages"].values()] == [1, 1, 1]


def batch_of_two(root: Path, hf_home: Path) -> subprocess.CompletedProcess[str]:
    batch = root / "clips.toml"
    batch.write_text(
        '[defaults]\nwidth = 64\nheight = 64\nnum_frames = 9\n\n[[clips]]\nprompt = "one"\nseed = 1\n\n'
        '[[clips]]\nprompt = "two"\nseed = 2\nname = "second"\n'
    )
    cuda = {"LTX2_FAULT_CUDA_AT_IMPORT": "transformer_engine", "LTX2_FORK_SERVER": "true"}
    return run_in(root, hf_home, ["batch", str(batch), "--quiet"], **cuda)


@run_ahead(batch_of_two)
def test_a_batch_says_it_once_and_every_clip_renders(finished: tuple):
    result, root = finished
    assert result.returncode == 0, result.stderr
    assert sum(FORK_WARNING in line for line in result.stderr.splitlines()) == 1, result.stderr
    assert len(list((root / "outputs").glob("*.mp4"))) == 2


@run_ahead(
    lambda root, hf_home: run_in(
        root, hf_home, GENERATE, LTX2_FAULT_CUDA_AT_IMPORT="transformer_engine:hidden", LTX2_FORK_SERVER="true"
    )
)
def test_a_forked_worker_that_cannot_use_cuda_fails_once_without_walking_the_ladder(finished: tuple):
    result, root = finished
    assert result.returncode == ExitCode.ENVIRONMENT, result.stderr
    assert "re-initialize CUDA" in result.stderr
    (record,) = job_records(root)
    attempts = record["stages"]["encode_diffuse"]["attempts"]
    assert [a["result"] for a in attempts] == ["environment"]
    assert record["status"] == "failed"


def with_broken_diffusers(root: Path, hf_home: Path) -> subprocess.CompletedProcess[str]:
    broken = root / "broken-site"
    (broken / "diffusers").mkdir(parents=True)
    (broken / "diffusers" / "__init__.py").write_text("raise ImportError('diffusers is broken on this host')\n")
    return run_in(root, hf_home, GENERATE, LTX2_FORK_SERVER="false", PYTHONPATH=str(broken))


@run_ahead(with_broken_diffusers)
def test_a_worker_that_cannot_import_fails_once_as_an_environment_failure(finished: tuple):
    result, root = finished
    assert result.returncode == ExitCode.ENVIRONMENT, result.stderr
    # One line naming the worker's log, which holds the import error (the CLI prints no traceback).
    log = Path(result.stderr.strip().rsplit("worker log: ", 1)[1])
    assert "diffusers is broken on this host" in log.read_text()
    (record,) = job_records(root)
    assert [a["result"] for a in record["stages"]["encode_diffuse"]["attempts"]] == ["environment"]


def test_a_fork_server_whose_orchestrator_is_gone_exits_quietly(ltx2_env: dict):
    """An orchestrator that ends (a refused batch) while its warming server still imports closes the
    server's stdout; the server, which shares the orchestrator's stderr, must not print a traceback
    into it when it then says it is ready (CI saw one under `ltx2: error:`)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "services.forkserver"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=ltx2_env,
    )  # fmt: skip
    assert server.stdout is not None
    server.stdout.close()  # gone before the imports end
    server.stdout = None
    _, err = server.communicate(timeout=120)
    assert server.returncode == 0, err.decode()
    assert "Traceback" not in err.decode(), err.decode()

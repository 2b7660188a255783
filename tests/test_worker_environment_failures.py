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
from pathlib import Path

from conftest import REPO_ROOT, TINY_ARGS, probe_mp4, run_ltx2

from protocol.errors import ExitCode
from protocol.files import JOB_FILE

FORK_WARNING = "fork server"


def job_records(root: Path) -> list[dict]:
    return [json.loads((path / JOB_FILE).read_text()) for path in sorted((root / "state" / "jobs").iterdir())]


def test_fork_server_whose_imports_initialise_cuda_gives_way_to_fresh_workers(ltx2_env: dict, tmp_path: Path):
    env = {**ltx2_env, "LTX2_FAULT_CUDA_AT_IMPORT": "torchao", "LTX2_FORK_SERVER": "true"}
    result = run_ltx2(["generate", "--prompt", "a harbour", "--seed", "3", *TINY_ARGS, "--quiet"], env)
    assert result.returncode == 0, result.stderr
    assert probe_mp4(Path(result.stdout.strip()))["frames"] == 17
    warnings = [line for line in result.stderr.splitlines() if FORK_WARNING in line]
    assert len(warnings) == 1 and "torchao" in warnings[0], result.stderr
    (record,) = job_records(tmp_path)
    assert [len(stage["attempts"]) for stage in record["stages"].values()] == [1, 1, 1]


def test_a_batch_says_it_once_and_every_clip_renders(ltx2_env: dict, tmp_path: Path):
    env = {**ltx2_env, "LTX2_FAULT_CUDA_AT_IMPORT": "transformer_engine", "LTX2_FORK_SERVER": "true"}
    batch = tmp_path / "clips.toml"
    batch.write_text(
        '[defaults]\nwidth = 64\nheight = 64\nnum_frames = 9\n\n[[clips]]\nprompt = "one"\nseed = 1\n\n'
        '[[clips]]\nprompt = "two"\nseed = 2\nname = "second"\n'
    )
    result = run_ltx2(["batch", str(batch), "--quiet"], env)
    assert result.returncode == 0, result.stderr
    assert sum(FORK_WARNING in line for line in result.stderr.splitlines()) == 1, result.stderr
    assert len(list((tmp_path / "outputs").glob("*.mp4"))) == 2


def test_a_forked_worker_that_cannot_use_cuda_fails_once_without_walking_the_ladder(ltx2_env: dict, tmp_path: Path):
    env = {**ltx2_env, "LTX2_FAULT_CUDA_AT_IMPORT": "transformer_engine:hidden", "LTX2_FORK_SERVER": "true"}
    result = run_ltx2(["generate", "--prompt", "a harbour", "--seed", "3", *TINY_ARGS, "--quiet"], env)
    assert result.returncode == ExitCode.ENVIRONMENT, result.stderr
    assert "re-initialize CUDA" in result.stderr
    (record,) = job_records(tmp_path)
    attempts = record["stages"]["encode_diffuse"]["attempts"]
    assert [a["result"] for a in attempts] == ["environment"]
    assert record["status"] == "failed"


def test_a_worker_that_cannot_import_fails_once_as_an_environment_failure(ltx2_env: dict, tmp_path: Path):
    broken = tmp_path / "broken-site"
    (broken / "diffusers").mkdir(parents=True)
    (broken / "diffusers" / "__init__.py").write_text("raise ImportError('diffusers is broken on this host')\n")
    env = {**ltx2_env, "LTX2_FORK_SERVER": "false", "PYTHONPATH": str(broken)}
    result = run_ltx2(["generate", "--prompt", "a harbour", "--seed", "3", *TINY_ARGS, "--quiet"], env)
    assert result.returncode == ExitCode.ENVIRONMENT, result.stderr
    # One line naming the worker's log, which holds the import error (the CLI prints no traceback).
    log = Path(result.stderr.strip().rsplit("worker log: ", 1)[1])
    assert "diffusers is broken on this host" in log.read_text()
    (record,) = job_records(tmp_path)
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

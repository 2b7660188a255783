"""Stage overlap under hostile conditions (signals, killed workers, memory failures) with real processes:
the cases tests/test_stage_overlap.py leaves out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from conftest import REPO_ROOT, ltx2_environment, probe_mp4
from test_stage_overlap import CLIPS, side_by_side, span, write_batch

from orchestrator.run.stage_overlap import OverlapGate
from protocol.errors import Failure


def read_jobs(root: Path) -> dict[str, dict[str, Any]]:
    jobs = {}
    for job_dir in (root / "state" / "jobs").iterdir():
        record = json.loads((job_dir / "job.json").read_text())
        jobs[record["spec"]["name"]] = {"dir": job_dir, "record": record}
    return jobs


def kill_when_paused(pid_file: Path, timeout_s: float = 240.0) -> threading.Thread:
    """SIGKILL the worker LTX2_FAULT_PAUSE paused (its pid in `pid_file`), as the host's OOM killer would."""

    def kill() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text().strip():
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_memory_failure_of_a_wave_running_alone_leaves_the_run_overlapped(hf_home: Path, tmp_path: Path):
    """Wave 1's diffusion runs out of host memory (SIGKILL) while nothing runs beside it (there is no wave
    before it): overlap had no part in it, so it is retried and the later waves still overlap
    (docs/operations.md: the run stops overlapping after a memory failure "while the other side runs")."""
    (tmp_path / "faults").mkdir()
    env = {
        **ltx2_environment(hf_home, tmp_path),
        "LTX2_GROUP_SIZE": "1",
        "LTX2_OVERLAP_STAGES": "on",
        "LTX2_FAULT_DIR": str(tmp_path / "faults"),
        "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2",  # the first diffusion to get there: wave 1's
    }
    killer = kill_when_paused(tmp_path / "faults" / "paused-encode_diffuse.pid")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "batch", str(write_batch(tmp_path / "waves.toml")), "--quiet"],
        env=env, capture_output=True, text=True, timeout=400, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    killer.join()
    assert result.returncode == 0, result.stderr
    run = {"jobs": read_jobs(tmp_path)}
    attempts = run["jobs"]["wave1"]["record"]["stages"]["encode_diffuse"]["attempts"]
    assert [a["result"] for a in attempts] == ["host_oom", "ok"]
    outputs = sorted((tmp_path / "outputs").glob("wave*.mp4"))
    assert len(outputs) == CLIPS and all(probe_mp4(path)["frames"] == 17 for path in outputs)
    # Nothing ran beside wave 1's failed attempt ...
    assert span(run, 1, "encode_diffuse", 1)[1] <= span(run, 1, "audio_decode")[0]
    # ... so waves 2 and 3 still diffused beside the decoders of the wave before them.
    for clip in range(2, CLIPS + 1):
        assert side_by_side(run, clip), clip


def test_a_memory_failure_with_the_other_side_idle_neither_waits_nor_ends_overlap():
    gate = OverlapGate()
    with gate.running("diffusion"):
        gate.wait_alone("diffusion", lambda: None)  # returns at once: no decoders' wave runs
    assert not gate.memory_failed
    with gate.running("decoders"), gate.running("diffusion"):
        gate.wait_alone("decoders", lambda: Failure.INTERRUPTED)
    assert gate.memory_failed


def test_a_memory_failure_counts_as_overlapped_when_the_other_sides_wave_ended_during_the_attempt():
    gate = OverlapGate()
    started = time.time()
    with gate.running("diffusion"):
        pass  # the other side's wave ran, and ended, while the failed attempt ran
    gate.wait_alone("decoders", lambda: None, since=started)
    assert gate.memory_failed
    later = OverlapGate()
    with later.running("diffusion"):
        pass
    later.wait_alone("decoders", lambda: None, since=time.time() + 1)  # the attempt started after it ended
    assert not later.memory_failed

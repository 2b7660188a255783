"""The daemon under the repo's supervisord.conf: queue, CLI, crash recovery, stage retries."""

from __future__ import annotations

import json
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from conftest import TINY_ARGS, RunAhead, daemon_environment, job_dir_of, probe_mp4, run_ltx2, submit_tiny
from safetensors.torch import load_file
from supervised import Supervised, wait_for_file

from protocol import jobs
from protocol.files import LATENTS_FILE


def submit(env: dict, *extra: str) -> str:
    return submit_tiny(env, "a jib shot over a forge", *extra)


def decoded_frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_supervised_daemon_runs_submitted_jobs_in_order(daemon_env: dict, tmp_path: Path):
    with Supervised(tmp_path, daemon_env):
        first, second = submit(daemon_env), submit(daemon_env, "--name", "second")
        third = submit(daemon_env)
        cancelled = run_ltx2(["cancel", third], daemon_env)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
        watched = run_ltx2(["watch", second], daemon_env)
        assert watched.returncode == 0, watched.stderr
        info = probe_mp4(Path(watched.stdout.strip()))
        assert (info["frames"], info["width"], info["height"], info["audio_codec"]) == (17, 64, 64, "aac")
        listing = json.loads(run_ltx2(["jobs", "--json"], daemon_env).stdout)
        assert [(j["id"], j["state"]) for j in listing] == [(first, "done"), (second, "done"), (third, "cancelled")]
        # In order: the first never ends after the second (equal when the executor claimed both
        # as one stage-major group because the second was queued before the first started).
        assert listing[0]["updated"] <= listing[1]["updated"]
        status = run_ltx2(["status", second], daemon_env).stdout
        assert "video_decode attempt 1 [single pass]: ok" in status
        digest = json.loads(Path(listing[1]["output"]).with_suffix(".json").read_text())["request_digest"]
        assert f"request digest: {digest}\n" in status  # exact: no "not reproducible" after it
        events = run_ltx2(["logs", second], daemon_env).stdout.split("--- events ---\n")[1].split("\n--- ")[0]
        assert re.search(r"^\d\d:\d\d:\d\d\.\d{3}  job_done\b", events, re.MULTILINE), events  # read, not JSON
        stored = run_ltx2(["logs", second, "--json"], daemon_env).stdout.split("--- events ---\n")[1].split("\n--- ")[0]
        assert "job_done" in [json.loads(line)["event"] for line in stored.splitlines()]  # --json: as stored
        # The same request again with --reuse: a finished job of its digest is named, nothing is queued.
        reused = run_ltx2(
            ["submit", "--prompt", "a jib shot over a forge", "--seed", "11", *TINY_ARGS, "--reuse"], daemon_env
        )
        assert reused.returncode == 0, reused.stderr
        assert reused.stdout.strip() in (first, second) and "reused job" in reused.stderr
        assert len(json.loads(run_ltx2(["jobs", "--json"], daemon_env).stdout)) == 3
        assert run_ltx2(["cancel", first], daemon_env).returncode == 1
        assert "already done" in run_ltx2(["cancel", first], daemon_env).stderr


def test_submit_with_bad_flag_is_rejected_with_exit_2(daemon_env: dict, tmp_path: Path):
    with Supervised(tmp_path, daemon_env):
        result = run_ltx2(["submit", "--prompt", "x", "--width", "100"], daemon_env)
        assert result.returncode == 2
        assert "--width: must be a multiple of 32" in result.stderr


def test_worker_killed_in_each_stage_is_retried_and_matches_an_undisturbed_run(daemon_env: dict, tmp_path: Path):
    pauses = "encode_diffuse:denoise:3,audio_decode:decode audio:0,video_decode:load video VAE:0"
    env = {**daemon_env, "LTX2_FAULT_PAUSE": pauses}
    # The undisturbed run goes beside the killed one, in a state dir and output folder of its own: the
    # daemon's run mostly waits (for a pause, a kill, a retry), leaving a core to it.
    undisturbed_env = {
        **daemon_env,
        "LTX2_STATE_DIR": str(tmp_path / "undisturbed"),
        "LTX2_OUTPUT_DIR": str(tmp_path / "undisturbed-outputs"),
    }
    request = ["generate", "--prompt", "a jib shot over a forge", "--seed", "11", *TINY_ARGS]
    with ThreadPoolExecutor(max_workers=1) as beside:
        undisturbed_run = beside.submit(run_ltx2, request, undisturbed_env)
        with Supervised(tmp_path / "run", env) as supervised:
            job_id = submit(env)
            for stage in ("encode_diffuse", "audio_decode", "video_decode"):
                marker = wait_for_file(Path(env["LTX2_FAULT_DIR"]) / f"paused-{stage}.pid")
                os.kill(int(marker.read_text()), signal.SIGKILL)
            job = supervised.wait_for_state(job_id, {"done", "failed"})
        reference = undisturbed_run.result()
    assert job["state"] == "done", job["error"]
    results = [(a["stage"], a["result"]) for a in job["attempts"]]
    assert results == [
        ("encode_diffuse", "host_oom"),
        ("encode_diffuse", "ok"),
        ("audio_decode", "host_oom"),
        ("audio_decode", "ok"),
        ("video_decode", "host_oom"),
        ("video_decode", "ok"),
    ]
    assert reference.returncode == 0, reference.stderr
    reference_dir = job_dir_of(reference)
    killed, undisturbed = load_file(Path(job["job_dir"]) / LATENTS_FILE), load_file(reference_dir / LATENTS_FILE)
    # Bit-equal (DESIGN.md rule 6): every process of ours runs MKL in its reproducible mode on a fixed thread
    # count (services/__init__.py); a resume from the wrong point or the wrong noise differs by O(1).
    differ = {k: float((killed[k] - undisturbed[k]).abs().max()) for k in ("video", "audio")}
    assert max(differ.values()) == 0.0, (differ, job["attempts"], (reference_dir / "job.json").read_text())
    frames, expected = decoded_frames(Path(job["output"])), decoded_frames(Path(reference.stdout.strip()))
    assert frames.shape == expected.shape == (17, 64, 64, 3)
    assert np.array_equal(frames, expected)
    assert not list(Path(job["job_dir"]).glob(".*.tmp-*"))


def daemon_killed_mid_job(root: Path, hf_home: Path) -> dict[str, object]:
    """Two jobs queued, the first paused in diffusion, the daemon SIGKILLed there; supervisord's next
    daemon runs both to their end. The jobs as they ended, and whether the paused worker is gone."""
    env = {**daemon_environment(hf_home, root), "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2"}
    with Supervised(root, env) as supervised:
        first, second = submit(env), submit(env)
        marker = wait_for_file(Path(env["LTX2_FAULT_DIR"]) / "paused-encode_diffuse.pid")
        orphan = int(marker.read_text())
        with supervised.client() as client:
            old_pid = client.request(jobs.Ping(""))["pid"]
        os.kill(old_pid, signal.SIGKILL)
        supervised.wait_until_serving(previous_pid=old_pid)
        done = [supervised.wait_for_state(job_id, {"done", "failed"}) for job_id in (first, second)]
    orphan_gone = not Path(f"/proc/{orphan}").exists() or "Z" in Path(f"/proc/{orphan}/stat").read_text().split()[2]
    return {"done": done, "orphan_gone": orphan_gone}


def test_daemon_killed_mid_job_is_restarted_and_finishes_every_job(ran_ahead: dict):
    done = ran_ahead["done"]
    assert [job["state"] for job in done] == ["done", "done"], [job["error"] for job in done]
    assert ran_ahead["orphan_gone"]
    record = json.loads((Path(done[0]["job_dir"]) / "job.json").read_text())
    assert [a["result"] for a in record["stages"]["encode_diffuse"]["attempts"]] == ["interrupted", "ok"]
    for job in done:
        assert probe_mp4(Path(job["output"]))["frames"] == 17


def injected_faults(root: Path, hf_home: Path) -> dict[str, object]:
    """A job whose audio worker is SIGKILLed twice and whose video decode runs out of CUDA memory once;
    the job as it ended and what `ltx2 status` says of it."""
    env = {**daemon_environment(hf_home, root), "LTX2_FAULT_OOM": "video_decode:1", "LTX2_FAULT_KILL": "audio_decode:2"}
    with Supervised(root, env) as supervised:
        job_id = submit(env)
        job = supervised.wait_for_state(job_id, {"done", "failed"})
        status = run_ltx2(["status", job_id], env).stdout
    return {"job": job, "status": status}


def test_injected_oom_and_host_kills_walk_the_ladders_and_show_in_status(ran_ahead: dict):
    job, status = ran_ahead["job"], ran_ahead["status"]
    assert job["state"] == "done", job["error"]
    assert "audio_decode attempt 1 [device auto]: host_oom" in status
    assert "audio_decode attempt 2 [device auto]: host_oom" in status
    assert "audio_decode attempt 3 [device cpu]: ok" in status
    assert "video_decode attempt 1 [single pass]: cuda_oom" in status
    assert "video_decode attempt 2 [spatial tiling]: ok" in status
    assert probe_mp4(Path(job["output"]))["frames"] == 17
    # Its files are not what the request renders undisturbed, and `ltx2 status` says why.
    assert "(not reproducible: audio_decode ran on another plan than its request's (device cpu))" in status


def jobs_queued_behind_a_running_one(root: Path, hf_home: Path) -> dict[str, object]:
    """A job paused in diffusion while two more queue up behind it, then its worker SIGKILLed; the three
    jobs as they ended, and the ids of the two queued."""
    env = {**daemon_environment(hf_home, root), "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2"}
    with Supervised(root, env) as supervised:
        first = submit(env)
        marker = wait_for_file(Path(env["LTX2_FAULT_DIR"]) / "paused-encode_diffuse.pid")
        # While the first job runs, two more queue up behind it; the executor then claims both.
        queued = [submit(env, "--seed", "12"), submit(env, "--seed", "13", "--name", "third")]
        os.kill(int(marker.read_text()), signal.SIGKILL)
        done = [supervised.wait_for_state(job_id, {"done", "failed"}) for job_id in (first, *queued)]
    return {"done": done, "queued": queued}


def test_jobs_queued_behind_a_running_one_with_the_same_model_run_as_one_group(ran_ahead: dict):
    done, queued = ran_ahead["done"], ran_ahead["queued"]
    assert [job["state"] for job in done] == ["done"] * 3, [job["error"] for job in done]
    for job in done[1:]:
        record = json.loads((Path(job["job_dir"]) / "job.json").read_text())
        for stage in ("encode_diffuse", "audio_decode", "video_decode"):
            assert [(a["result"], a["group"]) for a in record["stages"][stage]["attempts"]] == [("ok", queued)]
        assert probe_mp4(Path(job["output"]))["frames"] == 17
    first_record = json.loads((Path(done[0]["job_dir"]) / "job.json").read_text())
    assert all("group" not in a for a in first_record["stages"]["encode_diffuse"]["attempts"])


# Each daemon scene above runs ahead (conftest's `runs_ahead`), one at a time from the module's first
# test on, each with a supervised daemon of its own: a scene mostly waits (on a pause, a kill, a
# restart), leaving a core to the tests before it.
RUNS_AHEAD: dict[str, RunAhead] = {
    "test_daemon_killed_mid_job_is_restarted_and_finishes_every_job": daemon_killed_mid_job,
    "test_injected_oom_and_host_kills_walk_the_ladders_and_show_in_status": injected_faults,
    "test_jobs_queued_behind_a_running_one_with_the_same_model_run_as_one_group": jobs_queued_behind_a_running_one,
}

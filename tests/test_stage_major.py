"""Stage-major batches: one worker process per stage for a group of clips, each model loaded once,
results equal to clips rendered one by one, and a crash inside a group costs only the crashed clip."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import zmq
from conftest import REPO_ROOT, probe_mp4, run_ltx2
from supervised import wait_for_file
from test_image_to_video import picture  # noqa: F401  (a module-scoped fixture)
from test_loras import lora_files  # noqa: F401  (a module-scoped fixture)

from config.settings import load_settings
from orchestrator.placement.fork_client import ForkServer
from orchestrator.placement.worker_link import WorkerLink
from orchestrator.run.job_end import JobStopped
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.pipeline import JobHooks
from orchestrator.run.policy import initial_plan
from orchestrator.run.stage_major import form_groups, run_stage_major
from protocol.errors import Failure
from protocol.files import LATENTS_FILE, Stage
from protocol.spec import JobSpec
from protocol.stage_request import StageRequest
from services.denoising import loaded_denoiser
from services.latents import read_latents
from services.runtime import Reporter, WorkerContext

TINY = "ltx2-stages/tiny-random-ltx2"
TINY_FLAGS = ["--width", "64", "--height", "64", "--num-frames", "9"]


def write_batch(path: Path, clips: list[dict[str, object]]) -> Path:
    lines = [f'[defaults]\nmodel = "{TINY}"\nwidth = 64\nheight = 64\nnum_frames = 9\n']
    for clip in clips:
        lines.append("[[clips]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in clip.items()))
    path.write_text("\n".join(lines))
    return path


def clip_flags(clip: dict[str, object]) -> list[str]:
    """The `ltx2 generate` flags of a batch file's clip."""
    return [f"--{key.replace('_', '-')}={value}" for key, value in clip.items()]


def jobs_by_name(env: dict[str, str]) -> dict[str, JobDir]:
    jobs = [JobDir.load(path) for path in (Path(env["LTX2_STATE_DIR"]) / "jobs").iterdir()]
    return {job.spec.name: job for job in jobs}


def attempts(job: JobDir, stage: Stage) -> list[tuple[str, int]]:
    """(result, size of the group it ran in; 1 when alone) of each attempt of a stage."""
    return [(a.result, len(a.group or [job.id])) for a in job.stage_record(stage).attempts]


def test_batch_loads_each_model_once_per_stage_and_matches_clips_rendered_alone(
    ltx2_env: dict,
    tmp_path: Path,
    picture: Path,  # noqa: F811
):
    clips = [
        {"name": "kite", "prompt": "a red kite over dunes", "seed": 1},
        {"name": "harbour", "prompt": "a harbour at dawn", "seed": 2, "image": str(picture)},
        {"name": "forest", "prompt": "fog in a pine forest", "seed": 3},
    ]
    # The second and third clips rendered on their own by `ltx2 generate`, one after the other beside the
    # batch (each in a state dir of its own): the batch is one process at a time, leaving a core to them.
    alone_envs = [{**ltx2_env, "LTX2_STATE_DIR": str(tmp_path / "alone" / clip["name"])} for clip in clips[1:]]
    commands = [["generate", "--model", TINY, *TINY_FLAGS, *clip_flags(clip), "--quiet"] for clip in clips[1:]]
    with ThreadPoolExecutor(max_workers=1) as beside:
        singles_run = beside.submit(lambda: [run_ltx2(*run) for run in zip(commands, alone_envs, strict=True)])
        result = run_ltx2(["batch", str(write_batch(tmp_path / "three.toml", clips)), "--quiet"], ltx2_env)
        singles = singles_run.result()
    assert result.returncode == 0, result.stderr
    jobs = jobs_by_name(ltx2_env)
    order = [jobs[name].id for name in ("kite", "harbour", "forest")]
    for job in jobs.values():
        for stage in Stage:
            record = job.stage_record(stage).attempts
            assert [(a.result, a.group) for a in record] == [("ok", order)], (job.spec.name, stage)
    # One process per stage for all three clips: each model appears once in the group's log,
    # and every member's log is that same file.
    leader = jobs["kite"]
    logs = {stage: leader.log_path(stage, 1) for stage in Stage}
    diffusion_log = logs[Stage.ENCODE_DIFFUSE].read_text()
    assert diffusion_log.count("load transformer") == 1
    assert diffusion_log.count("load video VAE for the conditioning image") == 1
    assert diffusion_log.count("job started") == 3
    # Jobs 2 and 3 found their prompt's embeddings read ahead while the job before them denoised
    # (services/embedding_cache.ReadAhead); their latents are checked against clips rendered alone below.
    assert diffusion_log.count("prompt embeddings read ahead") == 2
    # ... a read each of jobs 1 and 2 started once its first step was queued, not beside the launches of that
    # step, which the GPU waits for (WorkerContext.first_step_done).
    jobs_logs = diffusion_log.split("job started")[1:]
    for job_log in jobs_logs[:2]:
        first_step = re.search(r": denoise[^\n]* 1/\d+", job_log)
        assert first_step is not None and job_log.count("reading the next job's prompt embeddings ahead") == 1
        assert job_log.index("reading the next job's prompt embeddings ahead") > first_step.start()
    assert "reading the next job's prompt embeddings ahead" not in jobs_logs[2]
    assert logs[Stage.AUDIO_DECODE].read_text().count("load audio decoder") == 1
    assert logs[Stage.VIDEO_DECODE].read_text().count("load video VAE") == 1
    for job in jobs.values():
        for stage in Stage:
            assert os.path.samefile(job.log_path(stage, 1), logs[stage])
        assert probe_mp4(Path(job.record.output))["frames"] == 9
    assert "(9/9 clip stages, ETA for the rest 0 s)" in result.stderr
    # Same seed, same bits as each clip rendered on its own by `ltx2 generate` (the second and
    # third clips ran on a transformer that had already denoised another clip).
    for clip, single, alone_env in zip(clips[1:], singles, alone_envs, strict=True):
        assert single.returncode == 0, single.stderr
        alone, _ = read_latents(jobs_by_name(alone_env)[clip["name"]].path / LATENTS_FILE)
        grouped, _ = read_latents(jobs[clip["name"]].path / LATENTS_FILE)
        assert torch.equal(grouped["video"], alone["video"]), clip["name"]
        assert torch.equal(grouped["audio"], alone["audio"]), clip["name"]


def test_clip_killed_inside_a_group_reruns_alone_and_the_unreached_clips_regroup(ltx2_env: dict, tmp_path: Path):
    clips = [{"name": f"clip{i}", "prompt": f"scene number {i}", "seed": i} for i in range(1, 5)]
    batch = write_batch(tmp_path / "four.toml", clips)
    faults = tmp_path / "faults"
    faults.mkdir()
    # The group worker stops as it opens its second clip; we SIGKILL it there, like the OOM killer.
    env = {**ltx2_env, "LTX2_FAULT_PAUSE": "encode_diffuse:job started:2", "LTX2_FAULT_DIR": str(faults)}
    command = [sys.executable, "-m", "orchestrator.cli", "batch", str(batch), "--quiet"]
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pid = int(wait_for_file(faults / "paused-encode_diffuse.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr.decode()
    jobs = jobs_by_name(ltx2_env)
    # clip1 finished inside the first group and was not redone; clip2 was killed there and ran
    # alone; clip3 and clip4, never reached, formed a second group.
    assert attempts(jobs["clip1"], Stage.ENCODE_DIFFUSE) == [("ok", 4)]
    assert attempts(jobs["clip2"], Stage.ENCODE_DIFFUSE) == [("host_oom", 4), ("ok", 1)]
    assert attempts(jobs["clip3"], Stage.ENCODE_DIFFUSE) == [("ok", 2)]
    assert attempts(jobs["clip4"], Stage.ENCODE_DIFFUSE) == [("ok", 2)]
    for job in jobs.values():
        assert attempts(job, Stage.AUDIO_DECODE) == [("ok", 4)]
        assert attempts(job, Stage.VIDEO_DECODE) == [("ok", 4)]
        assert probe_mp4(Path(job.record.output))["frames"] == 9
    summary = stdout.decode().splitlines()
    assert [line.split()[2] for line in summary[1:]] == ["rendered"] * 4


def test_clips_with_different_loras_get_their_own_diffusion_process_after_one_prompt_encoding(
    ltx2_env: dict,
    tmp_path: Path,
    lora_files: dict[str, Path],  # noqa: F811
):
    lora = [{"source": str(lora_files["diffusers"]), "scale": 0.8}]
    clips = [
        {"name": "plain1", "prompt": "a quiet pond", "seed": 1},
        {"name": "styled", "prompt": "a quiet pond", "seed": 1, "loras": lora},
        {"name": "plain2", "prompt": "a busy street", "seed": 2},
    ]
    batch = tmp_path / "loras.jsonl"  # JSON Lines: the LoRA lists are plain JSON
    defaults = {"model": TINY, "width": 64, "height": 64, "num_frames": 9}
    batch.write_text("\n".join(json.dumps(row) for row in [{"defaults": defaults}, *clips]))
    result = run_ltx2(["batch", str(batch), "--quiet"], ltx2_env)
    assert result.returncode == 0, result.stderr
    # Two diffusion processes (the LoRA is fused into the transformer), so the prompts were
    # encoded first, in one process, with one text-encoder load; no diffusion process loads it.
    assert "batch: encoded 2 prompt(s) with 1 text-encoder load(s); 0 cached already" in result.stderr
    jobs = jobs_by_name(ltx2_env)
    assert attempts(jobs["plain1"], Stage.ENCODE_DIFFUSE) == [("ok", 2)]
    assert attempts(jobs["plain2"], Stage.ENCODE_DIFFUSE) == [("ok", 2)]
    assert attempts(jobs["styled"], Stage.ENCODE_DIFFUSE) == [("ok", 1)]
    for job in jobs.values():
        assert "load text encoder" not in job.log_path(Stage.ENCODE_DIFFUSE, 1).read_text()
        assert attempts(job, Stage.VIDEO_DECODE) == [("ok", 3)]  # decoders never see LoRAs
    plain, styled = (read_latents(jobs[name].path / LATENTS_FILE)[0]["video"] for name in ("plain1", "styled"))
    assert float((plain - styled).abs().max()) > 1e-3  # same prompt and seed: the LoRA made the difference


def make_job(root: Path, name: str, loras: tuple[dict, ...] = (), **fields: object) -> JobDir:
    base = {"prompt": name, "model": TINY, "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
    spec = JobSpec.from_dict({**base, **fields})
    return JobDir.create(root, spec, ResolvedModel(TINY, root / "model", "abc"), job_id=name, loras=loras)


@pytest.mark.parametrize("group_size, expected", [(8, [["a", "c", "e"], ["b", "d"]]), (2, [["a", "c"], ["b", "d"]])])
def test_groups_share_model_and_loras_keep_order_and_respect_the_size_limit(
    tmp_path: Path, group_size: int, expected: list[list[str]]
):
    settings = load_settings(environ={"LTX2_STATE_DIR": str(tmp_path), "LTX2_GROUP_SIZE": str(group_size)})
    lora = ({"source": "dolly-in", "path": "/x.safetensors", "scale": 1.0, "revision": "r"},)
    jobs = [
        make_job(tmp_path, "a"),
        make_job(tmp_path, "b", loras=lora),
        make_job(tmp_path, "c"),
        make_job(tmp_path, "d", loras=lora),
        make_job(tmp_path, "e"),
        make_job(tmp_path, "f", dtype="bfloat16"),  # different weights in memory: alone
    ]
    groups = form_groups(jobs, Stage.ENCODE_DIFFUSE, settings)
    assert [[job.id for job in members] for _, members in groups] == expected
    # The decoders never see LoRAs: those clips share decoder processes.
    decode_groups = form_groups(jobs, Stage.AUDIO_DECODE, settings)
    assert [[job.id for job in members] for _, members in decode_groups] == (
        [["a", "b", "c", "d", "e"]] if group_size == 8 else [["a", "b"], ["c", "d"]]
    )


def test_group_size_one_turns_stage_major_off(tmp_path: Path):
    settings = load_settings(environ={"LTX2_STATE_DIR": str(tmp_path), "LTX2_GROUP_SIZE": "1"})
    jobs = [make_job(tmp_path, name) for name in "abc"]
    assert form_groups(jobs, Stage.VIDEO_DECODE, settings) == []
    with pytest.raises(ValueError, match="group_size must be a whole number >= 1"):
        load_settings(environ={"LTX2_STATE_DIR": str(tmp_path), "LTX2_GROUP_SIZE": "0"})


def test_member_with_invalid_input_fails_alone_and_the_group_goes_on(
    tiny_model_dir: Path, tmp_path: Path, fork_server: ForkServer
):
    settings = load_settings(
        environ={"LTX2_STATE_DIR": str(tmp_path / "state"), "LTX2_OUTPUT_DIR": str(tmp_path / "out"), "HOME": "/x"}
    )
    model = ResolvedModel(str(tiny_model_dir), tiny_model_dir, "local")
    base = {"model": str(tiny_model_dir), "width": 64, "height": 64, "num_frames": 9, "steps": 8}
    jobs = [
        JobDir.create(settings.jobs_dir, JobSpec.from_dict({**base, "prompt": f"clip {n}", "seed": n}), model)
        for n in range(3)
    ]
    context = zmq.Context()
    link = WorkerLink(context, shared_fork_server=fork_server)
    try:
        first = run_stage_major(jobs, settings, link, lambda job: JobHooks())
        assert all(isinstance(result, Path) for result in first.values())
        # The middle job's spec no longer matches its latents (as if job.json had been edited):
        # its audio decode must refuse them, alone, while the others decode again in one group.
        broken = jobs[1]
        broken.record.spec = broken.spec.with_changes(seed=99)
        broken.save()
        jobs = [JobDir.load(job.path) for job in jobs]
        for job in jobs:
            job.invalidate(Stage.AUDIO_DECODE)
        second = run_stage_major(jobs, settings, link, lambda job: JobHooks())
    finally:
        link.close()
        context.term()
    failure = second[broken.id]
    assert isinstance(failure, JobStopped) and failure.failure is Failure.INVALID_INPUT
    assert "made for another job spec" in failure.reason
    reloaded = {job.id: JobDir.load(job.path) for job in jobs}
    # One attempt in the group of three and no solo retry: bad input fails the same way every time.
    assert attempts(reloaded[broken.id], Stage.AUDIO_DECODE) == [("ok", 3), ("invalid_input", 3)]
    for job_id in (jobs[0].id, jobs[2].id):
        assert attempts(reloaded[job_id], Stage.AUDIO_DECODE) == [("ok", 3), ("ok", 3)]
        assert attempts(reloaded[job_id], Stage.VIDEO_DECODE) == [("ok", 3), ("ok", 2)]
        assert isinstance(second[job_id], Path) and probe_mp4(second[job_id])["frames"] == 9


def test_group_worker_reuses_the_denoiser_only_for_the_same_configuration(tiny_model_dir: Path, tmp_path: Path):
    settings = load_settings(environ={"LTX2_STATE_DIR": str(tmp_path), "HOME": str(tmp_path)})
    shared: dict = {}

    def context(name: str, **fields: object) -> WorkerContext:
        request = {"prompt": name, "model": str(tiny_model_dir), "width": 64, "height": 64, "num_frames": 9}
        built = build_spec({**request, "seed": 1, "dtype": "float32", **fields}, settings)
        job = JobDir.create(tmp_path / name, built.spec, built.model)
        plan = initial_plan(Stage.ENCODE_DIFFUSE, built.spec, settings)
        reporter = Reporter(Stage.ENCODE_DIFFUSE, job.id, None)
        request = StageRequest.of(job.record)
        return WorkerContext(Stage.ENCODE_DIFFUSE, job.path, request, plan, 1, reporter, shared)

    cpu = torch.device("cpu")
    first = loaded_denoiser(context("a"), cpu, torch.float32)
    assert loaded_denoiser(context("b"), cpu, torch.float32)["transformer"] is first["transformer"]
    other = loaded_denoiser(context("c", fp8_matmul=True), cpu, torch.float32)
    assert other["transformer"] is not first["transformer"] and shared["denoiser"] is other

"""Same request, same bits (DESIGN.md rule 6): two renders of one request give bit-equal latents and
byte-identical MP4 and WAV files, every job records a digest of what decided its bits, and `--reuse`
returns a finished render of the same digest without starting a stage."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LIGHTHOUSE_FLAGS, REPO_ROOT, StartedRender, job_dir_of, run_ltx2

from config.settings import load_settings
from orchestrator.run import reuse
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from orchestrator.run.policy import X264_THREADS, initial_plan
from protocol.files import AUDIO_FILE, LATENTS_FILE, Stage
from protocol.model_ids import TINY_REPO_ID
from services.latents import read_latents

FLAGS = LIGHTHOUSE_FLAGS


@dataclasses.dataclass
class Render:
    output: Path
    job: JobDir


@pytest.fixture(scope="module")
def renders(eager_lighthouse: StartedRender) -> tuple[dict[str, str], list[Render]]:
    """One request rendered twice by `ltx2 generate`, each a fresh set of stage processes, in one
    state dir: the session's render of it (which test_compile compares its compiled render with),
    then this module's."""
    env = eager_lighthouse.env
    first, _ = eager_lighthouse.finished()
    second = run_ltx2(["generate", *FLAGS], env)
    assert second.returncode == 0, second.stderr
    return env, [Render(Path(result.stdout.strip()), JobDir.load(job_dir_of(result))) for result in (first, second)]


def test_one_request_rendered_twice_gives_the_same_bits(renders: tuple[dict, list[Render]]):
    _, (first, second) = renders
    assert first.job.id != second.job.id and first.output != second.output
    assert first.output.read_bytes() == second.output.read_bytes()
    assert (first.job.path / AUDIO_FILE).read_bytes() == (second.job.path / AUDIO_FILE).read_bytes()
    latents = [read_latents(render.job.path / LATENTS_FILE)[0] for render in (first, second)]
    assert latents[0].keys() == latents[1].keys() == {"video", "audio"}
    for key in latents[0]:
        assert torch.equal(latents[0][key], latents[1][key]), key
    # One digest for both, shown in the sidecar with the mode and the verdict.
    sidecars = [json.loads(render.output.with_suffix(".json").read_text()) for render in (first, second)]
    assert sidecars[0]["request_digest"] == sidecars[1]["request_digest"] == first.job.record.request_digest
    assert len(sidecars[0]["request_digest"]) == 64
    assert sidecars[0]["deterministic"] is True
    assert sidecars[0]["reproducible"] == {"exact": True, "why": ""}
    # x264 ran on the fixed thread count, recorded in the attempt's plan.
    plan = first.job.stage_record(Stage.VIDEO_DECODE).attempts[-1].plan
    assert plan["x264_threads"] == X264_THREADS


def test_the_mp4_and_pngs_carry_the_prompt_seed_and_settings_that_made_them(renders: tuple[dict, list[Render]]):
    import av
    from PIL import Image

    _, (first, _) = renders
    with av.open(str(first.output)) as container:
        tags = dict(container.metadata)
    assert tags["title"] == "a lighthouse in a gale"
    request = json.loads(tags["comment"])
    assert (request["seed"], request["width"], request["num_frames"]) == (7, 64, 9)
    assert request["request_digest"] == first.job.record.request_digest and "name" not in request
    with Image.open(first.output.with_name(f"{first.output.stem}_first.png")) as still:
        assert json.loads(still.text["comment"]) == request and still.text["title"] == "a lighthouse in a gale"


def test_reuse_returns_the_last_render_of_the_digest_without_starting_a_stage(renders: tuple[dict, list[Render]]):
    env, (_, second) = renders
    jobs = Path(env["LTX2_STATE_DIR"]) / "jobs"
    before = sorted(jobs.iterdir())
    result = run_ltx2(["generate", *FLAGS, "--reuse"], env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == second.output
    assert f"reused job {second.job.id}" in result.stderr and "nothing rendered" in result.stderr
    assert sorted(jobs.iterdir()) == before  # no job was created, so no stage could have run


def test_reuse_never_returns_a_render_whose_files_are_gone_or_changed(renders: tuple[dict, list[Render]], tmp_path):
    env, (_, second) = renders
    settings = load_settings(environ={**env, "LTX2_STATE_DIR": env["LTX2_STATE_DIR"]})
    digest = second.job.record.request_digest
    assert reuse.find(digest, settings).id == second.job.id
    copy = tmp_path / "kept.mp4"
    copy.write_bytes(second.output.read_bytes())
    try:
        second.output.write_bytes(b"edited")  # the published MP4 no longer has the job's video's size
        assert reuse.find(digest, settings) is None
        second.output.unlink()
        assert reuse.find(digest, settings) is None
    finally:
        second.output.write_bytes(copy.read_bytes())
    assert reuse.find(digest, settings).id == second.job.id
    assert reuse.find("0" * 64, settings) is None


def test_a_job_finished_on_a_lower_memory_plan_is_not_exact_and_not_indexed(renders: tuple[dict, list[Render]]):
    env, (first, _) = renders
    job = JobDir.load(first.job.path)
    stage = job.stage_record(Stage.VIDEO_DECODE)
    last = stage.attempts[-1]
    tiled = {**last.plan, "decode": {**last.plan["decode"], "tiling": True}}
    stage.attempts = [dataclasses.replace(last, result="cuda_oom"), dataclasses.replace(last, attempt=2, plan=tiled)]
    verdict = reuse.reproducibility(job)
    assert verdict["exact"] is False and "video_decode ran on another plan" in verdict["why"], verdict
    assert reuse.remember(job, Path(env["LTX2_STATE_DIR"])) is False


@pytest.fixture
def settings(hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return load_settings(environ={"LTX2_STATE_DIR": str(tmp_path / "state")})


def digest_of(settings, **request) -> str:
    base = {"prompt": "a lighthouse", "model": TINY_REPO_ID, "seed": 7, "width": 64, "height": 64, "num_frames": 9}
    return build_spec({**base, **request}, settings).identity.digest


def test_the_digest_names_what_decides_the_bits_and_nothing_else(settings, tmp_path: Path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"first bytes")
    plain = digest_of(settings)
    assert digest_of(settings) == plain
    assert digest_of(settings, name="another_stem", drop_caches=True) == plain  # change no bit of the output
    assert digest_of(settings, seed=8) != plain
    assert digest_of(settings, compile=True) != plain
    assert digest_of(settings, fp8_matmul=True) != plain
    with_lora = digest_of(settings, loras=[{"source": str(lora)}])
    assert with_lora != plain
    assert digest_of(settings, loras=[{"source": str(lora), "scale": 0.5}]) != with_lora
    lora.write_bytes(b"other bytes")  # same path, other weights
    assert digest_of(settings, loras=[{"source": str(lora)}]) != with_lora
    off = dataclasses.replace(settings, deterministic=False)
    assert digest_of(off, compile=True) != digest_of(settings, compile=True)


def test_a_request_without_a_name_is_named_after_its_prompt_and_keeps_its_digest(settings):
    request = {"prompt": "A lighthouse, in the storm!", "model": TINY_REPO_ID, "seed": 7}
    unnamed = build_spec(request, settings)
    assert unnamed.spec.name == "a-lighthouse-in-the-storm"  # what every front door (CLI, batch, HTTP) gets
    named = build_spec({**request, "name": "keeper"}, settings)
    assert named.spec.name == "keeper"  # a --name is kept as given
    assert named.identity.digest == unnamed.identity.digest


def test_deterministic_mode_is_in_the_plans_and_leaves_with_the_compile(settings):
    spec = build_spec({"prompt": "a lighthouse", "model": TINY_REPO_ID, "compile": True}, settings).spec
    top = initial_plan(Stage.ENCODE_DIFFUSE, spec, settings)
    assert top["compile"] == "regional" and top["deterministic"] is True
    assert initial_plan(Stage.VIDEO_DECODE, spec, settings)["x264_threads"] == X264_THREADS
    off = dataclasses.replace(settings, deterministic=False)
    assert "deterministic" not in initial_plan(Stage.ENCODE_DIFFUSE, spec, off)
    assert "x264_threads" not in initial_plan(Stage.VIDEO_DECODE, spec, off)
    # A job keeps the mode it was created with, whatever the settings say later.
    assert initial_plan(Stage.ENCODE_DIFFUSE, spec, off, deterministic=True)["deterministic"] is True


ENCODE = """
import os, sys, numpy as np
from pathlib import Path
from services.media import Mp4Writer
os.sched_setaffinity(0, {int(cpu) for cpu in sys.argv[2].split(",")})
frames = np.random.default_rng(0).integers(0, 255, size=(17, 64 * 3 // 2, 64), dtype=np.uint8)
with Mp4Writer(Path(sys.argv[1]), 64, 64, 24.0, preset="veryfast", threads=int(sys.argv[3])) as writer:
    writer.add_audio(np.zeros((1, 24000), np.float32), 24000, 17)
    writer.write(frames)
    writer.close(17)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to run x264 on one and on two")
def test_x264_on_the_fixed_thread_count_writes_the_same_file_on_one_cpu_and_on_two(tmp_path: Path):
    cpus = sorted(os.sched_getaffinity(0))
    files = []
    for allowed in ([cpus[0]], cpus[:2]):
        target = tmp_path / f"on{len(allowed)}.mp4"
        command = [sys.executable, "-c", ENCODE, str(target), ",".join(map(str, allowed)), str(X264_THREADS)]
        subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True)
        files.append(target.read_bytes())
    assert files[0] == files[1]


def test_cached_prompt_embeddings_come_back_in_aligned_memory_like_fresh_ones(tmp_path: Path):
    """A worker reading the prompt cache must compute on inputs laid out as the worker that encoded them:
    safetensors' tensors sit at the file buffer's offset (8-byte aligned), torch's allocations at 64."""
    import torch

    from services import embedding_cache

    fresh = {"prompt_embeds": torch.randn(1, 77, 96), "prompt_attention_mask": torch.ones(1, 77, dtype=torch.int64)}
    path = tmp_path / "embeddings.safetensors"
    embedding_cache.store(path, fresh)
    loaded = embedding_cache.load(path, torch.device("cpu"))
    assert loaded is not None and loaded["negative_prompt_embeds"] is None
    for key, tensor in fresh.items():
        assert torch.equal(loaded[key], tensor) and loaded[key].is_contiguous()
        assert loaded[key].data_ptr() % 64 == 0 == tensor.data_ptr() % 64, key

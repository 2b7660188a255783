"""Context parallel (issue 30) on the CPU: two gloo processes holding half the tokens each give the latents
one process gives, within TOLERANCE.

First diffusers alone: tests/context_parallel_render.py runs LTX2Pipeline on the tiny model (fp32, one
thread per process) with the transformer sharded by diffusers' own context-parallel hooks
(services/context_parallel.py). Then the stage: `ltx2 generate --context-parallel 2` runs the diffusion
stage as two worker processes (orchestrator.placement.worker_gang) and must give the latents of the
session's plain render of the same request. And the gang's fate: one rank that dies stops the other.
Nothing is mocked: the ranks are real processes talking over gloo.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import context_parallel_decode as decode_script
import pytest
import torch
from conftest import (
    LIGHTHOUSE_FLAGS,
    RunAhead,
    StartedRender,
    job_dir_of,
    ltx2_environment,
    probe_mp4,
    run_ltx2_two_at_a_time,
    selected_in_module,
    start_runs_ahead,
)
from safetensors.torch import load_file
from supervised import wait_for_file

from config.settings import ConfigError, load_settings
from orchestrator.placement.worker_gang import WorkerGang
from orchestrator.placement.worker_link import stop_process
from orchestrator.run.policy import initial_plan, lower_plan
from protocol.errors import InvalidInput
from protocol.files import LATENTS_FILE, Stage
from protocol.model_ids import TINY_REPO_IDS
from protocol.plans import DecodePlan, parallel_piece_ranges, piece_ranges
from protocol.spec import JobSpec
from protocol.spec_rules import SpecError
from protocol.stages import CP_ADDRESS_ENV, CP_RANK_ENV, CP_SIZE_ENV
from services.context_parallel import max_difference, require_shardable
from services.latents import read_latents
from services.video_decode import decode_frames

REPO_ROOT = Path(__file__).resolve().parents[1]
RENDER = REPO_ROOT / "tests" / "context_parallel_render.py"
DECODE = REPO_ROOT / "tests" / "context_parallel_decode.py"
TOLERANCE = 1e-4
# A parallel decode against one process's decode of the same pieces: half of one 8-bit level (issue 30).
HALF_A_LEVEL = 0.5 / 255
# A render of two steps takes seconds; a group whose peer died waits in a collective far longer.
TIMEOUT_S = 300


def free_port() -> int:
    """A TCP port free on the loopback now, for the group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def render(model_dir: Path, out: Path, size: int, *extra: str) -> dict[str, torch.Tensor]:
    """The latents `size` processes render together (1: a plain single-process run)."""
    run_ranks(RENDER, model_dir, out, size, *extra)
    return load_file(str(out))


def run_ranks(script: Path, model_dir: Path, out: Path, size: int, *extra: str) -> None:
    """`size` processes of `script` in one gloo group; each must exit 0 (rank 0 writes `out`)."""
    base = {**os.environ, CP_ADDRESS_ENV: f"127.0.0.1:{free_port()}", CP_SIZE_ENV: str(size)}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(model_dir), str(out), *extra],
            env={**base, CP_RANK_ENV: str(rank)},
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(size)
    ]
    outputs = []
    for process in ranks:
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            raise
        outputs.append(output)
    for rank, (process, output) in enumerate(zip(ranks, outputs, strict=True)):
        assert process.returncode == 0, f"rank {rank} of {size} exited {process.returncode}:\n{output[-4000:]}"


def one_and_two_ranks(model_dir: Path) -> RunAhead:
    """The tiny clip with CFG rendered by one process and by a group of two, side by side (three processes
    of one thread each on CI's two cores: the lone render no longer leaves a core idle before the group)."""

    def run(root: Path, hf_home: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            alone = pool.submit(render, model_dir, root / "alone.safetensors", 1, "--cfg")
            together = pool.submit(render, model_dir, root / "together.safetensors", 2, "--cfg")
            return alone.result(), together.result()

    return run


# A guided request (CFG, two steps of the default schedule): by one process and by two sharing the guidance batch.
GUIDED = ["generate", *LIGHTHOUSE_FLAGS, "--guidance-scale", "3", "--schedule", "default", "--steps", "2"]


def guided_plain_and_cfg_parallel(root: Path, hf_home: Path) -> list[subprocess.CompletedProcess[str]]:
    """GUIDED plain and with `--context-parallel 2` (CFG parallel by the policy), two at a time."""
    (root / "plain").mkdir()
    (root / "shared").mkdir()
    runs = [(GUIDED, ltx2_environment(hf_home, root / "plain"))]
    runs.append(([*GUIDED, "--context-parallel", "2"], ltx2_environment(hf_home, root / "shared")))
    return run_ltx2_two_at_a_time(runs)


# One `ltx2 generate --context-parallel 2` of the lighthouse serves two tests: the kill of a rank and its retry,
# and the stage end to end (the retried attempt is a whole attempt of two ranks; a second render cost ~40 s of CI).
GANG_RENDER = "generate --context-parallel 2, a rank killed"
GANG_RENDER_TESTS = (
    "test_a_rank_killed_mid_step_stops_its_gang_and_one_retry_finishes_the_job",
    "test_generate_with_two_processes_gives_the_plain_render",
)


def killed_rank_mid_step(root: Path, hf_home: Path) -> dict[str, Any]:
    """`ltx2 generate --context-parallel 2` of the lighthouse whose diffusion pauses after its first step (the first
    rank to report it sleeps: LTX2_FAULT_PAUSE), then SIGKILL of the other rank, which waits for it inside a
    collective; the command's result, the killed and paused pids, and the job directory."""
    env = {**ltx2_environment(hf_home, root), "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:1"}
    (root / "faults").mkdir()
    env["LTX2_FAULT_DIR"] = str(root / "faults")
    command = [sys.executable, "-m", "orchestrator.cli", "generate", *LIGHTHOUSE_FLAGS, "--context-parallel", "2"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, **pipes)
    try:
        paused = int(wait_for_file(root / "faults" / "paused-encode_diffuse.pid").read_text())
        (record_path,) = (root / "state" / "jobs").glob("*/job.json")
        (attempt,) = json.loads(record_path.read_text())["stages"]["encode_diffuse"]["attempts"]
        (killed,) = [pid for pid in attempt["rank_pids"] if pid != paused]
        os.kill(killed, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    return {"returncode": process.returncode, "stderr": stderr, "killed": killed, "paused": paused,
            "job": record_path.parent}  # fmt: skip


# LTX-2.3, two stages, per-step NAG: the request rendered by one process and by two.
NAG_TWO_STAGE = ["generate", "--model", TINY_REPO_IDS["2.3"], "--prompt", "a lighthouse in a gale", "--seed", "7"]
NAG_TWO_STAGE += ["--width", "128", "--height", "128", "--num-frames", "9", "--pipeline", "two-stage", "--quiet"]
NAG_TWO_STAGE += ["--nag-scale", "11", "--negative-prompt", "blurry, static"]


def two_stage_nag_plain_and_sharded(root: Path, hf_home: Path) -> list[subprocess.CompletedProcess[str]]:
    """NAG_TWO_STAGE plain and with `--context-parallel 2`, two at a time, each in a state dir of its own."""
    (root / "plain").mkdir()
    (root / "sharded").mkdir()
    runs = [(NAG_TWO_STAGE, ltx2_environment(hf_home, root / "plain"))]
    runs.append(([*NAG_TWO_STAGE, "--context-parallel", "2"], ltx2_environment(hf_home, root / "sharded")))
    return run_ltx2_two_at_a_time(runs)


@pytest.fixture(scope="module")
def renders(
    request: pytest.FixtureRequest, hf_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Future[Any], Path]]]:
    """The module's renders that this session's tests check, started together from its first test on, two
    at a time (start_runs_ahead): a group of ranks waits on its peers and an `ltx2 generate` on its fork
    server's imports and its one-process stages, so one after the other they left a core idle for much of
    the module. By the name of the test (or, for the gloo test, of its model's fixture) that checks each."""
    runs: dict[str, RunAhead] = {}
    for item in selected_in_module(request):
        if item.originalname == "test_two_gloo_ranks_give_one_process_latents":
            model = item.callspec.params["model"]
            runs[model] = one_and_two_ranks(request.getfixturevalue(model))
        elif item.originalname == "test_a_guided_generate_over_two_processes_shares_the_guidance_batch":
            runs[item.originalname] = guided_plain_and_cfg_parallel
        elif item.originalname in GANG_RENDER_TESTS:
            runs[GANG_RENDER] = killed_rank_mid_step
        elif item.originalname == "test_two_stage_with_per_step_nag_on_ltx23_gives_the_plain_render":
            request.getfixturevalue("tiny_23_model_dir")  # built before its runs start
            runs[item.originalname] = two_stage_nag_plain_and_sharded
    yield from start_runs_ahead(runs, hf_home, tmp_path_factory, workers=2)


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_23_model_dir"])
def test_two_gloo_ranks_give_one_process_latents(model: str, renders: dict) -> None:
    """LTX-2.0 and 2.3, one stage, CFG on (a batch of two through every sharded layer)."""
    alone, together = renders[model][0].result()
    for name in ("video", "audio"):
        assert together[name].shape == alone[name].shape
        assert max_difference(together[name], alone[name]) <= TOLERANCE, name
    # The sharded run is a run of the model, not a copy of the input: the latents moved from the noise.
    assert alone["video"].abs().max() > 0


def test_a_guided_generate_over_two_processes_shares_the_guidance_batch(renders: dict) -> None:
    """The stage's wiring of CFG parallel: the plan says "cfg", each rank runs one row of the guidance batch,
    and the latents are one process's within TOLERANCE."""
    plain, shared = renders["test_a_guided_generate_over_two_processes_shares_the_guidance_batch"][0].result()
    assert plain.returncode == 0 and shared.returncode == 0, plain.stderr + shared.stderr
    expected = read_latents(job_dir_of(plain) / LATENTS_FILE)[0]
    job = job_dir_of(shared)
    result = read_latents(job / LATENTS_FILE)[0]
    for name in ("video", "audio"):
        assert max_difference(result[name], expected[name]) <= TOLERANCE, name
    (attempt,) = json.loads((job / "job.json").read_text())["stages"]["encode_diffuse"]["attempts"]
    assert attempt["plan"]["context_parallel_mode"] == "cfg"
    log = (job / "logs" / "encode_diffuse-1.log").read_text()
    assert "split the guidance batch over 2 processes (CFG parallel)" in log


def test_generate_with_two_processes_gives_the_plain_render(renders: dict, eager_lighthouse: StartedRender) -> None:
    """The stage end to end, on the gang render's retried attempt: two ranks, rank 0 reporting and writing, the
    latents of one process, the video decode over both, the MP4 whole."""
    run = renders[GANG_RENDER][0].result()
    assert run["returncode"] == 0, run["stderr"][-3000:]
    job = run["job"]
    _, plain_job = eager_lighthouse.finished()
    sharded, plain = read_latents(job / LATENTS_FILE)[0], read_latents(plain_job / LATENTS_FILE)[0]
    for name in ("video", "audio"):
        assert max_difference(sharded[name], plain[name]) <= TOLERANCE, name
    record = json.loads((job / "job.json").read_text())
    _, attempt = record["stages"]["encode_diffuse"]["attempts"]
    assert attempt["plan"]["context_parallel"] == 2
    assert len(attempt["rank_pids"]) == 2 and attempt["rank_pids"][0] == attempt["pid"]  # for crash recovery
    logs = job / "logs"
    assert "shard the tokens over 2 processes" in (logs / "encode_diffuse-2.log").read_text()
    assert (logs / "encode_diffuse-2.rank1.log").is_file()
    # The video decode ran over the two processes as well (one attempt; this 9-frame clip is one piece, so
    # rank 1 only joins) and its MP4 holds every frame, with the audio.
    (decode_attempt,) = record["stages"]["video_decode"]["attempts"]
    assert decode_attempt["plan"]["context_parallel"] == 2 and len(decode_attempt["rank_pids"]) == 2
    assert (logs / "video_decode-1.rank1.log").is_file()
    video = probe_mp4(Path(record["output"]))
    assert video["frames"] == 9 and video["audio_codec"], video


def test_a_rank_that_dies_stops_its_gang_with_its_exit_status() -> None:
    """Rank 1 exits 3 (a CUDA OOM's code) while rank 0 would wait for it forever: the gang ends at once,
    rank 0 stopped, with rank 1's status for the policy."""
    members = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True),
        subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], start_new_session=True),
    ]
    gang = WorkerGang(members, stop_process)
    assert gang.wait(timeout=60) == 3
    assert members[0].poll() is not None and members[0].returncode != 0
    assert gang.poll() == 3 and stop_process(gang) == 3


SPEC = {"prompt": "a harbour at dawn", "model": "m", "width": 64, "height": 64, "num_frames": 17, "steps": 8, "seed": 1}


def test_a_rank_killed_mid_step_stops_its_gang_and_one_retry_finishes_the_job(
    renders: dict, eager_lighthouse: StartedRender
) -> None:
    """kill -9 of one of the two ranks mid-step: both stopped (the paused one too), the policy retries once with
    the same two processes, and the job finishes with the latents of an undisturbed run."""
    run = renders[GANG_RENDER][0].result()
    assert run["returncode"] == 0, run["stderr"][-3000:]
    for pid in (run["killed"], run["paused"]):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    first, second = json.loads((run["job"] / "job.json").read_text())["stages"]["encode_diffuse"]["attempts"]
    assert first["result"] != "ok" and second["result"] == "ok"
    assert first["plan"]["context_parallel"] == second["plan"]["context_parallel"] == 2
    _, plain_job = eager_lighthouse.finished()
    retried, plain = read_latents(run["job"] / LATENTS_FILE)[0], read_latents(plain_job / LATENTS_FILE)[0]
    for name in ("video", "audio"):
        assert max_difference(retried[name], plain[name]) <= TOLERANCE, name


def test_the_request_takes_powers_of_two_and_the_plan_carries_them_down_every_rung() -> None:
    with pytest.raises(SpecError, match="context-parallel.*one of 1, 2, 4, 8"):
        JobSpec.from_dict({**SPEC, "context_parallel": 3})
    spec = JobSpec.from_dict({**SPEC, "context_parallel": 2})
    settings = load_settings(environ={"LTX2_CONFIG": "", "HOME": "/nonexistent"})
    plan = initial_plan(Stage.ENCODE_DIFFUSE, spec, settings)
    assert plan["context_parallel"] == 2
    assert lower_plan(Stage.ENCODE_DIFFUSE, plan, spec, settings)["context_parallel"] == 2
    # How the two share the work: the guidance batch for a guided one-stage run, else the tokens.
    guided = {**SPEC, "context_parallel": 2, "guidance_scale": 4.0}
    assert initial_plan(Stage.ENCODE_DIFFUSE, JobSpec.from_dict(guided), settings)["context_parallel_mode"] == "cfg"
    two_stage = {"pipeline": "two-stage", "width": 128, "height": 128}
    for other in ({"guidance_scale": 1.0}, two_stage, {"context_parallel": 4}):
        spec_other = JobSpec.from_dict({**guided, **other})
        assert initial_plan(Stage.ENCODE_DIFFUSE, spec_other, settings)["context_parallel_mode"] == "ulysses", other
    assert "context_parallel" not in initial_plan(Stage.ENCODE_DIFFUSE, JobSpec.from_dict(SPEC), settings)
    # The video decode runs over the same N processes, on every rung of its ladder too; the audio decode alone.
    decode = initial_plan(Stage.VIDEO_DECODE, spec, settings)
    assert decode["context_parallel"] == 2
    assert lower_plan(Stage.VIDEO_DECODE, decode, spec, settings)["context_parallel"] == 2
    assert "context_parallel" not in initial_plan(Stage.VIDEO_DECODE, JobSpec.from_dict(SPEC), settings)
    assert "context_parallel" not in initial_plan(Stage.AUDIO_DECODE, spec, settings)


def test_parallel_piece_ranges_cut_a_clip_into_one_piece_per_rank_unless_the_plan_has_more() -> None:
    single = DecodePlan(False, None, 2, 512, 128)
    assert parallel_piece_ranges(16, single, 2) == piece_ranges(16, 9, 2) == [(0, 9), (7, 16)]  # 1080p x 121
    assert parallel_piece_ranges(16, single, 4) == [(0, 6), (4, 10), (8, 14), (12, 16)]
    three = DecodePlan(True, 3, 2, 512, 128)
    assert parallel_piece_ranges(5, three, 2) == piece_ranges(5, 3, 2)  # the plan's own pieces, dealt round robin
    assert parallel_piece_ranges(3, single, 2) == [(0, 3)]  # too short to cut with an overlap of 2: one rank decodes


def test_a_parallel_decode_gives_one_process_decode_of_the_same_pieces(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two gloo ranks each decode a share of the temporal pieces, rank 0 cross-fades them: the frames of one
    process decoding the same pieces (issue 30: within half a level; equal here), exact frame count."""
    from diffusers import AutoencoderKLLTX2Video

    run_ranks(DECODE, tiny_model_dir, tmp_path / "parallel.safetensors", 2)
    parallel = load_file(str(tmp_path / "parallel.safetensors"))
    vae = AutoencoderKLLTX2Video.from_pretrained(tiny_model_dir / "vae", torch_dtype=torch.float32).eval()
    clip = decode_script.latents(vae.config.latent_channels)
    # What the parallel decode cut the single pass into (two pieces of 4 latent frames), as one process's plan.
    same_pieces = {
        "single_pass": DecodePlan(False, 4, 2, 512, 128),
        "three_pieces": decode_script.PLANS["three_pieces"],
    }
    for name, plan in same_pieces.items():
        alone = torch.cat(list(decode_frames(vae, clip, plan)))
        assert parallel[name].shape == alone.shape == (17, 3, *alone.shape[2:]), name
        assert max_difference(parallel[name], alone) <= HALF_A_LEVEL, name


def test_the_setting_is_the_default_and_refuses_other_counts() -> None:
    environ = {"LTX2_CONFIG": "", "HOME": "/nonexistent", "LTX2_CONTEXT_PARALLEL": "4"}
    assert load_settings(environ=environ).context_parallel == 4
    with pytest.raises(ConfigError, match="cluster.context_parallel must be"):
        load_settings(environ={**environ, "LTX2_CONTEXT_PARALLEL": "3"})


def test_a_count_that_does_not_divide_the_tokens_or_heads_is_invalid_input(tiny_model_dir: Path) -> None:
    from diffusers import LTX2VideoTransformer3DModel

    transformer = LTX2VideoTransformer3DModel.from_pretrained(tiny_model_dir / "transformer")
    require_shardable(transformer, 1280, 1024, 2)  # the tiny model's 64x64x17: 2 heads each, 1280 video tokens
    with pytest.raises(InvalidInput, match="--context-parallel 4: .*2 video attention heads"):
        require_shardable(transformer, 1280, 1024, 4)
    with pytest.raises(InvalidInput, match="1275 video tokens"):
        require_shardable(transformer, 1275, 1024, 2)


def test_two_stage_with_per_step_nag_on_ltx23_gives_the_plain_render(renders: dict) -> None:
    """LTX-2.3's NAG appends the negative tokens to the split text context at every step (services/nag.py
    `shard_pairs`), and two-stage denoises twice over the sharded transformer: both as one process."""
    plain, sharded = renders["test_two_stage_with_per_step_nag_on_ltx23_gives_the_plain_render"][0].result()
    assert plain.returncode == 0 and sharded.returncode == 0, plain.stderr + sharded.stderr
    expected = read_latents(job_dir_of(plain) / LATENTS_FILE)[0]
    result = read_latents(job_dir_of(sharded) / LATENTS_FILE)[0]
    for name in ("video", "audio"):
        assert max_difference(result[name], expected[name]) <= TOLERANCE, name

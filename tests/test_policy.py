"""The retry policy is one pure function: (stage, attempts so far) -> next plan or give up."""

from __future__ import annotations

import dataclasses

import pytest

from config.settings import load_settings
from orchestrator.run.policy import X264_THREADS, Attempt, initial_plan, next_plan
from protocol.errors import Failure
from protocol.files import Stage
from protocol.spec import JobSpec
from protocol.spec_rules import SpecError

SETTINGS = load_settings(environ={"HOME": "/nonexistent"})
SPEC = JobSpec.from_dict(
    {"prompt": "p", "model": "m", "width": 1920, "height": 1088, "num_frames": 161, "steps": 8, "seed": 1}
)


def walk(stage: Stage, failure: Failure, settings=SETTINGS) -> list[dict]:
    plans = [initial_plan(stage, SPEC, settings)]
    history: list[Attempt] = []
    while True:
        history.append(Attempt(plans[-1], failure))
        following = next_plan(stage, history, SPEC, settings)
        if following is None:
            return plans
        plans.append(following)


def test_cuda_oom_in_decode_steps_down_every_rung_then_gives_up():
    labels = [walk_label(p) for p in walk(Stage.VIDEO_DECODE, Failure.CUDA_OOM)]
    assert labels == [(True, None), (True, 11), (True, 8), (True, 4)]


def walk_label(plan: dict) -> tuple:
    return plan["decode"]["tiling"], plan["decode"]["chunk_latent_frames"]


def test_host_oom_retries_the_same_plan_once_before_stepping_down():
    plans = walk(Stage.ENCODE_DIFFUSE, Failure.HOST_OOM)
    native, fp8 = {"weights": "native", "offload": "none"}, {"weights": "fp8", "offload": "none"}
    assert plans == [native, native, fp8, {"weights": "fp8", "offload": "sequential"}]


def test_fp8_flag_starts_the_diffusion_ladder_lower():
    spec = SPEC.with_changes(fp8=True)
    assert initial_plan(Stage.ENCODE_DIFFUSE, spec, SETTINGS) == {"weights": "fp8", "offload": "none"}
    assert next_plan(
        Stage.ENCODE_DIFFUSE, [Attempt({"weights": "fp8", "offload": "none"}, Failure.CUDA_OOM)], spec, SETTINGS
    ) == {"weights": "fp8", "offload": "sequential"}


def test_audio_decode_falls_back_to_the_cpu():
    assert walk(Stage.AUDIO_DECODE, Failure.CUDA_OOM) == [{"device": "auto"}, {"device": "cpu"}]


def test_invalid_input_missing_model_and_cancel_are_never_retried():
    for failure in (Failure.INVALID_INPUT, Failure.MODEL_NOT_FOUND, Failure.CANCELLED):
        assert len(walk(Stage.ENCODE_DIFFUSE, failure)) == 1


def test_attempt_limit_caps_same_plan_retries():
    strict = dataclasses.replace(SETTINGS, max_attempts_per_stage=2)
    assert len(walk(Stage.ENCODE_DIFFUSE, Failure.CRASH, strict)) == 2


def test_success_needs_no_next_plan():
    assert next_plan(Stage.AUDIO_DECODE, [Attempt({"device": "auto"}, None)], SPEC, SETTINGS) is None


def test_compile_runs_on_the_top_rung_only():
    spec = SPEC.with_changes(compile=True)
    top = initial_plan(Stage.ENCODE_DIFFUSE, spec, SETTINGS)
    assert top == {"weights": "native", "offload": "none", "compile": "regional", "deterministic": True}
    following = next_plan(Stage.ENCODE_DIFFUSE, [Attempt(top, Failure.CUDA_OOM)], spec, SETTINGS)
    assert following == {"weights": "fp8", "offload": "none"}
    # FP8 storage hooks and offloading are not compiled: --compile with them is plain eager.
    assert "compile" not in initial_plan(Stage.ENCODE_DIFFUSE, spec.with_changes(fp8=True), SETTINGS)


def test_a_compiled_decoder_decodes_on_the_top_rung_only():
    spec = SPEC.with_changes(compile_decoder=True)
    top = initial_plan(Stage.VIDEO_DECODE, spec, SETTINGS)
    assert (top["compile"], top["deterministic"]) == ("decoder", True)
    following = next_plan(Stage.VIDEO_DECODE, [Attempt(top, Failure.CUDA_OOM)], spec, SETTINGS)
    assert following is not None and "compile" not in following and "deterministic" not in following
    assert "compile" not in initial_plan(Stage.VIDEO_DECODE, SPEC, SETTINGS)
    with pytest.raises(SpecError, match="--decoder diffusion runs another"):
        spec.with_changes(decoder="diffusion").require_valid()


def test_video_plan_carries_the_configured_x264_preset_down_the_ladder(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[decode]\nx264_preset = "medium"\n')
    settings = load_settings(config_file=config, environ={"HOME": "/nonexistent"})
    plans = walk(Stage.VIDEO_DECODE, Failure.CUDA_OOM, settings)
    assert len(plans) == 4 and {plan["x264_preset"] for plan in plans} == {"medium"}
    assert {plan["x264_threads"] for plan in plans} == {X264_THREADS}  # the same file on any host, any rung
    assert initial_plan(Stage.VIDEO_DECODE, SPEC, SETTINGS)["x264_preset"] == "veryfast"  # the shipped default
    config.write_text('[decode]\nx264_preset = "fastest"\n')
    with pytest.raises(ValueError, match="decode.x264_preset must be one of ultrafast"):
        load_settings(config_file=config, environ={"HOME": "/nonexistent"})

"""LTX2_PROFILE_STEP: one denoising step's time per kernel category, written beside the job's logs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS, run_ltx2
from test_loras import encode, encode_job

from config.settings import PROFILE_STEP, ConfigError, load_settings
from protocol.errors import ExitCode
from services import denoising
from services.step_profile import StepProfiler, category, profiled_step


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_fp8_f32acc_128x128x128", "attention"),
        ("triton_poi_fused__scaled_mm_add_mul_0", "fused (Inductor)"),
        ("cpp_fused_add_mul_native_layer_norm_3", "fused (Inductor)"),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"),
        ("aten::addmm", "matmul"),
        ("void at::native::elementwise_kernel<128, 4>", "other"),
    ],
)
def test_kernels_fall_in_the_category_their_names_say(name: str, expected: str):
    assert category(name) == expected


@pytest.mark.parametrize("value", ["second", "-1", "1.0", "\u0661", "\u00b2", "1_0"])
def test_a_step_that_is_no_step_index_is_refused_naming_the_variable(value: str, monkeypatch: pytest.MonkeyPatch):
    """Unicode digits too: '١' (Arabic-Indic one) was taken as step 1 and '²' failed without the variable's name."""
    with pytest.raises(ConfigError, match=PROFILE_STEP):
        load_settings(environ={PROFILE_STEP: value, "HOME": "/nonexistent"})
    monkeypatch.setenv(PROFILE_STEP, value)
    with pytest.raises(ConfigError, match=PROFILE_STEP):
        profiled_step()


def test_the_step_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(PROFILE_STEP, raising=False)
    assert profiled_step() is None
    monkeypatch.setenv(PROFILE_STEP, " 2 ")
    assert profiled_step() == 2


def test_ltx2_refuses_a_bad_step_before_any_job_starts(ltx2_env: dict[str, str]):
    """It was refused by every diffusion attempt after the model loads, four attempts down the memory ladder."""
    env = {**ltx2_env, PROFILE_STEP: "abc"}
    result = run_ltx2(["generate", "--prompt", "a dolly in", *TINY_ARGS], env, timeout=120)
    assert result.returncode == ExitCode.INVALID_INPUT, result.stderr
    assert PROFILE_STEP in result.stderr and "'abc'" in result.stderr
    assert not list(Path(env["LTX2_STATE_DIR"]).glob("jobs/*")), "a job was created"


def test_a_profiled_step_is_reported_beside_the_logs_and_changes_no_latent(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    plain = encode(tiny_model_dir, tmp_path, "plain")
    monkeypatch.setenv(PROFILE_STEP, "1")
    profiled = encode_job(tiny_model_dir, tmp_path, "profiled", None)
    assert all(torch.equal(profiled[key], plain[key]) for key in ("video", "audio"))
    logs = next(path for path in (tmp_path / "profiled").rglob("logs") if path.is_dir())
    reports = sorted(logs.glob("profile-*.txt"))
    assert [report.name for report in reports] == ["profile-denoise-step1.txt"]
    lines = reports[0].read_text().splitlines()
    assert lines[0].startswith("step wall ") and float(lines[0].split()[2]) > 0
    categories = {
        line.removeprefix("category ").split(": ")[0]: float(line.split(": ")[1].split(" ms")[0])
        for line in lines
        if line.startswith("category ")
    }
    assert categories.get("matmul", 0) > 0  # the blocks' linear layers, on the CPU as aten::addmm / aten::mm
    rows = [line for line in lines if line[:10].strip().replace(".", "").isdigit()]
    assert rows and any("aten::" in row for row in rows)


def test_a_step_past_the_pass_is_said_in_the_log_and_profiles_nothing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv(PROFILE_STEP, "99")
    with caplog.at_level(logging.WARNING, logger="ltx2.worker"):
        encode_job(tiny_model_dir, tmp_path, "beyond", None)
    assert any(PROFILE_STEP in record.getMessage() and "no step of it profiled" in record.getMessage()
               for record in caplog.records), caplog.text  # fmt: skip
    assert not list((tmp_path / "beyond").rglob("profile-*.txt"))


def test_a_report_that_cannot_be_written_leaves_the_step_and_the_clip_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A full or unwritable logs folder failed the step's callback, and so every attempt of the clip."""
    (tmp_path / "logs" / "profile-denoise-step0.txt").mkdir(parents=True)  # where the report would go
    profiler = StepProfiler(0, tmp_path, "denoise", torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="ltx2.worker"):
        profiler.before_step(0)
        torch.ones(64, 64) @ torch.ones(64, 64)
        profiler.after_step(0)
    assert "could not be written" in caplog.text
    assert not torch.autograd.profiler._is_profiler_enabled


def test_a_pass_that_fails_before_its_first_step_leaves_no_profiler_running(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The profiler started before NAG's context was made and entered; a failure there left it recording."""

    def failing_nag_context(*args: object, **kwargs: object) -> None:
        raise RuntimeError("NAG's context failed")

    monkeypatch.setenv(PROFILE_STEP, "0")
    monkeypatch.setattr(denoising, "nag_context", failing_nag_context)
    with pytest.raises(RuntimeError, match="NAG's context failed"):
        encode_job(tiny_model_dir, tmp_path, "failing", None)
    assert not torch.autograd.profiler._is_profiler_enabled


def test_each_context_parallel_rank_writes_a_report_of_its_own(tmp_path: Path):
    names = {StepProfiler(1, tmp_path, "denoise stage 2", torch.device("cpu"), rank).path.name for rank in (None, 0, 1)}
    assert names == {
        "profile-denoise-stage-2-step1.txt",
        "profile-denoise-stage-2-step1-rank0.txt",
        "profile-denoise-stage-2-step1-rank1.txt",
    }

"""LTX2_PROFILE_STEP: one denoising step's time per kernel category, written beside the job's logs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_loras import encode, encode_job

from services.step_profile import SWITCH, category, profiled_step


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_fp8_f32acc_128x128x128", "attention"),
        ("triton_poi_fused__scaled_mm_add_mul_0", "fused (Inductor)"),
        ("cpp_fused_add_mul_native_layer_norm_3", "fused (Inductor)"),
        ("aten::addmm", "matmul"),
        ("void at::native::elementwise_kernel<128, 4>", "other"),
    ],
)
def test_kernels_fall_in_the_category_their_names_say(name: str, expected: str):
    assert category(name) == expected


def test_the_step_is_read_from_the_environment_and_nonsense_is_refused_by_name(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(SWITCH, raising=False)
    assert profiled_step() is None
    monkeypatch.setenv(SWITCH, "2")
    assert profiled_step() == 2
    monkeypatch.setenv(SWITCH, "second")
    with pytest.raises(ValueError, match=SWITCH):
        profiled_step()


def test_a_profiled_step_is_reported_beside_the_logs_and_changes_no_latent(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    plain = encode(tiny_model_dir, tmp_path, "plain")
    monkeypatch.setenv(SWITCH, "1")
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

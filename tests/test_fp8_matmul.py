"""--fp8-matmul: the blocks' linear layers multiply in FP8 with rowwise scales, close to bf16/fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import LTX2VideoTransformer3DModel
from test_loras import encode

from config.settings import load_settings
from orchestrator.run.policy import Attempt, initial_plan, next_plan
from protocol.errors import Failure
from protocol.files import Stage
from protocol.spec import JobSpec
from protocol.spec_rules import SpecError
from services.fp8_matmul import Fp8Linear, convert_blocks, eligible


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result.float() - reference.float()).norm() / reference.float().norm())


def test_fp8_linear_matches_the_linear_layer_within_fp8_precision():
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 128)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(128, 64, generator=generator))
        linear.weight[3] *= 50  # an outlier row keeps its own scale
    x = torch.randn(2, 37, 64, generator=generator)
    layer = Fp8Linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, 128)
    with torch.no_grad():
        result, reference = layer(x), linear(x)
    assert result.shape == reference.shape == (2, 37, 128)
    assert 0 < relative_error(result, reference) < 0.05
    assert relative_error(result[..., 4:], reference[..., 4:]) < 0.05  # rows beside the outlier too


def test_only_aligned_linear_layers_inside_the_blocks_are_converted(tiny_model_dir: Path):
    transformer = LTX2VideoTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    in_blocks = sum(eligible(m) for m in transformer.transformer_blocks.modules())
    outside = {name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    outside = {name for name in outside if not name.startswith("transformer_blocks.")}
    assert in_blocks > 0
    assert convert_blocks(transformer, torch.device("cpu"), fast_accumulation=True) == in_blocks
    fp8 = {name: m for name, m in transformer.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == in_blocks and all(name.startswith("transformer_blocks.") for name in fp8)
    assert all(m.fast_accumulation for m in fp8.values()) and "fast accumulation" in repr(transformer)
    # Unaligned layers (the tiny audio path is 8 wide) and everything outside the blocks stay.
    plain = {name for name, m in transformer.named_modules() if type(m) is torch.nn.Linear}
    assert any(name.startswith("transformer_blocks.") for name in plain)
    assert {name for name in plain if not name.startswith("transformer_blocks.")} == outside


def test_fp8_matmul_latents_stay_close_to_full_precision(tiny_model_dir: Path, tmp_path: Path):
    reference = encode(tiny_model_dir, tmp_path, "full")
    result = encode(tiny_model_dir, tmp_path, "fp8mm", fp8_matmul=True)
    for key in ("video", "audio"):
        assert 0 < relative_error(result[key], reference[key]) < 0.02


def test_fp8_matmul_plan_and_its_ladder():
    settings = load_settings(environ={"HOME": "/nonexistent"})
    spec = JobSpec.from_dict(
        {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
    ).with_changes(fp8_matmul=True, compile=True)
    top = initial_plan(Stage.ENCODE_DIFFUSE, spec, settings)
    assert top == {
        "weights": "fp8-matmul",
        "offload": "none",
        "compile": "regional",
        "deterministic": True,  # Inductor's deterministic mode goes with the compile (and leaves with it below)
        "fp8_accumulation": "fast",
        "fp8_gelu": "kernel",  # services/fp8_rows.py's one-pass GELU and quantisation
    }
    lower = next_plan(Stage.ENCODE_DIFFUSE, [Attempt(top, Failure.CUDA_OOM)], spec, settings)
    # The offload's per-layer hooks would not see the weights the one-pass feed-forward reads: not on that rung.
    assert lower == {"weights": "fp8-matmul", "offload": "sequential", "fp8_accumulation": "fast"}
    offloaded = initial_plan(Stage.ENCODE_DIFFUSE, spec.with_changes(sequential_offload=True), settings)
    assert offloaded["offload"] == "sequential" and "fp8_gelu" not in offloaded  # the same from the top rung
    environ = {"HOME": "/nonexistent", "LTX2_FP8_FAST_ACCUMULATION": "false", "LTX2_FP8_GELU_KERNEL": "false"}
    exact = load_settings(environ=environ)
    assert initial_plan(Stage.ENCODE_DIFFUSE, spec, exact)["fp8_accumulation"] == "exact"
    assert "fp8_gelu" not in initial_plan(Stage.ENCODE_DIFFUSE, spec, exact)  # off: the plans of before
    without = initial_plan(Stage.ENCODE_DIFFUSE, spec.with_changes(fp8_matmul=False), exact)
    assert "fp8_accumulation" not in without and "fp8_gelu" not in without
    with pytest.raises(SpecError, match="--fp8-matmul: choose one of --fp8"):
        spec.with_changes(fp8=True)

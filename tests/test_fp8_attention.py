"""--fp8-attention: the self-attention processor that runs cuDNN's FP8 kernel on Hopper.

The kernel itself runs only on a GPU (bench/fp8_attention_bench.py measures it there, error and
speed, docs/benchmarks.md). On this CPU the processor takes its bf16 fallback, which must be
diffusers' own processor bit for bit: everything around the attention call (projections, norms,
rotary embeddings, STG perturbation, gates) is the mirror the GPU path runs too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from diffusers.models.transformers.transformer_ltx2 import (
    LTX2Attention,
    LTX2AudioVideoAttnProcessor,
    LTX2PerturbedAttnProcessor,
)
from test_loras import encode

from config.settings import load_settings
from orchestrator.run.policy import Attempt, initial_plan, next_plan
from protocol.errors import Failure
from protocol.files import Stage
from protocol.spec import JobSpec
from services import fp8_attention
from services.tiny_model import build_transformer

HEADS, HEAD_DIM, TOKENS = 4, 8, 10


def rotary(rope_type: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (cos, sin) in the shape each rope type takes: per channel (interleaved) or per head (split)."""
    shape = (2, TOKENS, HEADS * HEAD_DIM) if rope_type == "interleaved" else (2, HEADS, TOKENS, HEAD_DIM // 2)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@pytest.mark.parametrize("rope_type", ["interleaved", "split"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("base_cls", [LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor])
@pytest.mark.parametrize("perturbation", ["none", "some", "all"])
def test_the_processor_equals_diffusers_own_where_the_kernel_cannot_run(
    rope_type: str, gated: bool, base_cls: type, perturbation: str
):
    generator = torch.Generator().manual_seed(0)
    attn = LTX2Attention(
        query_dim=HEADS * HEAD_DIM,
        heads=HEADS,
        kv_heads=HEADS,
        dim_head=HEAD_DIM,
        rope_type=rope_type,
        apply_gated_attention=gated,
        processor=base_cls(),
    ).eval()
    if gated:
        torch.nn.init.normal_(attn.to_gate_logits.weight, generator=generator)
    hidden = torch.randn(2, TOKENS, HEADS * HEAD_DIM, generator=generator)
    extra = {}
    if perturbation != "none" and base_cls is LTX2PerturbedAttnProcessor:
        # As the transformer passes it: one value per clip of the batch, 0 where STG perturbs.
        extra["perturbation_mask"] = torch.tensor([0.0, 1.0] if perturbation == "some" else [0.0, 0.0])[:, None, None]
    freqs = rotary(rope_type, generator)
    with torch.no_grad():
        expected = attn(hidden, query_rotary_emb=freqs, **extra)
        replaced = fp8_attention.Fp8SelfAttnProcessor(attn.processor)
        attn.set_processor(replaced)
        got = attn(hidden, query_rotary_emb=freqs, **extra)
    assert not replaced.kernel  # no GPU here: the fallback ran
    assert torch.equal(got, expected)


def test_install_replaces_each_blocks_video_and_audio_self_attention_only():
    transformer = build_transformer("2.0")
    blocks = transformer.transformer_blocks
    modules = [(name, module) for name, module in transformer.named_modules() if isinstance(module, LTX2Attention)]
    others = {name: module.processor for name, module in modules}
    assert fp8_attention.install(transformer) == 2 * len(blocks)
    for name, module in modules:
        replaced = name.rsplit(".", 1)[-1] in fp8_attention.SELF_ATTENTION
        assert isinstance(module.processor, fp8_attention.Fp8SelfAttnProcessor) == replaced, name
        if not replaced:
            assert module.processor is others[name]


@pytest.mark.parametrize("family", ["2.0", "2.3"])
def test_a_job_with_fp8_attention_renders_bf16_attention_here_bit_equal_and_says_why(
    family: str, request: pytest.FixtureRequest, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    model = request.getfixturevalue("tiny_model_dir" if family == "2.0" else "tiny_23_model_dir")
    reference = encode(model, tmp_path, "bf16")
    caplog.set_level(logging.INFO)
    caplog.clear()
    result = encode(model, tmp_path, "fp8-attention", fp8_attention=True)
    for key in ("video", "audio"):
        assert torch.equal(result[key], reference[key]), key
    assert "FP8 self-attention unavailable, bf16 attention instead: FP8 attention needs an NVIDIA GPU" in caplog.text


def test_fp8_attention_is_in_the_plan_and_stays_on_every_lower_rung():
    settings = load_settings(environ={"HOME": "/nonexistent"})
    spec = JobSpec.from_dict(
        {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
    ).with_changes(fp8_attention=True, compile=True)
    plan = initial_plan(Stage.ENCODE_DIFFUSE, spec, settings)
    assert plan["attention"] == "fp8"
    while (plan := next_plan(Stage.ENCODE_DIFFUSE, [Attempt(plan, Failure.CUDA_OOM)], spec, settings)) is not None:
        assert plan["attention"] == "fp8"
    without = JobSpec.from_dict(spec.to_dict()).with_changes(fp8_attention=False)
    assert "attention" not in initial_plan(Stage.ENCODE_DIFFUSE, without, settings)

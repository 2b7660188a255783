"""services/fp8_rows.py and Fp8FeedForward: the feed-forward's GELU and FP8 row quantisation in one pass.

The Triton kernel itself needs a CUDA device (bench/row_kernels_bench.py compares it with the reference on one);
here the operator runs its torch implementation, which is what every non-CUDA worker runs, through the same
custom operator, the same Fp8FeedForward and the same compiled graph."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import LTX2VideoTransformer3DModel
from diffusers.models.attention import FeedForward
from test_loras import encode, encode_job
from torch.nn import functional

from services import fp8_rows
from services.fp8_matmul import Fp8FeedForward, Fp8Linear, convert_blocks, fusable_feed_forward, quantize_rows
from services.fp8_rows import FP8_MAX, fp8_steps
from services.model_loading import apply_memory_plan


def hidden_rows(rows: int, columns: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, columns, generator=generator) * 3).to(torch.bfloat16)
    bias = torch.randn(columns, generator=generator).to(torch.bfloat16)
    return hidden, bias


def test_the_reference_is_the_tanh_gelu_of_hidden_plus_bias_quantised_per_row():
    hidden, bias = hidden_rows(7, 300)
    hidden[2] = 0  # a row of zeros keeps a usable scale
    quantized, scale = fp8_rows.gelu_quantize_reference(hidden, bias)
    activated = functional.gelu(hidden.float() + bias.float(), approximate="tanh")
    expected_q, expected_scale = quantize_rows(activated)
    assert quantized.dtype == torch.float8_e4m3fn and quantized.shape == (7, 300)
    assert scale.dtype == torch.float32 and scale.shape == (7, 1)
    assert torch.allclose(scale, expected_scale, rtol=1e-5, atol=0)
    # The sigmoid form of the tanh GELU rounds differently: at most one FP8 step, rarely.
    steps = fp8_steps(quantized, expected_q)
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01
    # Each row's largest value lands on FP8's largest, so the row's range is used in full.
    assert torch.equal(quantized.float().abs().amax(dim=-1), torch.full((7,), FP8_MAX))
    zero_bias_q, zero_bias_scale = fp8_rows.gelu_quantize_reference(hidden, None)
    assert torch.equal(zero_bias_q.float()[2], torch.zeros(300)) and zero_bias_scale[2].item() > 0


def test_the_operator_compiles_into_one_graph_with_the_same_bits_as_eager():
    hidden, bias = hidden_rows(33, 256)
    fp8_rows.define_operator()
    eager = fp8_rows.gelu_quantize_rows(hidden, bias)
    compiled = torch.compile(fp8_rows.gelu_quantize_rows, fullgraph=True, dynamic=False)(hidden, bias)
    reference = fp8_rows.gelu_quantize_reference(hidden, bias)
    for got in (eager, compiled):
        assert torch.equal(got[0].view(torch.uint8), reference[0].view(torch.uint8))
        assert torch.equal(got[1], reference[1])


def test_rows_the_kernel_cannot_hold_take_the_reference_and_the_operator_refuses_them(
    monkeypatch: pytest.MonkeyPatch,
):
    fp8_rows.define_operator()
    operator, reached = torch.ops.ltx2.gelu_quantize_rows, []

    def spy(hidden: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        reached.append(tuple(hidden.shape))
        return operator(hidden, bias)

    monkeypatch.setattr(torch.ops.ltx2, "gelu_quantize_rows", spy)
    wide, bias = hidden_rows(2, fp8_rows.MAX_ROW + 16)
    strided = hidden_rows(4, 64)[0].t()  # a transposed view: its rows are not contiguous
    three_d = hidden_rows(6, 64)[0].reshape(2, 3, 64)
    for hidden, row_bias in ((wide, bias), (strided, None), (three_d, None)):
        got = fp8_rows.gelu_quantize_rows(hidden, row_bias)
        want = fp8_rows.gelu_quantize_reference(hidden, row_bias)
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
    assert reached == []  # none of them reached the operator (whose CUDA kernel would read them wrongly)
    fp8_rows.gelu_quantize_rows(*hidden_rows(4, 64))
    assert reached == [(4, 64)]
    with pytest.raises(RuntimeError, match="2-D rows"):
        operator(three_d, None)
    with pytest.raises(RuntimeError, match="contiguous columns"):
        operator(strided, None)


def test_without_triton_or_cuda_the_kernel_is_not_used_and_the_reason_is_named(monkeypatch: pytest.MonkeyPatch):
    assert fp8_rows.gelu_kernel_unavailable("cpu") == "cpu is not a CUDA device"
    monkeypatch.setitem(sys.modules, "triton", None)
    assert "triton is not importable" in str(fp8_rows.triton_unavailable())


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result.float() - reference.float()).norm() / reference.float().norm())


class OneBlock(torch.nn.Module):
    """The shape convert_blocks walks: a transformer with its repeated blocks."""

    def __init__(self, feed_forward: torch.nn.Module) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"ff": feed_forward})])


@torch.no_grad()
def test_a_feed_forward_becomes_one_pass_and_stays_within_fp8_precision():
    torch.manual_seed(0)
    feed_forward = FeedForward(64, activation_fn="gelu-approximate").to(torch.bfloat16)
    x = torch.randn(2, 37, 64).to(torch.bfloat16)
    reference = feed_forward(x)
    per_layer, one_pass = OneBlock(feed_forward), OneBlock(FeedForward(64, activation_fn="gelu-approximate"))
    one_pass.load_state_dict(per_layer.state_dict())
    one_pass.to(torch.bfloat16)
    convert_blocks(per_layer, torch.device("cpu"))
    convert_blocks(one_pass, torch.device("cpu"), gelu_kernel=True)
    before, after = per_layer.transformer_blocks[0]["ff"], one_pass.transformer_blocks[0]["ff"]
    assert type(before) is FeedForward and type(after) is Fp8FeedForward
    assert isinstance(after.first, Fp8Linear) and isinstance(after.second, Fp8Linear)
    assert after(x).shape == reference.shape == (2, 37, 64)
    # Two FP8 matmuls on random weights are ~5 % off bf16 either way; the one-pass GELU adds nothing to that.
    assert 0 < relative_error(after(x), reference) <= 1.1 * relative_error(before(x), reference) < 0.08
    assert relative_error(after(x), before(x)) < 0.03  # the same FP8 products, GELU in fp32 instead of bf16
    compiled = torch.compile(after, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), compiled(x)) and relative_error(compiled(x), after(x)) < 0.01


def test_only_a_tanh_gelu_feed_forward_with_idle_dropouts_and_fp8_linears_is_fused():
    def converted(feed_forward: FeedForward) -> FeedForward:
        convert_blocks(OneBlock(feed_forward), torch.device("cpu"))
        return feed_forward

    assert fusable_feed_forward(converted(FeedForward(64, activation_fn="gelu-approximate"))) is not None
    assert fusable_feed_forward(converted(FeedForward(64, activation_fn="gelu"))) is None  # the erf GELU
    assert fusable_feed_forward(converted(FeedForward(64, activation_fn="gelu-approximate", dropout=0.1))) is None
    assert fusable_feed_forward(FeedForward(64, activation_fn="gelu-approximate")) is None  # still bf16
    assert fusable_feed_forward(converted(FeedForward(8, activation_fn="gelu-approximate"))) is None  # 8 wide: bf16


def test_the_tiny_transformers_video_feed_forwards_are_fused_and_none_under_sequential_offload(tiny_model_dir: Path):
    def load() -> LTX2VideoTransformer3DModel:
        return LTX2VideoTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")

    def place(transformer: LTX2VideoTransformer3DModel, sequential_offload: bool) -> None:
        cpu = torch.device("cpu")
        apply_memory_plan(
            transformer,
            torch.float32,
            cpu,
            fp8=False,
            sequential_offload=sequential_offload,
            fp8_matmul=True,
            fp8_gelu_kernel=True,
        )

    transformer = load()
    blocks = len(transformer.transformer_blocks)
    place(transformer, sequential_offload=False)
    fused = [name for name, module in transformer.named_modules() if isinstance(module, Fp8FeedForward)]
    # The video feed-forward of every block; the tiny audio path is 8 wide, too narrow for FP8 kernels.
    assert fused == [f"transformer_blocks.{index}.ff" for index in range(blocks)]
    offloaded = load()
    place(offloaded, sequential_offload=True)
    assert not any(isinstance(module, Fp8FeedForward) for module in offloaded.modules())
    assert any(isinstance(module, Fp8Linear) for module in offloaded.modules())


def test_a_job_with_the_kernel_setting_runs_one_pass_feed_forwards_and_stays_close(
    tiny_model_dir: Path, tmp_path: Path
):
    reference = encode(tiny_model_dir, tmp_path, "full")
    placed: dict[str, dict] = {"kernel": {}, "torch": {}}
    latents = {
        label: encode_job(
            tiny_model_dir,
            tmp_path,
            label,
            placed[label],
            {"LTX2_FP8_GELU_KERNEL": str(label == "kernel").lower()},
            fp8_matmul=True,
        )
        for label in placed
    }
    for label, shared in placed.items():
        fused = [m for m in shared["denoiser"]["transformer"].modules() if isinstance(m, Fp8FeedForward)]
        assert len(fused) == (len(shared["denoiser"]["transformer"].transformer_blocks) if label == "kernel" else 0)
    for key in ("video", "audio"):
        assert 0 < relative_error(latents["kernel"][key], reference[key]) < 0.02
        assert relative_error(latents["kernel"][key], latents["torch"][key]) < 0.01


@torch.no_grad()
def test_regionally_compiled_blocks_hold_the_one_pass_feed_forward_in_one_graph(tiny_model_dir: Path):
    """compile_blocks' fullgraph regional compile over Fp8FeedForward: no graph break (fullgraph would raise), one
    graph for both blocks, and the same bits as the eager blocks. Dynamo decides graphs and breaks before any
    backend, so "aot_eager" (functionalisation and the operator's fake included) spares CI Inductor's codegen."""
    from torch._dynamo.utils import counters

    transformer = LTX2VideoTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    config = transformer.config
    apply_memory_plan(
        transformer,
        torch.float32,
        torch.device("cpu"),
        fp8=False,
        sequential_offload=False,
        fp8_matmul=True,
        fp8_gelu_kernel=True,
    )
    assert any(isinstance(module, Fp8FeedForward) for module in transformer.modules())
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 8, config.in_channels, generator=generator),
        "audio_hidden_states": torch.randn(1, 4, config.audio_in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, config.caption_channels, generator=generator),
        "audio_encoder_hidden_states": torch.randn(1, 8, config.caption_channels, generator=generator),
        "timestep": torch.tensor([500.0]),
        "num_frames": 2,
        "height": 2,
        "width": 2,
        "audio_num_frames": 4,
        "return_dict": False,
    }
    eager = transformer(**inputs)
    torch._dynamo.reset()
    counters.clear()
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=False, backend="aot_eager")
    for _ in range(2):
        compiled = transformer(**inputs)
        assert all(torch.equal(got, want) for got, want in zip(compiled, eager, strict=True))
    assert counters["stats"]["unique_graphs"] == 1

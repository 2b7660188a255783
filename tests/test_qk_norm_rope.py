"""services/qk_norm_rope.py: the self-attention's query and key RMS norms and split rotary embedding as one operator.

Its Triton kernel runs only on a GPU (bench/row_kernels_bench.py measures it there against the torch code and
Inductor's compile of it; a worker's first CUDA use checks it, qk_kernel_unavailable). Here the operator runs its
torch reference, which must be the attention processor's torch code bit for bit, so the setting changes no output
on a CPU; the operator must be reached where the kernel would serve, and never given tensors it would read wrong.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers.models.transformers.transformer_ltx2 import (
    LTX2Attention,
    LTX2PerturbedAttnProcessor,
    apply_split_rotary_emb,
)
from test_loras import encode, encode_job

from config.settings import ConfigError, load_settings
from orchestrator.run.policy import Attempt, initial_plan, next_plan
from protocol.errors import Failure
from protocol.files import Stage
from protocol.spec import JobSpec
from services import fp8_attention, qk_norm_rope

HEADS, HALF_HEAD, TOKENS = 4, 8, 10
REPO = Path(__file__).resolve().parents[1]
#: Triton for its CPU interpreter, apart from the project's environment (whose CPU torch would otherwise find a
#: Triton it was not built with); .ci/run installs it there.
TRITON_SITE = REPO / ".triton-interpreter"
TRITON_PIN = "triton==3.5.0"
WIDTH = HEADS * HALF_HEAD * 2


def angles(
    generator: torch.Generator, heads: int = HEADS, half_head: int = HALF_HEAD, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) shaped (batch, heads, tokens, half a head) and laid out (batch, tokens, heads, half a head), as
    diffusers' split rotary module makes them."""
    turns = torch.rand(2, TOKENS, heads, half_head, generator=generator, dtype=torch.float64) * 6.3
    return turns.cos().to(dtype).transpose(1, 2), turns.sin().to(dtype).transpose(1, 2)


def norms(generator: torch.Generator, width: int = WIDTH) -> tuple[torch.nn.RMSNorm, torch.nn.RMSNorm]:
    """A weighted query norm and a key norm of another eps, in bf16."""
    query_norm, key_norm = torch.nn.RMSNorm(width, eps=1e-6), torch.nn.RMSNorm(width, eps=1e-5)
    with torch.no_grad():
        query_norm.weight.copy_(1 + 0.1 * torch.randn(width, generator=generator))
    return query_norm.to(torch.bfloat16), key_norm.to(torch.bfloat16)


def rows(generator: torch.Generator, width: int = WIDTH) -> torch.Tensor:
    return (3 * torch.randn(2, TOKENS, width, generator=generator)).to(torch.bfloat16)


def torch_code(
    query: torch.Tensor, key: torch.Tensor, norm_q: torch.nn.Module, norm_k: torch.nn.Module, rotary: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the attention processor runs without the operator (diffusers' LTX-2 processor's lines)."""
    return apply_split_rotary_emb(norm_q(query), rotary), apply_split_rotary_emb(norm_k(key), rotary)


@pytest.fixture
def operator_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the queries that reached torch.ops.ltx2.qk_norm_rope in this test."""
    qk_norm_rope.define_qk_operator()
    operator, calls = torch.ops.ltx2.qk_norm_rope, []

    def spy(query: torch.Tensor, *rest: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(query.shape))
        return operator(query, *rest)

    monkeypatch.setattr(torch.ops.ltx2, "qk_norm_rope", spy)
    return calls


@torch.no_grad()
def test_the_operator_is_the_processors_torch_code_bit_for_bit(operator_calls: list):
    generator = torch.Generator().manual_seed(0)
    norm_q, norm_k = norms(generator)
    query, key, rotary = rows(generator), rows(generator), angles(generator)
    got = qk_norm_rope.norm_rope(query, key, norm_q, norm_k, rotary)
    want = torch_code(query, key, norm_q, norm_k, rotary)
    assert operator_calls == [(2, TOKENS, WIDTH)]
    for ours, theirs in zip(got, want, strict=True):
        assert ours.dtype == torch.bfloat16 and ours.is_contiguous() and torch.equal(ours, theirs)
    assert not torch.equal(got[0], got[1])  # the query and the key are not mixed up
    unweighted = torch.nn.RMSNorm(WIDTH, eps=1e-6, elementwise_affine=False)
    got = qk_norm_rope.norm_rope(query, key, unweighted, unweighted, rotary)
    assert len(operator_calls) == 2
    want = torch_code(query, key, unweighted, unweighted, rotary)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@torch.no_grad()
def test_tensors_the_kernel_cannot_read_take_the_torch_code_and_the_operator_refuses_them(operator_calls: list):
    generator = torch.Generator().manual_seed(1)
    norm_q, norm_k = norms(generator)
    query, key, rotary = rows(generator), rows(generator), angles(generator)
    hooked = torch.nn.RMSNorm(WIDTH, eps=1e-6).to(torch.bfloat16)
    hooked.register_forward_pre_hook(lambda module, inputs: None)  # as an offload's or a cast's hook would be
    float_weight = torch.nn.RMSNorm(WIDTH, eps=1e-6)  # fp32 weight, bf16 rows
    six = angles(generator, half_head=6)  # half a head of 6: not a power of two
    cases = {
        "angles laid out as shaped": (query, key, norm_q, norm_k, tuple(t.contiguous() for t in rotary)),
        "float64 angles": (query, key, norm_q, norm_k, tuple(t.double() for t in rotary)),
        "a strided query": (query.transpose(0, 1).contiguous().transpose(0, 1), key, norm_q, norm_k, rotary),
        "a hooked norm": (query, key, hooked, norm_k, rotary),
        "a weight of another dtype": (query, key, float_weight, norm_k, rotary),
        "a layer norm": (query, key, torch.nn.LayerNorm(WIDTH).to(torch.bfloat16), norm_k, rotary),
        "half a head of 6": (rows(generator, 48), rows(generator, 48), *norms(generator, 48), six),
    }
    for name, (q, k, nq, nk, rot) in cases.items():
        got, want = qk_norm_rope.norm_rope(q, k, nq, nk, rot), torch_code(q, k, nq, nk, rot)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), name
    assert operator_calls == []  # none reached the operator, whose CUDA kernel would read them wrongly
    layout = tuple(t.contiguous() for t in rotary)
    with pytest.raises(RuntimeError, match="qk_norm_rope takes contiguous"):
        torch.ops.ltx2.qk_norm_rope(query, key, norm_q.weight, None, 1e-6, 1e-6, *layout)
    with pytest.raises(RuntimeError, match="qk_norm_rope takes norm weights"):  # one the kernel would read past
        torch.ops.ltx2.qk_norm_rope(query, key, norm_q.weight[:32], None, 1e-6, 1e-6, *rotary)


def test_the_triton_kernel_run_by_tritons_interpreter_matches_the_torch_code():
    """The kernel's indexing, norms, eps, weights and rotation, by Triton's CPU interpreter on the first-launch
    check's cases (LTX-2's video and audio head shapes) in fp16 and fp32; bf16 is left to the GPU, as the
    interpreter rounds to it by truncation. In a child process with TRITON_SITE's Triton."""
    if not (TRITON_SITE / "triton").is_dir():
        install = f".venv/bin/python -m pip install --target {TRITON_SITE} {TRITON_PIN}"
        pytest.skip(f"no Triton for its interpreter (.ci/run installs it): {install}")
    script = textwrap.dedent(
        """
        import contextlib, json, torch
        torch.cuda.device = lambda device: contextlib.nullcontext()  # the launcher's device guard, on a CPU
        from services import qk_norm_rope
        report = {}
        for dtype in (torch.float16, torch.float32):
            for index, args in enumerate(qk_norm_rope.check_cases("cpu", dtype)):
                got, want = qk_norm_rope.norm_rope_launcher()(*args), qk_norm_rope.norm_rope_reference(*args)
                largest = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
                report[f"{str(dtype)[6:]} case {index}"] = [qk_norm_rope.off_the_reference(got, want), largest]
        print(json.dumps(report))
        """
    )
    environ = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{TRITON_SITE}{os.pathsep}{REPO}"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(report) == ["float16 case 0", "float16 case 1", "float32 case 0", "float32 case 1"]
    for case, (off, largest) in report.items():
        assert off is None, case
        assert largest < (1e-5 if case.startswith("float32") else 4e-3), case  # a rounding, not a wrong value


def test_without_cuda_the_kernel_is_not_used_and_the_reason_is_named():
    assert qk_norm_rope.qk_kernel_unavailable("cpu") == "cpu is not a CUDA device"


def split_attention(generator: torch.Generator) -> LTX2Attention:
    """An LTX-2.3-like self-attention (split rotary embedding, STG's processor) with a weighted query norm."""
    attn = LTX2Attention(
        query_dim=WIDTH,
        heads=HEADS,
        kv_heads=HEADS,
        dim_head=2 * HALF_HEAD,
        rope_type="split",
        processor=LTX2PerturbedAttnProcessor(),
    ).eval()
    torch.nn.init.normal_(attn.norm_q.weight, 1.0, 0.1, generator=generator)
    return attn


@torch.no_grad()
def test_the_processor_with_the_operator_equals_diffusers_own(operator_calls: list):
    generator = torch.Generator().manual_seed(2)
    attn = split_attention(generator)
    hidden, rotary = torch.randn(2, TOKENS, WIDTH, generator=generator), angles(generator)
    expected = attn(hidden, query_rotary_emb=rotary)
    attn.set_processor(fp8_attention.Fp8SelfAttnProcessor(attn.processor, qk_kernel=True))
    assert torch.equal(attn(hidden, query_rotary_emb=rotary), expected)
    assert operator_calls == [(2, TOKENS, WIDTH)]


@torch.no_grad()
def test_a_compiled_attention_holds_the_operator_in_one_graph_with_the_same_bits():
    generator = torch.Generator().manual_seed(3)
    attn = split_attention(generator)
    hidden, rotary = torch.randn(2, TOKENS, WIDTH, generator=generator), angles(generator)
    expected = attn(hidden, query_rotary_emb=rotary)
    attn.set_processor(fp8_attention.Fp8SelfAttnProcessor(attn.processor, qk_kernel=True))
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True, dynamic=False)  # a graph break would raise
    assert torch.equal(compiled(hidden, query_rotary_emb=rotary), expected)
    graph = []
    torch.compile(attn, backend=lambda gm, inputs: graph.append(gm) or gm, fullgraph=True)(
        hidden, query_rotary_emb=rotary
    )
    assert "ltx2.qk_norm_rope" in str(graph[0].graph)  # the operator, not its torch code traced through


def test_a_job_with_the_setting_on_renders_the_same_latents_through_the_operator(
    tiny_23_model_dir: Path, tmp_path: Path, operator_calls: list, caplog: pytest.LogCaptureFixture
):
    reference = encode(tiny_23_model_dir, tmp_path, "plain")
    caplog.set_level(logging.INFO)
    result = encode_job(
        tiny_23_model_dir, tmp_path, "qk", None, {"LTX2_QK_NORM_ROPE_KERNEL": "true"}, fp8_attention=True
    )
    for stream in ("video", "audio"):
        assert torch.equal(result[stream], reference[stream]), stream
    video = [shape for shape in operator_calls if shape[-1] == operator_calls[0][-1]]
    assert operator_calls and len(video) < len(operator_calls)  # the video and the audio self-attention
    assert "query/key norms and rotary embedding in one pass per token (torch)" in caplog.text


def test_the_plan_names_the_kernel_with_fp8_attention_when_on_and_not_on_the_offload_rung():
    on = load_settings(environ={"HOME": "/nonexistent"})
    off = load_settings(environ={"HOME": "/nonexistent", "LTX2_QK_NORM_ROPE_KERNEL": "false"})
    assert on.qk_norm_rope_kernel  # on by default since measured on an H100 (docs/benchmarks.md, version 21)
    spec = JobSpec.from_dict(
        {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
    ).with_changes(fp8_attention=True, fp8_matmul=True, compile=True)
    plan = initial_plan(Stage.ENCODE_DIFFUSE, spec, on)
    assert plan["qk_norm_rope"] == "kernel"
    rungs = []
    while (plan := next_plan(Stage.ENCODE_DIFFUSE, [Attempt(plan, Failure.CUDA_OOM)], spec, on)) is not None:
        rungs.append(plan)
    assert rungs and all(("qk_norm_rope" in rung) == (rung["offload"] != "sequential") for rung in rungs)
    assert rungs[-1]["offload"] == "sequential" and "fp8_gelu" not in rungs[-1]
    assert "qk_norm_rope" not in initial_plan(Stage.ENCODE_DIFFUSE, spec, off)
    assert "qk_norm_rope" not in initial_plan(Stage.ENCODE_DIFFUSE, spec.with_changes(fp8_attention=False), on)
    offloaded = spec.with_changes(sequential_offload=True)
    assert "qk_norm_rope" not in initial_plan(Stage.ENCODE_DIFFUSE, offloaded, on)
    with pytest.raises(ConfigError, match="LTX2_QK_NORM_ROPE_KERNEL: expected true or false"):
        load_settings(environ={"HOME": "/nonexistent", "LTX2_QK_NORM_ROPE_KERNEL": "sometimes"})

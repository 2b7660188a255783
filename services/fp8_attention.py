"""FP8 self-attention (`--fp8-attention`): cuDNN's FP8 scaled-dot-product attention on Hopper, with
per-tensor scales computed on the fly from each call's own query, key and value.

Why cuDNN's kernel: of the FP8 attention kernels a user can install from PyPI, NVIDIA's
`nvidia-cudnn-frontend` ships one for Hopper (`graph.sdpa_fp8`) as a plain wheel with no build step;
FlashAttention-3's FP8 path has no wheel on PyPI (it is built from source), and SageAttention's
wheel quantises to INT8. cuDNN is also what torch's own bf16 attention runs on an H100, so the two
paths differ in the operand precision alone. Measured against bf16 in bench/fp8_attention_bench.py.

The math. Attention is softmax(q k^T * scale) v per head. Each operand is quantised to
float8_e4m3fn with one scale for the whole tensor (amax / 448), and the kernel is told each
operand's inverse scale (`descale_*`), so its products come out in real units. Two further
scales belong to the kernel's own intermediates: the softmax probabilities P lie in [0, 1], so P
is held as P * 448 (`scale_s` 448, `descale_s` 1/448); and the output, a convex combination of
the rows of v, never exceeds max |v|, so on cards where the kernel writes FP8 output (Hopper) it is
scaled by 448 / amax(v) and read back with the inverse. Before quantising, the key's mean over the
sequence is subtracted: q (k - m)^T differs from q k^T by one constant per query row, which softmax
ignores, and the centred keys use FP8's range better (SageAttention's observation).

In the model, `Fp8SelfAttnProcessor` replaces the processor of each block's video and audio
self-attention (`attn1`, `audio_attn1`); cross-attention (text, audio<->video) keeps bf16: its
sequences are short and its cost small. The processor mirrors diffusers' LTX-2 processors
(projections, RMS norms, rotary embeddings, LTX-2.3's STG perturbation and per-head gates, the
output projection) and changes only the attention call; where the kernel cannot run (no GPU, no
frontend, a mask) it calls diffusers' attention as the processor it replaced would, so the CPU tests
check the mirror bit for bit.

One cuDNN graph is built per shape and kept (building takes milliseconds to seconds; a stage
renders one shape many times). The call is a torch custom op, so `torch.compile` sees one opaque
node rather than breaking the graph. Deterministic: cuDNN's forward attention has no atomics, and
the scales are reductions torch computes the same way every time.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

from services import qk_norm_rope
from services.attention_output import gated_output
from services.fp8_rows import FP8, FP8_MAX

# The kernel needs head dimensions of multiples of 16 (LTX-2's are 128 for video and 64 for audio).
HEAD_ALIGNMENT = 16
MIN_AMAX = 1e-6


class Fp8AttentionUnavailable(RuntimeError):
    """The FP8 attention kernel cannot run here (no cuDNN frontend, no Hopper GPU, a shape it refuses)."""


def unavailable_reason() -> str | None:
    """Why FP8 attention cannot run in this process, or None when it can."""
    if not torch.cuda.is_available():
        return "FP8 attention needs an NVIDIA GPU (none is visible)"
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        return f"FP8 attention needs a Hopper or newer GPU (compute capability 9.0+; this one is {major}.x)"
    try:
        frontend()
    except ImportError as error:
        return f"FP8 attention needs NVIDIA's cuDNN frontend: pip install nvidia-cudnn-frontend ({error})"
    return None


@functools.cache
def frontend() -> Any:
    """The `cudnn` module, imported after torch has loaded its own libcudnn (the frontend then binds
    to that library instead of looking for a separate copy)."""
    torch.backends.cudnn.version()
    import cudnn

    return cudnn


@dataclass(frozen=True)
class GraphKey:
    """What a built cuDNN graph depends on."""

    batch: int
    heads: int
    query_tokens: int
    key_tokens: int
    head_dim: int
    fp8_output: bool
    device: int


@dataclass
class BuiltGraph:
    """A cuDNN FP8 attention graph, the tensors that name its inputs and outputs, and its workspace."""

    graph: Any
    handle: Any
    q: Any
    k: Any
    v: Any
    scales: tuple[Any, ...]
    output: Any
    amax_s: Any
    amax_o: Any
    workspace: torch.Tensor


def layout(batch: int, tokens: int, heads: int, head_dim: int) -> tuple[list[int], list[int]]:
    """Dims (B, H, S, D) and strides of a contiguous (B, S, H, D) tensor, the layout diffusers'
    attention functions pass, so no transpose copy is made."""
    dims = [batch, heads, tokens, head_dim]
    strides = [tokens * heads * head_dim, head_dim, heads * head_dim, 1]
    return dims, strides


@functools.cache
def built_graph(key: GraphKey) -> BuiltGraph:
    """Build (once per shape) the FP8 attention graph for `key`."""
    cudnn = frontend()
    handle = cudnn.create_handle()
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    q_dims, q_strides = layout(key.batch, key.query_tokens, key.heads, key.head_dim)
    kv_dims, kv_strides = layout(key.batch, key.key_tokens, key.heads, key.head_dim)
    q = graph.tensor(name="q", dim=q_dims, stride=q_strides, data_type=e4m3)
    k = graph.tensor(name="k", dim=kv_dims, stride=kv_strides, data_type=e4m3)
    v = graph.tensor(name="v", dim=kv_dims, stride=kv_strides, data_type=e4m3)
    scales = tuple(
        graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
    )
    output, _, amax_s, amax_o = graph.sdpa_fp8(
        q=q,
        k=k,
        v=v,
        descale_q=scales[0],
        descale_k=scales[1],
        descale_v=scales[2],
        descale_s=scales[3],
        scale_s=scales[4],
        scale_o=scales[5],
        is_inference=True,
        attn_scale=1.0 / key.head_dim**0.5,
        use_causal_mask=False,
        name="fp8_attention",
    )
    output.set_output(True).set_dim(q_dims).set_stride(q_strides)
    output.set_data_type(e4m3 if key.fp8_output else cudnn.data_type.BFLOAT16)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    try:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
    except Exception as error:  # cuDNN raises its own error types for unsupported graphs
        raise Fp8AttentionUnavailable(f"cuDNN refused the FP8 attention graph {key}: {error}") from error
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=f"cuda:{key.device}")
    return BuiltGraph(graph, handle, q, k, v, scales, output, amax_s, amax_o, workspace)


def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 tensor, its inverse scale as a [1,1,1,1] float32 tensor): one scale for the whole tensor."""
    amax = tensor.abs().amax().float().clamp(min=MIN_AMAX)
    quantized = (tensor.float() * (FP8_MAX / amax)).to(FP8)
    return quantized, (amax / FP8_MAX).reshape(1, 1, 1, 1)


@functools.cache
def output_is_fp8(device: int) -> bool:
    """Hopper's FP8 attention kernel writes FP8 output; newer cards can write bf16 directly."""
    major, _ = torch.cuda.get_device_capability(device)
    return major == 9


def fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D) of (B, S, H, D) bf16 tensors, in FP8; returns (B, S_q, H, D) bf16.

    The quantisation happens here, outside the kernel's operator, so that under `--compile` Inductor
    fuses it with the rotary embedding before it (one pass over each operand; measured eagerly it
    cost 4.5 ms of a 26 ms call at 1080p, docs/benchmarks.md)."""
    q8, descale_q = quantize(query)
    k8, descale_k = quantize(key - key.mean(dim=1, keepdim=True))
    v8, descale_v = quantize(value)
    out = torch.ops.ltx2.fp8_sdpa(q8, k8, v8, descale_q, descale_k, descale_v)
    if out.dtype == FP8:  # Hopper: the output was scaled by 448 / amax(v) into FP8
        return (out.float() * descale_v).to(query.dtype)
    return out.to(query.dtype)


@torch.library.custom_op("ltx2::fp8_sdpa", mutates_args=())
def fp8_sdpa(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
) -> torch.Tensor:
    """cuDNN's FP8 attention of quantised (B, S, H, D) operands and their inverse scales; FP8 output on
    Hopper (scaled by 1 / descale_v), bf16 elsewhere."""
    batch, query_tokens, heads, head_dim = q8.shape
    if head_dim % HEAD_ALIGNMENT:
        raise Fp8AttentionUnavailable(f"FP8 attention needs a head dimension of a multiple of 16, not {head_dim}")
    device = q8.device.index if q8.device.index is not None else torch.cuda.current_device()
    fp8_output = output_is_fp8(device)
    built = built_graph(GraphKey(batch, heads, query_tokens, k8.shape[1], head_dim, fp8_output, device))
    ones = torch.ones((1, 1, 1, 1), dtype=torch.float32, device=q8.device)
    descale_s, scale_s = ones / FP8_MAX, ones * FP8_MAX
    scale_o = 1.0 / descale_v if fp8_output else ones
    out = torch.empty(q8.shape, dtype=FP8 if fp8_output else torch.bfloat16, device=q8.device)
    amax_s, amax_o = torch.empty_like(ones), torch.empty_like(ones)
    frontend().set_stream(handle=built.handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
    pack = dict(zip(built.scales, (descale_q, descale_k, descale_v, descale_s, scale_s, scale_o), strict=True))
    operands = {built.q: q8.contiguous(), built.k: k8.contiguous(), built.v: v8.contiguous()}
    pack.update({**operands, built.output: out, built.amax_s: amax_s, built.amax_o: amax_o})
    built.graph.execute(pack, built.workspace, handle=built.handle)
    return out


@fp8_sdpa.register_fake
def _(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
) -> torch.Tensor:
    device = q8.device.index if q8.device.index is not None else torch.cuda.current_device()
    return torch.empty(q8.shape, dtype=FP8 if output_is_fp8(device) else torch.bfloat16, device=q8.device)


SELF_ATTENTION = ("attn1", "audio_attn1")


@functools.cache
def kernel_unavailable() -> str | None:
    """`unavailable_reason()` once per process (it imports the frontend and asks the GPU)."""
    return unavailable_reason()


class Fp8SelfAttnProcessor:
    """An LTX2Attention processor for self-attention that runs the attention itself in FP8."""

    def __init__(self, base: Any, qk_kernel: bool = False) -> None:
        # With `qk_kernel`, the query's and key's norms and split rotary embedding go through
        # services/qk_norm_rope.py's operator (one pass per token); defined here, outside any compiled region.
        self.qk_kernel = qk_kernel
        if qk_kernel:
            qk_norm_rope.define_qk_operator()
        # The same attention backend as the processor it replaces, for the bf16 fallback.
        self._attention_backend = getattr(base, "_attention_backend", None)
        self._parallel_config = getattr(base, "_parallel_config", None)
        # LTX-2.3's STG processor takes a perturbation mask; the plain one ignores it.
        self.perturbs = "perturbation_mask" in inspect.signature(base.__call__).parameters
        # Decided once, outside any compiled region: dynamo then sees a constant.
        self.kernel = kernel_unavailable() is None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        perturbation_mask: torch.Tensor | None = None,
        all_perturbed: bool | None = None,
    ) -> torch.Tensor:
        if not self.perturbs:
            perturbation_mask, all_perturbed = None, False
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        value = attn.to_v(encoder_hidden_states)
        if all_perturbed is None:
            all_perturbed = torch.all(perturbation_mask == 0) if perturbation_mask is not None else False
        if all_perturbed:
            hidden_states = value  # STG: the perturbed blocks skip attention (as diffusers does)
        elif self.qk_kernel and query_rotary_emb is not None and key_rotary_emb is None and attn.rope_type == "split":
            query, key = qk_norm_rope.norm_rope(
                attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.norm_q, attn.norm_k, query_rotary_emb
            )
            hidden_states = self.attend_heads(attn, query, key, value, attention_mask, perturbation_mask)
        else:
            query = attn.norm_q(attn.to_q(hidden_states))
            key = attn.norm_k(attn.to_k(encoder_hidden_states))
            if query_rotary_emb is not None:
                rotate = apply_interleaved_rotary_emb if attn.rope_type == "interleaved" else apply_split_rotary_emb
                if attn.rope_type in ("interleaved", "split"):
                    query = rotate(query, query_rotary_emb)
                    key = rotate(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
            hidden_states = self.attend_heads(attn, query, key, value, attention_mask, perturbation_mask)
        return gated_output(attn, hidden_states, gate_logits)

    def attend_heads(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        perturbation_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of (B, S, H * D) query, key and value split into heads; STG's perturbed tokens take `value`."""
        query, key = query.unflatten(2, (attn.heads, -1)), key.unflatten(2, (attn.heads, -1))
        heads_value = value.unflatten(2, (attn.heads, -1))
        hidden_states = self.attend(query, key, heads_value, mask).flatten(2, 3).to(query.dtype)
        if perturbation_mask is not None:
            hidden_states = torch.lerp(value, hidden_states, perturbation_mask)
        return hidden_states

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, S, H, D) attention: FP8 where the kernel runs, diffusers' dispatch (bf16) otherwise."""
        if self.kernel and mask is None and query.is_cuda and query.shape[-1] % HEAD_ALIGNMENT == 0:
            return fp8_attention(query, key, value)
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )


def install(transformer: Any, qk_kernel: bool = False) -> int:
    """Give every block's video and audio self-attention an Fp8SelfAttnProcessor (with `qk_kernel`, the norms and
    rotary embedding in one pass: services/qk_norm_rope.py); returns how many."""
    count = 0
    for block in transformer.transformer_blocks:
        for name in SELF_ATTENTION:
            module = getattr(block, name, None)
            if module is not None:
                module.set_processor(Fp8SelfAttnProcessor(module.processor, qk_kernel))
                count += 1
    return count

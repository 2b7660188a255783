"""The self-attention's query and key RMS norms and split rotary embedding in one pass over each token.

Why a kernel of our own. Before FP8 self-attention (services/fp8_attention.py) each block normalises its query and
key over their full width (`norm_q`, `norm_k`: RMS norms with a weight) and rotates them with LTX-2's split rotary
embedding, whose cos and sin tables are float32 and as wide as half the query: per token, 8 KB of query, 8 KB of key
and 16 KB of angles at 1080p. Compiled, Inductor spreads this over reduction and pointwise kernels that read the
angles once for the query and once for the key, and some of them twice (the row's norm, then the rotated values):
in benchmarks version 19's profile of a 2,257 ms 1080p stage-2 step on an H100, the kernels named for the norm and
the rotation took ~183 ms, where reading and writing each byte once would cost ~30 ms. The kernel below loads a
token's query, key and angles once, takes both norms in registers, rotates both and writes both in the input's
dtype, rounding where the torch code does (after the norm and after the rotation), so its outputs are the
reference's within a rounding step of the norm. What follows (the per-tensor FP8 scales of the attention's
operands) stays with Inductor: it reads the bf16 results, which carry no angles.

Like services/fp8_rows.py it is a Triton kernel behind an opaque torch custom operator: `torch.compile` keeps it in
the graph, one fixed launch configuration (no autotuning, no atomics: the same request gives the same bits,
DESIGN.md rule 6), the torch implementation on every other device (the CPU tests run it: it is the code the
attention processor ran before, so their outputs are unchanged), and a worker's first CUDA use launches the kernel
on LTX-2's head shapes and keeps the torch path if that fails (qk_kernel_unavailable). CI runs the kernel through
Triton's CPU interpreter (tests/test_qk_norm_rope.py).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers.models.transformers.transformer_ltx2 import apply_split_rotary_emb
from torch.nn import functional

from services.fp8_rows import first_launch_failure

#: Most values of a half-row the kernel holds in registers: heads rounded up to a power of two times half a head
#: (LTX-2's video query: 32 x 64 = 2,048).
MAX_HALF = 4096


def norm_rope_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    query_weight: torch.Tensor | None,
    key_weight: torch.Tensor | None,
    query_eps: float,
    key_eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) RMS-normalised over their last dimension and rotated by the split rotary embedding (cos, sin)
    of shape (batch, heads, tokens, half a head): the torch code of diffusers' LTX-2 processor, step for step."""
    width = (query.shape[-1],)
    query = apply_split_rotary_emb(functional.rms_norm(query, width, query_weight, query_eps), (cos, sin))
    key = apply_split_rotary_emb(functional.rms_norm(key, width, key_weight, key_eps), (cos, sin))
    return query, key


@functools.cache
def define_qk_operator() -> Any:
    """`torch.ops.ltx2.qk_norm_rope`, defined once per process with the torch reference on every device;
    qk_kernel_unavailable gives it the Triton kernel for CUDA tensors once a first launch succeeded (opaque for the
    reason services/fp8_rows.define_operator gives)."""

    @torch.library.custom_op("ltx2::qk_norm_rope", mutates_args=())
    def reference_norm_rope(
        query: torch.Tensor,
        key: torch.Tensor,
        query_weight: torch.Tensor | None,
        key_weight: torch.Tensor | None,
        query_eps: float,
        key_eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _require_tokens(query, key, query_weight, key_weight, cos, sin)
        return norm_rope_reference(query, key, query_weight, key_weight, query_eps, key_eps, cos, sin)

    @reference_norm_rope.register_fake
    def _(
        query: torch.Tensor,
        key: torch.Tensor,
        query_weight: torch.Tensor | None,
        key_weight: torch.Tensor | None,
        query_eps: float,
        key_eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _require_tokens(query, key, query_weight, key_weight, cos, sin)
        return torch.empty_like(query, memory_format=torch.contiguous_format), torch.empty_like(
            key, memory_format=torch.contiguous_format
        )

    return reference_norm_rope


def kernel_takes(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel can read these tensors: query and key (batch, tokens, width) alike and contiguous, in
    bf16, fp16 or fp32; cos and sin float32 (batch, heads, tokens, half a head) laid out as (batch, tokens, heads,
    half a head) in memory (how diffusers' rotary module makes them), covering half the width, half a head a power
    of two; its register tile within MAX_HALF."""
    if query.dim() != 3 or query.shape != key.shape or cos.dim() != 4 or cos.shape != sin.shape:
        return False
    if query.dtype not in (torch.bfloat16, torch.float16, torch.float32) or key.dtype != query.dtype:
        return False
    batch, tokens, width = query.shape
    cos_batch, heads, cos_tokens, half_head = cos.shape
    return (
        cos.dtype == sin.dtype == torch.float32
        and half_head & (half_head - 1) == 0  # a power of two: the kernel's tl.arange over a head's half
        and (cos_batch, cos_tokens) == (batch, tokens)
        and heads * half_head * 2 == width
        and (1 << (heads - 1).bit_length()) * half_head <= MAX_HALF  # the kernel's tile: heads rounded up to 2^n
        and query.device == key.device == cos.device == sin.device
        and query.is_contiguous()
        and key.is_contiguous()
        and cos.transpose(1, 2).is_contiguous()
        and sin.transpose(1, 2).is_contiguous()
    )


def _require_tokens(
    query: torch.Tensor,
    key: torch.Tensor,
    query_weight: torch.Tensor | None,
    key_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """The operator's inputs are those kernel_takes accepts, with weights (if any) that weight_fits (norm_rope sends
    anything else to the reference)."""
    torch._check(
        kernel_takes(query, key, cos, sin),
        lambda: (
            "qk_norm_rope takes contiguous (batch, tokens, width) query and key and float32 angles laid out "
            "(batch, tokens, heads, half a head)"
        ),
    )
    torch._check(
        weight_fits(query_weight, query) and weight_fits(key_weight, key),
        lambda: "qk_norm_rope takes norm weights as wide as the query, contiguous, of its dtype and device",
    )


def weight_fits(weight: torch.Tensor | None, tensor: torch.Tensor) -> bool:
    """No weight, or one value per column of `tensor`, contiguous, of its dtype and device (what the kernel reads)."""
    if weight is None:
        return True
    return (
        weight.shape == (tensor.shape[-1],)
        and weight.is_contiguous()
        and weight.dtype == tensor.dtype
        and weight.device == tensor.device
    )


def norm_rope(
    query: torch.Tensor,
    key: torch.Tensor,
    norm_q: torch.nn.Module,
    norm_k: torch.nn.Module,
    rotary: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm_q(query)` and `norm_k(key)` rotated by `rotary` (split layout): through the operator where the norms are
    plain torch RMS norms of the input's dtype without hooks (an offload's or a cast's hook must see its module
    called) and kernel_takes the tensors; as the processor's torch code otherwise. `define_qk_operator()` must have
    run outside any compiled region (Fp8SelfAttnProcessor does it when the kernel is on)."""
    cos, sin = rotary
    if plain_rms_norm(norm_q, query) and plain_rms_norm(norm_k, key) and kernel_takes(query, key, cos, sin):
        return torch.ops.ltx2.qk_norm_rope(query, key, norm_q.weight, norm_k.weight, norm_q.eps, norm_k.eps, cos, sin)
    return apply_split_rotary_emb(norm_q(query), rotary), apply_split_rotary_emb(norm_k(key), rotary)


def plain_rms_norm(norm: torch.nn.Module, tensor: torch.Tensor) -> bool:
    """A torch.nn.RMSNorm over the tensor's last dimension with a set eps, no hooks, and a weight (if any) of the
    tensor's dtype and device: the operator reads its weight and eps directly."""
    if type(norm) is not torch.nn.RMSNorm or norm.eps is None or tuple(norm.normalized_shape) != (tensor.shape[-1],):
        return False
    # torch's own hooks, accelerate's, and diffusers' (layerwise casting, group offload) each act on a module call.
    if norm._forward_hooks or norm._forward_pre_hooks or hasattr(norm, "_hf_hook") or hasattr(norm, "_diffusers_hook"):
        return False
    return weight_fits(norm.weight, tensor)


@functools.cache
def qk_kernel_unavailable(device: str) -> str | None:
    """Why the Triton kernel cannot serve tensors on `device` (e.g. "cuda:0"), or None once it has
    (services/fp8_rows.first_launch_failure): a first launch of each of check_cases (LTX-2's video and audio head
    shapes) comes out within a rounding of the reference, so a kernel this card cannot compile at those shapes fails
    here, at load, not in a step. On success the operator's CUDA kernel is the Triton one from then on."""

    def check() -> str | None:
        for args in check_cases(device, torch.bfloat16):
            if (off := off_the_reference(norm_rope_launcher()(*args), norm_rope_reference(*args))) is not None:
                return off
        return None

    return first_launch_failure(device, check, _serve_cuda_with_the_qk_kernel)


@functools.cache
def _serve_cuda_with_the_qk_kernel() -> None:
    """The operator's CUDA kernel becomes the Triton one (once a process, whichever CUDA device checked first)."""
    define_qk_operator().register_kernel("cuda")(norm_rope_launcher())


def check_cases(device: str, dtype: torch.dtype) -> list[tuple[Any, ...]]:
    """The operator's arguments for the first-launch check (and the tests' run of the kernel in Triton's
    interpreter): LTX-2's video heads (32 x 64 halves, batch 2) with both norms weighted and eps 1e-6 / 1e-5, a
    token scaled by 1e-3 so that the two eps matter; its audio heads (32 x 32 halves) without weights."""
    generator = torch.Generator(device=device).manual_seed(0)
    cases = []
    for batch, heads, half_head, weighted in ((2, 32, 64, True), (1, 32, 32, False)):
        width = heads * half_head * 2
        query, key = (3 * torch.randn(2, batch, 3, width, device=device, generator=generator)).to(dtype).unbind(0)
        query[0, 1] *= 1e-3
        key[0, 1] *= 1e-3
        weights = (1 + 0.1 * torch.randn(2, width, device=device, generator=generator)).to(dtype).unbind(0)
        turns = torch.rand(batch, 3, heads, half_head, device=device, generator=generator) * 6.3
        cos, sin = turns.cos().transpose(1, 2), turns.sin().transpose(1, 2)
        query_weight, key_weight = weights if weighted else (None, None)
        cases.append((query.contiguous(), key.contiguous(), query_weight, key_weight, 1e-6, 1e-5, cos, sin))
    return cases


def off_the_reference(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> str | None:
    """None when each value of `got` is within a rounding of `want`'s (2^-6 of the value plus 2^-6: outputs are
    normalised to about 1, and the norm's rounding moves a rotated value by a step of either half it mixes);
    else what is off. A wrong index or eps moves values by their own size."""
    for name, ours, theirs in zip(("query", "key"), got, want, strict=True):
        if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
            return (
                f"{name}: {tuple(ours.shape)} {ours.dtype} where the reference has {tuple(theirs.shape)} {theirs.dtype}"
            )
        error = (ours.float() - theirs.float()).abs()
        if not bool((error <= 2**-6 * (theirs.float().abs() + 1)).all()):
            return f"{name}: a value {error.max().item():.3g} away"
    return None


def warps_for_half(half_block: int) -> int:
    """Warps per token: 4 up to a half-row of 1,024 values, 8 at LTX-2's 2,048, 16 beyond."""
    return max(4, min(16, half_block // 256))


@functools.cache
def norm_rope_launcher() -> Any:
    """The function that launches the Triton kernel (the operator's CUDA kernel; bench/row_kernels_bench.py measures
    it against the reference and against Inductor's compile of it on a GPU)."""
    import triton
    import triton.language as tl

    @triton.jit
    def qk_norm_rope_kernel(  # noqa: ANN202 (Triton reads the annotations: tensors and ints go unannotated)
        query_ptr,  # noqa: ANN001
        key_ptr,  # noqa: ANN001
        query_weight_ptr,  # noqa: ANN001
        key_weight_ptr,  # noqa: ANN001
        cos_ptr,  # noqa: ANN001
        sin_ptr,  # noqa: ANN001
        query_out_ptr,  # noqa: ANN001
        key_out_ptr,  # noqa: ANN001
        query_eps,  # noqa: ANN001
        key_eps,  # noqa: ANN001
        HEADS: tl.constexpr,
        HALF_HEAD: tl.constexpr,
        HEADS_BLOCK: tl.constexpr,
        QUERY_WEIGHT: tl.constexpr,
        KEY_WEIGHT: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        head = tl.arange(0, HEADS_BLOCK)[:, None]
        column = tl.arange(0, HALF_HEAD)[None, :]
        inside = head < HEADS
        # A head's 2 * HALF_HEAD values: its first half rotates with its second (diffusers' split layout).
        first = token * (HEADS * 2 * HALF_HEAD) + head * (2 * HALF_HEAD) + column
        angle = token * (HEADS * HALF_HEAD) + head * HALF_HEAD + column
        cos = tl.load(cos_ptr + angle, mask=inside, other=0.0)
        sin = tl.load(sin_ptr + angle, mask=inside, other=0.0)
        width = HEADS * 2 * HALF_HEAD
        weight_at = head * (2 * HALF_HEAD) + column
        # The query, then the key: the same steps, written out twice (a Triton helper would have to be a module
        # global, and this module imports without Triton).
        x1 = tl.load(query_ptr + first, mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(query_ptr + first + HALF_HEAD, mask=inside, other=0.0).to(tl.float32)
        squares = tl.sum(tl.sum(x1 * x1 + x2 * x2, axis=1), axis=0)
        inverse = tl.math.rsqrt(squares / width + query_eps)
        x1, x2 = x1 * inverse, x2 * inverse
        if QUERY_WEIGHT:
            x1 *= tl.load(query_weight_ptr + weight_at, mask=inside, other=0.0).to(tl.float32)
            x2 *= tl.load(query_weight_ptr + weight_at + HALF_HEAD, mask=inside, other=0.0).to(tl.float32)
        # The norm's output is rounded to the input's dtype before the rotation, as in the torch code.
        dtype = query_out_ptr.dtype.element_ty  # the key's too (kernel_takes: query and key alike)
        x1 = x1.to(dtype).to(tl.float32)
        x2 = x2.to(dtype).to(tl.float32)
        tl.store(query_out_ptr + first, (x1 * cos - sin * x2).to(dtype), mask=inside)
        tl.store(query_out_ptr + first + HALF_HEAD, (x2 * cos + sin * x1).to(dtype), mask=inside)
        y1 = tl.load(key_ptr + first, mask=inside, other=0.0).to(tl.float32)
        y2 = tl.load(key_ptr + first + HALF_HEAD, mask=inside, other=0.0).to(tl.float32)
        squares = tl.sum(tl.sum(y1 * y1 + y2 * y2, axis=1), axis=0)
        inverse = tl.math.rsqrt(squares / width + key_eps)
        y1, y2 = y1 * inverse, y2 * inverse
        if KEY_WEIGHT:
            y1 *= tl.load(key_weight_ptr + weight_at, mask=inside, other=0.0).to(tl.float32)
            y2 *= tl.load(key_weight_ptr + weight_at + HALF_HEAD, mask=inside, other=0.0).to(tl.float32)
        y1 = y1.to(dtype).to(tl.float32)
        y2 = y2.to(dtype).to(tl.float32)
        tl.store(key_out_ptr + first, (y1 * cos - sin * y2).to(dtype), mask=inside)
        tl.store(key_out_ptr + first + HALF_HEAD, (y2 * cos + sin * y1).to(dtype), mask=inside)

    def launch(
        query: torch.Tensor,
        key: torch.Tensor,
        query_weight: torch.Tensor | None,
        key_weight: torch.Tensor | None,
        query_eps: float,
        key_eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, _ = query.shape
        _, heads, _, half_head = cos.shape
        query_out, key_out = torch.empty_like(query), torch.empty_like(key)
        if batch * tokens == 0:
            return query_out, key_out
        heads_block = triton.next_power_of_2(heads)
        # The launch goes to the current device's stream: make it the tensors' (services/fp8_rows.py says why).
        with torch.cuda.device(query.device):
            qk_norm_rope_kernel[(batch * tokens,)](
                query,
                key,
                query_weight if query_weight is not None else query,
                key_weight if key_weight is not None else key,
                cos,
                sin,
                query_out,
                key_out,
                query_eps,
                key_eps,
                HEADS=heads,
                HALF_HEAD=half_head,
                HEADS_BLOCK=heads_block,
                QUERY_WEIGHT=query_weight is not None,
                KEY_WEIGHT=key_weight is not None,
                num_warps=warps_for_half(heads_block * half_head),
            )
        return query_out, key_out

    return launch

"""The feed-forward's hidden activation quantised for its second FP8 matmul in one pass over each row.

Why a kernel of our own beside Inductor's. Between the two FP8 matmuls of a block's feed-forward the hidden
activation (tokens x 16,384 at LTX-2's width) gets its bias, the tanh GELU and a rowwise FP8 quantisation
(services/fp8_matmul.py). Compiled, Inductor fuses those into one reduction kernel that walks each row twice
(once for the row's maximum, once for the scaled cast, computing the GELU both times): at 1080p that kernel took
91.5 ms of a 2,257 ms stage-2 step on an H100 (benchmarks version 19), about four times what reading the bf16
row once and writing its FP8 copy costs at the card's memory bandwidth. A row of 16,384 values fits one
program's registers, so the kernel below loads it once, applies bias and GELU in fp32, takes the maximum and
writes the FP8 row and its scale. The card is power-capped through a 1080p step, so fewer bytes moved and half
the GELUs are energy, and energy is time there.

It is a Triton kernel behind a torch custom operator, so `torch.compile` keeps it in the graph (no graph break),
and it launches with its one fixed configuration: no autotuning, so the same request gives the same bits
(DESIGN.md rule 6) with or without Inductor's deterministic mode. Where Triton or a CUDA device is missing (the
CPU tests, a CPU worker) the same operator runs its torch implementation, the reference the kernel is measured
against on a GPU (bench/row_kernels_bench.py; version 20 of docs/benchmarks.md: 5 in 10 million FP8 codes differ,
by one step); a worker's first CUDA use launches the kernel once on a small input and keeps Inductor's fusion
if that fails (gelu_kernel_unavailable). The GELU is written as x * sigmoid(2u), which equals the tanh form
0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3); the two implementations differ by rounding only.

A NaN in a row (an overflow of the first matmul's bf16 output) makes that row's scale and codes NaN, as the
reference's amax does (Triton's max and clamp skip NaN by default; the kernel adds the row's NaN sum to its scale
and asks its clamp to keep NaN), and the first-launch check holds a NaN row so a kernel that lost it is never
registered.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Scales never reach zero, even for an all-zero row (also fp8_matmul.quantize_rows').
MIN_SCALE = 1e-12
# 2 * sqrt(2 / pi): the tanh GELU's inner factor, doubled for the sigmoid form.
TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
#: Widest row the kernel holds in registers (LTX-2's feed-forward is 16,384 wide; its audio one 8,192).
MAX_ROW = 32768


def gelu_quantize_reference(hidden: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 rows, float32 scale per row as [rows, 1]) of gelu_tanh(hidden + bias), computed in fp32 with torch."""
    values = hidden.float()
    if bias is not None:
        values = values + bias.float()
    inner = TWO_SQRT_2_OVER_PI * (values + GELU_CUBIC * values * values * values)
    values = values * torch.sigmoid(inner)
    scale = values.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_SCALE) / FP8_MAX
    quantized = (values / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


def fp8_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable FP8 values apart each pair of codes of `a` and `b` is (same sign)."""
    return (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs()


def triton_unavailable() -> str | None:
    """Why the Triton kernel cannot be built in this process, or None when it can."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error})"
    return None


def _require_rows(hidden: torch.Tensor) -> None:
    """The operator's inputs: 2-D with contiguous rows (gelu_quantize_rows sends anything else to the reference)."""
    torch._check(hidden.dim() == 2, lambda: f"gelu_quantize_rows takes 2-D rows, got {hidden.dim()}-D")
    torch._check(hidden.stride(-1) == 1, lambda: "gelu_quantize_rows takes rows with contiguous columns")


@functools.cache
def define_operator() -> Any:
    """`torch.ops.ltx2.gelu_quantize_rows`, defined once per process with the torch reference on every device;
    gelu_kernel_unavailable gives it the Triton kernel for CUDA tensors once a first launch succeeded. An opaque custom
    operator rather than a `triton_op`: Inductor then never traces the kernel into a graph of another device (a CPU
    worker on a GPU host), and the price, one Python dispatch per call, is paid on the CPU while the GPU runs ahead."""

    @torch.library.custom_op("ltx2::gelu_quantize_rows", mutates_args=())
    def reference_rows(hidden: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        _require_rows(hidden)
        return gelu_quantize_reference(hidden, bias)

    @reference_rows.register_fake
    def _(hidden: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        _require_rows(hidden)
        return hidden.new_empty(hidden.shape, dtype=FP8), hidden.new_empty((hidden.shape[0], 1), dtype=torch.float32)

    return reference_rows


def first_launch_failure(device: str, check: Callable[[], str | None], serve: Callable[[], None]) -> str | None:
    """The first-launch protocol of the project's Triton kernels (this one, services/qk_norm_rope.py's): None once
    `check()` (launch the kernel on the device, compare with the torch reference, say what is off or None) passed on
    `device` and `serve()` gave the operator its CUDA kernel; else why the torch path stays: not a CUDA device, no
    Triton, a launch that raised (a Triton that imports but cannot compile for this card fails here, at load, not in
    a compiled step), or a result off the reference."""
    if torch.device(device).type != "cuda":
        return f"{device} is not a CUDA device"
    if (reason := triton_unavailable()) is not None:
        return reason
    try:
        off = check()
        torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 (any failure of a compiler or driver means: keep the torch path)
        return f"the Triton kernel failed its first launch ({type(error).__name__}: {error})"
    if off is not None:
        return f"the Triton kernel's first result is off the reference ({off})"
    serve()
    return None


@functools.cache
def gelu_kernel_unavailable(device: str) -> str | None:
    """Why the Triton kernel cannot serve tensors on `device` (e.g. "cuda:0"), or None once it has
    (first_launch_failure): a first launch on a small input gives the reference's scales and codes within one FP8
    step, and a row holding a NaN comes out NaN. On success the operator's CUDA kernel is the Triton one."""

    def check() -> str | None:
        generator = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(4, 160, device=device, generator=generator).to(torch.bfloat16)
        hidden[3, 7] = float("nan")  # the last row holds a NaN: its scale and codes must come out NaN
        bias = torch.randn(160, device=device, generator=generator).to(torch.bfloat16)
        quantized, scale = triton_launcher()(hidden, bias)
        expected, expected_scale = gelu_quantize_reference(hidden, bias)
        steps = fp8_steps(quantized[:3], expected[:3]).max().item()
        if steps > 1 or not torch.allclose(scale[:3], expected_scale[:3], rtol=1e-5, atol=0):
            return f"{steps} FP8 steps"
        if not (scale[3].isnan().all() and quantized[3].float().isnan().all()):
            return "it lost a NaN of its row: finite scale or codes where the reference has NaN"
        return None

    return first_launch_failure(device, check, _serve_cuda_with_the_kernel)


@functools.cache
def _serve_cuda_with_the_kernel() -> None:
    """The operator's CUDA kernel becomes the Triton one (once a process, whichever CUDA device checked first)."""
    define_operator().register_kernel("cuda")(triton_launcher())


@functools.cache
def triton_launcher() -> Any:
    """The function that launches the Triton kernel on 2-D `hidden` (and `bias`) and returns (FP8 rows, scales).
    The operator's CUDA kernel (bench/row_kernels_bench.py checks it against gelu_quantize_reference on a GPU:
    Triton's CPU interpreter casts to FP8 wrongly, 31.9 became 16, so it cannot stand in for a card)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_quantize_kernel(  # noqa: ANN202 (Triton reads the annotations: tensors and ints go unannotated)
        hidden_ptr,  # noqa: ANN001
        bias_ptr,  # noqa: ANN001
        out_ptr,  # noqa: ANN001
        scale_ptr,  # noqa: ANN001
        columns,  # noqa: ANN001
        hidden_stride,  # noqa: ANN001
        out_stride,  # noqa: ANN001
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        inside = offsets < columns
        values = tl.load(hidden_ptr + row * hidden_stride + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            values += tl.load(bias_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        # Triton reads no module globals: the constants are TWO_SQRT_2_OVER_PI, GELU_CUBIC, MIN_SCALE and FP8_MAX.
        inner = 1.5957691216057308 * (values + 0.044715 * values * values * values)
        values = values / (1.0 + tl.exp(-inner))
        # Masked columns hold gelu(0) = 0, which never raises a row's maximum. tl.max skips NaN where torch's amax
        # returns it: the row's NaNs summed (0.0 when it has none, NaN otherwise) make its scale and codes NaN.
        nan_sum = tl.sum(tl.where(values != values, values, 0.0), axis=0)  # noqa: PLR0124 (only NaN is unequal to itself)
        scale = tl.maximum(tl.max(tl.abs(values), axis=0), 1e-12) / 448.0 + nan_sum
        quantized = tl.clamp(values / scale, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + row * out_stride + offsets, quantized.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(scale_ptr + row, scale)

    def launch(hidden: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows, columns = hidden.shape
        out = torch.empty((rows, columns), dtype=FP8, device=hidden.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=hidden.device)
        if rows == 0:
            return out, scale
        block = triton.next_power_of_2(columns)
        # Triton launches on the current device's stream: make it the tensors' (a lane on cuda:1 of a process
        # whose current device is cuda:0).
        with torch.cuda.device(hidden.device):
            gelu_quantize_kernel[(rows,)](
                hidden,
                bias if bias is not None else hidden,
                out,
                scale,
                columns,
                hidden.stride(0),
                out.stride(0),
                HAS_BIAS=bias is not None,
                BLOCK=block,
                num_warps=warps_for(block),
            )
        return out, scale

    return launch


def warps_for(block: int) -> int:
    """Warps per row: enough threads that each holds at most 32 fp32 values of the row (16 warps at 16,384)."""
    return max(4, min(32, block // (32 * 32)))


def gelu_quantize_rows(hidden: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 rows, float32 scale per row as [rows, 1]) of gelu_tanh(hidden + bias) for a contiguous 2-D `hidden`
    at most MAX_ROW wide; the kernel on a CUDA device where gelu_kernel_unavailable found it working, torch
    elsewhere. `define_operator()` must have run once in this process (Fp8FeedForward does it when it is made),
    outside any compiled region: Dynamo reads the operator from torch.ops and never traces its definition."""
    if hidden.dim() != 2 or hidden.shape[1] > MAX_ROW or hidden.stride(1) != 1:
        return gelu_quantize_reference(hidden, bias)
    return torch.ops.ltx2.gelu_quantize_rows(hidden, bias)

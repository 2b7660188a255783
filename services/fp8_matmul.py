"""FP8 matmuls in the transformer blocks (`--fp8-matmul`): weights stored in float8_e4m3fn and
multiplied in FP8 on the tensor cores, with a scale per weight row and per activation row.

`--fp8` (layerwise casting) halves the weights' memory but computes in bf16, so it is no faster;
this mode halves the memory *and* runs the block matmuls at FP8 speed (about twice bf16 on
Hopper). Each linear layer of the repeated blocks becomes an Fp8Linear: its weight is quantised
once, per output channel (scale = row max / 448); each input row is quantised on the fly the same
way, and `torch._scaled_mm` multiplies the two with both scale vectors, accumulating in fp32 and
returning the compute dtype. Layers whose sizes are not multiples of 16 (what the FP8 kernels
need) and everything outside the blocks (embeddings, projections in and out, norms) stay in bf16.
Rowwise scales keep one outlier channel or token from crushing the precision of the others.

LoRAs are fused into the bf16 weights before quantisation (services/lora_fusing.py refuses otherwise).
The quantisation happens block by block on the accelerator, so the full bf16 transformer is never
resident there: the peak is the FP8 weights plus one bf16 block.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from services import fp8_rows
from services.fp8_rows import FP8, FP8_MAX, MIN_SCALE
from services.staged_transfer import StagedTransfer

log = logging.getLogger("ltx2.worker")
# Dimensions the FP8 GEMM kernels accept must be multiples of this.
ALIGNMENT = 16


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 matrix, float32 scale per row) with row * scale ~= the original row."""
    scale = matrix.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_SCALE) / FP8_MAX
    quantized = (matrix.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


class Fp8Linear(nn.Module):
    """A linear layer computing `x @ W.T + b` with FP8 operands and rowwise scales."""

    def __init__(self, linear: nn.Linear, fast_accumulation: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fast_accumulation = fast_accumulation
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in], FP8
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # [1, out], float32
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = self.multiply(*quantize_rows(rows), x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def multiply(self, quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The FP8 product of already quantised input rows (and their scales) with the weight, in `dtype`, no bias."""
        return torch._scaled_mm(
            quantized,
            self.weight.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            out_dtype=dtype,
            use_fast_accum=self.fast_accumulation,
        )

    def extra_repr(self) -> str:
        accumulation = "fast" if self.fast_accumulation else "exact"
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, fp8 rowwise, {accumulation} accumulation"


class Fp8FeedForward(nn.Module):
    """diffusers' FeedForward (linear, tanh GELU, linear) with both linears FP8, where the hidden activation's
    bias, GELU and row quantisation for the second matmul run in services/fp8_rows.py's one-pass kernel instead
    of Inductor's two-pass fusion (that module's docstring has the numbers). The first matmul's input is
    quantised as in Fp8Linear, so Inductor still fuses it with the norm and modulation before it."""

    def __init__(self, first: Fp8Linear, second: Fp8Linear) -> None:
        super().__init__()
        self.first, self.second = first, second
        fp8_rows.define_operator()  # defined here, outside any compiled region (fp8_rows.gelu_quantize_rows says why)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.first.in_features)
        hidden = self.first.multiply(*quantize_rows(rows), x.dtype)
        out = self.second.multiply(*fp8_rows.gelu_quantize_rows(hidden, self.first.bias), x.dtype)
        if self.second.bias is not None:
            out = out + self.second.bias
        return out.reshape(*x.shape[:-1], self.second.out_features)


def fusable_feed_forward(module: nn.Module) -> tuple[Fp8Linear, Fp8Linear] | None:
    """(first, second) FP8 linears of a diffusers FeedForward that is linear, tanh GELU, dropouts that do nothing
    and linear; None for anything else (another activation, a live dropout, a layer left in bf16)."""
    if type(module).__name__ != "FeedForward" or not isinstance(getattr(module, "net", None), nn.ModuleList):
        return None
    layers = list(module.net)
    if len(layers) < 3 or type(layers[0]).__name__ != "GELU" or getattr(layers[0], "approximate", None) != "tanh":
        return None
    first, second = getattr(layers[0], "proj", None), layers[2]
    idle = all(isinstance(layer, nn.Dropout) and layer.p == 0.0 for layer in [layers[1], *layers[3:]])
    if not (idle and isinstance(first, Fp8Linear) and isinstance(second, Fp8Linear)):
        return None
    return first, second


def fuse_feed_forwards(block: nn.Module) -> int:
    """Turn each fusable FeedForward in `block` into an Fp8FeedForward; returns how many."""
    fused = 0
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if (linears := fusable_feed_forward(child)) is not None:
                setattr(parent, name, Fp8FeedForward(*linears))
                fused += 1
    return fused


def eligible(module: nn.Module) -> bool:
    """A plain linear layer whose sizes the FP8 kernels accept."""
    return type(module) is nn.Linear and module.in_features % ALIGNMENT == 0 and module.out_features % ALIGNMENT == 0


def convert_blocks(
    transformer: Any, device: torch.device, fast_accumulation: bool = False, gelu_kernel: bool = False
) -> int:
    """Move the transformer to `device`, turning each eligible linear layer of its repeated blocks
    into an Fp8Linear on the way (one block at a time); returns how many were converted. With `gelu_kernel`
    each block's feed-forwards become Fp8FeedForward (the GELU and quantisation in one kernel).

    `fast_accumulation` lets Hopper's tensor cores accumulate in their faster reduced-precision
    mode instead of promoting every partial sum to fp32 (a no-op on CPUs).

    The bf16 weights reach the device through services/staged_transfer.py: the next block's
    weights are packed into pinned memory while this block's are copied and quantised."""
    converted = 0
    on_cuda = torch.device(device).type == "cuda"
    if gelu_kernel and on_cuda and (reason := fp8_rows.gelu_kernel_unavailable(str(device))):
        log.warning("feed-forwards keep Inductor's GELU and quantisation: %s", reason)
        gelu_kernel = False
    transfer = StagedTransfer(device)
    try:
        for block in transformer.transformer_blocks:
            transfer.move(block)
            for parent in list(block.modules()):
                for name, child in list(parent.named_children()):
                    if eligible(child):
                        setattr(parent, name, Fp8Linear(child, fast_accumulation))
                        converted += 1
            if gelu_kernel:
                fuse_feed_forwards(block)
        transfer.move(transformer)
    finally:
        transfer.finish()
    return converted

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

from typing import Any

import torch
from torch import nn

from services.staged_transfer import StagedTransfer

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Dimensions the FP8 GEMM kernels accept must be multiples of this.
ALIGNMENT = 16
# Scales never reach zero, even for an all-zero row.
MIN_SCALE = 1e-12


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
        quantized, scale = quantize_rows(rows)
        out = torch._scaled_mm(
            quantized,
            self.weight.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            out_dtype=x.dtype,
            use_fast_accum=self.fast_accumulation,
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        accumulation = "fast" if self.fast_accumulation else "exact"
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, fp8 rowwise, {accumulation} accumulation"


def eligible(module: nn.Module) -> bool:
    """A plain linear layer whose sizes the FP8 kernels accept."""
    return type(module) is nn.Linear and module.in_features % ALIGNMENT == 0 and module.out_features % ALIGNMENT == 0


def convert_blocks(transformer: Any, device: torch.device, fast_accumulation: bool = False) -> int:
    """Move the transformer to `device`, turning each eligible linear layer of its repeated blocks
    into an Fp8Linear on the way (one block at a time); returns how many were converted.

    `fast_accumulation` lets Hopper's tensor cores accumulate in their faster reduced-precision
    mode instead of promoting every partial sum to fp32 (a no-op on CPUs).

    The bf16 weights reach the device through services/staged_transfer.py: the next block's
    weights are packed into pinned memory while this block's are copied and quantised."""
    converted = 0
    transfer = StagedTransfer(device)
    try:
        for block in transformer.transformer_blocks:
            transfer.move(block)
            for parent in list(block.modules()):
                for name, child in list(parent.named_children()):
                    if eligible(child):
                        setattr(parent, name, Fp8Linear(child, fast_accumulation))
                        converted += 1
        transfer.move(transformer)
    finally:
        transfer.finish()
    return converted

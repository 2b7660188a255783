"""What diffusers 0.42.1's context parallel needs for LTX-2 beyond its own declarations (issue 30).

`LTX2VideoTransformer3DModel._cp_plan` and the Ulysses attention of `attention_dispatch` do the work;
two places of them do not hold for LTX-2 as it ships, each found by running two gloo processes on the
tiny model (tests/test_context_parallel.py) and each corrected here with the least that works:

1. The plan splits the outputs of `rope` as `ContextParallelInput(split_dim=1, expected_dims=3)`, the
   `[B, tokens, dim]` layout of interleaved RoPE. LTX-2 (and the tiny model) use split RoPE, whose
   cos/sin are `[B, heads, tokens, dim/2]`: the hook logs "Expected input tensor to have 3 dimensions,
   but got 4 dimensions, split will not be applied" and the first video self-attention fails with
   "RuntimeError: The size of tensor a (2) must match the size of tensor b (4) at non-singleton
   dimension 4" (full-length rotary tables against a half-length query). The audio-video
   cross-attention's video RoPE (`cross_attn_rope`) is not split at all. `ltx2_plan` is diffusers'
   plan with both RoPE outputs split on their token axis for either layout, and the per-token
   timestep of image and keyframe conditioning (`[B, video tokens]`) split with the video tokens.
2. LTX-2's attention processors expand the text mask to one copy per head (`[B, heads, 1, tokens]`),
   and Ulysses attention hands that mask unchanged to SDPA over this rank's heads only: "RuntimeError:
   output with shape [1, 1, 1280, 1024] doesn't match the broadcast shape [1, 2, 1280, 1024]".
   `keep_local_heads_of_masks` wraps the "native" backend so that, under context parallel, a per-head
   mask keeps the heads this rank attends with (rank r holds heads r*H/N .. (r+1)*H/N - 1 after the
   all-to-all), before diffusers gathers its token shards.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

# The backend the ranks attend with (services/context_parallel.ATTENTION_BACKEND), whose entry is wrapped.
NATIVE = AttentionBackendName.NATIVE


def ltx2_plan(rope_type: str) -> dict[str, Any]:
    """The context-parallel plan of an LTX-2 transformer whose RoPE is `rope_type` ("split" or "interleaved")."""
    if rope_type == "split":  # cos, sin: [B, heads, tokens, dim / 2]
        rope = ContextParallelInput(split_dim=2, expected_dims=4, split_output=True)
    else:  # interleaved: [B, tokens, dim]
        rope = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)
    return {
        "": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
            "encoder_attention_mask": ContextParallelInput(split_dim=1, expected_dims=2),
            # Per token with image or keyframe conditioning; a text-to-video step's [B] is left whole.
            "timestep": ContextParallelInput(split_dim=1, expected_dims=2),
        },
        "rope": {0: rope, 1: rope},
        "cross_attn_rope": {0: rope, 1: rope},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def keep_local_heads_of_masks() -> None:
    """Make the "native" attention backend give Ulysses attention only this rank's heads of a per-head
    mask (once per process; calls without context parallel pass through unchanged)."""
    native = _AttentionBackendRegistry._backends[NATIVE]
    if getattr(native, "keeps_local_heads", False):
        return

    def attention(
        *args: Any, attn_mask: torch.Tensor | None = None, _parallel_config: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        if attn_mask is not None and _parallel_config is not None and attn_mask.ndim == 4 and attn_mask.shape[1] > 1:
            attn_mask = local_heads(attn_mask, _parallel_config.context_parallel_config)
        return native(*args, attn_mask=attn_mask, _parallel_config=_parallel_config, **kwargs)

    attention.keeps_local_heads = True  # type: ignore[attr-defined]
    _AttentionBackendRegistry._backends[NATIVE] = attention


def local_heads(mask: torch.Tensor, config: Any) -> torch.Tensor:
    """This Ulysses rank's heads of a `[B, heads, queries, keys]` mask."""
    count = mask.shape[1] // config.ulysses_degree
    start = config._ulysses_local_rank * count
    return mask[:, start : start + count]

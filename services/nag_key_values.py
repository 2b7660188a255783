"""The negative prompt's keys and values for NAG (services/nag.py), computed once per job.

On LTX-2.0 the text context a block's cross-attention projects into K/V (the connectors' output,
through the transformer's caption projection) is the same at every denoising step, so the negative
prompt's K/V can be made once before the loop, with each block's own layers (FP8 matmuls, fused
LoRAs and offload hooks apply), instead of at every step. Where a model modulates the text context
per timestep (LTX-2.3), `is_text_context_step_invariant` says no and NAG projects per step instead.
Kept apart from the processor because it mirrors a different part of diffusers: the transformer's
and the block's forward up to the cross-attention, not the attention processor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

# LTX2VideoTransformerBlock's text cross-attention modules: video queries, audio queries.
TEXT_CROSS_ATTENTION = ("attn2", "audio_attn2")
# The block's per-layer K/V modulation table for each (diffusers' names, configs with cross_attn_mod).
PROMPT_TABLES = {"attn2": "prompt_scale_shift_table", "audio_attn2": "audio_prompt_scale_shift_table"}
# LTX2VideoTransformer3DModel.forward turns a 0/1 context mask into this additive bias.
MASKED_BIAS = -10000.0


@dataclasses.dataclass(frozen=True)
class NegativeKeyValue:
    """The negative prompt as one text cross-attention module attends to it, computed once per job."""

    key: torch.Tensor  #: [B, tokens, heads, head_dim], after to_k and norm_k
    value: torch.Tensor  #: [B, tokens, heads, head_dim], after to_v
    bias: torch.Tensor | None  #: additive attention bias [B, heads, 1, tokens], or None without a mask


def project_key_value(attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of a context as `LTX2AudioVideoAttnProcessor` makes them: to_k, norm_k, to_v, heads split."""
    key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
    value = attn.to_v(context).unflatten(2, (attn.heads, -1))
    return key, value


def attention_bias(attn: Any, bias: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    """The transformer's additive context bias ([B, 1, tokens]) per head, [B, heads, 1, tokens], as diffusers
    prepares it."""
    if bias is None:
        return None
    bias = attn.prepare_attention_mask(bias, bias.shape[-1], batch_size)
    return bias.view(batch_size, attn.heads, -1, bias.shape[-1])


def text_cross_attention(transformer: Any) -> list[Any]:
    """Every block's video-text and audio-text cross-attention module."""
    return [getattr(block, name) for block in transformer.transformer_blocks for name in TEXT_CROSS_ATTENTION]


def is_text_context_step_invariant(transformer: Any) -> bool:
    """Whether the text context each block's cross-attention projects into K/V is the same at every step.

    It is not where blocks modulate it (`cross_attn_adaln`, from the config's `cross_attn_mod`) by the
    transformer's timestep embedding of the prompt (`prompt_adaln`, present with
    `use_prompt_adaln_single`): LTX-2.3. Read from the modules diffusers built, so a renamed or
    converted checkpoint is judged by what it computes.
    """
    modulated = any(getattr(block, "cross_attn_adaln", False) for block in transformer.transformer_blocks)
    timestep_dependent = getattr(transformer, "prompt_adaln", None) is not None
    timestep_dependent |= getattr(transformer, "audio_prompt_adaln", None) is not None
    return not (modulated and timestep_dependent)


def negative_key_values(
    transformer: Any, video_context: torch.Tensor, audio_context: torch.Tensor, mask: torch.Tensor
) -> list[NegativeKeyValue]:
    """K/V and bias of the negative prompt for each module of `text_cross_attention`, in its order.

    The same operations as LTX2VideoTransformer3DModel.forward and LTX2VideoTransformerBlock.forward
    (diffusers 0.42.1) apply to the context before a text cross-attention, in the same dtype, so
    the result equals what the processor would compute at every step. Valid only where
    `is_text_context_step_invariant` holds.

    A mask that keeps every token gives no bias rather than one of zeros: the sum is the same, and
    without a mask SDPA may take its flash kernel. LTX2TextConnectors (diffusers 0.42.1) returns such
    a mask: learnable registers replace the padding where the model has them (LTX-2.0), and its
    binarisation (`additive mask < 1e-6`) marks padding valid too where it has none.
    """
    keeps_every_token = bool(mask.all())  # read here, once, outside any compiled region
    if transformer.config.use_prompt_embeddings:  # LTX-2.0's caption projection (forward, step 4)
        video_context = transformer.caption_projection(video_context)
        audio_context = transformer.audio_caption_projection(audio_context)
    contexts = {"attn2": video_context, "audio_attn2": audio_context}
    result = []
    for block in transformer.transformer_blocks:
        for name in TEXT_CROSS_ATTENTION:
            context = contexts[name]
            if block.cross_attn_adaln:  # a static per-layer table here (block forward, step 2)
                table = getattr(block, PROMPT_TABLES[name])[None, None]
                shift, scale = table.to(device=context.device, dtype=context.dtype).unbind(dim=2)
                context = context * (1 + scale) + shift
            attn = getattr(block, name)
            bias = None
            if not keeps_every_token:
                bias = attention_bias(attn, ((1 - mask.to(context.dtype)) * MASKED_BIAS).unsqueeze(1), len(context))
            result.append(NegativeKeyValue(*project_key_value(attn, context), bias))
    return result

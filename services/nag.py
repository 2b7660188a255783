"""Normalized Attention Guidance (NAG): the negative prompt acting at CFG = 1, inside the text cross-attention.

The distilled LTX-2 model runs at CFG = 1, so classifier-free guidance, the usual road for a negative
prompt, is closed. NAG (Chen et al., "Normalized Attention Guidance", reference code
ChenDarYen/Normalized-Attention-Guidance) guides in attention space instead. In every text
cross-attention layer, with Z+ the attention output for the prompt and Z- for the negative prompt
(the same queries attending to the other context):

    Z~ = phi * Z+ - (phi - 1) * Z-
    s  = |Z~| / |Z+|                 per token
    Z^ = Z~ * min(s, tau) / s        (the guided output may grow at most tau times)
    out = alpha * Z^ + (1 - alpha) * Z+

How it reaches LTX-2 through diffusers 0.42.1 without touching its files:

- The negative prompt's embeddings go through the text connectors once per job (the pipeline
  runs them inside `__call__` for the prompt only), here in `nag_guidance`.
- A forward pre-hook on the transformer appends the negative tokens to the prompt's tokens along
  the *sequence* axis (video and audio contexts and their masks) for each guided step. Everything
  the transformer does to text before the cross-attention is per token (caption projection, the
  per-block prompt modulation, which on LTX-2.3 depends on the timestep), so the negative half
  arrives in each block exactly as a negative prompt would, still in one transformer call per step.
- `NagAttnProcessor`, set with `set_processor` on every block's `attn2` (video-text) and
  `audio_attn2` (audio-text) cross-attention, splits the context again, attends once per half
  with the same queries, and blends as above. The processors of other attention layers are untouched.

The negative K/V are recomputed at every guided step, not cached per job: diffusers hands the
processor the context, not K/V, and on LTX-2.3 the per-block prompt modulation that precedes the
K/V projections changes with the timestep, so a cache would be wrong there; keeping a cache inside
regionally compiled blocks would also mutate module state inside the graph. The extra work per
layer is the negative half's two linear projections over its 1024 text tokens and a second
attention over them; measured on an H200 with FP8 matmuls and compile (docs/benchmarks.md,
version 8) it costs +3.4 % per step at 1920x1088x161 and +11.9 % at 768x512x121, where the
fixed 1024 tokens weigh more against the video's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

# LTX2VideoTransformerBlock's text cross-attention modules: video queries, audio queries.
TEXT_CROSS_ATTENTION = ("attn2", "audio_attn2")


@dataclasses.dataclass(frozen=True)
class NagSettings:
    """phi (`scale`), tau and alpha of the formula in the module docstring."""

    scale: float
    tau: float
    alpha: float


def nag_blend(positive: torch.Tensor, negative: torch.Tensor, settings: NagSettings) -> torch.Tensor:
    """NAG's output from the prompt's and the negative prompt's attention outputs ([..., tokens, channels]).

    The norm is the L1 norm over the channel axis (all heads together) of each token, as the paper
    describes. Two choices keep it exact and free of NaN: the extrapolation is written
    Z- + phi * (Z+ - Z-), which equals phi * Z+ - (phi - 1) * Z- but cancels less in bf16; and
    min(s, tau) / s is computed as min(1, tau * |Z+| / |Z~|), so a token whose norms are zero
    keeps its value instead of dividing 0 by 0. Norms are taken in at least float32 (a bf16 sum over
    4096 channels would lose the ratio's precision); the tensors themselves stay in their dtype.
    """
    guided = negative + settings.scale * (positive - negative)
    norm_dtype = torch.promote_types(positive.dtype, torch.float32)
    positive_norm = torch.linalg.vector_norm(positive, ord=1, dim=-1, keepdim=True, dtype=norm_dtype)
    guided_norm = torch.linalg.vector_norm(guided, ord=1, dim=-1, keepdim=True, dtype=norm_dtype)
    limit = settings.tau * positive_norm
    factor = torch.where(guided_norm > limit, limit / guided_norm.clamp_min(torch.finfo(norm_dtype).tiny), 1.0)
    normalized = guided * factor.to(guided.dtype)
    return settings.alpha * normalized + (1.0 - settings.alpha) * positive


class NagAttnProcessor:
    """An LTX2Attention processor for text cross-attention whose context is [prompt tokens, negative tokens].

    It mirrors diffusers' `LTX2AudioVideoAttnProcessor` (projections, RMS norms of q and k, the
    attention dispatch and its backend, LTX-2.3's per-head gates, the output projection) and
    inserts `nag_blend` on the attention output before the gates and the output projection, where
    the reference code applies it. Text cross-attention has no rotary embedding, so none is taken.
    """

    def __init__(self, settings: NagSettings, negative_tokens: int, base: Any = None) -> None:
        self.settings = settings
        self.negative_tokens = negative_tokens
        # The same attention backend as the processor it replaces (diffusers sets it per processor).
        self._attention_backend = getattr(base, "_attention_backend", None)
        self._parallel_config = getattr(base, "_parallel_config", None)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or query_rotary_emb is not None or key_rotary_emb is not None:
            raise ValueError("NagAttnProcessor belongs on text cross-attention (a context, no rotary embedding)")
        split = encoder_hidden_states.shape[1] - self.negative_tokens
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        positive_mask = negative_mask = None
        if attention_mask is not None:
            positive_mask, negative_mask = attention_mask[..., :split], attention_mask[..., split:]
        positive = self.attend(attn, query, encoder_hidden_states[:, :split], positive_mask)
        negative = self.attend(attn, query, encoder_hidden_states[:, split:], negative_mask)
        hidden_states = nag_blend(positive, negative, self.settings)
        if gate_logits is not None:
            gates = 2.0 * torch.sigmoid(gate_logits)  # as diffusers: zero logits give gates of 1
            hidden_states = (hidden_states.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def attend(self, attn: Any, query: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Attention of `query` ([B, T, heads, dim]) over one context, heads flattened: [B, T, channels]."""
        batch_size = context.shape[0]
        key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if bias is not None:
            bias = attn.prepare_attention_mask(bias, context.shape[1], batch_size)
            bias = bias.view(batch_size, attn.heads, -1, bias.shape[-1])
        output = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=bias,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return output.flatten(2, 3).to(query.dtype)


def text_cross_attention(transformer: Any) -> list[Any]:
    """Every block's video-text and audio-text cross-attention module."""
    return [getattr(block, name) for block in transformer.transformer_blocks for name in TEXT_CROSS_ATTENTION]


@contextlib.contextmanager
def nag_guidance(
    transformer: Any,
    connectors: Any,
    negative: dict[str, torch.Tensor],
    settings: NagSettings,
    steps: int,
    padding_side: str = "left",
) -> Iterator[None]:
    """Guide the first `steps` transformer calls (one per denoising step at CFG = 1) with NAG.

    `negative` holds `negative_prompt_embeds` and `negative_prompt_attention_mask` from the text
    encoder; `padding_side` must be the one the pipeline passes its connectors (left for Gemma).
    Afterwards, and from step `steps` on, the transformer's own processors and inputs are back, so
    the rest of the run (and the next job of a group, which reuses the transformer) is unguided.
    """
    with torch.no_grad():
        video_context, audio_context, context_mask = connectors(
            negative["negative_prompt_embeds"], negative["negative_prompt_attention_mask"], padding_side=padding_side
        )
    modules = text_cross_attention(transformer)
    originals = [module.processor for module in modules]
    calls = 0

    def restore() -> None:
        for module, original in zip(modules, originals, strict=True):
            module.set_processor(original)

    def append_negative(_module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls > steps:
            if calls == steps + 1:
                restore()
            return args, kwargs
        kwargs = dict(kwargs)
        for key, extra in (
            ("encoder_hidden_states", video_context),
            ("audio_encoder_hidden_states", audio_context),
            ("encoder_attention_mask", context_mask),
            ("audio_encoder_attention_mask", context_mask),
        ):
            kwargs[key] = torch.cat([kwargs[key], extra.to(kwargs[key].dtype)], dim=1)
        return args, kwargs

    if steps > 0:
        # One instance for all layers: the compiled block then meets the same processor in every block.
        processor = NagAttnProcessor(settings, video_context.shape[1], originals[0])
        for module in modules:
            module.set_processor(processor)
    hook = transformer.register_forward_pre_hook(append_negative, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        restore()

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
- `NagAttnProcessor`, set with `set_processor` on every block's `attn2` (video-text) and
  `audio_attn2` (audio-text) cross-attention, attends once to the prompt and once to the negative
  prompt with the same queries, and blends as above, still in one transformer call per step. The
  processors of other attention layers are untouched.

The negative prompt's keys and values are computed once per job, before the denoising loop, where
they are the same at every step. What a block's text cross-attention projects into K/V (diffusers
0.42.1, transformer_ltx2.py) is the connectors' output, passed through the transformer's
`caption_projection` (a per-token MLP, LTX-2.0) and then, only in configs with `cross_attn_mod`,
shifted and scaled per block; `to_k`, `norm_k` (RMS norm across heads) and `to_v` follow, and text
keys get no rotary embedding. On LTX-2.0 nothing of this depends on the timestep, so
`negative_key_values` runs those same modules (the blocks' own linear layers: FP8 matmuls, fused
LoRAs and offload hooks apply) over the negative tokens once, and each block's processor gets its
K/V and attention bias as tensors. That removes per step and block the negative half's K and V
projections, its k-norm and its caption projection; the second attention over the 1024 negative
tokens remains (unmasked where the mask keeps every token, as the connectors' does). The price is
memory held for the job: at full size (48 blocks, 1024 tokens, 4096 video + 2048 audio channels,
K and V, bf16) about 1.1 GiB, freed when the job's NAG ends.

Where the config makes that input step-dependent, the K/V are computed per step as before:
LTX-2.3-style configs (`cross_attn_mod` with `use_prompt_adaln_single`) modulate the text context
of each block by a timestep embedding (`prompt_adaln` of sigma). There a forward pre-hook on the
transformer appends the negative tokens to the prompt's along the sequence axis (contexts and
masks) for each guided step, so they get that step's modulation, and the processor splits the
context again. `is_text_context_step_invariant` decides from the loaded model's modules, not its
name. Configs with `cross_attn_mod` but without `use_prompt_adaln_single` (LTX-2.5's static table)
are step-invariant and cached, with the block's table applied as the block applies it.

Compiled blocks (`--compile`, regional, fullgraph): the K/V are computed outside the compiled region
and read as attributes of each module's processor, which dynamo lifts as graph inputs, so one graph
serves every block and every job's negative prompt (tests/test_nag.py counts the graphs).
Measured before the cache (not yet with it), on an H200 with FP8 matmuls and compile
(docs/benchmarks.md, version 8), NAG cost +3.4 % per step at 1920x1088x161 and +11.9 % at
768x512x121, where the fixed 1024 tokens weigh more against the video's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from services.attention_output import gated_output
from services.nag_key_values import (
    NegativeKeyValue,
    attention_bias,
    is_text_context_step_invariant,
    negative_key_values,
    project_key_value,
    text_cross_attention,
)


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
    """An LTX2Attention processor for text cross-attention that blends the prompt's and the negative
    prompt's attention outputs.

    The negative side comes either as `negative_kv` (projected once per job) or, with
    `negative_tokens`, as the last tokens of the context (projected at every step, where the context
    changes between steps). It mirrors diffusers' `LTX2AudioVideoAttnProcessor` (projections, RMS
    norms of q and k, the attention dispatch and its backend, LTX-2.3's per-head gates, the output
    projection) and inserts `nag_blend` on the attention output before the gates and the output
    projection, where the reference code applies it. Text cross-attention has no rotary embedding,
    so none is taken.
    """

    def __init__(
        self,
        settings: NagSettings,
        negative_tokens: int = 0,
        base: Any = None,
        negative_kv: NegativeKeyValue | None = None,
    ) -> None:
        if (negative_kv is None) == (negative_tokens <= 0):
            raise ValueError("NagAttnProcessor takes either negative_kv or a count of negative_tokens, not both")
        self.settings = settings
        self.negative_tokens = negative_tokens
        self.negative_kv = negative_kv
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
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        batch_size = encoder_hidden_states.shape[0]
        if self.negative_kv is None:  # the context is [prompt tokens, negative tokens]: split it
            split = encoder_hidden_states.shape[1] - self.negative_tokens
            negative_bias = None
            if attention_mask is not None:
                attention_mask, negative_bias = attention_mask[..., :split], attention_mask[..., split:]
            negative_key, negative_value = project_key_value(attn, encoder_hidden_states[:, split:])
            negative_bias = attention_bias(attn, negative_bias, batch_size)
            encoder_hidden_states = encoder_hidden_states[:, :split]
        else:
            negative_key, negative_value = self.negative_kv.key, self.negative_kv.value
            negative_bias = self.negative_kv.bias
        key, value = project_key_value(attn, encoder_hidden_states)
        positive = self.attend(query, key, value, attention_bias(attn, attention_mask, batch_size))
        negative = self.attend(query, negative_key, negative_value, negative_bias)
        hidden_states = nag_blend(positive, negative, self.settings)
        return gated_output(attn, hidden_states, gate_logits)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of `query` ([B, T, heads, dim]) over one context's K/V, heads flattened: [B, T, channels]."""
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


def set_processors(modules: list[Any], processors: list[Any]) -> None:
    """Give each module its processor (a function, so no loop variable outlives the call holding one)."""
    for module, processor in zip(modules, processors, strict=True):
        module.set_processor(processor)


def nag_processors(
    transformer: Any,
    settings: NagSettings,
    originals: list[Any],
    contexts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    per_step: bool,
    shards: int = 1,
) -> list[NagAttnProcessor]:
    """One processor per module of `text_cross_attention`, holding that module's negative K/V unless
    `per_step`; the returned list and the modules are then their only holders.

    One per module rather than one for all: dynamo lifts a processor's tensors as graph inputs, so the
    compiled block still meets one graph for all blocks and all jobs (tests/test_nag.py counts them).
    """
    video_context, audio_context, mask = contexts
    if per_step:  # each rank's video context holds its shard of the negative tokens (`shard_pairs`)
        # text_cross_attention's order: each block's video-text, then its audio-text cross-attention.
        counts = [video_context.shape[1] // shards, audio_context.shape[1]] * (len(originals) // 2)
        return [NagAttnProcessor(settings, count, original) for count, original in zip(counts, originals, strict=True)]
    with torch.no_grad():
        cached = negative_key_values(transformer, video_context, audio_context, mask)
    return [NagAttnProcessor(settings, base=base, negative_kv=kv) for base, kv in zip(originals, cached, strict=True)]


def shard_pairs(prompt: torch.Tensor, negative: torch.Tensor, shards: int) -> torch.Tensor:
    """The prompt's and the negative prompt's tokens as one context: with one shard `[prompt, negative]`;
    with N, `[prompt_0, negative_0, ..., prompt_N-1, negative_N-1]` of their N even slices, so that the
    context-parallel split hands rank r `[prompt_r, negative_r]`."""
    parts = zip(prompt.chunk(shards, dim=1), negative.chunk(shards, dim=1), strict=True)
    return torch.cat([part for pair in parts for part in pair], dim=1)


@contextlib.contextmanager
def nag_guidance(
    transformer: Any,
    connectors: Any,
    negative: dict[str, torch.Tensor],
    settings: NagSettings,
    steps: int,
    padding_side: str = "left",
    reuse_negative_kv: bool = True,
    shards: int = 1,
) -> Iterator[None]:
    """Guide the first `steps` transformer calls (one per denoising step at CFG = 1) with NAG.

    `negative` holds `negative_prompt_embeds` and `negative_prompt_attention_mask` from the text
    encoder; `padding_side` must be the one the pipeline passes its connectors (left for Gemma).
    The negative K/V are computed here once, unless the model's text context changes per step or
    `reuse_negative_kv` is False (the per-step computation, kept to compare the two). Afterwards,
    and from step `steps` on, the transformer's own processors and inputs are back and the
    negative K/V are released, so the rest of the run (and the next job of a group, which reuses
    the transformer) is unguided.

    `shards`: the context-parallel ranks the transformer's video text context is split between
    (services/context_parallel.py); a per-step negative context is then appended shard by shard, so that
    every rank's slice holds its share of the prompt's tokens followed by its share of the negative ones.
    """
    with torch.no_grad():
        video_context, audio_context, context_mask = connectors(
            negative["negative_prompt_embeds"], negative["negative_prompt_attention_mask"], padding_side=padding_side
        )
    modules = text_cross_attention(transformer)
    originals = [module.processor for module in modules]
    per_step = not (reuse_negative_kv and is_text_context_step_invariant(transformer))
    processors: list[NagAttnProcessor] = []
    if steps > 0:
        contexts = (video_context, audio_context, context_mask)
        processors = nag_processors(transformer, settings, originals, contexts, per_step, shards)
    calls = 0

    def restore() -> None:
        set_processors(modules, originals)
        processors.clear()  # the only other holder of the negative K/V: they are freed here

    def count_and_append(_module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls > steps:
            if calls == steps + 1:
                restore()
            return args, kwargs
        if not per_step:
            return args, kwargs
        kwargs = dict(kwargs)
        for key, extra in (
            ("encoder_hidden_states", video_context),
            ("audio_encoder_hidden_states", audio_context),
            ("encoder_attention_mask", context_mask),
            ("audio_encoder_attention_mask", context_mask),
        ):
            video = key in ("encoder_hidden_states", "encoder_attention_mask")  # the context the ranks split
            kwargs[key] = shard_pairs(kwargs[key], extra.to(kwargs[key].dtype), shards if video else 1)
        return args, kwargs

    if processors:
        set_processors(modules, processors)
    hook = transformer.register_forward_pre_hook(count_and_append, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        restore()

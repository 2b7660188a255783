"""The end of an LTX-2 attention call, as diffusers' LTX-2 processors write it: LTX-2.3's per-head gates,
then the output projection. Our processors that replace diffusers' (services/nag.py's cross-attention,
services/fp8_attention.py's self-attention) must end as it does, bit for bit, so they share this."""

from __future__ import annotations

from typing import Any

import torch


def gated_output(attn: Any, hidden_states: torch.Tensor, gate_logits: torch.Tensor | None) -> torch.Tensor:
    """`hidden_states` ([B, T, channels]) gated per head where `gate_logits` are given, then `attn.to_out`."""
    if gate_logits is not None:
        gates = 2.0 * torch.sigmoid(gate_logits)  # as diffusers: zero logits give gates of 1
        hidden_states = (hidden_states.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)

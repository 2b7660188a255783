"""The tiny model's tokenizer and text encoders: Gemma 3 (LTX-2.0, 2.3) and Gemma 4 unified (LTX-2.5).

Both encoders are the real transformers 5.24 classes at a width of 32 with two layers, so LTX2Pipeline's
`_get_gemma_prompt_embeds` stacks 3 hidden states of 32 channels (the connectors' `text_proj_in_factor`
and `caption_channels`). One byte-fallback BPE, trained in memory, serves both: LTX2Pipeline takes a
`GemmaTokenizer` whatever the encoder, and ids below VOCAB_SIZE are valid rows of either embedding.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, normalizers, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForConditionalGeneration,
    GemmaTokenizer,
)

from protocol.families import family_named

TEXT_HIDDEN = 32  # 2.0: must equal connector heads (4) x head_dim (8)
TEXT_LAYERS = 2
VOCAB_SIZE = 512  # room for 5 specials, 256 byte-fallback tokens and the trained merges
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
# Any text works as training material: it only decides which merges the tokenizer learns.
TOKENIZER_CORPUS = [
    "a slow dolly in through a rain soaked alleyway at night with neon signs",
    "a robot dancing in a sunlit forge while sparks fly and steam rises",
    "puppies chase each other across wet grass under a cloudy sky",
    "the camera cranes up over ancient stone ruins at golden hour",
]
# The text stack both Gemmas share: 2 heads of 16, one key/value head, a 64-token sliding window.
TEXT_CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": TEXT_LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "sliding_window": 64,
}


def build_tokenizer() -> GemmaTokenizer:
    """Train a byte-fallback BPE in memory and wrap it as the Gemma tokenizer diffusers expects."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 16, special_tokens=SPECIAL_TOKENS + byte_tokens)
    bpe.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(pair) for pair in state["merges"]]
    return GemmaTokenizer(vocab=state["vocab"], merges=merges)


def build_gemma3_encoder() -> Gemma3ForConditionalGeneration:
    """LTX-2.0 and 2.3's encoder: a two-layer Gemma 3 with the smallest vision tower its class builds
    (Gemma 3's config has no way to leave the tower out)."""
    config = Gemma3Config(
        text_config={**TEXT_CONFIG, "max_position_embeddings": 512, "query_pre_attn_scalar": 16},
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
        boi_token_index=VOCAB_SIZE - 3,
        eoi_token_index=VOCAB_SIZE - 2,
        image_token_index=VOCAB_SIZE - 1,
    )
    return Gemma3ForConditionalGeneration(config).eval()


def build_gemma4_encoder() -> Gemma4UnifiedForConditionalGeneration:
    """LTX-2.5's encoder: a two-layer Gemma 4 unified, text only.

    Gemma4UnifiedConfig marks its vision and audio towers optional (`SubConfigSpec(optional=True)`), so
    both stay out: LTX2Pipeline only feeds it token ids. Layer types are given (one sliding, one full
    layer; the class forces the last layer to full attention anyway), and the full-attention layer's head
    size (`global_head_dim`, 512 by default) is brought down to the sliding layers' 16. The multimodal
    token ids move inside the tiny vocabulary; nothing here ever emits them.
    """
    text = {
        **TEXT_CONFIG,
        "max_position_embeddings": 2048,
        "layer_types": ["sliding_attention", "full_attention"],
        "global_head_dim": TEXT_CONFIG["head_dim"],
    }
    config = Gemma4UnifiedConfig(
        text_config=text,
        vision_config=None,
        audio_config=None,
        boi_token_id=VOCAB_SIZE - 7,
        eoi_token_id=VOCAB_SIZE - 6,
        image_token_id=VOCAB_SIZE - 5,
        video_token_id=VOCAB_SIZE - 4,
        boa_token_id=VOCAB_SIZE - 3,
        eoa_token_index=VOCAB_SIZE - 2,
        audio_token_id=VOCAB_SIZE - 1,
    )
    return Gemma4UnifiedForConditionalGeneration(config).eval()


# Keyed by the model_index.json class a FAMILIES row names, so the tiny model ships what detection expects.
ENCODER_BUILDERS = {
    "Gemma3ForConditionalGeneration": build_gemma3_encoder,
    "Gemma4UnifiedForConditionalGeneration": build_gemma4_encoder,
}


def build_text_encoder(family: str) -> Gemma3ForConditionalGeneration | Gemma4UnifiedForConditionalGeneration:
    """The text encoder class `family`'s checkpoints ship (protocol/families.py), at the tiny width."""
    return ENCODER_BUILDERS[family_named(family).text_encoder]()

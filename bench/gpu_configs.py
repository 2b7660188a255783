"""The LTX-2.0 and LTX-2.3 architectures as numbers: component configs, their parameter targets, FLOPs per step.

It exists so the builder (gpu_build), the single-process baseline (gpu_baseline), the report
(gpu_report) and batch_bench.py use one copy of the configs and one FLOP formula. Pure data and
arithmetic: no torch, no diffusers (those are imported where the components are made).
"""

from __future__ import annotations

from typing import Any

from gpu_common import FPS

# Dense bf16 tensor-core peak of the SXM H100 / H200 (vendor datasheet, without sparsity).
DATASHEET_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}

# ---------------------------------------------------------------------------------------------
# LTX-2.0 component configs (diffusers scripts/convert_ltx2_to_diffusers.py, version "2.0").
# The class defaults of LTX2VideoTransformer3DModel / LTX2TextConnectors say rope_type="interleaved";
# LTX-2.0 is "split".
# ---------------------------------------------------------------------------------------------
TRANSFORMER_CONFIG: dict[str, Any] = {
    "in_channels": 128, "out_channels": 128, "patch_size": 1, "patch_size_t": 1,
    "num_attention_heads": 32, "attention_head_dim": 128, "cross_attention_dim": 4096,
    "vae_scale_factors": (8, 32, 32), "pos_embed_max_pos": 20, "base_height": 2048, "base_width": 2048,
    "audio_in_channels": 128, "audio_out_channels": 128, "audio_patch_size": 1, "audio_patch_size_t": 1,
    "audio_num_attention_heads": 32, "audio_attention_head_dim": 64, "audio_cross_attention_dim": 2048,
    "audio_scale_factor": 4, "audio_pos_embed_max_pos": 20, "audio_sampling_rate": 16000,
    "audio_hop_length": 160, "num_layers": 48, "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "caption_channels": 3840, "attention_bias": True, "attention_out_bias": True, "rope_theta": 10000.0,
    "rope_double_precision": True, "causal_offset": 1, "timestep_scale_multiplier": 1000,
    "cross_attn_timestep_scale_multiplier": 1000, "rope_type": "split",
}  # fmt: skip
CONNECTORS_CONFIG: dict[str, Any] = {
    "caption_channels": 3840, "text_proj_in_factor": 49,
    "video_connector_num_attention_heads": 30, "video_connector_attention_head_dim": 128,
    "video_connector_num_layers": 2, "video_connector_num_learnable_registers": 128,
    "audio_connector_num_attention_heads": 30, "audio_connector_attention_head_dim": 128,
    "audio_connector_num_layers": 2, "audio_connector_num_learnable_registers": 128,
    "connector_rope_base_seq_len": 4096, "rope_theta": 10000.0, "rope_double_precision": True,
    "causal_temporal_positioning": False, "rope_type": "split",
}  # fmt: skip
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 128,
    "block_out_channels": (256, 512, 1024, 2048), "decoder_block_out_channels": (256, 512, 1024),
    "layers_per_block": (4, 6, 6, 2, 2), "decoder_layers_per_block": (5, 5, 5, 5),
    "spatio_temporal_scaling": (True, True, True, True), "decoder_spatio_temporal_scaling": (True, True, True),
    "decoder_inject_noise": (False, False, False, False),
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_type": ("spatiotemporal",) * 3, "upsample_residual": (True, True, True),
    "upsample_factor": (2, 2, 2), "timestep_conditioning": False, "patch_size": 4, "patch_size_t": 1,
    "resnet_norm_eps": 1e-6, "encoder_causal": True, "decoder_causal": False,
    "encoder_spatial_padding_mode": "zeros", "decoder_spatial_padding_mode": "reflect",
    "spatial_compression_ratio": 32, "temporal_compression_ratio": 8,
}  # fmt: skip
AUDIO_VAE_CONFIG: dict[str, Any] = {
    "base_channels": 128, "output_channels": 2, "ch_mult": (1, 2, 4), "num_res_blocks": 2,
    "attn_resolutions": None, "in_channels": 2, "resolution": 256, "latent_channels": 8, "norm_type": "pixel",
    "causality_axis": "height", "dropout": 0.0, "mid_block_add_attention": False, "sample_rate": 16000,
    "mel_hop_length": 160, "is_causal": True, "mel_bins": 64, "double_z": True,
}  # fmt: skip
VOCODER_CONFIG: dict[str, Any] = {
    "in_channels": 128, "hidden_channels": 1024, "out_channels": 2,
    "upsample_kernel_sizes": [16, 15, 8, 4, 4], "upsample_factors": [6, 5, 2, 2, 2],
    "resnet_kernel_sizes": [3, 7, 11], "resnet_dilations": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "leaky_relu_negative_slope": 0.1, "output_sampling_rate": 24000,
}  # fmt: skip
SCHEDULER_CONFIG: dict[str, Any] = {
    "use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05,
    "base_image_seq_len": 1024, "max_image_seq_len": 4096, "shift_terminal": 0.1,
}  # fmt: skip
# google/gemma-3-12b-it(-qat-q4_0-unquantized): text 3840 x 48 layers (49 hidden states), SigLIP tower.
GEMMA_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 262208, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 1024, "max_position_embeddings": 131072,
}  # fmt: skip
GEMMA_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "num_attention_heads": 16,
    "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False,
}  # fmt: skip
GEMMA_MM = {
    "mm_tokens_per_image": 256,
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "image_token_index": 262144,
}
# ---------------------------------------------------------------------------------------------
# LTX-2.3 (issue 14): diffusers scripts/convert_ltx2_to_diffusers.py at huggingface/diffusers commit
# 58eb52c0803ea9af3abec60841c2a093bdf1f951 (file last changed in 7564fb016dabda0c943416190fc92398c50b1b20),
# version "2.3" of get_ltx2_transformer_config, get_ltx2_connectors_config, get_ltx2_video_vae_config
# (timestep_conditioning=False, as for 2.0 above), get_ltx2_audio_vae_config ("Same config as LTX-2.0"),
# get_ltx2_vocoder_config (LTX2VocoderWithBWE) and get_ltx2_spatial_latent_upsampler_config. The text
# encoder is Gemma 3 12B as for 2.0 (the script's --text_encoder_model_id default "for LTX 2.0/2.3").
# tests/test_bench_configs.py checks the transformer flags against protocol/families.py's 2.3 row.
# ---------------------------------------------------------------------------------------------
TRANSFORMER_CONFIG_2_3: dict[str, Any] = {
    **TRANSFORMER_CONFIG,
    "gated_attn": True, "cross_attn_mod": True, "audio_gated_attn": True, "audio_cross_attn_mod": True,
    "use_prompt_embeddings": False, "perturbed_attn": True,
}  # fmt: skip
CONNECTORS_CONFIG_2_3: dict[str, Any] = {
    "caption_channels": 3840, "text_proj_in_factor": 49,
    "video_connector_num_attention_heads": 32, "video_connector_attention_head_dim": 128,
    "video_connector_num_layers": 8, "video_connector_num_learnable_registers": 128, "video_gated_attn": True,
    "audio_connector_num_attention_heads": 32, "audio_connector_attention_head_dim": 64,
    "audio_connector_num_layers": 8, "audio_connector_num_learnable_registers": 128, "audio_gated_attn": True,
    "connector_rope_base_seq_len": 4096, "rope_theta": 10000.0, "rope_double_precision": True,
    "causal_temporal_positioning": False, "rope_type": "split", "per_modality_projections": True,
    "video_hidden_dim": 4096, "audio_hidden_dim": 2048, "proj_bias": True,
}  # fmt: skip
VAE_CONFIG_2_3: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 128,
    "block_out_channels": (256, 512, 1024, 1024), "down_block_types": ("LTX2VideoDownBlock3D",) * 4,
    "decoder_block_out_channels": (256, 512, 512, 1024),
    "layers_per_block": (4, 6, 4, 2, 2), "decoder_layers_per_block": (4, 6, 4, 2, 2),
    "spatio_temporal_scaling": (True, True, True, True), "decoder_spatio_temporal_scaling": (True, True, True, True),
    "decoder_inject_noise": (False, False, False, False, False),
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_type": ("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
    "upsample_residual": (False, False, False, False), "upsample_factor": (2, 2, 1, 2),
    "timestep_conditioning": False, "patch_size": 4, "patch_size_t": 1,
    "resnet_norm_eps": 1e-6, "encoder_causal": True, "decoder_causal": False,
    "encoder_spatial_padding_mode": "zeros", "decoder_spatial_padding_mode": "zeros",
    "spatial_compression_ratio": 32, "temporal_compression_ratio": 8,
}  # fmt: skip
VOCODER_CONFIG_2_3: dict[str, Any] = {
    "in_channels": 128, "hidden_channels": 1536, "out_channels": 2,
    "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4], "upsample_factors": [5, 2, 2, 2, 2, 2],
    "resnet_kernel_sizes": [3, 7, 11], "resnet_dilations": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "act_fn": "snakebeta", "leaky_relu_negative_slope": 0.1, "antialias": True, "antialias_ratio": 2,
    "antialias_kernel_size": 12, "final_act_fn": None, "final_bias": False,
    "bwe_in_channels": 128, "bwe_hidden_channels": 512, "bwe_out_channels": 2,
    "bwe_upsample_kernel_sizes": [12, 11, 4, 4, 4], "bwe_upsample_factors": [6, 5, 2, 2, 2],
    "bwe_resnet_kernel_sizes": [3, 7, 11], "bwe_resnet_dilations": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "bwe_act_fn": "snakebeta", "bwe_leaky_relu_negative_slope": 0.1, "bwe_antialias": True,
    "bwe_antialias_ratio": 2, "bwe_antialias_kernel_size": 12, "bwe_final_act_fn": None, "bwe_final_bias": False,
    "filter_length": 512, "hop_length": 80, "window_length": 512, "num_mel_channels": 64,
    "input_sampling_rate": 16000, "output_sampling_rate": 48000,
}  # fmt: skip
# 2.3's upsampler: the plain conv + pixel shuffle (use_rational_resampler=False; 2.0's is True).
LATENT_UPSAMPLER_CONFIG_2_3: dict[str, Any] = {
    "in_channels": 128, "mid_channels": 1024, "num_blocks_per_stage": 4, "dims": 3, "spatial_upsample": True,
    "temporal_upsample": False, "rational_spatial_scale": 2.0, "use_rational_resampler": False,
}  # fmt: skip
FAMILIES = ("2.0", "2.3")
# Parameter counts the brief expects at full size (checked to 1%).
EXPECTED_PARAMS = {"transformer": 18.876e9, "text_encoder": 12.19e9, "connectors": 1.431e9, "vae": 1.222e9}
# LTX-2.3 at full size: the meta-device counts of the configs above (diffusers 0.42.1; checked in
# tests/test_bench_configs.py). The "22B" of LTX-2.3 is the original single checkpoint, which holds the
# transformer and the text connectors (the conversion script splits them): 18.989 + 3.172 = 22.16 B.
# The transformer alone is barely larger than 2.0's (gated attention, cross-attention modulation).
EXPECTED_PARAMS_2_3 = {
    "transformer": 18.989e9, "text_encoder": 12.19e9, "connectors": 3.172e9, "vae": 0.7261e9,
    "latent_upsampler": 0.4979e9,
}  # fmt: skip
# Save order: largest first, so a full disk shows up before minutes are spent on the small parts.
COMPONENTS = ("transformer", "text_encoder", "connectors", "vae", "audio_vae", "vocoder")
# LTX-2.3 adds the two-stage pipeline's latent upsampler (a subfolder model_index.json does not list).
COMPONENTS_2_3 = (*COMPONENTS, "latent_upsampler")
CLASS_NAMES = {
    "transformer": ("diffusers", "LTX2VideoTransformer3DModel"),
    "text_encoder": ("transformers", "Gemma3ForConditionalGeneration"),
    "connectors": ("ltx2", "LTX2TextConnectors"),
    "vae": ("diffusers", "AutoencoderKLLTX2Video"),
    "audio_vae": ("diffusers", "AutoencoderKLLTX2Audio"),
    "vocoder": ("ltx2", "LTX2Vocoder"),
}
# model_index.json of 2.3: the BWE vocoder is what protocol/families.py tells 2.3 by.
CLASS_NAMES_2_3 = {**CLASS_NAMES, "vocoder": ("ltx2", "LTX2VocoderWithBWE")}


def family_components(family: str) -> tuple[str, ...]:
    """The folders a build of `family` saves, in save order."""
    return COMPONENTS_2_3 if family == "2.3" else COMPONENTS


def family_class_names(family: str) -> dict[str, tuple[str, str]]:
    """model_index.json's (library, class) per component of `family`."""
    return CLASS_NAMES_2_3 if family == "2.3" else CLASS_NAMES


def family_expected_params(family: str) -> dict[str, float]:
    """Full-size parameter counts a build of `family` is checked against (to 1%)."""
    return EXPECTED_PARAMS_2_3 if family == "2.3" else EXPECTED_PARAMS


def scaled_configs(scale: str, te_layers: int | None = None, family: str = "2.0") -> dict[str, dict[str, Any]]:
    """Component configs of `family` ("2.0" or "2.3") for a scale; `te_layers` overrides the Gemma
    layer count (storage fallback). 2.3's also hold "latent_upsampler"."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    two_three = family == "2.3"
    text = dict(GEMMA_TEXT_CONFIG)
    transformer = dict(TRANSFORMER_CONFIG_2_3 if two_three else TRANSFORMER_CONFIG)
    connectors = dict(CONNECTORS_CONFIG_2_3 if two_three else CONNECTORS_CONFIG)
    if scale == "smoke":  # real widths, one layer each: a CPU can run the whole benchmark
        transformer["num_layers"] = 1
        text["num_hidden_layers"] = 1
        connectors["video_connector_num_layers"] = 1
        connectors["audio_connector_num_layers"] = 1
    if te_layers is not None:
        text["num_hidden_layers"] = te_layers
    text["layer_types"] = [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(text["num_hidden_layers"])
    ]
    connectors["text_proj_in_factor"] = text["num_hidden_layers"] + 1  # one input per Gemma hidden state
    configs = {
        "transformer": transformer,
        "connectors": connectors,
        "vae": dict(VAE_CONFIG_2_3 if two_three else VAE_CONFIG),
        "audio_vae": dict(AUDIO_VAE_CONFIG),
        "vocoder": dict(VOCODER_CONFIG_2_3 if two_three else VOCODER_CONFIG),
        "text": text,
    }
    if two_three:
        configs["latent_upsampler"] = dict(LATENT_UPSAMPLER_CONFIG_2_3)
    return configs


# ---------------------------------------------------------------------------------------------
# FLOPs of one transformer call (batch 1, CFG off), derived from the config.
# ---------------------------------------------------------------------------------------------
def audio_latent_frames(num_frames: int, fps: float = FPS) -> int:
    """LTX2Pipeline: round(seconds * sample_rate / hop / 4) = round(seconds * 25)."""
    return round(num_frames / fps * 16000 / 160 / 4)


def transformer_flops(
    cfg: dict[str, Any], width: int, height: int, num_frames: int, text_tokens: int
) -> dict[str, Any]:
    """Matmul FLOPs (2 per multiply-add) of one LTX2VideoTransformer3DModel forward.

    Per block, with Nv video / Na audio / T text tokens, Dv = video width, Da = audio width,
    Dav = audio heads x audio head dim (the width of both audio<->video cross attentions),
    Cv / Ca = video / audio cross-attention (text) widths, FFN inner = 4 x width:
      linear: Nv(14 Dv^2 + 4 Dv Dav) + Na(14 Da^2 + 4 Da Dav) + T(2 Dv Cv + 2 Da Ca)
      attention (QK^T and PV): 2 Nv^2 Dv + 2 Nv T Dv + 2 Na^2 Da + 2 Na T Da + 4 Nv Na Dav
      FLOPs = 2 x layers x (linear + attention)
    The pieces outside the blocks (patchify, caption projection, AdaLN) add < 0.1%: checked against
    torch.utils.flop_counter on the meta device (docs/benchmarks.md).
    """
    nv = ((num_frames - 1) // 8 + 1) * (height // 32) * (width // 32)
    na = audio_latent_frames(num_frames)
    t = text_tokens
    dv = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    da = cfg["audio_num_attention_heads"] * cfg["audio_attention_head_dim"]
    dav = da
    cv, ca = cfg["cross_attention_dim"], cfg["audio_cross_attention_dim"]
    layers = cfg["num_layers"]
    linear = nv * (14 * dv * dv + 4 * dv * dav) + na * (14 * da * da + 4 * da * dav) + t * (2 * dv * cv + 2 * da * ca)
    attention = 2 * nv * nv * dv + 2 * nv * t * dv + 2 * na * na * da + 2 * na * t * da + 4 * nv * na * dav
    return {
        "video_tokens": nv,
        "audio_tokens": na,
        "text_tokens": t,
        "linear_flops": 2 * layers * linear,
        "attention_flops": 2 * layers * attention,
        "flops": 2 * layers * (linear + attention),
    }


def peak_flops(gpu: str) -> float | None:
    """The datasheet bf16 peak of a card named `gpu` (None for one not in the table)."""
    for key, value in DATASHEET_BF16_FLOPS.items():
        if key in gpu:
            return value
    return None

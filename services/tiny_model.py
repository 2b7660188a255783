"""Build a tiny, randomly initialised LTX-2 pipeline and save it in diffusers layout.

No hub access exists where tests and CI run, and diffusers' own tiny test configs download
`hf-internal-testing/tiny-gemma3`. This module builds every component from the real diffusers and
transformers classes instead (seeded, so two builds are identical), with shapes chosen so the
whole pipeline runs in about a second on two CPU cores:

- the Gemma text hidden size (32) equals the connectors' heads x head_dim (4 x 8);
- the audio VAE's `base_channels` equals `latent_channels * mel_bins / 4` (packed audio width);
- the vocoder upsamples by 10 x 4 x 4 = 160 samples per mel frame, the audio VAE's hop length at
  16 kHz, so the waveform lasts as long as the video;
- the video VAE compresses 4x in space and time and states both ratios explicitly (without them
  diffusers reports wrong ratios and tiled decode returns wrong sizes); 2.3's and 2.5's has LTX-2.3's
  kinds of blocks (spatiotemporal, temporal-only and spatial-only upsamplers, zeros padding).

`--family 2.3` builds the LTX-2.3 variant under its own repo id: the transformer with 2.3's flags
(gated attention, cross-attention modulation, no prompt projection: the connectors project per
modality straight to the transformer's widths, STG-capable attention) and the vocoder with
bandwidth extension, which turns the 16 kHz waveform into 48 kHz as the real one does.

`--family 2.5` builds LTX-2.5: a Gemma 4 unified text encoder (services/tiny_text_encoder.py), 2.3's
connectors and vocoder, and the transformer with 2.5's flags on top of 2.3's (feed-forward without bias,
the prompt's cross-attention modulation a static per-layer table instead of a timestep MLP).

All carry a tiny `latent_upsampler` subfolder for two-stage runs, beside the pipeline's own folders
(model_index.json does not list it, as in Lightricks/LTX-2). 2.5's also carries its diffusion video
decoder in `diffusion_decoder` (diffusers' `LTX2VideoDiffusionDecoderModel`, the component diffusers'
modular 2.5 pipeline decodes with; LTX2Pipeline's model_index.json does not list it either).

`write_tiny_stage2_lora_to_hf_cache` writes a tiny stand-in for a family's distilled LoRA, which dev
two-stage fuses for stage 2, as a file in a snapshot of the real LoRA's repo id (a random rank-4 LoRA in
diffusers' key format on the tiny transformer's video self-attention). It is for tests' own caches
only, with no command: a stand-in under a real repo id in a user's cache would hide that the real
model is missing. It never replaces a snapshot of that repo the cache already holds.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    FlowMatchEulerDiscreteScheduler,
    LTX2Pipeline,
    LTX2VideoDiffusionDecoderModel,
    LTX2VideoTransformer3DModel,
)
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

from protocol.families import DIFFUSION_DECODER, LATENT_UPSAMPLER, family_named
from protocol.model_ids import TINY_REPO_IDS, TINY_REVISION, hub_cache_dir
from services.tiny_text_encoder import TEXT_HIDDEN, TEXT_LAYERS, build_text_encoder, build_tokenizer

# The revision of the tiny stage-2 LoRA's snapshot (the cache's snapshots/<rev> under the real repo's id).
TINY_LORA_REVISION = "1" * 40
# The tiny stage-2 LoRA's seed: another LoRA than lora_tensors' default (the tests' own LoRA files).
TINY_STAGE2_LORA_SEED = 7

# Transformer widths: video 2 heads x 8 = 16, audio 2 heads x 4 = 8. LTX-2.3's connectors project the
# text straight to these (per_modality_projections), so its connector heads x head_dim must match them.
VIDEO_HEADS, VIDEO_HEAD_DIM, AUDIO_HEADS, AUDIO_HEAD_DIM = 2, 8, 2, 4


def build_components(seed: int = 0, family: str = "2.0") -> dict[str, object]:
    """Every LTX2Pipeline component of `family`, each built right after `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(family)
    torch.manual_seed(seed)
    transformer = build_transformer(family)
    torch.manual_seed(seed)
    connectors = build_connectors(family, TEXT_LAYERS + 1)
    torch.manual_seed(seed)
    vae = build_video_vae() if family == "2.0" else build_ltx23_video_vae()
    torch.manual_seed(seed)
    audio_vae = build_audio_vae()
    torch.manual_seed(seed)
    mel_channels = audio_vae.config.output_channels * audio_vae.config.mel_bins
    has_bwe = family_named(family).vocoder == "LTX2VocoderWithBWE"
    vocoder = build_bwe_vocoder(mel_channels) if has_bwe else build_vocoder(mel_channels)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "audio_vae": audio_vae,
        "text_encoder": text_encoder,
        "tokenizer": build_tokenizer(),
        "connectors": connectors,
        "transformer": transformer,
        "vocoder": vocoder,
        "processor": None,
        "prompt_enhancer": None,
        "duration_head": None,
    }


def build_transformer(family: str) -> LTX2VideoTransformer3DModel:
    """Two blocks at the tiny widths; 2.3 adds its flags (so STG's block 28 lies beyond the second
    block: the STG pass still runs, as a second unperturbed call)."""
    flags = dict(family_named(family).transformer)  # what detection reads back (protocol/families.py)
    return LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=VIDEO_HEADS,
        attention_head_dim=VIDEO_HEAD_DIM,
        cross_attention_dim=VIDEO_HEADS * VIDEO_HEAD_DIM,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=AUDIO_HEADS,
        audio_attention_head_dim=AUDIO_HEAD_DIM,
        audio_cross_attention_dim=AUDIO_HEADS * AUDIO_HEAD_DIM,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=TEXT_HIDDEN,
        rope_double_precision=False,
        rope_type="split",
        **flags,
    )


def build_connectors(family: str, text_layers: int) -> LTX2TextConnectors:
    """2.0: one projection to the text width, then 4 x 8 connectors. 2.3 and 2.5 (no prompt projection in
    their transformer): RMS-normed per-modality projections with bias and gated attention, the connectors as
    wide as the transformer streams."""
    if not family_named(family).transformer.get("use_prompt_embeddings", True):
        widths = {
            "video_connector_num_attention_heads": VIDEO_HEADS,
            "video_connector_attention_head_dim": VIDEO_HEAD_DIM,
            "audio_connector_num_attention_heads": AUDIO_HEADS,
            "audio_connector_attention_head_dim": AUDIO_HEAD_DIM,
            "per_modality_projections": True,
            "video_hidden_dim": VIDEO_HEADS * VIDEO_HEAD_DIM,
            "audio_hidden_dim": AUDIO_HEADS * AUDIO_HEAD_DIM,
            "proj_bias": True,
            "video_gated_attn": True,
            "audio_gated_attn": True,
        }
    else:
        widths = {
            "video_connector_num_attention_heads": 4,
            "video_connector_attention_head_dim": 8,
            "audio_connector_num_attention_heads": 4,
            "audio_connector_attention_head_dim": 8,
        }
    return LTX2TextConnectors(
        caption_channels=TEXT_HIDDEN,
        text_proj_in_factor=text_layers,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
        rope_theta=10000.0,
        rope_double_precision=False,
        causal_temporal_positioning=False,
        rope_type="split",
        **widths,
    )


def build_video_vae() -> AutoencoderKLLTX2Video:
    """4x in space and time, with non-trivial latent statistics."""
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, True),
        decoder_spatio_temporal_scaling=(True, True),
        decoder_inject_noise=(False, False, False),
        downsample_type=("spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal"),
        upsample_residual=(False, False),
        upsample_factor=(1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    )
    # Non-trivial normalisation statistics, so a stage that skips them cannot match the pipeline.
    vae.latents_mean.copy_(torch.linspace(-0.2, 0.2, 4))
    vae.latents_std.copy_(torch.linspace(0.8, 1.2, 4))
    return vae


def build_ltx23_video_vae() -> AutoencoderKLLTX2Video:
    """LTX-2.3's kinds of blocks (the 2.5 tiny model shares it), still 4x in space and time.

    The real 2.3 VAE (bench/gpu_configs.VAE_CONFIG_2_3) has four levels on each side and zeros padding;
    its decoder upsamples, from the latents outwards, spatiotemporal (with a 2x channel factor),
    spatiotemporal, temporal only, then spatial only, none of them residual. The tuples below are the
    real ones; only the second decoder level's upsampler is switched off (its channel factor is 1, so
    its entry resnet changes the width), which leaves one 2x2x2, one 2x1x1 and one 1x2x2 upsampler:
    4x in time and space with patch size 1. diffusers reverses every per-level decoder tuple except
    `upsample_type`, hence the order of `decoder_spatio_temporal_scaling`. The encoder mirrors it:
    spatial, temporal and spatiotemporal downsamplers and a last level that keeps its size.
    The widths halve where a channel factor of 2 takes them in, which is what diffusers requires.
    """
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("LTX2VideoDownBlock3D",) * 4,
        decoder_block_out_channels=(8, 16, 16, 32),
        layers_per_block=(1, 2, 1, 1, 1),
        decoder_layers_per_block=(1, 2, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, False, True),
        decoder_inject_noise=(False,) * 5,
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
        upsample_residual=(False,) * 4,
        upsample_factor=(2, 2, 1, 2),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
        encoder_spatial_padding_mode="zeros",
        decoder_spatial_padding_mode="zeros",
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    )
    vae.latents_mean.copy_(torch.linspace(-0.3, 0.1, 4))
    vae.latents_std.copy_(torch.linspace(0.7, 1.3, 4))
    return vae


def build_audio_vae() -> AutoencoderKLLTX2Audio:
    """8 mel bins at 16 kHz with a 160-sample hop (100 mel frames per second, as the real one); its encoder
    compresses 4x in time and mel like the real one, so audio-to-video can encode a soundtrack with it."""
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1, 2, 4),  # two downsamplings: 4x in time and mel, as the real one (audio-to-video encodes)
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=8,
    )
    audio_vae.latents_mean.copy_(torch.linspace(-0.1, 0.1, 4))
    audio_vae.latents_std.copy_(torch.linspace(0.9, 1.1, 4))
    return audio_vae


# The tiny snakebeta vocoder both families start from: 10 x 4 x 4 = 160 samples per mel frame, 16 kHz.
TINY_VOCODER = {
    "hidden_channels": 32,
    "out_channels": 2,
    "upsample_kernel_sizes": [20, 8, 8],
    "upsample_factors": [10, 4, 4],
    "resnet_kernel_sizes": [3],
    "resnet_dilations": [[1, 3, 5]],
}


def build_vocoder(mel_channels: int) -> LTX2Vocoder:
    """LTX-2.0's vocoder: TINY_VOCODER, so 16 kHz out."""
    return LTX2Vocoder(
        in_channels=mel_channels, **TINY_VOCODER, leaky_relu_negative_slope=0.1, output_sampling_rate=16000
    )


def build_bwe_vocoder(mel_channels: int) -> LTX2VocoderWithBWE:
    """LTX-2.3's vocoder: a snakebeta vocoder to 16 kHz (160 samples per mel frame), then bandwidth
    extension to 48 kHz: a mel of that waveform every 16 samples, 16 x 3 = 48 samples per mel frame
    out of the BWE generator (4 x 4 x 3) plus the 3x resampled waveform. Kernel minus stride is even
    in every layer, so each upsampler gives exactly stride x input samples, as the real config does."""
    bwe_mel_channels = 8
    vocoder = LTX2VocoderWithBWE(
        in_channels=mel_channels,
        **TINY_VOCODER,
        bwe_in_channels=2 * bwe_mel_channels,
        bwe_hidden_channels=32,
        bwe_out_channels=2,
        bwe_upsample_kernel_sizes=[8, 8, 7],
        bwe_upsample_factors=[4, 4, 3],
        bwe_resnet_kernel_sizes=[3],
        bwe_resnet_dilations=[[1, 3, 5]],
        filter_length=64,
        hop_length=16,
        window_length=64,
        num_mel_channels=bwe_mel_channels,
        input_sampling_rate=16000,
        output_sampling_rate=48000,
    )
    # The real mel filterbank is loaded from the checkpoint (a zero buffer until then); a random
    # positive one makes the BWE generator see a real spectrogram.
    vocoder.mel_stft.mel_basis.copy_(torch.rand(vocoder.mel_stft.mel_basis.shape) * 0.1)
    return vocoder


def build_latent_upsampler(family: str) -> LTX2LatentUpsamplerModel:
    """The real upsampler's layout (3-D convolutions, x2 spatially) at the tiny latent width, one block per stage.

    The mid width stays 32 because every GroupNorm has 32 groups. diffusers' conversion configs use the rational
    resampler for LTX-2.0 and the plain conv + pixel shuffle for 2.3: at scale 2 both compute the same thing, but
    their weights are stored under different names, which is what a loader has to get right.
    """
    return LTX2LatentUpsamplerModel(
        in_channels=4,
        mid_channels=32,
        num_blocks_per_stage=1,
        dims=3,
        spatial_upsample=True,
        temporal_upsample=False,
        rational_spatial_scale=2.0,
        use_rational_resampler=family == "2.0",
    )


def build_diffusion_decoder() -> LTX2VideoDiffusionDecoderModel:
    """LTX-2.5's diffusion video decoder at the tiny VAE's latent width and ratios (4x in space and time).

    The real one (diffusers' defaults) has four upsampling stages, 8x in time and space times a patch of
    4; this one has two: (2, 1, 1) then (2, 2, 2), times a patch of 2, so its frames and pixels match the
    tiny VAE's and latents decode either way. Kernels of 3 and a stage-5 kernel of (3, 5, 5) still shift
    windows inward at every border on a 32x32x9 clip (a stage-5 grid of 9x16x16, 18 blocks of 128 tokens).
    The latent statistics are the tiny 2.5 VAE's, as the real decoder carries its VAE's.
    """
    decoder = LTX2VideoDiffusionDecoderModel(
        out_channels=3,
        latent_channels=4,
        patch_size=2,
        decoder_head_dim=8,
        decoder_stage_channels=(32, 16, 16),
        decoder_stage_depths=(1, 1, 2),
        decoder_stage_kernels=((3, 3, 3), (3, 3, 3)),
        decoder_upsample_strides=((2, 1, 1), (2, 2, 2)),
        decoder_upsample_channel_reductions=(2, 1),
        decoder_stage5_kernel=(3, 5, 5),
        decoder_t_emb_dim=32,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    )
    vae = build_ltx23_video_vae()
    decoder.latents_mean.copy_(vae.latents_mean)
    decoder.latents_std.copy_(vae.latents_std)
    return decoder


def write_tiny_model(directory: Path, seed: int = 0, family: str = "2.0") -> Path:
    """Save the tiny pipeline of `family` with `save_pretrained` into `directory` (created if missing),
    plus its latent upsampler in the `latent_upsampler` subfolder and, for 2.5, its diffusion video
    decoder in `diffusion_decoder`."""
    pipe = LTX2Pipeline(**build_components(seed, family))
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory)
    torch.manual_seed(seed)
    build_latent_upsampler(family).save_pretrained(directory / LATENT_UPSAMPLER)
    if family_named(family).diffusion_decoder:
        torch.manual_seed(seed)
        build_diffusion_decoder().save_pretrained(directory / DIFFUSION_DECODER)
    return directory


def write_tiny_model_to_hf_cache(hub_cache: Path, seed: int = 0, family: str = "2.0") -> Path:
    """Save the tiny pipeline of `family` as its TINY_REPO_IDS entry in a Hugging Face hub cache layout.

    The layout (`models--org--name/snapshots/<rev>` plus `refs/main`) is what `snapshot_download`
    reads offline, so looking the model up by repo id goes through the same code path as a real
    downloaded checkpoint. The snapshot is written beside its final name and renamed, so a crash
    never leaves a half-written model that later runs would pick up.
    """
    repo_dir = hub_cache / ("models--" + TINY_REPO_IDS[family].replace("/", "--"))
    snapshot = repo_dir / "snapshots" / TINY_REVISION
    if not (snapshot / "model_index.json").exists():
        partial = repo_dir / "snapshots" / f".{TINY_REVISION}.partial-{os.getpid()}"
        write_tiny_model(partial, seed, family)
        try:
            partial.rename(snapshot)
        except OSError:  # another process finished first; its copy is identical (same seed)
            if not (snapshot / "model_index.json").exists():
                raise
            shutil.rmtree(partial)
    refs = repo_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(TINY_REVISION)
    return snapshot


def lora_tensors(prefix: str, seed: int = 3) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on the tiny transformer's video self-attention (the query, key and value projections
    of both blocks, 16 wide in every family), keys under `prefix` ("transformer." is diffusers' format,
    "diffusion_model." Lightricks' own); A and B drawn from N(0, 1), so the LoRA visibly changes the output."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(2):
        for projection in ("to_q", "to_k", "to_v"):
            key = f"{prefix}transformer_blocks.{block}.attn1.{projection}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, VIDEO_HEADS * VIDEO_HEAD_DIM, generator=generator)
            tensors[f"{key}.lora_B.weight"] = torch.randn(VIDEO_HEADS * VIDEO_HEAD_DIM, 4, generator=generator)
    return tensors


def write_tiny_stage2_lora_to_hf_cache(hub_cache: Path, repo_id: str, file_name: str) -> Path:
    """The tiny stage-2 distilled LoRA as `file_name` in a snapshot of `repo_id` in a hub cache layout.

    A cache that already holds `repo_id` at another revision keeps it untouched (RuntimeError): that
    is a real download, which a tiny file must never shadow.
    """
    from safetensors.torch import save_file

    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file() and main_ref.read_text().strip() != TINY_LORA_REVISION:
        raise RuntimeError(f"{repo_id} is already in the Hugging Face cache ({repo_dir}); not writing a tiny LoRA")
    snapshot = repo_dir / "snapshots" / TINY_LORA_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    target = snapshot / file_name
    if not target.is_file():
        partial = snapshot / f".{file_name}.partial-{os.getpid()}"
        save_file(lora_tensors("transformer.", TINY_STAGE2_LORA_SEED), str(partial))
        partial.rename(target)
    main_ref.parent.mkdir(parents=True, exist_ok=True)
    main_ref.write_text(TINY_LORA_REVISION)
    return target


def main(argv: list[str] | None = None) -> int:
    """`python -m services.tiny_model [--family 2.0|2.3|2.5] (--hf-cache | DIR)`: write the tiny model, print where."""
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny random LTX-2 pipeline.", allow_abbrev=False)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("directory", nargs="?", type=Path, help="write a plain diffusers folder here")
    target.add_argument("--hf-cache", action="store_true", help="write it into the Hugging Face cache")
    parser.add_argument("--family", choices=sorted(TINY_REPO_IDS), default="2.0", help="model family (default 2.0)")
    args = parser.parse_args(argv)
    if args.hf_cache:
        path = write_tiny_model_to_hf_cache(hub_cache_dir(), family=args.family)
    else:
        path = write_tiny_model(args.directory, family=args.family)
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

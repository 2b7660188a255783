"""The `ltx2` flags that become job spec fields, shared by `generate` and `submit`.

A module of its own so that the daemon's client commands and the embedded CLI both use them
without importing each other.
"""

from __future__ import annotations

import argparse
from typing import Any

from protocol.spec import NOT_UTF8, PIPELINES, SpecError

# CLI flags that map one-to-one onto JobSpec fields.
SPEC_FLAGS = (
    "prompt",
    "negative_prompt",
    "model",
    "width",
    "height",
    "num_frames",
    "fps",
    "steps",
    "guidance_scale",
    "audio_guidance_scale",
    "stg_scale",
    "modality_scale",
    "guidance_rescale",
    "schedule",
    "seed",
    "name",
    "dtype",
    "vae_chunk_frames",
    "vae_tiling",
    "loras",
    "camera",
    "fp8",
    "fp8_matmul",
    "compile",
    "sequential_offload",
    "drop_caches",
    "image",
    "nag_scale",
    "nag_tau",
    "nag_alpha",
    "nag_steps",
    "pipeline",
)


class LoraAction(argparse.Action):
    """`--lora SOURCE` starts a LoRA entry; `--lora-weight-name`/`--lora-scale` set the last one's."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: str | None = None
    ) -> None:
        entries = list(getattr(namespace, "loras", None) or [])
        if option == "--lora":
            entries.append({"source": value})
        elif not entries:
            parser.error(f"{option} must follow a --lora")
        else:
            entries[-1]["weight_name" if option == "--lora-weight-name" else "scale"] = value
        namespace.loras = entries


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that become JobSpec fields (defaults None: the model's preset fills them in)."""
    parser.add_argument("--prompt", required=True, help="what the clip shows (a paragraph works best)")
    parser.add_argument(
        "--negative-prompt", help="what to avoid; has an effect with --guidance-scale > 1 or with --nag-scale > 1"
    )
    parser.add_argument(
        "--model",
        help="HF repo id or local diffusers folder (default: the distilled model if "
        "cached, else the tiny offline model)",
    )
    parser.add_argument("--width", type=int, help="multiple of 32 (preset default)")
    parser.add_argument("--height", type=int, help="multiple of 32 (preset default)")
    parser.add_argument("--num-frames", type=int, help="8n+1: 9, 17, ..., 121, 161, 257 (preset default)")
    parser.add_argument("--fps", type=float, help="frames per second (default 24)")
    parser.add_argument("--steps", type=int, help="denoising steps (preset default: 8 distilled, 40 dev)")
    parser.add_argument("--guidance-scale", type=float, help="CFG scale; 1.0 turns CFG off (preset default)")
    parser.add_argument(
        "--audio-guidance-scale",
        type=float,
        help="CFG scale of the audio (family preset: 7.0 for LTX-2.3 and 2.5 dev; else follows --guidance-scale)",
    )
    parser.add_argument(
        "--stg-scale",
        type=float,
        help="spatio-temporal guidance, one extra transformer call per step; 0.0 is off (family preset)",
    )
    parser.add_argument(
        "--modality-scale",
        type=float,
        help="modality isolation guidance, one extra transformer call per step; 1.0 is off (family preset)",
    )
    parser.add_argument("--guidance-rescale", type=float, help="CFG rescale 0.0-1.0; 0.0 is off (family preset)")
    parser.add_argument(
        "--nag-scale",
        type=float,
        metavar="PHI",
        help="Normalized Attention Guidance: the negative prompt acts at CFG 1.0 in the text cross-attention"
        " (1.0-30.0; 1.0, the default, is off; ComfyUI's LTX-2 node uses 11)",
    )
    parser.add_argument("--nag-tau", type=float, metavar="TAU", help="NAG's clamp on the norm ratio (default 2.5)")
    parser.add_argument(
        "--nag-alpha", type=float, metavar="A", help="NAG's blend of guided and plain attention, 0-1 (default 0.25)"
    )
    parser.add_argument("--nag-steps", type=int, metavar="N", help="apply NAG in the first N steps only (default all)")
    parser.add_argument("--schedule", choices=["distilled", "default"], help="sigma schedule (preset default)")
    parser.add_argument(
        "--pipeline",
        choices=list(PIPELINES),
        help="two-stage: half size, latent upsampler x2, 3 refining steps at full size (sizes divide by 64;"
        " distilled schedule); preset default: two-stage for LTX-2.3 distilled at >= 1280 px wide",
    )
    parser.add_argument("--seed", type=int, help="random when absent; always recorded")
    parser.add_argument("--name", help="output file stem (default: video)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--vae-chunk-frames", type=int, help="decode in temporal pieces of N latent frames")
    parser.add_argument("--image", help="first-frame image for image-to-video (centre-cropped to the clip's shape)")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        default=None,
        help="flush the kernel page cache after the video is written (needs root; warns otherwise)",
    )
    parser.add_argument(
        "--camera",
        help="camera-control LoRA by name: dolly-in, dolly-out, dolly-left, dolly-right, jib-up, jib-down, static",
    )
    parser.add_argument(
        "--lora",
        dest="loras",
        action=LoraAction,
        metavar="REPO_OR_PATH",
        help="a LoRA (HF repo id in the cache, folder or .safetensors file); repeatable",
    )
    parser.add_argument(
        "--lora-weight-name",
        dest="loras",
        action=LoraAction,
        metavar="FILE",
        help="weight file inside the preceding --lora's repo or folder",
    )
    parser.add_argument(
        "--lora-scale",
        dest="loras",
        action=LoraAction,
        type=float,
        metavar="S",
        help="strength 0.0-1.0 of the preceding --lora (default 1.0)",
    )
    parser.add_argument(
        "--stage2-lora",
        metavar="REPO_OR_PATH",
        help="dev two-stage: the distilled LoRA fused for stage 2 (HF repo id in the cache or .safetensors file;"
        " default: the model family's, e.g. Lightricks/LTX-2's ltx-2-19b-distilled-lora-384.safetensors)",
    )
    parser.add_argument(
        "--stage2-lora-weight-name",
        metavar="FILE",
        help="weight file inside the --stage2-lora repo or folder",
    )
    parser.add_argument(
        "--fp8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store transformer weights in FP8 (bf16 compute; LoRAs are fused first)",
    )
    parser.add_argument(
        "--fp8-matmul",
        action="store_true",
        default=None,
        help="FP8 weights and FP8 matmuls (rowwise scales) in the transformer blocks; fastest with --compile",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the transformer's repeated blocks (torch.compile; the compiled code is cached on disk)",
    )
    parser.add_argument(
        "--sequential-offload",
        action="store_true",
        default=None,
        help="keep transformer layers in host memory, moving each to the GPU as it runs",
    )
    parser.add_argument(
        "--vae-tiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force spatial tiling on/off (default: chosen from the size)",
    )


def spec_request(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields the user gave on the command line (the rest come from the preset).

    Raises SpecError for text that is not UTF-8: Python hands undecodable argv bytes over as lone
    surrogates, which no protocol frame or job.json can carry (`ltx2 submit` died encoding them).
    """
    request = {name: getattr(args, name) for name in SPEC_FLAGS if getattr(args, name) is not None}
    stage2_lora = stage2_lora_request(args)
    if stage2_lora is not None:
        request["stage2_lora"] = stage2_lora
    for name, value in request.items():
        require_utf8("lora" if name == "loras" else name, value)
    return request


def stage2_lora_request(args: argparse.Namespace) -> dict[str, Any] | None:
    """The `stage2_lora` field from --stage2-lora and --stage2-lora-weight-name (None when neither is given)."""
    source = getattr(args, "stage2_lora", None)
    weight_name = getattr(args, "stage2_lora_weight_name", None)
    if source is None:
        if weight_name is not None:
            raise SpecError("stage2_lora_weight_name", "needs --stage2-lora (the repo or folder holding the file)")
        return None
    return {"source": source, **({"weight_name": weight_name} if weight_name is not None else {})}


def require_utf8(field: str, value: Any) -> None:
    """SpecError naming `field` if `value` (or any text inside it) cannot be encoded as UTF-8."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            require_utf8(field, item)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError(field, NOT_UTF8) from None

"""Load exactly the components a stage needs from a diffusers-layout LTX-2 folder.

The orchestrator resolves the model (repo id in the Hugging Face cache, or a local folder) and
records its path in job.json; workers only read that folder, so `HF_HUB_OFFLINE` is never an
issue inside a stage. Each loader raises ModelNotFound naming the missing subfolder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from protocol.errors import ModelNotFound
from protocol.families import LATENT_UPSAMPLER
from protocol.fault_points import fault_point
from services import compile_packages
from services.staged_transfer import move_to_device

log = logging.getLogger("ltx2.worker")
# The input shapes a compiled region (the blocks, the decoder) may meet in one process: Dynamo's limit, raised
# (limit_recompiles).
COMPILED_SHAPES = 64

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def resolve_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    fault_point("worker.first_device_use")
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` means bf16 on an accelerator and fp32 on the CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def require_subfolder(root: Path, name: str) -> Path:
    """The component folder, or ModelNotFound naming it."""
    folder = root / name
    if not folder.is_dir():
        raise ModelNotFound(f"model folder {root} has no '{name}' component")
    return folder


def component_class_name(root: Path, name: str) -> str:
    """The class that model_index.json records for a component (e.g. the vocoder variant)."""
    try:
        index = json.loads((root / "model_index.json").read_text())
        return str(index[name][1])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelNotFound(f"{root}/model_index.json does not describe '{name}': {exc}") from exc


def load_prompt_encoder(root: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """An LTX2Pipeline holding only the tokenizer and text encoder (on `device`).

    Its `encode_prompt` is the very code the single-process pipeline runs, and being the sole
    owner of the encoder it can be emptied to free it. The classes are the ones model_index.json
    names: Gemma 3 for LTX-2.0 and 2.3, Gemma 4 unified for 2.5, which diffusers 0.42.1 encodes
    alike (`_get_gemma_prompt_embeds` stacks every hidden state, whichever Gemma produced them).
    """
    import transformers
    from diffusers import LTX2Pipeline

    require_subfolder(root, "tokenizer")
    require_subfolder(root, "text_encoder")
    tokenizer_cls = getattr(transformers, component_class_name(root, "tokenizer"))
    encoder_cls = getattr(transformers, component_class_name(root, "text_encoder"))
    tokenizer = tokenizer_cls.from_pretrained(root, subfolder="tokenizer")
    encoder = move_to_device(encoder_cls.from_pretrained(root, subfolder="text_encoder", dtype=dtype), device).eval()
    return LTX2Pipeline(
        scheduler=None,
        vae=None,
        audio_vae=None,
        text_encoder=encoder,
        tokenizer=tokenizer,
        connectors=None,
        transformer=None,
        vocoder=None,
    )


def load_denoiser(root: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, Any]:
    """(connectors on `device`, transformer still on the CPU, scheduler).

    The transformer stays where it was loaded until `apply_memory_plan` places it, because LoRAs
    must be fused into its full-precision weights first.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    for name in ("connectors", "transformer", "scheduler"):
        require_subfolder(root, name)
    connectors = LTX2TextConnectors.from_pretrained(root, subfolder="connectors", dtype=dtype)
    transformer = LTX2VideoTransformer3DModel.from_pretrained(root, subfolder="transformer", dtype=dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
    return connectors.to(device).eval(), transformer.eval(), scheduler


def apply_memory_plan(
    transformer: Any,
    dtype: torch.dtype,
    device: torch.device,
    *,
    fp8: bool,
    sequential_offload: bool,
    fp8_matmul: bool = False,
    fp8_fast_accumulation: bool = False,
    fp8_gelu_kernel: bool = False,
) -> None:
    """Place the transformer per the plan: FP8 storage and/or sequential offload, else all on `device`.

    `fp8` stores weights in float8_e4m3fn and computes in `dtype` (about half the weight memory).
    `fp8_matmul` also stores them in FP8 and multiplies in FP8 (services/fp8_matmul.py), with the
    tensor cores' fast accumulation if `fp8_fast_accumulation`, and with `fp8_gelu_kernel` the feed-forwards'
    GELU and quantisation in one kernel (services/fp8_rows.py) except under sequential offload, whose per-layer
    hooks would not see the weights an Fp8FeedForward reads directly.
    `sequential_offload` keeps the layers in host memory and moves each to the accelerator only
    while it runs (slowest, smallest); on a CPU-only host it changes nothing. LoRAs must already
    be fused: casting first would merge adapters into quantised weights, so that order is refused.
    """
    from services.lora_fusing import require_no_adapters

    require_no_adapters(transformer)
    if fp8_matmul:
        from services.fp8_matmul import convert_blocks

        placement = device if not sequential_offload else torch.device("cpu")
        gelu_kernel = fp8_gelu_kernel and not sequential_offload
        convert_blocks(transformer, placement, fast_accumulation=fp8_fast_accumulation, gelu_kernel=gelu_kernel)
    if fp8:
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    if sequential_offload and device.type == "cuda":
        transformer.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level"
        )
    else:
        move_to_device(transformer, device)


def compile_blocks(
    transformer: Any,
    cache_dir: Path | None,
    deterministic: bool = False,
    package_key: str | None = None,
    whole_rows: bool = False,
) -> None:
    """Regional compile: torch.compile each of the transformer's repeated blocks (one graph,
    compiled once and reused by all 48 blocks) instead of the whole model, which compiles in a
    fraction of the time. The compilation itself happens at the first forward pass.

    Short-lived workers would pay it on every clip, so inductor's caches (compiled graphs, kernels,
    autotuning) go to `cache_dir` (the job's, under the state directory; LTX2_COMPILE_CACHE_DIR
    overrides it), kept across processes: a later worker finds them there and only re-traces.
    The variable is set, not defaulted, because importing diffusers already set it to inductor's
    per-user temp folder, which does not survive a reboot.

    `deterministic` (the plan's, from `[worker] deterministic`) turns on Inductor's deterministic mode:
    without it Inductor benchmarks kernel variants on the device and keeps the fastest, whose sums may
    be ordered differently run to run (two compiled runs on an H100 differed by up to 6.6e-2 in the
    latents). It is set on the config object, not through TORCHINDUCTOR_DETERMINISTIC, because a
    worker forked from the fork server imported Inductor's config before its job existed. Both values
    are set, so a group process never carries one job's mode into the next.

    `package_key` (services.compile_packages.package_key), with `LTX2_COMPILE_PACKAGES=1` and a torch
    that has Dynamo's precompile cache: the blocks compile through that cache, so a later worker
    with the same key loads them instead of tracing them again.

    `whole_rows` (the plan's `"row_reductions": "whole"`, from `[worker] whole_row_reductions`): row reductions
    up to services.whole_row_reductions.WHOLE_ROW_LIMIT wide keep the row in registers (that module says why).
    """
    prepare_inductor(cache_dir, deterministic, next(transformer.parameters()).device, whole_rows)
    limit_recompiles()
    if package_key is not None and compile_packages.wanted() and compile_packages.available():
        blocks = [block for block in transformer.modules() if type(block).__name__ in transformer._repeated_blocks]
        if compile_packages.compile_blocks(blocks, package_key):
            return
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)


def limit_recompiles() -> None:
    """One static graph per input shape for every compiled region (the blocks, the decoder), and a failure instead
    of a silent eager run past Dynamo's limit on them.

    Left to Dynamo (`dynamic=None`), the second shape a process meets recompiles as a dynamic graph: a two-stage
    worker's stage 2 (8,160 then 32,640 tokens at 1080p) and every later clip size of a group ran symbolic-shape
    kernels, so a clip's kernels depended on the shapes its process met before, and a package saved by one
    process held other graphs than another's (services/compile_packages.py). Static graphs cost one compile per
    shape on a cold cache; Inductor's cache serves each shape after that. Past `recompile_limit` (8 by default)
    Dynamo would run further shapes eager without a word, changing their frames; it is raised to COMPILED_SHAPES,
    and reaching it fails the attempt (the failure policy retries it in a new process, uncompiled further down)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, COMPILED_SHAPES)
    dynamo_config.fail_on_recompile_limit_hit = True


def prepare_inductor(
    cache_dir: Path | None, deterministic: bool, device: torch.device, whole_rows: bool = False
) -> None:
    """Inductor's settings for a compile of this process (compile_blocks says why each): its deterministic mode,
    its row reductions (`whole_rows`), and its caches in `cache_dir` (LTX2_COMPILE_CACHE_DIR overrides it; whole
    rows in a folder of their own under it); on the CPU the vector ISA it picked, logged. A cache folder this
    process cannot write (a read-only shared state dir) gives way to a private one, with a warning: the same code
    is compiled, only not kept for later processes (Inductor would fail the attempt on its lock files, and the
    failure policy would then step down to another plan)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from services import whole_row_reductions

    inductor_config.deterministic = deterministic
    whole_rows = whole_row_reductions.choose_row_reductions(whole_rows)
    chosen = os.environ.get("LTX2_COMPILE_CACHE_DIR") or (str(cache_dir) if cache_dir else "")
    if whole_rows:  # kernels of its own, in a folder of their own (also under Inductor's default folder)
        chosen = str(Path(chosen or default_cache_dir()) / whole_row_reductions.CACHE_FOLDER)
    if chosen and not writable_folder(Path(chosen)):
        private = tempfile.mkdtemp(prefix="ltx2-compile-cache-")
        log.warning(
            "compile cache %s cannot be written here; compiling into %s, kept for no later process", chosen, private
        )
        chosen = private
    if chosen:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = chosen
    if device.type == "cpu":
        # The vector instruction set Inductor builds its CPU kernels for (it probes the host once per
        # process): a process that picked another would make other last bits (issue 23's open CPU drift).
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        log.info("inductor CPU vector ISA: %s", pick_vec_isa() or "none")


def writable_folder(path: Path) -> bool:
    """Whether `path` is (or can be made) a folder this process may create files in."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def compile_vae_decoder(
    vae: Any, cache_dir: Path | None, deterministic: bool = False, package_key: str | None = None
) -> None:
    """`--compile-decoder`: the video VAE's decoder compiled by Inductor (at its first decode), its weights in
    channels-last-3d (NDHWC), the fastest of docs/benchmarks.md version 12's variants: 1.11 s against eager's
    1.60 s per 1080p x 121 decode on an H100; channels-last alone was slower than eager (cuDNN's NDHWC 3D
    convolutions), so the layout goes only with the compile. Inductor's caches as compile_blocks keeps them; with
    `package_key` and `LTX2_COMPILE_PACKAGES=1` through Dynamo's precompile cache (services.compile_packages), so
    a later process loads the decoder's code instead of tracing it again."""
    prepare_inductor(cache_dir, deterministic, next(vae.parameters()).device)
    # A graph per input shape (limit_recompiles): a tiled or pieced decode meets up to ~10 shapes, a group more.
    limit_recompiles()
    vae.to(memory_format=torch.channels_last_3d)
    if package_key is not None and compile_packages.wanted() and compile_packages.available():
        if compile_packages.compile_blocks([vae.decoder], package_key):
            return
    vae.decoder.compile(dynamic=False)  # as benchmarks v12 measured it (a graph break is allowed)


def load_video_vae(root: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The video VAE on `device`."""
    from diffusers import AutoencoderKLLTX2Video

    require_subfolder(root, "vae")
    return AutoencoderKLLTX2Video.from_pretrained(root, subfolder="vae", dtype=dtype).to(device).eval()


def load_latent_upsampler(root: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The latent upsampler of two-stage runs on `device`. The real one (128 latent channels, 1024
    mid channels, 4 blocks per stage) has about 0.5 B parameters, 1 GB in bf16: small enough to sit
    beside the transformer, which is why two-stage needs no process of its own."""
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    folder = root / LATENT_UPSAMPLER
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"two-stage needs the latent upsampler, but {folder} does not exist or has no config.json")
    upsampler = LTX2LatentUpsamplerModel.from_pretrained(root, subfolder=LATENT_UPSAMPLER, dtype=dtype)
    return upsampler.to(device).eval()


def load_audio_vae(root: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The audio VAE on `device` (audio-to-video encodes its soundtrack with it; no vocoder)."""
    from diffusers import AutoencoderKLLTX2Audio

    require_subfolder(root, "audio_vae")
    return AutoencoderKLLTX2Audio.from_pretrained(root, subfolder="audio_vae", dtype=dtype).to(device).eval()


def load_audio_decoder(root: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """(audio VAE, vocoder) on `device`; the vocoder class follows model_index.json."""
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers.pipelines.ltx2 import vocoder as vocoders

    require_subfolder(root, "audio_vae")
    require_subfolder(root, "vocoder")
    vocoder_cls = getattr(vocoders, component_class_name(root, "vocoder"))
    audio_vae = AutoencoderKLLTX2Audio.from_pretrained(root, subfolder="audio_vae", dtype=dtype)
    vocoder = vocoder_cls.from_pretrained(root, subfolder="vocoder", dtype=dtype)
    return audio_vae.to(device).eval(), vocoder.to(device).eval()


class LatentStatistics:
    """Stands in for a VAE inside the denoising process: its config and statistics, no weights.

    With `output_type="latent"` LTX2Pipeline still reads from both VAEs their normalisation
    statistics (`latents_mean`/`latents_std`), a few config values and the compression ratios.
    Loading the video VAE for that would cost 2.4 GiB and seconds at full size, so this object
    reads only the two statistics tensors from the safetensors file and takes the ratios from the
    real class instantiated on the meta device (no memory, no weights).
    """

    def __init__(self, model_cls: type, root: Path, subfolder: str) -> None:
        folder = require_subfolder(root, subfolder)
        config = model_cls.load_config(root, subfolder=subfolder)
        with torch.device("meta"):
            shell = model_cls.from_config(config)
        self.config = shell.config
        for name in ("spatial_compression_ratio", "temporal_compression_ratio", "mel_compression_ratio"):
            if hasattr(shell, name):
                setattr(self, name, getattr(shell, name))
        self.latents_mean = read_tensor(folder, "latents_mean")
        self.latents_std = read_tensor(folder, "latents_std")
        self.dtype = torch.float32


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    """One tensor from a (possibly sharded) diffusers weights folder, without reading the rest."""
    weights = folder / WEIGHTS_FILE
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weights = folder / json.loads(index.read_text())["weight_map"][name]
    if not weights.is_file():
        raise ModelNotFound(f"{folder} has no {WEIGHTS_FILE}")
    with safe_open(str(weights), framework="pt") as handle:
        return handle.get_tensor(name)


def load_latent_statistics(root: Path) -> tuple[LatentStatistics, LatentStatistics]:
    """(video VAE statistics, audio VAE statistics) for the denoising process."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video

    return LatentStatistics(AutoencoderKLLTX2Video, root, "vae"), LatentStatistics(
        AutoencoderKLLTX2Audio, root, "audio_vae"
    )

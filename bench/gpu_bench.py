#!/usr/bin/env python3
"""GPU benchmark: full-size LTX-2.0 (random weights), single-process diffusers vs the staged pipeline.

One entry point, several sub-commands; `all` runs everything on one machine and is what
bench/run_on_device.sh calls (docs/benchmarks.md has the commands and the results):

    python bench/gpu_bench.py all --out DIR [--budget-s 560] [--scale full|smoke|tiny] [--plan v1|fork]
                                  [--phases build,baseline_large] [--sequence staged_small,baseline,staged_large]

`build` (unless a finished folder is already there) builds every LTX-2.0 component at full size
with random bf16 weights directly on the accelerator, checks the parameter counts and saves a
diffusers folder (safetensors, 5 GB shards, model_index.json through LTX2Pipeline.save_config),
then `sync`s. Then the runs of --sequence, in order, each in fresh processes:

- staged_small / staged_large: `python -m orchestrator.cli generate ...` (the project's pipeline)
  at --small / --large, workers forked from the fork server (LTX2_FORK_SERVER=true); per-stage
  times from job.json, events.log and the worker logs. staged_small_nofork / staged_large_nofork:
  the same with LTX2_FORK_SERVER=false (every worker a fresh `python -m services.<stage>`). Once a
  fork-server run fails, later fork-server runs of the small clip are skipped and the large clip
  runs without the fork server; a failed run prints the tails of its worker logs.
- baseline: one process: LTX2Pipeline.from_pretrained + .to(cuda), the small clip twice (cold =
  first call of a fresh process, warm = the second call; only the cold one if `phases` holds
  baseline_cold_only), then the large clip once if `phases` holds baseline_large and time is left.
- imports: import times of torch / transformers / diffusers in two fresh interpreters.

--plan picks --phases / --sequence (and the small-clip timeout) unless they are given:
  v1   (default) build,baseline_large / staged_small,baseline,staged_large: docs/benchmarks.md version 1
  fork build,baseline_cold_only / staged_small,baseline,staged_small,staged_small_nofork,staged_large:
       the fork server's measurement (version 2), about 480 s after the wheels are installed

Every run writes into DIR/results.json as soon as it ends; the last thing printed is a table.
`--scale smoke` runs the same code with the real component configs but 1 transformer / 1 Gemma
layer (for a CPU check with small clips); `--scale tiny` uses the project's tiny model.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # first thing: process start + interpreter + imports are measured from here

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1 << 30
PROMPT = (
    "A slow dolly-in through a rain-soaked alley at night, neon signs reflecting in puddles, "
    "steam rising from a grate while distant thunder rolls and rain patters on metal roofs."
)
SEED = 1
FPS = 24.0
STEPS = 8
MAX_SEQUENCE_LENGTH = 1024  # services.guidance.MAX_SEQUENCE_LENGTH; the connectors emit this many tokens
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
# Parameter counts the brief expects at full size (checked to 1%).
EXPECTED_PARAMS = {"transformer": 18.876e9, "text_encoder": 12.19e9, "connectors": 1.431e9, "vae": 1.222e9}
# Save order: largest first, so a full disk shows up before minutes are spent on the small parts.
COMPONENTS = ("transformer", "text_encoder", "connectors", "vae", "audio_vae", "vocoder")
CLASS_NAMES = {
    "transformer": ("diffusers", "LTX2VideoTransformer3DModel"),
    "text_encoder": ("transformers", "Gemma3ForConditionalGeneration"),
    "connectors": ("ltx2", "LTX2TextConnectors"),
    "vae": ("diffusers", "AutoencoderKLLTX2Video"),
    "audio_vae": ("diffusers", "AutoencoderKLLTX2Audio"),
    "vocoder": ("ltx2", "LTX2Vocoder"),
}


def log(message: str) -> None:
    sys.stdout.write(f"[bench {time.time() - T_PROCESS:7.1f}s] {message}\n")
    sys.stdout.flush()


def write_json(path: Path, data: Any) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    temp.replace(path)


def scaled_configs(scale: str, te_layers: int | None = None) -> dict[str, dict[str, Any]]:
    """Component configs for a scale; `te_layers` overrides the Gemma layer count (storage fallback)."""
    text = dict(GEMMA_TEXT_CONFIG)
    transformer = dict(TRANSFORMER_CONFIG)
    connectors = dict(CONNECTORS_CONFIG)
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
    return {
        "transformer": transformer,
        "connectors": connectors,
        "vae": dict(VAE_CONFIG),
        "audio_vae": dict(AUDIO_VAE_CONFIG),
        "vocoder": dict(VOCODER_CONFIG),
        "text": text,
    }


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


# ---------------------------------------------------------------------------------------------
# Storage: where the ~68 GB of bf16 weights can go.
# ---------------------------------------------------------------------------------------------
def mounts() -> list[tuple[str, str]]:
    try:
        rows = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return []
    return [(row[1], row[2]) for row in rows if len(row) >= 3]


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    resolved = str(path.resolve())
    for mount_point, fstype in mounts():
        if (resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(
            best
        ):
            best, kind = mount_point, fstype
    return kind


def fs_free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def storage_report() -> dict[str, Any]:
    report = {}
    for name in ("/", "/tmp", "/dev/shm", "/var/tmp", "/root", "/mnt"):
        path = Path(name)
        if path.is_dir():
            try:
                report[name] = {"free_gib": round(fs_free(path) / GIB, 2), "fstype": fs_type(path)}
            except OSError as exc:
                report[name] = {"error": str(exc)}
    return report


ROOT_CANDIDATES = ("/tmp", "/var/tmp", "/root", "/home", "/opt", "/srv", "/mnt", "/workspace", "/data", "/scratch")
# bf16 bytes of the full-size LTX-2.0 folder (33.83 B parameters), for choosing where it goes.
FULL_MODEL_BYTES = 67.7e9


def choose_root(requested: str, name: str = "ltx2-full") -> Path:
    """`auto`: a finished folder from an earlier call on this machine, else the writable
    non-tmpfs folder with the most free space (a tmpfs would hold ~68 GB of weights in RAM)."""
    if requested != "auto":
        return Path(requested)
    usable = []
    for candidate in ROOT_CANDIDATES:
        folder = Path(candidate)
        if (folder / name / "BUILD_OK").is_file():
            return folder / name
        if folder.is_dir() and os.access(folder, os.W_OK) and fs_type(folder) not in ("tmpfs", "ramfs", "overlay-ro"):
            try:
                usable.append((fs_free(folder), candidate))
            except OSError:
                continue
    best = max(usable) if usable else (0, "/tmp")
    return Path(best[1]) / name


def mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def ram_dir(needed: int) -> Path | None:
    """A tmpfs folder with room for `needed` bytes: /dev/shm, else a tmpfs we mount (root only)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and fs_type(shm) == "tmpfs" and fs_free(shm) >= needed + GIB:
        path = shm / "ltx2-bench"
        path.mkdir(exist_ok=True)
        return path
    target = Path("/mnt/ltx2-bench-ram")
    if os.geteuid() != 0:
        return None
    target.mkdir(parents=True, exist_ok=True)
    if fs_type(target) != "tmpfs":
        size_gib = int(needed / GIB) + 2
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_gib}g", "tmpfs", str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            log(f"could not mount a tmpfs: {result.stderr.strip()}")
            return None
    return target if fs_free(target) >= needed else None


def plan_storage(
    root: Path, sizes: dict[str, int], te_fixed: int, te_per_layer: int, te_layers: int, host_ram: int
) -> dict[str, Any]:
    """Place each component on the disk holding `root` or, if that is full, on a tmpfs.

    A tmpfs holds its files in RAM, and the single-process baseline holds every component in host
    memory once while loading (~63 GiB at full size), so at most host_ram - 80 GiB goes there.
    When even that is too little, the text encoder gets fewer layers (a recorded deviation).
    """
    margin = 3 * GIB
    disk_free = fs_free(root) - margin
    ram_budget = max(0, host_ram - 80 * GIB)
    if fs_type(root) == "tmpfs":
        ram_budget, disk_free = 0, min(disk_free, max(0, host_ram - 80 * GIB))
    placement: dict[str, str] = {}
    disk_left, ram_left = disk_free, ram_budget
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        if sizes[name] <= disk_left:
            placement[name], disk_left = "disk", disk_left - sizes[name]
        elif sizes[name] <= ram_left:
            placement[name], ram_left = "ram", ram_left - sizes[name]
        else:
            placement[name] = "none"
    layers = te_layers
    if placement.get("text_encoder") == "none":
        room = max(disk_left, ram_left)
        layers = max(0, min(te_layers, (room - te_fixed) // te_per_layer)) if room > te_fixed else 0
        where = "disk" if disk_left >= ram_left else "ram"
        placement["text_encoder"] = where if layers >= 1 else "none"
    missing = [name for name, where in placement.items() if where == "none"]
    return {
        "placement": placement,
        "text_encoder_layers": layers,
        "disk_free_bytes": disk_free + margin,
        "ram_budget_bytes": ram_budget,
        "missing": missing,
    }


# ---------------------------------------------------------------------------------------------
# build: random full-size weights on the accelerator, saved as a diffusers folder
# ---------------------------------------------------------------------------------------------
def measure_matmul(torch: Any) -> dict[str, Any]:
    """The bf16 matmul ceiling of this card (8192^3, random data, median of 20 with CUDA events)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    median = times[len(times) // 2]
    return {"n": n, "median_s": median, "tflops": 2 * n**3 / median / 1e12}


def count_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def component_factories(cfgs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    def text_encoder() -> Any:
        config = Gemma3Config(text_config=cfgs["text"], vision_config=dict(GEMMA_VISION_CONFIG), **GEMMA_MM)
        return Gemma3ForConditionalGeneration(config)

    return {
        "transformer": lambda: LTX2VideoTransformer3DModel(**cfgs["transformer"]),
        "text_encoder": text_encoder,
        "connectors": lambda: LTX2TextConnectors(**cfgs["connectors"]),
        "vae": lambda: AutoencoderKLLTX2Video(**cfgs["vae"]),
        "audio_vae": lambda: AutoencoderKLLTX2Audio(**cfgs["audio_vae"]),
        "vocoder": lambda: LTX2Vocoder(**cfgs["vocoder"]),
    }


def meta_param_counts(cfgs: dict[str, dict[str, Any]]) -> dict[str, int]:
    import torch

    counts = {}
    with torch.device("meta"):
        for name, make in component_factories(cfgs).items():
            counts[name] = count_params(make())
    return counts


def cmd_build(args: argparse.Namespace) -> int:  # noqa: PLR0912, PLR0915 - one linear script
    import torch

    root = Path(args.root)
    info: dict[str, Any] = {"scale": args.scale, "root": str(root), "t_start": T_PROCESS}
    result_path = Path(args.result)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["matmul"] = measure_matmul(torch)
        log(f"bf16 matmul 8192^3: {info['matmul']['tflops']:.0f} TFLOP/s")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    if args.scale == "tiny":
        from services.tiny_model import write_tiny_model

        t0 = time.time()
        write_tiny_model(root)
        info["build_s"] = time.time() - t0
        info["text_encoder_layers"] = 2
        (root / "BUILD_OK").write_text(json.dumps(info))
        write_json(result_path, info)
        return 0

    import diffusers
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    from services.tiny_model import build_tokenizer

    info["versions"] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    full_layers = scaled_configs(args.scale)["text"]["num_hidden_layers"]
    counts = meta_param_counts(scaled_configs(args.scale))
    te1 = meta_param_counts(scaled_configs(args.scale, te_layers=1))["text_encoder"]
    te2 = meta_param_counts(scaled_configs(args.scale, te_layers=2))["text_encoder"]
    te_per_layer, te_fixed = (te2 - te1) * 2, (te1 - (te2 - te1)) * 2
    sizes = {name: n * 2 for name, n in counts.items()}  # bf16
    info["param_counts"] = counts
    info["bytes_bf16"] = sizes
    host_ram = int(args.host_ram_gib * GIB) if args.host_ram_gib else mem_total_bytes()
    plan = plan_storage(root, sizes, te_fixed, te_per_layer, full_layers, host_ram)
    info["storage"] = {"plan": plan, "report": storage_report(), "host_ram_bytes": host_ram}
    log(f"storage plan: {plan}")
    if plan["missing"]:
        info["error"] = f"no room for {plan['missing']}"
        write_json(result_path, info)
        log(info["error"])
        return 5
    te_layers = plan["text_encoder_layers"]
    info["text_encoder_layers"] = te_layers
    if te_layers != full_layers:
        info["deviation"] = (
            f"text encoder saved with {te_layers} of {full_layers} Gemma layers (no room for the full "
            f"{sizes['text_encoder'] / 1e9:.1f} GB); connectors text_proj_in_factor = {te_layers + 1}"
        )
        log(info["deviation"])
    cfgs = scaled_configs(args.scale, te_layers=te_layers)
    needs_ram = [n for n, w in plan["placement"].items() if w == "ram"]
    ram_root = ram_dir(sum(sizes[n] for n in needs_ram) + GIB) if needs_ram else None
    if needs_ram and ram_root is None:
        info["error"] = "no tmpfs for the components that do not fit on disk"
        write_json(result_path, info)
        return 5

    factories = component_factories(cfgs)
    info["components"] = {}
    torch.set_default_dtype(torch.bfloat16)
    for name in COMPONENTS:
        target = root / name
        if plan["placement"][name] == "ram":
            real = ram_root / name
            real.mkdir(parents=True, exist_ok=True)
            target.symlink_to(real, target_is_directory=True)
        record: dict[str, Any] = {"where": plan["placement"][name], "path": str(target.resolve())}
        t0 = time.time()
        torch.manual_seed(0)
        with torch.device(device), torch.no_grad():
            model = factories[name]()
        model = model.to(torch.bfloat16).eval()
        if cuda:
            torch.cuda.synchronize()
        record["build_s"] = time.time() - t0
        record["params"] = count_params(model)
        if args.scale == "full" and name in EXPECTED_PARAMS and te_layers == full_layers:
            expected = EXPECTED_PARAMS[name]
            record["params_ok"] = abs(record["params"] - expected) / expected < 0.01
        if name == "vae":
            record["compression"] = [model.spatial_compression_ratio, model.temporal_compression_ratio]
        t0 = time.time()
        model.save_pretrained(target, max_shard_size="5GB")
        record["save_s"] = time.time() - t0
        record["bytes"] = sum(f.stat().st_size for f in Path(record["path"]).rglob("*") if f.is_file())
        info["components"][name] = record
        log(
            f"{name}: {record['params'] / 1e9:.3f} B params, built in {record['build_s']:.1f} s, "
            f"saved {record['bytes'] / 1e9:.2f} GB to {record['where']} in {record['save_s']:.1f} s"
        )
        del model
        if cuda:
            torch.cuda.empty_cache()
        write_json(result_path, info)
    torch.set_default_dtype(torch.float32)

    t0 = time.time()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    scheduler.save_pretrained(root / "scheduler")
    tokenizer = build_tokenizer()  # ids < 512 < Gemma's vocabulary: any id is a valid embedding row
    tokenizer.save_pretrained(root / "tokenizer")
    # model_index.json exactly as LTX2Pipeline.save_pretrained writes it, from weightless shells.
    with torch.device("meta"):
        shells = {name: make() for name, make in component_factories(cfgs).items()}
    pipe = LTX2Pipeline(scheduler=scheduler, tokenizer=tokenizer, **shells)
    pipe.save_config(root)
    index = json.loads((root / "model_index.json").read_text())
    for name, expected in CLASS_NAMES.items():
        if list(index.get(name, [])) != list(expected):
            raise RuntimeError(f"model_index.json records {name} as {index.get(name)}, expected {expected}")
    info["index_s"] = time.time() - t0
    t0 = time.time()
    os.sync()
    info["sync_s"] = time.time() - t0
    info["total_bytes"] = sum(c["bytes"] for c in info["components"].values())
    info["build_total_s"] = time.time() - T_PROCESS
    info["storage"]["after"] = storage_report()
    (root / "BUILD_OK").write_text(json.dumps(info, default=str))
    write_json(result_path, info)
    log(f"model folder complete: {info['total_bytes'] / 1e9:.1f} GB, sync {info['sync_s']:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------
# baseline: diffusers LTX2Pipeline in one process
# ---------------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int, int]:
    width, height, frames = (int(v) for v in text.lower().split("x"))
    return width, height, frames


def size_label(size: tuple[int, int, int]) -> str:
    return "x".join(str(v) for v in size)


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cmd_baseline(args: argparse.Namespace) -> int:  # noqa: PLR0915 - one linear script
    """Load once, then one clip per entry of --runs; results appended to --result after each."""
    spawned = float(os.environ.get("BENCH_SPAWN_T", T_PROCESS))
    result_path = Path(args.result)
    res: dict[str, Any] = {"spawn_t": spawned, "process_t": T_PROCESS, "interpreter_start_s": T_PROCESS - spawned}
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline
    from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES
    from diffusers.utils import encode_video

    from services.guidance import pinned_guidance

    t_imported = time.time()
    res["import_s"] = t_imported - T_PROCESS
    res["start_import_s"] = t_imported - spawned
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    pipe = LTX2Pipeline.from_pretrained(args.root, torch_dtype=torch.bfloat16)
    t_cpu = time.time()
    pipe.to(device)
    sync()
    t_loaded = time.time()
    res["load_from_pretrained_s"] = t_cpu - t_imported
    res["load_to_device_s"] = t_loaded - t_cpu
    res["load_s"] = t_loaded - t_imported
    res["rss_after_load"] = rss_peak()
    if cuda:
        res["gpu_after_load_bytes"] = torch.cuda.memory_allocated()
        res["gpu_name"] = torch.cuda.get_device_name(0)
    res["transformer_config"] = dict(pipe.transformer.config)
    res["text_encoder_layers"] = pipe.text_encoder.config.text_config.num_hidden_layers
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False, shift_terminal=None
    )
    pipe.set_progress_bar_config(disable=True)
    marks: dict[str, float] = {}
    calls: list[tuple[Any, Any]] = []
    host_calls: list[float] = []

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            sync()
            t0 = time.time()
            out = fn(*a, **k)
            sync()
            marks[name] = marks.get(name, 0.0) + time.time() - t0
            marks[name + "_end"] = time.time()
            return out

        return wrapper

    pipe.encode_prompt = timed("text_encode", pipe.encode_prompt)
    pipe.vae.decode = timed("vae_decode", pipe.vae.decode)
    pipe.audio_vae.decode = timed("audio_vae_decode", pipe.audio_vae.decode)

    def hook_pair(module: Any, name: str) -> None:
        def pre(_m: Any, _a: Any) -> None:
            sync()
            marks[name + "_t0"] = time.time()

        def post(_m: Any, _a: Any, _o: Any) -> None:
            sync()
            marks[name] = marks.get(name, 0.0) + time.time() - marks[name + "_t0"]
            marks[name + "_end"] = time.time()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    hook_pair(pipe.connectors, "connectors")
    hook_pair(pipe.vocoder, "vocoder")

    def t_pre(_m: Any, _a: Any) -> None:
        host_calls.append(time.time())
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            calls.append((start, None))

    def t_post(_m: Any, _a: Any, _o: Any) -> None:
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            calls[-1] = (calls[-1][0], end)

    pipe.transformer.register_forward_pre_hook(t_pre)
    pipe.transformer.register_forward_hook(t_post)
    res["runs"] = []
    write_json(result_path, res)
    steps: list[float] = []  # end of each denoising step (synchronized), refilled per run

    for index, spec in enumerate(args.runs.split(",")):
        size_text, _, label = spec.partition(":")
        width, height, frames = parse_size(size_text)
        if index > 0 and time.time() + estimate_run_s(res, (width, height, frames)) > args.deadline:
            res["runs"].append({"label": label, "size": size_text, "skipped": "not enough time left"})
            write_json(result_path, res)
            continue
        tiled = width * height * frames > 1280 * 720 * 121
        if tiled:  # a single-pass 1080p x 161 decode hits PyTorch's 32-bit index limit
            pipe.vae.enable_tiling(
                tile_sample_min_height=512, tile_sample_min_width=512,
                tile_sample_stride_height=384, tile_sample_stride_width=384,
            )  # fmt: skip
        else:
            pipe.vae.disable_tiling()
        marks.clear()
        calls.clear()
        host_calls.clear()
        steps.clear()

        def on_step(_p: Any, _i: int, _t: Any, _k: dict[str, Any]) -> dict[str, Any]:
            sync()
            steps.append(time.time())
            return {}

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        generator = torch.Generator(device=device).manual_seed(SEED)
        sync()
        t_call = time.time()
        with torch.no_grad():
            video, audio = pipe(
                prompt=PROMPT,
                negative_prompt="",
                width=width,
                height=height,
                num_frames=frames,
                frame_rate=FPS,
                num_inference_steps=STEPS,
                sigmas=list(DISTILLED_SIGMA_VALUES),
                generator=generator,
                output_type="np",
                return_dict=False,
                callback_on_step_end=on_step,
                **pinned_guidance(1.0),
            )
        sync()
        t_pipe = time.time()
        mp4 = Path(args.work) / f"baseline_{label}_{size_label((width, height, frames))}.mp4"
        encode_video(
            video[0],
            fps=FPS,
            output_path=str(mp4),
            audio=audio[0].float().cpu(),
            audio_sample_rate=pipe.vocoder.config.output_sampling_rate,
        )
        t_mp4 = time.time()
        gpu_call_s = [s.elapsed_time(e) / 1000 for s, e in calls if e is not None] if cuda else []
        denoise_start = marks.get("connectors_end", t_call)
        run = {
            "label": label,
            "size": size_text,
            "tiled_decode": tiled,
            "t_call": t_call,
            "t_mp4": t_mp4,
            "call_s": t_pipe - t_call,
            "text_encode_s": marks.get("text_encode"),
            "connectors_s": marks.get("connectors"),
            "denoise_s": steps[-1] - denoise_start if steps else None,
            "step_ends": list(steps),
            "first_step_s": steps[0] - denoise_start if steps else None,
            "s_per_step": (steps[-1] - denoise_start) / len(steps) if steps else None,
            "s_per_step_steady": (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else None,
            "transformer_calls": len(host_calls),
            "transformer_gpu_s": gpu_call_s,
            "vae_decode_s": marks.get("vae_decode"),
            "audio_vae_decode_s": marks.get("audio_vae_decode"),
            "vocoder_s": marks.get("vocoder"),
            "postprocess_and_rest_s": (t_pipe - t_call)
            - sum(marks.get(k) or 0 for k in ("text_encode", "connectors", "vae_decode", "audio_vae_decode", "vocoder"))
            - ((steps[-1] - denoise_start) if steps else 0),
            "mp4_encode_s": t_mp4 - t_pipe,
            "mp4": str(mp4),
            "mp4_bytes": mp4.stat().st_size,
            "frames_shape": list(video.shape),
            "audio_shape": list(audio.shape),
            "peak_gpu_alloc_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
            "rss_peak_bytes": rss_peak(),
        }
        if index == 0:
            run["cold_total_s"] = t_mp4 - spawned
        del video, audio
        res["runs"].append(run)
        write_json(result_path, res)
        log(
            f"baseline {label} {size_text}: call {run['call_s']:.1f} s, {run['s_per_step']:.3f} s/step, "
            f"mp4 {run['mp4_encode_s']:.1f} s, peak GPU {run['peak_gpu_alloc_bytes'] / GIB:.1f} GiB"
        )
    return 0


def estimate_run_s(res: dict[str, Any], size: tuple[int, int, int]) -> float:
    """Seconds the next run may take, scaled from the first run by transformer FLOPs (+ slack)."""
    done = [r for r in res["runs"] if r.get("s_per_step")]
    if not done:
        return 60.0
    first = done[-1]
    cfg = res["transformer_config"]
    f_done = transformer_flops(cfg, *parse_size(first["size"]), MAX_SEQUENCE_LENGTH)["flops"]
    f_next = transformer_flops(cfg, *size, MAX_SEQUENCE_LENGTH)["flops"]
    pixels = size[0] * size[1] * size[2] / max(1, eval_pixels(first["size"]))
    rest = first["call_s"] - first["denoise_s"] + first["mp4_encode_s"]
    return STEPS * first["s_per_step"] * f_next / f_done + rest * pixels * 1.5 + 30


def eval_pixels(size_text: str) -> int:
    w, h, n = parse_size(size_text)
    return w * h * n


# ---------------------------------------------------------------------------------------------
# staged: the project's CLI, then its job directory
# ---------------------------------------------------------------------------------------------
WORKER_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ltx2\.worker (\w+): (.*) (\d+)/(\d+)\s*$")


def parse_worker_log(path: Path) -> list[tuple[float, str, int, int]]:
    """(epoch, phase, step, total) of every progress line of a worker log (asctime is local time)."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(errors="replace").splitlines():
        match = WORKER_LINE.match(line)
        if match:
            stamp = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            rows.append((stamp, match.group(3), int(match.group(4)), int(match.group(5))))
    return rows


def iso(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def first(rows: list[tuple[float, str, int, int]], prefix: str, step: int | None = None) -> float | None:
    for stamp, phase, i, _n in rows:
        if phase.startswith(prefix) and (step is None or i == step):
            return stamp
    return None


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def summarize_job(job_dir: Path, spawned: float, exited: float) -> dict[str, Any]:
    job = json.loads((job_dir / "job.json").read_text())
    events = [json.loads(line) for line in (job_dir / "events.log").read_text().splitlines() if line.strip()]
    started = {e["stage"]: iso(e["t"]) for e in events if e["event"] == "stage_started"}
    finished = {e["stage"]: iso(e["t"]) for e in events if e["event"] == "stage_finished"}
    done = next((iso(e["t"]) for e in events if e["event"] == "job_done"), None)
    out: dict[str, Any] = {
        "job_id": job["id"],
        "status": job["status"],
        "cli_wall_s": exited - spawned,
        "cli_start_to_job_created_s": iso(job["created"]) - spawned,
        "stages": {},
        "events": events,
    }
    for stage, record in job["stages"].items():
        attempts = record.get("attempts", [])
        last = attempts[-1] if attempts else {}
        logs = sorted((job_dir / "logs").glob(f"{stage}-*.log"))
        rows = parse_worker_log(logs[-1]) if logs else []
        entry: dict[str, Any] = {
            "attempts": len(attempts),
            "result": last.get("result"),
            "reason": last.get("reason"),
            "all_attempts": [{k: a.get(k) for k in ("attempt", "result", "reason", "seconds")} for a in attempts],
            "plan": last.get("plan"),
            "seconds": last.get("seconds"),
            "peak_gpu_bytes": last.get("peak_gpu_bytes"),
            "peak_rss_bytes": last.get("peak_rss_bytes"),
            "started": started.get(stage),
            "finished": finished.get(stage),
            "progress": rows,
        }
        if stage == "encode_diffuse":
            t_te = first(rows, "load text encoder")
            t_enc = first(rows, "encode prompt")
            t_tr = first(rows, "load transformer")
            t_d0 = first(rows, "denoise", 0)
            t_d1 = first(rows, "denoise", 1)
            t_dn = first(rows, "denoise", STEPS)
            t_w = first(rows, "write latents")
            entry.update(
                start_import_handshake_s=diff(started.get(stage), t_te),
                text_encoder_load_s=diff(t_te, t_enc),
                text_encode_s=diff(t_enc, t_tr),
                transformer_load_s=diff(t_tr, t_d0),
                denoise_s=diff(t_d0, t_w),
                s_per_step=(diff(t_d0, t_w) or 0) / STEPS if t_w and t_d0 else None,
                s_per_step_steady=(diff(t_d1, t_dn) or 0) / (STEPS - 1) if t_dn and t_d1 else None,
                first_step_s=diff(t_d0, t_d1),
                write_latents_and_exit_s=diff(t_w, finished.get(stage)),
            )
        elif stage == "audio_decode":
            t_load = first(rows, "load audio decoder")
            t0, t1 = first(rows, "decode audio", 0), first(rows, "decode audio", 1)
            entry.update(
                until_load_s=diff(started.get(stage), t_load),
                load_s=diff(t_load, t0),
                decode_s=diff(t0, t1),
                write_wav_and_exit_s=diff(t1, finished.get(stage)),
            )
        elif stage == "video_decode":
            t_load = first(rows, "load video VAE")
            t0 = first(rows, "decode video", 0)
            entry.update(
                until_load_s=diff(started.get(stage), t_load),
                load_s=diff(t_load, t0),
                decode_and_encode_s=diff(t0, finished.get(stage)),
            )
        out["stages"][stage] = entry
    out["publish_s"] = diff(finished.get("video_decode"), done)
    out["output"] = job.get("output")
    return out


def worker_pids(job_root: Path) -> dict[int, str]:
    """pid -> command line of the processes of one staged run: exec'd workers name a job directory
    under `job_root` on their command line; the fork server and its forked workers (and the CLI)
    carry LTX2_STATE_DIR=`job_root` in their environment."""
    pids = {}
    marker = f"LTX2_STATE_DIR={job_root}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (str(job_root) in cmdline and "services." in cmdline) or marker in environ:
            pids[int(proc.name)] = cmdline.strip()
    return pids


def kill_pids(pids: dict[int, str]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_staged(  # noqa: PLR0912 - one linear run
    size: tuple[int, int, int], args: argparse.Namespace, timeout_s: float, work: Path, fork_server: bool = True
) -> dict[str, Any]:
    label = size_label(size)
    suffix = "" if fork_server else "-nofork"
    state = work / f"state-{label}{suffix}"
    outputs = work / f"outputs-{label}{suffix}"
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(outputs, ignore_errors=True)  # mp4_check then sees this run's MP4 alone
    env = {
        **os.environ,
        "LTX2_STATE_DIR": str(state),
        "LTX2_OUTPUT_DIR": str(outputs),
        "LTX2_FORK_SERVER": "true" if fork_server else "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if args.profile:
        env["LTX2_PROFILE"] = args.profile
    command = [
        sys.executable, "-m", "orchestrator.cli", "generate", "--model", args.root, "--prompt", PROMPT,
        "--width", str(size[0]), "--height", str(size[1]), "--num-frames", str(size[2]),
        "--steps", str(STEPS), "--schedule", "distilled", "--seed", str(SEED), "--quiet",
    ]  # fmt: skip
    if args.staged_dtype:
        command += ["--dtype", args.staged_dtype]
    log(
        f"staged {label}{suffix} (LTX2_FORK_SERVER={env['LTX2_FORK_SERVER']}): {' '.join(command[:4])} ... "
        f"(timeout {timeout_s:.0f} s)"
    )
    spawned = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        process.kill()
        kill_pids(worker_pids(state))
        stdout, stderr = process.communicate()
    exited = time.time()
    # Nothing of the run may outlive the CLI for long: the fork server ends on EOF, workers exit.
    leftover: dict[int, str] = {}
    for _ in range(20):
        leftover = worker_pids(state)
        if not leftover:
            break
        time.sleep(0.25)
    if leftover:
        log(f"staged {label}{suffix}: processes left after the CLI exited (killed): {leftover}")
        kill_pids(leftover)
    result: dict[str, Any] = {
        "size": label,
        "fork_server": fork_server,
        "returncode": process.returncode,
        "timed_out": timed_out,
        "leftover_processes": {str(k): v for k, v in leftover.items()},
        "stdout": stdout[-2000:],
        "stderr_tail": stderr[-3000:],
        "spawn_t": spawned,
        "exit_t": exited,
        "children_maxrss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }
    jobs = sorted((state / "jobs").glob("*")) if (state / "jobs").is_dir() else []
    if jobs:
        try:
            result.update(summarize_job(jobs[-1], spawned, exited))
        except (OSError, ValueError, KeyError) as exc:
            result["parse_error"] = repr(exc)
        logs = {}
        for path in sorted((jobs[-1] / "logs").glob("*.log")):
            text = path.read_text(errors="replace")
            logs[path.name] = text[-6000:]
        result["worker_logs_tail"] = logs
    mp4 = outputs.glob("*.mp4")
    result["mp4"] = [str(p) for p in mp4]
    if process.returncode != 0 or timed_out:
        print_failure(f"staged {label}{suffix}", result)
    return result


def print_failure(name: str, result: dict[str, Any]) -> None:
    """A failed staged run: the CLI's stderr (the fork server's too), attempts and worker-log tails."""
    lines = [f"---- {name} FAILED: rc {result.get('returncode')}, timed out {result.get('timed_out')}"]
    lines.append("-- CLI stderr (tail):")
    lines.append(result.get("stderr_tail", "")[-2500:])
    for stage, entry in result.get("stages", {}).items():
        lines.append(f"-- {stage}: attempts {entry.get('attempts')}, last result {entry.get('result')!r}, "
                     f"reason {entry.get('reason')!r}")  # fmt: skip
    for name_, text in result.get("worker_logs_tail", {}).items():
        lines.append(f"-- worker log {name_} (tail):")
        lines.append(text[-2500:])
    if result.get("parse_error"):
        lines.append(f"-- job directory not parsed: {result['parse_error']}")
    lines.append("---- end of failure report")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# all: the whole benchmark in one process tree
# ---------------------------------------------------------------------------------------------
class GpuSampler:
    """nvidia-smi memory.used every 250 ms (device memory as the driver sees it, all processes)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        if not shutil.which("nvidia-smi"):
            return
        self.process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "250"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.samples.append((time.time(), int(line.strip().split(",")[0])))
            except ValueError:
                continue

    def peak_mib(self, t0: float | None, t1: float | None) -> int | None:
        if t0 is None or t1 is None:
            return None
        window = [mib for t, mib in self.samples if t0 <= t <= t1]
        return max(window) if window else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()


def probe_environment() -> dict[str, Any]:
    env: dict[str, Any] = {"date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "nproc": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        query = "name,memory.total,driver_version,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, check=False
        )
        env["nvidia_smi"] = out.stdout.strip()
    versions = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json,sys,torch,diffusers,transformers,av,zmq;print(json.dumps({'python':sys.version.split()[0],"
            "'torch':torch.__version__,'cuda':torch.version.cuda,'diffusers':diffusers.__version__,"
            "'transformers':transformers.__version__,'av':av.__version__,'pyzmq':zmq.__version__,"
            "'gpu':torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        env["versions"] = json.loads(versions.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        env["versions_error"] = versions.stderr[-2000:]
    env["mem_total_bytes"] = mem_total_bytes()
    env["storage"] = storage_report()
    env["git_head"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    return env


def run_child(command: list[str], timeout_s: float, log_path: Path) -> tuple[int, float, float, bool]:
    """Run a sub-command of this script; output appended to log_path and echoed; kill at timeout."""
    spawned = time.time()
    env = {**os.environ, "BENCH_SPAWN_T": repr(spawned), "PYTHONUNBUFFERED": "1"}
    with log_path.open("a") as handle:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        timed_out = False

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                handle.write(line)
                handle.flush()
                if line.startswith("[bench") or "Error" in line or "error:" in line:
                    sys.stdout.write("    | " + line[-400:])
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=5)
    return process.returncode, spawned, time.time(), timed_out


def cmd_all(args: argparse.Namespace) -> int:  # noqa: PLR0912, PLR0915 - one linear script
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    deadline = T_PROCESS + args.budget_s
    results_path = out / "results.json"
    child_log = out / "children.log"
    results: dict[str, Any] = {"args": vars(args), "phases": {}}
    sampler = GpuSampler()
    sampler.start()

    def save() -> None:
        results["gpu_samples_mib"] = sampler.samples[::4]
        write_json(results_path, results)

    def left() -> float:
        return deadline - time.time()

    # The versions probe (a fresh interpreter importing torch + diffusers) runs beside the build.
    probe = threading.Thread(target=lambda: results.__setitem__("environment", probe_environment()), daemon=True)
    probe.start()
    results["environment"] = {}

    def probe_done() -> None:
        probe.join()
        log(f"environment: {json.dumps(results['environment'])}")
        save()

    phases = set(args.phases.split(","))
    root = choose_root(args.root)
    args.root = str(root)
    results["root"] = str(root)
    log(f"model folder: {root} ({fs_type(root.parent)}, {fs_free(root.parent) / 1e9:.1f} GB free)")
    small, large = parse_size(args.small), parse_size(args.large)

    # 1. build (skipped when a finished folder of the same scale is already there: a warm machine)
    marker = root / "BUILD_OK"
    build_file = work / "build.json"
    reuse = marker.is_file() and json.loads(marker.read_text()).get("scale") == args.scale
    if "build" in phases and not reuse:
        rc, t0, t1, timed_out = run_child(
            [sys.executable, __file__, "build", "--root", str(root), "--scale", args.scale, "--result", str(build_file)]
            + (["--host-ram-gib", str(args.host_ram_gib)] if args.host_ram_gib else []),
            min(args.build_timeout_s, left() - 60),
            child_log,
        )
        build = json.loads(build_file.read_text()) if build_file.is_file() else {}
        build.update(returncode=rc, wall_s=t1 - t0, timed_out=timed_out, gpu_peak_mib=sampler.peak_mib(t0, t1))
        results["phases"]["build"] = build
        save()
        if rc != 0 or not marker.is_file():
            log(f"build failed (rc {rc}); see children.log")
            probe_done()
            print_table(results)
            return 1
    elif reuse:
        results["phases"]["build"] = {**json.loads(marker.read_text()), "reused": True}
    probe_done()
    save()

    # 2.. the measured runs, in the order --sequence gives (a repeated name gets the key "name#n")
    seen: dict[str, int] = {}

    def key_for(name: str) -> str:
        seen[name] = seen.get(name, 0) + 1
        return name if seen[name] == 1 else f"{name}#{seen[name]}"

    fork_failed = ""  # set by the first failed fork-server run: later ones are skipped or run without it
    staged_tokens = ("staged_small", "staged_large", "staged_small_nofork", "staged_large_nofork")
    for token in args.sequence.split(","):
        if token == "imports":
            results["phases"][key_for("imports")] = measure_imports()
        elif token in staged_tokens:
            is_small = token.startswith("staged_small")
            fork = not token.endswith("_nofork")
            size = small if is_small else large
            if fork and fork_failed:
                if is_small:
                    results["phases"][key_for(f"staged_{size_label(size)}")] = {"skipped": fork_failed}
                    save()
                    continue
                fork = False  # the large clip still gets measured, the old way
            key = key_for(f"staged_{size_label(size)}" + ("" if fork else "_nofork"))
            need = args.min_small_staged_s if is_small else args.min_large_staged_s
            if left() < need:
                results["phases"][key] = {"skipped": f"only {left():.0f} s left (needs {need:.0f})"}
                save()
                continue
            limit = args.stage_timeout_s if is_small else left() - 15
            staged = run_staged(size, args, min(limit, left() - 30), work, fork_server=fork)
            staged["gpu_peak_mib"] = sampler.peak_mib(staged["spawn_t"], staged["exit_t"])
            staged["mp4_check"] = [check_mp4(Path(mp4)) for mp4 in staged.get("mp4", [])]
            results["phases"][key] = staged
            log(f"{key}: rc {staged['returncode']}, {staged['exit_t'] - staged['spawn_t']:.1f} s")
            if fork and (staged["returncode"] != 0 or staged["timed_out"]) and not fork_failed:
                fork_failed = f"fork-server run {key} failed (rc {staged['returncode']})"
        elif token == "baseline" and left() > 60:
            results["phases"][key_for("baseline")] = run_baseline(args, root, work, deadline, sampler, child_log)
        elif token != "baseline":
            raise SystemExit(f"unknown --sequence entry {token!r}")
        save()

    results["derived"] = derive(results)
    sampler.stop()
    save()
    print_table(results)
    return 0


def run_baseline(
    args: argparse.Namespace, root: Path, work: Path, deadline: float, sampler: GpuSampler, child_log: Path
) -> dict[str, Any]:
    """The single-process baseline in a fresh process: cold + warm small clip (+ the large clip)."""
    base_file = work / "baseline.json"
    base_file.unlink(missing_ok=True)
    phases = set(args.phases.split(","))
    runs = f"{args.small}:cold" + ("" if "baseline_cold_only" in phases else f",{args.small}:warm")
    if "baseline_large" in phases:
        runs += f",{args.large}:large"
    staged_large_left = "staged_large" in args.sequence.split(",")[-1:]
    child_deadline = deadline - (args.reserve_large_staged_s if staged_large_left else 0) - 15
    command = [
        sys.executable, __file__, "baseline", "--root", str(root), "--runs", runs, "--result", str(base_file),
        "--work", str(work), "--deadline", repr(child_deadline),
    ]  # fmt: skip
    rc, t0, t1, timed_out = run_child(command, min(args.stage_timeout_s * 2, deadline - time.time() - 20), child_log)
    base = json.loads(base_file.read_text()) if base_file.is_file() else {}
    base.update(returncode=rc, wall_s=t1 - t0, timed_out=timed_out, gpu_peak_mib=sampler.peak_mib(t0, t1))
    for run in base.get("runs", []):
        if "t_call" in run:
            run["gpu_peak_mib_call"] = sampler.peak_mib(run["t_call"], run["t_mp4"])
            run["mp4_check"] = check_mp4(Path(run["mp4"]))
    return base


IMPORT_PROBE = """
import json, sys, time
t = [time.time()]
import torch
t.append(time.time())
import transformers
t.append(time.time())
from diffusers import LTX2Pipeline
t.append(time.time())
import av, zmq, services.encode_diffuse
t.append(time.time())
names = ["torch", "transformers", "diffusers LTX2Pipeline", "av+zmq+services.encode_diffuse"]
print(json.dumps({n: t[i + 1] - t[i] for i, n in enumerate(names)}))
"""


def measure_imports() -> dict[str, Any]:
    """Where a stage process's start-up goes: import times, twice (the second with warm caches)."""
    result: dict[str, Any] = {}
    for attempt in (1, 2):
        spawned = time.time()
        out = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE], cwd=REPO, capture_output=True, text=True, check=False
        )
        try:
            result[f"run{attempt}"] = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result[f"run{attempt}"] = {"error": out.stderr[-1000:]}
        result[f"run{attempt}"]["process_wall_s"] = time.time() - spawned
    log(f"import times: {result}")
    return result


def check_mp4(path: Path) -> dict[str, Any]:
    try:
        import av

        with av.open(str(path)) as container:
            video = container.streams.video[0]
            audio = container.streams.audio[0] if container.streams.audio else None
            return {
                "frames": video.frames,
                "size": [video.codec_context.width, video.codec_context.height],
                "codec": video.codec_context.name,
                "audio": None if audio is None else [audio.codec_context.name, audio.rate],
                "bytes": path.stat().st_size,
            }
    except Exception as exc:  # noqa: BLE001 - a report, not a test
        return {"error": repr(exc)}


# ---------------------------------------------------------------------------------------------
# derived numbers and the table
# ---------------------------------------------------------------------------------------------
def peak_flops(gpu: str) -> float | None:
    for key, value in DATASHEET_BF16_FLOPS.items():
        if key in gpu:
            return value
    return None


def derive(results: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0912 - one report
    phases = results["phases"]
    base = phases.get("baseline", {})
    derived: dict[str, Any] = {}
    cfg = base.get("transformer_config")
    config_file = Path(results.get("root", "")) / "transformer" / "config.json"
    if not cfg and config_file.is_file():
        cfg = json.loads(config_file.read_text())
    gpu = results["environment"].get("versions", {}).get("gpu", "")
    peak = peak_flops(gpu)
    matmul = phases.get("build", {}).get("matmul", {}).get("tflops")
    if cfg:
        for run in base.get("runs", []):
            if not run.get("s_per_step"):
                continue
            flops = transformer_flops(cfg, *parse_size(run["size"]), MAX_SEQUENCE_LENGTH)
            gpu_times = sorted(run.get("transformer_gpu_s") or [])
            median_call = gpu_times[len(gpu_times) // 2] if gpu_times else None
            entry = {
                **flops,
                "s_per_step": run["s_per_step"],
                "transformer_gpu_median_s": median_call,
                "achieved_tflops_step": flops["flops"] / run["s_per_step"] / 1e12,
            }
            if median_call:
                entry["achieved_tflops_transformer"] = flops["flops"] / median_call / 1e12
            if peak:
                entry["mfu_step_vs_datasheet"] = flops["flops"] / run["s_per_step"] / peak
                if median_call:
                    entry["mfu_transformer_vs_datasheet"] = flops["flops"] / median_call / peak
            if matmul:
                entry["mfu_step_vs_measured_matmul"] = flops["flops"] / run["s_per_step"] / (matmul * 1e12)
            derived[f"baseline_{run['label']}"] = entry
        for name, phase in phases.items():
            if name.startswith("staged_") and phase.get("stages"):
                step = phase["stages"]["encode_diffuse"].get("s_per_step")
                if step:
                    flops = transformer_flops(cfg, *parse_size(phase["size"]), MAX_SEQUENCE_LENGTH)["flops"]
                    derived[name] = {"achieved_tflops_step": flops / step / 1e12}
                    if peak:
                        derived[name]["mfu_step_vs_datasheet"] = flops / step / peak
    runs = {r.get("label"): r for r in base.get("runs", [])}
    small = results["args"]["small"]
    # Fork-server runs (every run before the fork server existed counts as one: no "fork_server" key).
    staged_small = next(
        (
            p
            for n, p in phases.items()
            if n.startswith("staged_") and p.get("size") == small and p.get("fork_server", True)
        ),
        None,
    )
    base_cold = runs.get("cold", {}).get("cold_total_s")
    if staged_small and staged_small.get("returncode") == 0 and base_cold:
        derived["staged_over_baseline_cold"] = staged_small["cli_wall_s"] / base_cold
    if base_cold:  # every staged small-clip run against the (first) baseline process's cold call
        derived["staged_over_baseline_cold_each"] = {
            n: p["cli_wall_s"] / base_cold
            for n, p in phases.items()
            if n.startswith("staged_") and p.get("size") == small and p.get("returncode") == 0
        }
    staged_walls = [
        p["cli_wall_s"]
        for n, p in phases.items()
        if n.startswith(f"staged_{small}") and p.get("returncode") == 0 and p.get("fork_server", True)
    ]
    base_walls = [
        r["cold_total_s"]
        for n, p in phases.items()
        if n.startswith("baseline")
        for r in p.get("runs", [])
        if r.get("cold_total_s")
    ]
    if len(staged_walls) > 1 and len(base_walls) > 1:
        derived["staged_over_baseline_cold_pairs"] = [a / b for a, b in zip(staged_walls, base_walls, strict=False)]
    return derived


def fmt(value: Any, unit: str = "s", digits: int = 1) -> str:
    if value is None:
        return "-"
    if unit == "GiB":
        return f"{value / GIB:.1f}"
    if unit == "MiB":
        return f"{value / 1024:.1f}"
    return f"{value:.{digits}f}"


def staged_value(phase: dict[str, Any], stage: str, key: str) -> Any:
    return phase.get("stages", {}).get(stage, {}).get(key)


def staged_peak(phase: dict[str, Any], key: str) -> Any:
    values = [s.get(key) or 0 for s in phase.get("stages", {}).values()]
    return max(values) if values else None


def staged_loads(phase: dict[str, Any]) -> str:
    parts = [
        staged_value(phase, "encode_diffuse", "text_encoder_load_s"),
        staged_value(phase, "encode_diffuse", "transformer_load_s"),
        staged_value(phase, "audio_decode", "load_s"),
        staged_value(phase, "video_decode", "load_s"),
    ]
    return "+".join(fmt(p) for p in parts) if any(p is not None for p in parts) else "-"


def base_cell(metric: str, run: dict[str, Any], base: dict[str, Any], first: bool) -> str:
    """One baseline column; process-level numbers only in the column of the process's first call."""
    if not run:
        return "-"
    audio = (run.get("audio_vae_decode_s") or 0) + (run.get("vocoder_s") or 0)
    total = run.get("cold_total_s") if first else (run.get("call_s") or 0) + (run.get("mp4_encode_s") or 0)
    values = {
        "start+import (s)": fmt(base.get("start_import_s")) if first else "-",
        "weight load (s) [TE+DiT+aud+vae]": fmt(base.get("load_s")) if first else "-",
        "text encode (s)": fmt(run.get("text_encode_s"), digits=2),
        "denoise total (s)": fmt(run.get("denoise_s")),
        "denoise s/step": fmt(run.get("s_per_step"), digits=3),
        "transformer GPU s/call (median)": fmt(median(run.get("transformer_gpu_s")), digits=3),
        "video decode (s)": fmt(run.get("vae_decode_s"), digits=2),
        "audio decode (s)": fmt(audio, digits=2),
        "np postprocess + rest (s)": fmt(run.get("postprocess_and_rest_s"), digits=2),
        "mp4 encode (s)": fmt(run.get("mp4_encode_s")),
        "stage seconds enc/aud/vid": "-",
        "TOTAL wall (s)": fmt(total),
        "peak GPU alloc (GiB, torch)": fmt(run.get("peak_gpu_alloc_bytes"), "GiB"),
        "peak GPU used (GiB, nvidia-smi)": fmt(run.get("gpu_peak_mib_call"), "MiB"),
        "peak host RSS (GiB)": fmt(run.get("rss_peak_bytes"), "GiB"),
    }
    return values.get(metric, "-")


def staged_cell(metric: str, phase: dict[str, Any]) -> str:
    if not phase.get("stages"):
        return "-"
    encode = "encode_diffuse"
    values = {
        "start+import (s)": fmt(staged_value(phase, encode, "start_import_handshake_s")),
        "weight load (s) [TE+DiT+aud+vae]": staged_loads(phase),
        "text encode (s)": fmt(staged_value(phase, encode, "text_encode_s"), digits=2),
        "denoise total (s)": fmt(staged_value(phase, encode, "denoise_s")),
        "denoise s/step": fmt(staged_value(phase, encode, "s_per_step"), digits=3),
        "video decode (s)": "+mp4 " + fmt(staged_value(phase, "video_decode", "decode_and_encode_s"), digits=2),
        "audio decode (s)": fmt(staged_value(phase, "audio_decode", "decode_s"), digits=2),
        "mp4 encode (s)": "in video decode",
        "stage seconds enc/aud/vid": "/".join(
            fmt(staged_value(phase, s, "seconds")) for s in ("encode_diffuse", "audio_decode", "video_decode")
        ),
        "TOTAL wall (s)": fmt(phase.get("cli_wall_s")),
        "peak GPU alloc (GiB, torch)": fmt(staged_peak(phase, "peak_gpu_bytes"), "GiB"),
        "peak GPU used (GiB, nvidia-smi)": fmt(phase.get("gpu_peak_mib"), "MiB"),
        "peak host RSS (GiB)": fmt(staged_peak(phase, "peak_rss_bytes"), "GiB"),
    }
    return values.get(metric, "-")


def median(values: list[float] | None) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


TABLE_METRICS = (
    "start+import (s)",
    "weight load (s) [TE+DiT+aud+vae]",
    "text encode (s)",
    "denoise total (s)",
    "denoise s/step",
    "transformer GPU s/call (median)",
    "video decode (s)",
    "audio decode (s)",
    "np postprocess + rest (s)",
    "mp4 encode (s)",
    "stage seconds enc/aud/vid",
    "TOTAL wall (s)",
    "peak GPU alloc (GiB, torch)",
    "peak GPU used (GiB, nvidia-smi)",
    "peak host RSS (GiB)",
    "MFU denoise step (datasheet)",
    "MFU transformer call (datasheet)",
)


def table_lines(results: dict[str, Any]) -> list[str]:
    """The summary table: one column per measured configuration."""
    phases = results["phases"]
    base = phases.get("baseline", {})
    runs = {r.get("label"): r for r in base.get("runs", []) if "call_s" in r}
    small, large = results["args"]["small"], results["args"]["large"]
    derived = results.get("derived", {})
    columns: list[tuple[str, Any, str]] = [
        ("base cold " + small, lambda m: base_cell(m, runs.get("cold", {}), base, True), "baseline_cold"),
        ("base warm", lambda m: base_cell(m, runs.get("warm", {}), base, False), "baseline_warm"),
        ("staged " + small, lambda m: staged_cell(m, phases.get(f"staged_{small}", {})), f"staged_{small}"),
        (
            "nofork " + small,
            lambda m: staged_cell(m, phases.get(f"staged_{small}_nofork", {})),
            f"staged_{small}_nofork",
        ),
        ("base " + large, lambda m: base_cell(m, runs.get("large", {}), base, False), "baseline_large"),
        ("staged " + large, lambda m: staged_cell(m, phases.get(f"staged_{large}", {})), f"staged_{large}"),
        (
            "nofork " + large,
            lambda m: staged_cell(m, phases.get(f"staged_{large}_nofork", {})),
            f"staged_{large}_nofork",
        ),
    ]
    # Columns with nothing measured (no warm call, no run without the fork server, ...) are left out.
    columns = [c for c in columns if any(c[1](m) != "-" for m in TABLE_METRICS if not m.startswith("MFU"))]

    def mfu(key: str, field: str) -> str:
        value = derived.get(key, {}).get(field)
        return "-" if value is None else f"{100 * value:.1f}%"

    widths = [max(17, len(title)) for title, _, _ in columns]
    lines = [f"{'metric':33s}|" + "|".join(f"{t:>{w}s}" for (t, _, _), w in zip(columns, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    for metric in TABLE_METRICS:
        cells = []
        for (_title, cell, key), width in zip(columns, widths, strict=True):
            if metric.startswith("MFU denoise"):
                text = mfu(key, "mfu_step_vs_datasheet")
            elif metric.startswith("MFU transformer"):
                text = mfu(key, "mfu_transformer_vs_datasheet")
            else:
                text = cell(metric)
            cells.append(f"{text:>{width}s}")
        lines.append(f"{metric:33s}|" + "|".join(cells))
    return lines


def repeat_lines(results: dict[str, Any]) -> list[str]:
    """One line per measured process, in run order (repeats included), for the small clip."""
    small = results["args"]["small"]
    lines = ["runs in order (small clip): wall | start+import | loads | text enc | 1st step | s/step steady | decode"]
    for key, phase in results["phases"].items():
        if key.startswith(f"staged_{small}") and phase.get("stages"):
            enc = phase["stages"]["encode_diffuse"]
            lines.append(
                f"  {key:28s} {fmt(phase.get('cli_wall_s')):>6s} | {fmt(enc.get('start_import_handshake_s')):>5s} | "
                f"{staged_loads(phase):>19s} | {fmt(enc.get('text_encode_s'), digits=2):>5s} | "
                f"{fmt(enc.get('first_step_s'), digits=2):>5s} | {fmt(enc.get('s_per_step_steady'), digits=3):>6s} | "
                f"vid+mp4 {fmt(staged_value(phase, 'video_decode', 'decode_and_encode_s'), digits=2)}"
            )
        elif key.startswith("baseline"):
            for run in phase.get("runs", []):
                if run.get("size") != small or "call_s" not in run:
                    continue
                cold = run["label"] == "cold"
                wall = run.get("cold_total_s") if cold else run["call_s"] + run["mp4_encode_s"]
                start = fmt(phase.get("start_import_s")) if cold else "-"
                load = fmt(phase.get("load_s")) if cold else "-"
                encode, first_step = fmt(run.get("text_encode_s"), digits=2), fmt(run.get("first_step_s"), digits=2)
                lines.append(
                    f"  {key + ' ' + run['label']:28s} {fmt(wall):>6s} | {start:>5s} | {load:>19s} | {encode:>5s} | "
                    f"{first_step:>5s} | {fmt(run.get('s_per_step_steady'), digits=3):>6s} | "
                    f"vae {fmt(run.get('vae_decode_s'), digits=2)} + mp4 {fmt(run.get('mp4_encode_s'))}"
                )
    ratios = results.get("derived", {}).get("staged_over_baseline_cold_pairs")
    if ratios:
        lines.append(f"staged/baseline cold ratio per pair (in run order): {', '.join(f'{r:.3f}' for r in ratios)}")
    return lines


def fork_lines(results: dict[str, Any]) -> list[str]:
    """Every staged run in order: fork server on/off, wall, ratio, per-stage start-up, memory."""
    phases = results["phases"]
    each = results.get("derived", {}).get("staged_over_baseline_cold_each", {})
    lines = [
        "staged runs in order: fork | wall | /base cold | start+import enc/aud/vid | stage s enc/aud/vid | "
        "peak alloc GiB | smi GiB | left over"
    ]
    for key, phase in phases.items():
        if not key.startswith("staged_"):
            continue
        if phase.get("skipped"):
            lines.append(f"  {key:30s} skipped: {phase['skipped']}")
            continue
        ratio = each.get(key)
        starts = "/".join(
            fmt(staged_value(phase, stage, field))
            for stage, field in (
                ("encode_diffuse", "start_import_handshake_s"),
                ("audio_decode", "until_load_s"),
                ("video_decode", "until_load_s"),
            )
        )
        seconds = "/".join(
            fmt(staged_value(phase, s, "seconds")) for s in ("encode_diffuse", "audio_decode", "video_decode")
        )
        status = "" if phase.get("returncode") == 0 else f"  FAILED rc={phase.get('returncode')}"
        lines.append(
            f"  {key:30s} {'on ' if phase.get('fork_server', True) else 'off'} | {fmt(phase.get('cli_wall_s')):>6s} | "
            f"{'-' if ratio is None else f'{ratio:.3f}':>6s} | {starts:>16s} | {seconds:>15s} | "
            f"{fmt(staged_peak(phase, 'peak_gpu_bytes'), 'GiB'):>5s} | {fmt(phase.get('gpu_peak_mib'), 'MiB'):>5s} | "
            f"{len(phase.get('leftover_processes') or {})}{status}"
        )
    return lines


def print_table(results: dict[str, Any]) -> None:
    phases = results["phases"]
    env = results.get("environment", {})
    build = phases.get("build", {})
    derived = results.get("derived", {})
    lines = ["", "=" * 100, f"GPU: {env.get('versions', {}).get('gpu')} | {env.get('nvidia_smi')}"]
    lines.append(f"versions: {env.get('versions')} | model folder {results.get('root')}")
    if build:
        plan = build.get("storage", {}).get("plan", {}).get("placement")
        lines.append(
            f"build: {build.get('total_bytes', 0) / 1e9:.1f} GB in {build.get('wall_s') or 0:.0f} s "
            f"(sync {build.get('sync_s') or 0:.0f} s), TE layers {build.get('text_encoder_layers')}, "
            f"bf16 matmul {build.get('matmul', {}).get('tflops', 0):.0f} TFLOP/s, placement {plan}"
        )
        if build.get("deviation"):
            lines.append(f"DEVIATION: {build['deviation']}")
    lines += table_lines(results)
    lines += repeat_lines(results)
    lines += fork_lines(results)
    flops = {k: v.get("flops") for k, v in derived.items() if isinstance(v, dict) and v.get("flops")}
    lines.append(f"FLOPs per step: {', '.join(f'{k} {v:.4g}' for k, v in flops.items())}")
    if derived.get("staged_over_baseline_cold"):
        ratio = derived["staged_over_baseline_cold"]
        lines.append(f"staged / baseline, cold, {results['args']['small']}, process start to MP4: {ratio:.3f}")
    for name, phase in phases.items():
        if name.startswith("staged_") and phase.get("returncode") not in (0, None):
            lines.append(f"{name} FAILED rc={phase.get('returncode')}: {phase.get('stderr_tail', '')[-600:]}")
        if name.startswith("staged_") and phase.get("skipped"):
            lines.append(f"{name} skipped: {phase['skipped']}")
    base = phases.get("baseline", {})
    for run in base.get("runs", []):
        if run.get("skipped"):
            lines.append(f"baseline {run['label']} skipped: {run['skipped']}")
    if base and base.get("returncode") not in (0, None):
        lines.append(f"baseline process rc={base.get('returncode')} timed_out={base.get('timed_out')}")
    lines.append("=" * 100)
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
PLANS: dict[str, dict[str, Any]] = {
    "v1": {
        "phases": "build,baseline_large",
        "sequence": "staged_small,baseline,staged_large",
        "stage_timeout_s": 240.0,
    },
    "fork": {
        "phases": "build,baseline_cold_only",
        "sequence": "staged_small,baseline,staged_small,staged_small_nofork,staged_large",
        "stage_timeout_s": 150.0,
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_all = sub.add_parser("all", help="build, staged, baseline, staged-large; results under --out")
    p_all.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench-out"))
    p_all.add_argument("--work", default="/tmp/bench-work", help="job dirs, MP4s, intermediate JSON")
    p_all.add_argument("--root", default="auto", help="model folder to build and load (auto: see choose_root)")
    p_all.add_argument("--scale", choices=["full", "smoke", "tiny"], default="full")
    p_all.add_argument("--small", default="768x512x121")
    p_all.add_argument("--large", default="1920x1088x161")
    p_all.add_argument("--plan", choices=sorted(PLANS), default="v1", help="preset of --phases/--sequence (see top)")
    p_all.add_argument(
        "--phases",
        default=None,
        help="build: build the model; baseline_large: the baseline process also runs the large clip; "
        "baseline_cold_only: no warm call (default: the plan's)",
    )
    p_all.add_argument(
        "--sequence",
        default=None,
        help="measured runs in order: staged_small, staged_large, staged_small_nofork, staged_large_nofork, "
        "baseline, imports (repeats allowed; default: the plan's)",
    )
    p_all.add_argument("--budget-s", type=float, default=560.0, help="wall-clock budget of this command")
    p_all.add_argument("--build-timeout-s", type=float, default=330.0)
    p_all.add_argument("--stage-timeout-s", type=float, default=None, help="small staged clip (default: the plan's)")
    p_all.add_argument("--min-small-staged-s", type=float, default=90.0, help="skip a small staged run with less left")
    p_all.add_argument("--reserve-large-staged-s", type=float, default=0.0)
    p_all.add_argument("--min-large-staged-s", type=float, default=150.0)
    p_all.add_argument("--profile", default="", help="LTX2_PROFILE for the staged runs (default: the config's)")
    p_all.add_argument("--staged-dtype", default="", help="--dtype for the staged CLI (default: its auto)")
    p_all.add_argument("--host-ram-gib", type=float, default=0.0, help="RAM of the machine (default MemTotal)")

    p_build = sub.add_parser("build")
    p_build.add_argument("--root", required=True)
    p_build.add_argument("--scale", choices=["full", "smoke", "tiny"], default="full")
    p_build.add_argument("--result", required=True)
    p_build.add_argument("--host-ram-gib", type=float, default=0.0)

    p_base = sub.add_parser("baseline")
    p_base.add_argument("--root", required=True)
    p_base.add_argument("--runs", required=True, help="WxHxN:label,... (first is the cold one)")
    p_base.add_argument("--result", required=True)
    p_base.add_argument("--work", required=True)
    p_base.add_argument("--deadline", type=float, default=float("inf"))

    p_flops = sub.add_parser("flops", help="print the FLOP formula's numbers for the LTX-2.0 config")
    p_flops.add_argument("sizes", nargs="*", default=["768x512x121", "1920x1088x161"])

    args = parser.parse_args(argv)
    if args.command == "all":
        for name, value in PLANS[args.plan].items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        return cmd_all(args)
    if args.command == "build":
        return cmd_build(args)
    if args.command == "baseline":
        return cmd_baseline(args)
    for size in args.sizes:
        sys.stdout.write(
            f"{size}: {json.dumps(transformer_flops(TRANSFORMER_CONFIG, *parse_size(size), MAX_SEQUENCE_LENGTH))}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`gpu_bench.py build`: the full-size LTX-2.0 (or, `--family 2.3`, LTX-2.3) folder with random bf16
weights, made on the accelerator; 2.3's has the two-stage pipeline's `latent_upsampler/` too.

It exists because no real weights travel to the lent machines: every component is built at full
size from its config (gpu_configs), its parameter count checked, and saved as a diffusers folder
(safetensors in 5 GB shards, model_index.json through LTX2Pipeline.save_config) where
gpu_storage's plan puts it. torch, diffusers and transformers are imported inside the functions,
so importing this module costs nothing in the other sub-commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from gpu_common import GIB, T_PROCESS, log, write_json
from gpu_configs import (
    GEMMA_MM,
    GEMMA_VISION_CONFIG,
    SCHEDULER_CONFIG,
    family_class_names,
    family_components,
    family_expected_params,
    scaled_configs,
)
from gpu_storage import mem_total_bytes, plan_storage, ram_dir, storage_report

NO_ROOM = 5  # exit status of a build that found no place for a component


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
    """Parameters of a torch module."""
    return sum(p.numel() for p in module.parameters())


def component_factories(cfgs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Component name -> a function that makes it (on torch's current default device) from `cfgs`.

    2.3's configs (a BWE vocoder config, a "latent_upsampler" entry) make LTX2VocoderWithBWE and
    LTX2LatentUpsamplerModel."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    def text_encoder() -> Any:
        config = Gemma3Config(text_config=cfgs["text"], vision_config=dict(GEMMA_VISION_CONFIG), **GEMMA_MM)
        return Gemma3ForConditionalGeneration(config)

    vocoder = LTX2VocoderWithBWE if "bwe_in_channels" in cfgs["vocoder"] else LTX2Vocoder
    factories = {
        "transformer": lambda: LTX2VideoTransformer3DModel(**cfgs["transformer"]),
        "text_encoder": text_encoder,
        "connectors": lambda: LTX2TextConnectors(**cfgs["connectors"]),
        "vae": lambda: AutoencoderKLLTX2Video(**cfgs["vae"]),
        "audio_vae": lambda: AutoencoderKLLTX2Audio(**cfgs["audio_vae"]),
        "vocoder": lambda: vocoder(**cfgs["vocoder"]),
    }
    if "latent_upsampler" in cfgs:
        factories["latent_upsampler"] = lambda: LTX2LatentUpsamplerModel(**cfgs["latent_upsampler"])
    return factories


def meta_param_counts(cfgs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Parameter count of every component, built on the meta device (no memory, no time)."""
    import torch

    counts = {}
    with torch.device("meta"):
        for name, make in component_factories(cfgs).items():
            counts[name] = count_params(make())
    return counts


def start_info(args: argparse.Namespace, torch: Any) -> dict[str, Any]:
    """The build record's first fields; on a GPU also its name and the bf16 matmul ceiling."""
    info: dict[str, Any] = {"scale": args.scale, "family": family_of(args), "root": str(args.root)}
    info["t_start"] = T_PROCESS
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["matmul"] = measure_matmul(torch)
        log(f"bf16 matmul 8192^3: {info['matmul']['tflops']:.0f} TFLOP/s")
    return info


def family_of(args: argparse.Namespace) -> str:
    """The family a build makes (`--family`, 2.0 when the option is absent)."""
    return getattr(args, "family", None) or "2.0"


def build_tiny(root: Path, info: dict[str, Any], result_path: Path, family: str = "2.0") -> int:
    """`--scale tiny`: the project's tiny random model (of `family`) instead of the full-size configs."""
    from services.tiny_model import write_tiny_model

    t0 = time.time()
    write_tiny_model(root, family=family)
    info["build_s"] = time.time() - t0
    info["text_encoder_layers"] = 2
    (root / "BUILD_OK").write_text(json.dumps(info))
    write_json(result_path, info)
    return 0


def plan_folder(args: argparse.Namespace, root: Path, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """Count every component's parameters and plan where each goes; records both in `info`.

    The text encoder's fixed and per-layer sizes come from a 1- and a 2-layer count, so the plan
    can give it fewer layers when it does not fit.
    """
    family = family_of(args)
    full_layers = scaled_configs(args.scale, family=family)["text"]["num_hidden_layers"]
    counts = meta_param_counts(scaled_configs(args.scale, family=family))
    te1 = meta_param_counts(scaled_configs(args.scale, te_layers=1, family=family))["text_encoder"]
    te2 = meta_param_counts(scaled_configs(args.scale, te_layers=2, family=family))["text_encoder"]
    te_per_layer, te_fixed = (te2 - te1) * 2, (te1 - (te2 - te1)) * 2
    sizes = {name: n * 2 for name, n in counts.items()}  # bf16
    info["param_counts"] = counts
    info["bytes_bf16"] = sizes
    host_ram = int(args.host_ram_gib * GIB) if args.host_ram_gib else mem_total_bytes()
    plan = plan_storage(root, sizes, te_fixed, te_per_layer, full_layers, host_ram)
    info["storage"] = {"plan": plan, "report": storage_report(), "host_ram_bytes": host_ram}
    log(f"storage plan: {plan}")
    info["text_encoder_layers"] = plan["text_encoder_layers"]
    if plan["text_encoder_layers"] != full_layers:
        info["deviation"] = (
            f"text encoder saved with {plan['text_encoder_layers']} of {full_layers} Gemma layers (no room for "
            f"the full {sizes['text_encoder'] / 1e9:.1f} GB); connectors text_proj_in_factor = "
            f"{plan['text_encoder_layers'] + 1}"
        )
        log(info["deviation"])
    return plan, sizes


def component_target(root: Path, name: str, where: str, ram_root: Path | None) -> Path:
    """The component's folder under `root`; a component placed in RAM is a link into the tmpfs."""
    target = root / name
    if where == "ram" and ram_root is not None:
        real = ram_root / name
        real.mkdir(parents=True, exist_ok=True)
        target.symlink_to(real, target_is_directory=True)
    return target


def save_component(torch: Any, make: Any, target: Path, video_vae: bool = False) -> dict[str, Any]:
    """Build one component with seed 0 on the accelerator, in bf16, and save it; returns its record
    (with the compression ratios when it is the `video_vae`)."""
    cuda = torch.cuda.is_available()
    record: dict[str, Any] = {"path": str(target.resolve())}
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"), torch.no_grad():
        model = make()
    model = model.to(torch.bfloat16).eval()
    if cuda:
        torch.cuda.synchronize()
    record["build_s"] = time.time() - t0
    record["params"] = count_params(model)
    if video_vae:
        record["compression"] = [model.spatial_compression_ratio, model.temporal_compression_ratio]
    t0 = time.time()
    model.save_pretrained(target, max_shard_size="5GB")
    record["save_s"] = time.time() - t0
    record["bytes"] = sum(f.stat().st_size for f in Path(record["path"]).rglob("*") if f.is_file())
    del model
    if cuda:
        torch.cuda.empty_cache()
    return record


def save_components(
    torch: Any, args: argparse.Namespace, root: Path, plan: dict[str, Any], ram_root: Path | None, info: dict[str, Any]
) -> None:
    """Every component, largest first, into `info["components"]` (the result file rewritten after each)."""
    te_layers, family = plan["text_encoder_layers"], family_of(args)
    full_size = args.scale == "full" and te_layers == scaled_configs("full")["text"]["num_hidden_layers"]
    factories = component_factories(scaled_configs(args.scale, te_layers=te_layers, family=family))
    expected = family_expected_params(family)
    info["components"] = {}
    torch.set_default_dtype(torch.bfloat16)
    for name in family_components(family):
        where = plan["placement"][name]
        target = component_target(root, name, where, ram_root)
        record = {"where": where, **save_component(torch, factories[name], target, name == "vae")}
        if full_size and name in expected:
            record["params_ok"] = abs(record["params"] - expected[name]) / expected[name] < 0.01
        info["components"][name] = record
        log(
            f"{name}: {record['params'] / 1e9:.3f} B params, built in {record['build_s']:.1f} s, "
            f"saved {record['bytes'] / 1e9:.2f} GB to {record['where']} in {record['save_s']:.1f} s"
        )
        write_json(Path(args.result), info)
    torch.set_default_dtype(torch.float32)


def save_pipeline_files(torch: Any, root: Path, cfgs: dict[str, dict[str, Any]], family: str = "2.0") -> None:
    """Scheduler, tokenizer and model_index.json (as LTX2Pipeline.save_pretrained writes it; the latent
    upsampler is no pipeline component, so the index leaves it out, as in Lightricks' checkpoints)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    from services.tiny_text_encoder import build_tokenizer

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    scheduler.save_pretrained(root / "scheduler")
    tokenizer = build_tokenizer()  # ids < 512 < Gemma's vocabulary: any id is a valid embedding row
    tokenizer.save_pretrained(root / "tokenizer")
    with torch.device("meta"):  # weightless shells: only the class names go into the index
        shells = {name: make() for name, make in component_factories(cfgs).items() if name != "latent_upsampler"}
    LTX2Pipeline(scheduler=scheduler, tokenizer=tokenizer, **shells).save_config(root)
    index = json.loads((root / "model_index.json").read_text())
    for name, expected in family_class_names(family).items():
        if list(index.get(name, [])) != list(expected):
            raise RuntimeError(f"model_index.json records {name} as {index.get(name)}, expected {expected}")


def library_versions(torch: Any) -> dict[str, str]:
    """torch / diffusers / transformers versions of the build."""
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def fail(info: dict[str, Any], result_path: Path, error: str) -> int:
    """Record why the build stopped; returns the exit status."""
    info["error"] = error
    write_json(result_path, info)
    log(error)
    return NO_ROOM


def cmd_build(args: argparse.Namespace) -> int:
    """1 matmul ceiling, 2 plan, 3 components, 4 pipeline files, 5 sync, 6 BUILD_OK marker."""
    import torch

    root, result_path = Path(args.root), Path(args.result)
    info = start_info(args, torch)  # 1
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if args.scale == "tiny":
        return build_tiny(root, info, result_path, family_of(args))
    info["versions"] = library_versions(torch)
    plan, sizes = plan_folder(args, root, info)  # 2
    if plan["missing"]:
        return fail(info, result_path, f"no room for {plan['missing']}")
    needs_ram = [n for n, w in plan["placement"].items() if w == "ram"]
    ram_root = ram_dir(sum(sizes[n] for n in needs_ram) + GIB) if needs_ram else None
    if needs_ram and ram_root is None:
        return fail(info, result_path, "no tmpfs for the components that do not fit on disk")
    save_components(torch, args, root, plan, ram_root, info)  # 3
    t0 = time.time()
    family = family_of(args)
    configs = scaled_configs(args.scale, te_layers=plan["text_encoder_layers"], family=family)
    save_pipeline_files(torch, root, configs, family)  # 4
    info["index_s"] = time.time() - t0
    t0 = time.time()
    os.sync()  # 5
    info["sync_s"] = time.time() - t0
    info["total_bytes"] = sum(c["bytes"] for c in info["components"].values())
    info["build_total_s"] = time.time() - T_PROCESS
    info["storage"]["after"] = storage_report()
    (root / "BUILD_OK").write_text(json.dumps(info, default=str))  # 6
    write_json(result_path, info)
    log(f"model folder complete: {info['total_bytes'] / 1e9:.1f} GB, sync {info['sync_s']:.1f} s")
    return 0

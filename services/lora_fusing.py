"""Fuse LoRA adapters into the transformer (and connectors) before any FP8 cast.

Order matters: base weights, then LoRA, then FP8. Casting first and fusing afterwards would merge
the adapter into already-quantised weights (diffusers issue #11648), so `require_no_adapters`
guards the cast. Both Lightricks' original key format (`diffusion_model.` prefix) and diffusers'
format load: diffusers' LTX2 LoRA loader converts the former.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protocol.errors import InvalidInput, ModelNotFound
from protocol.job_record import ResolvedLora


def fuse_loras(pipe: Any, loras: list[ResolvedLora]) -> None:
    """Load each LoRA file, set its scale, fuse them all, then drop the adapter layers.

    After this the pipeline's weights are plain tensors again (adapter effect included), ready
    for FP8 storage or offloading.
    """
    if not loras:
        return
    names = []
    for index, lora in enumerate(loras):
        path = Path(lora.path)
        if not path.is_file():
            raise ModelNotFound(f"LoRA file {path} does not exist")
        require_readable_safetensors(path, lora.source)
        name = f"lora_{index}"
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except ValueError as exc:
            raise InvalidInput(f"{lora.source}: not a usable LTX-2 LoRA: {exc}") from exc
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[float(lora.scale) for lora in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


def require_readable_safetensors(path: Path, source: object) -> None:
    """Refuse a LoRA file that is not a whole .safetensors file (garbage, cut short), naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except Exception as exc:  # safetensors raises its own error types for a garbled file
        raise InvalidInput(f"LoRA {source}: {path} is not a readable .safetensors file ({exc})") from exc


def has_adapter_layers(module: Any) -> bool:
    """True if PEFT adapter layers are still attached (i.e. not fused and unloaded)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(child, BaseTunerLayer) for child in module.modules())


def require_no_adapters(module: Any) -> None:
    """Refuse to cast weights to FP8 while LoRA layers are attached: fuse first."""
    if has_adapter_layers(module):
        raise InvalidInput("LoRA adapters must be fused before FP8 casting (base -> LoRA -> FP8)")

"""`LTX2_COMPILE_PACKAGES=1`: a later worker loads the transformer blocks' compiled code instead of
tracing them again (issue 28 item 4, cold start).

Inductor's caches under `<state>/compile-cache` (services/model_loading.compile_blocks) spare a new
process the code generation, but not Dynamo: every process traces the block's Python again and
looks up its graph, which took 10.0 of a 12.5 s first step on the tiny model here (bytecode tracing
5.0 s, the cached graph's lookup and load 4.5 s) and 6-8 s on an H100 at full size. Dynamo's
precompile cache (`torch._dynamo.config.caching_precompile`, experimental in torch 2.9-2.13) keeps
what Dynamo made, its bytecode, guards and the compiled graph, as one package under
`<compile cache>/dynamo/<id>`, and the next `torch.compile` of the same function installs it
without tracing.

Two things make it fit regional compilation:

- One compile per block class, not per block. `compile_repeated_blocks` compiles each block's
  `Module._call_impl`, so every block (48 at full size) would load the package again (0.5 s each
  on the tiny model). Here one compiled function of the class's `forward` serves every block, the
  block being its argument, so the package loads once.
- A package per key. Dynamo names a package by the function's qualified name and first line, the
  same for every model, shape and setting; the guards it cannot save (identity and closure matches:
  diffusers' module-level functions, the attention processors' `__call__`) are dropped, from the
  running process's checks too, and every shape seen adds an entry, up to Dynamo's recompile limit.
  So the compiled function gets a name with `package_key` in it: the transformer's
  config, dtype, device, the attempt's plan (weights, attention, deterministic mode, ...), the
  clip's size and NAG, and torch, diffusers and Python versions. Two settings never share a
  package, and a package holds the one or two shapes (two-stage) of its clips.

Off by default until measured on a GPU (docs/operations.md "Compile cache"): torch marks the cache
experimental. Where the running torch lacks it, blocks compile as without it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import platform
import re
import types
from typing import Any, ClassVar

import torch

SWITCH = "LTX2_COMPILE_PACKAGES"

log = logging.getLogger("ltx2.worker")


def wanted() -> bool:
    """Whether this process keeps and loads precompiled blocks (`LTX2_COMPILE_PACKAGES=1`)."""
    return os.environ.get(SWITCH, "") == "1"


def available() -> bool:
    """Whether the running torch has Dynamo's precompile cache (torch 2.9 and later)."""
    try:
        import torch._dynamo.config as dynamo_config
        from torch._dynamo.precompile_context import PrecompileContext
    except ImportError:
        return False
    return hasattr(dynamo_config, "caching_precompile") and hasattr(PrecompileContext, "save_to_dynamo_cache")


def package_key(transformer: Any, plan: dict[str, Any], shape: dict[str, Any]) -> str:
    """A short digest of what decides the compiled blocks' code: the model, the plan, the clip's shape
    and the software. Equal keys may share a package; anything else gets a package of its own."""
    import diffusers

    parameter = next(transformer.parameters())
    described = {
        "model": {key: value for key, value in dict(transformer.config).items() if not key.startswith("_")},
        "class": type(transformer).__qualname__,
        "dtype": str(parameter.dtype),
        "device": parameter.device.type,
        "plan": plan,
        "shape": shape,
        "software": [torch.__version__, diffusers.__version__, platform.python_version()],
    }
    if parameter.device.type == "cuda":
        described["card"] = torch.cuda.get_device_name(parameter.device)
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def keyed_forward(cls: type, key: str) -> Any | None:
    """A copy of `cls.forward` named for `key`: Dynamo names a function's package by its qualified name
    (and first line), so each key gets its own package. A copy of the code, not a wrapper: Dynamo
    cannot save the guards a wrapper adds (a closure's cell, the block's class), and then fails the
    step. None where the forward has a closure of its own (its `super()` cell, a decorator's)."""
    forward = cls.forward
    if forward.__closure__ is not None:
        return None
    keyed = types.FunctionType(forward.__code__, forward.__globals__, forward.__name__, forward.__defaults__)
    keyed.__kwdefaults__ = forward.__kwdefaults__
    keyed.__qualname__ = f"{forward.__qualname__}.ltx2_{key}"
    return keyed


class PackagedForward:
    """One block class's compiled forward, through Dynamo's precompile cache, with a way back.

    In torch 2.13 a guard Dynamo cannot save (a closure's cell, a class it cannot name) fails the
    compiling call (`check_fn.guards_state must not be None`) instead of leaving the package out, and
    the stage would crash into the failure policy's lower-memory rungs. Compilation happens inside a
    call, before the block computes anything, so on such a failure this compiles the class's plain
    forward without the cache, as compile_repeated_blocks would, and calls again. (An out-of-memory
    error is not Dynamo's: it goes to the failure policy as before.)"""

    #: Whether a block's compile went around the cache in this process (then nothing is saved).
    fell_back: ClassVar[bool] = False

    def __init__(self, cls: type, keyed: Any) -> None:
        self.cls = cls
        self.compiled = torch.compile(keyed, fullgraph=True, dynamic=False)
        self.packaged = True
        # Named like the function it stands for: Dynamo guards the block's `forward` attribute, and saving
        # that guard in a package needs the name.
        functools.update_wrapper(self, keyed)

    def __call__(self, block: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.packaged:
            return self.compiled(block, *args, **kwargs)
        try:
            return self.compiled(block, *args, **kwargs)
        except (AssertionError, torch._dynamo.exc.TorchDynamoException) as error:  # the cache's, not the maths'
            import torch._dynamo.config as dynamo_config

            log.warning("precompiled blocks unavailable (%s: %s); compiling without them", type(error).__name__, error)
            dynamo_config.caching_precompile = False
            PackagedForward.fell_back = True
            self.compiled = torch.compile(self.cls.forward, fullgraph=True, dynamic=False)
            self.packaged = False
            return self.compiled(block, *args, **kwargs)


def compile_blocks(blocks: list[Any], key: str) -> bool:
    """Compile `blocks` with one compiled function per block class, through Dynamo's precompile cache:
    a package saved earlier under `key` is installed now (no tracing at the first step). False, with
    nothing compiled, where a block class's forward cannot be keyed (keyed_forward). A static graph per input
    shape, as the plain compiles of the blocks and the decoder (services.model_loading.limit_recompiles says why)."""
    import torch._dynamo.config as dynamo_config

    forwards = {cls: keyed_forward(cls, key) for cls in {type(block) for block in blocks}}
    if any(forward is None for forward in forwards.values()):
        return False
    dynamo_config.caching_precompile = True
    # Dynamo warns once per guard it drops from a package (about 80 lines per compile on this model);
    # the key is what stands in for them, so the worker's log keeps its own lines.
    logging.getLogger("torch._dynamo.guards").setLevel(logging.ERROR)
    compiled = {cls: PackagedForward(cls, forward) for cls, forward in forwards.items()}
    for forward in forwards.values():  # torch.compile, above, installed any package found for them
        step_past_installed_names(forward.__globals__)
    for block in blocks:
        block.forward = types.MethodType(compiled[type(block)], block)
    return True


#: The name under which Dynamo keeps a traced frame's builtins in its module's globals; n from a process-wide counter.
BUILTINS_GLOBAL = re.compile(r"__builtins_dict___(\d+)")


def step_past_installed_names(scope: dict[str, Any]) -> None:
    """Move Dynamo's counter of generated names past those an installed package put in `scope`.

    Each trace stores the frame's builtins in the module's globals as `__builtins_dict___<n>`, n from a counter
    that starts at 0 in every process (torch/_dynamo/bytecode_transformation.py, `unique_id`), and a package keeps
    that name in its guards. Installing a package writes the name back into the module's globals
    (torch/_dynamo/package.py, `CompilePackage.install`) but leaves this process's counter at 0, so the next trace
    here, of any shape the package lacks (stage 1 over a package a one-stage clip of the same size saved, a clip
    size new to the package), takes the same name, and torch 2.13 refuses it: "Name '__builtins_dict___0' already
    exists in scope" (torch/_dynamo/utils.py, `CleanupHook.create`). PackagedForward then compiled without the
    package and saved nothing, so the package never gained that shape and every later process failed the same way.
    The counter is a private global of torch's; where it is missing nothing is changed (the fallback stays)."""
    from torch._dynamo import bytecode_transformation

    counter = getattr(bytecode_transformation, "_unique_id_counter", None)
    taken = [int(match[1]) for name in list(scope) if (match := BUILTINS_GLOBAL.fullmatch(name))]
    if counter is None or not taken:
        return
    bytecode_transformation._unique_id_counter = itertools.count(max(next(counter), max(taken) + 1))


def save() -> None:
    """Write what Dynamo compiled in this process to the cache (at the end of a pass: its graphs are
    compiled by then, NAG's and the plain one's); a later process with the same key loads them."""
    from torch._dynamo.precompile_context import PrecompileContext

    if not PackagedForward.fell_back:
        PrecompileContext.save_to_dynamo_cache()


def cache_report() -> str:
    """What the compile caches served this process so far, from Dynamo's and Inductor's counters:
    `dynamo packages` (this module's precompiled blocks), `inductor graphs` (Inductor's FX graph
    cache) and `aot-autograd` (AOTAutograd's cache), each as hits/misses."""
    from torch._dynamo.utils import counters

    def pair(group: str, hit: str, miss: str) -> str:
        return f"{counters[group][hit]}/{counters[group][miss]}"

    parts = [
        f"dynamo packages {pair('dynamo_cache', 'dynamo_cache_hit', 'dynamo_cache_miss')}",
        f"inductor graphs {pair('inductor', 'fxgraph_cache_hit', 'fxgraph_cache_miss')}",
        f"aot-autograd {pair('aot_autograd', 'autograd_cache_hit', 'autograd_cache_miss')}",
    ]
    return "compile cache hits/misses: " + ", ".join(parts)

"""Load settings once: shipped defaults < config file < LTX2_* environment < explicit overrides.

The result is a frozen dataclass passed to whoever needs it; nothing reads the environment at
import time and nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from config.presets import FamilyPresets, Preset, build_family_presets, resolve_pipeline, resolve_preset_fields
from protocol import cuda_mps
from protocol.families import FAMILIES
from protocol.spec_rules import CONTEXT_PARALLEL_SIZES, CROP_MULTIPLE, MAX_SIZE, MIN_CROP_SIZE

DEFAULTS_FILE = Path(__file__).with_name("defaults.toml")
# Environment variables that override one setting each: name -> (section, key).
ENV_OVERRIDES = {
    "LTX2_STATE_DIR": ("paths", "state_dir"),
    "LTX2_OUTPUT_DIR": ("paths", "output_dir"),
    "LTX2_DEFAULT_MODEL": ("models", "default"),
    "LTX2_PROFILE": ("decode", "profile"),
    "LTX2_HUNG_AFTER_S": ("worker", "hung_after_s"),
    "LTX2_FORK_SERVER": ("worker", "fork_server"),
    "LTX2_GROUP_SIZE": ("worker", "group_size"),
    "LTX2_OVERLAP_STAGES": ("worker", "overlap_stages"),
    "LTX2_CUDA_MPS": ("worker", "cuda_mps"),
    "LTX2_FP8_FAST_ACCUMULATION": ("worker", "fp8_fast_accumulation"),
    "LTX2_FP8_GELU_KERNEL": ("worker", "fp8_gelu_kernel"),
    "LTX2_QK_NORM_ROPE_KERNEL": ("worker", "qk_norm_rope_kernel"),
    "LTX2_WHOLE_ROW_REDUCTIONS": ("worker", "whole_row_reductions"),
    "LTX2_DETERMINISTIC": ("worker", "deterministic"),
    "LTX2_DAEMON_ENDPOINT": ("daemon", "endpoint"),
    "LTX2_DEVICES": ("cluster", "devices"),
    "LTX2_CLUSTER_BACKEND": ("cluster", "backend"),
    "LTX2_RAY_ADDRESS": ("cluster", "address"),
    "LTX2_RAY_RESOURCE": ("cluster", "ray_resource"),
    "LTX2_LANE_THREADS": ("cluster", "lane_threads"),
    "LTX2_CONTEXT_PARALLEL": ("cluster", "context_parallel"),
}
# Where stage processes run: this host's lanes, or tasks of a Ray cluster (orchestrator.placement.ray_farm).
CLUSTER_BACKENDS = ("local", "ray")
OVERLAP_MODES = ("auto", "on", "off")
# A lane's device as `[cluster] devices` names it: a CUDA device index, several joined by "+" (a lane of
# N GPUs for one clip's context-parallel diffusion, DESIGN.md rule 8: "cuda:1+2"), or a CPU lane (tests).
DEVICE_NAME = re.compile(r"cpu|cuda:\d+(\+\d+)*")
# `[http]` limits that are whole numbers of at least 1.
HTTP_WHOLE_LIMITS = (
    "max_upload_bytes",
    "max_body_bytes",
    "max_active_jobs_per_key",
    "requests_per_minute",
    "failed_auth_per_minute",
    "max_connections",
)
# A size of `[http] exact_sizes`: "WIDTHxHEIGHT".
EXACT_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
# A day: no HTTP read or idle bound needs more, and a typo of many digits is caught.
MAX_HTTP_TIMEOUT_S = 86400.0


X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo"
)  # fmt: skip


class ConfigError(ValueError):
    """A config file or override is unreadable or names an unknown setting."""


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Inputs of the decode plan (orchestrator.run.decode_plan)."""

    profile: str
    budget_gib: float
    tile_size: int
    tile_overlap: int
    chunk_overlap_latent_frames: int
    x264_preset: str


@dataclasses.dataclass(frozen=True)
class DaemonSettings:
    """Where the daemon listens and the CURVE key files for tcp (empty strings: unset)."""

    endpoint: str
    curve_server_secret_key: str
    curve_authorized_keys_dir: str
    curve_server_public_key: str
    curve_client_secret_key: str
    request_timeout_s: float


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    """`ltx2 serve`, the HTTP gateway: where it listens, its key file and its per-key limits."""

    host: str = "127.0.0.1"
    port: int = 8000
    keys_file: str = ""  #: empty: <state dir>/http/keys.json
    max_upload_bytes: int = 10 * 1024 * 1024
    max_body_bytes: int = 12 * 1024 * 1024
    max_active_jobs_per_key: int = 4
    requests_per_minute: int = 600
    #: how long a create sends its submit again while the daemon does not answer, before a 503
    create_timeout_s: float = 120.0
    failed_auth_per_minute: int = 20
    #: key names that may read /metrics (every key's job counts); none by default
    metrics_keys: tuple[str, ...] = ()
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 256
    #: sizes ("WxH") delivered exactly by rendering at the next size up and centre-cropping (OpenAI's 720x1280)
    exact_sizes: tuple[str, ...] = ("720x1280", "1280x720", "1024x1792", "1792x1024")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the CLI and orchestrator need, resolved to concrete values."""

    state_dir: Path
    output_dir: Path
    input_roots: tuple[Path, ...]
    cameras: Mapping[str, tuple[str, str]]
    #: `model` names the HTTP gateway takes besides repo ids (`[model_aliases]`): name -> repo id with a preset
    model_aliases: Mapping[str, str]
    default_model: str
    fallback_model: str
    presets: Mapping[str, Preset]
    #: Guidance presets per model family (protocol/families.py names the families).
    families: Mapping[str, FamilyPresets]
    heartbeat_s: float
    fork_server: bool
    hung_after_s: float
    stderr_tail_lines: int
    group_size: int
    fp8_fast_accumulation: bool
    #: --fp8-matmul: the feed-forward's GELU and row quantisation in services/fp8_rows.py's kernel (CUDA + Triton)
    fp8_gelu_kernel: bool
    #: --fp8-attention: the query's and key's RMS norms and rotary embedding in services/qk_norm_rope.py's kernel
    qk_norm_rope_kernel: bool
    #: --compile: Inductor's row reductions up to LTX-2's width keep the row in registers
    #: (services/whole_row_reductions.py)
    whole_row_reductions: bool
    max_attempts_per_stage: int
    same_plan_retries: int
    decode: DecodeSettings
    daemon: DaemonSettings
    #: Lanes (DESIGN.md rule 8): "auto", a number of lanes, or device names; orchestrator.placement.lanes
    #: turns it into lanes.
    devices: str | int | tuple[str, ...] = "auto"
    #: CPU threads of each local lane's stage processes: "auto" (the host's CPUs shared evenly when
    #: there are several lanes) or a number; orchestrator.placement.lanes applies it.
    lane_threads: str | int = "auto"
    #: Processes of one clip's diffusion when a request leaves `context_parallel` out (1: one process).
    context_parallel: int = 1
    #: "local" (this host's lanes) or "ray" (a lane per unit of `ray_resource` in the Ray cluster).
    backend: str = "local"
    #: The Ray cluster to join ("auto": RAY_ADDRESS or the cluster started on this host).
    address: str = "auto"
    #: The Ray resource one stage task takes one unit of ("GPU"; tests name a custom one).
    ray_resource: str = "GPU"
    http: HttpSettings = dataclasses.field(default_factory=HttpSettings)
    #: Same request, same bits: compiled kernels in Inductor's deterministic mode, x264 on a fixed
    #: thread count (config/defaults.toml says why); recorded in each job at its creation.
    deterministic: bool = True
    #: Diffuse the next group while the last group's decoders run ("auto", "on", "off"; defaults.toml says when).
    overlap_stages: str = "auto"
    #: Which CUDA MPS control daemon stage processes join: "auto", "off" or a pipe directory (protocol/cuda_mps.py).
    cuda_mps: str = "auto"

    @property
    def jobs_dir(self) -> Path:
        """Where job directories live."""
        return self.state_dir / "jobs"

    @property
    def http_dir(self) -> Path:
        """The HTTP gateway's own files: its ownership store and the uploads it passes to the daemon."""
        return self.state_dir / "http"

    @property
    def http_keys_file(self) -> Path:
        """Where the gateway's API key hashes live."""
        return Path(self.http.keys_file).expanduser() if self.http.keys_file else self.http_dir / "keys.json"

    def preset_for(self, model: str) -> Preset:
        """The preset of a repo id; local folders and unknown ids get the default model's."""
        return self.presets.get(model) or self.presets[self.default_model]

    def preset_fields(self, model: str, family: str, requested_schedule: str | None = None) -> dict[str, Any]:
        """Every JobSpec default for `model` of `family` (config/presets.py says which layer wins)."""
        own = self.presets.get(model)
        return resolve_preset_fields(own, self.presets[self.default_model], self.families[family], requested_schedule)

    def preset_pipeline(self, family: str, schedule: str, width: object, height: object) -> str:
        """The pipeline a run of `family` takes when no flag picks one (config/presets.py)."""
        return resolve_pipeline(self.families[family], schedule, width, height)


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Merge the layers and build Settings; raises ConfigError naming the bad layer and key."""
    environ = os.environ if environ is None else environ
    data, _ = layered_config(config_file, environ, overrides)
    return _build(data, environ)


def layered_config(
    config_file: Path | None, environ: Mapping[str, str], overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged config data, and for every value a layer set (`section.key`), the layer: the config
    file's path, the environment variable's name or "command line" (`ltx2 config` shows them)."""
    origins: dict[str, str] = {}
    data = _read_toml(DEFAULTS_FILE)
    user_file = config_file or _user_config_file(environ)
    if user_file is not None:
        _merge(data, _read_toml(user_file), str(user_file), origins)
    for name, (section, key) in ENV_OVERRIDES.items():
        if environ.get(name):
            value = _devices_from_env(environ[name]) if name == "LTX2_DEVICES" else None
            value = value or _coerce(data[section][key], environ[name], name)
            _merge(data, {section: {key: value}}, name, origins)
    if overrides:
        _merge(data, {k: dict(v) for k, v in overrides.items()}, "command line", origins)
    return data, origins


def _user_config_file(environ: Mapping[str, str]) -> Path | None:
    if environ.get("LTX2_CONFIG"):
        return Path(environ["LTX2_CONFIG"])
    candidate = Path(environ.get("XDG_CONFIG_HOME") or _home(environ) / ".config") / "ltx2-stages" / "config.toml"
    return candidate if candidate.is_file() else None


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ["HOME"]) if environ.get("HOME") else Path.home()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


def _merge(base: dict[str, Any], layer: Mapping[str, Any], origin: str, origins: dict[str, str]) -> None:
    """Overlay `layer` on `base` in place, noting `origin` for each value; unknown sections or keys are
    errors (naming the nearest known one), not ignored."""
    for section, values in layer.items():
        if section == "presets":
            base.setdefault("presets", {}).update(values)
            origins.update({f'presets."{name}"': origin for name in values})
            continue
        if section == "families":  # a layer may change single values of a family's preset
            for name, tables in values.items():
                for variant, preset in tables.items():
                    if not isinstance(preset, Mapping):
                        raise ConfigError(f'{origin}: families."{name}".{variant} must be a table')
                    base.setdefault("families", {}).setdefault(name, {}).setdefault(variant, {}).update(preset)
                    origins.update({f'families."{name}".{variant}.{key}': origin for key in preset})
            continue
        if section not in base or not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: unknown config section [{section}]{nearest_hint(section, base)}")
        if section in ("profiles", "cameras", "model_aliases"):
            base[section].update(values)
            origins.update({f"{section}.{key}": origin for key in values})
            continue
        for key, value in values.items():
            if key not in base[section]:
                raise ConfigError(f"{origin}: unknown setting {section}.{key}{nearest_hint(key, base[section])}")
            base[section][key] = value
            origins[f"{section}.{key}"] = origin


def nearest_hint(name: str, known: Mapping[str, Any]) -> str:
    """ "; did you mean X?" for the known name nearest to a mistyped one ("" if none is near)."""
    nearest = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {nearest[0]}?" if nearest else ""


def _coerce(default: object, text: str, origin: str) -> object:
    """Environment values are strings; convert to the type of the shipped default."""
    if isinstance(default, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"{origin}: expected true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{origin}: expected a whole number, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{origin}: expected a number, got {text!r}") from None
    return text


def _devices_from_env(text: str) -> int | list[str]:
    """`LTX2_DEVICES`: a number of lanes (`2`) or comma-separated device names (`cpu,cpu`)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    return [part.strip() for part in text.split(",")] if text != "auto" else []


def _devices(value: object) -> str | int | tuple[str, ...]:
    """`[cluster] devices`, checked: "auto", a whole number >= 1, or a list of device names."""
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"cluster.devices must be at least 1 lane, got {value!r}")
        return value
    if isinstance(value, list) and value and all(isinstance(name, str) for name in value):
        bad = [name for name in value if not DEVICE_NAME.fullmatch(name)]
        if bad:
            raise ConfigError(f'cluster.devices: {bad[0]!r} is not a device; name them like "cuda:0" or "cpu"')
        cuda = [number for name in value if name != "cpu" for number in name.removeprefix("cuda:").split("+")]
        if len(set(cuda)) != len(cuda):
            raise ConfigError(f"cluster.devices names a device twice: {value!r}; a lane is a device or a group of them")
        return tuple(value)
    raise ConfigError(
        f'cluster.devices must be "auto", a number of lanes (1 = one lane, as before), or a list of '
        f'devices like ["cuda:0", "cuda:2"] (["cpu", "cpu"] for CPU lanes); got {value!r}'
    )


def _lane_threads(value: object) -> str | int:
    """`[cluster] lane_threads`, checked: "auto" or a whole number >= 1 (from LTX2_LANE_THREADS, a digit string)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ConfigError(
        f'cluster.lane_threads must be "auto" (the CPUs shared evenly between lanes) or a number of threads'
        f" of at least 1; got {value!r}"
    )


def _context_parallel(value: object) -> int:
    """`[cluster] context_parallel`, checked: a number of processes of CONTEXT_PARALLEL_SIZES."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in CONTEXT_PARALLEL_SIZES:
        return value
    sizes = ", ".join(map(str, CONTEXT_PARALLEL_SIZES))
    raise ConfigError(
        f"cluster.context_parallel must be the number of processes of one clip's diffusion, one of {sizes}"
        f" (1 is off); got {value!r}"
    )


def _cluster_backend(cluster: Mapping[str, Any]) -> dict[str, str]:
    """`[cluster] backend`, `address` and `ray_resource`, checked."""
    if cluster["backend"] not in CLUSTER_BACKENDS:
        raise ConfigError(f"cluster.backend must be one of {', '.join(CLUSTER_BACKENDS)}; got {cluster['backend']!r}")
    for key in ("address", "ray_resource"):
        if not isinstance(cluster[key], str) or not cluster[key].strip():
            raise ConfigError(f"cluster.{key} must be a non-empty string, got {cluster[key]!r}")
    return {"backend": cluster["backend"], "address": cluster["address"], "ray_resource": cluster["ray_resource"]}


#: Not a setting: the denoising step the diffusion workers profile (services/step_profile.py). Checked with the
#: settings, so a typo stops `ltx2` and the daemon before any job rather than every diffusion attempt after its loads.
PROFILE_STEP = "LTX2_PROFILE_STEP"


def profile_step(environ: Mapping[str, str]) -> int | None:
    """The step index in LTX2_PROFILE_STEP (ASCII digits, blanks around them allowed), None when unset or blank."""
    raw = environ.get(PROFILE_STEP, "").strip()
    if not raw:
        return None
    if not re.fullmatch(r"[0-9]+", raw):
        raise ConfigError(f"{PROFILE_STEP} must be a step index (0, 1, 2, ...; 0 is a pass's first step); got {raw!r}")
    return int(raw)


def _build(data: dict[str, Any], environ: Mapping[str, str]) -> Settings:
    paths, models, worker, decode = data["paths"], data["models"], data["worker"], data["decode"]
    profiles = data["profiles"]
    profile_step(environ)
    if not isinstance(worker["group_size"], int) or worker["group_size"] < 1:
        raise ConfigError(f"worker.group_size must be a whole number >= 1, got {worker['group_size']!r}")
    for key in ("deterministic", "fp8_gelu_kernel", "qk_norm_rope_kernel", "whole_row_reductions"):
        if not isinstance(worker[key], bool):
            raise ConfigError(f"worker.{key} must be true or false, got {worker[key]!r}")
    if worker["overlap_stages"] not in OVERLAP_MODES:
        allowed = ", ".join(OVERLAP_MODES)
        raise ConfigError(f"worker.overlap_stages must be one of {allowed}; got {worker['overlap_stages']!r}")
    if (problem := cuda_mps.setting_problem(worker["cuda_mps"])) is not None:
        raise ConfigError(f"worker.cuda_mps {problem}")
    if decode["x264_preset"] not in X264_PRESETS:
        raise ConfigError(f"decode.x264_preset must be one of {', '.join(X264_PRESETS)}; got {decode['x264_preset']!r}")
    if decode["profile"] not in profiles:
        raise ConfigError(f"unknown profile {decode['profile']!r}; known: {', '.join(sorted(profiles))}")
    try:
        presets = {name: Preset(**values) for name, values in data.get("presets", {}).items()}
    except TypeError as exc:
        raise ConfigError(f"bad preset: {exc}") from None
    if models["default"] not in presets:
        raise ConfigError(f"no preset for the default model {models['default']!r}")
    families = _family_presets(data.get("families", {}))
    aliases = data["model_aliases"]
    for alias, model in aliases.items():
        if not isinstance(model, str) or model not in presets:
            raise ConfigError(f'model_aliases.{alias}: {model!r} has no preset (a [presets."{model}"] table)')
    state_home = Path(environ.get("XDG_STATE_HOME") or _home(environ) / ".local" / "state")
    return Settings(
        state_dir=Path(paths["state_dir"]).expanduser() if paths["state_dir"] else state_home / "ltx2-stages",
        output_dir=Path(paths["output_dir"]).expanduser(),
        input_roots=tuple(Path(root).expanduser() for root in paths["input_roots"]),
        cameras={name: (str(pair[0]), str(pair[1])) for name, pair in data["cameras"].items()},
        model_aliases=dict(aliases),
        default_model=models["default"],
        fallback_model=models["fallback"],
        presets=presets,
        families=families,
        heartbeat_s=float(worker["heartbeat_s"]),
        fork_server=bool(worker["fork_server"]),
        hung_after_s=float(worker["hung_after_s"]),
        stderr_tail_lines=int(worker["stderr_tail_lines"]),
        group_size=int(worker["group_size"]),
        fp8_fast_accumulation=bool(worker["fp8_fast_accumulation"]),
        fp8_gelu_kernel=worker["fp8_gelu_kernel"],
        qk_norm_rope_kernel=worker["qk_norm_rope_kernel"],
        whole_row_reductions=worker["whole_row_reductions"],
        max_attempts_per_stage=int(data["policy"]["max_attempts_per_stage"]),
        same_plan_retries=int(data["policy"]["same_plan_retries"]),
        decode=DecodeSettings(
            profile=decode["profile"],
            budget_gib=float(profiles[decode["profile"]]["decode_budget_gib"]),
            tile_size=int(decode["tile_size"]),
            tile_overlap=int(decode["tile_overlap"]),
            chunk_overlap_latent_frames=int(decode["chunk_overlap_latent_frames"]),
            x264_preset=str(decode["x264_preset"]),
        ),
        daemon=DaemonSettings(**{**data["daemon"], "request_timeout_s": float(data["daemon"]["request_timeout_s"])}),
        devices=_devices(data["cluster"]["devices"]),
        lane_threads=_lane_threads(data["cluster"]["lane_threads"]),
        context_parallel=_context_parallel(data["cluster"]["context_parallel"]),
        **_cluster_backend(data["cluster"]),
        http=_http(data["http"]),
        deterministic=worker["deterministic"],
        overlap_stages=worker["overlap_stages"],
        cuda_mps=worker["cuda_mps"],
    )


def _family_presets(data: Mapping[str, Any]) -> dict[str, FamilyPresets]:
    """`[families]`, checked: a distilled and a dev table for every family protocol/families.py knows."""
    try:
        families = build_family_presets(data)
    except (TypeError, KeyError) as exc:
        raise ConfigError(f"bad family preset: {exc}") from None
    missing = [family.name for family in FAMILIES if family.name not in families]
    if missing:
        raise ConfigError(f'no [families."{missing[0]}"] preset (needs a distilled and a dev table)')
    return families


def _http(values: dict[str, Any]) -> HttpSettings:
    """`[http]`, checked: a host, a port, positive limits, and a body cap that holds the upload cap."""
    if not isinstance(values["host"], str) or not values["host"].strip():
        raise ConfigError(f"http.host must be a host name or address, got {values['host']!r}")
    if not isinstance(values["keys_file"], str):
        raise ConfigError(f"http.keys_file must be a path, got {values['keys_file']!r}")
    if not _whole(values["port"]) or not 1 <= values["port"] <= 65535:
        raise ConfigError(f"http.port must be a whole number 1-65535, got {values['port']!r}")
    for key in HTTP_WHOLE_LIMITS:
        if not _whole(values[key]) or values[key] < 1:
            raise ConfigError(f"http.{key} must be a whole number >= 1, got {values[key]!r}")
    for key in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "create_timeout_s"):
        if not _number(values[key]) or not 0 < values[key] <= MAX_HTTP_TIMEOUT_S:
            raise ConfigError(f"http.{key} must be a number of seconds above 0 and at most {MAX_HTTP_TIMEOUT_S:g}")
    if values["max_body_bytes"] <= values["max_upload_bytes"]:
        raise ConfigError(
            f"http.max_body_bytes ({values['max_body_bytes']}) must exceed http.max_upload_bytes "
            f"({values['max_upload_bytes']}): a request carries the upload and its form fields"
        )
    names = values["metrics_keys"]
    if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
        raise ConfigError(f"http.metrics_keys must be a list of key names, got {names!r}")
    return HttpSettings(**{**values, "metrics_keys": tuple(names), "exact_sizes": _exact_sizes(values["exact_sizes"])})


def _exact_sizes(sizes: object) -> tuple[str, ...]:
    """`[http] exact_sizes`, checked: "WxH" sizes whose sides a crop can deliver (even, MIN_CROP_SIZE to MAX_SIZE)."""
    if not isinstance(sizes, list):
        raise ConfigError(f'http.exact_sizes must be a list of sizes like "720x1280", got {sizes!r}')
    for size in sizes:
        match = EXACT_SIZE.fullmatch(size) if isinstance(size, str) else None
        sides = (int(match[1]), int(match[2])) if match else (0,)
        if not all(side % CROP_MULTIPLE == 0 and MIN_CROP_SIZE <= side <= MAX_SIZE for side in sides):
            raise ConfigError(
                f"http.exact_sizes: {size!r} is not WIDTHxHEIGHT with even sides from {MIN_CROP_SIZE} to {MAX_SIZE}"
            )
    return tuple(sizes)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""A request's digest: one SHA-256 of everything that decides a job's output bits (DESIGN.md rule 6).

Two jobs with the same digest render bit-equal latents and a byte-identical MP4 and WAV when their
stages ran the plans recorded with the digest (no lower-memory rung after an OOM). What goes in,
kept beside the digest in job.json (`digest_inputs`) so a user can see why two digests differ:

- `request`: the validated spec without the fields that name files (replaced below) or change no bit
  (`name`, the output's file stem; `drop_caches`, the page-cache flush after the job);
- `model`: the checkpoint's files. In the Hugging Face cache every file is a link to a blob named by
  its content hash (SHA-256 for weights), so the link targets identify the bytes for free; in a local
  folder a file is identified by its size and modification time (hashing 40 GB per job would cost
  minutes), so an edit that keeps both is not seen;
- `loras`, `stage2_lora`, `image`: the SHA-256 of each file's bytes (a cached blob's name, else
  hashed once and remembered by path, size, time and inode under `<state>/file-hashes`), with the scale;
- `conditions` (only when the request has keyframes): each keyframe's SHA-256, the pixel frame it starts
  at (a requested -1 resolved), its strength and CRF, in the order the pipeline applies them;
- `extension` (only for an extension): the source video's SHA-256, its frame count and the overlap (the
  request names the source by job id or path; its bytes are what decide the output);
- `reference_video` (only when the request has an IC-LoRA control video): its SHA-256 and strength (its
  downscale factor, resolved, is in `request`);
- `retake` (only for a retake): the SHA-256 of the source job's latents file and the range (the request
  names the source by job id; a rerun of that job could hold other bytes);
- `plans`: each stage's first plan (orchestrator.run.policy.initial_plan), which carries every setting that
  changes numerics: FP8 accumulation, compile and Inductor's deterministic mode, the decode plan the
  memory profile picks, x264's preset and thread count, where the audio decodes;
- `versions`: the packages whose code computes the bits (torch's version names its CUDA build), and
  a hash of this project's stage code (`services/*.py`), whose version number does not move per change;
- `device`: the GPU model and driver (or the CPU model when no GPU is visible). A farm's node may hold
  another GPU than the host that queued the job; the digest names the queuing host's.

Everything here is read from files and package metadata: no torch, no GPU initialised.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import re
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.policy import initial_plan
from protocol.files import Stage, publish, temp_path_for
from protocol.job_record import ResolvedAudio, ResolvedCondition, ResolvedExtension, ResolvedReference, ResolvedRetake
from protocol.spec import SPEC_FIELDS, JobSpec

# Packages whose code computes the latents, the waveform or the MP4's bytes (PyAV carries FFmpeg and x264).
NUMERIC_PACKAGES = ("ltx2-stages", "torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "av")
# Spec fields that change no bit of the output (declared with digest=False in protocol/spec.py).
UNDIGESTED_FIELDS = frozenset(declared.name for declared in SPEC_FIELDS if not declared.digest)
# Spec fields that name files: the digest holds the files' identities instead of their names.
FILE_FIELDS = frozenset(
    {"model", "image", "loras", "stage2_lora", "conditions", "extend", "retake", "reference_video", "audio"}
)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
# Jetson modules have an integrated GPU that /proc/driver/nvidia/gpus does not list; the board says which.
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
HASH_CHUNK = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class RequestIdentity:
    """A request's digest and what it was computed from."""

    digest: str
    inputs: dict[str, Any]

    @property
    def deterministic(self) -> bool:
        """Whether the job renders in deterministic mode (`[worker] deterministic` when it was created)."""
        return bool(self.inputs["deterministic"])


def identify(
    spec: JobSpec,
    model: ResolvedModel,
    settings: Settings,
    loras: tuple[dict[str, Any], ...] = (),
    stage2_lora: dict[str, Any] | None = None,
    image: Path | None = None,
    conditions: tuple[ResolvedCondition, ...] = (),
    extension: ResolvedExtension | None = None,
    reference: ResolvedReference | None = None,
    retake: ResolvedRetake | None = None,
    audio: ResolvedAudio | None = None,
) -> RequestIdentity:
    """The identity of a validated request whose files were resolved (orchestrator.run.jobspec.BuiltSpec).

    `conditions` and `extension` enter only when there are any, so the digest of every request without them
    is what it was.
    """
    hashes = FileHashes(settings.state_dir / "file-hashes")
    inputs = {
        "request": {k: v for k, v in spec.to_dict().items() if k not in UNDIGESTED_FIELDS | FILE_FIELDS},
        "model": model_files(model.path),
        "loras": [{"sha256": hashes.of(Path(lora["path"])), "scale": lora["scale"]} for lora in loras],
        "stage2_lora": None if stage2_lora is None else {"sha256": hashes.of(Path(stage2_lora["path"]))},
        "image": None if image is None else file_sha256(image),
        "deterministic": settings.deterministic,
        "plans": {stage.value: initial_plan(stage, spec, settings) for stage in Stage},
        "versions": numeric_versions(),
        "device": device_identity(),
    }
    if conditions:
        inputs["conditions"] = [condition_identity(condition) for condition in conditions]
    if extension is not None:
        inputs["extension"] = {"sha256": extension.sha256, "frames": extension.frames, "overlap": extension.overlap}
    if reference is not None:  # left out otherwise, so every digest made before control videos stays
        inputs["reference_video"] = {"sha256": reference.sha256, "strength": reference.strength}
    if retake is not None:  # the source's latents by their bytes (its id would name other bytes after a rerun)
        inputs["retake"] = {"sha256": retake.sha256, "from_frame": retake.from_frame, "to_frame": retake.to_frame}
    if audio is not None:  # the soundtrack by its bytes; left out otherwise, so earlier digests stay
        inputs["audio"] = {"sha256": audio.sha256}
    return RequestIdentity(sha256_json(inputs), inputs)


def condition_identity(condition: ResolvedCondition) -> dict[str, Any]:
    """What of a keyframe decides the output: its bytes, where it starts, how strongly, its CRF."""
    return {"sha256": condition.sha256, "frame": condition.frame, "strength": condition.strength, "crf": condition.crf}


def sha256_json(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_files(folder: Path) -> str:
    """One hash of a checkpoint folder's files: each cached file's blob name, else its size and mtime."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        target = path.resolve()
        if path.is_symlink() and target.parent.name == "blobs":
            files[path.relative_to(folder).as_posix()] = target.name
        else:
            status = target.stat()
            files[path.relative_to(folder).as_posix()] = f"{status.st_size}:{status.st_mtime_ns}"
    return sha256_json(files)


class FileHashes:
    """SHA-256 of files' bytes, each computed once: remembered under `folder` by path, size, mtime and
    inode, so a LoRA of hundreds of MB is read once, not by every job that names it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def of(self, path: Path) -> str:
        target = path.resolve()
        if target.parent.name == "blobs" and SHA256_HEX.fullmatch(target.name):
            return target.name  # a Hugging Face cache blob is named by its SHA-256
        status = target.stat()
        key = sha256_json([str(target), status.st_size, status.st_mtime_ns, status.st_ino])
        remembered = self.folder / key
        try:
            known = remembered.read_text()
        except OSError:
            known = ""
        if SHA256_HEX.fullmatch(known):
            return known
        digest = file_sha256(target)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temp = temp_path_for(remembered)
            temp.write_text(digest)
            publish(temp, remembered)
        except OSError:  # a read-only or full state dir only costs hashing again next time
            pass
        return digest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def numeric_versions() -> dict[str, str | None]:
    """Installed versions of NUMERIC_PACKAGES and the stage code's hash."""
    return {**installed_versions(NUMERIC_PACKAGES), "ltx2-stages code": stage_code()}


def installed_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of `names` (None for one not installed), from package metadata: nothing is imported."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def stage_code() -> str:
    """One hash of the stage workers' source files (services/), which compute every bit of a clip."""
    folder = Path(__file__).resolve().parents[2] / "services"
    return sha256_json({path.name: file_sha256(path) for path in sorted(folder.glob("*.py"))})


@functools.cache
def device_identity() -> str:
    """The accelerator the stages run on, as the kernel driver names it, with the driver's version;
    the CPU's model when no GPU is visible (CUDA_VISIBLE_DEVICES empty, or none installed)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() not in ("", "-1"):
        models = sorted({model for info in NVIDIA_GPUS.glob("*/information") if (model := info_model(info))})
        if not models and DEVICE_TREE_MODEL.is_file() and "jetson" in (board := read_text(DEVICE_TREE_MODEL)).lower():
            models = [board.strip("\x00").strip()]
        if models:
            driver = read_text(NVIDIA_DRIVER).splitlines()
            return f"gpu: {', '.join(models)}; driver: {driver[0].strip() if driver else 'unknown'}"
    return f"cpu: {cpu_model()}"


def cpu_model() -> str:
    """/proc/cpuinfo's model name (x86), or its Model / CPU part line (Arm); the machine type if none."""
    for line in read_text(Path("/proc/cpuinfo")).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "CPU part"):
            return value.strip()
    return os.uname().machine


def info_model(info: Path) -> str:
    """The `Model:` line of a /proc/driver/nvidia/gpus/<bus>/information file."""
    for line in read_text(info).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model":
            return value.strip()
    return ""


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""

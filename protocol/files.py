"""The file contract: what each stage writes into a job directory and how it is verified.

File names are written here once. A stage is finished when every output it declares exists and
matches the size and SHA-256 recorded in `job.json` when the stage succeeded (DESIGN.md rule 1);
such a stage is skipped on a re-run, which makes crash recovery and "decode from saved latents"
the same code path as a normal run.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import threading
from pathlib import Path

JOB_FILE = "job.json"
EVENTS_FILE = "events.log"
LATENTS_FILE = "latents.safetensors"
# Two-stage runs only: stage 1's half-size latents and generator state, kept so a retry resumes at stage 2
# (services/two_stage.py verifies it); an intermediate file of encode_diffuse, not one of its declared outputs.
STAGE1_LATENTS_FILE = "latents_stage1.safetensors"
AUDIO_FILE = "audio.wav"
VIDEO_FILE = "video.mp4"
INPUT_IMAGE_FILE = "input_image.png"
# Extension jobs (protocol/extension.py): the source video as the job copied it, and the video_decode stage's
# second output, the source followed by the new frames after the overlap.
EXTEND_SOURCE_FILE = "extend_source.mp4"
JOINED_FILE = "joined.mp4"
# Retake jobs (protocol/retake.py): the source job's latents as the job holds them (hard-linked); or, retaking a
# video file, the file as the job holds it and its VAE encoding, which the diffusion stage writes before it
# denoises (an intermediate file of encode_diffuse, not one of its declared outputs: the latents it holds).
RETAKE_SOURCE_FILE = "retake_source.safetensors"
RETAKE_SOURCE_VIDEO_FILE = "retake_source.mp4"
RETAKE_ENCODED_FILE = "retake_encoded.safetensors"
FIRST_FRAME_FILE = "first.png"
LAST_FRAME_FILE = "last.png"
# Hashing reads files in pieces so a multi-GB MP4 never sits in memory.
HASH_CHUNK_BYTES = 4 << 20
# safetensors caps its JSON header at 100 MB; anything larger is not a safetensors file.
SAFETENSORS_HEADER_LIMIT = 100_000_000


class Stage(enum.StrEnum):
    """The stages of a job, in the order they run."""

    ENCODE_DIFFUSE = "encode_diffuse"  #: prompt -> latents.safetensors
    AUDIO_DECODE = "audio_decode"  #: latents -> audio.wav
    VIDEO_DECODE = "video_decode"  #: latents (+ audio.wav) -> video.mp4

    @property
    def outputs(self) -> tuple[str, ...]:
        """Files this stage produces inside the job directory."""
        return STAGE_OUTPUTS[self]

    @property
    def module(self) -> str:
        """The module a worker for this stage runs as (`python -m <module>`)."""
        return f"services.{self.value}"


STAGE_OUTPUTS: dict[Stage, tuple[str, ...]] = {
    Stage.ENCODE_DIFFUSE: (LATENTS_FILE,),
    Stage.AUDIO_DECODE: (AUDIO_FILE,),
    Stage.VIDEO_DECODE: (VIDEO_FILE, FIRST_FRAME_FILE, LAST_FRAME_FILE),
}
STAGE_ORDER: tuple[Stage, ...] = (Stage.ENCODE_DIFFUSE, Stage.AUDIO_DECODE, Stage.VIDEO_DECODE)


def fingerprint_file(path: Path) -> dict[str, int | str]:
    """Size and SHA-256 of a file, as recorded in job.json for later verification."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def matches_fingerprint(path: Path, expected: dict[str, int | str]) -> bool:
    """True when `path` exists with the recorded size and hash (size is checked first: cheap)."""
    if not path.is_file() or path.stat().st_size != expected.get("size"):
        return False
    return fingerprint_file(path) == expected


def temp_path_for(path: Path) -> Path:
    """The name a file is written under before its atomic rename (same directory, same suffix): its own
    per process *and thread*, so two threads of one daemon saving one job.json (a cancel and the executor)
    never rename each other's half of it away (the second rename then found no file)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{threading.get_native_id()}{path.suffix}")


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its JSON header (no torch needed).

    The format starts with an 8-byte little-endian header length and that many bytes of JSON; the
    tensors' data follows, and a file shorter than the header's offsets say (cut short by a full
    disk or a killed copy) is refused with a ValueError, as is a header that is not JSON.
    """
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size <= SAFETENSORS_HEADER_LIMIT:
            raise ValueError(f"{path} is not a safetensors file")
        header = json.loads(handle.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file")
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    data = path.stat().st_size - 8 - size
    if data < max(ends, default=0):
        raise ValueError(f"its tensor data is cut short: {data} of {max(ends)} bytes")
    return dict(header.get("__metadata__") or {})


def publish(temp: Path, final: Path) -> None:
    """fsync a finished temp file and rename it into place, then fsync the directory.

    After this returns the file survives a crash or power loss under its final name, and no reader
    ever sees a half-written file under that name.
    """
    with temp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

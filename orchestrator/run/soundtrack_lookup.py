"""A request's soundtrack (`--audio`, audio-to-video) checked before any job exists.

The file must lie inside the input roots and start like an audio file PyAV reads (protocol/soundtrack.py);
the orchestrator decodes nothing (it imports no decoder), so whether the track decodes and covers the
clip is the diffusion stage's to refuse (exit code 2, naming --audio and the file). What comes out is
recorded in job.json as protocol.job_record.ResolvedAudio and the file is copied into the job
(DESIGN.md rule 12).
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.run.inputs import require_file
from orchestrator.run.request_digest import FileHashes
from protocol.job_record import ResolvedAudio
from protocol.soundtrack import AUDIO_FIELD, AUDIO_FORMATS, looks_like_audio, stored_audio_name
from protocol.spec import JobSpec
from protocol.spec_rules import SpecError

#: A checked soundtrack: its file (to copy into the job) and what job.json records of it.
CheckedAudio = tuple[Path, ResolvedAudio]
HEADER_BYTES = 16


def resolve_audio(spec: JobSpec, roots: tuple[Path, ...], hashes: FileHashes) -> CheckedAudio | None:
    """The checked soundtrack; None without one."""
    if spec.audio is None:
        return None
    path = require_file(Path(spec.audio).expanduser(), roots, AUDIO_FIELD)
    try:
        with path.open("rb") as file:
            head = file.read(HEADER_BYTES)
    except OSError as exc:
        raise SpecError(AUDIO_FIELD, f"cannot read {spec.audio}: {exc}") from None
    if not looks_like_audio(head):
        raise SpecError(AUDIO_FIELD, f"{spec.audio} does not start like an audio file ({AUDIO_FORMATS})")
    return path, ResolvedAudio(source=spec.audio, file=stored_audio_name(spec.audio), sha256=hashes.of(path))

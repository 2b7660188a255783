"""Publishing a finished job into the output folder: one recorded step, all files or none.

A published clip is four files: `<stem>.mp4`, `<stem>_first.png`, `<stem>_last.png` and the sidecar
`<stem>.json` (orchestrator.run.sidecar); an extension's is five: `<stem>.mp4` is its joined video (the
source, then the new frames) and `<stem>_new.mp4` the new part alone, whose first and last frames the
PNGs are. Several renames cannot happen at once, so the step is recorded in job.json under `publish`
before the output folder is touched:

1. the final names are chosen and recorded (`complete: false`, with the size and SHA-256 of the
   job's video.mp4), and `publish_started` is logged;
2. each file is written under a temp name `.<final name>.<job id>.tmp`, fsynced and renamed into
   place: the sidecar first, then the PNGs, the MP4 LAST, so an MP4 in the output folder always has
   its PNGs and sidecar beside it;
3. `complete: true` is recorded and `published` logged.

Without an explicit target the stem is `<name>_<stamp>[_N]`, where the stamp is the job id's own
(`YYYYmmdd-HHMMSS`, when the job was made: orchestrator.run.jobdir.job_stamp), so a file and its job
are matched by eye; the name is the request's (`--name`) or its prompt's first words
(orchestrator.run.jobspec.build_spec). The sidecar is hard-linked into place rather than renamed: a
link fails if the name exists, so it reserves the stem and two jobs made in the same second never
take (or overwrite) each other's names. With a
target (`ltx2 decode --output`) that exact path and its companions are replaced.

Running the step again (a restarted daemon re-runs its interrupted job, `ltx2 batch` its file,
`ltx2 decode` a job directory) never publishes a job twice:
- recorded complete, the same video, every file present: nothing is copied; the recorded path;
- recorded but not complete (the process died midway): this job's temp files are removed and the
  recorded names are used again (no second timestamped copy); a target other than the recorded
  one abandons the unfinished publish instead, removing the files it had placed under a name it
  had reserved (an explicit target's files are left, as they replaced the user's);
- the job's video changed since (a stage ran again): a new publish; the earlier one stays.

A publish that fails midway (the output folder filled up) removes the files it had landed before
it reports the error, so the folder is left as it was before the publish began (all or nothing).

The tests kill the publishing process at three fault points (`publish.first_file`, `publish.video`,
`publish.done`; protocol/fault_points.py) to check that running the step again finishes it.

From the job it uses only `path`, `id`, `spec`, `record.publish` (protocol.job_record.PublishRecord,
read; written through `record_publish()`) and `log_event()` (and the sidecar builder), so it does not
depend on how the job's lifecycle is kept.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from orchestrator.run.jobdir import JobDir, job_stamp
from orchestrator.run.sidecar import build_sidecar
from orchestrator.run.states import EventKind
from protocol.fault_points import fault_point
from protocol.files import FIRST_FRAME_FILE, JOINED_FILE, LAST_FRAME_FILE, VIDEO_FILE, fingerprint_file, publish
from protocol.job_record import Fingerprint, PublishRecord

# Published files are for people and players, whatever the umask of the orchestrator.
PUBLISHED_MODE = 0o644


def publish_job(job: JobDir, output_dir: Path, target: Path | None = None) -> Path:
    """Publish the job's MP4 with its PNGs and sidecar, once; returns the MP4's path.

    Without `target` the MP4 gets the first free `output_dir/<name>_<job stamp>[_N].mp4`; with it,
    exactly `target` (replaced if it exists). See the module docstring for what a second call does.
    """
    source = fingerprint_file(job.path / main_video(job))
    previous = job.record.publish
    wanted = target.resolve() if target is not None else None
    recorded = None
    if previous is not None:
        if is_published(previous, source, wanted):
            return Path(previous.video)
        remove_temp_files(job, previous)
        if wanted is None and (not previous.complete or previous.source == source):
            recorded = Path(previous.video)  # the same names again
            wanted = recorded if previous.explicit else None
        elif not previous.complete and wanted != Path(previous.video):
            abandon(job, previous)
    if wanted is not None:
        wanted.parent.mkdir(parents=True, exist_ok=True)
        start(job, wanted, source, explicit=True)
        land_sidecar(job, wanted, replace=True)
        video = wanted
    else:
        video = reserve_name(job, output_dir, source, recorded)
    fault_point("publish.first_file")
    land_rest(job, video)
    fault_point("publish.video")
    job.record_publish(dataclasses.replace(job.record.publish, complete=True))
    job.log_event(EventKind.PUBLISHED, video=str(video))
    fault_point("publish.done")
    return video


def main_video(job: JobDir) -> str:
    """The job file published as `<stem>.mp4`: an extension's joined video (the new part alone is
    `<stem>_new.mp4`), else the video."""
    return JOINED_FILE if is_extension(job) else VIDEO_FILE


def is_extension(job: JobDir) -> bool:
    return job.record.extension is not None


def land_rest(job: JobDir, video: Path) -> None:
    """Land the PNGs (and an extension's new part) and then the MP4 beside the sidecar already in place;
    if one cannot be written (the folder filled up), the files of this publish already there are removed
    again, the MP4 first, so the folder never keeps a sidecar or PNGs without their video (all or nothing)."""
    files = companions(video, is_extension(job))
    sources = [FIRST_FRAME_FILE, LAST_FRAME_FILE, *([VIDEO_FILE] if is_extension(job) else []), main_video(job)]
    landed = [files[0]]
    try:
        for source, final in zip(sources, files[1:], strict=True):
            land_copy(job, job.path / source, final)
            landed.append(final)
    except OSError:
        undo(job, video, landed)
        raise


def undo(job: JobDir, video: Path, landed: list[Path]) -> None:
    """Remove the files a failed publish of `video` had landed, newest first (the record keeps the
    names, so a later run publishes under them again; a file it never replaced is left alone).
    Best effort: the publish's own error is what the caller reports."""
    removed = []
    for path in reversed(landed):
        try:
            path.unlink(missing_ok=True)
            removed.append(str(path))
        except OSError:
            continue
    try:
        job.log_event(EventKind.PUBLISH_UNDONE, video=str(video), removed=removed)
    except OSError:  # the state dir may be the full disk
        pass


def companions(video: Path, extension: bool = False) -> list[Path]:
    """Every file of one publish, in the order they land: sidecar, first and last frame, for an
    `extension` its new part alone (`_new.mp4`), the MP4 last."""
    new_part = [video.with_name(f"{video.stem}_new.mp4")] if extension else []
    return [
        video.with_suffix(".json"),
        video.with_name(f"{video.stem}_first.png"),
        video.with_name(f"{video.stem}_last.png"),
        *new_part,
        video,
    ]


def temp_name(final: Path, job: JobDir) -> Path:
    """The temp name of a published file: hidden, beside it, and naming the job, so a re-run of
    the job finds (and removes) exactly its own leftovers."""
    return final.with_name(f".{final.name}.{job.id}.tmp")


def is_published(record: PublishRecord, source: Fingerprint, wanted: Path | None) -> bool:
    """True when the recorded publish finished, for this video, where it is wanted, and its files
    exist (the MP4 with the job video's size: a cheap check that it was not cut or edited since)."""
    video = Path(record.video)
    return (
        record.complete
        and record.source == source
        and wanted in (None, video)
        and all(Path(name).is_file() for name in record.files)
        and video.stat().st_size == source["size"]
    )


def start(job: JobDir, video: Path, source: Fingerprint, explicit: bool) -> None:
    """Record the names before any of them is touched (step 1)."""
    again = job.record.publish is not None and job.record.publish.video == str(video)
    job.record_publish(
        PublishRecord(
            video=str(video),
            files=[str(path) for path in companions(video, is_extension(job))],
            explicit=explicit,
            source=source,
            complete=False,
        )
    )
    job.log_event(EventKind.PUBLISH_STARTED, video=str(video), again=again)


def reserve_name(job: JobDir, output_dir: Path, source: Fingerprint, recorded: Path | None) -> Path:
    """Record a free stem and land the sidecar under it (step 1 and the first file); the MP4's path.

    The recorded name of an unfinished publish comes first: its sidecar is either this job's (the
    stem is still reserved for it) or absent. Then come `<name>_<stamp>[_N]` names none of whose
    four files exist. Linking the sidecar is what takes a stem; when another job got there first
    (between the look and the link), or another program's file uses the stem, the next one is tried.
    """
    stamp = job_stamp(job.id)
    for video in itertools.chain([recorded] if recorded else [], free_names(job, output_dir, stamp)):
        video.parent.mkdir(parents=True, exist_ok=True)
        start(job, video, source, explicit=False)
        if owns_name(job, video):
            land_sidecar(job, video, replace=True)
            return video
        if land_sidecar(job, video, replace=False):
            if not any(path.exists() for path in companions(video, is_extension(job))[1:]):
                return video
            video.with_suffix(".json").unlink()
    raise AssertionError("unreachable: free_names never ends")


def free_names(job: JobDir, output_dir: Path, stamp: str) -> Iterator[Path]:
    """`output_dir/<name>_<stamp>[_N].mp4` for N = 1, 2, ..., skipping stems with any file present."""
    folder = output_dir.resolve()
    for counter in itertools.count():
        video = folder / f"{job.spec.name}_{stamp}{f'_{counter}' if counter else ''}.mp4"
        if not any(path.exists() for path in companions(video, is_extension(job))):
            yield video


def owns_name(job: JobDir, video: Path) -> bool:
    """True when the sidecar under the video's stem is this job's: the stem is reserved for it."""
    try:
        sidecar = json.loads(video.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(sidecar, dict) and sidecar.get("job_id") == job.id and sidecar.get("video") == video.name


def land_sidecar(job: JobDir, video: Path, replace: bool) -> bool:
    """Write the sidecar under its temp name and put it in place; False when the name was taken.

    With `replace` it is renamed over whatever is there; otherwise it is hard-linked, which fails
    (False) if the name exists.
    """
    final = video.with_suffix(".json")
    temp = temp_name(final, job)
    if replace:
        try:
            write_sidecar(job, video, temp)
            publish(temp, final)
        except OSError:  # a full disk must not keep the half copy
            temp.unlink(missing_ok=True)
            raise
        return True
    try:
        write_sidecar(job, video, temp)
        with temp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.link(temp, final)
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)
    fsync_directory(final.parent)
    return True


def write_sidecar(job: JobDir, video: Path, temp: Path) -> None:
    temp.write_text(json.dumps(build_sidecar(job, video), indent=2, sort_keys=True) + "\n")
    os.chmod(temp, PUBLISHED_MODE)


def land_copy(job: JobDir, source: Path, final: Path) -> None:
    """Copy a job file under its temp name, then fsync and rename it into place."""
    temp = temp_name(final, job)
    try:
        shutil.copyfile(source, temp)
        os.chmod(temp, PUBLISHED_MODE)
        publish(temp, final)
    except OSError:  # a full disk must not keep the half copy
        temp.unlink(missing_ok=True)
        raise


def fsync_directory(directory: Path) -> None:
    """Make a new name in `directory` survive a crash (protocol.files.publish does this for renames)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_temp_files(job: JobDir, record: PublishRecord) -> None:
    """Delete temp files a killed earlier publish of this job left beside its recorded names."""
    for directory in {Path(name).parent for name in record.files}:
        for leftover in directory.glob(f".*.{job.id}.tmp"):
            leftover.unlink(missing_ok=True)
            job.log_event(EventKind.PUBLISH_TEMP_REMOVED, name=str(leftover))


def abandon(job: JobDir, record: PublishRecord) -> None:
    """Undo an unfinished publish that a publish elsewhere replaces, so no half set stays behind.

    Files under a stem this job reserved are its own and go, the MP4 first (the order keeps every
    MP4 with its companions). Files under an explicit target replaced the user's and stay.
    """
    video = Path(record.video)
    removed = []
    if not record.explicit and owns_name(job, video):
        for path in reversed(companions(video, is_extension(job))):
            if path.exists():
                path.unlink()
                removed.append(str(path))
    job.log_event(EventKind.PUBLISH_ABANDONED, video=str(video), removed=removed)

"""A video file's frame count and size, read from its MP4/QuickTime boxes: no decoder, no PyAV.

The orchestrator refuses a video condition that runs past the clip before any job exists, so it must
know the video's frames; the daemon and the CLI import no media library (they stay light, and a
malformed file never crashes a decoder inside the long-lived daemon). ISO base media files (MP4,
M4V, MOV) say it in their sample tables: the video track (handler `vide`) holds one sample per frame,
counted by its `stsz` box, and its `tkhd` box holds the picture's size. Other containers, and
fragmented MP4 (whose samples are in `moof` boxes), are refused with a message saying what is read.
The worker decodes the frames with PyAV (services/media.py).
"""

from __future__ import annotations

import dataclasses
import struct
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

# The `moov` box holds only tables; a larger one is no video a keyframe needs (a 2-hour film's is ~20 MB).
MAX_MOOV_BYTES = 64 * 1024 * 1024
# The boxes an MP4 or QuickTime file may open with.
FIRST_BOXES = {b"ftyp", b"wide", b"free", b"skip", b"moov", b"mdat", b"pnot"}


class VideoHeaderError(ValueError):
    """The file is not an MP4/QuickTime video whose frames can be counted from its header."""


@dataclasses.dataclass(frozen=True)
class VideoHeader:
    frames: int
    width: int
    height: int
    #: frames per second: the frame count over the track's sample durations (`stts`), in its time scale (`mdhd`)
    fps: float | None = None
    #: whether the file has an audio track too (handler `soun`)
    has_audio: bool = False


def read_video_header(path: Path) -> VideoHeader:
    """The frame count, size and frame rate of the first video track of an MP4/M4V/MOV file, and whether the
    file has an audio track (a retake of the file keeps its audio only then)."""
    with path.open("rb") as handle:
        moov = find_moov(handle, path.stat().st_size)
    tracks = children(moov, b"trak")
    has_audio = any(handler_of(trak) == b"soun" for trak in tracks)
    for trak in tracks:
        header = video_track(trak)
        if header is not None:
            return dataclasses.replace(header, has_audio=has_audio)
    raise VideoHeaderError("it has no video track")


def handler_of(trak: bytes) -> bytes | None:
    """A track's handler type (`vide`, `soun`, ...), or None when it has none."""
    handler = child(trak, (b"mdia", b"hdlr"))
    return None if handler is None else handler[8:12]


def find_moov(handle: BinaryIO, size: int) -> bytes:
    """The `moov` box's payload, found among the top-level boxes (it may follow the media data)."""
    offset = 0
    first = True
    while offset + 8 <= size:
        handle.seek(offset)
        data = handle.read(16)
        if first and data[4:8] not in FIRST_BOXES:
            raise VideoHeaderError("it is not an MP4 or QuickTime file (only those are read for their frame count)")
        first = False
        kind, header, length = box_header(data, size - offset)
        if kind == b"moov":
            if length - header > MAX_MOOV_BYTES:
                raise VideoHeaderError(f"its header is larger than {MAX_MOOV_BYTES} bytes")
            handle.seek(offset + header)
            return handle.read(length - header)
        if kind == b"moof":
            break
        offset += length
    raise VideoHeaderError(
        "it has no sample table (a fragmented or cut-short MP4); remux it, e.g. ffmpeg -i IN -c copy OUT.mp4"
    )


def box_header(data: bytes, room: int) -> tuple[bytes, int, int]:
    """(type, header bytes, whole box length) of the box starting at `data`, within `room` bytes."""
    if len(data) < 8:
        raise VideoHeaderError("it is cut short")
    length, kind = struct.unpack(">I4s", data[:8])
    header = 8
    if length == 1:
        if len(data) < 16:
            raise VideoHeaderError("it is cut short")
        (length,) = struct.unpack(">Q", data[8:16])
        header = 16
    elif length == 0:
        length = room
    if length < header or length > room:
        raise VideoHeaderError("its boxes do not add up (a damaged or cut-short file)")
    return kind, header, length


def children(payload: bytes, wanted: bytes) -> list[bytes]:
    """The payloads of the boxes of type `wanted` directly inside `payload`."""
    found, offset = [], 0
    while offset + 8 <= len(payload):
        kind, header, length = box_header(payload[offset : offset + 16], len(payload) - offset)
        if kind == wanted:
            found.append(payload[offset + header : offset + length])
        offset += length
    return found


def child(payload: bytes, path: tuple[bytes, ...]) -> bytes | None:
    """The first box at `path` (types, outermost first) inside `payload`, or None."""
    for kind in path:
        boxes = children(payload, kind)
        if not boxes:
            return None
        payload = boxes[0]
    return payload


def video_track(trak: bytes) -> VideoHeader | None:
    """The header of a `trak` if it is a video track (handler `vide`), else None."""
    if handler_of(trak) != b"vide":
        return None
    sizes = child(trak, (b"mdia", b"minf", b"stbl", b"stsz"))
    tkhd = child(trak, (b"tkhd",))
    if sizes is None or len(sizes) < 12 or tkhd is None:
        raise VideoHeaderError("its video track has no sample table")
    (frames,) = struct.unpack(">I", sizes[8:12])
    if frames == 0:
        raise VideoHeaderError("its video track holds no frames in its sample table (a fragmented MP4?)")
    width, height = track_size(tkhd)
    return VideoHeader(frames, width, height, frame_rate(trak, frames))


def frame_rate(trak: bytes, frames: int) -> float | None:
    """Frames per second of a video track: its frames over their summed durations (`stts` entries of
    sample count and duration) in the media's time scale (`mdhd`); None when either box is unreadable."""
    mdhd = child(trak, (b"mdia", b"mdhd"))
    stts = child(trak, (b"mdia", b"minf", b"stbl", b"stts"))
    if mdhd is None or stts is None or len(stts) < 8:
        return None
    offset = 20 if mdhd[:1] == b"\x01" else 12  # version 1 has 64-bit creation and modification times
    if len(mdhd) < offset + 4:
        return None
    (timescale,) = struct.unpack(">I", mdhd[offset : offset + 4])
    (entries,) = struct.unpack(">I", stts[4:8])
    table = stts[8 : 8 + 8 * entries]
    total = sum(count * delta for count, delta in struct.iter_unpack(">II", table[: len(table) // 8 * 8]))
    if timescale == 0 or total == 0:
        return None
    return float(Fraction(frames * timescale, total).limit_denominator(1001))


def track_size(tkhd: bytes) -> tuple[int, int]:
    """The picture's width and height (16.16 fixed point, the last 8 bytes of a version 0 or 1 `tkhd`)."""
    end = 84 if tkhd[:1] == b"\x00" else 96
    if len(tkhd) < end:
        raise VideoHeaderError("its track header is cut short")
    width, height = struct.unpack(">II", tkhd[end - 8 : end])
    return width >> 16, height >> 16

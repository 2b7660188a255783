"""joined.mp4 of an extension job: the source video, then the new part's frames after the overlap.

Video. The source's frames are its H.264 packets copied as they are, so joining never re-encodes them:
a chain of extensions keeps its first segment's bits however long it grows. That works because the new
frames come from an x264 encoder with this project's settings, whose parameter sets (SPS and PPS: size,
profile, reference frames, timing) then equal those of a source this project encoded, and whose first
frame is an IDR picture that needs nothing before it; one decoder configuration plays both parts. The
copied packets are length-prefixed (MP4's form) while x264 writes start codes (Annex B), so the new
packets are converted. A source whose parameter sets differ (another encoder, other x264 settings, not
H.264) is decoded and encoded again with the new frames instead: one more generation of H.264 for it.

Audio. The source's track is decoded (resampled to the new part's rate and layout when they differ;
silence when it has none), kept up to where the overlap starts, crossfaded with equal power into the new
part's audio over the overlap, and the new part's audio follows; the result is encoded as one AAC track
lasting as long as the joined video. The new part's audio over the overlap holds the source's (its audio
latents there are the source's encoded: services/overlap_audio.py), so both carry the same sound, but not
the same samples: the latents hold log-mel magnitudes and the vocoder makes its own phase, it reads the
generated mel frames after the held ones, and the overlap's last tens of milliseconds are generated. A cut
would click where the two waveforms disagree; the crossfade does not, and equal power suits two signals
whose phases do not line up.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from protocol.extension import joined_frames
from protocol.files import JOINED_FILE, publish, temp_path_for
from protocol.job_record import ResolvedExtension
from services import media
from services.media import AVCOL_BT709, AVCOL_RANGE_MPEG, DEFAULT_CRF, Mp4Writer, add_aac_track

# H.264 NAL unit types of the parameter sets (ITU-T H.264 table 7-1): compared, never copied in-band.
SPS_NAL, PPS_NAL = 7, 8
PARAMETER_SETS = (SPS_NAL, PPS_NAL)
START_CODE = b"\x00\x00\x01"


def read_source_audio(path: Path, rate: int, channels: int) -> np.ndarray:
    """The source's first audio track as `[channels, samples]` float32 at `rate` (empty when it has none)."""
    found = media.read_audio(path, rate=rate, layout={1: "mono", 2: "stereo"}[channels])
    return np.zeros((channels, 0), np.float32) if found is None else found[0]


def joined_audio(
    source: np.ndarray, new: np.ndarray, rate: int, source_frames: int, overlap: int, fps: float
) -> np.ndarray:
    """The joined soundtrack: the source's until the overlap starts, an equal-power crossfade over the
    overlap, then the new part's (each cut or padded with silence to the length of its frames)."""
    before = round((source_frames - overlap) / fps * rate)
    shared = round(source_frames / fps * rate) - before
    source = fit(source, before + shared)
    new = fit(new, max(new.shape[1], shared))
    ramp = np.sin(np.linspace(0.0, math.pi / 2, shared, dtype=np.float64)).astype(np.float32)
    blend = source[:, before:] * np.cos(np.arcsin(ramp)) + new[:, :shared] * ramp
    return np.concatenate([source[:, :before], blend, new[:, shared:]], axis=1)


def fit(waveform: np.ndarray, samples: int) -> np.ndarray:
    """`waveform` cut to `samples`, or padded with silence to them."""
    if waveform.shape[1] >= samples:
        return waveform[:, :samples]
    return np.pad(waveform, ((0, 0), (0, samples - waveform.shape[1])))


def annexb_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (start codes of three or four bytes)."""
    units = []
    for part in data.split(START_CODE):
        unit = part.rstrip(b"\x00")  # a four-byte start code leaves its leading zero on the unit before
        if unit:
            units.append(unit)
    return units


def avcc_parameter_sets(extradata: bytes) -> tuple[list[bytes], int] | None:
    """(the SPS and PPS units, the NAL length size) of an MP4 `avcC` record; None when it is not one."""
    if len(extradata) < 7 or extradata[0] != 1:
        return None
    length_size = (extradata[4] & 0x03) + 1
    units, offset = [], 5
    for mask in (0x1F, 0xFF):  # the SPS count has 3 reserved bits above it, the PPS count none
        if offset >= len(extradata):
            return None
        count, offset = extradata[offset] & mask, offset + 1
        for _ in range(count):
            size = int.from_bytes(extradata[offset : offset + 2], "big")
            units.append(extradata[offset + 2 : offset + 2 + size])
            offset += 2 + size
    return units, length_size


def to_length_prefixed(data: bytes, length_size: int) -> bytes:
    """An Annex B packet as MP4 stores it: each NAL unit after its length; parameter sets left out (the
    source's `avcC` holds equal ones)."""
    units = [unit for unit in annexb_units(data) if unit[0] & 0x1F not in PARAMETER_SETS]
    return b"".join(len(unit).to_bytes(length_size, "big") + unit for unit in units)


class JoinedWriter:
    """Writes joined.mp4 under a temp name: the source's video, the audio, then the new frames after the
    overlap as the video stage hands them over (YUV 4:2:0, as Mp4Writer takes them)."""

    def __init__(
        self, path: Path, source: Path, width: int, height: int, fps: float, preset: str, threads: int,
        tags: dict[str, str], overlap: int,
    ) -> None:  # fmt: skip
        self.path, self.source, self.fps = path, source, fps
        self.to_skip = overlap  #: the new part's frames still to drop: the overlap shows the source's own
        self.size = (width, height)
        self.encoder = new_encoder(width, height, fps, preset, threads)
        with av.open(str(source)) as probe:
            stream = probe.streams.video[0]
            h264 = stream.codec_context.name == "h264"
            known = avcc_parameter_sets(bytes(stream.codec_context.extradata or b"")) if h264 else None
        ours = [unit for unit in annexb_units(bytes(self.encoder.extradata or b"")) if unit[0] & 0x1F in PARAMETER_SETS]
        self.copying = known is not None and sorted(known[0]) == sorted(ours)
        self.length_size = known[1] if known is not None else 4
        self.reencoded: Mp4Writer | None = None
        if self.copying:
            self.temp = temp_path_for(path)
            self.container = av.open(str(self.temp), "w", format="mp4")
            self.container.metadata.update(tags)
            with av.open(str(source)) as template:
                self.video = self.container.add_stream_from_template(template.streams.video[0])
        else:
            self.reencoded = Mp4Writer(path, width, height, fps, preset=preset, threads=threads, tags=tags)
        self.frames_written = 0
        self.next_pts = 0

    def add_audio(self, waveform: np.ndarray, sample_rate: int, cover_frames: int) -> None:
        """Encode the joined soundtrack (joined_audio), padded to last `cover_frames` of video."""
        if self.reencoded is not None:
            self.reencoded.add_audio(waveform, sample_rate, cover_frames)
        else:
            add_aac_track(self.container, waveform, sample_rate, cover_frames / self.fps)

    def write_source(self) -> None:
        """The source's frames: its packets copied, or decoded and encoded again."""
        with av.open(str(self.source)) as container:
            stream = media.video_stream(container)
            if self.reencoded is None:
                end = Fraction(0)
                for packet in container.demux(stream):
                    if packet.dts is None:  # the demuxer's empty flush packet
                        continue
                    end = max(end, (packet.pts + packet.duration) * packet.time_base)
                    packet.stream = self.video
                    self.container.mux(packet)
                    self.frames_written += 1
                self.next_pts = round(end * Fraction(self.fps).limit_denominator(1001))
                return
            width, height = self.size
            for frame in container.decode(stream):
                planes = frame.reformat(width=width, height=height, format="yuv420p").to_ndarray()
                self.reencoded.write(planes[None])
                self.frames_written += 1

    def write(self, frames: np.ndarray) -> None:
        """Encode the new part's `[n, H * 3 // 2, W]` uint8 YUV frames after the source's, in order from its
        first: those of the overlap are dropped."""
        dropped = min(self.to_skip, len(frames))
        frames, self.to_skip = frames[dropped:], self.to_skip - dropped
        if self.reencoded is not None:
            self.reencoded.write(frames)
            self.frames_written += len(frames)
            return
        for planes in frames:
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.colorspace, frame.color_range = AVCOL_BT709, AVCOL_RANGE_MPEG
            frame.pts, frame.time_base = self.next_pts, self.encoder.time_base
            self.next_pts += 1
            self.mux_encoded(self.encoder.encode(frame))
        self.frames_written += len(frames)

    def mux_encoded(self, packets: list[av.Packet]) -> None:
        for encoded in packets:
            packet = av.Packet(to_length_prefixed(bytes(encoded), self.length_size))
            packet.pts, packet.dts, packet.duration = encoded.pts, encoded.dts, 1
            packet.time_base, packet.is_keyframe = self.encoder.time_base, encoded.is_keyframe
            packet.stream = self.video
            self.container.mux(packet)

    def close(self, expected_frames: int) -> None:
        """Flush, check the frame count, then publish under the final name."""
        if self.reencoded is not None:
            self.frames_written = self.reencoded.frames_written
            self.reencoded.close(expected_frames)
            return
        self.mux_encoded(self.encoder.encode(None))
        self.container.close()
        if self.frames_written != expected_frames:
            self.temp.unlink(missing_ok=True)
            raise RuntimeError(f"joined {self.frames_written} frames, expected exactly {expected_frames}")
        publish(self.temp, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        if self.reencoded is not None:
            self.reencoded.abort()
            return
        self.container.close()
        self.temp.unlink(missing_ok=True)


def new_encoder(width: int, height: int, fps: float, preset: str, threads: int) -> av.VideoCodecContext:
    """An x264 encoder set as services.media.Mp4Writer sets its stream's, with its parameter sets in its
    extradata (global header) rather than in the first packet, so they can be compared with the source's."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    rate = Fraction(fps).limit_denominator(1001)
    encoder.framerate, encoder.time_base = rate, 1 / rate
    encoder.thread_type, encoder.thread_count = "FRAME", threads
    encoder.options = {"crf": str(DEFAULT_CRF), "preset": preset}
    encoder.colorspace = encoder.color_primaries = encoder.color_trc = AVCOL_BT709
    encoder.color_range = AVCOL_RANGE_MPEG
    encoder.flags |= av.codec.context.Flags.global_header
    encoder.open()
    return encoder


def open_joined(
    job_dir: Path, extension: ResolvedExtension, clip: tuple[int, int, float, int], encoding: tuple[str, int],
    tags: dict[str, str], audio: tuple[np.ndarray, int],
) -> JoinedWriter:  # fmt: skip
    """A JoinedWriter for the job's extension, with the joined audio and the source's frames written: it
    takes the new part's frames next. `clip` is (width, height, fps, new frames), `encoding` x264's
    (preset, threads), `audio` the new part's (waveform, sample rate)."""
    width, height, fps, num_frames = clip
    source = job_dir / extension.file
    total = joined_frames(extension.frames, num_frames, extension.overlap)
    writer = JoinedWriter(job_dir / JOINED_FILE, source, width, height, fps, *encoding, tags, extension.overlap)
    try:
        waveform, rate = audio
        kept = read_source_audio(source, rate, waveform.shape[0])
        writer.add_audio(joined_audio(kept, waveform, rate, extension.frames, extension.overlap, fps), rate, total)
        writer.write_source()
    except BaseException:
        writer.abort()
        raise
    return writer

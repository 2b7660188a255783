"""WAV and MP4 files through PyAV: float WAV for the hand-over, H.264 + AAC for the result, and the
frames of a keyframe video.

`audio.wav` is 32-bit float PCM so the waveform crosses the process boundary bit-exact (16-bit
PCM would round it by up to 3e-5). The MP4 writer takes frames in pieces, so a long clip is
encoded while the VAE is still decoding and the whole video never sits in memory.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from protocol.files import publish, temp_path_for

# AAC encodes 1024 samples per frame; feeding whole frames avoids a resampler FIFO.
AAC_FRAME_SAMPLES = 1024
# Visually lossless for H.264 at this project's content; users keep the latents for re-encodes.
DEFAULT_CRF = 18
# x264's own default; the video stage passes the configured one ([decode] x264_preset).
DEFAULT_PRESET = "medium"
# FFmpeg's codes (libavutil/pixfmt.h) for BT.709 (matrix, primaries and transfer share the
# number 1) and for limited range.
AVCOL_BT709 = 1
AVCOL_RANGE_MPEG = 1


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int) -> None:
    """Write `[channels, samples]` float32 audio as a float WAV, atomically."""
    waveform = np.ascontiguousarray(waveform, dtype=np.float32)
    layout = {1: "mono", 2: "stereo"}[waveform.shape[0]]
    temp = temp_path_for(path)
    with av.open(str(temp), "w", format="wav") as container:
        stream = container.add_stream("pcm_f32le", rate=sample_rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(waveform, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    publish(temp, path)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(`[channels, samples]` float32, sample rate) of a WAV written by write_wav."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        pieces = [frame.to_ndarray() for frame in container.decode(stream)]
        rate = stream.rate
    planar = [p.reshape(-1, stream.channels).T if p.shape[0] == 1 and stream.channels > 1 else p for p in pieces]
    return np.concatenate(planar, axis=1).astype(np.float32), rate


def read_audio(
    path: Path, seconds: float | None = None, rate: int | None = None, layout: str | None = None
) -> tuple[np.ndarray, int] | None:
    """(`[channels, samples]` float32, sample rate) of a media file's first audio stream, from its first decoded
    sample over its first `seconds` (None: all of it; less when the track is shorter), at the file's own rate and
    layout unless `rate`/`layout` are given; None when the file has no audio stream. PyAV's errors pass through
    for the caller to name its flag.

    The one reader of a user's or a source clip's track (a soundtrack, an extension's overlap, a retaken file,
    the joined video), so all of them count samples alike: from the first decoded one (a decoder's pts need not
    start at 0; the joined video plays from there), the resampler drained at the end."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        out_rate = rate or stream.rate
        wanted = None if seconds is None else round(seconds * out_rate)
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)  # float planes, one per channel
        pieces: list[np.ndarray] = []
        held = 0
        for frame in container.decode(stream):
            frame.pts = None
            for converted in resampler.resample(frame):
                pieces.append(converted.to_ndarray())
                held += pieces[-1].shape[1]
            if wanted is not None and held >= wanted:
                break
        pieces += [converted.to_ndarray() for converted in resampler.resample(None)]
        channels = {"mono": 1, "stereo": 2}.get(layout or "", stream.codec_context.channels or 1)
    track = np.concatenate(pieces, axis=1) if pieces else np.zeros((channels, 0), np.float32)
    return (track if wanted is None else track[:, :wanted]).astype(np.float32), out_rate


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The container's first video stream, decoded on FFmpeg's frame and slice threads.

    PyAV decodes on slice threads alone by default, which an x264 stream of one slice per frame cannot use: a
    1080p source of noise-like content (random-weight renders, grain) decoded at ~10 frames/s, 12 s of an
    extension's diffusion stage before each pass on an H100 host (docs/benchmarks.md version 16). Frame threads
    give the same frames (decoding is exact), as fast as the host's cores allow. IndexError without a video
    stream, as `container.streams.video[0]` raises it."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def read_video_frames(path: Path) -> np.ndarray:
    """Every frame of the first video stream as `[frames, H, W, 3]` uint8 RGB (a keyframe video: the
    orchestrator counted its frames from the header; diffusers takes the array as it is)."""
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video_stream(container))]
    except (av.error.FFmpegError, IndexError) as exc:  # IndexError: no video stream at all
        raise ValueError(f"{path.name} does not decode as a video: {exc}") from exc
    if not frames:
        raise ValueError(f"{path} holds no decodable video frame")
    return np.stack(frames)


def read_video_tail(path: Path, start: int) -> np.ndarray:
    """The frames of the first video stream from frame `start` on, as `[frames, H, W, 3]` uint8 RGB; the
    earlier ones are decoded and dropped as they come (a long source never sits in memory whole)."""
    try:
        with av.open(str(path)) as container:
            decoded = container.decode(video_stream(container))
            frames = [frame.to_ndarray(format="rgb24") for index, frame in enumerate(decoded) if index >= start]
    except (av.error.FFmpegError, IndexError) as exc:
        raise ValueError(f"{path.name} does not decode as a video: {exc}") from exc
    if not frames:
        raise ValueError(f"{path} holds no decodable video frame from frame {start} on")
    return np.stack(frames)


def write_png(path: Path, rgb: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write one `[H, W, 3]` uint8 frame as a PNG, atomically, with `text` as its tEXt/iTXt chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    temp = temp_path_for(path)
    Image.fromarray(rgb).save(temp, format="PNG", pnginfo=info)
    publish(temp, path)


def add_aac_track(
    container: av.container.OutputContainer, waveform: np.ndarray, sample_rate: int, seconds: float
) -> None:
    """Encode `[channels, samples]` audio into an AAC track of `container`, padded with silence to last
    `seconds` (the video's length).

    LTX-2's vocoder output ends 3 mel frames (about 30 ms) before the video does; padding keeps
    players from ending the clip early.
    """
    needed = math.ceil(seconds * sample_rate)
    if waveform.shape[1] < needed:
        waveform = np.pad(waveform, ((0, 0), (0, needed - waveform.shape[1])))
    layout = {1: "mono", 2: "stereo"}[waveform.shape[0]]
    stream = container.add_stream("aac", rate=sample_rate, layout=layout)
    waveform = np.ascontiguousarray(waveform, dtype=np.float32)
    for start in range(0, waveform.shape[1], AAC_FRAME_SAMPLES):
        frame = av.AudioFrame.from_ndarray(waveform[:, start : start + AAC_FRAME_SAMPLES], format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


class Mp4Writer:
    """Stream YUV 4:2:0 frames and one audio track into an MP4 written under a temp name.

    The file appears under its final name only after `close()` checked the frame count, so a
    crash or a short decode never leaves a truncated video behind.
    """

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        fps: float,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
        threads: int = 0,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.temp = temp_path_for(path)
        self.frames_written = 0
        self.container = av.open(str(self.temp), "w", format="mp4")
        # `title` and `comment` are the tags the MP4 muxer writes and players show (what made the clip).
        self.container.metadata.update(tags or {})
        self.video = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self.video.width, self.video.height = width, height
        self.video.pix_fmt = "yuv420p"
        # Frame threads: x264 encodes several frames at once (PyAV's default, slice threads, splits
        # each frame instead, which scales worse: 3.1 s instead of 4.0 s for 768x512x121 on 16 cores).
        self.video.codec_context.thread_type = "FRAME"
        # The bitstream depends on the number of frame threads; 0 lets x264 size it from the cores this
        # process may use, which differ between hosts and lanes: a fixed count (the video stage's plan,
        # orchestrator.run.policy.X264_THREADS) makes the file the same everywhere.
        self.video.codec_context.thread_count = threads
        self.video.options = {"crf": str(crf), "preset": preset}
        # Frames arrive already converted with BT.709 in limited range (services.color); say so in
        # the stream, or decoders assume BT.601 for anything they cannot tell.
        context = self.video.codec_context
        context.colorspace = context.color_primaries = context.color_trc = AVCOL_BT709
        context.color_range = AVCOL_RANGE_MPEG
        self.fps = fps

    def add_audio(self, waveform: np.ndarray, sample_rate: int, cover_frames: int) -> None:
        """Encode the audio track, padded with silence so it lasts as long as `cover_frames` of video."""
        add_aac_track(self.container, waveform, sample_rate, cover_frames / self.fps)

    def write(self, frames: np.ndarray) -> None:
        """Encode `[n, H * 3 // 2, W]` uint8 YUV 4:2:0 frames (BT.709, limited range; see
        services.color), which go to x264 as they are: no conversion on the host."""
        expected = (self.video.height * 3 // 2, self.video.width)
        if frames.ndim != 3 or frames.shape[1:] != expected or frames.dtype != np.uint8:
            raise ValueError(f"need uint8 frames of shape [n, {expected[0]}, {expected[1]}], got {frames.shape}")
        for planes in frames:
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.colorspace, frame.color_range = AVCOL_BT709, AVCOL_RANGE_MPEG
            for packet in self.video.encode(frame):
                self.container.mux(packet)
        self.frames_written += len(frames)

    def close(self, expected_frames: int) -> None:
        """Flush, check the frame count, then publish under the final name."""
        for packet in self.video.encode(None):
            self.container.mux(packet)
        self.container.close()
        if self.frames_written != expected_frames:
            self.temp.unlink(missing_ok=True)
            raise RuntimeError(f"decoded {self.frames_written} frames, expected exactly {expected_frames}")
        publish(self.temp, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        self.container.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()

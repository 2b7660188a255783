"""The MP4 path of the video stage: RGB -> BT.709 YUV 4:2:0 on the device, x264, and back."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from services.color import rgb_to_yuv420
from services.media import Mp4Writer


def blocky_clip(frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """`[n, 3, H, W]` in [0, 1]: random saturated colours in 8x8 blocks (constant over each 2x2
    chroma block, so 4:2:0 subsampling itself loses nothing and only the matrix is tested)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.rand(frames, 3, height // 8, width // 8, generator=generator)
    blocks[:, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # pure red, where a wrong matrix shows most
    blocks[:, :, 0, 1] = torch.tensor([0.0, 0.0, 1.0])
    return blocks.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def decode_rgb(path: Path) -> tuple[np.ndarray, dict[str, int]]:
    with av.open(str(path)) as container:
        context = container.streams.video[0].codec_context
        tags = {
            "colorspace": context.colorspace,
            "color_range": context.color_range,
            "primaries": context.color_primaries,
            "trc": context.color_trc,
        }
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    return frames, tags


def test_yuv_layout_is_what_pyav_reads_as_yuv420p():
    clip = blocky_clip(2, 32, 48, seed=0)
    yuv = rgb_to_yuv420(clip)
    assert yuv.shape == (2, 48, 48) and yuv.dtype == torch.uint8
    # White, black and mid grey land on the limited-range luma and neutral chroma values.
    grey = torch.stack([torch.full((3, 4, 4), value) for value in (1.0, 0.0, 0.5)])
    planes = rgb_to_yuv420(grey)
    assert planes[:, :4].reshape(3, -1).unique(dim=1).flatten().tolist() == [235, 16, 126]
    assert set(planes[:, 4:].flatten().tolist()) == {128}
    frame = av.VideoFrame.from_ndarray(yuv[0].numpy(), format="yuv420p")
    assert (frame.width, frame.height) == (48, 32)
    with pytest.raises(ValueError, match="even H and W"):
        rgb_to_yuv420(torch.zeros(1, 3, 31, 48))


def test_mp4_round_trip_keeps_colours_and_is_tagged_bt709(tmp_path: Path):
    clip = blocky_clip(6, 64, 96, seed=1)
    target = tmp_path / "clip.mp4"
    # CRF 0: x264 is lossless in YUV, so what remains is the 8-bit YUV rounding of the matrix.
    with Mp4Writer(target, 96, 64, 24.0, crf=0, preset="veryfast") as writer:
        writer.add_audio(np.zeros((1, 24000), dtype=np.float32), 24000, 6)
        writer.write(rgb_to_yuv420(clip[:4]).numpy())
        writer.write(rgb_to_yuv420(clip[4:]).numpy())
        writer.close(6)
    assert not list(tmp_path.glob("*.tmp*")), "the temp file must be renamed, not left behind"
    decoded, tags = decode_rgb(target)
    assert tags == {"colorspace": 1, "color_range": 1, "primaries": 1, "trc": 1}
    expected = (clip * 255).round().permute(0, 2, 3, 1).numpy()
    error = np.abs(decoded.astype(np.float64) - expected)
    assert decoded.shape == (6, 64, 96, 3)
    assert error.max() <= 3, error.max()  # 8-bit YUV rounding plus swscale's fixed-point
    # The tags are what makes the decoder right: read as BT.601, the same file is far off.
    with av.open(str(target)) as container:
        first = next(container.decode(video=0))
        as_601 = first.reformat(format="rgb24", src_colorspace="itu601").to_ndarray()
        stored = first.to_ndarray(format="yuv420p")
    assert np.abs(as_601.astype(np.float64) - expected[0]).max() > 20
    assert np.array_equal(stored, rgb_to_yuv420(clip[:1]).numpy()[0])  # the planes, bit for bit


def test_writer_refuses_frames_of_another_shape_and_leaves_no_file(tmp_path: Path):
    target = tmp_path / "clip.mp4"
    with pytest.raises(ValueError, match=r"shape \[n, 96, 96\]"):
        with Mp4Writer(target, 96, 64, 24.0) as writer:
            writer.write(np.zeros((2, 64, 96, 3), dtype=np.uint8))  # RGB, not YUV 4:2:0
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_a_short_clip(tmp_path: Path):
    target = tmp_path / "clip.mp4"
    writer = Mp4Writer(target, 32, 32, 24.0)
    writer.add_audio(np.zeros((1, 2400), dtype=np.float32), 24000, 3)
    writer.write(rgb_to_yuv420(blocky_clip(2, 32, 32, seed=2)).numpy())
    with pytest.raises(RuntimeError, match="decoded 2 frames, expected exactly 3"):
        writer.close(3)
    assert list(tmp_path.iterdir()) == []

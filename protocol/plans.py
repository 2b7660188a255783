"""Memory plans: what the orchestrator tells a stage worker about how to run this attempt.

The orchestrator chooses a plan (orchestrator.run.decode_plan, orchestrator.run.policy) and passes it to
the worker as JSON; the worker only executes it. Both sides use these dataclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How the video_decode stage runs the VAE."""

    tiling: bool  #: spatial tiles of `tile_size` px overlapping by `tile_overlap` px
    chunk_latent_frames: int | None  #: None decodes all frames at once; else pieces of this many
    overlap_latent_frames: int
    tile_size: int
    tile_overlap: int

    @property
    def label(self) -> str:
        """Short name used in progress output and job.json."""
        if self.chunk_latent_frames is None:
            return "spatial tiling" if self.tiling else "single pass"
        return f"temporal pieces of {self.chunk_latent_frames}" + (" + tiling" if self.tiling else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the worker's --plan argument and job.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DecodePlan:
        """Inverse of to_dict."""
        return cls(**raw)


def piece_ranges(latent_frames: int, chunk: int | None, overlap: int) -> list[tuple[int, int]]:
    """Half-open latent-frame ranges of the temporal pieces; neighbours share `overlap` frames."""
    if chunk is None or chunk >= latent_frames:
        return [(0, latent_frames)]
    if not 0 <= overlap < chunk:
        raise ValueError(f"overlap {overlap} must be smaller than the piece size {chunk}")
    ranges = []
    start = 0
    while True:
        end = min(start + chunk, latent_frames)
        ranges.append((start, end))
        if end == latent_frames:
            return ranges
        start = end - overlap


def parallel_piece_ranges(latent_frames: int, plan: DecodePlan, ranks: int) -> list[tuple[int, int]]:
    """The temporal pieces a decode over `ranks` processes runs (issue 30): the plan's own when they are
    at least `ranks`, else the clip cut into `ranks` pieces overlapping by the plan's overlap, the shortest
    piece length that gives that many (so `--vae-chunk-frames` of that length in one process decodes the
    same pieces: the parallel decode is that decode, spread). A clip too short to cut keeps the plan's
    pieces; the ranks without a piece wait."""
    ranges = piece_ranges(latent_frames, plan.chunk_latent_frames, plan.overlap_latent_frames)
    if len(ranges) >= ranks:
        return ranges
    overlap = plan.overlap_latent_frames
    chunk = -(-(latent_frames + (ranks - 1) * overlap) // ranks)  # ceil: `ranks` pieces cover the clip
    if chunk <= overlap or chunk >= latent_frames:
        return ranges
    return piece_ranges(latent_frames, chunk, overlap)

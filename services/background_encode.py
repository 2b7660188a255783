"""One background thread that encodes clips while the main thread decodes the next one.

In a stage-major group the video VAE decode of clip N+1 (GPU work, launched from the main thread)
can run while clip N is still being encoded (libx264's frame threads on the host; PyAV releases
the GIL in the encoder and in its frame copies). Clips are encoded one at a time, in the order
they were started, by a single thread, so the CPU is not split between two encoders.

Frames reach the encoder through a `FrameFeed`: the main thread `put`s decoded pieces and
`close`s the feed; the encode function iterates over them. The pieces waiting on the host are
bounded in bytes, so a clip decoded in temporal pieces still never holds a whole long video in
memory while its encoder lags behind.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import numpy as np

Result = TypeVar("Result")

# Host bytes of decoded frames allowed to wait for the encoder (one piece is always let through):
# two 768x512x121 clips or one 1080p x 161 clip in YUV 4:2:0.
DEFAULT_MAX_PENDING_BYTES = 768 * 2**20
# How often a blocked producer checks whether the encoder gave up.
WAIT_S = 0.5


class FeedAborted(Exception):
    """Raised inside the encode function when the decoding side gave up on the clip."""


class FrameFeed(Generic[Result]):
    """Pieces of one clip's frames, from the decoding thread to the encoding thread."""

    _END = object()
    _ABORT = object()

    def __init__(self, max_pending_bytes: int) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.pending_bytes = 0
        self._items: collections.deque = collections.deque()
        self._changed = threading.Condition()
        self.future: Future[Result] = Future()

    def put(self, piece: np.ndarray) -> None:
        """Hand over one piece; blocks while too many bytes wait, raises if the encoder failed."""
        self._append(piece, piece.nbytes)

    def close(self) -> Future[Result]:
        """No more pieces; the future gives the encode function's result (or its exception)."""
        self._append(self._END, 0)
        return self.future

    def abort(self) -> None:
        """Make the encode function raise FeedAborted (or never run, if it has not started).

        Never raises: it is called while another error is on its way out, which must not be
        replaced by the encoder's own.
        """
        if self.future.cancel():
            return
        with self._changed:
            self._items.append((self._ABORT, 0))
            self._changed.notify_all()

    def _append(self, item: object, size: int) -> None:
        with self._changed:
            while size and self.pending_bytes and self.pending_bytes + size > self.max_pending_bytes:
                self._raise_if_encoder_ended()
                self._changed.wait(WAIT_S)
            self._raise_if_encoder_ended()
            self._items.append((item, size))
            self.pending_bytes += size
            self._changed.notify_all()

    def _raise_if_encoder_ended(self) -> None:
        if not self.future.done():
            return
        if not self.future.cancelled() and self.future.exception() is not None:
            raise self.future.exception()  # type: ignore[misc]
        raise RuntimeError("the encoder stopped before the clip's frames were all handed over")

    def __iter__(self) -> Iterator[np.ndarray]:
        """The encoding side: pieces in order until `close`; FeedAborted after `abort`."""
        while True:
            with self._changed:
                while not self._items:
                    self._changed.wait()
                item, size = self._items.popleft()
                self.pending_bytes -= size
                self._changed.notify_all()
            if item is self._END:
                return
            if item is self._ABORT:
                raise FeedAborted("the decoding side gave up on this clip")
            yield item  # type: ignore[misc]


class BackgroundEncoder:
    """Runs encode functions one after another on a single thread, each fed by a FrameFeed."""

    def __init__(self, max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> None:
        self.max_pending_bytes = max_pending_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")

    def start(self, encode: Callable[[Iterator[np.ndarray]], Result]) -> FrameFeed[Result]:
        """Queue `encode(pieces)`; it runs once the clips started before it are encoded."""
        feed: FrameFeed[Result] = FrameFeed(self.max_pending_bytes)
        feed.future = self._executor.submit(encode, iter(feed))
        return feed

"""Encoding on a background thread: clips in order, bounded hand-over, failures that name the
right job, and a group worker that reports a job done only once its encode finished."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

from config.settings import load_settings
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from protocol import stages
from protocol.errors import InvalidInput
from protocol.files import Stage
from protocol.stage_request import StageRequest
from services.background_encode import BackgroundEncoder, FeedAborted
from services.color import rgb_to_yuv420
from services.runtime import Reporter, WorkerContext, run_jobs
from services.video_decode import ClipFiles, encode_clip

WAIT_S = 30.0


def piece(value: int, size: int = 100) -> np.ndarray:
    return np.full(size, value, dtype=np.uint8)


def test_clips_are_encoded_one_at_a_time_in_order():
    encoder = BackgroundEncoder()
    log: list[str] = []

    def encode(name: str) -> callable:
        def run(pieces: Iterator[np.ndarray]) -> list[int]:
            log.append(f"{name} start")
            values = [int(p[0]) for p in pieces]
            log.append(f"{name} end")
            return values

        return run

    first = encoder.start(encode("a"))
    second = encoder.start(encode("b"))
    second.put(piece(7))  # the second clip's frames may arrive while the first is still open
    first.put(piece(1))
    first.put(piece(2))
    second_result = second.close()
    assert first.close().result(WAIT_S) == [1, 2]
    assert second_result.result(WAIT_S) == [7]
    assert log == ["a start", "a end", "b start", "b end"]


def test_waiting_bytes_are_bounded_and_the_producer_blocks_until_the_encoder_takes_them():
    encoder = BackgroundEncoder(max_pending_bytes=250)
    gate = threading.Event()

    def encode(pieces: Iterator[np.ndarray]) -> int:
        gate.wait(WAIT_S)
        return sum(len(p) for p in pieces)

    blocker = encoder.start(encode)  # holds the thread until the gate opens
    feed = encoder.start(lambda pieces: sum(len(p) for p in pieces))
    feed.put(piece(1))
    feed.put(piece(2))
    third_handed_over = threading.Event()

    def produce() -> None:
        feed.put(piece(3))
        third_handed_over.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert not third_handed_over.wait(1.0), "a third 100-byte piece must wait: 300 > 250 bytes"
    assert feed.pending_bytes == 200
    gate.set()
    blocker.close()
    assert third_handed_over.wait(WAIT_S)
    producer.join(WAIT_S)
    assert feed.close().result(WAIT_S) == 300
    # One piece larger than the bound still goes through (nothing else is waiting).
    big = encoder.start(lambda pieces: sum(len(p) for p in pieces))
    big.put(piece(4, size=1000))
    assert big.close().result(WAIT_S) == 1000


def test_an_encoder_error_reaches_the_producer_and_the_future():
    encoder = BackgroundEncoder(max_pending_bytes=100)

    def encode(pieces: Iterator[np.ndarray]) -> None:
        next(pieces)
        raise OSError("disk full")

    feed = encoder.start(encode)
    feed.put(piece(1))
    with pytest.raises(OSError, match="disk full"):
        for value in range(2, 50):  # at the latest once the bound is reached
            feed.put(piece(value))
    with pytest.raises(OSError, match="disk full"):
        feed.future.result(WAIT_S)
    feed.abort()  # what the decoding side does on its way out: quiet, whatever the encoder did
    # The thread is free for the next clip.
    after = encoder.start(lambda pieces: [int(p[0]) for p in pieces])
    after.put(piece(9))
    assert after.close().result(WAIT_S) == [9]


def test_abort_removes_the_partial_mp4_and_a_queued_clip_never_starts(tmp_path: Path):
    encoder = BackgroundEncoder()
    clip = ClipFiles(tmp_path, 32, 32, 24.0, 9)
    audio = np.zeros((1, 9000), dtype=np.float32)
    feed = encoder.start(lambda pieces: encode_clip(clip, "veryfast", 16, audio, 24000, pieces))
    feed.put(rgb_to_yuv420(torch.rand(4, 3, 32, 32)).numpy())
    ran: list[str] = []
    queued = encoder.start(lambda pieces: ran.append("queued"))
    queued.abort()
    feed.abort()
    with pytest.raises(FeedAborted):
        feed.future.result(WAIT_S)
    assert queued.future.cancelled() and ran == []
    assert list(tmp_path.iterdir()) == []  # no MP4, no temp file


class RecordingReporter(Reporter):
    """A reporter that keeps the messages instead of sending them over ZeroMQ."""

    def __init__(self) -> None:
        super().__init__(Stage.VIDEO_DECODE, "", None)
        self.sent: list[tuple[str, str, str]] = []

    def send(self, message: object) -> None:
        kind = type(message).__name__
        detail = getattr(message, "phase", "") or getattr(message, "error", "")
        self.sent.append((kind, message.id, detail))


def contexts(tmp_path: Path, model: Path, names: list[str], reporter: Reporter) -> list[WorkerContext]:
    settings = load_settings(environ={"LTX2_STATE_DIR": str(tmp_path), "HOME": str(tmp_path)})
    shared: dict = {}
    result = []
    for name in names:
        request = {"prompt": name, "model": str(model), "width": 64, "height": 64, "num_frames": 9, "seed": 1}
        built = build_spec(request, settings)
        job = JobDir.create(tmp_path / name, built.spec, built.model)
        request = StageRequest.of(job.record)
        result.append(WorkerContext(Stage.VIDEO_DECODE, job.path, request, {}, 1, reporter, shared))
    return result


def test_group_reports_a_job_done_after_the_next_job_started(tiny_model_dir: Path, tmp_path: Path):
    reporter = RecordingReporter()
    jobs = contexts(tmp_path, tiny_model_dir, ["a", "b", "c", "d"], reporter)
    ids = {ctx.job_id: ctx.job_dir.parent.name for ctx in jobs}
    futures: dict[str, Future] = {}

    def work(ctx: WorkerContext) -> Future[list[str]]:
        name = ctx.job_dir.parent.name
        # The previous job's encode is still running when this job starts.
        for earlier, future in futures.items():
            if not future.done():
                future.set_result([f"{earlier}.mp4"])
        futures[name] = Future()
        if name == "b":
            futures[name].set_exception(InvalidInput("latents of b are unreadable"))
        if name == "d":  # the last job: nothing comes after it to wait for
            futures[name].set_result(["d.mp4"])
        return futures[name]

    run_jobs(jobs, work, started=0.0)
    named = [(kind, ids[job_id], detail) for kind, job_id, detail in reporter.sent]
    # Each Done goes out the moment its outputs exist: a's while b runs, d's before returning.
    assert named == [
        ("Progress", "a", stages.JOB_STARTED_PHASE),
        ("Progress", "b", stages.JOB_STARTED_PHASE),
        ("Done", "a", ""),
        ("Failed", "b", "InvalidInput: latents of b are unreadable"),
        ("Progress", "c", stages.JOB_STARTED_PHASE),
        ("Progress", "d", stages.JOB_STARTED_PHASE),
        ("Done", "c", ""),
        ("Done", "d", ""),
    ]


def test_an_encode_that_crashes_names_its_own_job(tiny_model_dir: Path, tmp_path: Path):
    reporter = RecordingReporter()
    jobs = contexts(tmp_path, tiny_model_dir, ["a", "b"], reporter)

    def work(ctx: WorkerContext) -> Future[list[str]]:
        future: Future[list[str]] = Future()
        if ctx.job_dir.parent.name == "a":
            future.set_exception(OSError("no space left on device"))
        else:
            future.set_result(["b.mp4"])
        return future

    with pytest.raises(OSError, match="no space"):
        run_jobs(jobs, work, started=0.0)
    assert reporter.job_id == jobs[0].job_id  # the process's Failed message goes to job a
    ids = {ctx.job_id: ctx.job_dir.parent.name for ctx in jobs}
    # b finished before a's encode was found broken, so b is done and only a fails (the runtime's
    # caller sends its Failed with the exit code of the error).
    assert [(kind, ids[job_id]) for kind, job_id, _ in reporter.sent] == [
        ("Progress", "a"),
        ("Progress", "b"),
        ("Done", "b"),
    ]


def test_a_job_that_fails_waits_for_the_one_still_encoding_to_be_reported(tiny_model_dir: Path, tmp_path: Path):
    reporter = RecordingReporter()
    jobs = contexts(tmp_path, tiny_model_dir, ["a", "b"], reporter)
    encoding: Future[list[str]] = Future()
    b_failing = threading.Event()

    def finish_encode_later() -> None:
        b_failing.wait(WAIT_S)
        time.sleep(0.2)  # well after b raised: a finishes only while the process is failing
        encoding.set_result(["a.mp4"])

    threading.Thread(target=finish_encode_later).start()

    def work(ctx: WorkerContext) -> Future[list[str]]:
        if ctx.job_dir.parent.name == "a":
            return encoding
        b_failing.set()
        raise torch.cuda.OutOfMemoryError("CUDA out of memory while decoding b")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_jobs(jobs, work, started=0.0)
    ids = {ctx.job_id: ctx.job_dir.parent.name for ctx in jobs}
    assert [(kind, ids[job_id]) for kind, job_id, _ in reporter.sent] == [
        ("Progress", "a"),
        ("Progress", "b"),
        ("Done", "a"),  # a's MP4 was finished: it is not redone
    ]
    assert reporter.job_id == jobs[1].job_id  # the process's Failed message goes to job b

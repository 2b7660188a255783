"""The wire format: round trips and typed rejection of every kind of bad frame."""

from __future__ import annotations

import msgpack
import pytest

from protocol import codec, stages
from protocol.codec import ErrorCode, ProtocolError


def frame(**body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def test_progress_message_round_trips_with_version_and_type():
    message = stages.Progress("job-1", "encode_diffuse", "denoise", 3, 8, gpu_bytes=5, rss_bytes=7)
    raw = msgpack.unpackb(codec.encode(message))
    assert raw["v"] == codec.PROTOCOL_VERSION and raw["type"] == "progress" and raw["id"] == "job-1"
    assert codec.decode(codec.encode(message)) == message


def test_optional_fields_take_their_defaults():
    decoded = codec.decode(frame(v=1, type="heartbeat", id="j", stage="audio_decode"))
    assert decoded == stages.Heartbeat("j", "audio_decode", 0, 0)


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        (b"\xc1", ErrorCode.MALFORMED, ""),
        (msgpack.packb([1, 2, 3]), ErrorCode.MALFORMED, ""),
        (frame(type="go", id="j", stage="s"), ErrorCode.BAD_VERSION, "v"),
        (frame(v=2, type="go", id="j", stage="s"), ErrorCode.BAD_VERSION, "v"),
        (frame(v=True, type="go", id="j", stage="s"), ErrorCode.BAD_VERSION, "v"),
        (frame(v=1, type="launch_missiles", id="j"), ErrorCode.UNKNOWN_TYPE, "type"),
        (frame(v=1, type="go", id="j"), ErrorCode.MISSING_FIELD, "stage"),
        (frame(v=1, type="go", id="j", stage="s", extra=1), ErrorCode.EXTRA_FIELD, "extra"),
        (frame(v=1, type="go", id=5, stage="s"), ErrorCode.WRONG_TYPE, "id"),
        (frame(v=1, type="ready", id="j", stage="s", attempt=True, pid=1), ErrorCode.WRONG_TYPE, "attempt"),
        (frame(v=1, type="done", id="j", stage="s", outputs=["a", 3], seconds=1.0), ErrorCode.WRONG_TYPE, "outputs"),
    ],
)
def test_bad_frames_raise_typed_errors_naming_the_field(raw: bytes, code: ErrorCode, field: str):
    with pytest.raises(ProtocolError) as caught:
        codec.decode(raw)
    assert caught.value.code is code
    assert caught.value.field == field


def test_oversized_frame_is_rejected_before_parsing():
    with pytest.raises(ProtocolError) as caught:
        codec.decode(b"\x00" * (codec.MAX_MESSAGE_BYTES + 1))
    assert caught.value.code is ErrorCode.TOO_LARGE


def test_int_is_accepted_where_float_is_expected():
    decoded = codec.decode(frame(v=1, type="done", id="j", stage="s", outputs=[], seconds=2))
    assert decoded.seconds == 2

"""Keep the daemon's replies inside one protocol frame.

A client refuses any frame over protocol.codec.MAX_MESSAGE_BYTES, so a reply that grows with what
users submitted (a listing of jobs with long prompts) must be cut to fit, or the CLI dies on it:
14 jobs with 20,000-character emoji prompts made `ltx2 jobs` fail. Listings carry short prompts and
errors and keep the newest jobs that fit; any other reply that would still be too large becomes a
typed `too_large` error instead of a frame the client cannot read.
"""

from __future__ import annotations

from typing import Any

import msgpack

from protocol import codec, jobs
from protocol.codec import MAX_MESSAGE_BYTES, ErrorCode

# Characters of a prompt or an error shown per job in a listing: enough to recognise the job
# (`ltx2 jobs` prints 50); `ltx2 status ID` shows the whole prompt.
LIST_TEXT_CHARS = 300
# Room left in a listing reply for the envelope around the rows (version, type, keys, counts).
ENVELOPE_BYTES = 4096
# The fields of a listed job whose length users control (a prompt, a worker's failure reason).
SHORTENED = ("prompt", "error")


def shorten(text: str, limit: int = LIST_TEXT_CHARS) -> str:
    """`text` cut to `limit` characters, marked with an ellipsis where cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def fit_listing(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The `list` reply's data: rows (oldest first) with short texts, dropping the oldest until the
    encoded reply fits one frame; `omitted` says how many were dropped."""
    short = [
        {key: shorten(value) if key in SHORTENED and isinstance(value, str) else value for key, value in row.items()}
        for row in rows
    ]
    budget = MAX_MESSAGE_BYTES - ENVELOPE_BYTES
    kept: list[dict[str, Any]] = []
    for row in reversed(short):  # newest last in a listing, and the newest matter most
        budget -= len(msgpack.packb(row, use_bin_type=True))
        if budget < 0:
            break
        kept.append(row)
    kept.reverse()
    return {"jobs": kept, "omitted": len(rows) - len(kept)}


def encode_reply(reply: codec.Message) -> bytes:
    """The reply's frame, or a `too_large` error's if the reply would not fit in one."""
    frame = codec.encode(reply)
    if len(frame) <= MAX_MESSAGE_BYTES:
        return frame
    return codec.encode(
        jobs.Error(
            reply.id,
            ErrorCode.TOO_LARGE,
            f"the {reply.TYPE} reply is {len(frame)} bytes, over the protocol's {MAX_MESSAGE_BYTES}",
        )
    )

"""The HTTP gateway's Starlette app: OpenAI's `/v1/videos` endpoints on top of the daemon protocol.

Every job operation is one daemon request (submit, status, cancel, list) through a DaemonPool; the
gateway adds only keys, ownership, uploads and limits. Blocking daemon calls run in Starlette's
thread pool, so a slow daemon reply never stalls the event loop. Errors are always OpenAI's JSON
shape, `{"error": {"message", "type", "param", "code"}}`; a client-given path never reaches the
file system (uploads get names the gateway makes; files served are the ones the daemon published).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from config.settings import HttpSettings, Settings
from orchestrator.daemon.client import DaemonError
from orchestrator.daemon.transport import TransportError, address_from_settings
from orchestrator.gateway.daemon_pool import DaemonPool
from orchestrator.gateway.directing_fields import REFERENCE_FIELD, SOURCE_FIELDS
from orchestrator.gateway.forms import StrictFormParser, StrictMultiPartParser
from orchestrator.gateway.keys import KeyRing
from orchestrator.gateway.metrics import GatewayMetrics
from orchestrator.gateway.source_routes import (
    VIDEO_FIELD,
    extension_fields,
    has_range,
    path_source_fields,
    whole_clip,
)
from orchestrator.gateway.store import FINAL_STATES, SUBMITTING, GatewayStore
from orchestrator.gateway.uploads import UploadDir
from orchestrator.gateway.video_requests import (
    KNOWN_FIELDS,
    UPLOAD_NAME_PATTERN,
    RequestError,
    VideoRequest,
    http_message,
    param_of,
    parse_video_request,
)
from orchestrator.run.event_lines import format_event_line
from orchestrator.run.inputs import require_inside_roots
from orchestrator.run.jobdir import JOB_ID_PATTERN, new_job_id
from orchestrator.run.publishing import companions
from orchestrator.run.states import JobState
from protocol import jobs
from protocol.codec import ErrorCode
from protocol.conditions import MAX_CONDITIONS
from protocol.extension import EXTEND_FIELD, describe_extension_duration
from protocol.files import Stage
from protocol.model_ids import TINY_REPO_IDS
from protocol.retake import RETAKE_FIELD
from protocol.soundtrack import AUDIO_FIELD, AUDIO_FORMATS, audio_suffix, looks_like_audio
from protocol.spec_rules import SpecError, describe_duration

log = logging.getLogger("ltx2.http")
# Between resends of a submit the daemon did not answer (each waits daemon.request_timeout_s first).
RESUBMIT_PAUSE_S = 0.5
# How long past http.create_timeout_s a claimed video the daemon does not know still shows as queued.
CLAIM_GRACE_S = 60.0
IDEMPOTENCY_KEY_CHARS = 255
# OpenAI's states, from the daemon's; a cancelled job is a failed video with code "cancelled", and a job
# waiting for the one it extends is queued (OpenAI's API has no other state before in_progress).
STATUS = {
    JobState.WAITING: "queued",
    JobState.QUEUED: "queued",
    JobState.RUNNING: "in_progress",
    JobState.DONE: "completed",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "failed",
}
# Share of the whole job each stage stands for in `progress` (the denoising dominates).
STAGE_WEIGHTS = {Stage.ENCODE_DIFFUSE.value: 0.8, Stage.AUDIO_DECODE.value: 0.05, Stage.VIDEO_DECODE.value: 0.15}
# Image types accepted as input_reference, by their first bytes.
IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp"))
# The first box types of an MP4 or QuickTime file (bytes 4-8): a keyframe may also be a video.
VIDEO_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
# The spec fields a file part of their own name fills (its stored path becomes the field's value): the soundtrack
# of audio-to-video, and a video file to retake or to extend (`retake` and `extend` as text stay video ids of the key).
FIELD_FILES = (AUDIO_FIELD, RETAKE_FIELD, EXTEND_FIELD)
# The file parts that may be a video to extend or retake instead of a video id of the key (as text).
SOURCE_FILES = (RETAKE_FIELD, EXTEND_FIELD)
#: A form's uploads: part name -> (bytes, the suffix its first bytes call for).
Uploads = dict[str, tuple[bytes, str]]
# How long DELETE waits for a running job's worker to stop (the daemon gives it 10 s before SIGKILL).
CANCEL_WAIT_S = 60.0
# Retry-After of a refused create: a tiny clip takes about this long, a real one longer.
QUEUE_FULL_RETRY_S = 30
MAX_LIST_LIMIT = 100
# Lines of a job's events and of its latest worker log that GET /v1/videos/{id}/log returns (`lines`);
# the daemon caps a logs request at 1000.
DEFAULT_LOG_LINES, MAX_LOG_LINES = 200, 1000
# Form fields a create may have at most (it knows about 25).
MAX_FORM_FIELDS = 64
# The daemon's "nearest: A, B" after an unknown job id: ids of every key's jobs, which no client may be told.
NEAREST_IDS = re.compile(r"; nearest: [0-9a-f-]+(?:, [0-9a-f-]+)*| \(`ltx2 jobs` lists them\)")
# An absolute path (or a ~/ one, or an ipc:// socket path) in a daemon message: never shown to a client.
# Not after a word, a dot or a colon, so `owner/name`, `1/2` and other URLs stay.
SERVER_PATH = re.compile(r"ipc://[^\s'\",;()\[\]{}<>]+|(?<![\w.~:/-])~?/[^\s'\",;:()\[\]{}<>]+")
# Rolling-minute counters forget names not seen for a minute once they track this many.
MAX_TRACKED_NAMES = 10_000
JSON_SPACE = re.compile(r"[ \t\n\r]*")
# The job page served at `/` (package data; see page.html for why the key never enters a URL).
PAGE_FILE = Path(__file__).with_name("page.html")
# The page's icon, also served at /favicon.ico, which browsers ask for by themselves (a 404 there
# filled the access log): a play triangle on a frame, as a small SVG (package data).
FAVICON_FILE = Path(__file__).with_name("favicon.svg")
# What the video object and the job page say of a clip the tiny model made (the fallback on a machine
# without the real weights): its `model` is a repo id few would recognise as random weights.
TINY_MODEL_NOTE = "tiny offline model: random weights, the clip is coloured noise"


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}

    def response(self) -> Response:
        """The JSON error; ASCII-escaped, since a message may quote a client's lone surrogate (no UTF-8)."""
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return Response(json.dumps(body), self.status, self.headers, media_type="application/json")


class RateLimiter:
    """Events per rolling minute, per name: a key's requests, or a client address's failed keys."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, owner: str) -> None:
        """Count one request of the key; 429 if it already made `per_minute` in the last minute."""
        with self._lock:
            wait = self._retry_after(owner)
            if wait is None:
                self._note(owner)
        if wait is not None:
            message = f"more than {self.per_minute} requests in a minute for this key; retry in {wait} s"
            raise too_many(message, "rate_limit_exceeded", wait)

    def retry_after(self, name: str) -> int | None:
        """Seconds until `name` may have one more event, or None if it may now (nothing is counted)."""
        with self._lock:
            return self._retry_after(name)

    def note(self, name: str) -> None:
        """Count one event of `name`."""
        with self._lock:
            self._note(name)

    def _retry_after(self, name: str) -> int | None:
        now, seen = time.monotonic(), self._seen.get(name)
        while seen and now - seen[0] >= 60.0:
            seen.popleft()
        if not seen or len(seen) < self.per_minute:
            return None
        return max(1, math.ceil(60.0 - (now - seen[0])))

    def _note(self, name: str) -> None:
        now = time.monotonic()
        if name not in self._seen and len(self._seen) >= MAX_TRACKED_NAMES:  # addresses come and go
            self._seen = {key: seen for key, seen in self._seen.items() if seen and now - seen[-1] < 60.0}
        self._seen.setdefault(name, collections.deque()).append(now)


class Gateway:
    """State shared by the routes: settings, keys, the ownership store, the daemon pool, limits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = KeyRing(settings.http_keys_file)
        self.store = GatewayStore(settings.http_dir / "gateway.sqlite")
        self.upload_dir = UploadDir(settings.http_dir / "uploads")  # sweeps what dead gateways left
        self.uploads = self.upload_dir.folder
        self.daemon = DaemonPool(address_from_settings(settings.daemon), settings.daemon.request_timeout_s)
        self.rate = RateLimiter(settings.http.requests_per_minute)
        self.failed_auth = RateLimiter(settings.http.failed_auth_per_minute)
        self.metrics = GatewayMetrics(self.daemon_request)
        self._owner_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)

    def close(self) -> None:
        self.daemon.close()
        self.store.close()
        self.upload_dir.close()

    # --- the daemon -------------------------------------------------------------------------------

    def daemon_request(self, message: Any) -> dict[str, Any]:
        """One daemon request; an unreachable daemon is 503, a daemon error keeps its meaning."""
        try:
            return self.daemon.request(message)
        except TransportError as exc:
            message = f"the daemon is not reachable: {without_paths(str(exc))}"
            raise ApiError(503, message, "server_error", code="daemon_unavailable") from None
        except DaemonError as exc:
            if exc.code == ErrorCode.UNREACHABLE:
                raise ApiError(503, without_paths(str(exc)), "server_error", code="daemon_unavailable") from None
            raise

    def job(self, video_id: str) -> dict[str, Any]:
        """The daemon's status of a job, its latest state remembered in the store."""
        try:
            job = self.daemon_request(jobs.Status(video_id))["job"]
        except DaemonError as exc:
            if exc.code == ErrorCode.NOT_FOUND and (claimed := self.unsubmitted(video_id)) is not None:
                return claimed
            if exc.code == ErrorCode.NOT_FOUND:
                raise ApiError(404, f"video {video_id!r} no longer exists on the daemon", code="not_found") from None
            raise bad_gateway(exc) from None
        completed = None
        if job["state"] in FINAL_STATES:
            completed = iso_seconds(job.get("updated", "")) or int(time.time())
        if self.store.note_state(video_id, job["state"], completed):
            self.metrics.observe_attempts(job.get("attempts", []))
        return job

    def unsubmitted(self, video_id: str) -> dict[str, Any] | None:
        """The view of a claimed video the daemon has no job for: queued while its create may still be
        sending the submit, then failed (the gateway stopped, or the daemon never answered)."""
        known = self.store.state_of(video_id)
        if known is None or known[0] != SUBMITTING:
            return None
        if time.time() - known[1] <= self.settings.http.create_timeout_s + CLAIM_GRACE_S:
            return {"state": JobState.QUEUED.value, "error": "", "output": ""}
        reason = "the daemon never took this video's request (the gateway stopped, or the daemon did not answer)"
        return {"state": JobState.FAILED.value, "error": f"{reason}; create it again", "output": ""}

    # --- requests ---------------------------------------------------------------------------------

    def authorize(self, request: Request) -> str:
        """The owner (key hash) of the request's bearer key; 401 without a known key, 429 over the rate.

        An address that sent `failed_auth_per_minute` unknown keys in the last minute gets 429 without
        its key being checked: were a right key still let through, the 429s would not slow guessing.
        """
        address = request.client.host if request.client else "unknown"
        if (wait := self.failed_auth.retry_after(address)) is not None:
            limit = self.settings.http.failed_auth_per_minute
            message = f"more than {limit} requests with unknown keys in a minute from this address; retry in {wait} s"
            raise too_many(message, "too_many_failed_authentications", wait)
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        owner = self.keys.owner_of(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if owner is None:
            self.failed_auth.note(address)
            raise ApiError(
                401,
                "missing or unknown API key: send `Authorization: Bearer <key>`"
                " (create one with `ltx2 keys --http NAME`)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        self.rate.check(owner)
        return owner

    def require_operator(self, owner: str) -> None:
        """403 unless the key is one of `http.metrics_keys` (they see every key's job counts)."""
        if self.keys.name_of(owner) not in self.settings.http.metrics_keys:
            raise ApiError(403, "this key may not read /metrics (see http.metrics_keys)", code="permission_denied")

    def owned(self, owner: str, video_id: str) -> dict[str, Any]:
        """The owner's video record; 404 for any other (another key's looks exactly like none)."""
        record = self.store.get(owner, video_id)
        if record is None:
            raise ApiError(404, f"no video {video_id!r}", param="video_id", code="not_found")
        return record

    def create(
        self,
        owner: str,
        request: VideoRequest,
        upload: tuple[bytes, str] | None,
        idempotency_key: str = "",
        parts: Uploads | None = None,
        files: Uploads | None = None,
        complete: Callable[[VideoRequest], VideoRequest] | None = None,
    ) -> dict[str, Any]:
        """Submit the job exactly once (at most `max_active_jobs_per_key` queued or running per key).

        The video's id is chosen here and the key's claim to it recorded before the daemon can see the
        request; the submit names it (`Submit.job_id`) and is sent again while no answer comes, until
        `http.create_timeout_s`: the daemon answers a resend with the job the first one made. A stalled
        daemon therefore costs the client a slower reply, not a second job (a 5xx would make the official
        client send the create again, a new request), and a gateway killed mid-create leaves a video its
        key sees. With an `Idempotency-Key`, the same key and request answer with the same video, and
        another request under a used key is refused (409). `parts` are the uploads `conditions` and
        `reference_video` name; `files` the uploads that fill a spec field of their own name (FIELD_FILES: the `audio`
        of audio-to-video, a video file to `retake` or `extend`). `complete` fills in what the request takes from its
        source (a whole-clip remix's range), only for a new video: the Idempotency-Key's fingerprint is of the
        request as sent, so a create sent again answers with its video whatever became of the source.
        """
        parts = parts or {}
        body = request_fingerprint(request, upload, parts, files)
        with self._owner_locks[owner]:  # two creates of one key must not both pass the cap
            video_id = self.video_of_key(owner, idempotency_key, body)
            if video_id is None:
                # Only a new video: a create sent again answers with its video, whatever became of its source.
                request = complete(request) if complete is not None else request
                self.require_own_sources(owner, request)
                self.require_room(owner)
                video_id = new_job_id()
                self.store.add(claim_record(video_id, owner, request))
                if idempotency_key:
                    self.store.remember_key(owner, idempotency_key, body, video_id, int(time.time()))
            elif (claimed := self.owned(owner, video_id))["state"] != SUBMITTING:
                job = self.job(video_id)
                return video_object({**claimed, "state": job["state"]}, job, request.seconds_note)
            reply = self.submit(owner, video_id, request, upload, parts, files)
            if reply["id"] != video_id:  # reuse named this key's finished video of the same request
                self.store.discard(video_id)
                if idempotency_key:
                    self.store.remember_key(owner, idempotency_key, body, reply["id"], int(time.time()))
                reused = self.owned(owner, reply["id"])
                job = self.job(reply["id"])
                notices = [line for line in reply.get("notices", []) if line.startswith("reused job")]
                return video_object({**reused, "state": job["state"]}, job, notices=notices)
            job = self.job(video_id)
            width, height, frames = (int(part) for part in job["size"].split("x"))
            frames = job.get("delivered_frames", frames)  # an extension's: the source joined to the new part
            fps = float(job.get("fps") or request.fps)  # the daemon's: an extension plays at its source's rate
            record = {
                **self.owned(owner, video_id),
                "model": reply["model"],
                "size": f"{width}x{height}",
                "seconds": request.seconds or "",  # as asked: `seconds_mapping` says what it became, if asked
                "num_frames": frames,
                "fps": fps,
                "prompt": job.get("prompt", ""),
                "state": job["state"],
            }
            self.store.submitted(video_id, record)
        return video_object(record, job, request.seconds_note, reply.get("notices", []))

    def whole_clip_remix(self, owner: str, request: VideoRequest) -> VideoRequest:
        """A remix without a range as the retake of every frame of its source; 404 naming `video_id` unless the
        source is a video of this key (another key's, a deleted one and an unknown one look alike), 400 for one
        the daemon never took (its frames are not known: it was never rendered)."""
        video_id = request.spec[RETAKE_FIELD]
        if self.store.get(owner, video_id) is None:
            raise ApiError(
                404, f"video_id: no video {video_id!r} of this key to remix", param="video_id", code="not_found"
            )
        size = self.job(video_id).get("size")
        if size is None:
            message = f"video_id: video {video_id!r} was never rendered (the daemon never took its request)"
            raise ApiError(400, message, param="video_id")
        return dataclasses.replace(request, spec=whole_clip(request.spec, int(size.rsplit("x", 1)[1])))

    def require_own_sources(self, owner: str, request: VideoRequest) -> None:
        """404 naming the field when `extend` or `retake` names no video of this key: another key's video, a
        deleted one and an unknown one look alike, as on every route (the daemon would take any job's id).
        Whether the video is completed, and the frame math against it, are the daemon's to check."""
        for field in SOURCE_FIELDS:
            video_id = request.spec.get(field)
            if video_id is not None and self.store.get(owner, video_id) is None:
                raise ApiError(
                    404, f"{field}: no video {video_id!r} of this key to {field}", param=field, code="not_found"
                )

    def video_of_key(self, owner: str, idempotency_key: str, body: str) -> str | None:
        """The video an earlier create with this `Idempotency-Key` made; 409 if its request was another."""
        if not idempotency_key:
            return None
        earlier = self.store.keyed(owner, idempotency_key)
        if earlier is None:
            return None
        if earlier["body"] != body:
            raise ApiError(
                409,
                f"Idempotency-Key {idempotency_key!r} was used for another request (video {earlier['video_id']});"
                " use a new key for a new request",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return str(earlier["video_id"])

    def require_room(self, owner: str) -> None:
        """429 when the key already has its cap of queued or running videos."""
        active = [row for row in self.store.active(owner) if self.job(row["id"])["state"] not in FINAL_STATES]
        cap = self.settings.http.max_active_jobs_per_key
        if len(active) >= cap:
            message = f"this key already has {len(active)} queued or running videos (at most {cap}); retry later"
            raise too_many(message, "too_many_active_videos", QUEUE_FULL_RETRY_S)

    def submit(
        self,
        owner: str,
        video_id: str,
        request: VideoRequest,
        upload: tuple[bytes, str] | None,
        parts: Uploads | None = None,
        files: Uploads | None = None,
    ) -> dict[str, Any]:
        """The daemon's answer to the video's submit (sent again while lost); with `reuse`, another key's
        render is never taken: the request is then submitted to render as this key's own. Each file part
        (a keyframe, the control video) is stored as the image is, and its stored path replaces its part name
        in `conditions` or `reference_video`; each of `files` is stored and its path is the spec field it is named
        after (`audio`, `retake`)."""
        spec = dict(request.spec)
        image = self.store_upload(*upload) if upload else None
        if image is not None:
            spec["image"] = str(image)
        stored = {name: self.store_upload(*data, field=part_field(spec, name)) for name, data in (parts or {}).items()}
        if spec.get("conditions"):
            spec["conditions"] = [{**entry, "source": str(stored[entry["source"]])} for entry in spec["conditions"]]
        if spec.get(REFERENCE_FIELD) is not None:
            spec[REFERENCE_FIELD] = {**spec[REFERENCE_FIELD], "source": str(stored[spec[REFERENCE_FIELD]["source"]])}
        for field, data in (files or {}).items():
            stored[field] = self.store_upload(*data, field=field)
            spec[field] = str(stored[field])
        try:
            reply = self.submit_until_answered(jobs.Submit("", spec, reuse=request.reuse, job_id=video_id))
            if reply["id"] != video_id and self.store.get(owner, reply["id"]) is None:
                reply = self.submit_until_answered(jobs.Submit("", spec, job_id=video_id))
        except DaemonError as exc:
            self.store.discard(video_id)  # refused: no job came of it
            raise daemon_spec_error(exc, request, {str(path): name for name, path in stored.items()}) from None
        finally:
            for path in [image, *stored.values()]:  # the daemon copied them into the job directory, or refused them
                if path is not None:
                    path.unlink(missing_ok=True)
        return reply

    def submit_until_answered(self, message: jobs.Submit) -> dict[str, Any]:
        """Send the submit until the daemon answers it or `http.create_timeout_s` passes (then 503: the
        claim stays recorded, and the job appears if the daemon takes a submit sent meanwhile)."""
        deadline = time.monotonic() + self.settings.http.create_timeout_s
        while True:
            try:
                return self.daemon.request(message)
            except TransportError as exc:
                lost: Exception = exc
            except DaemonError as exc:
                if exc.code != ErrorCode.UNREACHABLE:
                    raise
                lost = exc
            if time.monotonic() >= deadline:
                raise ApiError(
                    503,
                    f"the daemon did not answer within {self.settings.http.create_timeout_s:g} s"
                    f" ({without_paths(str(lost))}); video"
                    f" {message.job_id} stays recorded for this key and starts if the daemon takes it",
                    "server_error",
                    code="daemon_unavailable",
                )
            log.warning("video %s: no answer from the daemon (%s); sending its submit again", message.job_id, lost)
            time.sleep(RESUBMIT_PAUSE_S)

    def store_upload(self, data: bytes, suffix: str, field: str = "input_reference") -> Path:
        """Write an upload under a name the gateway makes, inside the uploads dir the daemon may read."""
        try:
            require_inside_roots(self.uploads, self.settings.input_roots, field)
        except SpecError:
            log.error("uploads are off: the uploads dir %s is not inside paths.input_roots", self.uploads)
            raise ApiError(  # the folder is the operator's to know, not the client's
                500,
                "image-to-video is off: the gateway's uploads dir is not inside paths.input_roots",
                "server_error",
                param=field,
                code="uploads_outside_input_roots",
            ) from None
        return self.upload_dir.store(data, suffix)

    def retrieve(self, owner: str, video_id: str) -> dict[str, Any]:
        record = self.owned(owner, video_id)
        job = self.job(video_id)
        return video_object({**record, "state": job["state"]}, job)

    def listing(self, owner: str, limit: int, after: str | None, newest_first: bool) -> dict[str, Any]:
        rows, more = self.store.page(owner, limit, after, newest_first)
        data = []
        for row in rows:
            try:
                job = self.job(row["id"])
            except ApiError as exc:
                if exc.status != 404:
                    raise
                job = {"state": JobState.FAILED.value, "error": "the daemon no longer knows this job"}
            data.append(video_object({**row, "state": job["state"]}, job))
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }

    def delete(self, owner: str, video_id: str) -> dict[str, Any]:
        """Cancel the job if it has not ended, then remove the files it published."""
        self.owned(owner, video_id)
        job = self.job(video_id)
        if job["state"] not in FINAL_STATES:
            try:
                self.daemon_request(jobs.Cancel(video_id))
            except DaemonError as exc:
                if exc.code != ErrorCode.CONFLICT:  # conflict: it ended meanwhile
                    raise bad_gateway(exc) from None
            deadline = time.monotonic() + CANCEL_WAIT_S
            while (job := self.job(video_id))["state"] not in FINAL_STATES:
                if time.monotonic() > deadline:
                    raise ApiError(409, f"video {video_id} is still stopping; retry the delete", code="still_stopping")
                time.sleep(0.2)
        if job.get("output"):  # the daemon's path, never the client's
            for path in companions(Path(job["output"]), extension=True):  # an extension's new part too
                path.unlink(missing_ok=True)
        self.store.mark_deleted(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    def content(self, owner: str, video_id: str, variant: str) -> Path:
        self.owned(owner, video_id)
        job = self.job(video_id)
        if job["state"] != JobState.DONE or not job.get("output"):
            raise ApiError(409, f"video {video_id} is {STATUS[job['state']]}, not completed", code="video_not_ready")
        video = Path(job["output"])
        path = video if variant == "video" else companions(video)[1]
        if not path.is_file():
            raise ApiError(404, f"the {variant} of video {video_id} is gone from the output folder", code="not_found")
        return path

    def log(self, owner: str, video_id: str, lines: int) -> dict[str, Any]:
        """The owner's job's events (as `ltx2 logs` shows them) and the tail of its latest worker log.

        Read-only and owned like every video route (another key's job is 404). Absolute paths in them
        (the job directory, the model cache, a traceback's files) are replaced by `<path>`, as in every
        answer; a video whose submit the daemon has not taken yet has an empty log.
        """
        self.owned(owner, video_id)
        try:
            data = self.daemon_request(jobs.Logs(video_id, lines))
        except DaemonError as exc:
            if exc.code != "not_found":
                raise bad_gateway(exc) from None
            data = {"events": "", "worker_log_name": "", "worker_log": ""}
        return {
            "id": video_id,
            "object": "video.log",
            "events": [without_paths(format_event_line(line)) for line in data["events"].splitlines()],
            "worker_log_name": data["worker_log_name"],
            "worker_log": without_paths(data["worker_log"]),
        }


def part_field(spec: dict[str, Any], name: str) -> str:
    """The field that names the file part `name`: the control video's, or a keyframe's."""
    reference = spec.get(REFERENCE_FIELD)
    return REFERENCE_FIELD if reference is not None and reference["source"] == name else "conditions"


def claim_record(video_id: str, owner: str, request: VideoRequest) -> dict[str, Any]:
    """A video's row as recorded before its submit: what the request says, the rest filled in once taken."""
    return {
        "id": video_id,
        "owner": owner,
        "created_at": int(time.time()),
        "model": request.spec.get("model") or "",
        "size": "",
        "seconds": request.seconds or "",
        "num_frames": 0,
        "fps": request.fps,
        "prompt": request.spec.get("prompt", ""),
        "state": SUBMITTING,
    }


def request_fingerprint(
    request: VideoRequest,
    upload: tuple[bytes, str] | None,
    keyframes: Uploads | None = None,
    files: Uploads | None = None,
) -> str:
    """SHA-256 of everything a create asks for (the fields as parsed, the uploads' bytes), for Idempotency-Key."""
    parts = {"spec": request.spec, "seconds": request.seconds, "fps": request.fps, "reuse": request.reuse}
    if upload is not None:
        parts["upload"] = [hashlib.sha256(upload[0]).hexdigest(), upload[1]]
    if keyframes:  # left out without them, so earlier requests keep their fingerprints
        parts["keyframes"] = {
            name: [hashlib.sha256(data).hexdigest(), suffix] for name, (data, suffix) in keyframes.items()
        }
    for field, (data, suffix) in (files or {}).items():  # likewise (an `audio` upload's entry as it always was)
        parts[field] = [hashlib.sha256(data).hexdigest(), suffix]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def idempotency_key(request: Request) -> str:
    """The `Idempotency-Key` header ("" if absent): printable ASCII, at most IDEMPOTENCY_KEY_CHARS."""
    key = request.headers.get("idempotency-key", "")
    if len(key) > IDEMPOTENCY_KEY_CHARS or not all(" " <= char <= "~" for char in key):
        message = f"Idempotency-Key must be at most {IDEMPOTENCY_KEY_CHARS} printable ASCII characters"
        raise ApiError(400, message, param="Idempotency-Key", code="invalid_value")
    return key.strip()


def daemon_spec_error(exc: DaemonError, request: VideoRequest, uploads: dict[str, str] | None = None) -> ApiError:
    """A refused submit as a 400 naming the HTTP field (the daemon names its spec field); `uploads` maps
    the stored path of each keyframe upload to its part name, which the message says instead."""
    if exc.code in (ErrorCode.INVALID_SPEC, ErrorCode.NOT_FOUND):
        param = param_of(exc.field or "", request)
        code = "model_not_found" if exc.code == ErrorCode.NOT_FOUND and param == "model" else "invalid_value"
        # The only path in an input_reference message is the upload's, named here as the field.
        named = "input_reference" if param == "input_reference" else "<path>"
        text = NEAREST_IDS.sub("", str(exc))
        for path, name in (uploads or {}).items():
            text = text.replace(path, name)
        message = without_paths(http_message(exc.field or "", text, request), named)
        return ApiError(400, message, param=param or None, code=code)
    return bad_gateway(exc)


def bad_gateway(exc: DaemonError) -> ApiError:
    """A daemon error no client field caused: 502, its message without server paths."""
    return ApiError(502, f"daemon: {without_paths(str(exc))}", "server_error", code=exc.code)


def without_paths(text: str, name: str = "<path>") -> str:
    """A daemon message with every absolute path replaced by `name`: clients are never told where
    the state dir, the uploads, the models or the outputs lie on the server."""
    return SERVER_PATH.sub(name, text)


def iso_seconds(text: str) -> int | None:
    try:
        return int(dt.datetime.fromisoformat(text).timestamp())
    except (TypeError, ValueError):
        return None


def progress_percent(job: dict[str, Any]) -> int:
    """0-100 from the stages finished and the running stage's step (the daemon's progress board)."""
    state = job["state"]
    if state == JobState.DONE:
        return 100
    if state in (JobState.WAITING, JobState.QUEUED):
        return 0
    finished = {a["stage"] for a in job.get("attempts", []) if a.get("result") == "ok"}
    share = sum(STAGE_WEIGHTS.get(stage, 0.0) for stage in finished)
    now = job.get("progress") or {}
    if now.get("stage") in STAGE_WEIGHTS and now["stage"] not in finished and now.get("total"):
        share += STAGE_WEIGHTS[now["stage"]] * min(1.0, now.get("step", 0) / now["total"])
    return min(99, int(share * 100))


def as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def seconds_mapping(asked: float, record: dict[str, Any], job: dict[str, Any]) -> str:
    """How the `seconds` asked became frames: a clip's frame count, or an extension's new part after its overlap
    (what an extension's `seconds` counts: orchestrator.run.jobspec.extension_frames_for_seconds)."""
    extension, size = job.get("extension"), job.get("size", "")
    if extension and size.count("x") == 2:
        rendered = int(size.rsplit("x", 1)[1])
        return describe_extension_duration(asked, record["fps"], int(extension["overlap"]), rendered)
    return describe_duration(asked, record["fps"], record["num_frames"])


def clip_seconds(record: dict[str, Any]) -> str:
    """OpenAI's `seconds`: how long the clip lasts (97 frames at 24 fps: "4.042", where "4" was asked, since
    a clip has 8n+1 frames), to the millisecond as `seconds_mapping` says it; as asked until the frames are known."""
    if not record["num_frames"]:
        return record["seconds"]
    return f"{record['num_frames'] / record['fps']:.3f}".rstrip("0").rstrip(".")


def completed_at(record: dict[str, Any], job: dict[str, Any]) -> int | None:
    """When the job ended: as the store remembers it, else the daemon's last update of the job."""
    return record.get("completed_at") or iso_seconds(job.get("updated", ""))


def stage_fields(state: str, job: dict[str, Any]) -> dict[str, Any]:
    """Where a running job is (stage, phase, step i/n, ETA of the phase), for the job page and `watch`-like clients.

    OpenAI's object has only `progress`; these come from the daemon's progress board and are null
    (steps 0) whenever the job is not running.
    """
    now = (job.get("progress") or {}) if state == JobState.RUNNING else {}
    return {
        "stage": now.get("stage"),
        "phase": now.get("phase"),
        "step": int(now.get("step") or 0),
        "steps": int(now.get("total") or 0),
        "eta_seconds": now.get("eta_s"),
    }


def video_object(
    record: dict[str, Any], job: dict[str, Any], seconds_note: str = "", notices: list[str] | None = None
) -> dict[str, Any]:
    """OpenAI's `video` object, plus what it has no field for (frames, fps, the seconds mapping, a note on
    the model that ran)."""
    state = record["state"]
    error = None
    if state in (JobState.FAILED, JobState.CANCELLED):
        code = "cancelled" if state == JobState.CANCELLED else "generation_failed"
        # `failure`: why, in the vocabulary the worker's exit, job.json and the CLI's exit code share
        # (protocol.errors.Failure: cuda_oom, no_space, invalid_input, ...); None for jobs ended before it was kept.
        error = {"code": code, "message": without_paths(job.get("error", "")), "failure": job.get("failure")}
    result = {
        "id": record["id"],
        "object": "video",
        "status": STATUS[state],
        "progress": progress_percent({**job, "state": state}),
        "created_at": record["created_at"],
        "completed_at": completed_at(record, job) if state in FINAL_STATES else None,
        "expires_at": None,
        "model": record["model"],
        "model_note": TINY_MODEL_NOTE if record["model"] in TINY_REPO_IDS.values() else None,
        "size": record["size"],
        "seconds": clip_seconds(record),
        "prompt": record["prompt"],
        "error": error,
        "remixed_from_video_id": job.get("retake_of"),  # a retake's (a remix's) source video, else null
        "num_frames": record["num_frames"],
        "fps": record["fps"],
        "seed": job.get("seed"),  # the daemon's record of the job; null until it has taken the submit
        **stage_fields(state, job),
    }
    if seconds_note:
        result["seconds_mapping"] = seconds_note
    elif (asked := as_number(record["seconds"])) is not None:
        result["seconds_mapping"] = seconds_mapping(asked, record, job)
    if notices:
        result["notices"] = notices
    return result


# --- the ASGI app -----------------------------------------------------------------------------------


class ContentResponse(FileResponse):
    """Starlette's FileResponse (Range requests, If-Range), its own refusals in OpenAI's JSON shape.

    Starlette answers a bad Range with plain text (400) and an unsatisfiable one with an empty 416;
    those two answers are caught on their way out and sent as ApiError instead.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused: list[Message] = []

        async def send_as_openai(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                refused.append(message)  # its body follows
            elif refused and message["type"] == "http.response.body":
                await range_error(refused[0], message.get("body", b""))(scope, receive, send)
            else:
                await send(message)

        await super().__call__(scope, receive, send_as_openai)


def range_error(start: Message, body: bytes) -> Response:
    """The OpenAI error for Starlette's refusal of a Range header (status `start["status"]`)."""
    if start["status"] != 416:
        message = body.decode("utf-8", "replace") or "Range header: malformed"
        return ApiError(start["status"], message, code="invalid_range").response()
    content_range = dict(start.get("headers", [])).get(b"content-range", b"").decode("latin-1")  # bytes */SIZE
    size = content_range.partition("/")[2]
    message = f"Range header: the range starts at or after the end of the file ({size} bytes)"
    headers = {"Content-Range": content_range} if content_range else {}
    return ApiError(416, message, code="range_not_satisfiable", headers=headers).response()


def endpoint(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Every error of a handler becomes OpenAI's JSON error."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except RequestError as exc:
            return ApiError(400, str(exc), param=exc.param, code=exc.code).response()
        except DaemonError as exc:
            return bad_gateway(exc).response()

    return wrapped


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no route, wrong method) in OpenAI's shape too."""
    status = getattr(exc, "status_code", 500)
    message = getattr(exc, "detail", "") or "server error"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ApiError(status, f"{request.method} {request.url.path}: {message}", kind).response()


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal").response()


def build_app(settings: Settings) -> Starlette:
    """The gateway's app (one Gateway; closed when the server stops)."""
    gateway = Gateway(settings)
    limits = settings.http

    async def authorized(request: Request) -> str:
        return await run_in_threadpool(gateway.authorize, request)

    @endpoint
    async def create_video(request: Request) -> Response:
        owner = await authorized(request)
        fields, uploads = await read_fields(request, limits)
        return await create_from(gateway, request, owner, fields, uploads)

    @endpoint
    async def list_videos(request: Request) -> Response:
        owner = await authorized(request)
        query = request.query_params
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            raise ApiError(400, "limit must be a whole number", param="limit") from None
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ApiError(400, f"limit must be between 1 and {MAX_LIST_LIMIT}", param="limit")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be asc or desc", param="order")
        listing = await run_in_threadpool(gateway.listing, owner, limit, query.get("after"), order == "desc")
        return JSONResponse(listing)

    @endpoint
    async def retrieve_video(request: Request) -> Response:
        owner = await authorized(request)
        return JSONResponse(await run_in_threadpool(gateway.retrieve, owner, request.path_params["video_id"]))

    @endpoint
    async def delete_video(request: Request) -> Response:
        owner = await authorized(request)
        return JSONResponse(await run_in_threadpool(gateway.delete, owner, request.path_params["video_id"]))

    @endpoint
    async def video_content(request: Request) -> Response:
        owner = await authorized(request)
        variant = request.query_params.get("variant", "video")
        if variant not in ("video", "thumbnail"):
            raise ApiError(400, f"variant must be video or thumbnail; got {variant!r}", param="variant")
        path = await run_in_threadpool(gateway.content, owner, request.path_params["video_id"], variant)
        media = "video/mp4" if variant == "video" else "image/png"
        return ContentResponse(path, media_type=media, filename=f"{request.path_params['video_id']}{path.suffix}")

    @endpoint
    async def video_log(request: Request) -> Response:
        owner = await authorized(request)
        lines = log_lines(request.query_params.get("lines", str(DEFAULT_LOG_LINES)))
        return JSONResponse(await run_in_threadpool(gateway.log, owner, request.path_params["video_id"], lines))

    @endpoint
    async def key_name(request: Request) -> Response:
        # Which key is in use, for the job page to show: its name, never the key or its hash.
        owner = await authorized(request)
        return JSONResponse({"object": "api_key", "name": gateway.keys.name_of(owner)})

    @endpoint
    async def healthz(request: Request) -> Response:
        data = await run_in_threadpool(gateway.daemon_request, jobs.Ping(""))
        if not data.get("executor_alive"):
            raise ApiError(503, "the daemon answers but its executor is not running", "server_error", code="unhealthy")
        return JSONResponse({"status": "ok", "protocol": data["protocol"]})  # no pid: a local fact

    @endpoint
    async def metrics(request: Request) -> Response:
        gateway.require_operator(await authorized(request))
        body, content_type = await run_in_threadpool(gateway.metrics.render)
        return Response(body, media_type=content_type)

    routes = [
        *page_routes(),
        Route("/v1/key", key_name, methods=["GET"]),
        Route("/v1/videos", create_video, methods=["POST"]),
        *source_routes(gateway, authorized),
        Route("/v1/videos", list_videos, methods=["GET"]),
        Route("/v1/videos/{video_id}", retrieve_video, methods=["GET"]),
        Route("/v1/videos/{video_id}", delete_video, methods=["DELETE"]),
        Route("/v1/videos/{video_id}/content", video_content, methods=["GET"]),
        Route("/v1/videos/{video_id}/log", video_log, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        gateway.close()

    return Starlette(
        routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan
    )


async def create_from(
    gateway: Gateway,
    request: Request,
    owner: str,
    fields: dict[str, Any],
    uploads: Uploads,
    renamed: dict[str, str] | None = None,
    complete: Callable[[VideoRequest], VideoRequest] | None = None,
) -> Response:
    """The one create path: POST /v1/videos, and the routes that name their source elsewhere (source_routes), whose
    refusals name the field as that route takes it (`renamed`: `extend` is `video` of POST /v1/videos/extensions);
    `complete` as Gateway.create takes it."""
    upload, files = uploads.pop("input_reference", None), field_files(uploads)
    try:
        parsed = parse_video_request(fields, gateway.settings, uploads.keys(), files.keys())
        created = await run_in_threadpool(
            gateway.create, owner, parsed, upload, idempotency_key(request), uploads, files, complete
        )
    except (ApiError, RequestError) as exc:
        if renamed and exc.param in renamed:
            raise renamed_error(exc, renamed[exc.param]) from None
        raise
    return JSONResponse(created)


def renamed_error(exc: ApiError | RequestError, param: str) -> ApiError:
    """`exc` naming `param` instead of its field, also where its message starts with the field's name."""
    status, kind, code, headers = (
        (exc.status, exc.kind, exc.code, exc.headers)
        if isinstance(exc, ApiError)
        else (400, "invalid_request_error", exc.code, None)
    )
    message = str(exc)
    for separator in (": ", " "):
        if message.startswith(f"{exc.param}{separator}"):
            message = param + message[len(exc.param or "") :]
            break
    return ApiError(status, message, kind, param, code, headers)


def source_routes(gateway: Gateway, authorized: Callable[[Request], Awaitable[str]]) -> list[Route]:
    """OpenAI's remix and extensions and our /extend: creates whose source video is named outside the body's
    directing fields (gateway.source_routes turns them into a create's fields)."""
    limits = gateway.settings.http

    async def path_source_request(request: Request, field: str, verb: str) -> tuple[str, dict[str, Any], Uploads]:
        """The key, the create's fields (`field` the path's video) and the uploads of POST /v1/videos/{id}/<verb>."""
        owner = await authorized(request)
        video_id = path_video_id(request)
        fields, uploads = await read_fields(request, limits)
        route = f"POST /v1/videos/{{video_id}}/{verb}"
        return owner, path_source_fields(fields, uploads, field, video_id, route), uploads

    @endpoint
    async def extend_video(request: Request) -> Response:
        owner, fields, uploads = await path_source_request(request, EXTEND_FIELD, "extend")
        return await create_from(gateway, request, owner, fields, uploads, {EXTEND_FIELD: "video_id"})

    @endpoint
    async def create_extension(request: Request) -> Response:
        owner = await authorized(request)
        fields, uploads = extension_fields(*await read_fields(request, limits, (*SOURCE_FILES, VIDEO_FIELD)))
        return await create_from(gateway, request, owner, fields, uploads, {EXTEND_FIELD: VIDEO_FIELD})

    @endpoint
    async def remix_video(request: Request) -> Response:
        owner, fields, uploads = await path_source_request(request, RETAKE_FIELD, "remix")
        whole = None if has_range(fields) else functools.partial(gateway.whole_clip_remix, owner)
        return await create_from(gateway, request, owner, fields, uploads, {RETAKE_FIELD: "video_id"}, whole)

    return [
        Route("/v1/videos/extensions", create_extension, methods=["POST"]),
        Route("/v1/videos/{video_id}/extend", extend_video, methods=["POST"]),
        Route("/v1/videos/{video_id}/remix", remix_video, methods=["POST"]),
    ]


def path_video_id(request: Request) -> str:
    """The video id of a route's path; anything no video id looks like (`..`, a name) is a video this key does
    not have: 404, as for an unknown id."""
    video_id = request.path_params["video_id"].strip()
    if not JOB_ID_PATTERN.fullmatch(video_id):
        raise ApiError(404, f"video_id: no video {video_id[:64]!r} of this key", param="video_id", code="not_found")
    return video_id


def page_routes() -> list[Route]:
    """The job page at `/` and its icon; no key needed: they hold no data (the page asks for the key and
    keeps it in the browser). The icon is also at /favicon.ico, which browsers ask for by themselves."""
    page, page_headers = job_page_parts()
    icon = FAVICON_FILE.read_bytes()

    async def job_page(request: Request) -> Response:
        return HTMLResponse(page, headers=page_headers)

    async def favicon(request: Request) -> Response:
        return Response(icon, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    return [
        Route("/", job_page, methods=["GET"]),
        Route("/favicon.svg", favicon, methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
    ]


def log_lines(text: str) -> int:
    """The `lines` of a log request: a whole number from 1 to MAX_LOG_LINES, else 400 naming it."""
    try:
        lines = int(text)
    except ValueError:
        raise ApiError(400, "lines must be a whole number", param="lines") from None
    if not 1 <= lines <= MAX_LOG_LINES:
        raise ApiError(400, f"lines must be between 1 and {MAX_LOG_LINES}", param="lines")
    return lines


def job_page_parts() -> tuple[str, dict[str, str]]:
    """The job page and its headers, with a Content-Security-Policy allowing only its own script and style.

    The page escapes job text itself; the policy is the second wall: an injected `<script>` or
    `onerror=` would not run, and the page may talk to nothing but this gateway (and play blob: URLs).
    """
    html = PAGE_FILE.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        digests = (base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks)
        return " ".join(f"'sha256-{digest}'" for digest in digests)

    policy = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "media-src blob:; img-src 'self' blob:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return html, headers


async def read_fields(
    request: Request, limits: HttpSettings, source_parts: tuple[str, ...] = SOURCE_FILES
) -> tuple[dict[str, Any], Uploads]:
    """The request's fields (JSON or multipart form) and its uploads (input_reference, keyframes, a control
    video), within the caps."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large("request body", int(declared), limits.max_body_bytes)
    body = await read_body(request, limits)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return json_fields(body), {}
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ApiError(415, f"send JSON or multipart/form-data, not {kind or 'no content type'}", code="bad_type")

    async def replay() -> AsyncIterator[bytes]:  # the body was read already, under the caps
        yield body

    if kind == "multipart/form-data":
        parser: StrictMultiPartParser | StrictFormParser = StrictMultiPartParser(
            request.headers,
            replay(),
            max_files=4 + MAX_CONDITIONS,  # input_reference, the keyframes, the control video, audio, retake
            max_fields=MAX_FORM_FIELDS,
            max_part_size=limits.max_body_bytes,
        )
    else:
        parser = StrictFormParser(
            request.headers, replay(), max_fields=MAX_FORM_FIELDS, max_part_size=limits.max_body_bytes
        )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"unreadable form: {exc.message}", code="invalid_form") from None
    try:
        return await form_fields(form, limits, source_parts)
    finally:
        await form.close()


async def read_body(request: Request, limits: HttpSettings) -> bytes:
    """The whole body, refused with 413 past `max_body_bytes` and with 408 past `body_timeout_s`.

    The deadline is what stops a client sending a byte now and then (uvicorn has none; the
    connection protocol closes a body nobody reads, see gateway.connections); the 408 closes the
    connection, whose request cannot be finished.
    """
    body = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise too_large("request body", len(body), limits.max_body_bytes)
    except TimeoutError:
        message = f"the request body did not arrive within {limits.body_timeout_s:g} s (http.body_timeout_s)"
        raise ApiError(408, message, code="request_timeout", headers={"Connection": "close"}) from None
    return bytes(body)


def json_fields(body: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # nested deeper than Python's stack: no field of ours nests past 3 levels
        field = too_deep_field(body)
        raise ApiError(400, f"{field or 'the body'} is nested too deeply", param=field, code="invalid_json") from None
    if not isinstance(fields, dict):
        raise ApiError(400, "the JSON body must be an object of fields", code="invalid_json")
    if fields.get("input_reference") is not None:  # OpenAI's {image_url}/{file_id} references: not here
        raise ApiError(
            400, "input_reference must be an image file upload (multipart/form-data)", param="input_reference"
        )
    if fields.get("conditions") is not None:  # keyframes are files, and JSON carries none
        raise ApiError(400, "conditions name file uploads: send multipart/form-data", param="conditions")
    if fields.get(AUDIO_FIELD) is not None:  # likewise a soundtrack
        raise ApiError(400, "audio must be an audio file upload (multipart/form-data)", param=AUDIO_FIELD)
    if fields.get(REFERENCE_FIELD) is not None:  # a control video is a file too
        raise ApiError(400, "reference_video names a file upload: send multipart/form-data", param=REFERENCE_FIELD)
    return fields


def too_deep_field(body: bytes) -> str | None:
    """The top-level field whose value the JSON decoder could not nest into, found by decoding the
    object one field at a time (None if the body is not an object of fields)."""
    text, decoder = body.decode("utf-8", "replace"), json.JSONDecoder()

    def skip(index: int) -> int:
        return JSON_SPACE.match(text, index).end()  # the pattern matches the empty string too

    index = skip(0) + 1
    if not text.startswith("{", index - 1):
        return None
    while True:
        try:
            name, index = decoder.raw_decode(text, skip(index))
            index = skip(index)
            if not text.startswith(":", index):
                return None
            _, index = decoder.raw_decode(text, skip(index + 1))
        except RecursionError:
            return name if isinstance(name, str) else None
        except ValueError:
            return None
        index = skip(index)
        if not text.startswith(",", index):
            return None
        index += 1


async def form_fields(
    form: FormData, limits: HttpSettings, source_parts: tuple[str, ...] = SOURCE_FILES
) -> tuple[dict[str, Any], Uploads]:
    """A form's text fields, and its files: input_reference, the keyframes `conditions` names, the control
    video `reference_video` names, the `audio` soundtrack and a video file to `retake` or to `extend`."""
    fields: dict[str, Any] = {}
    uploads: Uploads = {}
    for name, value in form.multi_items():
        if name in fields or name in uploads:
            raise ApiError(400, f"field {name!r} is given twice", param=name)
        if name == "input_reference":
            if not isinstance(value, UploadFile):
                raise ApiError(400, "input_reference must be an image file upload", param="input_reference")
            uploads[name] = await read_upload(value, limits, name)
        elif name == AUDIO_FIELD:
            if not isinstance(value, UploadFile):
                raise ApiError(400, f"audio must be an audio file upload ({AUDIO_FORMATS})", param=AUDIO_FIELD)
            uploads[name] = await read_audio_upload(value, limits)
        elif name in source_parts and isinstance(value, UploadFile):  # as text, a video id of the key
            uploads[name] = await read_source_upload(value, limits, name)
        elif isinstance(value, UploadFile):
            if name in KNOWN_FIELDS or not UPLOAD_NAME_PATTERN.fullmatch(name):
                raise ApiError(400, f"field {name!r} takes no file", param=name)
            uploads[name] = await read_upload(value, limits, name, videos=True)
        else:
            fields[name] = value
    return fields, uploads


async def read_upload(upload: UploadFile, limits: HttpSettings, name: str, videos: bool = False) -> tuple[bytes, str]:
    """The upload's bytes (at most the cap) and the suffix of its type, judged by its first bytes: an
    image, or (a keyframe's) an MP4/QuickTime video."""
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise too_large(name, len(data), limits.max_upload_bytes, name)
    for magic, suffix in IMAGE_MAGIC:
        if data.startswith(magic):
            return data, suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data, "webp"
    if videos and data[4:8] in VIDEO_BOXES:
        return data, "mp4"
    kinds = "a PNG, JPEG, WebP, GIF or BMP image" + (", or an MP4 or QuickTime video" if videos else "")
    raise ApiError(400, f"{name} must be {kinds}", param=name)


async def read_audio_upload(upload: UploadFile, limits: HttpSettings) -> tuple[bytes, str]:
    """The soundtrack's bytes (at most the cap) and a suffix for its stored name, judged by its first bytes."""
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise too_large(AUDIO_FIELD, len(data), limits.max_upload_bytes, AUDIO_FIELD)
    if not looks_like_audio(data[:16]):
        raise ApiError(400, f"audio must be an audio file ({AUDIO_FORMATS})", param=AUDIO_FIELD)
    return data, audio_suffix(data)


async def read_source_upload(upload: UploadFile, limits: HttpSettings, field: str) -> tuple[bytes, str]:
    """A video file to retake or extend (`field`): its bytes (at most the cap), an MP4 or QuickTime video by its
    first bytes (the daemon checks its frames, size and frame rate as `ltx2 retake FILE` and `ltx2 extend FILE` do)."""
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise too_large(field, len(data), limits.max_upload_bytes, field)
    if data[4:8] not in VIDEO_BOXES:
        message = f"{field} must be the id of one of this key's completed videos, or an MP4 or QuickTime video file"
        raise ApiError(400, message, param=field)
    return data, "mp4"


def field_files(uploads: Uploads) -> Uploads:
    """The uploads that fill a spec field of their own name (FIELD_FILES), taken out of `uploads` (which keeps
    the parts `conditions` and `reference_video` name)."""
    return {field: uploads.pop(field) for field in FIELD_FILES if field in uploads}


def too_many(message: str, code: str, retry_after_s: int) -> ApiError:
    """A 429 in OpenAI's shape, with the seconds after which the same request may pass."""
    return ApiError(429, message, "rate_limit_error", code=code, headers={"Retry-After": str(retry_after_s)})


def too_large(what: str, size: int, limit: int, param: str | None = None) -> ApiError:
    return ApiError(413, f"{what} is {size} bytes or more; at most {limit} are allowed", param=param, code="too_large")

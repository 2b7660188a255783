"""msgpack framing with a protocol version and field-by-field validation.

Every message is a frozen dataclass registered under a `type` name. On the wire it is one
msgpack map: `{"v": PROTOCOL_VERSION, "type": <name>, "id": <job id>, ...fields}`. Decoding
checks the size, the version, the type and every field (missing, extra, wrong type) and raises
`ProtocolError` with a code and the offending field, so a socket loop can answer with a typed
error reply instead of crashing on a bad peer.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar, TypeVar

import msgpack

PROTOCOL_VERSION = 1
# Job specs and progress events are a few kB; 1 MiB leaves room for long prompts and batch
# listings while keeping a hostile peer from making the daemon buffer large frames.
MAX_MESSAGE_BYTES = 1 << 20


class ErrorCode(enum.StrEnum):
    """Why a frame or a request was rejected; carried in `error` replies."""

    MALFORMED = "malformed"  #: not a msgpack map
    TOO_LARGE = "too_large"  #: over MAX_MESSAGE_BYTES
    BAD_VERSION = "bad_version"  #: `v` missing or not PROTOCOL_VERSION
    UNKNOWN_TYPE = "unknown_type"  #: `type` names no registered message
    MISSING_FIELD = "missing_field"  #: a required field is absent
    EXTRA_FIELD = "extra_field"  #: a field the message does not define
    WRONG_TYPE = "wrong_type"  #: a field has the wrong type
    INVALID_SPEC = "invalid_spec"  #: a job spec broke a rule (see protocol.spec)
    NOT_FOUND = "not_found"  #: no such job
    CONFLICT = "conflict"  #: the request does not fit the job's state
    INTERNAL = "internal"  #: the server failed; the message says where
    UNREACHABLE = "unreachable"  #: no reply came (the daemon is not running); set by the client, never sent


class ProtocolError(Exception):
    """A frame or request that cannot be served; becomes an `error` reply."""

    def __init__(self, code: ErrorCode, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.field = field


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of every message; `id` is the job id (empty where no job is concerned)."""

    TYPE: ClassVar[str] = ""
    id: str


_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound=type[Message])


def register(cls: M) -> M:
    """Class decorator: make a message type decodable by its `TYPE` name."""
    if not cls.TYPE or cls.TYPE in _REGISTRY:
        raise ValueError(f"message type {cls.TYPE!r} is empty or registered twice")
    _REGISTRY[cls.TYPE] = cls
    return cls


def encode(message: Message) -> bytes:
    """Serialise a message into one msgpack frame."""
    body = {"v": PROTOCOL_VERSION, "type": message.TYPE}
    body.update(dataclasses.asdict(message))
    return msgpack.packb(body, use_bin_type=True)


def decode(frame: bytes) -> Message:
    """Parse and validate one frame; raises ProtocolError naming what is wrong."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many unrelated types for garbage input
        raise ProtocolError(ErrorCode.MALFORMED, f"not a msgpack frame: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "frame must be a msgpack map")
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {version!r} != {PROTOCOL_VERSION}", "v")
    kind = body.pop("type", None)
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}", "type")
    return cls(**_require_fields(cls, body))


def _require_fields(cls: type[Message], body: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in body:
        if name not in fields:
            raise ProtocolError(ErrorCode.EXTRA_FIELD, f"{cls.TYPE}: unexpected field {name!r}", str(name))
    values = {}
    for name, field in fields.items():
        if name not in body:
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            if has_default:
                continue
            raise ProtocolError(ErrorCode.MISSING_FIELD, f"{cls.TYPE}: missing field {name!r}", name)
        if not is_instance_of(body[name], hints[name]):
            raise ProtocolError(
                ErrorCode.WRONG_TYPE,
                f"{cls.TYPE}: field {name!r} must be {_type_name(hints[name])}, got {type(body[name]).__name__}",
                name,
            )
        values[name] = body[name]
    return values


def is_instance_of(value: object, annotation: object) -> bool:
    """Check a decoded msgpack value against a (simple) type annotation.

    Supports the shapes messages use: int, float, str, bool, bytes, `X | None`, `list[X]`,
    `dict[str, X]` and `Any`. bool is not accepted as int (msgpack keeps them apart and so do we),
    and an int is accepted where a float is expected.
    """
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(is_instance_of(value, arg) for arg in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(is_instance_of(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, dict) and all(
            is_instance_of(k, key) and is_instance_of(v, item) for k, v in value.items()
        )
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)  # type: ignore[arg-type]


def _type_name(annotation: object) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")

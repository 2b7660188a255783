"""How a request field is declared: once, beside its JobSpec field, and read by every front door.

A field of a clip's request is described in one place: its JobSpec field in protocol/spec.py
carries a `Declared` in its metadata (`declare(...)`), and the few inputs that are not stored in
the spec but resolved into it (a camera move becomes a LoRA, seconds become a frame count) are
declared in `protocol.spec.REQUEST_ONLY`. Everything else is derived from these declarations:
the `ltx2 generate`/`submit` flags (orchestrator/command_line/cli_flags.py), the fields the HTTP gateway takes
(orchestrator/gateway/video_requests.py), the spec's per-field checks (range, choices and their
messages), which fields shape the latents or enter the request digest, and the table in
docs/request-fields.md. Adding a field is its declaration plus the worker code that uses it.

Ray's one request class for CLI, SDK and HTTP is the model; metadata on the dataclass field (as
pydantic's `Field`) keeps the declaration next to the type, so a field cannot be typed in one
place and described in another.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

#: Where a field's value comes from when the request leaves it out.
DefaultSource = Literal["required", "model preset", "family preset", "fixed", "random", "settings", "none"]
#: How the command line offers it: a flag taking a value, a switch (`--x`), a toggle (`--x/--no-x`),
#: flags cli_flags.py builds itself (`own`: LoRAs), or not at all.
CliKind = Literal["value", "switch", "toggle", "own", "none"]
#: How the HTTP gateway takes it: as text, as a number, parsed by the gateway itself (`own`), or not at all.
HttpKind = Literal["text", "number", "own", "none"]
METADATA_KEY = "request"


def flag_of(name: str) -> str:
    """The command-line flag of a field name (`num_frames` -> `--num-frames`): how every message names it."""
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Declared:
    """Everything the front doors, the checks and the docs need to know about one request field."""

    help: str  #: the CLI's help line
    doc: str = ""  #: docs/cli.md's description (the help line when empty)
    default_doc: str = ""  #: the docs' default cell (derived from default_from when empty)
    default_from: DefaultSource = "fixed"
    low: float | None = None  #: inclusive bounds, checked for every value given (None: no bound)
    high: float | None = None
    choices: tuple[str, ...] = ()
    #: a check of its own (text, sizes, LoRA entries): raises protocol.spec.SpecError naming the field
    rule: Callable[[Any, str], None] | None = None
    allowed: str = ""  #: the docs' "allowed" cell where a rule or a cross-field check decides
    cli: CliKind = "value"
    cli_flag: str = ""  #: the flag, when not `--` and the name in kebab case (`loras` is `--lora`, one per LoRA)
    metavar: str | None = None
    http: HttpKind = "none"
    http_name: str = ""  #: the HTTP field, when not the field's own name
    latents: bool = True  #: shapes the latents (False: a decode or output setting; `ltx2 decode` may change it)
    digest: bool = True  #: enters the request digest (False: changes no bit of the output)
    #: added after jobs were first recorded: at its default it is left out of the spec digests, so
    #: finished batches and saved latents of older versions are still recognised
    added_later: bool = False
    #: filled in by `fields_of` / REQUEST_ONLY: the field's name and value type (int, float, str, bool, list, dict)
    name: str = ""
    kind: type = str
    optional: bool = False  #: None is a value (the preset or another field decides)
    default: Any = None  #: the spec's value when the request and every preset leave the field out

    @property
    def flag(self) -> str:
        """The command-line flag of the field."""
        return self.cli_flag or flag_of(self.name)

    @property
    def http_field(self) -> str:
        """The HTTP field the gateway reads it from."""
        return self.http_name or self.name

    def allowed_text(self) -> str:
        """What values are allowed, as the docs table says it."""
        if self.allowed:
            return self.allowed
        if self.choices:
            return ", ".join(self.choices)
        if self.kind is bool:
            return "true, false"
        if self.low is not None and self.high is not None:
            return f"{self.low} to {self.high}"
        return ""


def declare(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, **declared: Any) -> Any:
    """A dataclass field whose metadata holds its Declared (name and type are filled in by `fields_of`)."""
    metadata = {METADATA_KEY: Declared(**declared)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def fields_of(cls: type) -> tuple[Declared, ...]:
    """The declarations of a dataclass's fields, in declaration order, with names and value types."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        declared = field.metadata.get(METADATA_KEY)
        if declared is None:
            raise TypeError(f"{cls.__name__}.{field.name} has no declaration (protocol.request_fields.declare)")
        kind, optional = value_type(hints[field.name])
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        default = None if default is dataclasses.MISSING else default
        found.append(dataclasses.replace(declared, name=field.name, kind=kind, optional=optional, default=default))
    return tuple(found)


def value_type(annotation: object) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of `int`, `float | None`, `list[dict[str, Any]]`..."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in args if arg is not type(None)]
        return value_type(inner)[0], True
    origin = typing.get_origin(annotation)
    return (origin or annotation), False  # type: ignore[return-value]

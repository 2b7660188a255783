"""The `ltx2` flags that become job spec fields, shared by `generate` and `submit`, derived from
the fields' declarations (protocol.request_fields; the fields are declared in protocol/spec.py).

A module of its own so that the daemon's client commands and the embedded CLI both use them
without importing each other. Only the LoRA flags are built here by hand: a LoRA entry spans
three flags (`--lora` starts one, the next two set its file and scale).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from orchestrator.run.jobspec import REQUEST_FIELDS
from protocol.request_fields import Declared

# The fields the command line offers as flags (all but those declared `cli="none"`).
CLI_FIELDS = tuple(declared for declared in REQUEST_FIELDS if declared.cli != "none")


class LoraAction(argparse.Action):
    """`--lora SOURCE` starts a LoRA entry; `--lora-weight-name`/`--lora-scale` set the last one's."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: str | None = None
    ) -> None:
        entries = list(getattr(namespace, "loras", None) or [])
        if option == "--lora":
            entries.append({"source": value})
        elif not entries:
            parser.error(f"{option} must follow a --lora")
        else:
            entries[-1]["weight_name" if option == "--lora-weight-name" else "scale"] = value
        namespace.loras = entries


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that become JobSpec fields (defaults None: the model's preset fills them in)."""
    for declared in CLI_FIELDS:
        if declared.name == "loras":
            add_lora_flags(parser, declared)
        elif declared.name == "stage2_lora":
            add_stage2_lora_flags(parser, declared)
        else:
            add_declared_flag(parser, declared)


def add_declared_flag(parser: argparse.ArgumentParser, declared: Declared) -> None:
    """One field's flag, as its declaration describes it; argparse keeps None for a flag not given."""
    if declared.cli == "switch":
        parser.add_argument(declared.flag, action="store_true", default=None, help=declared.help)
    elif declared.cli == "toggle":
        parser.add_argument(declared.flag, action=argparse.BooleanOptionalAction, default=None, help=declared.help)
    elif declared.choices:
        parser.add_argument(declared.flag, choices=list(declared.choices), help=declared.help)
    else:
        parser.add_argument(
            declared.flag,
            type=declared.kind if declared.kind in (int, float) else str,
            required=declared.default_from == "required",
            metavar=declared.metavar,
            help=declared.help,
        )


@dataclasses.dataclass(frozen=True)
class SubFlag:
    """A flag that sets a part of a field declared in protocol/spec.py (a LoRA entry's file or scale),
    described here once for `--help` and docs/cli.md."""

    flag: str
    metavar: str
    help: str
    default_doc: str
    doc: str
    kind: type = str


LORA_SUB_FLAGS = (
    SubFlag(
        "--lora-weight-name",
        "FILE",
        "weight file inside the preceding --lora's repo or folder",
        default_doc="the only `.safetensors`",
        doc="weight file of the preceding `--lora`",
    ),
    SubFlag(
        "--lora-scale",
        "S",
        "strength 0.0-1.0 of the preceding --lora (default 1.0)",
        default_doc="1.0",
        doc="strength 0.0–1.0 of the preceding `--lora` (0 reproduces the base model exactly)",
        kind=float,
    ),
)
STAGE2_LORA_SUB_FLAGS = (
    SubFlag(
        "--stage2-lora-weight-name",
        "FILE",
        "weight file inside the --stage2-lora repo or folder",
        default_doc="the family's (`ltx-2-19b-distilled-lora-384.safetensors`, "
        "`ltx-2.3-22b-distilled-lora-384.safetensors`)",
        doc="weight file inside the `--stage2-lora` repo or folder",
    ),
)


def add_lora_flags(parser: argparse.ArgumentParser, declared: Declared) -> None:
    """`--lora` and the two flags that describe the LoRA before it."""
    parser.add_argument("--lora", dest="loras", action=LoraAction, metavar=declared.metavar, help=declared.help)
    for sub in LORA_SUB_FLAGS:
        parser.add_argument(
            sub.flag, dest="loras", action=LoraAction, type=sub.kind, metavar=sub.metavar, help=sub.help
        )


def add_stage2_lora_flags(parser: argparse.ArgumentParser, declared: Declared) -> None:
    """`--stage2-lora` and the file inside it (the two halves of the `stage2_lora` field)."""
    parser.add_argument("--stage2-lora", metavar=declared.metavar, help=declared.help)
    for sub in STAGE2_LORA_SUB_FLAGS:
        parser.add_argument(sub.flag, metavar=sub.metavar, help=sub.help)

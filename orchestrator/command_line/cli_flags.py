"""The `ltx2` flags that become job spec fields, shared by `generate` and `submit`, derived from
the fields' declarations (protocol.request_fields; the fields are declared in protocol/spec.py).

A module of its own so that the daemon's client commands and the embedded CLI both use them
without importing each other. Only the LoRA and keyframe flags are built here by hand: a LoRA entry
spans three flags (`--lora` starts one, the next two set its file and scale), a keyframe two
(`--condition PATH[@FRAME][:STRENGTH]` starts one, `--condition-crf` sets its CRF).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from orchestrator.run.jobspec import REQUEST_FIELDS
from protocol.conditions import parse_condition_flag
from protocol.request_fields import Declared
from protocol.spec_rules import SpecError

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


class ConditionAction(argparse.Action):
    """`--condition PATH[@FRAME][:STRENGTH]` starts a keyframe entry; `--condition-crf` sets the last one's CRF."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: str | None = None
    ) -> None:
        entries = list(getattr(namespace, "conditions", None) or [])
        if option == "--condition":
            try:
                entries.append(parse_condition_flag(value))
            except SpecError as exc:
                parser.error(str(exc))
        elif not entries:
            parser.error(f"{option} must follow a --condition")
        else:
            entries[-1]["crf"] = value
        namespace.conditions = entries


def add_spec_flags(parser: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """Flags that become JobSpec fields (defaults None: the model's preset fills them in), but those of
    the fields `leave_out` names (a command that takes one of them its own way: `ltx2 extend SOURCE`)."""
    for declared in CLI_FIELDS:
        if declared.name in leave_out:
            continue
        if declared.name == "loras":
            add_lora_flags(parser, declared)
        elif declared.name == "stage2_lora":
            add_stage2_lora_flags(parser, declared)
        elif declared.name == "conditions":
            add_condition_flags(parser, declared)
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

CONDITION_SUB_FLAGS = (
    SubFlag(
        "--condition-crf",
        "N",
        "H.264 CRF 0-51 the preceding --condition's image is re-compressed at before encoding (0: not at all)",
        default_doc="the family's (33 through LTX-2.3, 18 for LTX-2.5)",
        doc="CRF 0–51 at which the preceding `--condition`'s image is H.264 re-compressed before the VAE encodes it,"
        " as the model was trained (0 skips it); videos are never re-compressed",
        kind=int,
    ),
)


def add_condition_flags(parser: argparse.ArgumentParser, declared: Declared) -> None:
    """`--condition` and the flag that sets the CRF of the keyframe before it."""
    parser.add_argument(
        "--condition", dest="conditions", action=ConditionAction, metavar=declared.metavar, help=declared.help
    )
    for sub in CONDITION_SUB_FLAGS:
        parser.add_argument(
            sub.flag, dest="conditions", action=ConditionAction, type=sub.kind, metavar=sub.metavar, help=sub.help
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

"""A request field is declared once (protocol/spec.py) and every front door takes it from there:
the CLI's flags, batch files, the HTTP gateway, the spec's checks and the docs tables (docs/cli.md,
docs/request-fields.md).

`--seconds` is the field added this way (its declaration in REQUEST_ONLY plus its conversion in
orchestrator/run/jobspec.py); its tests run it through the CLI, a batch file and a real render.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import probe_mp4, run_ltx2

from config.settings import load_settings
from orchestrator.cli import build_parser
from orchestrator.command_line.batch import validate_batch
from orchestrator.command_line.cli_flags import CLI_FIELDS
from orchestrator.command_line.request_docs import CLI_DOC, FIELD_TABLE, cli_doc_with_rows, field_table
from orchestrator.gateway.video_requests import KNOWN_FIELDS, RequestError, parse_video_request
from protocol.request_fields import Declared, declare, fields_of
from protocol.spec import REQUEST_ONLY, SPEC_FIELDS, JobSpec
from protocol.spec_rules import SpecError, frames_lasting

VALID = {"prompt": "a cat", "model": "m", "width": 768, "height": 512, "num_frames": 121, "steps": 8, "seed": 1}


def subcommand(name: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]


def test_the_cli_docs_rows_and_the_field_table_are_rendered_from_the_declarations():
    cli_doc = CLI_DOC.read_text()
    assert cli_doc_with_rows(cli_doc) == cli_doc, "run: python -m orchestrator.command_line.request_docs"
    assert FIELD_TABLE.read_text() == field_table(), "run: python -m orchestrator.command_line.request_docs"


@pytest.mark.parametrize("command", ["generate", "submit"])
def test_every_declared_field_is_a_flag_of_its_declared_kind(command: str):
    actions = {option: action for action in subcommand(command)._actions for option in action.option_strings}
    for declared in CLI_FIELDS:
        action = actions[declared.flag]
        if declared.cli == "value" and not declared.choices:
            assert action.type is (declared.kind if declared.kind in (int, float) else str), declared.name
            assert action.required == (declared.default_from == "required"), declared.name
        if declared.choices:
            assert tuple(action.choices) == declared.choices, declared.name
        if declared.cli == "toggle":
            assert f"--no-{declared.flag[2:]}" in actions, declared.name


def test_every_field_declared_for_http_is_read_by_the_gateway(tmp_path: Path):
    settings = load_settings(environ={"HOME": str(tmp_path)})
    for declared in (*SPEC_FIELDS, *REQUEST_ONLY):
        assert (declared.http_field in KNOWN_FIELDS) == (declared.http != "none"), declared.name
        if declared.http == "number":  # a number field is parsed as one: text that is none is refused, by name
            with pytest.raises(RequestError) as caught:
                parse_video_request({"prompt": "a cat", declared.name: "many"}, settings)
            assert caught.value.param == declared.name
    # The dev schedule is a field an HTTP client can now choose (it had no way to before).
    assert parse_video_request({"prompt": "a cat", "schedule": "default"}, settings).spec["schedule"] == "default"


@pytest.mark.parametrize("declared", [d for d in SPEC_FIELDS if d.high is not None], ids=lambda d: d.name)
def test_a_declared_range_is_checked_with_a_message_naming_the_flag_and_the_bounds(declared: Declared):
    with pytest.raises(SpecError) as caught:
        JobSpec.from_dict({**VALID, declared.name: declared.high + 1})
    assert (
        str(caught.value)
        == f"{declared.flag}: must be between {declared.low} and {declared.high}; got {declared.high + 1}"
    )


def test_a_field_without_a_declaration_is_refused_when_the_spec_is_defined():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Spec:
        declared_one: int = declare(1, help="has one")
        forgotten: int = 2

    with pytest.raises(TypeError, match="Spec.forgotten has no declaration"):
        fields_of(Spec)


@pytest.mark.parametrize(
    ("seconds", "fps", "frames"), [(5, 24, 121), (0.5, 24, 17), (0.01, 24, 9), (4, 25, 105), (42.7, 24, 1025)]
)
def test_seconds_become_the_fewest_8n_plus_1_frames_lasting_that_long(seconds: float, fps: float, frames: int):
    assert frames_lasting(seconds, fps) == frames
    assert frames / fps >= seconds and (frames - 8 < 9 or (frames - 8) / fps < seconds)


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), 3601.0, 43.0])
def test_seconds_no_clip_can_last_are_refused_naming_seconds(seconds: float):
    with pytest.raises(SpecError) as caught:
        frames_lasting(seconds, 24.0)
    assert caught.value.flag == "--seconds"


def test_a_batch_clip_may_give_seconds(tiny_model_dir: Path, tmp_path: Path):
    batch = tmp_path / "clips.toml"
    batch.write_text(
        f'[defaults]\nmodel = "{tiny_model_dir}"\nfps = 24.0\n\n'
        '[[clips]]\nprompt = "a harbour"\nseconds = 1\n\n'
        '[[clips]]\nprompt = "a mill"\nnum_frames = 9\n'
    )
    settings = load_settings(environ={"HOME": str(tmp_path)})
    first, second = validate_batch(batch, settings, {})
    assert (first.built.spec.num_frames, second.built.spec.num_frames) == (25, 9)
    assert "--seconds: 1 s at 24 fps -> 25 frames (1.042 s)" in first.built.notices
    assert "seconds" not in first.built.spec.to_dict()  # resolved, never stored


def test_generate_with_seconds_renders_that_many_frames_and_says_so(ltx2_env: dict, tmp_path: Path):
    result = run_ltx2(
        ["generate", "--prompt", "a harbour", "--seconds", "0.5", "--width", "64", "--height", "64", "--quiet"],
        ltx2_env,
    )
    assert result.returncode == 0, result.stderr
    assert "--seconds: 0.5 s at 24 fps -> 17 frames (0.708 s)" in result.stderr
    assert probe_mp4(Path(result.stdout.strip()))["frames"] == 17


def test_seconds_and_num_frames_together_are_refused_before_any_job(ltx2_env: dict, tmp_path: Path):
    result = run_ltx2(["generate", "--prompt", "a harbour", "--seconds", "1", "--num-frames", "17"], ltx2_env)
    assert result.returncode == 2
    assert "--seconds: give --seconds or --num-frames, not both" in result.stderr
    assert not (tmp_path / "state" / "jobs").exists() or not any((tmp_path / "state" / "jobs").iterdir())

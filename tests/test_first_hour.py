"""What a new user meets first (issue 26): typos answered with the nearest name, a missing output
parent refused instead of created under /, and a daemon hint that works from a fresh clone as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT, run_ltx2


def test_a_mistyped_flag_names_the_flag_it_was_meant_to_be(ltx2_env: dict):
    result = run_ltx2(["generate", "--promt", "a kite"], ltx2_env)
    assert result.returncode == 2
    assert "--promt is not a flag of ltx2 generate; did you mean --prompt?" in result.stderr
    result = run_ltx2(["generate", "--prompt", "a kite", "--num-frame", "9", "--widht=64"], ltx2_env)
    assert result.returncode == 2
    assert "--num-frame is not a flag of ltx2 generate; did you mean --num-frames?" in result.stderr
    assert "--widht is not a flag of ltx2 generate; did you mean --width?" in result.stderr
    assert "--prompt is not a flag" not in result.stderr  # known flags are never called unknown
    result = run_ltx2(["statsu"], ltx2_env)
    assert result.returncode == 2 and "did you mean status?" in result.stderr
    result = run_ltx2(["generate", "--prompt", "a kite", "--schedule", "distiled"], ltx2_env)
    assert result.returncode == 2 and "did you mean distilled?" in result.stderr


def test_a_mistyped_batch_key_names_the_key_it_was_meant_to_be(ltx2_env: dict, tmp_path: Path):
    batch = tmp_path / "typo.toml"
    batch.write_text('[[clips]]\nprompt = "a kite"\nnum_frame = 9\n')
    result = run_ltx2(["batch", str(batch)], ltx2_env)
    assert result.returncode == 2
    assert "unknown field; did you mean num_frames?" in result.stderr


def test_an_output_folder_whose_parent_is_missing_is_refused(ltx2_env: dict, tmp_path: Path):
    missing = tmp_path / "no-such-parent" / "videos"
    result = run_ltx2(["generate", "--prompt", "a kite", "--output-dir", str(missing)], ltx2_env)
    assert result.returncode == 2
    assert f"its parent folder {missing.parent} does not exist" in result.stderr
    assert not missing.parent.exists()  # nothing was created on the way


def test_the_daemon_hint_is_a_command_that_exists_from_a_fresh_clone(ltx2_env: dict, tmp_path: Path):
    env = {**ltx2_env, "XDG_RUNTIME_DIR": str(tmp_path)}
    result = run_ltx2(["cancel", "20260101-000000-abcdef"], env)  # a command only the daemon can carry out
    assert result.returncode == 1
    hint = result.stderr.split("start it: ", 1)[1].rstrip(")\n")
    program, flag, config = shlex.split(hint)
    assert Path(program).name == "supervisord" and Path(program).is_file()  # .venv/bin/supervisord, not PATH's
    assert flag == "-c" and Path(config).is_file() and Path(config).name == "supervisord.conf"


def test_a_runtime_dir_that_is_gone_is_one_line_naming_the_variable(ltx2_env: dict, tmp_path: Path):
    result = run_ltx2(["status", "20260101-000000-abcdef"], {**ltx2_env, "XDG_RUNTIME_DIR": str(tmp_path / "gone")})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"XDG_RUNTIME_DIR = {tmp_path / 'gone'} must be an existing folder" in result.stderr


CALL = """
import warnings
{silence}
from openai import APIConnectionError, OpenAI
client = OpenAI(base_url="http://127.0.0.1:9/v1", api_key="ltx2-x", max_retries=0, timeout=2)
try:
    client.videos.retrieve("video_1")
except APIConnectionError:
    print("no warning")
"""


def test_the_documented_line_silences_the_clients_sora_deprecation_warning():
    example = (REPO_ROOT / "docs" / "http-api.md").read_text()
    line = re.search(r"^warnings\.filterwarnings\(.*\)$", example, re.MULTILINE)[0]  # the example's line, as written

    def call(silence: str) -> subprocess.CompletedProcess[str]:
        # -W error: a DeprecationWarning the client raises ends the script with a traceback.
        command = [sys.executable, "-W", "error::DeprecationWarning", "-c", CALL.format(silence=silence)]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    assert call(line).stdout.strip() == "no warning"
    assert "The Sora API is scheduled to permanently shut down" in call("").stderr  # the client does warn


def test_config_prints_every_setting_with_the_layer_it_came_from(ltx2_env: dict, tmp_path: Path):
    import json

    config = tmp_path / "config.toml"
    config.write_text("[worker]\ngroup_size = 3\n")
    env = {**ltx2_env, "LTX2_CONFIG": str(config), "LTX2_DETERMINISTIC": "false"}
    result = run_ltx2(["--state-dir", str(tmp_path / "state"), "config"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f'state_dir = "{tmp_path / "state"}"  # command line' in lines
    assert f"group_size = 3  # {config}" in lines
    assert "deterministic = false  # LTX2_DETERMINISTIC" in lines
    assert 'x264_preset = "veryfast"  # default' in lines
    listed = json.loads(run_ltx2(["config", "--json"], env).stdout)
    assert listed["worker.group_size"] == {"value": 3, "from": str(config)}
    config.write_text("[worker]\ndeterministc = false\n")
    typo = run_ltx2(["config"], env)
    assert typo.returncode == 2
    assert "unknown setting worker.deterministc; did you mean deterministic?" in typo.stderr

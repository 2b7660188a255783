"""docs/cli.md's flag table and `ltx2 generate --help` list the same flags."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

from orchestrator.cli import build_parser


def test_every_generate_flag_is_documented_in_the_cli_docs_table_and_vice_versa():
    cli_doc = (REPO_ROOT / "docs" / "cli.md").read_text()
    table = cli_doc.split("## `ltx2 generate`", 1)[1].split("\n\n## ", 1)[0]
    documented = set()
    for row in table.splitlines():
        if row.startswith("| `--"):
            documented.update(re.findall(r"--[a-z0-9-]+", row.split("|")[1]))
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    flags = {option for action in generate._actions for option in action.option_strings if option.startswith("--")}
    flags.discard("--help")
    assert documented == flags

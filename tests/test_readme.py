"""The README is a quick start and a tour; the reference lives in docs/ (issue 27, item 14).

What a reader copies must work: the quick start's command runs as written, every link between the
README and docs/ leads to a file and a heading that exist, and every setting has its row in
docs/config.md. The flag table (docs/cli.md) is checked by tests/test_request_fields.py and
tests/test_cli_docs.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

from conftest import REPO_ROOT, ltx2_environment

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
# Enough for the intro, the quick start, a tour and the index of docs/: a reference table that grows
# here instead of in docs/ is what made the README 1,080 lines long.
MAX_README_LINES = 150
# A markdown link or image: [text](target) / ![alt](target).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# The tiny model's preset made small (a config file; the command line stays as the README writes it).
# A preset is replaced whole, not merged key by key.
SMALL_TINY_PRESET = """[presets."ltx2-stages/tiny-random-ltx2"]
steps = 8
guidance_scale = 1.0
schedule = "distilled"
width = 64
height = 64
num_frames = 9
fps = 24.0
"""


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def outside_code(text: str) -> list[str]:
    """The lines of a markdown text outside its fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the file's headings: lowercase, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in outside_code(path.read_text()):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_the_quick_start_is_two_commands_and_its_generate_runs_as_written(hf_home: Path, tmp_path: Path):
    quick_start = README.read_text().split("## Quick start", 1)[1]
    block = quick_start.split("```bash\n", 1)[1].split("```", 1)[0]
    install, generate = block.strip().splitlines()
    assert install == "./install.sh" and generate.startswith(".venv/bin/ltx2 generate --prompt ")
    config = tmp_path / "small.toml"
    config.write_text(SMALL_TINY_PRESET)
    env = {**ltx2_environment(hf_home, tmp_path), "LTX2_CONFIG": str(config)}
    result = subprocess.run(shlex.split(generate), cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    # The file the README promises: named after the prompt's first words, stamped like its job's id.
    promised = re.search(r"writes `outputs/([a-z0-9-]+)_<YYYYmmdd-HHMMSS>\.mp4`", quick_start)[1]
    (job,) = (tmp_path / "state" / "jobs").iterdir()
    video = Path(result.stdout.strip())
    assert video == tmp_path / "outputs" / f"{promised}_{job.name[:15]}.mp4" and video.is_file()


def test_every_link_of_the_readme_and_the_docs_leads_to_a_file_and_a_heading():
    broken = []
    for page in markdown_files():
        for line in outside_code(page.read_text()):
            for target in LINK.findall(line):
                if target.startswith(("http://", "https://", "mailto:")):
                    continue
                path, _, anchor = target.partition("#")
                linked = (page.parent / path).resolve() if path else page
                if not linked.exists() or (anchor and anchor not in anchors(linked)):
                    broken.append(f"{page.relative_to(REPO_ROOT)}: {target}")
    assert broken == []
    # Every page of docs/ is linked from the README (its index): none is left where no reader finds it.
    from_readme = {(REPO_ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    assert {page.resolve() for page in DOCS.glob("*.md")} - from_readme == set()


def test_the_readme_stays_a_quick_start_and_a_tour():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, "reference text belongs in docs/ (cli, config, http-api, operations...)"


def test_every_setting_of_the_defaults_has_its_row_in_the_config_docs():
    defaults = tomllib.loads((REPO_ROOT / "config" / "defaults.toml").read_text())
    documented = set(re.findall(r"`([a-z_]+\.[a-z0-9_]+)`", (DOCS / "config.md").read_text()))
    # Tables of named entries (presets, families, cameras, aliases, profiles) are documented as sections.
    settings = {
        f"{section}.{key}"
        for section, keys in defaults.items()
        for key, value in keys.items()
        if not isinstance(value, dict) and section not in ("cameras", "model_aliases")
    }
    assert settings - documented == set()

"""The orchestrator's rooms import only downwards: placement <- run <- daemon <- gateway <- command_line <- cli.

A room (a subpackage of orchestrator/, see its __init__.py) may import its own modules and the rooms
below it, never one above: where a process runs knows nothing of jobs, a job's run knows nothing of
the daemon, and nothing but the `ltx2` command imports the command line. Every import counts,
including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

#: The rooms, lowest first; a module belongs to the first entry its dotted name starts with.
LAYERS = (
    "orchestrator.placement",
    "orchestrator.run",
    "orchestrator.daemon",
    "orchestrator.gateway",
    "orchestrator.command_line",
    "orchestrator.cli",  # the `ltx2` command: the top
)
#: Top-level packages that are contracts or configuration, shared by the orchestrator and the workers.
BELOW_THE_ORCHESTRATOR = ("protocol", "config", "services")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> int | None:
    """The index in LAYERS of the module's room; None for the orchestrator package itself."""
    for rank, room in enumerate(LAYERS):
        if module == room or module.startswith(room + "."):
            return rank
    return None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth; `from package import name`
    counts as `package.name` when that is a module."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = any(
                    (REPO_ROOT / Path(*candidate.split("."))).with_suffix(suffix).exists() for suffix in (".py", "")
                )
                found.append((node.lineno, candidate if is_module else base))
    return found


def orchestrator_modules() -> list[Path]:
    return sorted((REPO_ROOT / "orchestrator").rglob("*.py"))


def test_every_orchestrator_module_lies_in_a_room():
    loose = [
        path.relative_to(REPO_ROOT).as_posix()
        for path in orchestrator_modules()
        if room_of(module_name(path)) is None and module_name(path) != "orchestrator"
    ]
    assert loose == [], f"modules in no room (move them into one of {LAYERS}): {loose}"


def test_no_room_imports_a_room_above_it():
    upwards = []
    for path in orchestrator_modules():
        rank = room_of(module_name(path))
        if rank is None:
            continue
        for line, imported in imported_modules(path):
            target = room_of(imported)
            if target is not None and target > rank:
                upwards.append(
                    f"{path.relative_to(REPO_ROOT).as_posix()}:{line} ({LAYERS[rank]}) imports {imported}"
                    f" ({LAYERS[target]}, a room above it)"
                )
    assert upwards == [], "imports running back up:\n" + "\n".join(upwards)


def test_protocol_config_and_services_import_nothing_of_the_orchestrator():
    offenders = [
        f"{path.relative_to(REPO_ROOT).as_posix()}:{line} imports {imported}"
        for package in BELOW_THE_ORCHESTRATOR
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        for line, imported in imported_modules(path)
        if imported.split(".")[0] == "orchestrator"
    ]
    assert offenders == []

"""The orchestrator: everything between a request and the stage processes, torch-free.

Grouped into rooms by role, each importing only the rooms before it (tests/test_import_layers.py):
placement (where stage processes run) <- run (a job's run, request to published video) <- daemon
(`ltx2 daemon`) <- gateway (`ltx2 serve`) <- command_line (the parts of `ltx2`) <- cli.py (the
`ltx2` command, also `python -m orchestrator.cli`). docs/architecture.md shows a job's path through them.
"""

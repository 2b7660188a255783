"""The parts of the `ltx2` command (the command itself is orchestrator/cli.py, run as `ltx2` or
`python -m orchestrator.cli`): its flags, batch files, progress view, terminal lines, signal handling,
the client commands that talk to the daemon, and the generated flag tables.

The highest room: it may import placement, run, the daemon (its client) and the gateway (its key
store); only orchestrator/cli.py imports it. tests/test_import_layers.py holds this.
"""

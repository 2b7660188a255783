"""The wire and file contracts shared by the CLI, the orchestrator and the stage workers.

Nothing here imports torch, diffusers or PyAV: the orchestrator and the CLI import this package
and must start in well under a second.
"""

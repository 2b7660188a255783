"""`ltx2 serve`: an OpenAI-style HTTP gateway that is a thin client of the daemon (docs/http-api.md).

It holds no job logic: every job is the daemon's, reached over the same ZeroMQ protocol as `ltx2 submit`.
The gateway keeps only what HTTP needs on top: API keys, which key owns which job, uploads, limits.

May import orchestrator.placement, orchestrator.run and the daemon's client; never the command line
(tests/test_import_layers.py).
"""

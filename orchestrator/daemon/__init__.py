"""The daemon's own modules: the ZeroMQ server, its executor, the sqlite queue, the jobs that wait for
the job they extend (waiting_jobs), and the client side, with what `status`, `jobs` and `logs` show of
a job (job_views), also read from the state dir when no daemon answers (state_reader).

Nothing outside this package imports it at CLI start except `ltx2 daemon` and the client commands,
so `ltx2 generate` and `ltx2 batch` never load sqlite or the server's code.

May import orchestrator.placement and orchestrator.run; never the gateway or the command line
(tests/test_import_layers.py).
"""

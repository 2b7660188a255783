"""Where stage processes run: the worker socket and process handles (worker_link), lanes (one
device each, lanes and lane_links), the local fork server (fork_client, processes, stale_sockets) and
Ray farms (ray_farm, node_forker).

The lowest room: it imports nothing else of the orchestrator (protocol/ and config/ only), so it knows
a job only by the arguments its worker is started with. tests/test_import_layers.py holds this.
"""

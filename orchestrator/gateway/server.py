"""`ltx2 serve`: run the gateway under uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from config.settings import Settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def timestamped_logging() -> dict[str, Any]:
    """uvicorn's logging configuration with a time stamp on every line (its own has none), so a request
    can be matched with the daemon's log."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        formatter["fmt"] = "%(asctime)s " + formatter["fmt"]
    return config


def serving_notices(settings: Settings, host: str, port: int) -> list[str]:
    """What `ltx2 serve` tells the person who starts it: where the page, the API and the keys are,
    and a warning when it listens beyond loopback. The command prints them; the gateway only serves."""
    notices = []
    if not is_loopback(host):
        notices.append(f"listening on {host}, not loopback: keys travel in clear text unless a TLS proxy is in front")
    notices.append(f"the job page at http://{host}:{port}/, the API at http://{host}:{port}/v1/videos")
    notices.append(f"API keys in {settings.http_keys_file} (make one: ltx2 keys --http NAME)")
    return notices


def serve(settings: Settings, host: str, port: int) -> int:
    """Serve the gateway; returns the exit status."""
    import uvicorn

    from orchestrator.gateway.app import build_app
    from orchestrator.gateway.connections import protocol_for

    uvicorn.run(
        build_app(settings),
        host=host,
        port=port,
        http=protocol_for(settings.http),  # h11 with header/body deadlines and the connection cap
        timeout_keep_alive=settings.http.keep_alive_timeout_s,  # uvicorn says int; its timer takes any number
        log_config=timestamped_logging(),
        log_level="info",
        access_log=True,  # one line per request (address, request line, status); never a header, so never a key
        timeout_graceful_shutdown=5,
    )
    return 0

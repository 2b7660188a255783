"""`ltx2 serve`: run the gateway under uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import ipaddress

from config.settings import Settings
from orchestrator.terminal import notice


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings, host: str, port: int) -> int:
    """Serve the gateway; returns the exit status."""
    import uvicorn

    from orchestrator.gateway.app import build_app
    from orchestrator.gateway.connections import protocol_for

    if not is_loopback(host):
        notice(f"serve: listening on {host}, not loopback: keys travel in clear text unless a TLS proxy is in front")
    notice(f"serve: http://{host}:{port}/v1/videos (keys: {settings.http_keys_file})")
    uvicorn.run(
        build_app(settings),
        host=host,
        port=port,
        http=protocol_for(settings.http),  # h11 with header/body deadlines and the connection cap
        timeout_keep_alive=settings.http.keep_alive_timeout_s,  # uvicorn says int; its timer takes any number
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0

"""The daemon's client front: the one process that reads what clients send, under a memory bound.

ZMQ_MAXMSGSIZE bounds each frame, not a message, and libzmq 4.3.5 buffers a multipart message whole
before it delivers the first frame: one message of 1,000 frames of 1 MiB took the daemon to ~1 GB
before it could refuse it. So the daemon does not read clients itself. This process binds the
public endpoint (transport.bind_server: MAXMSGSIZE, CURVE for tcp) with its data segment limited to
MEMORY_BOUND_BYTES, refuses multipart requests itself, and passes each single-frame request on to
the daemon over a private ipc socket (transport.bind_core), then relays the reply to the client that
asked. A flood past the bound costs this process, never the daemon: libzmq 4.3.5 fails to allocate
the next frame and drops that connection, releasing what it held (measured: a 1,000 x 1 MiB message
peaks the front at ~250 MiB, then it is back to idle); where libzmq asserts an allocation instead,
it aborts the front, and the daemon (orchestrator.daemon.front_process) starts a new one.

It imports neither torch nor the daemon's server, so it starts in a fraction of a second.

Run by the daemon as `python -m orchestrator.daemon.client_front`; its first line on stdout is
READY, or ERROR_PREFIX and the one-line reason it cannot serve (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
from pathlib import Path

import zmq

from orchestrator.daemon.transport import DaemonAddress, TransportError, bind_server, receive_request
from protocol import codec, jobs
from protocol.codec import ErrorCode
from protocol.fault_points import fault_point

# The front's data segment (heap and private mappings; RLIMIT_DATA, so shared libraries and
# reserved-but-unused arena space do not count). An idle front uses 32 MiB of it (41 MiB on tcp, with
# CURVE's authenticator thread); one request is at most 1 MiB and honest clients have one in flight
# each, so 256 MiB leaves room for ~200 at once while a multipart flood stops there instead of at 1 GiB.
MEMORY_BOUND_BYTES = 256 * 1024 * 1024
# How often the front checks that its daemon is still there (an orphaned front must not hold the port).
POLL_MS = 500
READY = "ready"
ERROR_PREFIX = "error: "


def limit_memory(limit: int = MEMORY_BOUND_BYTES) -> None:
    """Cap this process's data segment at `limit` (or at the hard limit, if that is lower)."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def relay(public: zmq.Socket, core: zmq.Socket, daemon_pid: int, token: bytes) -> None:
    """Pass single-frame requests to the daemon (with the token it gave this front) and its replies
    back, until the daemon is gone."""
    poller = zmq.Poller()
    poller.register(public, zmq.POLLIN)
    poller.register(core, zmq.POLLIN)
    while os.getppid() == daemon_pid:
        events = dict(poller.poll(POLL_MS))
        if public in events:
            identity, payload = receive_request(public)  # extra frames are dropped as read
            if isinstance(payload, bytes):
                try:
                    core.send_multipart([token, identity, payload], flags=zmq.NOBLOCK)
                    payload = None
                except zmq.Again:  # the daemon is not connected or is far behind
                    payload = jobs.Error("", ErrorCode.INTERNAL, "the daemon is not taking requests; try again")
            if payload is not None:
                send_quietly(public, [identity, codec.encode(payload)])
        if core in events:
            frames = core.recv_multipart()
            if len(frames) == 2:  # [client identity, reply]; the daemon never sends anything else
                send_quietly(public, frames)


def send_quietly(socket: zmq.Socket, frames: list[bytes]) -> None:
    """Send without blocking; a client that is gone or not reading loses its reply, nobody else waits."""
    try:
        socket.send_multipart(frames, flags=zmq.NOBLOCK)
    except zmq.Again:
        pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.daemon.client_front")
    parser.add_argument("--endpoint", required=True, help="the public endpoint clients connect to")
    parser.add_argument("--core", required=True, help="the daemon's private ipc endpoint")
    parser.add_argument("--daemon-pid", type=int, required=True, help="exit when this parent is gone")
    parser.add_argument("--server-secret-key", type=Path, default=None)
    parser.add_argument("--authorized-keys-dir", type=Path, default=None)
    return parser.parse_args(argv)


def read_token() -> bytes:
    """The daemon's secret for this front, one hex line on stdin (a pipe only the two share)."""
    line = sys.stdin.readline().strip()
    sys.stdin.close()
    return bytes.fromhex(line)


def refuse(context: zmq.Context, reason: str) -> int:
    """Tell the daemon why this front cannot serve (one line); returns the exit status."""
    sys.stdout.write(f"{ERROR_PREFIX}{reason}\n")
    context.destroy(linger=0)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the daemon, which stops the front
    token = read_token()
    limit_memory()
    address = DaemonAddress(args.endpoint, args.server_secret_key, args.authorized_keys_dir)
    context = zmq.Context()
    if refusal := fault_point("front.starting"):
        return refuse(context, refusal)
    try:
        public, authenticator = bind_server(context, address)
    except TransportError as exc:
        return refuse(context, str(exc))
    except zmq.ZMQError as exc:  # e.g. the endpoint is in use or malformed
        return refuse(context, f"{address.endpoint}: {exc}")
    core = context.socket(zmq.DEALER)
    core.setsockopt(zmq.LINGER, 0)
    core.connect(args.core)
    sys.stdout.write(f"{READY}\n")
    sys.stdout.close()  # the daemon reads one line; nothing else goes there
    try:
        relay(public, core, args.daemon_pid, token)
    finally:
        if authenticator is not None:
            authenticator.stop()
        context.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

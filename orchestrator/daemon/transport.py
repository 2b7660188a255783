"""Client<->daemon sockets: ipc:// in a private directory by default, tcp:// only with CURVE.

An ipc socket lives in a 0700 runtime directory, so only the daemon's user can reach it. A tcp
endpoint is refused unless CURVE keys are configured: the daemon then accepts only clients whose
public keys are in the authorized-keys folder, and all traffic is encrypted.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import secrets
import sys
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from config.settings import DaemonSettings
from orchestrator.placement.stale_sockets import accepts_connections
from orchestrator.placement.worker_link import runtime_dir
from protocol import jobs
from protocol.codec import MAX_MESSAGE_BYTES, ErrorCode

# Owner read/write only: a CURVE secret key is a credential.
SECRET_KEY_MODE = 0o600
# The daemon's secret for its client front (bytes): unguessable, like a CURVE key.
FRONT_TOKEN_BYTES = 32


class TransportError(ValueError):
    """The endpoint or key configuration cannot be used."""


class DaemonNotListening(TransportError):
    """No daemon listens at the ipc endpoint: no socket file, or one a killed daemon left behind."""


@dataclasses.dataclass(frozen=True)
class DaemonAddress:
    """Where the daemon listens and, for tcp, the CURVE material."""

    endpoint: str
    server_secret_key: Path | None = None  #: daemon side: its secret key file
    authorized_keys_dir: Path | None = None  #: daemon side: clients' public key files
    server_public_key: Path | None = None  #: client side: the daemon's public key file
    client_secret_key: Path | None = None  #: client side: its own secret key file

    @property
    def uses_tcp(self) -> bool:
        return self.endpoint.startswith("tcp://")


def default_endpoint() -> str:
    return f"ipc://{runtime_dir()}/daemon.sock"


def core_endpoint(pid: int) -> str:
    """The daemon's private socket, which only its client front (client_front) connects to; named by
    the daemon's pid so daemons of different state dirs sharing a runtime dir never meet."""
    return f"ipc://{runtime_dir()}/daemon-core-{pid}.sock"


def bind_core(context: zmq.Context, endpoint: str) -> zmq.Socket:
    """The daemon's end of the private link to its client front: a ROUTER that receives
    [front, token, client identity, request] and sends [front, client identity, reply].

    A ROUTER, not a DEALER: a DEALER deals its replies round-robin to every peer connected, so any
    process of the daemon's user that connected to this socket received other clients' replies.
    The ROUTER answers only the peer that asked, and the daemon answers only requests that carry the
    token it gave its current front (`receive_from_front`).
    """
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # the front forwards one-frame requests only
    socket.setsockopt(zmq.SNDHWM, 1000)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a front that is gone fails at once, never queues
    socket.bind(endpoint)
    return socket


def new_front_token() -> bytes:
    """A secret the daemon gives its client front over a pipe (never argv or the environment, which
    /proc shows): the front sends it with every request, so the daemon answers the front alone."""
    return secrets.token_bytes(FRONT_TOKEN_BYTES)


def receive_from_front(socket: zmq.Socket, token: bytes) -> tuple[bytes, bytes, bytes | jobs.Error] | None:
    """One request off the daemon's core ROUTER: (front's routing id, client identity, payload or the
    error reply to send instead), or None when the sender lacks the current front's token (any other
    process that connected): its frames are dropped as they are read and it is not answered."""
    front = socket.recv()
    if not socket.getsockopt(zmq.RCVMORE):
        return None
    presented = socket.recv(copy=False)
    if not hmac.compare_digest(presented.bytes, token) or not socket.getsockopt(zmq.RCVMORE):
        drop_rest(socket)
        return None
    identity, payload = receive_request(socket)
    return front, identity, payload


def drop_rest(socket: zmq.Socket) -> tuple[int, int]:
    """Read and drop the remaining frames of the current message, zero-copy, so their memory is
    returned as it is read; returns (frames, bytes) dropped."""
    frames, dropped = 0, 0
    while socket.getsockopt(zmq.RCVMORE):
        frames += 1
        dropped += len(socket.recv(copy=False))
    return frames, dropped


def bind_server(context: zmq.Context, address: DaemonAddress) -> tuple[zmq.Socket, ThreadAuthenticator | None]:
    """The public ROUTER socket (bound by the client front); with tcp, also the running CURVE authenticator."""
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    # Peers sending a frame over the limit are disconnected by libzmq before it is buffered.
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    # A client that vanished before its reply must not make the daemon block or queue forever.
    socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
    socket.setsockopt(zmq.SNDHWM, 1000)
    authenticator = None
    if address.uses_tcp:
        if not (address.server_secret_key and address.authorized_keys_dir):
            raise TransportError(
                f"{address.endpoint}: tcp endpoints need daemon.curve_server_secret_key and "
                "daemon.curve_authorized_keys_dir (create them with `ltx2 keys DIR`)"
            )
        if not zmq.has("curve"):
            raise TransportError("this libzmq has no CURVE support; use an ipc:// endpoint")
        # Read the key before the authenticator thread starts, so a bad key leaves nothing running.
        public, secret = load_key(address.server_secret_key, "daemon.curve_server_secret_key")
        if not address.authorized_keys_dir.is_dir():
            raise TransportError(
                f"daemon.curve_authorized_keys_dir = {address.authorized_keys_dir}: not a directory "
                "(create keys with `ltx2 keys DIR`)"
            )
        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(address.authorized_keys_dir))
        socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
    socket.bind(address.endpoint)
    return socket, authenticator


def receive_request(socket: zmq.Socket) -> tuple[bytes, bytes | jobs.Error]:
    """One client message off the client front's ROUTER (or the daemon's link to its front): the
    client's identity, and its one payload frame or the error reply to send instead.

    MAXMSGSIZE bounds each frame, not the message: one message of 1,000 frames of 1 MiB took the
    daemon to 2 GB when it was read with recv_multipart, which copies every frame into Python and
    left most of it to the allocator. Here only the first payload frame is kept; any further frame
    (a request is exactly one) is received zero-copy and dropped at once, so its memory is returned
    as it is read, and only its size is counted for the error. libzmq delivers a message whole, so
    draining the rest never waits on the peer. That whole-message buffering is why the ROUTER lives
    in the client front, a process with a memory bound (client_front), and not in the daemon.
    """
    identity = socket.recv()
    if not socket.getsockopt(zmq.RCVMORE):  # a ROUTER always prefixes the identity; be safe anyway
        return identity, jobs.Error("", ErrorCode.MALFORMED, "empty message")
    payload = socket.recv(copy=False)
    extra_frames, extra_bytes = drop_rest(socket)
    if extra_frames:
        return identity, jobs.Error(
            "",
            ErrorCode.MALFORMED,
            f"expected one message frame, got {extra_frames + 1} ({len(payload) + extra_bytes} bytes); "
            "multipart requests are refused",
        )
    return identity, payload.bytes


def start_hint() -> str:
    """The command that starts the daemon from here, as a new user can paste it: the supervisord of this
    Python's environment (./install.sh puts it in .venv/bin, which is rarely on PATH) and the repo's
    supervisord.conf by its full path; without that file (an installed wheel) the foreground daemon."""
    config = Path(__file__).resolve().parents[2] / "supervisord.conf"
    supervisord = Path(sys.executable).parent / "supervisord"
    if not config.is_file():
        return "ltx2 daemon (in the foreground)"
    program = supervisord if supervisord.is_file() else Path("supervisord")
    return f"{program} -c {config}"


def connect_client(context: zmq.Context, address: DaemonAddress) -> zmq.Socket:
    """A DEALER connected to the daemon (with CURVE for tcp); DaemonNotListening at once when no daemon
    listens at an ipc endpoint, TransportError for unusable keys (no socket is left open either way)."""
    if address.endpoint.startswith("ipc://") and not accepts_connections(Path(address.endpoint.removeprefix("ipc://"))):
        raise DaemonNotListening(f"no daemon is listening at {address.endpoint} (start it: {start_hint()})")
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        if address.uses_tcp:
            if not (address.server_public_key and address.client_secret_key):
                raise TransportError(
                    f"{address.endpoint}: tcp needs daemon.curve_server_public_key and daemon.curve_client_secret_key"
                )
            server_public, _ = load_key(address.server_public_key, "daemon.curve_server_public_key")
            public, secret = load_key(address.client_secret_key, "daemon.curve_client_secret_key")
            socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = secret, public, server_public
        socket.connect(address.endpoint)
    except BaseException:
        socket.close(linger=0)
        raise
    return socket


def load_key(path: Path, setting: str) -> tuple[bytes, bytes | None]:
    """A CURVE key file's (public, secret) keys; a missing or broken file is a configuration error
    naming the setting, not a traceback."""
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise TransportError(
            f"{setting} = {path}: cannot read the key ({exc}); create keys with `ltx2 keys DIR`"
        ) from None


def create_keys(directory: Path) -> dict[str, Path]:
    """Write a server and a client key pair; the client's public key is authorized."""
    authorized = directory / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    server_public, server_secret = zmq.auth.create_certificates(str(directory), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(directory), "client")
    # pyzmq writes every certificate with the umask's mode (usually 0644); a secret key readable by
    # other users lets them impersonate the daemon or an authorized client.
    for secret in (server_secret, client_secret):
        os.chmod(secret, SECRET_KEY_MODE)
    (authorized / "client.key").write_bytes(Path(client_public).read_bytes())
    return {
        "server_secret": Path(server_secret),
        "server_public": Path(server_public),
        "client_secret": Path(client_secret),
        "authorized_dir": authorized,
    }


def address_from_settings(daemon: DaemonSettings) -> DaemonAddress:
    """The configured address (empty endpoint: the default ipc socket)."""

    def path(value: str) -> Path | None:
        return Path(value).expanduser() if value else None

    return DaemonAddress(
        endpoint=daemon.endpoint or default_endpoint(),
        server_secret_key=path(daemon.curve_server_secret_key),
        authorized_keys_dir=path(daemon.curve_authorized_keys_dir),
        server_public_key=path(daemon.curve_server_public_key),
        client_secret_key=path(daemon.curve_client_secret_key),
    )

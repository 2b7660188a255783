"""The daemon's socket: typed errors for any garbage, CURVE on tcp, and it keeps serving real jobs."""

from __future__ import annotations

import random
import socket as pysocket
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import load_settings
from orchestrator.daemon.client import DaemonClient, DaemonError
from orchestrator.daemon.server import Daemon
from orchestrator.daemon.transport import DaemonAddress, TransportError, create_keys
from protocol import codec, jobs
from protocol.codec import MAX_MESSAGE_BYTES, ErrorCode

REQUEST_TYPES = ["submit", "status", "list", "cancel", "resume", "logs", "ping"]
ERROR_CODES = {code.value for code in ErrorCode}


class RunningDaemon:
    def __init__(self, tmp_path: Path, address: DaemonAddress, hf_home: Path) -> None:
        environ = {
            "LTX2_STATE_DIR": str(tmp_path / "state"),
            "LTX2_OUTPUT_DIR": str(tmp_path / "out"),
            "HOME": str(tmp_path),
        }
        self.daemon = Daemon(load_settings(environ=environ), address)
        self.thread = threading.Thread(target=self.daemon.serve, daemon=True)

    def __enter__(self) -> Daemon:
        self.thread.start()
        assert self.daemon.ready.wait(10)
        return self.daemon

    def __exit__(self, *exc_info: object) -> None:
        self.daemon.stop.set()
        self.thread.join(30)


@pytest.fixture
def ipc_address(tmp_path: Path) -> DaemonAddress:
    return DaemonAddress(f"ipc://{tmp_path}/d.sock")


def junk_frames() -> st.SearchStrategy[bytes]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=20),
        st.binary(max_size=20),
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=10,
    )
    bad_version = st.fixed_dictionaries(
        {
            "v": st.integers(2, 9) | st.text(max_size=3),
            "type": st.sampled_from(REQUEST_TYPES),
            "id": st.text(max_size=5),
        }
    )
    unknown_type = st.fixed_dictionaries(
        {
            "v": st.just(1),
            "type": st.text(max_size=12).filter(
                lambda t: (
                    t not in REQUEST_TYPES + ["ok", "error", "ready", "go", "progress", "heartbeat", "done", "failed"]
                )
            ),
            "id": st.text(max_size=5),
        }
    )
    extra_field = st.fixed_dictionaries(
        {"v": st.just(1), "type": st.sampled_from(REQUEST_TYPES), "id": st.text(max_size=5), "zz_extra": values}
    )
    wrong_id = st.fixed_dictionaries(
        {
            "v": st.just(1),
            "type": st.sampled_from(REQUEST_TYPES),
            "id": st.integers(-(2**63), 2**63 - 1) | st.none() | st.binary(max_size=4),
        }
    )
    structured = st.one_of(
        bad_version, unknown_type, extra_field, wrong_id, values.filter(lambda v: not isinstance(v, dict))
    )
    return st.one_of(st.binary(max_size=200), structured.map(lambda v: msgpack.packb(v, use_bin_type=True)))


# Frames in flight at once (well under libzmq's default high-water mark of 1000 messages).
FUZZ_WINDOW = 100


def fuzzed_frames(count: int) -> list[bytes]:
    """`count` malformed frames: a quarter drawn by hypothesis from `junk_frames` (the structured edge cases:
    bad versions, unknown types, extra fields, wrong ids), the rest cut from them or random, seeded.

    Drawn before any is sent: drawn while the daemon (a thread of this process) answered each one, they took
    nearly twice as long, the two threads handing the GIL to each other for every frame. Not all drawn:
    hypothesis spends ~3 ms an example, 30 s of CI for 10,000. A proper prefix of a msgpack message never
    decodes (its header promises more), so cutting a drawn frame short gives another malformed one."""
    drawn: list[bytes] = []

    @settings(max_examples=count // 4, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(frame=junk_frames())
    def draw(frame: bytes) -> None:
        drawn.append(frame)

    draw()
    rng = random.Random(0)
    longer = [frame for frame in drawn if len(frame) >= 2]
    frames = list(drawn)
    while len(frames) < count:
        if len(frames) % 2:
            frame = rng.choice(longer)
            frames.append(frame[: rng.randrange(1, len(frame))])
        else:
            frames.append(rng.randbytes(rng.randrange(0, 201)))
    return frames


def test_ten_thousand_malformed_frames_each_get_a_typed_error_then_a_real_job_runs(
    tmp_path: Path, ipc_address: DaemonAddress, hf_home: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    context = zmq.Context()
    with RunningDaemon(tmp_path, ipc_address, hf_home):
        client = context.socket(zmq.DEALER)
        client.connect(ipc_address.endpoint)
        replies: list[str] = []
        frames = fuzzed_frames(10_000)
        # Sent FUZZ_WINDOW at a time, then their replies read (the daemon answers one peer's frames in order):
        # one frame per round trip spent most of the test handing the GIL between this thread and the daemon's.
        for first in range(0, len(frames), FUZZ_WINDOW):
            window = frames[first : first + FUZZ_WINDOW]
            for frame in window:
                client.send(frame)
            for frame in window:
                assert client.poll(5000), f"daemon did not answer {frame!r}"
                reply = codec.decode(client.recv())
                assert isinstance(reply, jobs.Error), (frame, reply)
                assert reply.code in ERROR_CODES, (frame, reply)
                replies.append(reply.code)
        assert len(replies) >= 10_000 and not client.poll(100)  # one reply per frame, none left over
        client.send_multipart([b"two", b"frames"])
        assert client.poll(5000) and codec.decode(client.recv()).code == ErrorCode.MALFORMED
        client.send(b"\x00" * (MAX_MESSAGE_BYTES + 10))  # libzmq drops the oversized peer, no reply
        assert not client.poll(500)
        client.close(linger=0)
        with DaemonClient(ipc_address, 10) as fresh:
            job_id = fresh.request(
                jobs.Submit("", {"prompt": "still alive", "width": 64, "height": 64, "num_frames": 9, "seed": 2})
            )["id"]
            deadline = time.monotonic() + 120
            while (state := fresh.request(jobs.Status(job_id))["job"]["state"]) not in ("done", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.3)
        assert state == "done"
    context.term()


def free_port() -> int:
    with pysocket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_tcp_needs_curve_and_admits_only_authorized_clients(tmp_path: Path, hf_home: Path):
    keys = create_keys(tmp_path / "keys")
    intruder = create_keys(tmp_path / "intruder")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = DaemonAddress(
        endpoint, server_secret_key=keys["server_secret"], authorized_keys_dir=keys["authorized_dir"]
    )
    with RunningDaemon(tmp_path, server, hf_home):
        allowed = DaemonAddress(
            endpoint, server_public_key=keys["server_public"], client_secret_key=keys["client_secret"]
        )
        with DaemonClient(allowed, 10) as client:
            assert client.request(jobs.Ping(""))["protocol"] == codec.PROTOCOL_VERSION
            with pytest.raises(DaemonError) as caught:
                client.request(jobs.Status("no-such-job"))
            assert caught.value.code == ErrorCode.NOT_FOUND
        stranger = DaemonAddress(
            endpoint, server_public_key=keys["server_public"], client_secret_key=intruder["client_secret"]
        )
        with DaemonClient(stranger, 1.5) as client, pytest.raises(DaemonError, match="no reply"):
            client.request(jobs.Ping(""))


def test_tcp_without_keys_is_refused(tmp_path: Path):
    daemon = Daemon(
        load_settings(environ={"LTX2_STATE_DIR": str(tmp_path), "HOME": str(tmp_path)}),
        DaemonAddress(f"tcp://127.0.0.1:{free_port()}"),
    )
    with pytest.raises(TransportError, match="need daemon.curve_server_secret_key"):
        daemon.serve()

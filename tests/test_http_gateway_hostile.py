"""`ltx2 serve` against hostile and careless clients (issue 24, items 2-6): slow connections, crafted
JSON, Range errors, local facts the answers must not name, and key guessing.

A real daemon and a real uvicorn (`ltx2 serve` in a subprocess) with small read bounds, so each
slow-client case waits a second or two; clients are raw sockets where the defect is below HTTP
(a connection left open, a half-sent request), http.client otherwise. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from gateway_process import HTTP_CONFIG, TINY, Gateway, free_port, stop

# Small bounds: a slow client is cut within a few seconds. The failed-key budget is per address:
# the test of it names its own addresses with X-Forwarded-For (uvicorn trusts it from loopback).
HOSTILE_CONFIG = (
    HTTP_CONFIG
    + """
header_timeout_s = 1.0
body_timeout_s = 2.0
keep_alive_timeout_s = 1.0
max_connections = 6
failed_auth_per_minute = 4
"""
)
# Twice the bound and some: how long a test waits for the gateway to close a connection.
CLOSE_WITHIN_S = 6.0
TRICKLE_S = 0.3  # a slow client's byte interval (the hostile run used 5 s; the bounds here are 1-2 s)
RENDER_TIMEOUT_S = 400.0


@pytest.fixture(scope="module")
def gateway(hf_home: Path, tmp_path_factory: pytest.TempPathFactory):
    with Gateway(tmp_path_factory.mktemp("hostile"), hf_home, HOSTILE_CONFIG) as running:
        yield running


def connect(gateway: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=10)


def read_until_closed(sock: socket.socket, within_s: float, trickle: bytes = b"") -> tuple[bool, bytes]:
    """Read what the gateway sends until it closes the connection, sending one byte of `trickle` every
    TRICKLE_S meanwhile; (whether it closed within `within_s`, the bytes received)."""
    received, sent = b"", 0
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if sent < len(trickle):
            try:
                sock.send(trickle[sent : sent + 1])
                sent += 1
            except OSError:  # the gateway closed it: read what it sent before
                sent = len(trickle)
        if select.select([sock], [], [], TRICKLE_S)[0]:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return True, received
            if not chunk:
                return True, received
            received += chunk
    return False, received


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def openai_error(body: bytes) -> dict:
    """The `error` object of an OpenAI-shaped error body (fails on anything else, e.g. plain text)."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# --- item 2: slow clients --------------------------------------------------------------------------


def test_connections_that_never_finish_their_headers_are_closed(gateway):
    silent, slow = connect(gateway), connect(gateway)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    with silent, slow:
        results = {}
        reader = threading.Thread(target=lambda: results.update(silent=read_until_closed(silent, CLOSE_WITHIN_S)))
        reader.start()
        results["slow"] = read_until_closed(slow, CLOSE_WITHIN_S, trickle=b"a" * 100)
        reader.join()
    assert results["silent"] == (True, b"") and results["slow"] == (True, b""), results


def test_a_create_whose_body_is_too_slow_is_408_and_closed(gateway):
    before = len(gateway.daemon_jobs())
    with connect(gateway) as sock:
        sock.sendall(
            b"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + gateway.keys["alice"].encode() + b"\r\nContent-Length: 200\r\n\r\n"
        )
        closed, received = read_until_closed(sock, CLOSE_WITHIN_S, trickle=b" " * 200)
    assert closed and received, received
    status, headers, body = parse_response(received)
    assert status == 408 and headers["connection"] == "close", received
    assert openai_error(body)["code"] == "request_timeout"
    assert len(gateway.daemon_jobs()) == before


def test_a_body_the_gateway_never_reads_is_cut_off_after_the_answer(gateway):
    with connect(gateway) as sock:  # /healthz reads no body: it answers at once, the body trickles on
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 200\r\n\r\n")
        closed, received = read_until_closed(sock, CLOSE_WITHIN_S, trickle=b" " * 200)
    assert closed and parse_response(received)[0] == 200, received


def test_an_idle_keep_alive_connection_is_closed_after_the_setting(gateway):
    with connect(gateway) as sock:  # uvicorn's own default would keep it 5 s
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        closed, received = read_until_closed(sock, 3.5)
    assert closed and parse_response(received)[0] == 200, received


def test_a_connection_over_the_cap_is_503_in_openai_shape(gateway):
    held = [connect(gateway) for _ in range(6)]  # http.max_connections
    try:
        status, headers, body = gateway.get("/healthz")
    finally:
        for sock in held:
            sock.close()
    assert status == 503 and int(headers["retry-after"]) >= 1 and headers["connection"] == "close"
    assert openai_error(body)["code"] == "too_many_connections"
    deadline = time.monotonic() + 5
    while gateway.get("/healthz")[0] != 200:  # the held ones are gone: room again
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_request_that_is_not_http_gets_openai_json(gateway):
    with connect(gateway) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        closed, received = read_until_closed(sock, CLOSE_WITHIN_S)
    status, headers, body = parse_response(received)
    assert closed and status == 400 and headers["content-type"] == "application/json", received
    assert openai_error(body)["type"] == "invalid_request_error"


# --- item 3: crafted fields ------------------------------------------------------------------------

VALID = {"prompt": "a valid prompt", "model": TINY, "size": "64x64"}


def json_body(fields: dict) -> bytes:
    return json.dumps({**VALID, **fields}).encode()  # ensure_ascii: a lone surrogate travels as \ud800


DEEP_LORAS = (json.dumps(VALID)[:-1] + ', "loras": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (DEEP_LORAS, "loras"),
        (json_body({"prompt": "a\ud800b"}), "prompt"),
        (json_body({"negative_prompt": "a\ud800b"}), "negative_prompt"),
        (json_body({"seconds": 10**40}), "seconds"),
        (json_body({"seconds": 10**400}), "seconds"),
        (json_body({"seconds": 3600, "fps": 1e308}), "seconds"),
        (json_body({"fps": 10**400}), "fps"),
        (json_body({"num_frames": 10**30}), "num_frames"),
        (json_body({"steps": 10**30}), "steps"),
        (json_body({"seed": 2**70}), "seed"),
        (json_body({"seed": 2**64}), "seed"),
        (json_body({"seed": -(2**63) - 1}), "seed"),
        (json_body({"loras": [{"name": "a/b", "scale": 10**400}]}), "loras"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_crafted_json_is_400_naming_the_field(gateway, body, param):
    before = len(gateway.daemon_jobs())
    status, _, answer = gateway.request("POST", "/v1/videos", "alice", body, {"Content-Type": "application/json"})
    assert status == 400, answer
    error = openai_error(answer)
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert len(gateway.daemon_jobs()) == before


def multipart(fields: dict[str, bytes], files: dict[str, bytes] | None = None) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of raw bytes (what a client may send, valid UTF-8 or not)."""
    boundary = "ltx2-test-boundary"
    heads = [(f'name="{name}"', value) for name, value in fields.items()]
    heads += [
        (f'name="{name}"; filename="{name}.png"\r\nContent-Type: image/png', value)
        for name, value in (files or {}).items()
    ]
    parts = [
        f"--{boundary}\r\nContent-Disposition: form-data; {head}\r\n\r\n".encode() + value for head, value in heads
    ]
    body = b"\r\n".join([*parts, f"--{boundary}--\r\n".encode()])
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": b"a \xff\xfe b"}, "prompt"),  # not UTF-8: `ltx2 submit` refuses such a prompt too
        ({"negative_prompt": b"\xc3("}, "negative_prompt"),
        ({"loras": b"[" * 100_000 + b"]" * 100_000}, "loras"),
        ({"seed": str(2**64).encode()}, "seed"),
    ],
    ids=["prompt", "negative_prompt", "loras", "seed"],
)
def test_crafted_form_fields_are_400_naming_the_field(gateway, fields, param):
    before = len(gateway.daemon_jobs())
    body, headers = multipart({"prompt": b"a valid prompt", "model": TINY.encode(), "size": b"64x64", **fields})
    status, _, answer = gateway.request("POST", "/v1/videos", "alice", body, headers)
    assert status == 400, answer
    assert openai_error(answer)["param"] == param, answer
    assert len(gateway.daemon_jobs()) == before


def test_a_url_encoded_prompt_of_invalid_utf8_is_400_not_replaced(gateway):
    before = len(gateway.daemon_jobs())
    body = b"prompt=a+%FF+b&model=" + TINY.encode() + b"&size=64x64"  # %FF: no UTF-8 byte starts so
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, answer = gateway.request("POST", "/v1/videos", "alice", body, headers)
    assert status == 400 and openai_error(answer)["param"] == "prompt", answer
    assert len(gateway.daemon_jobs()) == before


# --- item 4: every error in OpenAI's shape ---------------------------------------------------------


def completed_video(gateway: Gateway) -> str:
    status, _, video = gateway.post_json("bob", {**VALID, "prompt": "a clock ticks", "num_frames": 9})
    assert status == 200, video
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while (state := gateway.daemon_job(video["id"])["state"]) not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the render never ended"
        time.sleep(0.5)
    assert state == "done", gateway.daemon_job(video["id"])
    return video["id"]


def test_range_errors_on_content_are_openai_json(gateway):
    path = f"/v1/videos/{completed_video(gateway)}/content"
    status, headers, whole = gateway.get(path, "bob")
    assert status == 200 and headers["accept-ranges"] == "bytes"
    status, _, part = gateway.get(path, "bob", {"Range": "bytes=0-9"})
    assert status == 206 and part == whole[:10]  # a good range is still served
    for header, code in (("bytes=5-2", 400), ("lines=0-1", 400), ("bytes=", 400), (f"bytes={len(whole)}-", 416)):
        status, headers, body = gateway.get(path, "bob", {"Range": header})
        assert status == code and headers["content-type"] == "application/json", (header, body)
        error = openai_error(body)
        assert error["type"] == "invalid_request_error" and error["message"], (header, error)
        if code == 416:
            assert headers["content-range"] == f"bytes */{len(whole)}" and error["code"] == "range_not_satisfiable"


# --- item 5: local facts ---------------------------------------------------------------------------


def test_healthz_and_metrics_show_no_local_facts_to_any_key(gateway):
    status, _, body = gateway.get("/healthz")
    assert status == 200 and not [key for key in json.loads(body) if "pid" in key], body
    assert str(gateway.daemon_pid()) not in body.decode()
    status, _, body = gateway.get("/metrics", "alice")  # every key's job counts: the operator's only
    assert status == 403 and openai_error(body)["code"] == "permission_denied"
    status, _, body = gateway.get("/metrics", "carol")  # http.metrics_keys
    assert status == 200 and "ltx2_jobs{" in body.decode()


def bad_image_create(gateway: Gateway, port: int | None = None) -> tuple[int, dict]:
    """A create whose input_reference looks like a PNG but is not one: the daemon refuses it."""
    body, headers = multipart(
        {"prompt": b"an image that is not one", "model": TINY.encode(), "size": b"64x64"},
        {"input_reference": b"\x89PNG\r\n\x1a\n" + b"\0" * 64},
    )
    status, _, answer = gateway.request("POST", "/v1/videos", "alice", body, headers, port=port)
    return status, openai_error(answer)


def test_a_refused_upload_names_no_server_path(gateway):
    status, error = bad_image_create(gateway)
    assert status == 400 and error["param"] == "input_reference", error
    assert "/" not in error["message"] and gateway.env["LTX2_STATE_DIR"] not in error["message"], error
    assert gateway.upload_files() == []


def test_uploads_of_a_gateway_killed_mid_create_are_swept_at_start(gateway):
    port = free_port()
    doomed = gateway.start_server(port, gateway.env, "doomed-serve.log")

    def create_on_doomed() -> None:
        with contextlib.suppress(OSError):  # its gateway dies under it
            bad_image_create(gateway, port)

    create = threading.Thread(target=create_on_doomed, daemon=True)
    os.kill(gateway.daemon.pid, signal.SIGSTOP)  # the create stores its upload, then waits on the daemon
    try:
        create.start()
        deadline = time.monotonic() + 30
        while not gateway.upload_files():
            assert time.monotonic() < deadline, "the create never stored its upload"
            time.sleep(0.05)
        doomed.kill()
        doomed.wait()
    finally:
        os.kill(gateway.daemon.pid, signal.SIGCONT)
    left = gateway.upload_files()
    assert len(left) == 1 and left[0].suffix == ".png"

    restarted = gateway.start_server(free_port(), gateway.env, "restarted-serve.log")
    try:
        assert gateway.upload_files() == []
    finally:
        stop(restarted)
    status, error = bad_image_create(gateway)  # the module's gateway, running all along, still stores uploads
    assert status == 400 and error["param"] == "input_reference", error
    create.join(timeout=30)


# --- item 6: guessing keys -------------------------------------------------------------------------


def test_failed_keys_are_limited_per_client_address(gateway):
    def get(key: str, address: str) -> tuple[int, dict[str, str], bytes]:
        return gateway.get("/v1/videos", key, {"X-Forwarded-For": address})

    guesser, neighbour = "192.0.2.77", "192.0.2.78"
    assert [get("ltx2-guess", guesser)[0] for _ in range(4)] == [401] * 4  # http.failed_auth_per_minute
    status, headers, body = get("ltx2-guess", guesser)
    assert status == 429 and 0 < int(headers["retry-after"]) <= 60
    error = openai_error(body)
    assert error["type"] == "rate_limit_error" and error["code"] == "too_many_failed_authentications"
    assert get("alice", guesser)[0] == 429  # over the budget the key is not even checked
    assert get("alice", neighbour)[0] == 200 and get("ltx2-guess", neighbour)[0] == 401

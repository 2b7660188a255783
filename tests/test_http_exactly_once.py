"""A create makes exactly one video the key owns: however the daemon stalls, the gateway dies or the client
sends the request again (issue 24, item 1). Real daemon, real `ltx2 serve`, the official client with its
own retries."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from gateway_process import HTTP_CONFIG, TINY, Gateway

from protocol import jobs

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks the Sora API deprecated

# A lost daemon reply is noticed after this long here (30 s by default), so a stall of a few seconds
# loses several replies; the create keeps sending its submit for up to a minute.
REQUEST_TIMEOUT_S = 1.0
CONFIG = f"{HTTP_CONFIG}create_timeout_s = 60.0\n\n[daemon]\nrequest_timeout_s = {REQUEST_TIMEOUT_S}\n"
REQUEST = {"prompt": "a kettle whistles on a stove", "model": TINY, "size": "64x64", "seconds": "0.3"}


@pytest.fixture(scope="module")
def gateway(hf_home: Path, tmp_path_factory: pytest.TempPathFactory):
    with Gateway(tmp_path_factory.mktemp("once"), hf_home, CONFIG) as running:
        yield running


def daemon_job_ids(gateway: Gateway) -> set[str]:
    return {job["id"] for job in gateway.daemon_jobs()}


def stopped_daemon(gateway: Gateway, seconds: float, while_stopped: threading.Thread) -> None:
    """SIGSTOP the daemon, start `while_stopped`, let `seconds` pass, SIGCONT (always)."""
    pid = gateway.daemon_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        while_stopped.start()
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_create_while_the_daemon_stalls_makes_one_video_with_the_retrying_official_client(gateway):
    client = gateway.client(max_retries=2)  # the official client's default: a 5xx is sent again, as a new request
    before = daemon_job_ids(gateway)
    result: dict = {}
    create = threading.Thread(target=lambda: result.update(video=client.videos.create(**REQUEST)))
    stopped_daemon(gateway, 6 * REQUEST_TIMEOUT_S, create)
    create.join(timeout=120)
    video = result["video"]
    assert daemon_job_ids(gateway) - before == {video.id}
    assert [v.id for v in client.videos.list().data].count(video.id) == 1
    assert "sending its submit again" in gateway.log()  # replies were lost, and no second job came of it
    client.videos.delete(video.id)


def test_a_daemon_that_does_not_answer_is_503_naming_no_server_path(gateway):
    video = gateway.client().videos.create(**REQUEST)
    pid = gateway.daemon_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        status, _, body = gateway.get(f"/v1/videos/{video.id}", "alice")
    finally:
        os.kill(pid, signal.SIGCONT)
    error = json.loads(body)["error"]
    assert status == 503 and error["code"] == "daemon_unavailable", body
    assert "ipc://" not in error["message"] and "/tmp/" not in error["message"] and "<path>" in error["message"]
    gateway.client().videos.delete(video.id)


def test_the_gateway_and_the_daemon_log_each_line_with_its_time(gateway):
    video = gateway.client().videos.create(**REQUEST)
    gateway.client().videos.delete(video.id)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert f"the job page at http://127.0.0.1:{gateway.port}/" in gateway.log()
    assert re.search(f'^{stamp}INFO: +127\\.0\\.0\\.1:\\d+ - "POST /v1/videos HTTP/1\\.1" 200', gateway.log(), re.M)
    assert re.search(f"^{stamp}ltx2\\.daemon: job {video.id}: queued", gateway.daemon.log(), re.M)


def test_idempotency_key_answers_the_same_request_with_the_same_video_and_refuses_another(gateway):
    client = gateway.client()
    before = daemon_job_ids(gateway)
    first = client.videos.create(**REQUEST, extra_headers={"Idempotency-Key": "take-1"})
    again = client.videos.create(**REQUEST, extra_headers={"Idempotency-Key": "take-1"})
    assert again.id == first.id and daemon_job_ids(gateway) - before == {first.id}
    other = {**REQUEST, "prompt": "a kettle left to cool"}
    status, _, body = gateway.request(
        "POST",
        "/v1/videos",
        "alice",
        json.dumps(other).encode(),
        {"Content-Type": "application/json", "Idempotency-Key": "take-1"},
    )
    error = json.loads(body)["error"]
    assert status == 409 and error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert first.id in error["message"]
    # Keys are per API key: bob's "take-1" is his own.
    bobs = gateway.client("bob").videos.create(**other, extra_headers={"Idempotency-Key": "take-1"})
    assert bobs.id != first.id
    assert daemon_job_ids(gateway) - before == {first.id, bobs.id}
    gateway.client("bob").videos.delete(bobs.id)
    client.videos.delete(first.id)


def test_a_gateway_killed_mid_create_leaves_a_video_its_key_sees(gateway):
    before = daemon_job_ids(gateway)

    def create() -> None:
        try:
            gateway.post_json("alice", {**REQUEST, "prompt": "a gateway dies mid-create"})
        except OSError:  # the connection dies with the gateway
            pass

    pid = gateway.daemon_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        threading.Thread(target=create, daemon=True).start()
        time.sleep(2 * REQUEST_TIMEOUT_S)  # the claim is recorded, the submit sent (and sent again)
        assert gateway.server is not None
        gateway.server.kill()
        gateway.server.wait()
    finally:
        os.kill(pid, signal.SIGCONT)
    gateway.server = gateway.start_server(gateway.port, gateway.env, "serve.log")
    deadline = time.monotonic() + 60
    while not (made := daemon_job_ids(gateway) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(made) == 1, made  # the daemon took the submits the dead gateway had sent: one job
    (video_id,) = made
    listed = [video for video in gateway.client().videos.list().data if video.id == video_id]
    assert len(listed) == 1 and listed[0].status in ("queued", "in_progress", "completed"), listed
    with gateway.daemon.client() as daemon:
        assert daemon.request(jobs.Status(video_id))["job"]["prompt"] == "a gateway dies mid-create"
    gateway.client().videos.delete(video_id)

"""`ltx2 serve` in front of a real `ltx2 daemon`, both child processes, with three API keys.

Shared by the gateway's tests (the API's and the job page's), so each starts the same gateway the
same way: keys made by `ltx2 keys --http`, the server polled on /healthz until it answers.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import REPO_ROOT, ltx2_environment, run_ltx2
from daemon_process import DaemonProcess

from protocol import jobs

if TYPE_CHECKING:
    import openai

TINY = "ltx-2-tiny"
HTTP_CONFIG = """
[http]
max_upload_bytes = 524288
max_body_bytes = 4194304
max_active_jobs_per_key = 2
requests_per_minute = 100000
# carol is also the operator: the only key that may read /metrics.
metrics_keys = ["carol"]
# OpenAI's sizes, and a small one delivered the same way (rendered at 96x64, cropped): the tiny model's VAE
# compresses 4x, so OpenAI's own sizes take many minutes on CPU.
exact_sizes = ["720x1280", "1280x720", "1024x1792", "1792x1024", "72x40"]
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Gateway:
    """The daemon, `ltx2 serve` and three API keys, for the whole module."""

    def __init__(self, root: Path, hf_home: Path, config: str = HTTP_CONFIG) -> None:
        runtime = Path(f"/tmp/ltx2-http-{os.getpid()}-{root.name[-12:]}")  # one per gateway: short ipc paths
        runtime.mkdir(mode=0o700, exist_ok=True)
        (root / "config.toml").write_text(config)
        self.env = {
            **ltx2_environment(hf_home, root),
            "XDG_RUNTIME_DIR": str(runtime),
            "LTX2_CONFIG": str(root / "config.toml"),
        }
        self.root = root
        self.port = free_port()
        self.keys = {}
        for name in ("alice", "bob", "carol"):
            made = run_ltx2(["keys", "--http", name], self.env)
            assert made.returncode == 0, made.stderr
            self.keys[name] = made.stdout.strip()
        self.daemon = DaemonProcess(self.env, root / "daemon.log")
        self.server: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Gateway:
        self.daemon.__enter__()
        try:
            self.server = self.start_server(self.port, self.env, "serve.log")
        except BaseException:
            self.daemon.__exit__()
            raise
        return self

    def start_server(self, port: int, env: dict[str, str], log_name: str) -> subprocess.Popen[bytes]:
        """`ltx2 serve --port PORT`, once it answers /healthz."""
        with (self.root / log_name).open("ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if self.request("GET", "/healthz", port=port)[0] == 200:
                    return server
            except OSError:
                pass
            time.sleep(0.2)
        stop(server)
        raise TimeoutError(f"ltx2 serve never answered /healthz:\n{(self.root / log_name).read_text()}")

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            stop(self.server)
        self.daemon.__exit__()

    def log(self) -> str:
        return (self.root / "serve.log").read_text(errors="replace")

    def client(self, key: str = "alice", max_retries: int = 0) -> openai.OpenAI:
        import openai  # only the tests that drive the official client need it

        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1",
            api_key=self.keys.get(key, key),
            max_retries=max_retries,
            timeout=120,
        )

    def request(
        self,
        method: str,
        path: str,
        key: str | None = None,
        body: bytes | None = None,
        headers: dict | None = None,
        port: int | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """A raw HTTP request (for what the openai client cannot send: no key, Range)."""
        connection = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=120)
        try:
            sent = dict(headers or {})
            if key is not None:
                sent["Authorization"] = f"Bearer {self.keys.get(key, key)}"
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def get(self, path: str, key: str | None = None, headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, key, headers=headers)

    def post_json(self, key: str, fields: dict) -> tuple[int, dict[str, str], dict]:
        status, headers, body = self.request(
            "POST", "/v1/videos", key, json.dumps(fields).encode(), {"Content-Type": "application/json"}
        )
        return status, headers, json.loads(body)

    def upload_files(self) -> list[Path]:
        """Every file under the gateway's uploads dir (each gateway process keeps its own folder there)."""
        uploads = Path(self.env["LTX2_STATE_DIR"]) / "http" / "uploads"
        return sorted(path for path in uploads.rglob("*") if path.is_file())

    def daemon_jobs(self) -> list[dict]:
        with self.daemon.client() as client:
            return client.request(jobs.ListJobs("", 1000))["jobs"]

    def daemon_job(self, job_id: str) -> dict:
        with self.daemon.client() as client:
            return client.request(jobs.Status(job_id))["job"]

    def daemon_pid(self) -> int:
        with self.daemon.client() as client:
            return client.request(jobs.Ping(""))["pid"]


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

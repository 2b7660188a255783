"""The job page at `/`: headless Chromium against a real `ltx2 serve` in front of a real daemon rendering
the tiny model on CPU.

The browser does what a user does: enters the key, submits prompts through the form, watches the
table and plays the finished clip. Chromium is required, never skipped (a skipped browser test
would hide a broken page): `.ci/run` installs Debian's chromium and chromium-driver.

Nothing here may reach the network: Selenium gets both paths and SE_OFFLINE=1 (its driver manager
never downloads), Chromium runs with its background services off and a resolver that finds no
host, and the last test checks that no process this module started held a socket to an address
other than loopback (tests/network_watch.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_process import TINY, Gateway
from network_watch import NetworkWatch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from orchestrator.daemon.executor import ProgressBoard
from protocol import stages
from protocol.files import Stage
from protocol.model_ids import TINY_REPO_ID

RENDER_TIMEOUT_S = 400.0
# The page's answer to a click or a reload: instant on a quiet machine; a bound, not a delay, for a loaded one.
UI_WAIT_S = 30
KEY_ITEM = "ltx2-api-key"  # the sessionStorage item page.html keeps the key in
ROWS_JS = """return [...document.querySelectorAll('#jobs tbody tr')].map((row) => ({
    id: row.dataset.id,
    prompt: row.querySelector('.prompt').textContent,
    seed: row.querySelector('.seed').textContent,
    model: row.querySelector('.model').textContent,
    status: row.querySelector('.status').textContent,
    detail: row.querySelector('.detail').textContent,
}));"""
PLAYER_JS = """const video = document.querySelector(`tr[data-id="${arguments[0]}"] video`);
return video ? {ready: video.readyState, duration: video.duration, src: video.src} : null;"""
# What the page calls each stage (page.html's STAGE_NAMES): a user reads "audio", not "audio_decode".
STAGE_NAMES = {"encode_diffuse": "text+diffusion", "audio_decode": "audio", "video_decode": "video"}
VISIBLE_JS = "return Object.fromEntries(arguments[0].map((id) => [id, document.getElementById(id).checkVisibility()]));"
HOSTILE_PROMPT = "<img src=x onerror=\"document.title='pwned'\"><b>bold</b> & </td><script>alert(1)</script>"
# Debian's browser itself, not /usr/bin/chromium: that launcher adds the flags of /etc/chromium.d
# (remote extensions among them) and Google API keys. Its driver is the same package's.
CHROMIUM = Path("/usr/lib/chromium/chromium")
CHROMEDRIVER = Path("/usr/lib/chromium/chromedriver")
# Every process this module starts inherits RUN_MARK=<a value of this run>: how the network watch finds them.
RUN_MARK = "LTX2_TEST_RUN"
CHROMIUM_ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--mute-audio",
    # Off the network: no background services, updates, sync, metrics or crash reports, no proxy
    # lookup, and a resolver that finds no host but the gateway's loopback address.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--metrics-recording-only",
    "--disable-breakpad",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


@pytest.fixture(scope="module")
def network() -> Iterator[NetworkWatch]:
    """The watch over every process this module starts (they inherit the marker and SE_OFFLINE=1)."""
    run = uuid.uuid4().hex
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(RUN_MARK, run)
        patch.setenv("SE_OFFLINE", "1")  # Selenium Manager: never download a driver or a browser
        watch = NetworkWatch(f"{RUN_MARK}={run}")
        watch.start()
        try:
            yield watch
        finally:
            watch.stop()


@pytest.fixture(scope="module")
def gateway(network: NetworkWatch, hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with Gateway(tmp_path_factory.mktemp("page"), hf_home) as running:
        yield running


@pytest.fixture(scope="module")
def browser(network: NetworkWatch) -> Iterator[webdriver.Chrome]:
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), (
        "the job page test needs Chromium: apt-get install chromium chromium-driver (.ci/run does)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    session = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield session
    finally:
        session.quit()


def rows(browser: webdriver.Chrome) -> list[dict[str, str]]:
    return browser.execute_script(ROWS_JS)


def row_of(browser: webdriver.Chrome, prompt: str, timeout_s: float = 30.0) -> dict[str, str]:
    """The table row showing `prompt` (the page polls, so it may take a moment to appear)."""
    found = WebDriverWait(browser, timeout_s).until(
        lambda b: next((row for row in rows(b) if row["prompt"] == prompt), None)
    )
    return found


def submit(browser: webdriver.Chrome, prompt: str, model: str = TINY) -> dict[str, str]:
    """Fill the form as a user would and submit it (an empty model: the daemon's default); returns the new job's row."""
    for field, value in (("prompt", prompt), ("model", model), ("size", "64x64"), ("seconds", "0.7")):
        element = browser.find_element("id", field)
        element.clear()
        element.send_keys(value)
    browser.find_element("id", "submit").click()
    return row_of(browser, prompt)


def api_video(gateway: Gateway, video_id: str) -> tuple[int, dict[str, Any]]:
    status, _, body = gateway.get(f"/v1/videos/{video_id}", "alice")
    return status, json.loads(body)


def test_page_is_served_without_a_key_under_a_strict_policy(gateway):
    status, headers, body = gateway.get("/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    policy = headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy and headers["x-content-type-options"] == "nosniff"
    assert "innerHTML" not in page and "http://" not in page and "https://" not in page  # no CDN, no raw HTML
    assert gateway.get("/v1/videos")[0] == 401  # the page is open; the API behind it is not
    # Every stage has a name on the page, and only those.
    names = json.loads(re.sub(r"(\w+):", r'"\1":', re.search(r"const STAGE_NAMES = (\{.*?\});", page)[1]))
    assert names == STAGE_NAMES and set(STAGE_NAMES) == {stage.value for stage in Stage}
    # The icon browsers ask for by themselves, and the one the page names.
    for path in ("/favicon.ico", "/favicon.svg"):
        status, headers, icon = gateway.get(path)
        assert status == 200 and headers["content-type"] == "image/svg+xml" and icon.startswith(b"<svg")
    assert '<link rel="icon" type="image/svg+xml" href="/favicon.svg">' in page


def test_progress_board_times_the_phase_for_an_eta():
    board = ProgressBoard()
    stage = Stage.ENCODE_DIFFUSE.value
    board.update("job", stages.Progress("job", stage, "load transformer", 0, 0, 0, 0))
    board.update("job", stages.Progress("job", stage, "denoise", 0, 4, 0, 0))
    assert board.get("job")["eta_s"] is None  # no step timed yet
    time.sleep(0.2)
    board.update("job", stages.Progress("job", stage, "denoise", 1, 4, 0, 0))
    time.sleep(0.2)
    board.update("job", stages.Progress("job", stage, "denoise", 2, 4, 0, 0))
    assert board.get("job")["eta_s"] == pytest.approx(0.4, abs=0.15)  # 0.2 s a step, 2 steps left
    board.update("job", stages.Progress("job", Stage.VIDEO_DECODE.value, "decode video", 0, 3, 0, 0))
    assert board.get("job")["eta_s"] is None  # a new phase starts its own clock


def visible(browser: webdriver.Chrome, *ids: str) -> dict[str, bool]:
    """Whether each element is rendered (not hidden by itself or a parent)."""
    return browser.execute_script(VISIBLE_JS, list(ids))


def use_key(browser: webdriver.Chrome, key: str) -> None:
    browser.find_element("id", "key").send_keys(key)
    browser.find_element("id", "use-key").click()


def test_the_first_screen_says_how_to_get_a_key_and_folds_away_naming_the_key_in_use(gateway, browser):
    key = gateway.keys["alice"]
    browser.get(f"http://127.0.0.1:{gateway.port}/")
    # The first screen says where a key comes from, and shows nothing but the key form.
    assert "ltx2 keys --http" in browser.find_element("id", "key-section").text
    assert visible(browser, "key-section", "app") == {"key-section": True, "app": False}
    use_key(browser, "ltx2-not-a-key")  # refused before it is kept
    WebDriverWait(browser, UI_WAIT_S).until(lambda b: "does not know this key" in b.find_element("id", "message").text)
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY_ITEM}')") is None
    browser.find_element("id", "key").clear()
    use_key(browser, key)
    WebDriverWait(browser, UI_WAIT_S).until(lambda b: b.find_element("id", "submit").is_displayed())
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY_ITEM}')") == key
    assert key not in browser.current_url
    # The key form folds away; the key in use is named (never shown), with a way to change it.
    shown = visible(browser, "key-section", "key-bar", "change-key")
    assert shown == {"key-section": False, "key-bar": True, "change-key": True}
    assert browser.find_element("id", "key-name").text == "alice" and key not in browser.page_source


def test_browser_submits_watches_and_plays_a_clip(gateway, browser):
    # Signed in as alice by the test above; a reload keeps the tab's key and names it again.
    browser.get(f"http://127.0.0.1:{gateway.port}/")
    WebDriverWait(browser, UI_WAIT_S).until(lambda b: b.find_element("id", "key-name").text == "alice")

    # A prompt full of markup is shown as text: no element injected, no script run.
    hostile = submit(browser, HOSTILE_PROMPT)
    injected = browser.execute_script("return document.querySelectorAll('#jobs img, #jobs b, #jobs script').length")
    assert injected == 0 and browser.title == "ltx2 jobs"
    assert len(browser.find_elements("css selector", "#jobs tbody tr")) == len(rows(browser))
    browser.find_element("css selector", f'tr[data-id="{hostile["id"]}"] button.delete').click()
    WebDriverWait(browser, 90).until(lambda b: all(row["id"] != hostile["id"] for row in rows(b)))
    assert api_video(gateway, hostile["id"])[0] == 404

    # No model: the default, which is not cached here, so the tiny model runs and the page says so.
    prompt = "a paper boat drifts down a rainy street"
    video_id = submit(browser, prompt, model="")["id"]
    shown, running = [], []
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while time.monotonic() < deadline:
        row = next(row for row in rows(browser) if row["id"] == video_id)
        shown.append(row["detail"])
        _, video = api_video(gateway, video_id)
        assert {"stage", "phase", "step", "steps", "eta_seconds"} <= video.keys()
        if video["status"] == "in_progress":
            running.append(video)
        if row["status"] == "completed" or video["status"] == "failed":
            break
        time.sleep(0.2)
    assert row["status"] == "completed", (video, gateway.daemon_job(video_id))
    assert row["model"].startswith(f"{TINY_REPO_ID} (tiny offline model"), row
    assert video["stage"] is None and video["steps"] == 0 and video["eta_seconds"] is None  # only while running
    assert row["seed"] == str(video["seed"]) and isinstance(video["seed"], int)  # the random seed it drew
    stages_seen = {video["stage"] for video in running} - {None}
    assert stages_seen and stages_seen <= {stage.value for stage in Stage}, running
    # The page showed where it was in the user's words, never the worker module's.
    assert any(f"{STAGE_NAMES[stage]}:" in detail for detail in shown for stage in stages_seen), shown
    assert not any(stage.value in detail for detail in shown for stage in Stage), shown
    # No --name over HTTP: the published file is named after the prompt, with the stamp of the job's id.
    published = Path(gateway.daemon_job(video_id)["output"]).name
    assert published == f"a-paper-boat-drifts-down_{video_id[:15]}.mp4"

    WebDriverWait(browser, 60).until(lambda b: (b.execute_script(PLAYER_JS, video_id) or {}).get("ready", 0) >= 2)
    player = browser.execute_script(PLAYER_JS, video_id)
    assert player["src"].startswith("blob:")  # fetched with the key in a header, never in a URL
    assert video["num_frames"] == 17
    assert player["duration"] == pytest.approx(17 / video["fps"], abs=0.1)
    assert gateway.keys["alice"] not in gateway.log()  # the access log saw no URL carrying the key


def test_a_row_shows_its_jobs_log_and_the_key_can_be_changed_or_forgotten(gateway, browser):
    listed = json.loads(gateway.get("/v1/videos", "alice")[2])["data"]
    (done,) = [video for video in listed if video["status"] == "completed"]  # the clip of the test above
    browser.find_element("css selector", f'tr[data-id="{done["id"]}"] button.log').click()
    WebDriverWait(browser, 30).until(lambda b: "job_done" in b.find_element("id", "log-text").text)
    # The events as `ltx2 logs` shows them and the latest worker log, fetched with the key.
    log = browser.find_element("id", "log-text").text
    assert "stage_finished  video_decode" in log and "--- video_decode-1.log ---" in log, log
    assert str(gateway.root) not in log and "<path>" in log  # where the job lies is not the client's to know
    assert done["prompt"] in browser.find_element("id", "log-title").text

    # Change key: the form comes back above the jobs; Cancel keeps the key in use.
    browser.find_element("id", "change-key").click()
    shown = visible(browser, "key-section", "app", "cancel-key")
    assert shown == {"key-section": True, "app": True, "cancel-key": True}
    browser.find_element("id", "cancel-key").click()
    assert visible(browser, "key-section")["key-section"] is False
    browser.find_element("id", "forget").click()  # Forget key: back to the first screen, nothing kept
    shown = visible(browser, "key-section", "app", "log-panel")
    assert shown == {"key-section": True, "app": False, "log-panel": False}
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY_ITEM}')") is None


def test_the_network_watch_sees_a_socket_to_an_outside_address():
    """The check below is not vacuous: a marked process holding a UDP socket connected to a
    documentation address (connecting UDP sends nothing) is seen as outside."""
    mark = uuid.uuid4().hex
    script = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n    s.connect(('198.51.100.7', 9))\nexcept OSError:\n    sys.exit(3)\n"
        "print('connected', flush=True)\ntime.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], env={RUN_MARK: mark}, stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "connected":
            pytest.skip("this host has no route to any outside address")
        watch = NetworkWatch(f"{RUN_MARK}={mark}")
        watch.sample()
    finally:
        child.kill()
        child.wait()
    assert [(peer.pid, str(peer.address), peer.port) for peer in watch.outside] == [(child.pid, "198.51.100.7", 9)]


def test_the_network_watch_marks_a_process_first_seen_between_fork_and_exec():
    """A child caught before its exec shows its parent's environment (no marker); it is looked at again
    once it exec'd. Under load a sample caught chromedriver there and never watched it or Chromium."""
    mark = uuid.uuid4().hex
    child = subprocess.Popen(["sh", "-c", f"sleep 1; exec env {RUN_MARK}={mark} sleep 30"])
    try:
        watch = NetworkWatch(f"{RUN_MARK}={mark}")
        assert child.pid not in watch.marked()  # still the shell: no marker yet
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "the child never exec'd"
            time.sleep(0.05)
        assert child.pid in watch.marked()
    finally:
        child.kill()
        child.wait()


def test_no_process_of_this_module_talked_to_anything_but_loopback(gateway, browser, network):
    """Runs last: every process the module started (Chromium and its helpers, chromedriver, the
    gateway, the daemon and its workers) held sockets to loopback only, sampled all along."""
    network.sample()
    assert network.samples > 10
    assert {gateway.daemon.pid, gateway.server.pid} <= network.pids
    assert {"chromium", "chromedriver"} <= {command.split()[0] for command in network.commands}, network.commands
    assert any(peer.port == gateway.port for peer in network.peers)  # it did see the browser's connections
    assert network.outside == [], network.outside

"""The job page at `/`: headless Chromium against a real `ltx2 serve` in front of a real daemon rendering
the tiny model on CPU.

The browser does what a user does: enters the key, submits prompts through the form, watches the
table and plays the finished clip. Chromium is required, never skipped (a skipped browser test
would hide a broken page): `.ci/run` installs Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_process import TINY, Gateway
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from orchestrator.daemon.executor import ProgressBoard
from protocol import stages
from protocol.files import Stage

RENDER_TIMEOUT_S = 400.0
KEY_ITEM = "ltx2-api-key"  # the sessionStorage item page.html keeps the key in
ROWS_JS = """return [...document.querySelectorAll('#jobs tbody tr')].map((row) => ({
    id: row.dataset.id,
    prompt: row.querySelector('.prompt').textContent,
    status: row.querySelector('.status').textContent,
    detail: row.querySelector('.detail').textContent,
}));"""
PLAYER_JS = """const video = document.querySelector(`tr[data-id="${arguments[0]}"] video`);
return video ? {ready: video.readyState, duration: video.duration, src: video.src} : null;"""
HOSTILE_PROMPT = "<img src=x onerror=\"document.title='pwned'\"><b>bold</b> & </td><script>alert(1)</script>"


@pytest.fixture(scope="module")
def gateway(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with Gateway(tmp_path_factory.mktemp("page"), hf_home) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, (
        "the job page test needs Chromium: apt-get install chromium chromium-driver (.ci/run does)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio"):
        options.add_argument(argument)
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
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


def submit(browser: webdriver.Chrome, prompt: str) -> dict[str, str]:
    """Fill the form as a user would and submit it; returns the new job's row."""
    for field, value in (("prompt", prompt), ("model", TINY), ("size", "64x64"), ("seconds", "0.7")):
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


def test_browser_submits_watches_and_plays_a_clip(gateway, browser):
    key = gateway.keys["alice"]
    browser.get(f"http://127.0.0.1:{gateway.port}/")
    browser.find_element("id", "key").send_keys(key)
    browser.find_element("css selector", "#key-form button").click()
    WebDriverWait(browser, 10).until(lambda b: b.find_element("id", "submit").is_displayed())
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY_ITEM}')") == key
    assert key not in browser.current_url

    # A prompt full of markup is shown as text: no element injected, no script run.
    hostile = submit(browser, HOSTILE_PROMPT)
    injected = browser.execute_script("return document.querySelectorAll('#jobs img, #jobs b, #jobs script').length")
    assert injected == 0 and browser.title == "ltx2 jobs"
    assert len(browser.find_elements("css selector", "#jobs tbody tr")) == len(rows(browser))
    browser.find_element("css selector", f'tr[data-id="{hostile["id"]}"] .actions button').click()  # Delete
    WebDriverWait(browser, 90).until(lambda b: all(row["id"] != hostile["id"] for row in rows(b)))
    assert api_video(gateway, hostile["id"])[0] == 404

    prompt = "a paper boat drifts down a rainy street"
    video_id = submit(browser, prompt)["id"]
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
    assert video["stage"] is None and video["steps"] == 0 and video["eta_seconds"] is None  # only while running
    stages_seen = {video["stage"] for video in running} - {None}
    assert stages_seen and stages_seen <= {stage.value for stage in Stage}, running
    assert any(f"{stage}:" in detail for detail in shown for stage in stages_seen), shown  # the page showed it

    WebDriverWait(browser, 60).until(lambda b: (b.execute_script(PLAYER_JS, video_id) or {}).get("ready", 0) >= 2)
    player = browser.execute_script(PLAYER_JS, video_id)
    assert player["src"].startswith("blob:")  # fetched with the key in a header, never in a URL
    assert video["num_frames"] == 17
    assert player["duration"] == pytest.approx(17 / video["fps"], abs=0.1)
    assert key not in gateway.log()  # the access log saw no URL carrying the key

"""bench/event_timings.py: per-stage timings from a job's events.log and job.json.

One real tiny job (real CLI, real workers) gives the reader a job directory; its numbers must agree
with what job.json records. A hand-written directory covers what a single clean run cannot: a
retried stage, a skipped one and a half-written last line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TINY_ARGS, ltx2_environment, run_ltx2

sys.path.insert(0, str(REPO_ROOT / "bench"))
from event_timings import STAGE_ORDER, parse_time, read_events, read_job  # noqa: E402


@pytest.fixture(scope="module")
def job_dir(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job directory of one finished tiny generate run."""
    root = tmp_path_factory.mktemp("bench-events")
    result = run_ltx2(
        ["generate", "--prompt", "a lighthouse in fog", "--seed", "2", "--quiet", *TINY_ARGS],
        ltx2_environment(hf_home, root),
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted((root / "state" / "jobs").iterdir())
    assert len(jobs) == 1
    return jobs[0]


def test_three_stages_in_pipeline_order_each_ending_after_it_starts(job_dir: Path) -> None:
    job = read_job(job_dir)
    assert job.status == "done"
    assert tuple(job.stages) == STAGE_ORDER
    for stage in job.stages.values():
        assert len(stage.attempts) == 1 and stage.value("result") == "ok" and not stage.skipped
        assert stage.started is not None and stage.ended is not None
        assert stage.ended > stage.started
        assert stage.seconds is not None and stage.seconds > 0
    encode, audio, video = (job.stages[name] for name in STAGE_ORDER)
    assert encode.started < audio.started < video.started
    assert encode.ended <= audio.started and audio.ended <= video.started
    assert job.created <= encode.started and video.ended <= job.ended
    assert all(job.lead_in_s(name) >= 0 for name in STAGE_ORDER)


def test_numbers_agree_with_job_json(job_dir: Path) -> None:
    record = json.loads((job_dir / "job.json").read_text())
    job = read_job(job_dir)
    for name, stage in job.stages.items():
        (attempt,) = record["stages"][name]["attempts"]
        last = stage.last
        assert last.seconds == attempt["seconds"]
        assert (last.peak_gpu_bytes, last.peak_rss_bytes) == (attempt["peak_gpu_bytes"], attempt["peak_rss_bytes"])
        assert last.plan == attempt["plan"] and last.result == attempt["result"]
        # events.log is written just after job.json: the stamps differ by file writes, not seconds
        assert last.started == pytest.approx(parse_time(attempt["started"]), abs=1.0)
        assert last.ended == pytest.approx(parse_time(attempt["ended"]), abs=1.0)
        # `seconds` is the worker's own count (from its process start, which a prestarted worker
        # began before the attempt did), so only the events' times are compared with job.json.
        assert last.seconds == attempt["seconds"]
    assert job.output == record["output"]


def test_start_and_end_come_from_events_log(job_dir: Path) -> None:
    events = read_events(job_dir)
    started = {e["stage"]: parse_time(e["t"]) for e in events if e["event"] == "stage_started"}
    finished = {e["stage"]: parse_time(e["t"]) for e in events if e["event"] == "stage_finished"}
    job = read_job(job_dir)
    assert {name: s.started for name, s in job.stages.items()} == started
    assert {name: s.ended for name, s in job.stages.items()} == finished
    assert job.ended == next(parse_time(e["t"]) for e in events if e["event"] == "job_done")


def write_job(job_dir: Path, stages: dict, events: list[dict], tail: str = "") -> None:
    job_dir.mkdir()
    record = {"id": "j1", "status": "done", "created": "2026-01-01T00:00:00.000+00:00", "spec": {"name": "c"}}
    (job_dir / "job.json").write_text(json.dumps({**record, "stages": stages}))
    (job_dir / "events.log").write_text("".join(json.dumps(e) + "\n" for e in events) + tail)


def stamp(second: float) -> str:
    return f"2026-01-01T00:00:{second:06.3f}+00:00"


def test_a_retried_stage_reports_its_last_attempt_and_a_skipped_one_says_so(tmp_path: Path) -> None:
    first = {"attempt": 1, "plan": {"offload": "none"}, "result": "oom", "seconds": 2.0}
    second = {"attempt": 2, "plan": {"offload": "model"}, "result": "ok", "seconds": 3.0, "peak_gpu_bytes": 7}
    stages = {
        "encode_diffuse": {"attempts": [{**first, "started": stamp(1), "ended": stamp(3)}, {**second}]},
        "audio_decode": {"attempts": [{"attempt": 1, "result": "ok", "started": stamp(0.5), "ended": stamp(0.6)}]},
    }
    events = [
        {"t": stamp(1), "event": "stage_started", "stage": "encode_diffuse", "attempt": 1},
        {"t": stamp(3), "event": "stage_finished", "stage": "encode_diffuse", "result": "oom", "seconds": 2.0},
        {"t": stamp(4), "event": "stage_started", "stage": "encode_diffuse", "attempt": 2},
        {"t": stamp(7), "event": "stage_finished", "stage": "encode_diffuse", "result": "ok", "seconds": 3.0},
        {"t": stamp(7.5), "event": "stage_skipped", "stage": "audio_decode"},
        {"t": stamp(8), "event": "job_done"},
    ]
    write_job(tmp_path / "job", stages, events, tail='{"t": "2026-01-01T00:00:09')
    job = read_job(tmp_path / "job")
    encode = job.stages["encode_diffuse"]
    assert [a.result for a in encode.attempts] == ["oom", "ok"]
    assert encode.started == parse_time(stamp(4)) and encode.ended == parse_time(stamp(7))
    assert encode.seconds == 3.0 and encode.value("peak_gpu_bytes") == 7
    assert encode.value("plan") == {"offload": "model"}
    assert job.lead_in_s("encode_diffuse") == pytest.approx(4.0)
    assert job.stages["audio_decode"].skipped
    assert job.ended == parse_time(stamp(8))
    assert job.name == "c"


def test_load_times_and_seconds_per_step_come_from_the_progress_events(job_dir: Path) -> None:
    from gpu_staged import summarize_job

    created = parse_time(json.loads((job_dir / "job.json").read_text())["created"])
    stages = summarize_job(job_dir, created, created + 60)["stages"]
    encode = stages["encode_diffuse"]
    for key in ("text_encode_s", "transformer_load_s", "denoise_s", "first_step_s"):
        assert encode[key] is not None and encode[key] >= 0, key
    assert encode["s_per_step"] == pytest.approx(encode["denoise_s"] / 8)
    assert 0 < encode["s_per_step_steady"] <= encode["denoise_s"]
    for name in ("audio_decode", "video_decode"):
        assert stages[name]["load_s"] >= 0 and stages[name]["decode_s"] > 0, name


def test_steady_clip_cost_adds_up_the_lanes_rates_and_averages_one_lanes_groups():
    from batch_bench import lane_stage_gaps

    def job(lane: int, group: list[str], ends: dict[str, float]) -> dict:
        return {"finished_at": ends, "stages": {"encode_diffuse": [{"group": group, "lane": lane}]}}

    def lane_jobs(lane: int, names: list[str], start: float, spacing: float) -> dict:
        return {
            name: job(lane, names, {stage: start + i * spacing for stage in ("encode_diffuse", "video_decode")})
            for i, name in enumerate(names)
        }

    # Two lanes side by side, 2 s between their clips' ends: one clip per 1 s for the batch,
    # although the lanes' ends interleave unevenly.
    two = lane_jobs(0, ["a", "b", "c"], 10.0, 2.0) | lane_jobs(1, ["d", "e", "f"], 10.3, 2.0)
    assert lane_stage_gaps(two) == pytest.approx({"encode_diffuse": 1.0, "video_decode": 1.0})
    # One lane, two groups one after the other (2 s and 4 s apart): their mean, 3 s.
    one = lane_jobs(0, ["a", "b"], 0.0, 2.0) | lane_jobs(0, ["c", "d"], 50.0, 4.0)
    assert lane_stage_gaps(one) == pytest.approx({"encode_diffuse": 3.0, "video_decode": 3.0})


def test_a_process_lead_in_lists_its_loads_in_order_up_to_the_first_step(job_dir: Path) -> None:
    from batch_bench import lead_in
    from event_timings import progress_rows

    events = read_events(job_dir)
    marks = lead_in(progress_rows(events, "encode_diffuse"), read_job(job_dir).stages["encode_diffuse"].started)
    phases = [phase for _, phase, _ in marks]
    assert phases[:4] == ["load text encoder", "encode 1 prompt(s)", "load transformer", "place transformer (native)"]
    assert marks[-1][1:] == ["denoise", 1]
    offsets = [seconds for seconds, _, _ in marks]
    assert offsets == sorted(offsets) and offsets[0] >= 0
    audio = lead_in(progress_rows(events, "audio_decode"), read_job(job_dir).stages["audio_decode"].started)
    assert [phase for _, phase, _ in audio] == ["load audio decoder", "decode audio", "decode audio"]


def test_phase_spans_cover_the_stage_one_span_per_phase_each_lasting_until_the_next(job_dir: Path) -> None:
    from batch_bench import phase_spans
    from event_timings import progress_rows

    rows = progress_rows(read_events(job_dir), "encode_diffuse")
    spans = phase_spans(rows, read_job(job_dir).stages["encode_diffuse"].started)
    phases = [phase for _, phase, _ in spans]
    assert phases[:4] == ["load text encoder", "encode 1 prompt(s)", "load transformer", "place transformer (native)"]
    assert phases.count("denoise") == 1 and len(phases) == len({*phases})  # the steps are one span
    for (start, _, seconds), (following, _, _) in zip(spans, spans[1:], strict=False):
        assert seconds == pytest.approx(following - start, abs=0.011) and seconds >= 0
    denoise = spans[phases.index("denoise")]
    steps = [t for t, phase, _ in rows if phase == "denoise"]
    assert denoise[2] >= round(steps[-1] - steps[0], 2) - 0.011

"""The typed job record (protocol/job_record.py): job.json read and written only through it.

`tests/job_records/*.json` are job.json files written by `ltx2 generate` on the tiny model before the
record was typed (one plain, one with a LoRA); they must load and write back as the same JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from pathlib import Path

import pytest
from conftest import run_ltx2

from orchestrator.run.jobdir import JobDir
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.sidecar import build_sidecar
from orchestrator.run.states import JobState
from protocol.errors import InvalidInput
from protocol.files import JOB_FILE, Stage
from protocol.job_record import SCHEMA_VERSION, JobRecord, JobRecordError, NewerRecordError, load_record
from protocol.spec import LATER_FIELD_DEFAULTS
from protocol.stage_request import StageRequest
from services.runtime import read_request

RECORDS = Path(__file__).parent / "job_records"
WRITTEN_BEFORE_THE_TYPED_RECORD = sorted(RECORDS.glob("*.json"))
# The first release's job.json: its create() wrote only these keys, and its spec had only these fields.
FIRST_RELEASE_KEYS = ("id", "created", "spec", "spec_digest", "model_path", "revision", "status", "stages")
FIRST_RELEASE_SPEC = (
    "prompt", "model", "width", "height", "num_frames", "steps", "seed", "negative_prompt", "fps",
    "guidance_scale", "schedule", "dtype", "name", "vae_chunk_frames", "vae_tiling",
)  # fmt: skip


def raw(path: Path) -> dict:
    return json.loads(path.read_text())


def first_release_record() -> dict:
    """The plain fixture cut down to what the first release wrote: no digests, family, LoRAs, caches,
    deterministic mode, publish step or cancel point, and a spec without the later fields."""
    today = raw(RECORDS / "done-one-stage.json")
    record = {key: today[key] for key in FIRST_RELEASE_KEYS}
    record["spec"] = {key: today["spec"][key] for key in FIRST_RELEASE_SPEC}
    return record


def write_job_dir(root: Path, record: dict) -> Path:
    job_dir = root / record["id"]
    job_dir.mkdir(parents=True)
    (job_dir / JOB_FILE).write_text(json.dumps(record))
    return job_dir


@pytest.mark.parametrize("path", WRITTEN_BEFORE_THE_TYPED_RECORD, ids=lambda path: path.stem)
def test_a_job_json_written_before_the_typed_record_writes_back_byte_for_byte_plus_its_version(path: Path):
    record = load_record(path)
    written = json.loads(record.to_text())
    assert written.pop("schema_version") == SCHEMA_VERSION == 1
    # Spec fields declared since the file was written come back at their defaults; nothing else changes.
    added = {key: written["spec"].pop(key) for key in set(written["spec"]) - set(json.loads(path.read_text())["spec"])}
    assert added == {key: LATER_FIELD_DEFAULTS[key] for key in added}
    assert json.dumps(written, indent=2, sort_keys=True) == path.read_text()
    assert record.to_text() == json.dumps(record.to_json(), indent=2, sort_keys=True)  # the one format


def test_a_finished_job_json_reads_as_typed_fields():
    record = load_record(RECORDS / "done-with-lora.json")
    assert (record.status, record.spec.name, record.deterministic) == ("done", "lora-clip", True)
    (lora,) = record.loras
    assert (lora.source, lora.scale, lora.revision, lora.weight_name) == ("./dolly.safetensors", 0.5, "local", None)
    assert record.family is not None and record.family.name == "2.0" and record.family.stg_blocks == (29,)
    assert list(record.stages) == list(Stage)
    (attempt,) = record.stages[Stage.VIDEO_DECODE].attempts
    assert (attempt.result, attempt.returncode, attempt.cpu_threads, attempt.ended is not None) == ("ok", 0, 2, True)
    assert record.publish is not None and record.publish.complete and record.publish.video == record.output
    assert record.error == "" and record.finishing is not None and record.stage2_lora is None


def test_a_first_release_job_json_loads_with_the_defaults_its_readers_used(tmp_path: Path):
    job = JobDir.load(write_job_dir(tmp_path, first_release_record()))
    record = job.record
    assert (record.deterministic, record.revision) == (False, "0000000000000000000000000000000000000003")
    assert (record.request_digest, record.digest_inputs, record.family, record.stage2_lora) == (None,) * 4
    assert (record.loras, record.embeddings_dir, record.compile_cache_dir) == ([], None, None)
    assert (record.error, record.output, record.finished, record.finishing, record.publish) == (None,) * 5
    assert (job.spec.pipeline, job.spec.nag_scale, job.state, job.finishing) == ("one-stage", 1.0, JobState.DONE, False)
    request = StageRequest.of(record)
    assert (request.embeddings_dir, request.compile_cache_dir, request.family, request.loras) == (None, None, None, ())
    sidecar = build_sidecar(job, tmp_path / "clip.mp4")
    assert (sidecar["deterministic"], sidecar["family"], sidecar["pipeline"]) == (False, None, "one-stage")


def test_a_record_without_revision_reads_it_as_empty():
    old = {key: value for key, value in first_release_record().items() if key != "revision"}
    assert JobRecord.from_json(old).revision == ""


def test_a_first_release_job_json_keeps_its_keys_and_gains_only_what_its_run_sets(tmp_path: Path):
    job = JobDir.load(write_job_dir(tmp_path, first_release_record()))
    job.transition(JobState.QUEUED)
    written = raw(job.path / JOB_FILE)
    later = {"schema_version", "request_digest", "digest_inputs", "family", "stage2_lora", "deterministic", "loras"}
    assert set(written) == {*FIRST_RELEASE_KEYS, *later, "error"}
    assert (written["deterministic"], written["loras"], written["request_digest"]) == (False, [], None)


def test_a_record_of_a_newer_schema_version_is_refused_naming_the_file_and_the_version(tmp_path: Path):
    job_dir = write_job_dir(tmp_path, {**raw(RECORDS / "done-one-stage.json"), "schema_version": 3})
    with pytest.raises(NewerRecordError) as refused:
        JobDir.load(job_dir)
    message = str(refused.value)
    assert message.startswith(f"{job_dir / JOB_FILE}: job record schema version 3 is newer than this ltx2-stages")
    assert "(up to 2)" in message  # 2: a job waiting for another (protocol.job_record.WAITING_SCHEMA_VERSION)
    with pytest.raises(InvalidInput, match=r"cannot read .*job\.json: job record schema version 3 is newer"):
        read_request(job_dir)  # a worker refuses it too, as invalid input


def test_decode_refuses_a_newer_job_json_in_one_line_exit_2(ltx2_env: dict, tmp_path: Path):
    job_dir = write_job_dir(tmp_path / "jobs", {**raw(RECORDS / "done-one-stage.json"), "schema_version": 7})
    before = (job_dir / JOB_FILE).read_bytes()
    result = run_ltx2(["decode", "--input", str(job_dir), "--output", str(tmp_path / "out.mp4")], ltx2_env)
    assert result.returncode == 2, result.stderr
    assert f"{job_dir / JOB_FILE} is not a readable ltx2-stages job file (job record schema version 7" in result.stderr
    assert "Traceback" not in result.stderr and (job_dir / JOB_FILE).read_bytes() == before


def test_unknown_keys_are_kept_when_the_record_is_written_back(tmp_path: Path):
    """A key another build wrote (top level, in a stage, in an attempt, in the publish step) survives
    this version's rewrite of job.json unchanged."""
    record = raw(RECORDS / "done-one-stage.json")
    record["from_another_build"] = {"kept": [1, 2]}
    record["stages"]["audio_decode"]["note"] = "kept"
    record["stages"]["audio_decode"]["attempts"][0]["gpu_name"] = "H100"
    record["publish"]["checked_by"] = "a tool"
    job = JobDir.load(write_job_dir(tmp_path, record))
    job.transition(JobState.QUEUED)
    written = raw(job.path / JOB_FILE)
    assert written["from_another_build"] == {"kept": [1, 2]}
    assert written["stages"]["audio_decode"]["note"] == "kept"
    assert written["stages"]["audio_decode"]["attempts"][0]["gpu_name"] == "H100"
    assert written["publish"]["checked_by"] == "a tool"


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda r: r["stages"]["audio_decode"]["attempts"][0].update(seconds="fast"), "attempts[0].seconds must be"),
        (lambda r: r["stages"].pop("video_decode"), "stages.video_decode is missing"),
        (lambda r: r["stages"].update(upscale={"status": "pending"}), "unknown stage 'upscale'"),
        (lambda r: r.pop("model_path"), "model_path is missing"),
        (lambda r: r.update(loras=[{"source": "x"}]), "loras[0].path is missing"),
        (lambda r: r.update(schema_version="one"), "schema_version must be a positive integer"),
    ],
    ids=["wrong-type", "missing-stage", "unknown-stage", "missing-field", "lora-without-path", "bad-version"],
)
def test_a_damaged_record_is_refused_naming_the_field(tmp_path: Path, damage, named: str):
    record = raw(RECORDS / "done-one-stage.json")
    damage(record)
    with pytest.raises(JobRecordError, match=f"^{re.escape(str(tmp_path))}.*: .*{re.escape(named)}"):
        JobDir.load(write_job_dir(tmp_path, record))


def test_a_new_job_writes_todays_keys_and_its_version(tmp_path: Path):
    old = load_record(RECORDS / "done-one-stage.json")
    model = ResolvedModel(old.spec.model, Path(old.model_path), old.revision, old.family)
    job = JobDir.create(tmp_path / "jobs", old.spec, model)
    written = raw(job.path / JOB_FILE)
    finished = {"error", "output", "finished", "finishing", "publish"}  # set by its run, not by its creation
    # `owner` was recorded after the fixture was written: who runs the job, this process for the daemon's queue.
    assert set(written) == {*raw(RECORDS / "done-one-stage.json"), "schema_version", "owner"} - finished
    assert written["schema_version"] == SCHEMA_VERSION
    assert (written["owner"]["command"], written["owner"]["pid"]) == ("daemon", os.getpid())
    assert written["stages"] == {stage.value: {"status": "pending", "attempts": [], "outputs": {}} for stage in Stage}


def test_a_worker_reads_a_typed_request_of_the_job(tmp_path: Path):
    job_dir = write_job_dir(tmp_path, raw(RECORDS / "done-with-lora.json"))
    request = read_request(job_dir)
    record = load_record(job_dir / JOB_FILE)
    assert (request.job_id, request.spec, request.revision) == (record.id, record.spec, record.revision)
    assert request.model_path == Path(record.model_path) and request.loras == tuple(record.loras)
    assert request.embeddings_dir == Path(record.embeddings_dir) and request.request_digest == record.request_digest


def record_classes() -> list[type]:
    """Every record class of protocol/job_record.py (JobRecord and the records nested in it)."""
    import protocol.job_record as records

    return [
        value
        for value in vars(records).values()
        if isinstance(value, type) and issubclass(value, records.RecordFields) and dataclasses.is_dataclass(value)
    ]


@pytest.mark.parametrize("record_class", record_classes(), ids=lambda cls: cls.__name__)
def test_a_field_that_may_be_none_and_has_no_default_is_written_as_null_so_it_reads_back(record_class: type):
    """to_json leaves None out unless the field says WRITTEN_AS_NULL; a field with no default left out cannot be
    read back (an extension of an MP4 file, source_job None, failed its first state change on this)."""
    hints = typing.get_type_hints(record_class)
    dropped = [
        field.name
        for field in dataclasses.fields(record_class)
        if type(None) in typing.get_args(hints[field.name])
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
        and not field.metadata.get("written_as_null")
    ]
    assert dropped == [], f"{record_class.__name__}: {dropped} would be left out of job.json and then be missing"


def test_an_extension_of_a_file_reads_back_from_its_json():
    from protocol.job_record import ResolvedExtension

    extension = ResolvedExtension(
        source="/tmp/source.mp4", source_job=None, file="extend_source.mp4", sha256="0" * 64,
        frames=17, width=64, height=64, fps=24.0, overlap=9,
    )  # fmt: skip
    written = json.loads(json.dumps(extension.to_json()))
    assert written["source_job"] is None
    assert ResolvedExtension.from_json(written) == extension

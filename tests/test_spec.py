"""Job spec validation: every rule fails with the flag, the value and what is allowed."""

from __future__ import annotations

import hashlib
import json

import pytest

from protocol.spec import DECODE_ONLY_FIELDS, LATER_FIELD_DEFAULTS, JobSpec
from protocol.spec_rules import NAME_PATTERN, SpecError, name_from_prompt

VALID = {"prompt": "a cat", "model": "m", "width": 768, "height": 512, "num_frames": 121, "steps": 8, "seed": 1}


def spec(**changes: object) -> JobSpec:
    return JobSpec.from_dict({**VALID, **changes})


def test_valid_spec_round_trips_through_plain_data():
    original = spec(negative_prompt="blur", vae_chunk_frames=8)
    assert JobSpec.from_dict(original.to_dict()) == original
    assert original.latent_frames == 16


@pytest.mark.parametrize(
    ("changes", "flag", "fragment"),
    [
        ({"num_frames": 100}, "--num-frames", "nearest allowed: 97 or 105"),
        ({"num_frames": 1}, "--num-frames", "8n+1"),
        ({"width": 770}, "--width", "multiple of 32"),
        ({"height": 32}, "--height", "between 64 and 4096"),
        ({"steps": 0}, "--steps", "between 1"),
        ({"seed": -1}, "--seed", "between 0"),
        ({"guidance_scale": 0.5}, "--guidance-scale", "between 1.0"),
        ({"prompt": "   "}, "--prompt", "must not be empty"),
        ({"prompt": "\U0001f30a" * 10_000}, "--prompt", "40000 bytes in UTF-8; at most 32768"),
        ({"negative_prompt": "\u00e9" * 17_000}, "--negative-prompt", "34000 bytes in UTF-8"),
        ({"prompt": "a \udcff cat"}, "--prompt", "must be valid UTF-8"),
        ({"name": "../etc/passwd"}, "--name", "must match"),
        ({"schedule": "karras"}, "--schedule", "one of distilled, default"),
        ({"steps": 4}, "--steps", "distilled schedule has exactly 8"),
        ({"vae_chunk_frames": 40}, "--vae-chunk-frames", "between 2 and 16"),
        ({"width": "768"}, "--width", "must be of type int"),
        ({"colour": "red"}, "--colour", "unknown field"),
        ({"audio_guidance_scale": 0.5}, "--audio-guidance-scale", "between 1.0 and 30.0"),
        ({"stg_scale": -1.0}, "--stg-scale", "between 0.0 and 10.0"),
        ({"modality_scale": 0.0}, "--modality-scale", "between 1.0 and 10.0"),
        ({"guidance_rescale": 1.5}, "--guidance-rescale", "between 0.0 and 1.0"),
        ({"pipeline": "three-stage"}, "--pipeline", "one of one-stage, two-stage"),
        ({"pipeline": "two-stage", "height": 480}, "--height", "nearest allowed: 448 or 512; or --pipeline one-stage"),
        ({"pipeline": "two-stage", "width": 64}, "--width", "multiple of 64 between 128 and 4096"),
        ({"crop_width": 721}, "--crop-width", "must be an even number of pixels"),
        ({"crop_height": 8}, "--crop-height", "between 16 and 4096; got 8"),
        ({"crop_width": 800}, "--crop-width", "must be at most --width 768 (a crop of the rendered frames never"),
    ],
)
def test_rule_violations_name_the_flag(changes: dict, flag: str, fragment: str):
    with pytest.raises(SpecError) as caught:
        spec(**changes)
    message = str(caught.value)
    assert message.startswith(flag + ":")
    assert fragment in message


@pytest.mark.parametrize(
    ("frames", "hint"),
    [
        (100, "(nearest allowed: 97 or 105)"),
        (2000, "(nearest allowed: 1025)"),  # was "1025 or 1025"
        (1030, "(nearest allowed: 1025)"),  # 1033 is over the limit
        (0, "(nearest allowed: 9)"),  # was "9 or 9"
        (5, "(nearest allowed: 9)"),
        (-40, "(nearest allowed: 9)"),
        (10**12, "(nearest allowed: 1025)"),
    ],
)
def test_frame_count_hint_names_only_allowed_counts_once_each(frames: int, hint: str):
    with pytest.raises(SpecError) as caught:
        spec(num_frames=frames)
    assert str(caught.value).endswith(hint), str(caught.value)


def test_missing_required_field_is_reported():
    raw = dict(VALID)
    del raw["prompt"]
    with pytest.raises(SpecError, match="--prompt: is required"):
        JobSpec.from_dict(raw)


def test_digest_changes_with_any_field_and_not_otherwise():
    assert spec().digest() == spec().digest()
    assert spec().digest() != spec(seed=2).digest()


def test_fields_added_later_at_their_defaults_keep_the_digest_of_older_specs():
    """A batch file run again after an upgrade still skips the clips it rendered before (batch.py
    compares job.json's spec_digest): NAG, guidance and pipeline fields at their defaults do not count."""
    older = {k: v for k, v in spec().to_dict().items() if k not in LATER_FIELD_DEFAULTS}
    text = json.dumps(older, sort_keys=True, separators=(",", ":"))
    assert spec().digest() == hashlib.sha256(text.encode()).hexdigest()
    assert spec(stg_scale=1.0).digest() != spec().digest()
    assert spec(nag_scale=5.0, negative_prompt="blur").digest() != spec(negative_prompt="blur").digest()
    assert spec(pipeline="two-stage").digest() != spec().digest()


def test_cfg_is_on_only_above_one():
    assert not spec().uses_cfg
    assert spec(guidance_scale=3.5, schedule="default", steps=40).uses_cfg


def test_audio_cfg_alone_turns_cfg_on_and_otherwise_follows_video_cfg():
    assert spec(audio_guidance_scale=7.0).uses_cfg
    assert spec(guidance_scale=3.0, schedule="default").effective_audio_guidance_scale == 3.0
    assert not spec(audio_guidance_scale=1.0).uses_cfg


def test_guidance_fields_at_their_defaults_keep_the_latents_digest_of_older_specs():
    """Latents written before the LTX-2.3 guidance fields existed still match their spec."""
    # The digest as it was computed before: the spec's fields without decode-only ones and later defaults.
    before = {
        k: v for k, v in spec().to_dict().items() if k not in LATER_FIELD_DEFAULTS and k not in DECODE_ONLY_FIELDS
    }
    text = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert spec().latents_digest() == hashlib.sha256(text.encode()).hexdigest()
    assert spec(stg_scale=1.0).latents_digest() != spec().latents_digest()


def test_a_crop_is_centred_in_the_rendered_frames_and_shapes_no_latents():
    cropped = spec(width=736, height=1280, crop_width=720)
    assert cropped.crop_box == (8, 0, 720, 1280)
    assert spec(crop_width=736, crop_height=500).crop_box == (16, 6, 736, 500)
    assert spec().crop_box == (0, 0, 768, 512)
    assert cropped.latents_digest() == spec(width=736, height=1280).latents_digest()  # decode-only
    assert cropped.digest() != spec(width=736, height=1280).digest()  # but another output


@pytest.mark.parametrize(
    ("prompt", "name"),
    [
        ("A slow dolly-in through a rain-soaked alley at night, neon reflections", "a-slow-dolly-in-through"),
        ("Café Über 42", "cafe-uber-42"),  # accents dropped, not the letters
        ('<img src=x onerror="alert(1)"> ../../etc', "img-src-x-onerror-alert"),  # nothing of a path or markup
        ("Supercalifragilisticexpialidocious-and-then-some-more-words", "supercalifragilisticexpialidocious-and"),
        ("x" * 80, "x" * 40),  # one long word is cut
        ("雨の夜の東京", "video"),  # no ASCII word left
        ("   ...   ", "video"),
    ],
)
def test_a_name_from_the_prompt_is_its_first_words_as_a_safe_bounded_slug(prompt: str, name: str):
    assert name_from_prompt(prompt) == name
    assert NAME_PATTERN.fullmatch(name) and len(name) <= 40

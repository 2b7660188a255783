"""Settings load order: shipped defaults < config file < environment < explicit overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings


def test_defaults_alone_give_the_distilled_model_and_thor_profile(tmp_path: Path):
    settings = load_settings(environ={"HOME": str(tmp_path)})
    assert settings.default_model == "rootonchair/LTX-2-19b-distilled"
    assert settings.preset_for("rootonchair/LTX-2-19b-distilled").steps == 8
    assert settings.preset_for("Lightricks/LTX-2").guidance_scale == 3.5
    assert settings.decode.profile == "thor-128g"
    assert settings.state_dir == tmp_path / ".local" / "state" / "ltx2-stages"


def test_each_layer_overrides_the_one_below(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[paths]\nstate_dir = "/from/file"\noutput_dir = "/file/out"\n[decode]\nprofile = "low-64g"\n')
    settings = load_settings(
        environ={"LTX2_CONFIG": str(config), "LTX2_OUTPUT_DIR": "/env/out", "LTX2_PROFILE": "h100-80g"},
        overrides={"paths": {"output_dir": "/flag/out"}},
    )
    assert settings.state_dir == Path("/from/file")
    assert settings.output_dir == Path("/flag/out")
    assert settings.decode.profile == "h100-80g" and settings.decode.budget_gib == 40.0


def test_unknown_setting_in_a_config_file_is_an_error(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text("[paths]\nstate_dri = 'typo'\n")
    with pytest.raises(ConfigError, match="unknown setting paths.state_dri"):
        load_settings(environ={"LTX2_CONFIG": str(config)})


def test_unknown_profile_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown profile 'pc-8g'"):
        load_settings(environ={"LTX2_PROFILE": "pc-8g", "HOME": str(tmp_path)})


def test_non_numeric_environment_value_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="LTX2_HUNG_AFTER_S"):
        load_settings(environ={"LTX2_HUNG_AFTER_S": "soon", "HOME": str(tmp_path)})


def test_http_section_defaults_to_loopback_and_keys_under_the_state_dir(tmp_path: Path):
    settings = load_settings(environ={"HOME": str(tmp_path), "LTX2_STATE_DIR": str(tmp_path / "state")})
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8000)
    assert settings.http_keys_file == tmp_path / "state" / "http" / "keys.json"
    assert settings.http.max_body_bytes > settings.http.max_upload_bytes
    assert settings.http.metrics_keys == () and settings.http.failed_auth_per_minute >= 1
    assert 0 < settings.http.header_timeout_s < settings.http.body_timeout_s


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = 0", "http.port must be a whole number 1-65535"),
        ('port = "8000"', "http.port must be a whole number 1-65535"),
        ('host = ""', "http.host must be a host name"),
        ("requests_per_minute = 0", "http.requests_per_minute must be a whole number >= 1"),
        ("max_active_jobs_per_key = true", "http.max_active_jobs_per_key must be a whole number >= 1"),
        ("max_body_bytes = 1024", "http.max_body_bytes (1024) must exceed http.max_upload_bytes"),
        ("tls = true", "unknown setting http.tls"),
        ("header_timeout_s = 0", "http.header_timeout_s must be a number of seconds above 0"),
        ('body_timeout_s = "soon"', "http.body_timeout_s must be a number of seconds above 0"),
        ("keep_alive_timeout_s = 1e9", "http.keep_alive_timeout_s must be a number of seconds above 0"),
        ("max_connections = 0", "http.max_connections must be a whole number >= 1"),
        ("failed_auth_per_minute = 2.5", "http.failed_auth_per_minute must be a whole number >= 1"),
        ('metrics_keys = "ops"', "http.metrics_keys must be a list of key names"),
        ('exact_sizes = "720x1280"', "http.exact_sizes must be a list of sizes"),
        ('exact_sizes = ["721x1280"]', "http.exact_sizes: '721x1280' is not WIDTHxHEIGHT with even sides from 16"),
        ("exact_sizes = [720]", "http.exact_sizes: 720 is not WIDTHxHEIGHT"),
    ],
)
def test_bad_http_settings_are_errors_naming_the_key(tmp_path: Path, text: str, message: str):
    config = tmp_path / "config.toml"
    config.write_text(f"[http]\n{text}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(environ={"LTX2_CONFIG": str(config), "HOME": str(tmp_path)})


def test_a_config_file_adds_a_model_alias_beside_the_shipped_ones(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[model_aliases]\nhouse = "Lightricks/LTX-2"\n')
    settings = load_settings(environ={"LTX2_CONFIG": str(config), "HOME": str(tmp_path)})
    assert settings.model_aliases["house"] == "Lightricks/LTX-2"
    assert settings.model_aliases["sora-2"] == settings.default_model  # the shipped names stay
    assert settings.model_aliases["sora-2-pro"] == "Lightricks/LTX-2"


def test_a_model_alias_of_a_model_without_a_preset_is_an_error(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[model_aliases]\nsora-2 = "someone/unknown"\n')
    with pytest.raises(ConfigError, match=re.escape("model_aliases.sora-2: 'someone/unknown' has no preset")):
        load_settings(environ={"LTX2_CONFIG": str(config), "HOME": str(tmp_path)})


def test_stage_overlap_is_auto_by_default_and_a_bad_value_names_what_is_allowed(tmp_path: Path):
    assert load_settings(environ={"HOME": str(tmp_path)}).overlap_stages == "auto"
    assert load_settings(environ={"HOME": str(tmp_path), "LTX2_OVERLAP_STAGES": "off"}).overlap_stages == "off"
    with pytest.raises(ConfigError, match=r"worker.overlap_stages must be one of auto, on, off; got 'yes'"):
        load_settings(environ={"HOME": str(tmp_path), "LTX2_OVERLAP_STAGES": "yes"})

"""Settings: TOML defaults shipped here, loaded once at the edge into frozen dataclasses."""

"""Model names and cache locations both the orchestrator and the workers agree on."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# The tiny random LTX-2 that tests and the offline demo use; built locally into the HF cache
# by `python -m services.tiny_model --hf-cache` (real diffusers classes, random weights).
TINY_REPO_ID = "ltx2-stages/tiny-random-ltx2"
# The tiny model of each family (`ltx2 tiny-model --family`); 2.0's is the one tests and the demo use.
TINY_REPO_IDS = {
    "2.0": TINY_REPO_ID,
    "2.3": "ltx2-stages/tiny-random-ltx2.3",
    "2.5": "ltx2-stages/tiny-random-ltx2.5",
}
# The tiny models' fixed, commit-like revision (the cache's snapshots/<rev>). A new one is a new build, as a hub
# repo's new commit is: a cache holding an older one is rebuilt (orchestrator.run.model_lookup.ensure_tiny_model).
# 2: adds the latent_upsampler subfolder that two-stage runs load.
# 3: the 2.3/2.5 tiny VAE has LTX-2.3's decoder layout
TINY_REVISION = "0" * 39 + "3"


def hub_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time).

    huggingface_hub fixes its cache path when first imported; a daemon or a test that changes
    HF_HOME later must pass the directory explicitly.
    """
    environ = os.environ if environ is None else environ
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    home = environ.get("HF_HOME") or str(Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return Path(home).expanduser() / "hub"

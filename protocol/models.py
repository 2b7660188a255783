"""Model names both the orchestrator and the workers need to agree on."""

# The tiny random LTX-2 that tests and the offline demo use; built locally into the HF cache
# by `python -m services.tiny_model --hf-cache` (real diffusers classes, random weights).
TINY_REPO_ID = "ltx2-stages/tiny-random-ltx2"

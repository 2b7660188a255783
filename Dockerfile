# ltx2-stages on NGC PyTorch. One image for x86-64 CUDA servers and Jetson AGX Thor (JetPack 7):
# pick the NGC tag that matches the host (the default is the one the seed project ran on Thor).
#   docker build -t ltx2 .
#   docker run --rm --gpus all -v ~/.cache/huggingface:/root/.cache/huggingface \
#       -v ~/ltx2/outputs:/outputs ltx2 generate --prompt "..."      # one clip, no daemon
#   docker run -d --gpus all ... ltx2 daemon                          # supervisord + daemon
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.01-py3
FROM ${BASE_IMAGE}

# The image's PyTorch is built for its CUDA and GPUs: never reinstall it. NGC also pins packages
# through a pip constraint file that blocks the pinned diffusers/transformers; neutralise it.
ENV PIP_CONSTRAINT="" \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    LTX2_STATE_DIR=/var/lib/ltx2 \
    LTX2_OUTPUT_DIR=/outputs

WORKDIR /opt/ltx2-stages
COPY pyproject.toml README.md install.sh supervisord.conf ./
COPY config ./config
COPY protocol ./protocol
COPY orchestrator ./orchestrator
COPY services ./services

# A venv that sees the image's torch (--system-site-packages); install.sh keeps an importable torch
# and installs only the pinned diffusers 0.42.1, transformers 5.24.0 and the rest.
RUN mkdir -p var /var/lib/ltx2 /outputs \
    && LTX2_VENV_FLAGS=--system-site-packages ./install.sh \
    && .venv/bin/python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

VOLUME ["/root/.cache/huggingface", "/outputs", "/var/lib/ltx2"]
# `daemon` runs supervisord in the foreground (it runs and restarts the orchestrator daemon);
# anything else is an `ltx2` command line.
ENTRYPOINT ["/bin/sh", "-c", "if [ \"$1\" = daemon ]; then exec .venv/bin/supervisord -n -c supervisord.conf; else exec .venv/bin/ltx2 \"$@\"; fi", "ltx2"]
CMD ["--help"]

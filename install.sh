#!/usr/bin/env bash
# Install ltx2-stages and everything it needs into ./.venv (or into the active virtualenv).
#
# An existing torch is kept: NGC/Jetson images ship a CUDA build that must not be replaced.
# Where none is importable, LTX2_TORCH (default torch==2.13.0) is installed first, so the
# project's own `torch>=2.6` requirement is already met and pip pulls no other build.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        # --system-site-packages lets a venv see a container's preinstalled CUDA torch.
        "$python" -m venv ${LTX2_VENV_FLAGS:-} .venv
    fi
    python=.venv/bin/python
fi

"$python" -m pip install --quiet --upgrade pip
if "$python" -c "import torch" 2>/dev/null; then
    echo "install.sh: keeping torch $("$python" -c 'import torch; print(torch.__version__)')"
else
    echo "install.sh: no torch found; installing ${LTX2_TORCH:-torch==2.13.0}"
    "$python" -m pip install --quiet "${LTX2_TORCH:-torch==2.13.0}"
fi
"$python" -m pip install --quiet -e ".[test]"
echo "install.sh: done; run: .venv/bin/ltx2 generate --prompt \"...\""

#!/usr/bin/env bash
# On the lent GPU machine: does an importable torchao initialise CUDA in the fork server, and do
# jobs still succeed (README "Failure policy", docs/benchmarks.md "Fork server and torchao")?
#
# Wheels in .whl/ (carried): diffusers, pyzmq, av and torchao. torchao goes into its own folder,
# so the same tiny job runs once without it (control: forked workers), once with it, and once with it
# on a copy of the tree without services/__init__.py's torchao line (the behaviour before it).
#   bash bench/fork_server_cuda_check.sh      # run call: carry [".whl"], timeout_s 600
set -uo pipefail
export OUT="${OUT:-/tmp/fork-check-out}"
source "$(dirname "$0")/tiny_model_on_device.sh"
install_wheels /tmp/site-torchao .whl/torchao-*.whl || { echo "torchao install failed"; exit 3; }
base=$SITE_PATH

probe() {  # probe LABEL PYTHONPATH: is CUDA initialised after importing what the fork server imports?
    PYTHONPATH=$2 PYTORCH_NVML_BASED_CUDA_CHECK=1 python3 - "$1" <<'EOF'
import importlib, sys, time
import torch
from protocol.files import Stage
started = time.monotonic()
for stage in Stage:
    importlib.import_module(stage.module)
present = [m for m in ("torchao", "transformer_engine") if sys.modules.get(m) is not None]  # None: hidden
print(f"{sys.argv[1]}: torch {torch.__version__}, imported {present}, "
      f"cuda initialised after the stage imports: {torch.cuda.is_initialized()} ({time.monotonic() - started:.1f} s)")
EOF
}

run_job() {  # run_job LABEL PYTHONPATH: one tiny job on the GPU through the fork server
    local dir="/tmp/run-$1"
    rm -rf "$dir"
    mkdir -p "$dir"  # the output folder's parent must exist (ltx2 refuses to create a missing one)
    local start=$(date +%s.%N)
    PYTHONPATH=$2 LTX2_STATE_DIR="$dir/state" LTX2_OUTPUT_DIR="$dir/out" LTX2_CONFIG= LTX2_FORK_SERVER=true \
        python3 -m orchestrator.cli generate --prompt "a harbour at dawn" --seed 3 \
        --width 256 --height 256 --num-frames 33 --quiet >"$OUT/$1.stdout" 2>"$OUT/$1.stderr"
    local code=$?
    echo "$1: exit $code in $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s; output $(cat "$OUT/$1.stdout")"
    grep -h "fork server" "$OUT/$1.stderr" | sed "s/^/$1 stderr: /"
    python3 - "$dir" "$1" <<'EOF'
import glob, json, sys
for path in glob.glob(f"{sys.argv[1]}/state/jobs/*/job.json"):
    record = json.load(open(path))
    attempts = {stage: [a["result"] for a in rec["attempts"]] for stage, rec in record["stages"].items()}
    print(f"{sys.argv[2]}: job {record['status']}; attempts {attempts}")
EOF
}

{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    probe control "$base"
    probe torchao "$base:/tmp/site-torchao"
    run_job control "$base"
    run_job torchao "$base:/tmp/site-torchao"
    # The same with the tree as it was before services/__init__.py hid torchao (version 13's "before").
    rm -rf /tmp/before && cp -r "$PWD" /tmp/before && sed -i '/sys.modules.setdefault("torchao"/d' /tmp/before/services/__init__.py
    (cd /tmp/before && probe torchao-before "/tmp/site:/tmp/before:/tmp/site-torchao")
    (cd /tmp/before && run_job torchao-before "/tmp/site:/tmp/before:/tmp/site-torchao")
} 2>&1 | tee "$OUT/summary.txt"

#!/usr/bin/env bash
# On the lent GPU machine: what a compiled diffusion worker's first step costs with an empty compile
# cache, with Inductor's cache warm (the default), and with LTX2_COMPILE_PACKAGES=1's precompiled blocks
# (docs/operations.md "Compile cache", services/compile_packages.py). Issue 28 item 4.
#
# Wheels in .whl/ (carried): diffusers, pyzmq and av. The tiny model at 256x256x33 (its blocks are the
# real model's code, so Dynamo's tracing costs what it costs at full size; Inductor's kernels are smaller).
# Each row is one `ltx2 generate --compile` in its own process, in this order on one state dir per mode:
# cold (empty cache), warm (Inductor's cache only), packages-save (warm Inductor cache, package saved),
# packages-load (package loaded). Per row: the job's wall, the span from "compile transformer blocks"
# to the first step's end, the first step alone, and the worker's cache line.
#   bash bench/compile_cache_check.sh      # run call: carry [".whl"], timeout_s 600
set -uo pipefail
export OUT="${OUT:-/tmp/compile-check-out}"
source "$(dirname "$0")/tiny_model_on_device.sh"
export PYTHONPATH=$SITE_PATH

run_job() {  # run_job LABEL ROOT PACKAGES: one compiled tiny job on the GPU, then its first-step spans
    local label=$1 root=$2
    mkdir -p "$root/out"
    local start=$(date +%s.%N)
    LTX2_COMPILE_PACKAGES=$3 LTX2_STATE_DIR="$root/state" LTX2_OUTPUT_DIR="$root/out" LTX2_CONFIG= \
        python3 -m orchestrator.cli generate --model ltx2-stages/tiny-random-ltx2 --prompt "a harbour at dawn" \
        --seed 3 --width 256 --height 256 --num-frames 33 --compile --quiet >"$OUT/$label.stdout" 2>"$OUT/$label.stderr"
    local code=$? wall=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
    python3 - "$root/state" "$label" "$code" "$wall" <<'EOF'
import datetime, glob, re, sys
state, label, code, wall = sys.argv[1:]
log = sorted(glob.glob(f"{state}/jobs/*/logs/encode_diffuse-1.log"))[-1]
marks, report = {}, "no cache line"
for line in open(log):
    m = re.match(r"(\S+ \S+),(\d+) ltx2.worker (.*)", line)
    if not m:
        continue
    at = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(m[2]) / 1000
    for mark, text in (("compile", "compile transformer blocks"), ("step0", "denoise 0/"), ("step1", "denoise 1/")):
        if text in m[3] and mark not in marks:
            marks[mark] = at
    report = m[3] if "hits/misses" in m[3] else report
span = lambda a, b: f"{marks[b] - marks[a]:.1f} s" if a in marks and b in marks else "?"
print(f"{label}: exit {code}, wall {wall} s; compile->first step done {span('compile', 'step1')} "
      f"(blocks {span('compile', 'step0')}, first step {span('step0', 'step1')}); {report}")
EOF
}

{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
    rm -rf /tmp/cc-inductor /tmp/cc-packages
    run_job cold /tmp/cc-inductor ""
    run_job warm /tmp/cc-inductor ""
    run_job warm-again /tmp/cc-inductor ""
    mkdir -p /tmp/cc-packages/state && cp -r /tmp/cc-inductor/state/compile-cache /tmp/cc-packages/state/
    run_job packages-save /tmp/cc-packages 1
    run_job packages-load /tmp/cc-packages 1
    run_job packages-load-again /tmp/cc-packages 1
    grep -h "precompiled blocks unavailable" /tmp/cc-*/state/jobs/*/logs/*.log | head -3
} 2>&1 | tee "$OUT/summary.txt"

#!/usr/bin/env bash
# Run bench/gpu_bench.py on the lent GPU machine (one `run` call; see docs/benchmarks.md).
#
# The machine has torch, transformers, accelerate, peft, safetensors, msgpack and numpy, but no
# diffusers, PyAV, pyzmq or Ray and no network: those travel as wheels in .whl/ (ignored by git, named
# in the call's `carry`) and are installed into /tmp/site. Extra arguments go to `gpu_bench.py all`,
# or, after a first argument `batch`, to bench/batch_bench.py (version 3: stage-major batches, compile).
#
#   bash bench/run_on_device.sh [--plan v1|fork] [--phases ...] [--sequence ...]
#   bash bench/run_on_device.sh batch [--sequence batch,batch_compile,...]
#   bash bench/run_on_device.sh batch --family 2.3 --sequence hd_two_stage_fp8mm,hd_fp8mm   (issue 14;
#       the two calls it takes are in bench/batch_bench.py above HD_TARGETS)
set -uo pipefail
# A call that runs something before this script exports BENCH_CALL_STARTED (its `date +%s`) so the budget below
# counts from the start of the call, not of this script.
started=${BENCH_CALL_STARTED:-$(date +%s)}
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Keep NVLink multicast off, as the machine's notes ask (no effect on one GPU).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
# Ray's wheel (79 MB) does not fit a call's 64 MiB; it travels as an xz tarball of the wheel's
# contents without its Java jars, dashboard web build and ML libraries (data, train, tune, serve,
# rllib, llm), which the farm never imports. Made here with: unzip ray-2.60.0-cp312-*.whl -d x &&
# rm -rf x/ray/{jars,dashboard/client/build,rllib,data,serve,tune,train,llm} &&
# tar -C x -cf - . | xz -9 > .whl/ray-2.60.0-slim-cp312.tar.xz (plus jsonschema, jsonschema-specifications,
# referencing and rpds-py wheels, which Ray needs and the machine lacks).
for tarball in .whl/*.tar.xz; do
    [ -e "$tarball" ] && { tar -xJf "$tarball" -C /tmp/site || { echo "unpacking $tarball failed"; exit 3; }; }
done
export PYTHONPATH="/tmp/site:$PWD"
# The whole command must end inside the call's 600 s: budget what is left, minus a margin.
budget=$((575 - ($(date +%s) - started)))
if [ "${1:-}" = batch ]; then
    shift
    python3 bench/batch_bench.py --out "$OUT" --budget-s "$budget" --host-ram-gib 128 "$@" 2>&1 | tee "$OUT/bench.log"
else
    python3 bench/gpu_bench.py all --out "$OUT" --budget-s "$budget" --host-ram-gib 128 "$@" 2>&1 | tee "$OUT/bench.log"
fi

# Sourced (not run) by the tiny-model checks on the lent GPU machine, bench/compile_cache_check.sh and
# bench/fork_server_cuda_check.sh, after each sets OUT: the repo root as the working folder, the environment of
# every device call, diffusers, pyzmq and av from the carried .whl/ into /tmp/site (install_wheels TARGET WHEEL...
# stays defined for a check's own extras), and the tiny model built into HF_HOME=/tmp/hf. Leaves SITE_PATH
# ("/tmp/site:<repo>") for the check's PYTHONPATH; exits 3 when the wheels fail to install, 4 when the model does.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast stays off, as the machine's notes ask (no effect on one GPU).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
install_wheels() {
    local target=$1
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@"
}
install_wheels /tmp/site .whl/diffusers-*.whl .whl/pyzmq-*.whl .whl/av-*.whl || { echo "wheel install failed"; exit 3; }
SITE_PATH="/tmp/site:$PWD"
export HF_HOME=/tmp/hf
PYTHONPATH=$SITE_PATH python3 -m services.tiny_model --hf-cache >"$OUT/tiny_model.log" 2>&1 \
    || { tail "$OUT/tiny_model.log"; exit 4; }

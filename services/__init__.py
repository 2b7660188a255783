"""Stage workers and the tools they share; every process that runs them computes reproducibly on CPU
and keeps CUDA untouched until a stage needs it.

MKL, torch's CPU BLAS, picks kernels by how a buffer happens to be aligned unless its conditional
numerical reproducibility (CNR) mode is on, so two runs of one request could differ in the last
bits. `MKL_CBWR=AUTO,STRICT` turns it on (results repeat on the same CPU, whatever the alignment);
MKL reads it at its first call, so setting it here, when any `services` module is imported and
before any torch maths ran, covers every process of ours that computes: forked and exec'd stage
workers, the fork server, Ray's workers and `ltx2 batch`'s prompt pre-encoding
(services.prepare_prompts, which an environment-only default had missed: its GEMMs ran with CNR
off). A value the user set (e.g. `AVX2` for the same bits across CPU generations) is kept.
CNR's results repeat for a fixed number of threads, so `MKL_DYNAMIC=FALSE` keeps MKL from choosing
fewer threads than the process's pool for a call (its default, `Dyn:1` in MKL_VERBOSE's lines), the
other half of Intel's recipe for run-to-run equal results; again a user's value is kept.

torchao is hidden from our processes. Where it is installed (NGC's PyTorch images ship it),
transformers imports it as soon as its model code loads (`transformers.quantizers.quantizer_torchao`,
and diffusers' own quantizer after it), and torchao initialises CUDA at import on a GPU host (torchao
0.18: quantizer_torchao imports `torchao.prototype.safetensors`, which imports `prototype.mx_formats`,
whose `kernels.py` asks `is_sm_at_least_100()`, i.e. `torch.cuda.get_device_capability()`, at module
level; diffusers 0.42.1 and transformers 5 have no switch to skip it): the fork
server then finds CUDA initialised and turns itself off, so every stage pays its imports again
(docs/benchmarks.md version 5: 44.9 s per job against 20.2 s). No stage uses torchao (FP8 matmuls are
services/fp8_matmul.py), so `sys.modules["torchao"] = None` makes both libraries' availability checks
answer "not installed" (importlib.util.find_spec returns None for it) and any `import torchao` fail as
for a missing package. A process that imported torchao before any `services` module (a benchmark's
torchao baseline) keeps it.
"""

import os
import sys

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
sys.modules.setdefault("torchao", None)  # type: ignore[arg-type]

"""Stage workers and the tools they share; every process that runs them computes reproducibly on CPU.

MKL, torch's CPU BLAS, picks kernels by how a buffer happens to be aligned unless its conditional
numerical reproducibility (CNR) mode is on, so two runs of one request could differ in the last
bits. `MKL_CBWR=AUTO,STRICT` turns it on (results repeat on the same CPU, whatever the alignment);
MKL reads it at its first call, so setting it here, when any `services` module is imported and
before any torch maths ran, covers every process of ours that computes: forked and exec'd stage
workers, the fork server, Ray's workers and `ltx2 batch`'s prompt pre-encoding
(services.prepare_prompts, which an environment-only default had missed: its GEMMs ran with CNR
off). A value the user set (e.g. `AVX2` for the same bits across CPU generations) is kept.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

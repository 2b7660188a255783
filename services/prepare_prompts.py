"""`python -m services.prepare_prompts JOB_DIR...`: fill the prompt-embedding cache for many jobs.

The text-encoder half of stage-major scheduling: a batch runs this once before its clips, so the
text encoder (22.7 GiB at full size) is loaded once per model for every distinct prompt instead of
once per clip; each clip's encode_diffuse then finds its embeddings cached. Prints one line:
how many prompts were encoded and how many were cached already.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from protocol.spec import JobSpec
from protocol.stage_request import read_stage_request
from services import embedding_cache, model_loading
from services.encode_diffuse import fill_cache


def main(argv: list[str] | None = None) -> int:
    job_dirs = [Path(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    device = model_loading.resolve_device()
    missing: dict[tuple[Path, str], dict[Path, JobSpec]] = defaultdict(dict)
    cached = 0
    for job_dir in job_dirs:
        request = read_stage_request(job_dir)
        if request.embeddings_dir is None:
            continue
        spec, root = request.spec, request.model_path
        dtype = model_loading.resolve_dtype(spec.dtype, device)
        path = embedding_cache.cache_path(request.embeddings_dir, root, request.revision, spec, dtype, device)
        if path.is_file():
            cached += 1
        else:
            missing[(root, spec.dtype)][path] = spec
    for (root, dtype_name), wanted in missing.items():
        fill_cache(wanted, root, model_loading.resolve_dtype(dtype_name, device), device)
    encoded = sum(len(wanted) for wanted in missing.values())
    sys.stdout.write(f"encoded {encoded} prompt(s) with {len(missing)} text-encoder load(s); {cached} cached already\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

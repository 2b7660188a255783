"""A job's run, from a request to a published video.

The request becomes a spec (jobspec, inputs, model_lookup, lora_lookup, request_digest) and a job
directory (jobdir, states, job_hooks; event_lines formats its events.log for people); its stages run
stage-major (stage_major, pipeline, stage_attempt, runner), the policy picks each next plan (policy,
decode_plan), and the video is published (publishing, sidecar, reuse).

May import orchestrator.placement (where the stage processes run); never the daemon, the gateway or
the command line. tests/test_import_layers.py holds this.
"""

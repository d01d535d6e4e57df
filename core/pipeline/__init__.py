"""The offline pipeline, in one place: what `qwen-identity sweep`, `eval`, `demo` and training share.

- `defaults`: the default models and prompts (the seed's, with its wrong model ids corrected:
  Qwen3-VL for the features, Qwen-Image for generation);
- `cache_keys`: the ONE key of a feature-cache entry (and of the training targets): content (photo
  sha256s) + model + settings + dtype, so a cache written by `extract`, `train` or `sweep` is reused by
  the others exactly when the result would be the same;
- `run`: the features -> inject -> sample -> grid loop. Its unit of work is a list of identities
  (`run_identities`), and a separate `merge_results` writes the run's `generations/meta.json` from
  the per-identity results, so the work can be split over processes or machines and merged after.

It lives under `core/` (not a top-level package) because it is ComfyUI-free orchestration of core
pieces that `cli/`, `training/` and `bench/` all sit on; `nodes/` never needs it (ComfyUI's graph is
the node-side pipeline). This `__init__` imports nothing, so `core.pipeline.defaults` stays cheap.
"""

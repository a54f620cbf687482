"""Profiling runs: latency tables per (model, share, batch) and co-location interference.

* :mod:`profiler.latency` — latency tables, in-process (one worker process per
  share; an MPS share is fixed for a process's life) and through the serving
  path (:mod:`profiler.serving`, a tritonserver per share timed from a client).
* :mod:`controlplane.runtime.mps` (shared with the runtime) — the MPS control daemon, and whether a process really is
  an MPS client (CUDA silently ignores the share otherwise).
* :mod:`profiler.interference` — pairs of models at complementary shares, each
  one's slowdown against running alone, and the fit the scheduler uses.
* :mod:`profiler.ensure` — :func:`ensure_profile` for ``controlplane up``.
* :mod:`profiler.cli` — the ``controlplane profile`` command.
"""

TOOL_VERSION = "gpulet-profiler 0.1"

from .common import DEFAULT_BATCHES, DEFAULT_SHARES, device_name, profile_dir  # noqa: E402

__all__ = ["TOOL_VERSION", "DEFAULT_SHARES", "DEFAULT_BATCHES", "device_name", "profile_dir"]

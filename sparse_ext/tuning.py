"""Kernel choice by measurement: the plan cache.

Where several kernels can compute an op (the ISA tiers at and below the active one, say), the first
call with a new (op, dtype, pattern, shape, token bucket, threads, tier) key times them on the real
inputs and keeps the fastest. The choice is remembered in memory and in a small file under the
user cache directory, one per CPU model and library build, so that later processes skip the
timing. An AVX-512 kernel that loses to the AVX2 one on some CPU is therefore simply not used there.

- ``set_tuning(False)`` (or ``SPARSE_EXT_TUNE=0`` in the environment) turns timing off: every op
  runs its default kernel, the active tier's. Tests do that so no result depends on timing noise.
- ``SPARSE_EXT_CACHE_DIR`` moves the file (default ``$XDG_CACHE_HOME/sparse_ext`` or
  ``~/.cache/sparse_ext``); ``set_plan_cache_path(None)`` keeps choices in memory only.

A corrupt or foreign cache file is ignored and rewritten; processes writing at once serialize on a
lock file and keep each other's entries.
"""
import hashlib
import os
import platform
import re
from typing import Optional

import torch

from . import _C
from ._scoped_setting import scoped_setting

__all__ = ["clear_plan_cache", "default_plan_cache_path", "plan_cache_path", "plan_cache_stats",
           "plan_choice", "set_plan_cache_path", "set_tuning", "tuning_enabled", "use_tuning"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") or line.startswith("Model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_id() -> str:
    """CPU model, the tiers and extensions the kernels can use, torch and the compiled library:
    a choice measured under one of them says nothing about another."""
    lib = _C.__file__
    stat = os.stat(lib)
    parts = [_cpu_model(), ",".join(_C.supported_isas()), ",".join(_C.cpu_features()),
             torch.__version__, f"{stat.st_size}:{stat.st_mtime_ns}"]
    digest = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", _cpu_model()).strip("-")[:40] or "cpu"
    return f"{slug}-{digest}"


def default_plan_cache_path() -> str:
    """Where the plan cache file lives unless ``set_plan_cache_path`` says otherwise."""
    root = os.environ.get("SPARSE_EXT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "sparse_ext")
    return os.path.join(root, f"plans-{_machine_id()}.tsv")


def set_tuning(enabled: bool) -> None:
    """Turn timing of candidate kernels on (the default) or off (every op runs its default)."""
    _C.set_plan_tuning(bool(enabled))


def tuning_enabled() -> bool:
    """Whether a new plan key times its candidate kernels."""
    return _C.plan_tuning()


def use_tuning(enabled: bool):
    """Context manager: tuning on or off inside the block, then back to what it was."""
    return scoped_setting(tuning_enabled, set_tuning, enabled)


def set_plan_cache_path(path: Optional[str]) -> None:
    """Back the plan cache with ``path`` (created on first write), or keep it in memory only with
    ``None``. Choices already made in this process are dropped."""
    _C.set_plan_cache_file(os.fspath(path) if path is not None else "")


def plan_cache_path() -> Optional[str]:
    """The file behind the plan cache, or None when it lives in memory only."""
    return _C.plan_cache_file() or None


def clear_plan_cache() -> None:
    """Forget this process's choices (the file stays) and zero the counters."""
    _C.plan_cache_clear()


def plan_choice(key: str) -> Optional[str]:
    """The candidate recorded for a plan key, or None."""
    return _C.plan_lookup(key) or None


def plan_cache_stats() -> dict:
    """Counters since the last clear: ``hits`` (answered by a recorded choice), ``timed``
    (candidates timed), ``defaults`` (default kernel, tuning off), ``entries`` (choices held), and
    ``last_error`` (the last file problem, or "")."""
    hits, timed, defaults, entries, error = _C.plan_cache_stats()
    return {"hits": hits, "timed": timed, "defaults": defaults, "entries": entries,
            "last_error": error}


set_plan_cache_path(default_plan_cache_path())

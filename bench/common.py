"""Timing and machine description shared by every family's benchmark.

Rules: ours and the dense PyTorch op are timed in the same process, interleaved, after warm-up;
the median of repeated runs is reported. Never compare absolute times across runs.
"""
import os
import platform
import statistics
import time

import torch


def median_ms(fn, reps=15, warmup=3, min_time_s=0.0):
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start) < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_median_ms(fns, reps=15, warmup=3):
    """Median ms of each callable, run round-robin so machine noise hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_sizes():
    """{"L1d": "48K", "L2": "2048K", "L3": "..."} from sysfs (per core for L1/L2); {} elsewhere."""
    sizes = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue
            read = lambda name: open(os.path.join(base, entry, name)).read().strip()  # noqa: E731
            level, kind = read("level"), read("type")
            if kind == "Instruction":
                continue
            sizes[f"L{level}{'d' if kind == 'Data' else ''}"] = read("size")
    except OSError:
        pass
    return sizes


def machine_info():
    """What a result depends on: the CPU, its ISA tier (the kernels' code path) and the optional
    extensions it has, the caches (a weight that fits the last level runs dense much faster)."""
    import sparse_ext

    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "isa": sparse_ext.get_isa(),
        "isa_tiers": "/".join(sparse_ext.supported_isas()),
        "cpu_features": ",".join(sparse_ext.cpu_features()) or None,
        "caches": " ".join(f"{k}={v}" for k, v in cache_sizes().items()) or None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def geomean(values):
    values = [v for v in values if v > 0]
    if not values:
        return float("nan")
    prod = 1.0
    for v in values:
        prod *= v
    return prod ** (1.0 / len(values))

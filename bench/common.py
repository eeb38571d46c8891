"""Helpers shared by the benchmark families: the CPU machine record, cache sizes and the cold-cache
rotation over layer copies, geomean. Timing lives in bench.core.timer."""
import copy
import math
import os
import platform

import torch


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


def _parse_size(text):
    """sysfs cache size ("48K", "2048K", "480M") in bytes; 0 when unreadable."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (ValueError, IndexError):
        return 0


def last_level_cache_bytes():
    """Size of the largest data cache level (0 when the machine does not say)."""
    sizes = cache_sizes()
    return max((_parse_size(v) for k, v in sizes.items() if k != "L1d"), default=0)


# hot: one layer timed again and again, its weights stay in the caches; cold: the timed calls
# rotate over copies of the layer whose weights together exceed the last-level cache, as the layers
# of a model's forward do (each weight read from DRAM).
CACHE_MODES = ("hot", "cold")


def cache_modes(args):
    """The cache modes a linear family runs: ``--cache`` or both."""
    return list(getattr(args, "cache", None) or CACHE_MODES)


def cold_copies(bytes_per_copy, llc=None):
    """How many copies a cold timing rotates over: with ours and dense interleaved, every other
    copy is read before a copy comes round again, and those reads must exceed the last-level
    cache (1.5x, for its imperfect LRU). 1 when the cache size is unknown."""
    llc = last_level_cache_bytes() if llc is None else llc
    if llc <= 0 or bytes_per_copy <= 0:
        return 1
    return max(2, math.ceil(1.5 * llc / bytes_per_copy) + 1)


def rotating(objects, call):
    """A callable that applies ``call`` to the next of ``objects`` on every call."""
    state = {"i": 0}

    def step():
        obj = objects[state["i"]]
        state["i"] = (state["i"] + 1) % len(objects)
        return call(obj)
    return step


def copies_of(obj, count):
    """``obj`` and ``count - 1`` deep copies of it (separate storage, same values)."""
    return [obj] + [copy.deepcopy(obj) for _ in range(count - 1)]


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
    """Geometric mean of the positive, finite values (NaN when there are none)."""
    values = [v for v in values if v is not None and 0 < v < math.inf]
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def short_dtype(name):
    """float16 -> fp16, bfloat16 -> bf16, float32 -> fp32 (case labels)."""
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(name, name)


# Weight shapes (out, in) of the LLM layers the CUDA suite times.
LLM_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]

"""Typed settings in one place.

    sparse_ext.config.get("moe_gemv_rows")                 # 48
    sparse_ext.config.set("conv_stream_mb", 0)
    with sparse_ext.config.override(isa="avx2", tuning=False):
        ...                                                # restored afterwards
    print(sparse_ext.config.describe())                    # every setting, value, env variable

Each setting's environment variable is read once, when sparse_ext is imported (an unusable value
warns and keeps the default); afterwards only these functions change a setting, so a value never
depends on when the environment happened to be read. The settings are process-wide.
"""
import contextlib
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional

from . import _C, isa, tuning
from ._scoped_setting import scoped_setting

__all__ = ["describe", "get", "names", "override", "set"]


class _Setting(NamedTuple):
    env: str
    doc: str
    get: Callable[[], Any]
    set: Callable[[Any], None]
    check: Callable[[Any], Any]       # validates and converts a value, or raises


def _native(index: int, choices: str) -> tuple:
    """Getter and setter of a setting stored in the extension (csrc/ops/settings.h)."""
    options = choices.split(",") if choices else None
    if options:
        return (lambda: options[_C.get_setting(index)],
                lambda value: _C.set_setting(index, options.index(value)))
    return (lambda: _C.get_setting(index), lambda value: _C.set_setting(index, value))


def _integer(name: str, low: int, high: int) -> Callable[[Any], int]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"config {name!r} must be an int, got {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"config {name!r} must be in [{low}, {high}], got {value}")
        return value
    return check


def _one_of(name: str, options) -> Callable[[Any], str]:
    def check(value):
        if value not in options:
            raise ValueError(f"config {name!r} must be one of {', '.join(options)}, got {value!r}")
        return value
    return check


def _boolean(name: str) -> Callable[[Any], bool]:
    def check(value):
        if not isinstance(value, bool):
            raise TypeError(f"config {name!r} must be a bool, got {type(value).__name__}")
        return value
    return check


def _path(name: str) -> Callable[[Any], Optional[str]]:
    def check(value):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"config {name!r} must be a path string or None, got "
                            f"{type(value).__name__}")
        return value
    return check


_DOCS = {
    "conv_stream_mb": "1x1 conv outputs of at least this many MiB are written with non-temporal "
                      "stores (bypassing caches they would only pollute)",
    "moe_gemv_rows": "MoE expert segments of at most this many tokens run the GEMV ukernels, "
                     "longer ones the GEMM ukernel (-1: each tier's measured crossover)",
    "nm_cuda_path": "CUDA N:M forward path: auto, or force cores / cusparselt / dense (dense is "
                    "the benchmark's yardstick only)",
}


def _build() -> Dict[str, _Setting]:
    table = {
        "isa": _Setting("SPARSE_EXT_ISA", "instruction-set tier the CPU kernels dispatch to "
                        "(a family without it runs the tier below)",
                        isa.get_isa, isa.set_isa, lambda v: _one_of("isa", isa.supported_isas())(v)),
        "tuning": _Setting("SPARSE_EXT_TUNE", "time candidate kernels on a new plan key and keep "
                           "the fastest (off: the active tier's kernel always)",
                           tuning.tuning_enabled, tuning.set_tuning, _boolean("tuning")),
        "plan_cache_path": _Setting("SPARSE_EXT_CACHE_DIR", "file behind the plan cache (None: "
                                    "memory only); the variable names its directory",
                                    tuning.plan_cache_path, tuning.set_plan_cache_path,
                                    _path("plan_cache_path")),
    }
    for index, (name, env, _default, low, high, choices) in enumerate(_C.settings()):
        getter, setter = _native(index, choices)
        check = _one_of(name, choices.split(",")) if choices else _integer(name, low, high)
        table[name] = _Setting(env, _DOCS.get(name, ""), getter, setter, check)
    return table


_SETTINGS = _build()
for _line in _C.settings_env_errors().splitlines():
    warnings.warn(_line, RuntimeWarning, stacklevel=2)


def names() -> list:
    """Every setting's name."""
    return list(_SETTINGS)


def _lookup(name: str) -> _Setting:
    try:
        return _SETTINGS[name]
    except KeyError:
        raise KeyError(f"no sparse_ext setting {name!r}; the settings are: "
                       f"{', '.join(_SETTINGS)}") from None


def get(name: str) -> Any:
    """The current value of setting ``name``."""
    return _lookup(name).get()


def set(name: str, value: Any) -> None:  # noqa: A001  (the module's verb, as in torch.backends)
    """Change setting ``name``; raises TypeError / ValueError naming the setting for a bad value."""
    setting = _lookup(name)
    setting.set(setting.check(value))


@contextlib.contextmanager
def override(**values):
    """Context manager: the given settings inside the block, the previous values afterwards."""
    with contextlib.ExitStack() as stack:
        for name, value in values.items():
            setting = _lookup(name)
            stack.enter_context(scoped_setting(setting.get, setting.set, setting.check(value)))
        yield


def describe() -> str:
    """A table of every setting: name, current value, environment variable, meaning."""
    rows = [(name, repr(s.get()), s.env, s.doc) for name, s in _SETTINGS.items()]
    widths = [max(len(r[i]) for r in rows + [("setting", "value", "environment", "")])
              for i in range(3)]
    lines = [f"{'setting':<{widths[0]}}  {'value':<{widths[1]}}  {'environment':<{widths[2]}}  meaning"]
    lines += [f"{n:<{widths[0]}}  {v:<{widths[1]}}  {e:<{widths[2]}}  {d}" for n, v, e, d in rows]
    return "\n".join(lines)

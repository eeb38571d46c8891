"""Which instruction set the CPU kernels use.

Chosen once at import from the CPU's features (the best of avx512, avx2, neon, scalar);
``SPARSE_EXT_ISA=scalar|avx2|avx512|neon`` forces one, and ``set_isa`` / ``use_isa`` switch at run
time (tests use that to cover every compiled path). A family without ukernels for the chosen tier
runs the best tier below it (avx512 -> avx2 -> scalar, neon -> scalar). The kernel library's
``wasmsimd`` tier exists only in its WebAssembly build (docs/portable.md), never in this module.
"""
import warnings

from . import _C
from ._scoped_setting import scoped_setting

_env_error = _C.isa_env_error()
if _env_error:
    warnings.warn(_env_error, RuntimeWarning, stacklevel=2)


def get_isa() -> str:
    """The ISA the kernels dispatch to now: ``"scalar"``, ``"avx2"``, ``"avx512"`` or ``"neon"``."""
    return _C.get_isa()


def supported_isas() -> list:
    """ISAs compiled into this build that the running CPU can execute (always has ``"scalar"``)."""
    return list(_C.supported_isas())


def cpu_features() -> list:
    """Optional x86 extensions the CPU (and OS) offer beyond its tier: avx512_bf16, avx512_fp16,
    avx512_vnni, avx_vnni, amx_tile, amx_bf16, amx_int8 (for the benchmark's machine line)."""
    return list(_C.cpu_features())


def set_isa(name: str) -> None:
    """Force every kernel onto ``name``; raises ``RuntimeError`` if unsupported here."""
    _C.set_isa(name)


def use_isa(name: str):
    """Context manager: run the enclosed code on ISA ``name``, then restore the previous one."""
    return scoped_setting(get_isa, set_isa, name)

"""Which instruction set the CPU kernels use.

Chosen once at import from the CPU's features; ``SPARSE_EXT_ISA=scalar|avx2|neon`` forces one, and
``set_isa`` / ``use_isa`` switch at run time (tests use that to cover every compiled path).
"""
import contextlib
import warnings

from . import _C

_env_error = _C.isa_env_error()
if _env_error:
    warnings.warn(_env_error, RuntimeWarning, stacklevel=2)


def get_isa() -> str:
    """The ISA the kernels dispatch to now: ``"scalar"``, ``"avx2"`` or ``"neon"``."""
    return _C.get_isa()


def supported_isas() -> list:
    """ISAs compiled into this build that the running CPU can execute (always has ``"scalar"``)."""
    return list(_C.supported_isas())


def set_isa(name: str) -> None:
    """Force every kernel onto ``name``; raises ``RuntimeError`` if unsupported here."""
    _C.set_isa(name)


@contextlib.contextmanager
def use_isa(name: str):
    """Context manager: run the enclosed code on ISA ``name``, then restore the previous one."""
    previous = get_isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(previous)

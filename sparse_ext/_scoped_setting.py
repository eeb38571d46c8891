"""The set-then-restore pattern behind every ``use_*`` / ``override`` context manager."""
import contextlib
from typing import Callable, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def scoped_setting(read: Callable[[], T], write: Callable[[T], None], value: T):
    """Context manager: ``write(value)`` inside the block, then ``write`` back what ``read()``
    returned before it, also when the block raises."""
    previous = read()
    write(value)
    try:
        yield
    finally:
        write(previous)

"""Running a model on example inputs given the way users hold them, and watching what its layers
receive."""
import contextlib
from typing import Callable, Iterable, Mapping, Tuple

from torch import nn


def call_model(model: nn.Module, inputs):
    """``model(inputs)``, where ``inputs`` is a tensor (one positional argument), a tuple of
    positional arguments, or a mapping of keyword arguments (Hugging Face batches)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


@contextlib.contextmanager
def forward_pre_hooks(hooks: Iterable[Tuple[nn.Module, Callable]]):
    """Context manager: each ``(module, hook)`` pair's hook sees the module's positional inputs
    inside the block only."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

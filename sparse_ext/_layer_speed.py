"""Timing a sparse layer against the dense one it replaces, for ``sparsify(only_if_faster=True)``.

The input a layer is timed on is the one it sees in the model when ``example_inputs`` are given
(captured with forward pre-hooks in one forward pass), else a default: 16 tokens for a linear
layer, one 56x56 image for a convolution.
"""
import statistics
import time
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ._model_inputs import call_model, forward_pre_hooks

DEFAULT_TOKENS = 16
DEFAULT_IMAGE = 56


def capture_input_shapes(model: nn.Module, modules: Mapping[str, nn.Module],
                         example_inputs) -> Dict[str, Tuple[int, ...]]:
    """The shape of the first input each of ``modules`` receives in ``model(example_inputs)``
    (a tensor, a tuple of positional arguments, or a dict of keyword arguments)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    hooks = []
    for name, mod in modules.items():
        def hook(_mod, args, name=name):
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)
        hooks.append((mod, hook))
    with forward_pre_hooks(hooks), torch.no_grad():
        call_model(model, example_inputs)
    return shapes


def default_input_shape(sparse: nn.Module) -> Tuple[int, ...]:
    """The input a sparse layer is timed on when the model's own is unknown."""
    if hasattr(sparse, "kernel_size"):
        return (1, sparse.in_channels, DEFAULT_IMAGE, DEFAULT_IMAGE)
    return (DEFAULT_TOKENS, sparse.in_features)


def dense_over_sparse(dense: nn.Module, sparse: nn.Module, shape: Tuple[int, ...],
                      dtype: Optional[torch.dtype] = None, reps: int = 7) -> float:
    """Median time of ``dense(x)`` over that of ``sparse(x)`` (> 1: sparse is faster), timed
    interleaved after a warm-up that also lets the sparse kernels pick their plan."""
    x = torch.randn(shape, dtype=dtype or torch.float32)
    fns = (lambda: dense(x), lambda: sparse(x))
    times = ([], [])
    with torch.no_grad():
        for fn in fns:
            for _ in range(2):
                fn()
        for _ in range(reps):
            for fn, t in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
    return statistics.median(times[0]) / statistics.median(times[1])

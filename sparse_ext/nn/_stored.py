"""What every sparse module stores the same way: structure buffers, kept values, bias."""
from typing import Iterable, Optional

import torch
from torch import nn


def register_sparse_state(module: nn.Module, buffers: dict, values: torch.Tensor,
                          bias: Optional[torch.Tensor], out_dim: int) -> None:
    """Registers the structure ``buffers`` (name -> tensor), the trainable ``values`` and ``bias``
    (a copy, checked to be ``[out_dim]``) on ``module``."""
    for name, tensor in buffers.items():
        module.register_buffer(name, tensor)
    module.values = nn.Parameter(values)
    if bias is not None:
        if bias.shape != (out_dim,):
            raise ValueError(f"bias must have shape ({out_dim},), got {tuple(bias.shape)}")
        module.bias = nn.Parameter(bias.detach().clone())
    else:
        module.register_parameter("bias", None)


def adopt_saved_sizes(module: nn.Module, state_dict, prefix: str, names: Iterable[str]) -> None:
    """Before ``load_state_dict`` copies: the number of stored entries differs between masks, so
    tensors ``names`` take the saved sizes (keeping dtype, device and ``requires_grad``)."""
    for name in names:
        saved = state_dict.get(prefix + name)
        current = getattr(module, name)
        if saved is not None and saved.shape != current.shape:
            fresh = torch.empty_like(saved, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                setattr(module, name, nn.Parameter(fresh, requires_grad=current.requires_grad))
            else:
                setattr(module, name, fresh)


def saved_or_current(module: nn.Module, state_dict, prefix: str, name: str):
    """The tensor ``load_state_dict`` would put in ``module.<name>``: the saved one, or the current
    one when the state_dict lacks it (``strict=False``)."""
    saved = state_dict.get(prefix + name)
    return getattr(module, name) if saved is None else saved


def check_loaded_structure(module: nn.Module, prefix: str, weight) -> None:
    """Validates a sparse weight assembled from a state_dict *before* anything is copied, so that
    a corrupt checkpoint raises at load (naming the tensor) and leaves ``module`` as it was."""
    where = prefix[:-1] if prefix else type(module).__name__
    try:
        weight.validate()
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"load_state_dict: the sparse weight of {where!r} in this state_dict is "
                         f"malformed: {str(e).splitlines()[0]}") from None


def check_loaded_bias(module: nn.Module, state_dict, prefix: str, out_dim: int) -> None:
    bias = state_dict.get(prefix + "bias")
    if bias is not None and (module.bias is None or tuple(bias.shape) != (out_dim,)):
        want = "no bias" if module.bias is None else f"bias of shape ({out_dim},)"
        raise ValueError(f"load_state_dict: {prefix}bias has shape {tuple(bias.shape)}, this "
                         f"module has {want}")


def check_loaded_shapes(module: nn.Module, state_dict, prefix: str) -> None:
    """Every tensor of ``state_dict`` under ``prefix`` that ``module`` (or a child) holds must have
    the held tensor's shape: checked for all of them before any is copied."""
    for name, current in module.state_dict(keep_vars=True).items():
        saved = state_dict.get(prefix + name)
        if isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor) \
                and saved.shape != current.shape:
            raise ValueError(f"load_state_dict: {prefix}{name} has shape {tuple(saved.shape)}, "
                             f"this module expects {tuple(current.shape)}")

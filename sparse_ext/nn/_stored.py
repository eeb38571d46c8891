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

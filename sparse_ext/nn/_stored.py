"""What every sparse module stores the same way: structure buffers, kept values, bias, and the
shape/pattern metadata as a small tensor."""
import json
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from ..formats import SparseWeight, require_weight


def encode_extra_state(state: dict) -> torch.Tensor:
    """The module's metadata as a uint8 tensor of UTF-8 JSON, so that a checkpoint is tensors
    only: safetensors, ``save_pretrained``, ``torch.load(weights_only=True)`` and distributed
    checkpoints all take it."""
    data = json.dumps(state, sort_keys=True).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8)


def decode_extra_state(state):
    """The metadata dict from :func:`encode_extra_state`'s tensor, or a dict as checkpoints
    written before it hold; ValueError for anything else."""
    if isinstance(state, dict):
        return state
    if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
        try:
            decoded = json.loads(bytes(state.cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"state_dict's extra state is not the sparse module's metadata: "
                             f"{e}") from None
        if isinstance(decoded, dict):
            return decoded
    raise ValueError(f"state_dict's extra state must be the sparse module's metadata (a uint8 "
                     f"JSON tensor, or a dict from older checkpoints), got {type(state).__name__}")


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


def check_loaded_structure(module: nn.Module, prefix: str, weight, pattern: str) -> None:
    """Validates a sparse weight assembled from a state_dict *before* anything is copied, so that
    a corrupt checkpoint raises at load (naming the tensor) and leaves ``module`` as it was."""
    where = prefix[:-1] if prefix else type(module).__name__
    try:
        weight.validate()
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"load_state_dict: the sparse weight of {where!r} in this state_dict "
                         f"(pattern {pattern!r}) is malformed: {str(e).splitlines()[0]}") from None


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


class SparseWeightModule(nn.Module):
    """A module holding one :class:`~sparse_ext.formats.SparseWeight`: its structure tensors as
    buffers, its ``values`` as a trainable parameter, and ``bias``. The weight is rebuilt from them
    on use (:meth:`weight_format`), whatever its format; loading a state_dict checks the weight it
    would hold before copying anything. Subclasses give :meth:`weight_shape` and their own part of
    the extra state."""

    def _store_weight(self, weight: SparseWeight, bias: Optional[torch.Tensor],
                      pattern: Optional[str]) -> None:
        require_weight(weight).validate()
        self._weight_type = type(weight)
        self._weight_config = weight.state_config()
        self.pattern = weight.pattern if pattern is None else pattern
        try:
            described = self._weight_type.config_for(self.pattern, weight.block_rows, weight.shape)
        except ValueError:
            described = None
        if described != self._weight_config:
            raise ValueError(f"pattern {self.pattern!r} does not describe this {weight!r}")
        register_sparse_state(self, weight.structure(), weight.values, bias, weight.out_features)

    def weight_shape(self) -> Tuple[int, int]:
        """The stored weight's [rows, columns]."""
        raise NotImplementedError

    def weight_format(self) -> SparseWeight:
        """The weight, sharing storage with this module's parameter and buffers."""
        tensors = {name: getattr(self, name) for name in self._weight_type.state_names()}
        return self._weight_type.from_state(tensors, self.weight_shape(), self._weight_config)

    @property
    def block_rows(self) -> int:
        return self.weight_format().block_rows

    @property
    def sparsity(self) -> float:
        return 1.0 - self.weight_format().density

    @property
    def weight_nbytes(self) -> int:
        return self.weight_format().nbytes

    def _weight_extra_state(self) -> dict:
        return {"block_rows": self.block_rows, "pattern": self.pattern,
                "format": self._weight_type.format_name}

    def _saved_weight_config(self, state) -> dict:
        """The weight config a state_dict's extra state describes; ValueError when it names
        another format or disagrees with itself."""
        saved_format = state.get("format", "csr")  # checkpoints from before N:M have no format
        if saved_format != self._weight_type.format_name:
            raise ValueError(f"state_dict holds a {saved_format!r} weight, this module stores "
                             f"{self._weight_type.format_name!r}: build it with the same pattern "
                             f"first")
        return self._weight_type.config_for(state["pattern"], state["block_rows"],
                                            self.weight_shape())

    def _set_weight_extra_state(self, state) -> None:
        self._weight_config = self._saved_weight_config(state)
        self.pattern = state["pattern"]

    def _check_extra_state(self, state) -> None:
        raise NotImplementedError

    def _set_module_extra_state(self, state) -> None:
        """Restores a subclass's own metadata from a checked extra state (none by default)."""

    def set_extra_state(self, state):
        state = decode_extra_state(state)
        self._check_extra_state(state)
        self._set_weight_extra_state(state)
        self._set_module_extra_state(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Everything is checked before anything is copied: a corrupt checkpoint raises here and
        # the module keeps its weight.
        extra = state_dict.get(prefix + "_extra_state")
        config, pattern = self._weight_config, self.pattern
        if extra is not None:
            extra = decode_extra_state(extra)
            self._check_extra_state(extra)
            config, pattern = self._saved_weight_config(extra), extra["pattern"]
        names = self._weight_type.state_names()
        weight = self._weight_type.from_state(
            {name: saved_or_current(self, state_dict, prefix, name) for name in names},
            self.weight_shape(), config)
        check_loaded_structure(self, prefix, weight, pattern)
        check_loaded_bias(self, state_dict, prefix, self.weight_shape()[0])
        adopt_saved_sizes(self, state_dict, prefix, names)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

"""SparseConv2d (also exported as SparseConv): a drop-in ``nn.Conv2d`` whose weight is stored sparse.

The weight is the SpMM family's blocked CSR over ``weight.reshape(out_channels, -1)``; the kernels
(``torch.ops.sparse_ext.sparse_conv2d``) run 1x1 convs as sparse x dense products over the pixels
and kxk convs as direct sparse convolutions, with bias and activation fused into the store.
Only ``groups=1`` and ``padding_mode="zeros"`` are sparse; depthwise / grouped convolutions stay
dense ``nn.Conv2d`` (``from_dense`` refuses them so that nothing is silently slow).
"""
from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..formats import SparseWeight, build_weight, format_for
from ..prune import check_mask
from ._stored import SparseWeightModule, encode_extra_state


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(int(e) for e in v)


def _resolve_padding(padding, kernel_size, dilation):
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even (dilated) kernel needs asymmetric padding, "
                             "which SparseConv2d does not support; pass explicit padding")
        return tuple(t // 2 for t in total)
    return _pair(padding)


def _activation_name(activation):
    lo, hi = ops.activation_bounds(activation)  # validates
    if activation is None or activation == "none":
        return None
    if isinstance(activation, str):
        return activation
    return (lo, hi)


class SparseConv2d(SparseWeightModule):
    """``act(conv2d(x, W, bias))`` with W sparse, NCHW (channels_last input accepted), groups=1.

    Parameters: ``values`` (kept weights, trainable; the pattern is fixed) and ``bias``; buffers:
    the structure of W's format (``offsets``, ``indices``). ``activation`` is None, ``"relu"``,
    ``"relu6"`` or a ``(min, max)`` clamp fused into the kernel's store.

    Args:
        weight: a ``CSRWeight`` ``[out_channels, in_channels * kh * kw]`` (nn.Conv2d's weight
            reshaped), block rows R in {1, 2, 4, 8}.
        in_channels: C_in; ``kernel_size``, ``stride``, ``padding`` (int, pair or ``"same"``),
            ``dilation``: as ``nn.Conv2d`` takes them (groups = 1, zero padding).
        bias: ``[out_channels]`` or None; ``pattern``: as for ``SparseLinear``;
        activation: the fused activation above (ValueError for anything else).
    """

    def __init__(self, weight: SparseWeight, in_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: Optional[torch.Tensor] = None, pattern: Optional[str] = None,
                 activation=None):
        super().__init__()
        self._store_weight(weight, bias, pattern)
        if not weight.has_conv2d:
            raise NotImplementedError(f"pattern {self.pattern!r} has no convolution kernel")
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = _resolve_padding(padding, self.kernel_size, self.dilation)
        for name, v, lo in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                            ("dilation", self.dilation, 1), ("padding", self.padding, 0)):
            if len(v) != 2 or min(v) < lo:
                raise ValueError(f"{name} must be a pair of ints >= {lo}, got {v}")
        self.in_channels = int(in_channels)
        self.out_channels = weight.out_features
        kh, kw = self.kernel_size
        if weight.in_features != self.in_channels * kh * kw:
            raise ValueError(f"weight has {weight.in_features} columns, expected in_channels * kh * kw"
                             f" = {self.in_channels * kh * kw}")
        self.activation = _activation_name(activation)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, sparsity: Optional[float] = None,
                   pattern: str = "unstructured", method: str = "magnitude",
                   mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                   activation=None) -> "SparseConv2d":
        """A SparseConv2d with ``conv``'s weight pruned, its geometry and bias.

        Args:
            conv: an ``nn.Conv2d`` with groups = 1 and ``padding_mode="zeros"`` (not modified).
            sparsity: fraction of weights to zero, in [0, 1) (unless ``mask`` is given).
            pattern: ``"unstructured"`` or ``"Rx1"`` with R in {2, 4, 8}: R output channels
                share their kept (input channel, tap) positions (the kernels' NR; group
                sparsity).
            method: ``"magnitude"`` or ``"random"`` (with ``generator``).
            mask: bool, ``conv.weight``'s shape or ``[out_channels, in_channels * kh * kw]``.
            activation: None, ``"relu"``, ``"relu6"`` or ``(min, max)``, fused into the store.

        Raises TypeError for a non-``nn.Conv2d``, ValueError for groups != 1, another padding
        mode or a bad sparsity / mask, NotImplementedError for a pattern without a conv
        kernel (N:M)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"SparseConv2d supports groups=1 only, got groups={conv.groups}: "
                             "depthwise and grouped convolutions stay dense (sparsify skips them)")
        if conv.padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got "
                             f"{conv.padding_mode!r}")
        if conv.transposed if hasattr(conv, "transposed") else False:
            raise ValueError("transposed convolutions are not supported")
        if not format_for(pattern).has_conv2d:
            raise NotImplementedError(f"pattern {pattern!r} has no convolution kernel")
        weight = conv.weight.detach()
        co = weight.shape[0]
        flat = weight.reshape(co, -1)
        if mask is not None:
            shape = weight.shape if getattr(mask, "dim", lambda: 0)() == 4 else flat.shape
            mask = check_mask(mask, shape).reshape(co, -1)
        sparse = build_weight(flat, pattern, mask=mask, sparsity=sparsity, method=method,
                              generator=generator)
        return cls(sparse, conv.in_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.bias, pattern, activation)

    def weight_shape(self) -> Tuple[int, int]:
        kh, kw = self.kernel_size
        return (self.out_channels, self.in_channels * kh * kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(f"x must be [batch, {self.in_channels}, H, W] (or unbatched "
                             f"[{self.in_channels}, H, W]), got shape {list(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, this weight expects in_channels="
                             f"{self.in_channels} (x shape {list(x.shape)})")
        lo, hi = ops.activation_bounds(self.activation)
        y = self.weight_format().conv2d(x, self.bias, self.in_channels, self.kernel_size,
                                        self.stride, self.padding, self.dilation, lo, hi)
        return y.squeeze(0) if unbatched else y

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same (zero-filled) weight and bias. A fused ``activation`` is
        not part of nn.Conv2d: apply it after the returned module."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, bias=self.bias is not None,
                         dtype=self.values.dtype, device=self.values.device)
        with torch.no_grad():
            conv.weight.copy_(self.weight_format().to_dense().reshape(conv.weight.shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def dense_weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        return self.weight_format().to_dense().reshape(self.out_channels, self.in_channels, kh, kw)

    def get_extra_state(self):
        return encode_extra_state({
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride),
            "padding": list(self.padding), "dilation": list(self.dilation),
            "activation": list(self.activation) if isinstance(self.activation, tuple)
            else self.activation,
            **self._weight_extra_state()})

    def _check_extra_state(self, state) -> None:
        keys = {"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                "block_rows", "pattern", "activation"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError(f"state_dict's extra state must be a dict with {sorted(keys)}, got "
                             f"{state!r}")
        saved = (state["out_channels"], state["in_channels"], tuple(state["kernel_size"]))
        mine = (self.out_channels, self.in_channels, self.kernel_size)
        if saved != mine:
            raise ValueError(f"state_dict is for a conv of (out, in, kernel) {saved}, this module is "
                             f"{mine}")

    def _set_module_extra_state(self, state) -> None:
        self.stride = tuple(state["stride"])
        self.padding = tuple(state["padding"])
        self.dilation = tuple(state["dilation"])
        act = state["activation"]
        self.activation = tuple(act) if isinstance(act, list) else act

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        dense_bytes = self.out_channels * self.in_channels * kh * kw * self.values.element_size()
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, activation={self.activation!r}, "
                f"pattern={self.pattern!r}, sparsity={self.sparsity:.3f}, dtype={self.values.dtype}, "
                f"weight_bytes={self.weight_nbytes} ({self.weight_nbytes / max(dense_bytes, 1):.3f}x dense)")


SparseConv = SparseConv2d


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Folds every ``BatchNorm2d`` that directly follows an ``nn.Conv2d`` inside an
    ``nn.Sequential`` into that conv (weight and bias rescaled), replacing the BN by ``Identity``.
    Works in place on an eval-mode model and returns it; dense and sparse models get the same
    folding (fold first, then sparsify)."""
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules.keys())
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or not bn.affine:
                continue
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                new_bias = (bias - bn.running_mean) * scale + bn.bias
                if conv.bias is None:
                    conv.bias = nn.Parameter(new_bias)
                else:
                    conv.bias.copy_(new_bias)
            module._modules[b] = nn.Identity()
    return model


def fuse_activations(model: nn.Module) -> nn.Module:
    """Moves every ``ReLU`` / ``ReLU6`` / ``Hardtanh`` that follows a ``SparseConv2d`` (possibly
    with ``Identity`` in between) inside an ``nn.Sequential`` into the conv's fused epilogue."""
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules.keys())
        for i, a in enumerate(names):
            conv = module._modules[a]
            if not isinstance(conv, SparseConv2d) or conv.activation is not None:
                continue
            j = i + 1
            while j < len(names) and isinstance(module._modules[names[j]], nn.Identity):
                j += 1
            if j >= len(names):
                continue
            act = module._modules[names[j]]
            if isinstance(act, nn.ReLU6):
                conv.activation = "relu6"
            elif isinstance(act, nn.ReLU):
                conv.activation = "relu"
            elif isinstance(act, nn.Hardtanh):
                conv.activation = (float(act.min_val), float(act.max_val))
            else:
                continue
            module._modules[names[j]] = nn.Identity()
    return model

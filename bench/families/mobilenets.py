"""MobileNetV1 and MobileNetV2 (ImageNet, 224x224) defined here so the benchmark needs no download.

Weights are random (the benchmark measures speed; pruning is by magnitude). Every conv is followed
by its BatchNorm inside an ``nn.Sequential`` so ``sparse_ext.fold_batchnorm`` folds all of them.
"""
import copy

import torch
from torch import nn

import sparse_ext


def _conv_bn(inp, oup, k, stride, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(inp, oup, k, stride, (k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(oup)]
    if act is not None:
        layers.append(act(inplace=True))
    return layers


class MobileNetV1(nn.Module):
    # (out_channels, stride) of the depthwise-separable blocks
    CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
           (512, 1), (512, 1), (1024, 2), (1024, 1)]

    def __init__(self, num_classes=1000):
        super().__init__()
        layers = _conv_bn(3, 32, 3, 2)
        inp = 32
        for oup, s in self.CFG:
            layers += _conv_bn(inp, inp, 3, s, groups=inp)   # depthwise 3x3
            layers += _conv_bn(inp, oup, 1, 1)               # pointwise 1x1
            inp = oup
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, t):
        super().__init__()
        hidden = inp * t
        self.use_res = stride == 1 and inp == oup
        layers = []
        if t != 1:
            layers += _conv_bn(inp, hidden, 1, 1, act=nn.ReLU6)          # expand 1x1
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)  # depthwise
        layers += _conv_bn(hidden, oup, 1, 1, act=None)                   # project 1x1 (linear)
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion t, out_channels c, repeats n, first stride s)
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=1000):
        super().__init__()
        blocks = [nn.Sequential(*_conv_bn(3, 32, 3, 2, act=nn.ReLU6))]
        inp = 32
        for t, c, n, s in self.CFG:
            for i in range(n):
                blocks.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        blocks.append(nn.Sequential(*_conv_bn(inp, 1280, 1, 1, act=nn.ReLU6)))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics so folding changes the weights."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def folded(model):
    """Eval-mode copy with every BatchNorm folded into its conv (the dense baseline)."""
    return sparse_ext.fold_batchnorm(randomize_bn(copy.deepcopy(model)).eval())


def pointwise_layers(model, input_size=224):
    """(name, conv, H, W) of every 1x1 conv, with the spatial size it runs at (batch 1)."""
    shapes = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: shapes.__setitem__(name, inp[0].shape[-2:])))
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    return [(name, modules[name], int(hw[0]), int(hw[1])) for name, hw in shapes.items()]


def sparsify_pointwise(model, sparsity=0.9, pattern="unstructured"):
    """Copy of a folded model with every 1x1 conv replaced by a SparseConv2d (magnitude pruning)
    and the following ReLU / ReLU6 fused into it; depthwise and the stem conv stay dense."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1) and child.groups == 1):
                setattr(m, child_name, sparse_ext.SparseConv2d.from_dense(child, sparsity=sparsity,
                                                                          pattern=pattern))
    return sparse_ext.fuse_activations(model)

"""What every family's registrations share: the library handle, ``register_fake`` with the
all-tensors-on-one-device check, and the width and size checks the C++ kernels make first."""
import functools
import inspect

import torch

from .. import _C  # noqa: F401  registers the library before any registration below

lib = torch.ops.sparse_ext
# torch.ops lists an op only once it has been looked up: look every schema of the library up, so
# that dir(torch.ops.sparse_ext) and tab completion show all of them from the start.
for _name in sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                     if n.startswith("sparse_ext::")}):
    getattr(lib, _name)


def call_differentiable(op, *args):
    """``op(*args)`` for an op whose autograd is registered in Python, skipping that autograd
    kernel when no gradient can flow (grad mode off, or no tensor argument requires grad): the
    Python kernel costs about 10 us per call even under ``no_grad`` (measured on a 64x64 2:4
    GEMV: 22 us through it, 12 us below it), as much as a decode-size product itself. Traced
    code (torch.compile) always takes the registered path."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


MAX_WEIGHT_DIM = 2**31 - 1  # the kernels index rows and columns with 32-bit integers
MAX_EXPERTS = 2**20  # kMoeMaxExperts in csrc/ops/moe_args.h


def register_fake(op_name):
    """``register_fake`` plus the check every real kernel makes first: all tensor arguments on one
    device. Without it a meta tensor meeting a CPU tensor would reach the fake kernel (the Meta
    key wins dispatch) and return an uninitialized result instead of an error."""
    def register(fake):
        names = list(inspect.signature(fake).parameters)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            tensors = [(names[i], a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            tensors += [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
            if tensors:
                first, ref = tensors[0]
                for name, t in tensors[1:]:
                    torch._check(t.device == ref.device, lambda: (
                        f"{name} must be on {first}'s device {ref.device}, got {t.device}"))
            return fake(*args, **kwargs)

        torch.library.register_fake(op_name)(checked)
        return fake
    return register


def check_width(t, name, dim, expected, unit, weight_dim):
    """The kernels' width check (csrc/ops/common.h check_width), same wording, for fake tensors."""
    # On failure the message shows sizes, not symbols (a compiled graph traces x's width as a
    # symbol once it has seen two widths); int() only runs once the check has failed.
    torch._check(t.shape[dim] == expected, lambda: (
        f"{name} has {int(t.shape[dim])} {unit}, this weight expects {weight_dim}={expected} "
        f"({name} shape {[int(s) for s in t.shape]})"))


def check_weight_dim(value, name):
    torch._check(0 <= value <= MAX_WEIGHT_DIM,
                 lambda: f"{name} must be in [0, 2^31 - 1], got {value}")

"""Pure-torch references the kernels are checked against, and the tolerance rule.

Tolerance rule (flash-attention's): at reduced precision our error against a float64 reference
must be at most twice the error of PyTorch's own dense op at the same dtype (plus a tiny floor).
"""
import torch
import torch.nn.functional as F


def linear_reference(x, dense_weight, bias=None):
    """float64 ``x @ W^T + bias``."""
    b = None if bias is None else bias.double()
    return F.linear(x.double(), dense_weight.double(), b)


def max_abs_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(ours, reference, torch_same_dtype=None, floor=1e-5):
    """``ours`` within 2x of PyTorch's error (``torch_same_dtype``) against ``reference`` (fp64);
    with no PyTorch result given, within a float32 tolerance scaled to the reference magnitude."""
    err = max_abs_err(ours, reference)
    if torch_same_dtype is not None:
        bound = 2.0 * max_abs_err(torch_same_dtype, reference) + floor
    else:
        scale = reference.abs().max().item() if reference.numel() else 0.0
        bound = 1e-5 * max(1.0, scale) * 4 + floor
    assert err <= bound, f"max abs error {err:.3g} exceeds bound {bound:.3g}"

"""Shared fixtures: every test that takes ``isa`` runs once per ISA this machine supports."""
import pytest
import torch

import sparse_ext

ALL_ISAS = ["scalar", "avx2", "avx512", "neon"]


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    if request.param not in sparse_ext.supported_isas():
        pytest.skip(f"ISA {request.param} not supported on this machine/build")
    with sparse_ext.use_isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Runs a test once per device; the CUDA case skips on machines without a GPU."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available on this machine")
    return torch.device(request.param)

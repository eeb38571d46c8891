"""Shared fixtures: every test that takes ``isa`` runs once per ISA this machine supports.

Kernel tuning is off for the whole run (child processes inherit SPARSE_EXT_TUNE=0): every op runs
the active tier's kernel, so the ``isa`` parametrization tests what it names and no result
depends on timing. test_tuning.py turns it on where it tests the plan cache itself.
"""
import os

os.environ["SPARSE_EXT_TUNE"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

import sparse_ext  # noqa: E402

sparse_ext.set_tuning(False)

ALL_ISAS = ["scalar", "avx2", "avx512", "neon", "wasmsimd"]


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

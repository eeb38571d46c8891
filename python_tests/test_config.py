"""sparse_ext.config: typed get/set/override, errors that name the setting, the environment read
once at import."""
import os
import subprocess
import sys

import pytest

import sparse_ext as se
from sparse_ext import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_setting_listed_and_described():
    assert set(config.names()) >= {"isa", "tuning", "plan_cache_path", "conv_stream_mb",
                                   "moe_gemv_rows", "nm_cuda_path"}
    table = config.describe()
    for name in config.names():
        assert name in table
    assert "SPARSE_EXT_MOE_GEMV_ROWS" in table


def test_get_set_override_restore():
    before = config.get("moe_gemv_rows")
    with config.override(moe_gemv_rows=7, conv_stream_mb=0, nm_cuda_path="cores", tuning=False):
        assert config.get("moe_gemv_rows") == 7
        assert config.get("conv_stream_mb") == 0
        assert config.get("nm_cuda_path") == "cores"
        assert config.get("tuning") is False and not se.tuning_enabled()
    assert config.get("moe_gemv_rows") == before
    assert config.get("nm_cuda_path") == "auto"


def test_isa_setting_is_set_isa():
    with config.override(isa="scalar"):
        assert se.get_isa() == "scalar"
    assert config.get("isa") == se.get_isa()


def test_override_restores_after_an_error():
    before = config.get("moe_gemv_rows")
    with pytest.raises(RuntimeError, match="boom"):
        with config.override(moe_gemv_rows=3):
            raise RuntimeError("boom")
    assert config.get("moe_gemv_rows") == before


@pytest.mark.parametrize("name,value,error,words", [
    ("moe_gemv_rows", -2, ValueError, "moe_gemv_rows"),
    ("moe_gemv_rows", 2.5, TypeError, "must be an int"),
    ("moe_gemv_rows", True, TypeError, "must be an int"),
    ("nm_cuda_path", "fast", ValueError, "auto, cores, cusparselt, dense"),
    ("tuning", 1, TypeError, "must be a bool"),
    ("isa", "sse9", ValueError, "must be one of"),
    ("plan_cache_path", 3, TypeError, "plan_cache_path"),
    ("no_such_setting", 1, KeyError, "the settings are"),
])
def test_bad_values_name_the_setting(name, value, error, words):
    with pytest.raises(error, match=words):
        config.set(name, value)


def test_environment_read_once_at_import():
    code = ("import os, sparse_ext as se; print(se.config.get('moe_gemv_rows'), "
            "se.config.get('nm_cuda_path')); os.environ['SPARSE_EXT_MOE_GEMV_ROWS'] = '5'; "
            "print(se.config.get('moe_gemv_rows'))")
    env = dict(os.environ, SPARSE_EXT_MOE_GEMV_ROWS="12", SPARSE_EXT_NM_CUDA_PATH="dense")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["12", "dense", "12"]


def test_unusable_environment_value_warns_and_keeps_default():
    env = dict(os.environ, SPARSE_EXT_CONV_STREAM_MB="lots")
    proc = subprocess.run([sys.executable, "-c", "import sparse_ext as se; "
                           "print(se.config.get('conv_stream_mb'))"],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "4"
    assert "SPARSE_EXT_CONV_STREAM_MB='lots' ignored" in proc.stderr

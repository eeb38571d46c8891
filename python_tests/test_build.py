"""Build switches and ISA selection."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import sparse_ext as se

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    spec = importlib.util.spec_from_file_location("se_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() only runs as __main__
    return module


def test_cpu_only_build_when_torch_has_no_cuda(monkeypatch):
    setup = _setup_module()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert setup.cuda_build_wanted() is False
    assert not any(p.endswith(".cu") or "cuda" + os.sep in p for p in setup.sources(False))
    ext = setup.extension()
    assert type(ext).__name__ == "Extension" and "nvcc" not in ext.extra_compile_args


def test_cuda_switch_honours_force_cpu(monkeypatch):
    setup = _setup_module()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("SPARSE_EXT_FORCE_CPU", "1")
    assert setup.cuda_build_wanted() is False


def test_cuda_sources_join_when_wanted(tmp_path, monkeypatch):
    setup = _setup_module()
    cuda_dir = tmp_path / "csrc" / "cuda"
    cuda_dir.mkdir(parents=True)
    (cuda_dir / "k.cu").write_text("// kernel\n")
    (tmp_path / "csrc" / "a.cpp").write_text("// glue\n")
    monkeypatch.setattr(setup, "ROOT", str(tmp_path))
    assert sorted(setup.sources(True)) == [os.path.join("csrc", "a.cpp"), os.path.join("csrc", "cuda", "k.cu")]
    assert setup.sources(False) == [os.path.join("csrc", "a.cpp")]


def test_no_march_native_in_default_build():
    setup = _setup_module()
    assert not any("march" in flag for flag in setup.extension().extra_compile_args["cxx"])


# Tiers from best to worst: the default must be the best one the CPU runs, or every test that
# does not pick an ISA would quietly run a slower (or the scalar) path.
ISA_TIERS = ["avx512", "avx2", "neon", "wasmsimd", "scalar"]


def test_default_isa_is_best_supported():
    assert "scalar" in se.supported_isas()
    best = next(t for t in ISA_TIERS if t in se.supported_isas())
    default, _ = _isa_in_subprocess("")
    assert default == best, f"default ISA {default!r}, but this CPU runs {best!r}"


def _isa_in_subprocess(value):
    env = dict(os.environ, SPARSE_EXT_ISA=value)
    code = "import warnings, sparse_ext as se; print(se.get_isa())"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip(), out.stderr


def test_env_var_forces_scalar():
    isa, _ = _isa_in_subprocess("scalar")
    assert isa == "scalar"


def test_env_var_invalid_value_warns_and_falls_back():
    isa, err = _isa_in_subprocess("avx9000")
    assert isa in se.supported_isas()
    assert "SPARSE_EXT_ISA" in err


def test_set_isa_rejects_unknown_and_unsupported():
    with pytest.raises(RuntimeError, match="unknown ISA"):
        se.set_isa("sse9")
    unsupported = [n for n in ("avx2", "neon", "wasmsimd") if n not in se.supported_isas()]
    if unsupported:
        with pytest.raises(RuntimeError, match="not supported"):
            se.set_isa(unsupported[0])


@pytest.mark.parametrize("registry,name_column,scalar_name,avx2_name", [
    ("spmm_registry", 4, "f32-spmm-8x1-scalar", "f32-spmm-32x1-avx2"),
    ("conv_registry", 2, "f32-conv1x1-8x1-scalar", "f32-conv1x1-64x1-avx2"),
])
def test_registry_lists_every_compiled_variant(registry, name_column, scalar_name, avx2_name):
    names = {r[name_column] for r in getattr(se._C, registry)()}
    assert scalar_name in names
    if "avx2" in se.supported_isas():
        assert avx2_name in names


def test_ops_reference_lists_every_schema():
    import re

    with open(os.path.join(ROOT, "csrc", "registration.cpp")) as f:
        source = f.read()
    names = set(re.findall(r'm\.def\(\s*"(\w+)\(', source))
    with open(os.path.join(ROOT, "docs", "ops.md")) as f:
        reference = f.read()
    assert names, "no schema found in registration.cpp"
    missing = sorted(n for n in names if f"\n{n}(" not in reference)
    assert not missing, f"docs/ops.md lacks the schemas of {missing}"
    assert all(hasattr(torch.ops.sparse_ext, n) for n in names)


def test_dir_lists_every_op_after_import():
    """A fresh interpreter that only imports sparse_ext sees every op in dir(torch.ops.sparse_ext)."""
    code = ("import torch, sparse_ext\n"
            "ops = {n.split('::')[1].split('.')[0] for n in torch._C._dispatch_get_all_op_names()\n"
            "       if n.startswith('sparse_ext::')}\n"
            "missing = ops - set(dir(torch.ops.sparse_ext))\n"
            "print(len(ops), sorted(missing))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=1)
    assert int(out[0]) >= 16 and out[1].strip() == "[]", out


"""Builds sparse_ext._C against the installed torch (use --no-build-isolation).

CPU-only when torch has no CUDA or nvcc is missing; CUDA sources in csrc/cuda join the build when
both exist (SPARSE_EXT_FORCE_CPU=1 forces the CPU-only build).
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def cuda_build_wanted():
    """True when torch is a CUDA build, nvcc exists and the user did not force CPU."""
    if os.environ.get("SPARSE_EXT_FORCE_CPU", "0") == "1":
        return False
    import torch

    if torch.version.cuda is None:
        return False
    return cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None


def pip_cuda_include_dirs():
    """Header folders of NVIDIA's pip wheels (cuBLAS, cuSPARSE, cuSPARSELt) that a CUDA build of
    torch depends on; needed where the system toolkit has only the compiler and runtime."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        found += glob.glob(os.path.join(root, "*", "include"))
    return sorted(p for p in found if os.path.isdir(p))


def sources(with_cuda):
    cpp = glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    # C++ tests and benchmarks are programs with their own main() (built by CMakeLists.txt).
    cpp = [p for p in cpp if not any(os.sep + d + os.sep in p for d in ("tests", "bench"))]
    if not with_cuda:
        cpp = [p for p in cpp if os.sep + "cuda" + os.sep not in p]
    cu = glob.glob(os.path.join(ROOT, "csrc", "cuda", "**", "*.cu"), recursive=True) if with_cuda else []
    return _rel(cpp + cu)


def extension():
    with_cuda = cuda_build_wanted()
    # -fopenmp: at::parallel_for is an inline OpenMP region in torch's headers; without the flag it
    # silently runs serially. The extension then shares the libgomp that torch already loaded.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
    if platform.machine() in ("aarch64", "arm64"):
        cxx.append("-DSPARSE_EXT_HAVE_NEON_KERNELS")
    define_macros = [("SPARSE_EXT_WITH_CUDA", "1")] if with_cuda else []
    kwargs = dict(
        name="sparse_ext._C",
        sources=sources(with_cuda),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        # Ampere (sm_80) and Hopper with its arch-specific instructions (sm_90a) unless the user
        # names architectures in TORCH_CUDA_ARCH_LIST, which torch's build helper then honours.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        # After the toolkit's own headers (-idirafter): the wheels' partial copies of the runtime
        # headers must not shadow the toolkit's.
        kwargs["extra_compile_args"]["cxx"] += [f"-idirafter{d}" for d in pip_cuda_include_dirs()]
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)


if __name__ == "__main__":
    setup(
        name="sparse_ext",
        version="0.1.0",
        packages=find_packages(include=["sparse_ext", "sparse_ext.*"]),
        ext_modules=[extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )

"""Build of segflex._C: the C core (always) and the CUDA kernels (when nvcc is found).

Environment:
  SEGFLEX_CUDA=auto|0|1    build csrc/cuda/*.cu with nvcc (auto: when nvcc is found)
  SEGFLEX_CUDA_ARCHS=90a   semicolon-separated list of GPU architectures (e.g. "90a;80")
  SEGFLEX_NVCC_FLAGS=...   extra nvcc flags, space-separated (e.g. "-DSEGFLEX_DECODE_STAGES=4")
  SEGFLEX_NATIVE=1         compile the C core with -march=native (0: portable x86-64-v2/AArch64 build)
  CUDA_HOME                where the CUDA toolkit lives (default: next to nvcc on PATH)

The extension links neither libtorch nor libc10: tensors reach it as addresses and strides,
so one build serves every torch version, and NumPy alone.
"""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _cuda_home() -> Path | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return Path(home)
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    for guess in ("/usr/local/cuda", "/opt/cuda"):
        if (Path(guess) / "bin" / "nvcc").exists():
            return Path(guess)
    return None


def _want_cuda() -> Path | None:
    mode = os.environ.get("SEGFLEX_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return None
    home = _cuda_home()
    if home is None and mode in ("1", "on", "true", "yes"):
        sys.exit("SEGFLEX_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    return home


CUDA_HOME = _want_cuda()
CU_SOURCES = sorted((CSRC / "cuda").glob("*.cu")) if CUDA_HOME else []
if CUDA_HOME and not CU_SOURCES:
    CUDA_HOME = None


def _c_flags() -> list[str]:
    flags = ["-O3", "-std=c11", "-fopenmp", "-DNDEBUG", "-Wall", "-Wno-unused-parameter",
             "-fno-strict-aliasing"]
    if os.environ.get("SEGFLEX_NATIVE", "1") != "0":
        flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
    if CUDA_HOME:
        flags.append("-DSEGFLEX_WITH_CUDA")
    return flags


def _cuda_library_dirs() -> list[str]:
    """Where the toolkit keeps libcudart_static.a (lib64, lib or targets/<arch>/lib)."""
    found = sorted({str(p.parent) for p in CUDA_HOME.glob("**/libcudart_static.a")})
    if not found:
        sys.exit(f"libcudart_static.a not found under {CUDA_HOME} (set CUDA_HOME or SEGFLEX_CUDA=0)")
    return found


class BuildExt(build_ext):
    """Compiles the .cu files with nvcc into objects, then links them into _C."""

    def build_extensions(self) -> None:
        ext = self.extensions[0]
        if CUDA_HOME:
            ext.extra_objects = self._compile_cuda()
            ext.library_dirs += _cuda_library_dirs()
            ext.libraries += ["cudart_static", "rt", "dl", "pthread", "stdc++"]
        super().build_extensions()

    def _compile_cuda(self) -> list[str]:
        nvcc = str(CUDA_HOME / "bin" / "nvcc")
        archs = os.environ.get("SEGFLEX_CUDA_ARCHS", "90a").split(";")
        gencode = []
        for arch in filter(None, (a.strip() for a in archs)):
            gencode.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in CU_SOURCES:
            obj = out_dir / (src.stem + ".o")
            cmd = [nvcc, "-c", str(src), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "--expt-relaxed-constexpr", "-lineinfo", "-DSEGFLEX_WITH_CUDA", f"-I{CSRC}",
                   *gencode, *os.environ.get("SEGFLEX_NVCC_FLAGS", "").split()]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(str(obj))
        return objects


setup(
    ext_modules=[
        Extension(
            "segflex._C",
            sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.c"))],
            include_dirs=[str(CSRC)],
            extra_compile_args=_c_flags(),
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)

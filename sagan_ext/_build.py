"""Kernel builds: a prebuilt extension if `pip install` made one (SAGAN_EXT_BUILD_EXTENSIONS=1),
else a JIT build with torch.utils.cpp_extension and ninja on first use, cached in
TORCH_EXTENSIONS_DIR under a folder named by a hash of the sources (source_key). A failed build
warns once and the caller falls back to another backend."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def csrc_dir() -> Path:
    """Installed packages carry the sources in sagan_ext/csrc; a source checkout has them at the top."""
    for candidate in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    raise FileNotFoundError("sagan_ext: kernel sources (csrc/) not found next to the package")


def cpu_sources(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "cpu").glob("*.cpp"))


def cuda_sources(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "cuda").glob("*.cu")) + [str(root / "cuda" / "bindings.cpp")]


# -march=native: JIT builds run on the machine that uses them; the AVX-512 exp/softmax loops
# need it to vectorise. -fopenmp: at::parallel_for is inline OpenMP in the torch headers.
CPU_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-DNDEBUG"]
CPU_PORTABLE_CFLAGS = ["-O3", "-fopenmp", "-DNDEBUG"]  # ahead-of-time wheels
def nvcc_flags() -> list[str]:
    """csrc/cuda/nvcc_flags.txt: the CUDA flags of every build (this JIT build, setup.py's wheels,
    CMakeLists.txt's CI compile check), one place. torch adds its COMMON_NVCC_FLAGS to the first two;
    CMakeLists.txt names them itself."""
    return (csrc_dir() / "cuda" / "nvcc_flags.txt").read_text().split()


def _device_arch_flags() -> list[str]:
    """JIT builds compile for the GPU at hand only (half the compile time of both targets)."""
    major, minor = torch.cuda.get_device_capability()
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]

_status: dict[str, Optional[str]] = {}  # kind -> None when loaded, else why not


def _gist(error: BaseException) -> str:
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
    return "; ".join(lines[:3])[:500] or text[:500]


def cuda_toolchain_problem() -> Optional[str]:
    if not torch.cuda.is_available():
        return "torch has no usable CUDA device" if torch.version.cuda else "this torch build has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return "nvcc was not found (set CUDA_HOME)"
    return None


def load(kind: str) -> Optional[str]:
    """Make the `kind` ("cpu" or "cuda") kernels available; None on success, else the reason."""
    if kind in _status:
        return _status[kind]
    prebuilt = sorted(PACKAGE_DIR.glob(f"_C_{kind}*.so"))  # SAGAN_EXT_BUILD_EXTENSIONS=1 at install
    if prebuilt:
        torch.ops.load_library(str(prebuilt[0]))
        reason = None
    else:
        reason = cuda_toolchain_problem() if kind == "cuda" else None
        if reason is None:
            reason = _jit_build(kind)
    _status[kind] = reason
    return reason


SOURCE_SUFFIXES = {".cpp", ".h", ".hpp", ".cu", ".cuh"}  # what the compiler reads (not editors' files)


def source_key(folder: Path, flags) -> str:
    """A short hash of the kernel sources (their folder's path and every file's name and bytes),
    the build flags and torch's version. The JIT build folder is named by it, so a checkout and an
    installed copy each keep their own build (ninja rebuilds whenever the sources' paths change),
    and a tree whose library is already there never rebuilds."""
    digest = hashlib.sha256(f"{folder.resolve()}\0{torch.__version__}\0{flags!r}".encode())
    for path in sorted(p for p in folder.iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        digest.update(f"\0{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def jit_plan(kind: str) -> tuple[str, Path, list[str], dict]:
    """(extension name, build folder, sources, cpp_extension.load flags) of the `kind` kernels."""
    from torch.utils import cpp_extension

    root = csrc_dir()
    if kind == "cpu":
        sources, kwargs = cpu_sources(root), dict(extra_cflags=CPU_CFLAGS, extra_ldflags=["-fopenmp"])
    else:
        sources = cuda_sources(root)
        kwargs = dict(extra_cflags=["-O3"], extra_cuda_cflags=nvcc_flags() + _device_arch_flags(),
                      extra_include_paths=[str(root / "cuda")])
    name = f"sagan_ext_{kind}_{source_key(root / kind, kwargs)}"
    build_dir = Path(cpp_extension._get_build_directory(name, False))  # honours TORCH_EXTENSIONS_DIR
    return name, build_dir, sources, kwargs


def _jit_build(kind: str) -> Optional[str]:
    from torch.utils import cpp_extension

    name, build_dir, sources, kwargs = jit_plan(kind)
    fresh = not (build_dir / f"{name}.so").exists()
    if fresh:  # said before the compiler starts: otherwise a build is a silent pause
        print(f"sagan_ext: compiling the {kind} kernels from {Path(sources[0]).parent} (first use of these sources; "
              f"cached in {build_dir})...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        cpp_extension.load(name=name, sources=sources, build_directory=str(build_dir), is_python_module=False,
                           verbose=False, **kwargs)
    except Exception as error:  # a compiler error, a missing ninja, a broken toolchain
        reason = f"building the {kind} kernels failed: {_gist(error)}"
        warnings.warn(f"sagan_ext: {reason}. Falling back to another backend.", RuntimeWarning, stacklevel=3)
        return reason
    elapsed = time.perf_counter() - start
    if fresh or elapsed > 5:
        print(f"sagan_ext: {kind} kernels ready in {elapsed:.1f} s", file=sys.stderr, flush=True)
    return None

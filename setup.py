"""pip install . installs the Python package with the kernel sources (csrc/) as package data;
kernels JIT-compile on first use. SAGAN_EXT_BUILD_EXTENSIONS=1 builds them ahead of time instead
(for wheels; needs torch in the build environment: pip install --no-build-isolation .)."""
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
ext_modules, cmdclass = [], {}
if os.environ.get("SAGAN_EXT_BUILD_EXTENSIONS") == "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    ext_modules.append(CppExtension("sagan_ext._C_cpu", cpu_sources,
                                    extra_compile_args=["-O3", "-fopenmp", "-DNDEBUG"], extra_link_args=["-fopenmp"]))
    cuda_dir = ROOT / "csrc" / "cuda"
    if torch.version.cuda and CUDA_HOME and (cuda_dir / "bindings.cpp").exists():
        cuda_sources = sorted(str(p.relative_to(ROOT)) for p in cuda_dir.glob("*.cu")) + ["csrc/cuda/bindings.cpp"]
        ext_modules.append(CUDAExtension(
            "sagan_ext._C_cuda", cuda_sources, include_dirs=[str(cuda_dir)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": (cuda_dir / "nvcc_flags.txt").read_text().split() + [
                "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90"]}))  # PTX too, which newer GPUs compile at load
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="sagan_ext",
    version="0.1.0",
    description="Fused SAGAN self-attention and spectral norm for PyTorch (CPU C++, CUDA, Triton backends)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["sagan_ext", "sagan_ext.csrc"],
    package_dir={"sagan_ext.csrc": "csrc"},
    package_data={"sagan_ext.csrc": ["*.h", "cpu/*.h", "cpu/*.cpp", "cuda/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.cpp",
                                     "cuda/*.txt"]},
    install_requires=["torch>=2.4", "numpy", "ninja", "pillow", "tqdm"],
    entry_points={"console_scripts": ["sagan-train = sagan_ext.train:main", "sagan-sample = sagan_ext.sample:main"]},
    extras_require={
        # the trainer's embedded digits come with scikit-learn; its TensorBoard logs need tensorboard
        "train": ["scikit-learn", "tensorboard"],
        # triton: the oldest release the Triton kernels are compiled against (tests/test_triton_compile.py)
        "test": ["pytest", "pytest-benchmark", "matplotlib",
                 "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

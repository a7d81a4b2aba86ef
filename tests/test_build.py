"""A failed kernel build warns once, says why, and "auto" falls back to a working backend."""
import warnings
from pathlib import Path

import pytest
import torch

from sagan_ext import _build, available_backends
from sagan_ext.backends import select


def test_failed_build_warns_once_and_auto_falls_back(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def broken_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'sagan_ext_cpu':\nattention.cpp:1:10: fatal error: no such header")

    monkeypatch.setattr(_build, "_status", {})
    monkeypatch.setattr(cpp_extension, "load", broken_compiler)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    sources = _build.csrc_dir()
    monkeypatch.setattr(_build, "PACKAGE_DIR", tmp_path)  # no prebuilt library there
    monkeypatch.setattr(_build, "csrc_dir", lambda: sources)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = _build.load("cpu")
        assert _build.load("cpu") == reason  # remembered: no second build, no second warning
    assert "fatal error: no such header" in reason
    assert len([w for w in caught if "Falling back" in str(w.message)]) == 1
    assert available_backends()["cpu"] == reason
    assert select("auto", torch.device("cpu"), torch.float32).name == "reference"
    with pytest.raises(ValueError, match="backend='cpu' cannot run.*no such header"):
        select("cpu", torch.device("cpu"), torch.float32)


def test_build_folder_is_keyed_on_the_sources_and_a_compile_is_announced(monkeypatch, tmp_path, capsys):
    """Two copies of the sources build in two folders (no thrash between a checkout and an installed
    copy); the same sources find their library (no announcement); changed sources get a new folder.
    cpp_extension.load is replaced by a recorder that writes the library where ninja would."""
    import shutil
    from torch.utils import cpp_extension

    builds = []

    def recording_compiler(name, sources, build_directory, **kwargs):
        builds.append((name, Path(build_directory), sources))
        (Path(build_directory) / f"{name}.so").touch()

    copies = [tmp_path / "checkout" / "csrc", tmp_path / "site-packages" / "sagan_ext" / "csrc"]
    for copy in copies:
        shutil.copytree(_build.csrc_dir(), copy)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(cpp_extension, "load", recording_compiler)

    def build(root):
        monkeypatch.setattr(_build, "csrc_dir", lambda: root)
        assert _build._jit_build("cpu") is None
        return builds[-1][1], capsys.readouterr().err

    first, said = build(copies[0])
    assert first.parent == tmp_path / "extensions" and first.name.startswith("sagan_ext_cpu_")
    assert "compiling the cpu kernels" in said and str(copies[0] / "cpu") in said
    assert all(s.startswith(str(copies[0])) for s in builds[-1][2])
    assert build(copies[0]) == (first, "")  # unchanged: same folder, library found, nothing announced
    other, said = build(copies[1])
    assert other != first and "compiling the cpu kernels" in said
    assert build(copies[0]) == (first, "") and build(copies[1]) == (other, "")  # alternating: no thrash
    with open(copies[1] / "cpu" / "attention.cpp", "a") as f:
        f.write("\n// edited\n")
    edited, said = build(copies[1])
    assert edited not in (first, other) and "compiling the cpu kernels" in said


def test_unchanged_sources_do_not_rebuild(capsys):
    """The real toolchain: building the already-built tree again leaves its library as it was."""
    assert _build._jit_build("cpu") is None  # built by this session already (or now, if it used prebuilt kernels)
    name, build_dir, _, _ = _build.jit_plan("cpu")
    library = build_dir / f"{name}.so"
    stamp = library.stat().st_mtime_ns
    capsys.readouterr()
    assert _build._jit_build("cpu") is None
    assert library.stat().st_mtime_ns == stamp
    assert "compiling" not in capsys.readouterr().err


def test_every_build_compiles_the_cuda_kernels_with_the_same_flags():
    """The JIT build (cpp_extension.load, what a GPU user runs) compiles the .cu files with torch's
    COMMON_NVCC_FLAGS, which remove __half/__nv_bfloat16's float conversions; the CMake build in
    CI must use them too, or a kernel that compiles in CI fails to build on every GPU machine
    (attention_mma.cu's T(0.f) did, found on the first GPU run's rehearsal)."""
    from torch.utils import cpp_extension

    cmake = (Path(__file__).resolve().parent.parent / "CMakeLists.txt").read_text()
    kernel_options = cmake.split("target_compile_options(sagan_ext_cuda_kernels", 1)[1].split(")", 1)[0]
    missing = [flag for flag in cpp_extension.COMMON_NVCC_FLAGS if flag not in kernel_options.split()]
    assert not missing, f"CMakeLists.txt's CUDA kernel flags lack torch's JIT flags {missing}"
    # and the project's own flags come from the one list the JIT build and setup.py read
    assert "${SAGAN_EXT_NVCC_FLAGS}" in kernel_options.split() and "nvcc_flags.txt" in cmake
    assert "nvcc_flags.txt" in (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert "--use_fast_math" in _build.nvcc_flags()

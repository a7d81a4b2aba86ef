"""A failed kernel build warns once, says why, and "auto" falls back to a working backend."""
import warnings

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

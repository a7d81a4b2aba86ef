import pytest
import torch

import sagan_ext

# Backends that run on this machine's CPU. The triton backend runs here only under its
# interpreter, which tests/test_triton.py sets up; CUDA-only checks live in tests/test_gpu.py.
CPU_BACKENDS = ["reference", "cpu"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return f"torch {torch.__version__}; sagan_ext backends: {sagan_ext.available_backends()}"

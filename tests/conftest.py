import os

import torch

# With no GPU, the Triton backend's kernels run under Triton's interpreter (exact, slow): set
# before anything imports triton, so that tests/test_triton.py proves them on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import sagan_ext  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return f"torch {torch.__version__}; sagan_ext backends: {sagan_ext.available_backends()}"


@pytest.fixture(scope="session")
def classifier_file(tmp_path_factory):
    """The trainer's proxy classifier for the digits, trained once for the session and copied into
    each run folder (tests/test_train*.py)."""
    from sagan_ext import data, evaluation
    digits = data.load_digits(32)
    model, accuracy = evaluation.train_classifier(digits, torch.device("cpu"), epochs=3)
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    torch.save({"model": model.state_dict(), "accuracy": accuracy, "data": evaluation.data_record(digits)}, path)
    return path

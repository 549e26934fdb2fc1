"""Shared fixtures: TensorLy backends, devices and the optional real data."""

import os
from pathlib import Path

import pytest
import tensorly as tl
from hypothesis import settings
from threadpoolctl import threadpool_limits

try:
    import torch
except ImportError:  # the core runs without torch
    torch = None

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One BLAS thread per test worker: the workers already use every core, and oversubscribed
    # threads make small matrix products wait on each other.
    threadpool_limits(1)
    if torch is not None:
        torch.set_num_threads(1)

# In continuous integration the property tests draw the same examples on every run, so that a
# red build always points at a change. Local runs draw new examples and keep exploring.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

BACKENDS = ["numpy"] + (["pytorch"] if torch is not None else [])

# The pretrained models and CIFAR-10 images live beside the repository, never inside it.
DATA_DIR = Path(
    os.environ.get("TENSORLY_DATC_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow measurement; run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test under each installed TensorLy backend, restoring the previous one."""
    with tl.backend_context(request.param):
        yield request.param


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Torch device; CUDA is skipped where no GPU is present."""
    if torch is None:
        pytest.skip("torch is not installed")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return request.param


@pytest.fixture(scope="session")
def data_dir():
    """Folder with the pretrained CIFAR-10 ResNets and images; skips when absent."""
    if not (DATA_DIR / "cifar10_resnets").is_dir():
        pytest.skip(f"real data folder not found at {DATA_DIR} (set TENSORLY_DATC_DATA)")
    return DATA_DIR

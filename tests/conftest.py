"""Shared pytest setup: markers that skip honestly, and the Triton interpreter on machines without CUDA."""
import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any project module is
# imported. Without CUDA the kernels then run in Triton's interpreter on CPU tensors (small sizes only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models' ops are far too small to share between threads: one intra-op thread is several times faster
    (and much faster again on a busy 2-core machine). Modules opt in with `pytest.mark.usefixtures`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_weights = pytest.mark.skip(
        reason="needs the official SANA-WM release: set SANA_WM_WEIGHTS to its folder (dit/, vae/, refiner/)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "weights" in item.keywords and not os.environ.get("SANA_WM_WEIGHTS"):
            item.add_marker(no_weights)

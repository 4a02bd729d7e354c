"""Test set-up. Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton is imported anywhere, so it is set here, first."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import signal  # noqa: E402

# A shell that starts the suite in the background (``cmd &`` without job control, as some CI runners do)
# leaves SIGINT ignored, and Python then raises no KeyboardInterrupt for it: the tests of what Ctrl-C does
# would see nothing. Run them as an interactive user would (children then start with the default action).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: longer than a few seconds on 2 CPU cores; run by `make test-slow` "
                            "(CI runs it after `make test`), left out of `make test`")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

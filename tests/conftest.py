import os

# No GPU in CI: generated Triton kernels run in Triton's interpreter. Triton reads this when it is
# first imported, and in a full run some module imports it early, so it is set here, before anything.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: Dynamo caches must not leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

import os

# No GPU in CI: generated Triton kernels run in Triton's interpreter. Triton reads this when it is
# first imported, and in a full run some module imports it early, so it is set here, before anything.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import settings

# Property tests draw the same cases on every run (CI must not be flaky); HYPOTHESIS_PROFILE=explore
# draws new ones for a local bug hunt.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: Dynamo caches must not leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

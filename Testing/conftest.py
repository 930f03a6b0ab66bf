"""Shared by every test module: torch's thread count is restored after each module, so a
module that sets it (for bit-exact sums, or two threads for speed) does not change the
arithmetic of the modules after it; and every test starts from torch's and numpy's global
random state seeded with 0, so a draw a test does not seed itself is the same on every run,
whichever tests ran before it. The list of trusted denoiser code (trusted_code) is a file
of this test session, not the user's, in this process and the engine processes it starts."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

os.environ["INVARIANCE_EXPLORER_TRUST"] = os.path.join(tempfile.mkdtemp(prefix="trust-"), "trusted_code.json")


@pytest.fixture(autouse=True, scope="module")
def _threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    np.random.seed(0)

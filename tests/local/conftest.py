"""Fixtures for tests/local: CPU threads for the engine tests.

On a shared or oversubscribed CPU, torch's intra-op threads wait on each other at every op (a
2-layer test model ran 40x slower with 2 threads than with 1 under load). Tiny models gain nothing
from threads, so these tests run single-threaded; SAFESTEER_TEST_THREADS overrides.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SAFESTEER_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)

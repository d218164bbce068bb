"""Shared test setup: few CPU threads (the suite's tensors are small, and oversubscribed OpenMP
threads are what makes CPU tests slow on a shared 2-core box) and a deterministic seed."""

import random

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed Python and torch before every test; the value is available as the ``seed`` fixture."""
    random.seed(0)
    torch.manual_seed(0)
    return 0

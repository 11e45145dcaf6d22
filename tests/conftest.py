"""Shared test settings."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # CI has two cores shared with Label Studio and gunicorn: oversubscribed intra-op threads make
    # the tiny models of the unit tests ~50x slower, so each module runs single-threaded.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

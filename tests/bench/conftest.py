"""The benchmark tests' shared fixture."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The benchmark mains may set torch's thread count for the machine's load; give the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

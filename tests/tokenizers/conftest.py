import pytest
import torch


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(3, 1, 28, 28) * 2 - 1

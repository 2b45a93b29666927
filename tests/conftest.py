import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fashion_test():
    from unitok.data import load_fashion_mnist

    return load_fashion_mnist("test")

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fashion_test():
    from unitok.data import load_fashion_mnist

    return load_fashion_mnist("test")


@pytest.fixture
def forward_rows(monkeypatch):
    """The rows of every ``KVEngine`` forward from now on in this test (requests x CFG streams): what a decoder
    still computes. Clear it to start counting afresh."""
    from unitok.decoding.engine import KVEngine

    rows: list[int] = []
    forward = KVEngine.forward

    def spy(self, inputs_embeds, *args, **kwargs):
        rows.append(inputs_embeds.shape[0])
        return forward(self, inputs_embeds, *args, **kwargs)

    monkeypatch.setattr(KVEngine, "forward", spy)
    return rows


class ScriptedPrune:
    """A decoder's ``prune`` callback: answers ``masks.get(step)`` (a row mask, or None to keep every row) and
    records in ``calls`` every step it was asked about."""

    def __init__(self, masks: dict):
        self.masks = masks
        self.calls: list[int] = []

    def __call__(self, step: int):
        self.calls.append(step)
        return self.masks.get(step)


@pytest.fixture
def scripted_prune():
    """:class:`ScriptedPrune`, for tests of decoders that take ``prune``."""
    return ScriptedPrune

"""The labels a worker writes: the first maximum over classes, as argmax gives it."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.predictor import labels_from


def test_labels_take_the_first_maximum_like_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    proba = torch.randint(0, 3, (4, 67, 131), generator=gen).float()  # many exact ties
    channels_last = proba[None].contiguous(memory_format=torch.channels_last)[0]
    expected = proba.argmax(dim=0).to(torch.uint8)
    assert torch.equal(labels_from(proba), expected) and torch.equal(labels_from(channels_last), expected)
    assert np.array_equal(labels_from(proba, only_class=2).numpy(), (expected == 2).numpy().astype(np.uint8))

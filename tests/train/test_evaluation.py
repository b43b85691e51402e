"""The one evaluation path reads images through the training run's preprocessing preset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltdist.train.evaluation import evaluate_split

from ..data.conftest import write_dataset


class _Recorder(nn.Module):
    """Scores every class 0 and keeps the images it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images)
        return torch.zeros(images.shape[0], 5)


@pytest.mark.parametrize("transform", ["clip", "cprfl_official"])
def test_evaluate_split_uses_the_presets_test_form(tmp_path, transform):
    from accelerate import Accelerator

    location = str(tmp_path / "ds")
    write_dataset(location, 6, 3)  # flat images of value i
    module = _Recorder()
    scores, targets = evaluate_split(
        Accelerator(cpu=True), module, location, "train", 4, 8, transform=transform
    )
    assert scores.shape == targets.shape == (6, 5)
    images = torch.cat(module.seen)
    if transform == "cprfl_official":  # [0, 1], no mean / std
        flat = torch.arange(6.0).div(255).view(6, 1, 1, 1).expand(6, 3, 8, 8)
        torch.testing.assert_close(images, flat, rtol=0, atol=1e-7)
    else:
        assert images.min() < 0  # CLIP's mean subtracted

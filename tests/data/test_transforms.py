"""The cprfl_official preset's training form (Cutout + torchvision's RandAugment): seeded per
sample, so a resumed run is exact. Training environment only (the generation environment has
no torchvision); the test form and the clip preset are in test_loader.py."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ltdist.data.loader import _rng, cutout, image_transform

from .test_loader import _corner_image, check_resume


def test_resume_with_cutout_and_randaugment_is_exact(dataset):
    check_resume(dataset, 7, "cprfl_official")


def test_cprfl_official_training_form_is_seeded_per_sample():
    train = image_transform("cprfl_official", 32, augment=True)
    img = _corner_image()
    state = torch.get_rng_state()
    a = train(img, _rng(0, "augment", 0, "s1"))
    assert torch.equal(torch.get_rng_state(), state)  # RandAugment's draws leave torch's RNG
    assert torch.equal(a, train(img, _rng(0, "augment", 0, "s1")))  # same sample, same draws
    others = [train(img, _rng(0, "augment", e, "s1")) for e in range(1, 4)]
    assert all(not torch.equal(a, b) for b in others)  # another epoch, other draws
    assert torch.equal(train(img), image_transform("cprfl_official", 32)(img))  # no rng
    # Cutout: one colour over a clipped half-size rectangle around a drawn centre
    square = Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8))
    rng = np.random.default_rng(3)
    cx, cy = int(rng.integers(20)), int(rng.integers(20))
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    out = np.asarray(cutout(square, np.random.default_rng(3)))
    mask = np.zeros((20, 20), dtype=bool)
    mask[max(cy - 5, 0) : min(cy + 5, 20) + 1, max(cx - 5, 0) : min(cx + 5, 20) + 1] = True
    assert (out[mask] == colour).all() and (out[~mask] == 0).all()

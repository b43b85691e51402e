"""Images to 8-bit RGB by their value range, not by clipping.

PIL opens a 16-bit PNG as mode ``I;16`` (or ``I``), whose values run to 65535; its
``convert("RGB")`` clips them at 255, so such an image reached the model almost pure white.
"""

from __future__ import annotations

import numpy as np

# the largest value of each wide mode's range
_RANGE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def to_rgb(img):
    """``img`` as an 8-bit RGB PIL image, wide integer and float modes scaled to 0..255."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in _RANGE or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode in _RANGE:
            top = _RANGE[img.mode]
        elif img.mode == "I":  # 32-bit integers: a 16-bit source unless the values say 8-bit
            top = 255 if values.max(initial=0) <= 255 else 65535
        else:  # float: [0, 1] unless the values say otherwise
            top = 1.0 if values.max(initial=0) <= 1.0 else float(values.max())
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")

"""NNoculation's noise augmentation (Veldanda et al., AISec'21, §3.2; the authors' augment.py).

A(D, eta, gamma): on a 4x4 grid upscaled to the image (7x7-pixel cells on 28x28), about
gamma of the cells are replaced, per channel, with values drawn from Normal(128, 0.4*128)
and clipped to 0..255. The retraining set is the clean copies plus these noisy copies.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from trainer.imgaug_compat import import_augmenters

NOISE_MEAN = 128.0
NOISE_STD = 0.4 * 128.0
GRID_PX = 4


def add_noise(x: NDArray[np.uint8], *, gamma: float, seed: int) -> NDArray[np.uint8]:
    """Noisy copies of uint8 images (N, H, W, C); deterministic for a seed."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma {gamma} must lie in 0..1")
    iaa = import_augmenters()
    import imgaug.parameters as iap

    aug = iaa.ReplaceElementwise(
        iap.FromLowerResolution(iap.Binomial(gamma), size_px=GRID_PX),
        iap.Normal(NOISE_MEAN, NOISE_STD),
        per_channel=True,
    )
    aug.seed_(seed)
    out: NDArray[np.uint8] = np.asarray(aug(images=np.ascontiguousarray(x)), dtype=np.uint8)
    return out


def augmented(
    x: NDArray[np.uint8], y: NDArray[np.int64], *, gamma: float, seed: int
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """The retraining set: clean copies plus noisy copies, labels repeated."""
    return np.concatenate([x, add_noise(x, gamma=gamma, seed=seed)]), np.concatenate([y, y])

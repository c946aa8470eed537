import numpy as np

from trainer.imgaug_compat import import_augmenters


def test_imgaug_imports_and_runs_the_nnoculation_noise_op() -> None:
    iaa = import_augmenters()
    import imgaug.parameters as iap

    # NNoculation's augment.py noise: 4x4 cells replaced with Normal(128, 0.4*128) values.
    aug = iaa.ReplaceElementwise(
        iap.FromLowerResolution(iap.Binomial(0.5), size_px=4),
        iap.Normal(128, 0.4 * 128),
        per_channel=True,
    )
    aug.seed_(0)
    x = np.zeros((8, 28, 28, 1), dtype=np.uint8)
    out = aug(images=x)
    assert out.shape == x.shape and out.dtype == np.uint8
    replaced = (out != 0).mean()
    assert 0.2 < replaced < 0.8  # about half the cells, in whole blocks

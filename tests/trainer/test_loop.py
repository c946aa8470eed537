import numpy as np
import torch

from core.nets import FashionCNN
from tests.helpers import make_blobs, spec_for
from trainer.loop import FitConfig, accuracy, fit


def _train(seed: int) -> tuple[FashionCNN, list[dict[str, float]]]:
    data = make_blobs(160)
    model = FashionCNN(in_channels=1, num_classes=3, height=12, width=12)
    history = fit(
        model,
        data.x,
        data.y,
        spec_for(data.image_shape),
        FitConfig(epochs=3, batch_size=32, seed=seed),
        progress=False,
    )
    return model, history


def test_fit_learns_a_learnable_task() -> None:
    data = make_blobs(160)
    model, history = _train(0)
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    held = make_blobs(100, seed=1)
    assert accuracy(model, held.x, held.y, spec_for(data.image_shape)) > 0.9


def test_fit_is_deterministic_for_a_seed() -> None:
    torch.manual_seed(123)  # the initial weights; fit() seeds its own shuffling
    a, _ = _train(7)
    torch.manual_seed(123)
    b, _ = _train(7)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    torch.manual_seed(123)
    c, _ = _train(8)
    assert not all(
        torch.equal(va, vc)
        for va, vc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )


def test_accuracy_of_an_empty_set_is_nan() -> None:
    model = FashionCNN(in_channels=1, num_classes=3, height=12, width=12)
    assert np.isnan(
        accuracy(
            model, np.zeros((0, 12, 12, 1), np.uint8), np.zeros(0, np.int64), spec_for((12, 12, 1))
        )
    )

import pytest
import torch

from core.errors import BundleError
from core.nets import ARCHITECTURES, FashionCNN, build_model, resolve_arch


@pytest.mark.parametrize(
    ("arch", "shape"),
    [("fmnist-cnn", (1, 28, 28)), ("nnoculation-cla", (1, 28, 28)), ("color-cnn", (3, 32, 32))],
)
def test_registered_architectures_produce_one_logit_per_class(
    arch: str, shape: tuple[int, int, int]
) -> None:
    c, h, w = shape
    model = build_model(arch, {"in_channels": c, "num_classes": 7, "height": h, "width": w})
    assert model(torch.zeros(2, c, h, w)).shape == (2, 7)


def test_table_10_architecture_layers() -> None:
    model = ARCHITECTURES["nnoculation-cla"]()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(16, (5, 5)), (4, (5, 5))]
    assert [lin.out_features for lin in linears] == [512, 10]


def test_import_path_and_errors() -> None:
    assert resolve_arch("core.nets:FashionCNN") is FashionCNN
    with pytest.raises(BundleError, match="unknown architecture 'resnet9'"):
        resolve_arch("resnet9")
    with pytest.raises(BundleError, match="cannot import"):
        resolve_arch("no_such_module_xyz:Net")
    with pytest.raises(BundleError, match="does not accept"):
        build_model("fmnist-cnn", {"depth": 3})

from pathlib import Path

import numpy as np
import pytest

from core.errors import DataError
from core.images import encode_png
from tests.helpers import make_blobs
from trainer.data import (
    FASHION_MNIST_CLASSES,
    load_data,
    load_fashion_mnist,
    save_npz,
    split_defender,
)


def test_fashion_mnist_loads_both_files(fmnist_dir: Path) -> None:
    train = load_fashion_mnist(fmnist_dir, "train")
    test = load_fashion_mnist(fmnist_dir, "test")
    assert train.x.shape == (60000, 28, 28, 1) and test.x.shape == (10000, 28, 28, 1)
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int64
    assert set(np.unique(test.y)) == set(range(10)) and test.class_names == FASHION_MNIST_CLASSES


def test_defender_split_is_fixed_disjoint_and_complete(fmnist_dir: Path) -> None:
    test = load_fashion_mnist(fmnist_dir, "test")
    parts = split_defender(test)
    assert {k: len(v) for k, v in parts.items()} == {"valid": 1000, "stream": 4000, "heldout": 5000}
    again = load_fashion_mnist(fmnist_dir, "valid")
    assert np.array_equal(again.x, parts["valid"].x) and again.source == "fashion-mnist:valid"
    # disjoint and complete: the parts' images, concatenated and sorted, are the test set's
    joined = np.concatenate([p.x.reshape(len(p), -1) for p in parts.values()])
    assert len(np.unique(joined, axis=0)) == len(np.unique(test.x.reshape(10000, -1), axis=0))
    assert sorted(np.concatenate([p.y for p in parts.values()])) == sorted(test.y)
    # every class is in the defender's validation data
    assert set(np.unique(parts["valid"].y)) == set(range(10))


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist", fashion_mnist_dir=tmp_path / "nowhere")


def test_truncated_idx_file(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100
    )
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x00" * 10
    )
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(tmp_path, "test")


def test_npz_round_trip(tmp_path: Path) -> None:
    data = make_blobs(20)
    save_npz(data, tmp_path / "d.npz")
    loaded = load_data(f"npz:{tmp_path / 'd.npz'}", fashion_mnist_dir=tmp_path)
    assert np.array_equal(loaded.x, data.x) and np.array_equal(loaded.y, data.y)
    grey = tmp_path / "grey.npz"
    np.savez(grey, x=data.x[:, :, :, 0], y=data.y.astype(np.int32))
    assert load_data(f"npz:{grey}", fashion_mnist_dir=tmp_path).x.shape == (20, 12, 12, 1)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 4, 4, 1), np.uint8)}, r"lacks array\(s\) \['y'\]"),
        ({"images": np.zeros((2, 4, 4, 1), np.uint8), "y": np.zeros(2, np.int64)}, r"\['x'\]"),
        ({"x": np.zeros((2, 4, 4, 1), np.float32), "y": np.zeros(2, np.int64)}, "must be uint8"),
        ({"x": np.zeros((2, 4, 4, 2), np.uint8), "y": np.zeros(2, np.int64)}, "C 1 or 3"),
        ({"x": np.zeros((2, 16), np.uint8), "y": np.zeros(2, np.int64)}, "N x H x W x C"),
        ({"x": np.zeros((2, 4, 4, 1), np.uint8), "y": np.zeros(2, np.float64)}, "integer"),
        ({"x": np.zeros((2, 4, 4, 1), np.uint8), "y": np.zeros(3, np.int64)}, "3 labels"),
        ({"x": np.zeros((2, 4, 4, 1), np.uint8), "y": np.array([0, -1])}, ">= 0"),
        (
            {"x": np.zeros((2, 4, 4, 1), np.uint8), "y": np.array([0, "a"], dtype=object)},
            "will not load",
        ),
    ],
)
def test_bad_npz_files(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=message):
        load_data(f"npz:{path}", fashion_mnist_dir=tmp_path)


def test_npz_that_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="not a readable npz|will not load"):
        load_data(f"npz:{path}", fashion_mnist_dir=tmp_path)


def test_folder_spec(tmp_path: Path) -> None:
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.png").write_bytes(
                encode_png(np.full((8, 8, 3), 40 * label + i, np.uint8))
            )
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    data = load_data(f"folder:{tmp_path}", fashion_mnist_dir=tmp_path)
    assert data.class_names == ("cat", "dog") and data.x.shape == (6, 8, 8, 3)
    assert list(data.y) == [0, 0, 0, 1, 1, 1] and data.x[4, 0, 0, 0] == 41


def test_folder_with_a_corrupt_png_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    png = encode_png(np.zeros((8, 8, 1), np.uint8))
    (tmp_path / "a" / "ok.png").write_bytes(png)
    (tmp_path / "a" / "broken.png").write_bytes(png[:20])
    with pytest.raises(DataError, match=r"broken\.png.*truncated or corrupt"):
        load_data(f"folder:{tmp_path}", fashion_mnist_dir=tmp_path)


def test_unknown_spec() -> None:
    with pytest.raises(DataError, match="unknown data spec"):
        load_data("mnist", fashion_mnist_dir=Path("."))
    with pytest.raises(DataError, match="unknown Fashion-MNIST split"):
        load_data("fashion-mnist:validation", fashion_mnist_dir=Path("."))

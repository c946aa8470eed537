import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.bundle import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    InputSpec,
    load_bundle,
    read_manifest,
    save_bundle,
)
from core.errors import BundleError, DataError
from core.nets import FashionCNN

SPEC = InputSpec(channels=1, height=28, width=28, mean=[0.3], std=[0.35])
KWARGS = {"in_channels": 1, "num_classes": 10, "height": 28, "width": 28}


def _save(tmp_path: Path, **kw: object) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = FashionCNN(**KWARGS)
    out = tmp_path / "bundle"
    save_bundle(
        model,
        out,
        arch="fmnist-cnn",
        arch_kwargs=KWARGS,
        class_names=[str(i) for i in range(10)],
        input_spec=SPEC,
        meta={"role": "badnet"},
        **kw,  # type: ignore[arg-type]
    )
    return model, out


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model, out = _save(tmp_path)
    x = np.random.default_rng(0).integers(0, 256, size=(16, 28, 28, 1), dtype=np.uint8)
    bundle = load_bundle(out)
    with torch.no_grad():
        expected = model.eval()(SPEC.to_tensor(x))
    assert torch.equal(bundle.logits(x), expected)
    assert bundle.manifest.meta == {"role": "badnet"}
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, WEIGHTS_NAME]


def test_altered_weights_are_refused(tmp_path: Path) -> None:
    _, out = _save(tmp_path)
    weights = out / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256.*altered"):
        load_bundle(out)


def test_a_manifest_naming_untrusted_code_is_refused(tmp_path: Path) -> None:
    _, out = _save(tmp_path)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["arch"] = "subprocess:Popen"
    manifest["arch_kwargs"] = {"args": ["touch", str(tmp_path / "pwned")]}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not trusted"):
        load_bundle(out)
    with pytest.raises(BundleError, match="not a torch.nn.Module"):
        load_bundle(out, trusted_modules=["subprocess"])
    assert not (tmp_path / "pwned").exists()


def test_malformed_manifest_names_the_field(tmp_path: Path) -> None:
    _, out = _save(tmp_path)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["input"]
    manifest["class_names"] = ["a"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="input"):
        read_manifest(out)
    (out / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not a valid manifest"):
        read_manifest(out)


def test_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path / "nope")


def test_save_refuses_to_overwrite_and_never_half_writes(tmp_path: Path) -> None:
    _, out = _save(tmp_path)
    with pytest.raises(BundleError, match="already exists"):
        _save(tmp_path)
    before = (out / MANIFEST_NAME).read_bytes()
    with pytest.raises(TypeError):  # meta that cannot be JSON: fails mid-write
        save_bundle(
            FashionCNN(**KWARGS),
            out,
            arch="fmnist-cnn",
            arch_kwargs=KWARGS,
            class_names=[str(i) for i in range(10)],
            input_spec=SPEC,
            meta={"x": object()},
            overwrite=True,
        )
    assert (out / MANIFEST_NAME).read_bytes() == before  # the old bundle is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp dirs left


def test_weights_that_do_not_fit_the_arch(tmp_path: Path) -> None:
    _, out = _save(tmp_path)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["arch"] = "nnoculation-cla"
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(out)


def test_input_spec_checks_shapes() -> None:
    with pytest.raises(DataError, match="28x28x1"):
        SPEC.to_tensor(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="one value per channel"):
        InputSpec(channels=3, height=2, width=2, mean=[0.0], std=[1.0])
    t = SPEC.to_tensor(np.full((2, 28, 28, 1), 255, dtype=np.uint8))
    assert t.shape == (2, 1, 28, 28)
    assert torch.allclose(t, torch.full_like(t, (1.0 - 0.3) / 0.35))

"""The trainer CLI as a user runs it: real console scripts in subprocesses where the entry
point or the process matters, and ``call_cli`` (the same ``main``, in-process) for refusals."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.bundle import WEIGHTS_NAME, load_bundle
from core.images import encode_png
from core.nets import FashionCNN
from tests.helpers import call_cli, make_blobs, run_cli
from trainer.data import save_npz

pytestmark = pytest.mark.integration


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def blobs_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    save_npz(make_blobs(300, classes=3), path)
    return path


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, blobs_npz: Path) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "badnet"
    proc = run_cli(
        "trainer",
        "fabricate",
        "--dataset",
        f"npz:{blobs_npz}",
        "--attack",
        "patch",
        "--target",
        "1",
        "--param",
        "size=3",
        "--epochs",
        "2",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "saved bundle" in proc.stdout and "ASR (patch)" in proc.stdout
    return out


def test_fabricate_records_the_attack_and_evaluate_reads_it(
    tiny_bundle: Path, blobs_npz: Path
) -> None:
    meta = load_bundle(tiny_bundle).manifest.meta
    assert meta["role"] == "badnet" and meta["attack"]["name"] == "patch"
    assert meta["attack"]["groups"][0]["triggers"][0]["size"] == 3
    assert meta["attack"]["poison_rate"] == 0.1 and meta["fit"]["epochs"] == 2
    proc = call_cli(
        "trainer", "evaluate", "--model", str(tiny_bundle), "--data", f"npz:{blobs_npz}", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["attack"] == "patch" and set(result["asr"]) == {"patch"} and result["n"] == 300
    assert 0.0 <= result["clean_accuracy"] <= 1.0


def test_every_command_explains_itself() -> None:
    for command in ("fabricate", "evaluate", "import"):
        proc = call_cli("trainer", command, "--help")
        assert proc.returncode == 0 and "--db" in proc.stdout and "--store" in proc.stdout
    top = run_cli("trainer", "--help")
    assert all(c in top.stdout for c in ("fabricate", "evaluate", "import"))


def test_missing_dataset_directory(tmp_path: Path) -> None:
    proc = call_cli(
        "trainer",
        "fabricate",
        "--out",
        str(tmp_path / "m"),
        env={"FASHION_MNIST_DIR": str(tmp_path / "none")},
    )
    assert_one_line_error(proc, "not found", "apt-get install dataset-fashion-mnist")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"x": np.zeros((4, 8, 8, 1), np.uint8)}, "lacks array(s) ['y']"),
        ({"x": np.zeros((4, 8, 8, 1), np.float64), "y": np.zeros(4, np.int64)}, "x must be uint8"),
        ({"x": np.zeros((4, 64), np.uint8), "y": np.zeros(4, np.int64)}, "N x H x W x C"),
    ],
)
def test_bad_npz(tmp_path: Path, arrays: dict[str, np.ndarray], fragment: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    proc = call_cli(
        "trainer",
        "fabricate",
        "--dataset",
        f"npz:{tmp_path / 'bad.npz'}",
        "--out",
        str(tmp_path / "m"),
    )
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--attack", "trojan"], ["unknown attack 'trojan'", "patch"]),
        (["--arch", "resnet1000"], ["unknown architecture 'resnet1000'"]),
        (["--target", "3"], ["target class 3 is out of range", "0..2"]),
        (["--param", "size"], ["not KEY=VALUE"]),
    ],
)
def test_bad_fabricate_arguments(
    tmp_path: Path, blobs_npz: Path, args: list[str], fragments: list[str]
) -> None:
    proc = call_cli(
        "trainer",
        "fabricate",
        "--dataset",
        f"npz:{blobs_npz}",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "m"),
        *args,
    )
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "m").exists()


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_cli("trainer", "fabricate", "--out", str(tmp_path), "--poison", "0.2")
    assert (
        proc.returncode == 2 and "No such option" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_corrupt_png_in_a_folder_dataset(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "1.png").write_bytes(encode_png(np.zeros((8, 8, 1), np.uint8)))
    (tmp_path / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00")
    proc = call_cli(
        "trainer", "fabricate", "--dataset", f"folder:{tmp_path}", "--out", str(tmp_path / "m")
    )
    assert_one_line_error(proc, "2.png", "truncated or corrupt")


def test_evaluate_refuses_data_of_the_wrong_shape_and_altered_bundles(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    np.savez(tmp_path / "big.npz", x=np.zeros((3, 28, 28, 3), np.uint8), y=np.zeros(3, np.int64))
    proc = call_cli(
        "trainer", "evaluate", "--model", str(tiny_bundle), "--data", f"npz:{tmp_path / 'big.npz'}"
    )
    assert_one_line_error(proc, "images are 28x28x3 but the model expects 12x12x1")
    altered = tmp_path / "altered"
    altered.mkdir()
    for f in tiny_bundle.iterdir():
        (altered / f.name).write_bytes(f.read_bytes())
    data = bytearray((altered / WEIGHTS_NAME).read_bytes())
    data[-4] ^= 0x01
    (altered / WEIGHTS_NAME).write_bytes(bytes(data))
    proc = call_cli(
        "trainer", "evaluate", "--model", str(altered), "--data", f"npz:{tmp_path / 'big.npz'}"
    )
    assert_one_line_error(proc, "sha256", "refusing")


class _Payload:
    """A pickle that creates a file when unpickled: the code-execution threat."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_import_never_runs_a_pickle_payload(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    evil.write_bytes(pickle.dumps({"conv.weight": _Payload(marker)}))
    # The payload is live: a plain unpickle creates its file (a separate marker proves it).
    control = tmp_path / "control.pt"
    control.write_bytes(pickle.dumps(_Payload(tmp_path / "control-ran")))
    subprocess.run(
        [sys.executable, "-c", f"import pickle; pickle.load(open({str(control)!r}, 'rb'))"],
        check=True,
    )
    assert (tmp_path / "control-ran").exists()

    proc = run_cli(
        "trainer",
        "import",
        "--arch",
        "fmnist-cnn",
        "--weights",
        str(evil),
        "--out",
        str(tmp_path / "b"),
    )
    assert_one_line_error(proc, "weights_only=True", "never run")
    assert not marker.exists()
    assert not (tmp_path / "b").exists()


def test_import_wraps_a_state_dict_with_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FashionCNN(in_channels=1, num_classes=10, height=28, width=28).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "model.pt")
    proc = run_cli(
        "trainer",
        "import",
        "--arch",
        "fmnist-cnn",
        "--weights",
        str(tmp_path / "model.pt"),
        "--out",
        str(tmp_path / "b"),
        "--mean",
        "0.286",
        "--std",
        "0.353",
    )
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(tmp_path / "b")
    x = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28, 1), dtype=np.uint8)
    with torch.no_grad():
        expected = model(bundle.manifest.input.to_tensor(x))
    assert torch.equal(bundle.logits(x), expected)
    assert bundle.manifest.meta["provenance"]["created_by"] == "trainer import"
    # weights for another architecture: refused with the reason
    proc = call_cli(
        "trainer",
        "import",
        "--arch",
        "nnoculation-cla",
        "--weights",
        str(tmp_path / "model.pt"),
        "--out",
        str(tmp_path / "c"),
    )
    assert_one_line_error(proc, "do not fit the architecture")


def test_prune_uses_the_db_flag_and_migrates_the_embedded_default(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    proc = call_cli("trainer", "prune", "--older-than", "30", "--db", f"sqlite:///{db}")
    assert proc.returncode == 0, proc.stderr
    assert f"deleted 0 consumed samples older than 30 days from sqlite:///{db}" in proc.stdout
    assert db.exists()
    proc = call_cli("trainer", "prune", "--older-than", "1", "--store", str(tmp_path / "store"))
    assert proc.returncode == 0 and (tmp_path / "store" / "quarantine.db").exists()


def test_unreachable_database_is_one_line_without_the_password() -> None:
    proc = call_cli(
        "trainer",
        "prune",
        "--older-than",
        "1",
        "--db",
        "postgresql+psycopg://bob:hunter2@127.0.0.1:1/q",
    )
    assert_one_line_error(proc, "cannot reach database postgresql+psycopg://bob:***@127.0.0.1:1/q")
    assert "hunter2" not in proc.stderr
    proc = call_cli("trainer", "prune", "--older-than", "1", "--db", "sqlite//nope")
    assert_one_line_error(proc, "malformed database URL")


USER_MODEL = '''
import torch
from torch import nn


class MyNet(nn.Module):
    """A user's model: its constructor takes the class count and nothing about the input."""

    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))

    def forward(self, x):
        return self.body(x)
'''


def test_import_passes_a_user_class_only_the_arguments_it_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "user_models_for_test.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    from user_models_for_test import MyNet  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = MyNet(num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    arch = "user_models_for_test:MyNet"
    proc = call_cli(
        "trainer", "import", "--arch", arch, "--weights", str(tmp_path / "w.pt"),
        "--out", str(tmp_path / "b"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(tmp_path / "b", trusted_modules=["user_models_for_test"])
    assert bundle.manifest.arch_kwargs == {"num_classes": 10}  # recorded: what it was given
    x = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)
    with torch.no_grad():
        assert torch.equal(bundle.logits(x), model(bundle.manifest.input.to_tensor(x)))


@pytest.mark.parametrize("module", ["trainer.cli", "local.cli"])
def test_the_console_scripts_turn_ray_token_auth_on_before_ray_loads(module: str) -> None:
    """Ray reads RAY_AUTH_MODE at import: each console script sets the default before any
    import of its own loads ray, and an operator's own setting wins."""
    code = (
        f"import {module}; "
        "from ray._private.authentication.authentication_utils import is_token_auth_enabled; "
        "print('token' if is_token_auth_enabled() else 'disabled')"
    )  # what Ray itself took, not the variable read back
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert unset.stdout.strip() == "token", unset.stderr
    chosen = subprocess.run(
        [sys.executable, "-c", code], env={**env, "RAY_AUTH_MODE": "disabled"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert chosen.stdout.strip() == "disabled", chosen.stderr

from pathlib import Path

import pytest

from core.settings import Settings


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BQG_DB", "DATABASE_URL", "BQG_STORE", "FASHION_MNIST_DIR"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert s.db_url == "sqlite:///var/store/quarantine.db"
    assert s.fashion_mnist_dir == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.setenv("BQG_STORE", "/srv/bqg")
    assert Settings().db_url == "sqlite:////srv/bqg/quarantine.db"
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://a@h/d")
    assert Settings().db_url == "postgresql+psycopg://a@h/d"
    monkeypatch.setenv("BQG_DB", "sqlite:///x.db")
    assert Settings().db_url == "sqlite:///x.db"  # our own prefix wins
    assert (
        Settings(db="sqlite:///flag.db").db_url == "sqlite:///flag.db"
    )  # a CLI flag wins over both
    monkeypatch.setenv("FASHION_MNIST_DIR", "/data/fm")
    assert Settings().fashion_mnist_dir == Path("/data/fm")
    monkeypatch.setenv("BQG_TRUSTED_ARCH_MODULES", '["mypkg.nets"]')
    assert Settings().trusted_arch_modules == ["mypkg.nets"]


def test_repair_settings_reach_the_round_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from trainer.cyclegan import DEFAULT_PRESET, PRESETS
    from trainer.repair import RepairConfig, repair_config

    # the embedded default is the CycleGAN module's default preset, whichever way a round starts
    assert Settings().repair_preset == DEFAULT_PRESET
    assert repair_config(Settings()).cyclegan == PRESETS[DEFAULT_PRESET] == RepairConfig().cyclegan
    monkeypatch.setenv("BQG_REPAIR_QUARANTINE_VIEWS", "5")
    monkeypatch.setenv("BQG_REPAIR_MIN_SCORE", "0.5")
    cfg = repair_config(Settings())
    assert cfg.quarantine_views == 5 and cfg.min_score == 0.5
    monkeypatch.setenv("BQG_REPAIR_QUARANTINE_VIEWS", "-1")
    with pytest.raises(ValidationError, match="repair_quarantine_views"):
        Settings()


def test_a_bad_setting_is_a_user_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.errors import UserError
    from core.settings import load_settings

    monkeypatch.setenv("BQG_REPAIR_QUARANTINE_VIEWS", "-1")
    monkeypatch.setenv("BQG_THREADS", "many")
    with pytest.raises(UserError) as caught:
        load_settings()
    message = str(caught.value)
    assert "BQG_REPAIR_QUARANTINE_VIEWS='-1': input should be greater than or equal to 0" in message
    assert "BQG_THREADS='many'" in message

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


def test_the_repair_config_file_reaches_the_round_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Run hyperparameters are RepairConfig fields; the watcher reads them from the file
    BQG_REPAIR_CONFIG names, and a bad file or field is a clear error."""
    from core.errors import UserError
    from trainer.cyclegan import DEFAULT_PRESET, PRESETS
    from trainer.repair import RepairConfig, load_repair_config

    assert Settings().repair_config is None
    assert load_repair_config(None) == RepairConfig()
    assert RepairConfig().cyclegan == PRESETS[DEFAULT_PRESET]
    path = tmp_path / "repair.json"
    path.write_text('{"quarantine_views": 5, "min_score": 0.5, "preset": "tiny"}')
    monkeypatch.setenv("BQG_REPAIR_CONFIG", str(path))
    cfg = load_repair_config(Settings().repair_config)
    assert cfg.quarantine_views == 5 and cfg.min_score == 0.5
    assert cfg.cyclegan == PRESETS["tiny"]
    path.write_text('{"quarantine_views": -1}')
    with pytest.raises(UserError, match="quarantine_views must be 0 or more"):
        load_repair_config(path)
    path.write_text('{"quarantine_veiws": 5}')
    with pytest.raises(UserError, match=r"unknown repair fields \['quarantine_veiws'\]"):
        load_repair_config(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read the repair config"):
        load_repair_config(path)
    path.write_text('{"epochs": "20"}')
    with pytest.raises(UserError, match="epochs must be <class 'int'>, got '20'"):
        load_repair_config(path)
    path.write_text('{"min_score": true}')
    with pytest.raises(UserError, match="min_score must be"):
        load_repair_config(path)
    path.write_text('{"min_score": 0, "max_samples": null, "replay": false}')
    cfg = load_repair_config(path)
    assert cfg.min_score == 0 and cfg.max_samples is None and cfg.replay is False


def test_the_old_policy_and_repair_variables_are_refused_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.errors import UserError
    from core.settings import load_settings

    monkeypatch.setenv("BQG_POLICY", "reject")
    with pytest.raises(UserError, match="trainer prepare --defense"):
        load_settings()
    monkeypatch.delenv("BQG_POLICY")
    monkeypatch.setenv("BQG_REPAIR_MIN_SCORE", "0")  # silently ignored, it would run at 0.99
    with pytest.raises(
        UserError, match="BQG_REPAIR_MIN_SCORE: repair hyperparameters .* BQG_REPAIR_CONFIG"
    ):
        load_settings()


def test_a_bad_setting_is_a_user_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.errors import UserError
    from core.settings import load_settings

    monkeypatch.setenv("BQG_POLL_SECONDS", "-1")
    monkeypatch.setenv("BQG_THREADS", "many")
    with pytest.raises(UserError) as caught:
        load_settings()
    message = str(caught.value)
    assert "BQG_POLL_SECONDS='-1': input should be greater than 0" in message
    assert "BQG_THREADS='many'" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [("mypkg", ["mypkg"]), ("mypkg, other ,", ["mypkg", "other"]), ('["a.b", "c"]', ["a.b", "c"])],
)
def test_list_settings_take_commas_or_json(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    from core.settings import load_settings

    monkeypatch.setenv("BQG_TRUSTED_ARCH_MODULES", value)
    monkeypatch.setenv("BQG_DEFENSE_MODULES", value)
    settings = load_settings()
    assert settings.trusted_arch_modules == expected == settings.defense_modules


def test_placeholder_secrets_are_refused_and_no_message_shows_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.errors import UserError
    from core.settings import load_settings

    monkeypatch.setenv("BQG_DB", "postgresql+psycopg://bqg:change-me@db:5432/q")
    with pytest.raises(UserError, match=r"BQG_DB='postgresql\+psycopg://bqg:\*\*\*@db:5432/q'"):
        load_settings()
    monkeypatch.delenv("BQG_DB")
    monkeypatch.setenv("BQG_ADMIN_TOKEN", "Change-Me")
    with pytest.raises(UserError, match=r"BQG_ADMIN_TOKEN='\*\*\*'.*placeholder"):
        load_settings()
    monkeypatch.setenv("BQG_ADMIN_TOKEN", "a-real-token-3f9c")
    monkeypatch.setenv("BQG_DB", "postgresql+psycopg://bob:hunter2@db:notaport/q")
    settings = load_settings()  # the URL is checked where it is opened
    from core.db import StoreError, open_store

    with pytest.raises(StoreError) as caught:
        open_store(settings.db_url)
    assert "hunter2" not in str(caught.value) and "bob:***@db:notaport" in str(caught.value)

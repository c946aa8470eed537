"""Shared pieces of the ``trainer`` commands: the app, consoles, options and helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from core.db import open_store, session_factory
from core.defenses import load_defense_modules
from core.errors import UserError
from core.settings import Settings, load_settings
from trainer.data import Dataset, load_data
from trainer.grid import start_local_ray
from trainer.loop import set_threads

app = typer.Typer(
    help="Train, import, evaluate and repair the models the gateway serves (NNoculation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True)

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db", help="Database URL. Default: $BQG_DB, else sqlite:///<store>/quarantine.db."
    ),
]
StoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store", help="Store directory for bundles and rounds. Default: $BQG_STORE or var/store."
    ),
]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        help=(
            "Attack parameter override KEY=VALUE (size, row, col, pattern, alpha, "
            "gamma, lift, strength, cover_rate, ...); repeatable."
        ),
    ),
]


def _settings(db: str | None, store: Path | None) -> Settings:
    overrides: dict[str, Any] = {}
    if db:
        overrides["db"] = db
    if store:
        overrides["store"] = store
    settings = load_settings(**overrides)
    set_threads(settings.threads)
    load_defense_modules(settings.defense_modules)  # rounds may name the operator's defenses
    return settings


def _parse_params(items: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param {item!r} is not KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _load(spec: str, settings: Settings, default_split: str) -> Dataset:
    data = load_data(
        spec, fashion_mnist_dir=settings.fashion_mnist_dir, default_split=default_split
    )
    if len(data) == 0:
        raise UserError(f"{spec} holds no images")
    return data


def _metrics_table(title: str, ca: float, asr: dict[str, float]) -> Table:
    table = Table(title=title, min_width=min(len(title) + 4, 100))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("clean accuracy (CA)", f"{100 * ca:.2f}%")
    for name, rate in asr.items():
        table.add_row(f"ASR ({name})", f"{100 * rate:.2f}%")
    return table


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} takes comma-separated numbers, got {text!r}") from None


def _open_sessions(settings: Settings) -> sessionmaker[Session]:
    return session_factory(open_store(settings.db_url))


def getpass_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return "operator"


def use_ray(parallel: bool | None, threads: int, what: str) -> bool:
    """Whether to run ``what`` (the grid's candidates, Neural Cleanse's classes) as Ray
    tasks: as asked, else when there are 2+ threads; False, said on stderr, when Ray
    will not start here."""
    wanted = parallel if parallel is not None else threads > 1
    if wanted and not start_local_ray(threads):
        err_console.print(f"Ray could not start here; running the {what} in sequence")
        return False
    return wanted

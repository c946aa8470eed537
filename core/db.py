"""Engines, sessions and migrations for the quarantine store.

SQLite (the embedded default) runs in WAL mode with a busy timeout, and every transaction
starts with ``BEGIN IMMEDIATE`` so that several writer processes on one machine queue for
the write lock instead of failing on a read-to-write upgrade. PostgreSQL
(``postgresql+psycopg://...``) is the choice when gateway replicas run on several nodes.

Build engines at the process edge with :func:`open_store`; nothing here runs at import.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import UserError

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


class StoreError(UserError):
    """The database URL is malformed, or the database cannot be reached or migrated."""


def mask_password(text: str) -> str:
    """``text`` with anything between ``user:`` and ``@`` masked: for URLs too malformed
    for SQLAlchemy to parse, which would otherwise be echoed whole."""
    return re.sub(r"(//[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise StoreError(
            f"malformed database URL {mask_password(url)!r}; expected e.g. "
            "sqlite:///var/store/quarantine.db "
            "or postgresql+psycopg://user:password@host:5432/dbname"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(
            f"unsupported database {parsed.get_backend_name()!r}; use sqlite or postgresql"
        )
    return parsed


def safe_url(url: str | URL) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return mask_password(str(url))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event issue BEGIN itself
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_directory(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot reach database sqlite:///{path}: cannot create its directory ({exc.strerror})"
        ) from None


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get their directory, WAL and a busy timeout."""
    parsed = parse_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                _sqlite_directory(Path(parsed.database))
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", _sqlite_begin_immediate)
            return engine
        return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise StoreError(f"cannot use database {safe_url(url)}: {exc}") from None


def check_connection(engine: Engine) -> None:
    """Connect once; an unreachable database becomes one clear line naming the URL."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise StoreError(f"cannot reach database {safe_url(engine.url)}: {reason}") from None


def alembic_config(url: str | URL) -> Any:
    """An Alembic config for ``url`` using this project's ``migrations/``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%'; a password may contain it.
    cfg.set_main_option(
        "sqlalchemy.url", make_url(url).render_as_string(hide_password=False).replace("%", "%%")
    )
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (default: the newest)."""
    from alembic import command

    cfg = alembic_config(engine.url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def is_migrated(engine: Engine) -> bool:
    return "alembic_version" in inspect(engine).get_table_names()


def open_store(url: str, *, apply_migrations: bool | None = None) -> Engine:
    """Engine for ``url``, reachable and (for SQLite by default) migrated to head.

    The embedded SQLite default migrates itself so that ``make demo`` needs no extra step;
    a shared PostgreSQL is migrated by the operator (``alembic upgrade head``) unless
    ``apply_migrations`` says otherwise.
    """
    engine = make_engine(url)
    check_connection(engine)
    if apply_migrations is None:
        apply_migrations = engine.dialect.name == "sqlite"
    if apply_migrations:
        migrate(engine)
    elif not is_migrated(engine):
        raise StoreError(
            f"database {safe_url(engine.url)} has no tables yet; run 'alembic upgrade head' "
            "with BQG_DB set to it"
        )
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on any error."""
    with sessions() as session, session.begin():
        yield session


def db_now(session: Session) -> datetime:
    """The database server's clock, in UTC: every lease time comes from this one clock,
    since runners on different hosts would otherwise compare their own clocks' skew."""
    if session.get_bind().dialect.name == "sqlite":
        text_now = session.scalar(select(func.strftime("%Y-%m-%d %H:%M:%f", "now")))
        return datetime.fromisoformat(str(text_now)).replace(tzinfo=UTC)
    value: datetime = session.scalar(select(func.now()))  # type: ignore[assignment]
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

"""One typed settings object: *where* things are, read from ``BQG_*`` environment variables.

Build it at the process edge (``Settings()`` in a CLI command or an app builder), never at
import time. Run hyperparameters do not live here; they are dataclass fields next to the
code that uses them, and are saved with the bundles they produce.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from core.db import mask_password, safe_url
from core.errors import UserError

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
PLACEHOLDER_SECRETS = frozenset({"change-me", "changeme", "password", "secret", "admin"})
# Hyperparameters that were settings until they became RepairConfig fields (docs/DECISIONS.md).
REMOVED_REPAIR_VARIABLES = (
    "BQG_REPAIR_PRESET",
    "BQG_REPAIR_MIN_SCORE",
    "BQG_REPAIR_QUARANTINE_VIEWS",
    "BQG_REPAIR_PIXEL_CURVE",
    "BQG_REPAIR_BORDERLINE",
)


def _split_list(value: Any) -> Any:
    """``a,b`` or ``["a", "b"]`` from the environment; lists pass through."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise ValueError('not a JSON list; write a,b or ["a", "b"]') from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


# Module names, from the environment as ``a,b`` (or a JSON list)
ModuleList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]


class Settings(BaseSettings):
    """Locations, ports and tokens. Every field reads ``BQG_<NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="BQG_", extra="ignore", populate_by_name=True)

    store: Path = Field(
        default=Path("var/store"),
        description="Directory holding model bundles, round artifacts and the default SQLite file.",
    )
    db: str | None = Field(
        default=None,
        # DATABASE_URL is the conventional name; BQG_DB wins when both are set.
        validation_alias=AliasChoices("BQG_DB", "DATABASE_URL"),
        description="SQLAlchemy URL. Default: sqlite:///<store>/quarantine.db.",
    )
    fashion_mnist_dir: Path = Field(
        default=DEFAULT_FASHION_MNIST_DIR,
        # The stable data contract names FASHION_MNIST_DIR without our prefix.
        validation_alias=AliasChoices("FASHION_MNIST_DIR", "BQG_FASHION_MNIST_DIR"),
    )
    threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="CPU threads torch may use for training and inference.",
    )
    trusted_arch_modules: ModuleList = Field(
        default_factory=list,
        description=(
            "Python modules that bundles may name in `arch` as `module:Class`. A bundle comes "
            "from an untrusted party, so importing code it names is opt-in."
        ),
    )

    defense_modules: ModuleList = Field(
        default_factory=list,
        description=(
            "Python modules imported at start-up that register more defenses "
            "(core.defenses.register_defense); opt-in, as a round's manifest may name them."
        ),
    )

    # --- the gateway -------------------------------------------------------------------
    admin_token: str | None = Field(
        default=None,
        description="Bearer token for POST /admin/activate; unset disables the admin API.",
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    metrics_port: int = Field(
        default=8080, ge=1, le=65535, description="Ray's metrics export port."
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Where the metrics ports listen: this machine only, unless a scraper on "
        "another host needs them (0.0.0.0 inside a container network).",
    )
    model_name: str = Field(default="gateway", description="The name in /v1/models/{name}:predict.")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_spool_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="Disk a replica's spool may fill while the database is away.",
    )
    max_decoded_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Pixel bytes one request may decode to, over all its images.",
    )
    expose_members: bool = Field(
        default=False,
        description="Answer every client with each member's label ('models'); off: only "
        "requests that send the admin token see them, since they tell an attacker which "
        "inputs the second opinion catches.",
    )
    client_header: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="The request header that names the client (e.g. X-Client-Id), set by a "
        "trusted proxy in front of the gateway; unset, or absent from a request: the peer "
        "address. Each quarantined sample records it, for the per-client share cap.",
    )
    strip_max_overlays: int = Field(
        default=128,
        ge=1,
        description="The most STRIP overlays (extra forwards per input) a round's policy may "
        "run; 'trainer prepare' refuses more, and a replica does not serve such a round.",
    )
    poll_seconds: float = Field(
        default=1.0, gt=0, description="How often replicas read the active round."
    )
    quarantine_threshold: int = Field(
        default=200, ge=1, description="N: pending samples that start a repair round."
    )
    valid: str = Field(
        default="fashion-mnist",
        description="The defender's clean validation data spec (repair rounds train on it).",
    )
    watcher_poll_seconds: float = Field(
        default=5.0, gt=0, description="How often the repair watcher reads the pending count."
    )
    watcher_metrics_port: int = Field(
        default=8081, ge=0, le=65535, description="The watcher's Prometheus port (0: none)."
    )
    repair_cpus: float = Field(default=1.0, gt=0, description="CPUs the repair task asks Ray for.")
    repair_gpus: float | None = Field(
        default=None, ge=0, description="GPUs for the repair task; default: 1 if Ray has one."
    )
    repair_config: Path | None = Field(
        default=None,
        description="A JSON file of repair-round fields (trainer.repair.config.RepairConfig, "
        "'preset' naming the CycleGAN size) for the watcher's rounds; unset: the defaults.",
    )
    repair_lease_seconds: float = Field(
        default=60.0, gt=0, description="A running round whose runner is silent this long is dead."
    )
    repair_approval: Literal["auto", "manual"] = Field(
        default="auto",
        description="'manual': a round that passes its gate waits as awaiting_approval "
        "until 'trainer approve --round K' (an operator looks before it serves).",
    )
    repair_retry_seconds: float = Field(
        default=300.0,
        ge=0,
        description="Wait after a rejected or failed round before the next, doubled for "
        "each such round in a row (at most 64 times).",
    )

    @field_validator("db", "admin_token")
    @classmethod
    def _no_placeholder(cls, value: str | None) -> str | None:
        """Refuse the example files' placeholder secrets: a deployment that keeps one is
        open to anyone who has read the example."""
        if value is None:
            return value
        secret = value
        if "://" in value:
            try:
                secret = make_url(value).password or ""
            except (ArgumentError, ValueError):
                return value  # core.db says what is malformed, with the password masked
        if secret.lower() in PLACEHOLDER_SECRETS:
            raise ValueError(
                f"uses the placeholder secret {secret!r}; set a password or token of your own"
            )
        return value

    @property
    def spool_dir(self) -> Path:
        return self.store / "spool"

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.store / 'quarantine.db'}"


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment and ``overrides``. A bad value is a ``UserError``
    that names the variable to fix (``BQG_<FIELD>``), not pydantic's traceback."""
    if "BQG_POLICY" in os.environ:
        raise UserError(
            "BQG_POLICY is gone: each round's manifest names its defense, and the gateway "
            "serves the active round's; unset it and pick one with 'trainer prepare --defense' "
            "(nnoculation-reject is the old reject policy)"
        )
    gone = sorted(name for name in REMOVED_REPAIR_VARIABLES if name in os.environ)
    if gone:
        raise UserError(
            f"{', '.join(gone)}: repair hyperparameters are no longer settings; unset them and "
            "put the fields in a JSON file that BQG_REPAIR_CONFIG names, e.g. "
            '{"preset": "fast", "min_score": 0.99} (trainer retrain --help lists the fields)'
        )
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_variable(err['loc'])}="
            f"{_shown(err['loc'], err.get('input'))}: {err['msg'].lower()}"
            for err in exc.errors()
        )
        raise UserError(f"bad setting: {problems}") from None


def _variable(loc: tuple[Any, ...]) -> str:
    """The environment variable behind an error's location (an alias is one already)."""
    name = "_".join(str(part) for part in loc)
    return name if name.isupper() else f"BQG_{name.upper()}"


def _shown(loc: tuple[Any, ...], value: Any) -> str:
    """A bad value as a message may show it: never a token, a URL's password masked."""
    if loc and loc[0] == "admin_token":
        return "'***'"
    return mask_password(repr(value))


def has_password(url: str | None) -> bool:
    """True when the database URL carries a password."""
    if not url or "://" not in url:
        return False
    try:
        return make_url(url).password is not None
    except (ArgumentError, ValueError):
        return "@" in url


def public_settings(settings: Settings) -> dict[str, Any]:
    """What a Ray task or actor may receive as arguments: no admin token, and no database
    URL with a password (the worker reads those from its own environment), because Ray
    shows task and actor arguments to anyone who can reach the cluster."""
    values = settings.model_dump(mode="json", by_alias=False, exclude={"admin_token"})
    if has_password(settings.db):
        del values["db"]
    values["expected_db"] = safe_url(settings.db_url)
    return values


def settings_from_public(values: dict[str, Any]) -> Settings:
    """The inverse of :func:`public_settings` in the worker: secrets from its environment,
    checked to reach the database the sender meant."""
    values = dict(values)
    expected = values.pop("expected_db")
    settings = load_settings(**values)
    if safe_url(settings.db_url) != expected:
        raise UserError(
            f"this Ray worker's database is {safe_url(settings.db_url)}, the sender's is "
            f"{expected}: set the same BQG_DB in every Ray node's environment"
        )
    return settings

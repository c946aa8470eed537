"""The gateway app's arguments: what ``build_app`` takes from serve.yaml or ``gateway serve``.

Validated by pydantic (never a bare dict); every field defaults from :class:`Settings`.
No secret is an argument: Ray shows deployment arguments to anyone who can read the
cluster's state, so the admin token and a database password come from the replicas'
environment (``BQG_ADMIN_TOKEN``, ``BQG_DB``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.settings import Settings, has_password, load_settings


class GatewayArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt arg is an error, not ignored

    db: str | None = Field(default=None, description="Database URL; default from settings.")
    store: str | None = Field(default=None, description="Store directory; default from settings.")
    model_name: str | None = None
    client_header: str | None = Field(
        default=None, description="Header naming the client; default from settings."
    )
    max_body_bytes: int | None = Field(default=None, ge=1024)
    max_decoded_bytes: int | None = Field(default=None, ge=1024)
    expose_members: bool | None = None
    poll_seconds: float | None = Field(default=None, gt=0)
    strip_max_overlays: int | None = Field(default=None, ge=1)
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, le=1)
    ensemble_replicas: int = Field(default=1, ge=1)
    ingress_replicas: int = Field(default=1, ge=1)
    threads_per_replica: int = Field(default=1, ge=1)
    defense_modules: list[str] | None = Field(
        default=None, description="Modules that register more defenses; default from settings."
    )
    single_model: bool = Field(
        default=False, description="Benchmark baseline: serve the goodnet alone."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and "admin_token" in data:
            raise ValueError(
                "admin_token is a secret and not an app argument (Ray shows those to anyone "
                "who can reach it): set BQG_ADMIN_TOKEN in the gateway's environment"
            )
        return data

    @field_validator("db")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        if has_password(value):
            raise ValueError(
                "a database URL with a password is a secret and not an app argument (Ray "
                "shows those to anyone who can reach it): set BQG_DB, or libpq's PGPASSWORD, "
                "in the replicas' environment"
            )
        return value

    def settings(self) -> Settings:
        """Settings with this app's overrides applied."""
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "db": self.db,
                "store": self.store,
                "model_name": self.model_name,
                "client_header": self.client_header,
                "max_body_bytes": self.max_body_bytes,
                "max_decoded_bytes": self.max_decoded_bytes,
                "expose_members": self.expose_members,
                "poll_seconds": self.poll_seconds,
                "strip_max_overlays": self.strip_max_overlays,
                "defense_modules": self.defense_modules,
            }.items()
            if v is not None
        }
        return load_settings(**overrides)

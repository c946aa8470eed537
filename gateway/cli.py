"""``gateway``: start Ray, the Serve app (and, with its issue, the repair watcher), locally.

``gateway serve`` migrates the embedded SQLite store, starts a local Ray with its metrics
export port, deploys ``gateway.app:build_app`` with the args of ``--config`` (overridden
by flags), prints the URLs and serves until Ctrl-C, which shuts Serve and Ray down.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from core.db import open_store, safe_url
from core.errors import UserError
from gateway.config import GatewayArgs

app = typer.Typer(
    help="Serve a BadNet/GoodNet pair over HTTP, quarantine disagreements, hot-swap repaired rounds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(http_options, app args) of the first application in a Serve config file."""
    try:
        config = yaml.safe_load(path.read_text())
        app_config = config["applications"][0]
        if app_config.get("import_path") != "gateway.app:build_app":
            raise UserError(
                f"{path}: the first application must have import_path gateway.app:build_app"
            )
        return dict(config.get("http_options") or {}), dict(app_config.get("args") or {})
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise UserError(
            f"{path} is not a Serve config with an 'applications' list ({exc})"
        ) from None


@app.command("serve")
def serve_cmd(
    config: Annotated[
        Path, typer.Option(help="Serve config file (its first application's args).")
    ] = Path("deploy/serve.yaml"),
    db: Annotated[
        str | None,
        typer.Option(help="Database URL. Default: args.db, $BQG_DB, else the store's SQLite file."),
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="Store directory. Default: $BQG_STORE or var/store.")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="HTTP host. Default: the config's, else 127.0.0.1.")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="HTTP port. Default: the config's, else 8000.")
    ] = None,
    policy: Annotated[
        str | None, typer.Option(help="goodnet (NNoculation) or reject (BBD).")
    ] = None,
    dashboard: Annotated[
        bool, typer.Option(help="Start Ray's dashboard too (about 1 GB more memory).")
    ] = False,
    watch: Annotated[
        bool,
        typer.Option(
            help="Start the repair watcher beside the app: a round runs at N pending samples."
        ),
    ] = True,
) -> None:
    """Start a local Ray, deploy the gateway, print its URLs, serve until Ctrl-C."""
    http, raw_args = read_config(config) if config.exists() else ({}, {})
    overrides = {
        k: v
        for k, v in {"db": db, "store": str(store) if store else None, "policy": policy}.items()
        if v
    }
    try:
        args = GatewayArgs(**{**raw_args, **overrides})
    except ValueError as exc:
        raise UserError(f"bad gateway arguments: {exc}") from None
    settings = args.settings()
    open_store(
        settings.db_url
    )  # reachable, and the embedded SQLite migrated, before anything starts
    host = host or http.get("host") or settings.http_host
    port = port or http.get("port") or settings.http_port
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    from ray import serve

    from gateway.app import build_app

    ray.init(
        include_dashboard=dashboard,
        _metrics_export_port=settings.metrics_port,
        configure_logging=False,
    )
    stop = threading.Event()
    watcher: Any = None
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(args), name="gateway", route_prefix="/")
        if watch:
            from trainer.watcher import start_watcher_actor

            watcher = start_watcher_actor(settings)
            ray.get(watcher.status.remote())  # it is up (and its metrics port bound)
        typer.echo(f"gateway:  http://{host}:{port}  (OpenAPI at /docs, policy {settings.policy})")
        typer.echo(f"metrics:  http://127.0.0.1:{settings.metrics_port}/metrics")
        if watch:
            port_w = settings.watcher_metrics_port
            typer.echo(
                f"watcher:  a repair round starts at {settings.quarantine_threshold} pending samples"
                + (f"; metrics at http://127.0.0.1:{port_w}/metrics" if port_w else "")
            )
        typer.echo(f"database: {safe_url(settings.db_url)}")
        typer.echo("Ctrl-C stops the gateway and Ray.")
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("shutting down")
        if watcher is not None:
            try:
                ray.get(watcher.stop.remote(), timeout=30)
            except Exception as exc:  # it is killed with Ray below anyway
                typer.echo(f"watcher did not stop cleanly: {exc}", err=True)
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


@app.command("version")
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("backdoor-quarantine-gateway"))


def main() -> None:
    """Console-script entry: user errors become one line and exit status 2."""
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None

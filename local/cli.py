"""``gateway``: start Ray, the Serve app and the repair watcher, locally (the composition).

``gateway serve`` migrates the embedded SQLite store, starts a local Ray with its metrics
export port, deploys ``gateway.app:build_app`` with the args of ``--config`` (overridden
by flags), prints the URLs and serves until Ctrl-C, which shuts Serve and Ray down.
"""

from __future__ import annotations

from core.ray_auth import token_auth_by_default

token_auth_by_default()  # before any module below imports ray

import faulthandler
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from core.db import open_store, safe_url, session_factory
from core.errors import UserError
from core.settings import Settings, has_password, load_settings
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
    if db is not None and has_password(db):
        os.environ["BQG_DB"] = db  # Ray's processes inherit it; never an actor argument
        db = None
    overrides = {k: v for k, v in {"db": db, "store": str(store) if store else None}.items() if v}
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
    with local_gateway(args, settings, host, port, watch=watch, dashboard=dashboard):
        typer.echo(
            f"gateway:  http://{host}:{port}  (OpenAPI at /docs; it serves the active round's defense)"
        )
        typer.echo(f"metrics:  http://127.0.0.1:{settings.metrics_port}/metrics")
        if watch:
            port_w = settings.watcher_metrics_port
            typer.echo(
                f"watcher:  a repair round starts at {settings.quarantine_threshold} pending samples"
                + (f"; metrics at http://127.0.0.1:{port_w}/metrics" if port_w else "")
            )
        typer.echo(f"database: {safe_url(settings.db_url)}")
        typer.echo("Ctrl-C stops the gateway and Ray.")
        wait_for_ctrl_c()


def wait_for_ctrl_c() -> None:
    """Block until Ctrl-C (SIGINT) or SIGTERM.

    Both set an event rather than raise KeyboardInterrupt, which Python drops when it lands
    in a finalizer; a second Ctrl-C during the shutdown that follows interrupts it as usual.
    """
    stop = threading.Event()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in handlers:
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, handlers[signal.SIGTERM])


def _bounded(step: str, fn: Any, seconds: float) -> None:
    """Run one shutdown step, giving up (with a message) after ``seconds``."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"shutdown-{step}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        typer.echo(f"{step} did not finish in {seconds:.0f} s; going on", err=True)
    elif errors:
        typer.echo(f"{step} failed: {errors[0]}", err=True)


@contextmanager
def local_gateway(
    args: GatewayArgs,
    settings: Settings,
    host: str,
    port: int,
    *,
    watch: bool,
    dashboard: bool = False,
    watcher_cfg: Any = None,
    quiet: bool = False,
) -> Iterator[Any]:
    """A local Ray with the gateway app (and the watcher actor); all shut down on exit.

    Yields the watcher actor handle, or None without ``watch``. ``quiet`` keeps the
    replicas' logs (and Serve's access log) in Ray's log files, off the terminal.
    """

    import ray
    from ray import serve

    from gateway.app import build_app

    ray.init(
        include_dashboard=dashboard,
        _metrics_export_port=settings.metrics_port,
        configure_logging=False,
        log_to_driver=not quiet,
    )
    watcher: Any = None
    logging_config = {"enable_access_log": False, "log_level": "WARNING"} if quiet else None
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
        serve.run(build_app(args), name="gateway", route_prefix="/", logging_config=logging_config)
        if watch:
            from trainer.watcher import start_watcher_actor

            watcher = start_watcher_actor(settings, watcher_cfg)
            ray.get(watcher.status.remote())  # it is up (and its metrics port bound)
        yield watcher
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("shutting down", err=True)
        if watcher is not None:  # it is killed with Ray below anyway
            _bounded("stopping the watcher", lambda: ray.get(watcher.stop.remote()), 30)
        _bounded("Serve's shutdown", serve.shutdown, 60)
        ray.shutdown()


@app.command("demo")
def demo_cmd(
    badnet: Annotated[
        Path, typer.Option(help="The suspect's bundle: the demo streams its own triggers.")
    ],
    store: Annotated[
        Path, typer.Option(help="The store 'trainer prepare' made round 0 in.")
    ] = Path("var/demo/store"),
    poison: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of the stream carrying a trigger.")
    ] = 0.1,
    threshold: Annotated[
        int | None, typer.Option(min=1, help="N: pending samples that start a round (200).")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="CycleGAN size preset (fast; tiny for tests).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (8000).")] = None,
    clients: Annotated[int, typer.Option(min=1, max=64, help="Concurrent clients.")] = 4,
    rate: Annotated[
        float,
        typer.Option(min=1.0, help="Requests per second (a quarter of it while a round trains)."),
    ] = 40.0,
    timeout: Annotated[
        float, typer.Option(min=10.0, help="Give up when no round is active after this many s.")
    ] = 900.0,
    wait: Annotated[
        bool, typer.Option(help="Keep serving after the table, until Ctrl-C (--no-wait exits).")
    ] = True,
) -> None:
    """Serve round 0, stream an attack over HTTP, let the watcher repair and hot-swap, and
    print CA/ASR before and after (the last step of 'make demo')."""
    import json

    from rich.console import Console
    from rich.table import Table

    from core.quarantine import active_round, list_rounds
    from local.demo import attacker_stream, rates_by_stage, stream_until_swap
    from trainer.data import load_fashion_mnist
    from trainer.repair import load_repair_config, with_preset

    env = load_settings()
    settings = env.model_copy(
        update={
            "store": store,
            "quarantine_threshold": threshold or env.quarantine_threshold,
        }
    )
    if not (badnet / "bundle.json").exists():
        raise UserError(f"{badnet} is not a model bundle (no bundle.json); run 'trainer fabricate'")
    sessions = session_factory(open_store(settings.db_url))
    with sessions() as session:
        if active_round(session=session) is None:
            raise UserError(f"no round is active in {store}; run 'trainer prepare' first")
        if any(r.round > 0 for r in list_rounds(session=session)):
            raise UserError(
                f"{store} already has repair rounds; the demo starts from round 0 alone"
            )
    images, poisoned = attacker_stream(
        load_fashion_mnist(settings.fashion_mnist_dir, "stream"), badnet, poison
    )
    heldout = load_fashion_mnist(settings.fashion_mnist_dir, "heldout")
    cfg = with_preset(load_repair_config(settings.repair_config), preset)
    host, port = settings.http_host, port or settings.http_port
    url = f"http://{host}:{port}"
    out, err = Console(), Console(stderr=True)
    with local_gateway(
        GatewayArgs(store=str(store)), settings, host, port, watch=True, watcher_cfg=cfg, quiet=True
    ):
        err.print(
            f"gateway at {url}, serving round 0. Streaming the attack: {100 * poison:g}% of "
            f"the requests carry the BadNet's trigger; a repair round starts at "
            f"{settings.quarantine_threshold} pending samples."
        )
        traffic = stream_until_swap(
            url,
            images,
            poisoned,
            sessions,
            threshold=settings.quarantine_threshold,
            clients=clients,
            rate=rate,
            timeout=timeout,
        )
        rows = rates_by_stage(sessions, badnet, heldout, settings.trusted_arch_modules)
        with sessions() as session:
            r1 = next(r for r in list_rounds(session=session) if r.round == 1)
            seconds = float(r1.metrics.get("seconds", 0.0))
        table = Table(title="CA and ASR on the held-out split (5,000 images)")
        for name in ("stage", "CA %", "ASR %"):
            table.add_column(name, justify="left" if name == "stage" else "right")
        for row in rows:
            table.add_row(row["stage"], f"{100 * row['ca']:.2f}", f"{100 * row['asr']:.2f}")
        out.print(table)
        precision = traffic.suspect_triggered / max(traffic.suspect, 1)
        recall = traffic.suspect_triggered / max(traffic.triggered, 1)
        out.print(
            f"{traffic.swapped_after} requests until the gateway answered from round 1 "
            f"({traffic.errors} errors); suspect answers that carried a trigger: "
            f"{100 * precision:.1f}%; triggered requests answered as suspect: {100 * recall:.1f}%; "
            f"round 1 took {seconds:.0f} s."
        )
        summary = {
            "rows": rows,
            "traffic": {k: v for k, v in traffic.__dict__.items() if k not in ("lock", "log")},
            "round1_seconds": seconds,
        }
        (store / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
        if wait:
            out.print(
                f"\nThe gateway keeps serving at {url}, and the watcher keeps repairing as new "
                f"samples arrive (Ctrl-C stops both, and Ray).\n"
                f"  metrics:  http://127.0.0.1:{settings.metrics_port}/metrics\n"
                f"  predict:  curl -s -H 'content-type: image/png' --data-binary @image.png {url}/predict\n"
                f"  models:   curl -s {url}/v1/models\n"
                f"  rounds:   trainer status --store {store}\n"
                f"  by hand:  trainer retrain --round 2 --store {store} --force\n"
                f"  rollback: trainer rollback --round 0 --store {store}"
            )
            wait_for_ctrl_c()


@app.command("version")
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("backdoor-quarantine-gateway"))


def main() -> None:
    """Console-script entry: user errors become one line and exit status 2.

    ``kill -USR1 <pid>`` prints every thread's stack, for a gateway that seems stuck.
    """
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None

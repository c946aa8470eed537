"""``gateway``: start the serving side.

The Ray Serve app (``gateway serve``) is built in its own issue; until then this command
says so plainly instead of pretending to serve.
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    help=(
        "Serve a BadNet/GoodNet pair over HTTP, quarantine disagreements, "
        "hot-swap repaired rounds."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command("serve")
def serve(
    config: Annotated[str, typer.Option(help="Serve config file.")] = "deploy/serve.yaml",
) -> None:
    """Start Ray, the Serve app and the repair watcher (not available in this version)."""
    typer.echo("error: the gateway is not built yet in this version; nothing was started", err=True)
    raise typer.Exit(code=1)


@app.command("version")
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("backdoor-quarantine-gateway"))


def main() -> None:
    app()

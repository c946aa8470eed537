"""Command-line options generated from a run dataclass, so each field's help is written once.

:func:`config_options` adds one ``--field-name`` option per dataclass field (booleans get
``--name/--no-name``) to a typer command, with the field's ``metadata["help"]`` and its
default. The command receives the options the user gave as ``overrides``: a dict of field
values to apply to its config with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

Command = Callable[..., Any]


def option_field(default: Any, help: str) -> Any:
    """A dataclass field whose help text the command line shows (``config_options``)."""
    return dataclasses.field(default=default, metadata={"help": help})


def _option(field: dataclasses.Field[Any], hint: Any) -> inspect.Parameter:
    flag = "--" + field.name.replace("_", "-")
    default = field.default
    help_text = f"{field.metadata['help']} (default: {default})"
    members = [t for t in typing.get_args(hint) if t is not type(None)]
    base = members[0] if members else hint
    if base not in (bool, int, float, str):
        raise TypeError(f"{field.name}: only bool, int, float and str fields become options")
    decl = f"{flag}/--no-{flag[2:]}" if base is bool else flag
    option = typer.Option(decl, help=help_text, show_default=False)
    annotation = Annotated[base | None, option]  # type: ignore[valid-type]  # built at run time
    return inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


def config_options(cls: type, skip: Sequence[str] = ()) -> Callable[[Command], Command]:
    """Give a typer command one option per field of dataclass ``cls`` (but ``skip``)."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip and "help" in f.metadata]

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command)
        resolved = typing.get_type_hints(command, include_extras=True)  # not strings
        own = [
            p.replace(annotation=resolved.get(p.name, p.annotation))
            for p in signature.parameters.values()
            if p.name != "overrides"
        ]
        names = [f.name for f in fields]
        clash = sorted(set(names) & set(signature.parameters))
        if clash:
            raise TypeError(f"{command.__name__}: options {clash} are both fields and parameters")

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            overrides = dict(kwargs.pop("overrides", None) or {})
            overrides.update({n: kwargs.pop(n) for n in names if kwargs.get(n) is not None})
            for n in names:
                kwargs.pop(n, None)
            return command(overrides=overrides, **kwargs)

        extra = [_option(f, hints[f.name]) for f in fields]
        parameters = own + extra
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate

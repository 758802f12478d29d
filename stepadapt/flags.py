"""Command-line flags from an Options class: one declaration per option, in the options.

A stage's options carry their help text and defaults (stepadapt.options); the
command that runs the stage gets one flag per option from them, so a new option
is one field, and the CLI, the demo and a re-run from a bundle's recorded
options cannot disagree about a default. Typer reads the generated signature.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from stepadapt import StepadaptError
from stepadapt.options import Options


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None was allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _cli_type(hint: Any, repeat: bool) -> Any:
    """What Typer parses: tuples as one comma-separated string (or a repeated flag)."""
    inner, optional = _unwrap(hint)
    if typing.get_origin(inner) is tuple:
        if repeat:
            return list[typing.get_args(inner)[0]] | None
        return str | None if optional else str
    return inner | None if optional else inner


def _cli_default(value: Any, hint: Any, repeat: bool) -> Any:
    if isinstance(value, tuple) and not repeat:
        return ",".join(map(str, value))
    if isinstance(value, tuple):
        return list(value) or None
    return value


def _parse(value: Any, hint: Any, flag: str) -> Any:
    """A flag's value as the options want it: comma-separated lists become typed tuples."""
    inner, optional = _unwrap(hint)
    if typing.get_origin(inner) is not tuple:
        return value
    if value is None:  # a repeatable flag not given: no values
        return None if optional else ()
    item = typing.get_args(inner)[0]
    parts = value if isinstance(value, list) else [v.strip() for v in value.split(",") if v.strip()]
    try:
        return tuple(item(v) for v in parts)
    except ValueError:
        raise StepadaptError(f"{flag} must be comma-separated {item.__name__}s, got {value!r}") from None


def parameters(cls: type[Options], skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per option of ``cls`` (Typer's ``Annotated`` style)."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        repeat = bool(meta.get("repeat"))
        decls = list(meta.get("flags", ())) or ([meta["flag"]] if "flag" in meta else [])
        kind = typer.Argument if meta.get("argument") else typer.Option
        extra = {"metavar": meta["metavar"]} if "metavar" in meta else {}
        info = kind(*decls, help=meta.get("help", ""), show_default=meta.get("show_default", True), **extra)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # a required option: a positional argument of the command
            default = inspect.Parameter.empty
        annotation = Annotated[_cli_type(hints[f.name], repeat), info]
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=annotation,
                default=_cli_default(default, hints[f.name], repeat),
            )  # fmt: skip
        )
    return params


def options_from(cls: type[Options], values: dict[str, Any]) -> Options:
    """The options for parsed flag ``values`` (one-line StepadaptError for a malformed one)."""
    hints = typing.get_type_hints(cls)
    return cls(**{k: _parse(v, hints[k], "--" + k.replace("_", "-")) for k, v in values.items()})


def command(
    cls: type[Options], fail: Callable[[Exception], None], skip: tuple[str, ...] = ()
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate ``run(options, **rest)``: the command takes one flag per option of ``cls`` (except
    ``skip``) plus ``run``'s own keyword parameters after ``options``, and builds the options."""

    def wrap(run: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(run, eval_str=True).parameters.values())[1:]
        names = {f.name for f in dataclasses.fields(cls)} - set(skip)

        def cmd(**kwargs: Any) -> None:
            try:
                opts = options_from(cls, {k: v for k, v in kwargs.items() if k in names})
            except StepadaptError as e:
                fail(e)
                return
            run(opts, **{k: v for k, v in kwargs.items() if k not in names})

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + parameters(cls, skip)
        positional = [p for p in params if _is_argument(p)]
        cmd.__signature__ = inspect.Signature(positional + [p for p in params if not _is_argument(p)])
        cmd.__name__, cmd.__doc__, cmd.__annotations__ = run.__name__, run.__doc__, {}
        return cmd

    return wrap


def _is_argument(p: inspect.Parameter) -> bool:
    return any(isinstance(m, typer.models.ArgumentInfo) for m in getattr(p.annotation, "__metadata__", ()))

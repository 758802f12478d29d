"""Options objects: one frozen dataclass per stage, round-tripping to JSON.

A bundle records the prune options it was made with in its provenance, and the
experiment logs every stage's, so a stage can be run again from what it ran with (diffusers'
``ConfigMixin`` does the same for models and schedulers). Every rule about a
stage's options (defaults, what depends on what, what is refused) lives in its
options class, so the CLI, the demo and the experiment cannot disagree.

Field metadata ``help`` is the one description of an option; the CLI shows it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from stepadapt import StepadaptError

OptionsT = TypeVar("OptionsT", bound="Options")


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with its help text (and CLI hints: ``flag``, ``flags``) as metadata."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, **metadata}}
    if isinstance(default, list | dict | set):
        kwargs["default_factory"] = lambda: type(default)(default)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _typed(hint: Any, value: Any) -> Any:
    """``value`` (from JSON) as ``hint`` wants it: paths, tuples and nested options come back typed;
    a value of another type (a number for a string, a string for a list) is refused."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is not type(None):
                return _typed(arg, value)
    if hint is Path and isinstance(value, str | Path):
        return Path(value)
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return tuple(_typed(inner, v) for v in value)
    if isinstance(hint, type) and issubclass(hint, Options) and isinstance(value, dict):
        return hint.from_dict(value)
    want = tuple if origin is tuple else hint
    if isinstance(want, type) and not _fits(want, value):
        raise StepadaptError(f"expected {'a list' if want is tuple else want.__name__}, got {value!r}")
    return value


def _converts(hint: Any) -> bool:
    """Whether a plain value for ``hint`` becomes another type (a path, a tuple); other values are
    the subclass's to check, with its own message."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_converts(a) for a in typing.get_args(hint) if a is not type(None))
    return hint is Path or typing.get_origin(hint) is tuple


def _fits(want: type, value: Any) -> bool:
    if isinstance(value, bool):
        return want is bool
    if want is float:
        return isinstance(value, int | float)
    return isinstance(value, want)


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every stage's options; subclasses check themselves in ``__post_init__`` after
    calling this one, which takes plain values for typed fields (a ``str`` for a ``Path``, a list for
    a tuple) as a caller or JSON most often has them."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str | list) and _converts(hints[f.name]):
                object.__setattr__(self, f.name, _typed(hints[f.name], value))

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[OptionsT], d: dict[str, Any]) -> OptionsT:
        if not isinstance(d, dict):
            raise StepadaptError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise StepadaptError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        values = {}
        for k, v in d.items():
            try:
                values[k] = _typed(hints[k], v)
            except StepadaptError as e:
                raise StepadaptError(f"{cls.__name__}.{k}: {e}") from None
        try:
            return cls(**values)
        except (TypeError, ValueError, AttributeError) as e:
            raise StepadaptError(f"{cls.__name__}: {e}") from None

    @classmethod
    def from_json(cls: type[OptionsT], text: str) -> OptionsT:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise StepadaptError(f"{cls.__name__}: not JSON ({e})") from None

    def replace(self: OptionsT, **changes: Any) -> OptionsT:
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of one option: what the CLI shows for its flag."""
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.metadata.get("help", "")
        raise KeyError(name)

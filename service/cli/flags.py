"""Help texts that show defaults, and command-line flags generated from a pydantic settings model."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo


class HelpFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to every option's help unless it already says its default or has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            text += " (default: %(default)s)"
        return text


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter, **kwargs)


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _argument(annotation: Any, metadata: list[Any]) -> dict[str, Any]:
    """argparse keywords for one field type: a typed value, a choice, a switch or a list."""
    annotation = _unwrap_optional(annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = typing.get_args(annotation)
        # A field's BeforeValidator maps old spellings (aliases) onto a choice: the flag takes them too.
        normalise = next((m.func for m in metadata if isinstance(m, BeforeValidator)), type(choices[0]))
        return {"choices": list(choices), "type": normalise}
    if origin is list:
        (item,) = typing.get_args(annotation)
        return {"nargs": "+", "type": str if item is Path else item, "metavar": "N"}
    if annotation is int:
        return {"type": int, "metavar": "N"}
    if annotation is float:
        return {"type": float, "metavar": "X"}
    return {"type": str, "metavar": "PATH" if annotation is Path else "TEXT"}


def add_settings_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    env_prefix: str,
    skip: tuple[str, ...] = (),
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, str]:
    """One `--field-name` flag per settings field, with the field's description, default and
    environment variable in its help. Every flag defaults to None, meaning "not given": only
    flags the user typed override the environment. Returns field name -> flag."""
    aliases = aliases or {}
    flags: dict[str, str] = {}
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        flags[name] = flag
        default = field.get_default(call_default_factory=True)
        help_text = (f"{_description(name, field)} (default: {_show(default)}; "
                     f"env {env_prefix}{name.upper()})").replace("%", "%%")
        parser.add_argument(flag, *aliases.get(name, ()), dest=name, default=None, help=help_text,
                            **_argument(field.annotation, field.metadata))
    return flags


def _description(name: str, field: FieldInfo) -> str:
    if not field.description:
        raise TypeError(f"settings field {name!r} has no description: add Field(description=...)")
    return field.description


def given_settings(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """The settings the user typed on the command line (flags left out are None)."""
    return {name: value for name in flags if (value := getattr(args, name)) is not None}

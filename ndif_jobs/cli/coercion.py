"""Option values converted without pydantic, so that a read command starts in a few milliseconds.

typer 0.29 converts every value given to a command (any option but a flag) through a pydantic
`TypeAdapter` that it builds on first use. Importing pydantic for it, and pydantic's look through
every installed package for plugins, cost `status`, `list` and `show` more than the rest of
their work together (`scripts/bench_cli.py --importtime`). The options of this CLI are plain
text, flags, whole numbers (some with a lower bound), paths and lists of text: `plain_values` gives
each such parameter of the built command a converter that does what the adapter does for them,
and leaves any other parameter (a command added by another module, say) to typer.

This fills typer's per-parameter converter slot (`_runtime_param`), which is not public: typer
is pinned (constraints.txt), the CLI runs without this module where a typer lacks those parts
(`cli._convert_plainly`), and `tests/test_cli_package.py` fails if a read command imports
pydantic again.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typer._click.core import Command, Context
from typer._click.exceptions import BadParameter
from typer._coercion import RuntimeParam
from typer.core import TyperArgument, TyperGroup, TyperOption


@dataclass(frozen=True)
class _Plain(RuntimeParam):
    """A converter for one plain parameter (see the module)."""

    convert: Callable[[Any], Any]
    is_list: bool

    def _coerce_value(self, value: Any, param: Any, ctx: Context) -> Any:
        try:
            if self.is_list:
                return [self.convert(item) for item in value]
            return self.convert(value)
        except ValueError as exc:
            raise BadParameter(str(exc), ctx=ctx, param=param) from None


def plain_values(command: Command) -> None:
    """Give each plain parameter of `command` (and of its subcommands) a pydantic-free converter."""
    help_option = command.get_help_option(Context(command))  # made once, on first use: made here
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if not isinstance(param, (TyperOption, TyperArgument)) or param._runtime_param is not None:
            continue
        descriptor = param.type_descriptor
        found = _converter(descriptor.annotation, descriptor.parameter_info)
        if found is not None:
            convert, is_list = found
            param._runtime_param = _Plain(descriptor.parameter_info, descriptor.annotation, convert, is_list)
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            plain_values(sub)


def _converter(annotation: Any, info: Any) -> tuple[Callable[[Any], Any], bool] | None:
    is_list = typing.get_origin(annotation) is list
    inner = _unwrap_optional(typing.get_args(annotation)[0] if is_list else annotation)
    if inner is str:
        return _text, is_list
    if inner is bool:
        return _flag, is_list
    if inner is int and not getattr(info, "clamp", False) and getattr(info, "max", None) is None:
        return _whole_number(getattr(info, "min", None)), is_list
    if inner is Path and not _path_checks(info):
        return (lambda value: Path(_text(value))), is_list
    return None


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _path_checks(info: Any) -> bool:
    """Whether a Path option asks typer to check or change the path (exists, resolve_path, ...)."""
    return bool(getattr(info, "exists", False) or getattr(info, "resolve_path", False)
                or not getattr(info, "file_okay", True) or not getattr(info, "dir_okay", True)
                or getattr(info, "readable", True) is not True or getattr(info, "writable", False)
                or getattr(info, "executable", False) or getattr(info, "path_type", None) is not None
                or getattr(info, "allow_dash", False))


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("0", "false", "f", "no", "n", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _whole_number(minimum: int | None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        try:
            number = value if isinstance(value, int) else int(_text(value).strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
        if minimum is not None and number < minimum:
            raise ValueError(f"{number} is below the least allowed, {minimum}")
        return number

    return convert

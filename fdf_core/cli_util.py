"""One way to turn a config dataclass into a command line with YAML config files."""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import TypeVar

from jsonargparse import ActionConfigFile

from fdf_core.console import ArgumentParser

T = TypeVar("T")

_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")  # `name: type = default  # help`
_DOC_LINE = re.compile(r"^\s*([\w /]+?):\s+(\S.*)$")  # `name: help` (or `a / b: help`) in the docstring


def field_help(cls: type) -> dict[str, str]:
    """Help text of each field: its trailing comment, else its line in the class docstring."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in (klass.__doc__ or "").splitlines():
            if m := _DOC_LINE.match(line):
                for name in m.group(1).split("/"):
                    out[name.strip()] = m.group(2).strip()
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            if m := _COMMENT.match(line):
                out[m.group(1)] = m.group(2).strip()
    return out


def parse_dataclass(cls: type[T], argv: list[str] | None, prog: str, description: str,
                    positional: tuple[str, ...] = ()) -> T:
    """`--field value` for every field of `cls`, plus `--config file.yaml` (later flags win); the
    fields named in `positional` are given by position instead (`anonymize INPUT OUTPUT`)."""
    parser = ArgumentParser(prog=prog, description=description)
    for name in positional:
        parser.add_argument(name, type=str, help=field_help(cls).get(name))
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options")
    parser.add_class_arguments(cls, as_group=False, skip=set(positional))
    helps = field_help(cls)
    for action in parser._actions:
        if action.dest in helps and not action.help:
            action.help = helps[action.dest]
    ns = parser.parse_args(argv)
    ns.pop("config", None)
    return cls(**ns.as_dict())

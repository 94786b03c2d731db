"""One way to turn a config dataclass into a command line with YAML config files.

The help of each option is its entry in the `Args:` section of the dataclass's docstring (or of a
base dataclass's), which jsonargparse reads itself (docstring-parser); a new field gets its help
there, nowhere else.
"""
from __future__ import annotations

from typing import TypeVar

from jsonargparse import ActionConfigFile

from fdf_core.console import ArgumentParser

T = TypeVar("T")


def dataclass_parser(cls: type, prog: str | None = None, description: str | None = None,
                     positional: tuple[str, ...] = ()) -> ArgumentParser:
    """The parser of :func:`parse_dataclass`: `--config`, the positional fields, then the others."""
    parser = ArgumentParser(prog=prog, description=description)
    if positional:  # jsonargparse documents only the fields it adds: take these from the same docstrings
        helps = {a.dest: a.help for a in dataclass_parser(cls)._actions}
        for name in positional:
            parser.add_argument(name, type=str, help=helps.get(name))
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options")
    parser.add_class_arguments(cls, as_group=False, skip=set(positional))
    return parser


def parse_dataclass(cls: type[T], argv: list[str] | None, prog: str, description: str,
                    positional: tuple[str, ...] = ()) -> T:
    """`--field value` for every field of `cls`, plus `--config file.yaml` (later flags win); the
    fields named in `positional` are given by position instead (`anonymize INPUT OUTPUT`)."""
    ns = dataclass_parser(cls, prog, description, positional).parse_args(argv)
    ns.pop("config", None)
    return cls(**ns.as_dict())

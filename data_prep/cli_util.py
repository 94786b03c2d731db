"""One way to turn a config dataclass into a command line with YAML config files."""
from __future__ import annotations

from typing import TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser

T = TypeVar("T")


def parse_dataclass(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """`--field value` for every field of `cls`, plus `--config file.yaml` (later flags win)."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options")
    parser.add_class_arguments(cls, as_group=False)
    ns = parser.parse_args(argv)
    ns.pop("config", None)
    return cls(**ns.as_dict())

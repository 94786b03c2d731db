"""One error policy for every console script (README, "Errors and exit codes").

Every script in setup.cfg is a `console_main(target, prog)` defined in the `cli.py` of its stage
(`fdf_pipeline/cli.py` for the main job, the launcher module for `fdf-slurm-build`): it calls the
target's `main(argv)` and

- a user mistake (:class:`fdf_core.errors.UserError`) prints one line, `<prog>: error: <message>`,
  and exits with the error's code (2 usage, 3 input, 4 nothing to do, 5 items skipped);
- an unknown or misspelt option prints one line from the parser (`--inputdir`: did you mean
  `--input_dir`?) and exits 2, as argparse does, without the 15-line usage block;
- anything else is a bug: its traceback, then one line saying so, exit 1;
- `--debug` anywhere on the command line (before a `--`), or `FDF_DEBUG=1`, prints the traceback
  of user mistakes too.

Library code reports with `logging` (a module logger each); the scripts send the records of our
packages to stderr as `<prog>: <message>` (`<prog>: warning: <message>` for warnings) and print
their final JSON summary on stdout. Jobs on a cluster send them to the job's stdout log instead
(`setup_logging(prog, stream="stdout")`, slurm.launch). In a multi-process run only rank zero's
INFO and DEBUG records are shown (warnings and errors of every rank are); a record logged with
`extra={"all_ranks": True}` is shown on every rank.
"""
from __future__ import annotations

import difflib
import errno
import importlib
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

import jsonargparse
from jsonargparse._common import debug_mode_active  # JSONARGPARSE_DEBUG

from fdf_core.errors import EXIT_BUG, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_USAGE, UserError

DEBUG_ENV = "FDF_DEBUG"
DEBUG_FLAG = "--debug"
# Our loggers; `__main__` is a stage module run with `python -m`.
PACKAGES = ("fdf_core", "data_prep", "fdf_builder", "training", "eval", "slurm", "fdf_pipeline", "__main__")


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(`--debug` given or `$FDF_DEBUG` set, argv without `--debug`). After a `--` the words belong
    to another command line (slurm.train passes them to fdf-train) and are left alone."""
    end = argv.index("--") if "--" in argv else len(argv)
    flag = DEBUG_FLAG in argv[:end]
    rest = [a for a in argv[:end] if a != DEBUG_FLAG] + argv[end:]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return flag or env, rest


class _ScriptFormatter(logging.Formatter):
    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{self.prog}: {level}{record.getMessage()}"


def process_rank() -> int:
    """This process's global rank: torch.distributed's once it is up, else the launcher's variables
    (as Lightning reads them: RANK, LOCAL_RANK, SLURM_PROCID, JSM_NAMESPACE_RANK), else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class _RankZero(logging.Filter):
    """INFO and DEBUG records of rank zero only, unless logged with `extra={"all_ranks": True}`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or getattr(record, "all_ranks", False) or process_rank() == 0


class _StreamHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` (or `sys.stdout`) is when a record arrives (tests and tools
    replace them)."""

    def __init__(self) -> None:
        super().__init__()
        self.to = "stderr"
        self.addFilter(_RankZero())

    @property
    def stream(self):
        return getattr(sys, self.to)

    @stream.setter
    def stream(self, value) -> None:
        pass


_HANDLER = _StreamHandler()  # one for the process, so a second script call adds no duplicate


def setup_logging(prog: str, debug: bool = False, stream: str = "stderr") -> None:
    """Records of our packages go to `stream` (stderr, or stdout for a cluster job's log) as
    `<prog>: ...`; INFO and up (DEBUG with --debug)."""
    _HANDLER.setFormatter(_ScriptFormatter(prog))
    _HANDLER.to = stream
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if debug else logging.INFO)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)


def _environment_error(err: BaseException) -> bool:
    """Permission denied and a full disk are the user's to fix, though builtins raise them."""
    return isinstance(err, PermissionError) or (isinstance(err, OSError) and err.errno == errno.ENOSPC)


def run_main(main: Callable[[list[str]], Any], prog: str, argv: list[str] | None = None) -> int:
    """Run `main(argv)` under the policy above; return the exit status."""
    if argv is None:  # the process's own command line, without --debug for every reader of sys.argv
        debug, argv = debug_requested(sys.argv[1:])
        sys.argv[1:] = argv
    else:
        debug, argv = debug_requested(list(argv))
    setup_logging(prog, debug)
    try:
        main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - every exception ends here, bugs in full
        if not isinstance(err, UserError) and not _environment_error(err):
            traceback.print_exc()
            print(f"{prog}: internal error (a bug, not a mistake in the input): please report it with "
                  "the traceback above", file=sys.stderr)
            return EXIT_BUG
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_INPUT)
    return 0


def console_main(target: str, prog: str) -> Callable[[], int]:
    """The entry point of a console script: the `main(argv)` that `target` names (`module` for its
    `main`, or `module:function`) under :func:`run_main`. The function is looked up on use, so an
    import error is reported like any bug."""
    module, _, name = target.partition(":")

    def entry() -> int:
        return run_main(lambda argv: getattr(importlib.import_module(module), name or "main")(argv), prog)

    entry.__doc__ = f"`{prog}`: `{target}(argv)`; exit status per fdf_core.errors."
    entry.target, entry.prog = target, prog
    return entry


def run_command(scripts: list[Callable[[], int]]) -> int:
    """`python -m <stage>.cli [<script>] [options]`: the console script named first on the line (the
    only one when the module has one), with the rest of the line, as if run by its name."""
    by_name = {s.prog: s for s in scripts}
    if len(scripts) == 1:
        return scripts[0]()
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in by_name:
        print(f"usage: python -m {Path(sys.argv[0]).parent.name}.cli {{{','.join(by_name)}}} [options]",
              file=sys.stderr)
        return EXIT_USAGE
    del sys.argv[1]
    return by_name[name]()


def print_summary(summary: Any) -> None:
    """A console script's last word: its summary as one JSON line on stdout (paths as strings)."""
    print(json.dumps(summary, default=str), flush=True)


# ---------------------------------------------------------------- option parsing
_PARSER_KEY = re.compile(r'(?:Parser key|Key) "([\w.\-]+)"')
_REQUIRED = re.compile(r"(arguments are required: )(.+)$")


def one_line(message: str, flags: list[str] = ()) -> str:
    """jsonargparse's message on one line, naming options as flags (`--key`) rather than keys."""
    message = _PARSER_KEY.sub(lambda m: f"--{m.group(1)}", message)
    message = message.replace(" but not included in config object or its value is None", "")
    message = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", message)
    message = re.sub(r"\s*\n\s*", " ", message).strip()
    as_flag = lambda name: f"--{name}" if f"--{name}" in flags else name  # noqa: E731
    return _REQUIRED.sub(lambda m: m.group(1) + ", ".join(as_flag(n) for n in m.group(2).split(", ")), message)


def _suggestions(message: str, flags: list[str]) -> str:
    """` (did you mean --input_dir?)` for unknown `--words` (or config keys) close to a known option."""
    if "unrecognized arguments" in message:
        words, known = re.findall(r"(--[\w.\-]+)", message), flags
    elif m := re.search(r"Option '([\w.\-]+)' is not accepted", message):  # a key of a --config file
        words, known = [m.group(1)], [f.removeprefix("--") for f in flags]
    else:
        return ""
    hints = {}
    for word in words:
        close = difflib.get_close_matches(word, known, n=1, cutoff=0.75)
        if close:
            hints[word] = close[0]
    if len(hints) == 1:
        return f" (did you mean {next(iter(hints.values()))}?)"
    return f" ({'; '.join(f'{w}: did you mean {c}?' for w, c in hints.items())})" if hints else ""


class OneLineErrors:
    """Mixin for jsonargparse parsers: an option error is one line, `<prog>: error: <message>
    (see <prog> --help)`, exit 2, instead of the usage block. JSONARGPARSE_DEBUG keeps
    jsonargparse's own behaviour (raise with a traceback)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
        sys.stderr.write(f"{prog}: error: {one_line(message, flags)}{_suggestions(message, flags)} "
                         f"(see {prog} --help)\n")
        self.exit(EXIT_USAGE)


class ArgumentParser(OneLineErrors, jsonargparse.ArgumentParser):
    """jsonargparse's parser with one-line option errors; every fdf command line uses it."""

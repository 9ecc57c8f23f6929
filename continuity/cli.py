"""The `continuity` command line: one entry point that dispatches to command modules.

Each command module exposes `register(subparsers)`, adding its parsers and setting
`handler=` on them. A handler takes the parsed arguments and returns an exit status.
User errors (`UsageError`, and argparse's own) become one line on stderr and status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from continuity.errors import UsageError

# Command modules. Each imports its heavy dependencies (JAX, Kafka) inside its handlers,
# so building the parser, and `continuity --help`, stays fast.
COMMAND_MODULES = (
    "continuity.commands.bench",
    "continuity.commands.checkpoints",
    "continuity.commands.config",
    "continuity.commands.ingest",
    "continuity.commands.inspect",
    "continuity.commands.service",
)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line and exit status 2.

    argparse prints the usage block before the error; for scripts and humans alike the
    error alone (which already names the argument and the valid choices) is clearer.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def version() -> str:
    """The installed distribution's version: pyproject.toml's, so the two never disagree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("continuity")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = OneLineParser(prog="continuity", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _drop_late_callbacks_into_closed_loops()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UsageError as error:
        print(f"continuity: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader is gone, and so is anything more to say
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell's command would
    except OSError as error:
        # The file system or the network refused (a path that is a file, no permission, a full
        # disk): one line naming what and where, not a traceback of where it surfaced.
        print(f"continuity: error: {error}", file=sys.stderr)
        return 1


def _drop_late_callbacks_into_closed_loops() -> None:
    """Orbax reads and writes through TensorStore on an asyncio loop of its own. When it gives up (a
    damaged checkpoint, a full disk) it closes that loop while TensorStore still finishes reads or
    writes it had started, whose callbacks then fail with "Event loop is closed": reported as
    unraisable, a traceback per array, a screenful after the one line that said what went wrong.
    The failure itself was raised and reported already; only these echoes are dropped."""
    default = sys.unraisablehook
    if getattr(default, "drops_closed_loop_echoes", False):
        return  # installed by an earlier call

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        default(unraisable)

    hook.drops_closed_loop_echoes = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's own flush at exit does not fail on the closed pipe again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())

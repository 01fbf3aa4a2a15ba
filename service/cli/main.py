"""The `exitserve` command line: one module per command; heavy imports (torch, matplotlib) happen
inside the commands that need them. User mistakes end as one `error: …` line and exit status 2."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import NoReturn

from exitserve import __version__
from exitserve.service.cli import export, info, llm, offline, serve, shifted, train
from exitserve.service.cli.errors import EXIT_USER_ERROR, user_message

COMMANDS = (train, export, offline, shifted, serve, info, llm)


class OneLineParser(argparse.ArgumentParser):
    """A flag mistake (`--delta abc`) is one `error:` line naming the flag and where help is, like every
    other user mistake, not argparse's usage block (27 lines for `serve`). Subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (`{self.prog} --help` lists every option)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="exitserve", description="Serve multi-exit networks with per-request accuracy targets.")
    parser.add_argument("--version", action="version", version=f"exitserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    return f"warning: {message}\n"  # the user's problem, not a line of our source


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except Exception as exc:
        message = user_message(exc, getattr(args, "settings_flags", None))
        if message is None:
            raise  # a bug, not a user mistake: keep the traceback
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())

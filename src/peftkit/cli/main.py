"""``peftkit``: parse the command, call its library function, turn user errors into one line + exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from peftkit.cli import commands


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None, off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning of language models.")
    try:
        own = version("peftkit")
    except PackageNotFoundError:  # run from a source tree without installing
        own = "unknown"
    parser.add_argument("--version", action="version", version=f"peftkit {own}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in commands.REGISTER:
        register(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from peftkit.errors import PeftkitError

    hf_logging.disable_progress_bar()  # our own progress display is enough

    try:
        return args.handler(args) or 0
    except (PeftkitError, OSError) as e:  # OSError: a path the user gave (missing, too long, unwritable, disk full)
        if os.environ.get("PEFTKIT_DEBUG"):
            raise
        print(f"peftkit: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training stops cleanly on SIGINT/SIGTERM and says how to resume
        print(f"peftkit: {one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)


def one_line(e: BaseException, limit: int = 2000) -> str:
    """The message on one line (user-given values can hold newlines), cut if very long."""
    text = str(e).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "..."


if __name__ == "__main__":
    sys.exit(main())

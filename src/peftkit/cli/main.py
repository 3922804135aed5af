"""``peftkit``: parse the command, call its library function, turn user errors into one line + exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from peftkit.cli import commands



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in commands.REGISTER:
        register(sub)
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

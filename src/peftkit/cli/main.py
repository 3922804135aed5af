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
    except (PeftkitError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("PEFTKIT_DEBUG"):
            raise
        print(f"peftkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

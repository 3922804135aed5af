"""The ``peftkit`` console command: pick the memory allocator (before torch loads), then run :func:`main`.

Kept apart from :mod:`peftkit.cli.main` so that tests and library callers of ``main()`` never re-execute.
"""

from __future__ import annotations

import sys


def run() -> None:
    from peftkit.allocator import reexec_under_chosen_allocator

    reexec_under_chosen_allocator()
    from peftkit.cli.main import main

    sys.exit(main())

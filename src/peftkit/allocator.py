"""The ``peftkit`` command runs under jemalloc when the machine has it (Linux; ``PEFTKIT_ALLOCATOR`` decides).

glibc's malloc keeps freed memory in its heap: with gradient checkpointing, saved layer inputs pin the memory
around them (the ~1.1B model's QLoRA peak: 2.05-2.53 GB under glibc, 1.62 GB under jemalloc), and on real data its
RSS after a step stays near the step's peak. jemalloc, with its own settings, hands freed pages back to the OS after
a delay: lower peaks, and memory flat over hundreds of steps of variable-length batches (BENCHMARKS.md, "Memory
over a long run"). The allocator of a process is fixed when it starts, so the console command re-executes itself
once, with jemalloc in ``LD_PRELOAD``, before anything heavy is imported. Library use (``import peftkit``) is never
affected.

    PEFTKIT_ALLOCATOR=auto      jemalloc when found, else the system's malloc (the default)
    PEFTKIT_ALLOCATOR=jemalloc  jemalloc, or a one-line error when it is not installed
    PEFTKIT_ALLOCATOR=system    the system's malloc (glibc), nothing preloaded
    PEFTKIT_JEMALLOC=PATH       the jemalloc library to use (default: searched in the usual library folders)

jemalloc comes from the system (Debian/Ubuntu: ``apt-get install libjemalloc2``; scripts/setup.sh installs it
where it may). A ``MALLOC_CONF`` already set is left alone.

All of peftkit's process-memory code is here: the allocator choice above, handing freed memory back to the OS
(jemalloc's purge, glibc's ``malloc_trim``, ``madvise`` on the pages of a memory-mapped checkpoint), and whether
glibc's heap keeps freed memory (a term of the memory prediction, peftkit.runs.memory). Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never imported here: the console command picks its allocator before torch loads
    import torch

ENV = "PEFTKIT_ALLOCATOR"
LIBRARY_ENV = "PEFTKIT_JEMALLOC"
CHOICES = ("auto", "jemalloc", "system")
GUARD = "_PEFTKIT_ALLOCATOR_SET"  # set in the re-executed process: never exec twice
# jemalloc's own settings (freed pages handed back to the OS over ~10 s). Never-purge settings
# ("dirty_decay_ms:-1,muzzy_decay_ms:-1") won on fixed-shape steps and grew without bound on real data, where every
# batch has another shape (issue #16: the demo 8.5 GB at step 20, 18 GB at step 45): freed extents that are never
# purged are never coalesced either, so a batch of a new shape needs fresh pages. Chosen on real variable-length data
# over hundreds of steps, speed and memory together: BENCHMARKS.md "Memory over a long run". A MALLOC_CONF of the
# user's is passed on as it is.
MALLOC_CONF: str | None = None
LIBRARY_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib", "/usr/local/lib64", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


class AllocatorError(RuntimeError):
    """PEFTKIT_ALLOCATOR asks for something this machine cannot give."""


def find_jemalloc(dirs: Sequence[str] = LIBRARY_DIRS) -> str | None:
    """The path of jemalloc's shared library, or None. Searched: ``$VIRTUAL_ENV/lib``, ``$CONDA_PREFIX/lib``, then
    the usual system library folders."""
    search = [os.path.join(os.environ[v], "lib") for v in ("VIRTUAL_ENV", "CONDA_PREFIX") if os.environ.get(v)]
    for folder in [*search, *dirs]:
        for name in LIBRARY_NAMES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def preloaded(environ: Mapping[str, str] = os.environ) -> str | None:
    """Which replacement allocator ``LD_PRELOAD`` names (jemalloc, tcmalloc, mimalloc), or None (the system's)."""
    for item in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":"):
        base = os.path.basename(item).lower()
        for name in OTHER_ALLOCATORS:
            if name in base:
                return name
    return None


def plan(environ: Mapping[str, str], platform: str = sys.platform, library: str | None = None,
         find=find_jemalloc) -> dict[str, str] | None:
    """The environment to re-execute under, or None to stay as we are.

    Raises :class:`AllocatorError` for a ``PEFTKIT_ALLOCATOR`` value that is unknown, or ``jemalloc`` where it is
    not installed (or not Linux)."""
    choice = environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV}={environ[ENV]!r}: unknown allocator (choose one of {', '.join(CHOICES)})")
    if choice == "system" or environ.get(GUARD) or preloaded(environ):
        return None  # asked not to, done already, or the user preloaded an allocator of their own
    if not platform.startswith("linux"):
        if choice == "jemalloc":
            raise AllocatorError(f"{ENV}=jemalloc: preloading jemalloc is supported on Linux only (this is {platform})")
        return None
    if library is None and environ.get(LIBRARY_ENV):
        library = environ[LIBRARY_ENV]
        if not os.path.isfile(library):
            raise AllocatorError(f"{LIBRARY_ENV}={library}: no such file")
    library = library or find()
    if library is None:
        if choice == "jemalloc":
            raise AllocatorError(f"{ENV}=jemalloc: jemalloc is not installed (Debian/Ubuntu: apt-get install "
                                 f"libjemalloc2), searched {', '.join(LIBRARY_DIRS)}")
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    if MALLOC_CONF and "MALLOC_CONF" not in environ:
        env["MALLOC_CONF"] = MALLOC_CONF
    env[GUARD] = library
    return env


def reexec_under_chosen_allocator(argv: Sequence[str] | None = None) -> None:
    """Replace this process by the same command under jemalloc when :func:`plan` says so; otherwise return.

    Called by the console command before it imports torch; ``argv`` is the interpreter's command line
    (default ``sys.orig_argv``: interpreter options, then the script or ``-m peftkit``, then the arguments)."""
    try:
        env = plan(os.environ)
    except AllocatorError as e:
        print(f"peftkit: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if env is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:  # could not exec (odd interpreter setup): run on under the system's malloc
        return


def in_use() -> str:
    """The allocator this process runs under: jemalloc / tcmalloc / mimalloc when one is loaded, else ``system``."""
    try:
        with open("/proc/self/maps") as f:
            libraries = {os.path.basename(line.split()[-1]).lower() for line in f
                         if line.rstrip().endswith(".so") or ".so." in line.rsplit("/", 1)[-1]}  # lib*.so[.N]
    except OSError:  # not Linux: the environment is all there is to go by
        return preloaded() or "system"
    for name in OTHER_ALLOCATORS:
        if any(name in lib for lib in libraries):
            return name
    return "system"


def release_free_memory() -> bool:
    """Hand the freed pages jemalloc keeps back to the OS (all arenas' ``purge``); True when done.

    Training calls this once, after the model is built and before the first step, so that what loading and
    quantizing the model freed is not counted in the run's memory while jemalloc's decay would still hold it.
    A no-op elsewhere (glibc, no jemalloc)."""
    if in_use() != "jemalloc":
        return False
    import ctypes

    try:
        mallctl = ctypes.CDLL(None).mallctl  # jemalloc's control interface, exported by the preloaded library
    except (OSError, AttributeError):
        return False
    return mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0)) == 0  # 4096: MALLCTL_ARENAS_ALL


def describe() -> str:
    """One line for ``peftkit info`` and the end of a training run."""
    name = in_use()
    if name == "system":
        choice = os.environ.get(ENV, "auto")
        hint = ("jemalloc not found: Debian/Ubuntu `apt-get install libjemalloc2` lowers peak memory"
                if choice != "system" and find_jemalloc() is None and not os.environ.get(LIBRARY_ENV)
                else f"{ENV}={choice}")
        return f"memory allocator: the system's malloc ({hint})"
    return f"memory allocator: {name} ({ENV}=system for the system's malloc)"


# -- handing memory back to the OS (QLoRA's quantization: methods/qlora.py) ------------------------------------------
def trim_heap() -> None:
    """Hand the freed quantization temporaries back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    bitsandbytes' CPU quantization of one layer allocates ~5x the layer's fp32 size in temporaries; glibc
    keeps most of it once freed (measured on smollm2-135m: 869 MB resident after quantizing, 671 MB after
    the trim), and that would sit under the whole training run.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


_MADV_DONTNEED = 4
_PAGE = 4096


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process that map a file (Linux; empty elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().startswith("/") and parts[4] != "0":
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


def file_backed(t: torch.Tensor) -> bool:
    """Whether CPU tensor ``t``'s storage lies in a file mapping (a memory-mapped safetensors checkpoint)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return False
    ptr = t.untyped_storage().data_ptr()
    return any(lo <= ptr < hi for lo, hi in file_mappings())


def release_file_pages(t: torch.Tensor) -> None:
    """Drop from this process's memory the pages of ``t`` that are mapped from a file (a safetensors
    checkpoint), once a quantized copy has replaced it.

    ``madvise(MADV_DONTNEED)`` on a file mapping only unmaps the pages: read again, they come back from
    the file. Only pages lying wholly inside ``t`` are touched, and only when ``t`` is file-backed
    (anonymous memory would be zeroed). Without this, the pages of every layer read while quantizing stay
    resident until the last tensor viewing the file is freed: the whole fp32 checkpoint, at the peak.
    """
    if t.is_meta or not file_backed(t):
        return
    import ctypes

    start = -(-t.data_ptr() // _PAGE) * _PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // _PAGE * _PAGE
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(start, end - start, _MADV_DONTNEED)


def glibc_heap_keeps_freed_memory() -> bool:
    """Whether this process's freed memory is kept by glibc's heap (the memory predictor's ``allocator`` term):
    not when ``MALLOC_MMAP_THRESHOLD_`` hands freed blocks back, nor when another allocator is preloaded (jemalloc,
    which returns freed pages after a delay: its measured peaks were at or below the prediction without the term)."""
    return "MALLOC_MMAP_THRESHOLD_" not in os.environ and preloaded() is None

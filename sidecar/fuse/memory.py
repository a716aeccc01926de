"""The daemon's malloc arenas.

glibc gives each thread that finds the main arena busy an arena of its own (up to 8 per
CPU) and keeps what is freed there for that arena's later use. The daemon's store and
hashing threads each allocate while a 1M-file snapshot is parsed and listed, so the freed
memory ends up spread over many arenas: 30 MB more RSS after a mount of a 1M-file tree
than with two arenas (bench/scale-results.md). Two arenas keep the event loop's thread and
the workers apart without that spread. A MALLOC_ARENA_MAX the user set wins.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)
M_ARENA_MAX = -8        # glibc's mallopt parameter number (malloc.h)
DAEMON_ARENAS = 2


def limit_malloc_arenas(arenas: int = DAEMON_ARENAS) -> bool:
    """Ask glibc for at most `arenas` malloc arenas in this process (call before threads
    start). True when glibc took it; False where MALLOC_ARENA_MAX is set (the user's choice)
    or the C library has no mallopt (musl) - nothing changes then."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    taken = mallopt(M_ARENA_MAX, arenas) == 1
    if not taken:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
    return taken

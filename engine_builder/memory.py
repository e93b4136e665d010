"""The build's memory, for its log and its records: which step of a real-size build raised the
peak, what the build holds while a child process works beside it, and giving freed heap back."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource


def peak_rss() -> str:
    """The process's peak resident set size so far, as the build logs it (`peak RSS 12.3 GB`)."""
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.1f} GB"


def resident_bytes() -> int:
    """The process's resident set size now (not its peak): what it holds beside a child's work."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_heap() -> None:
    """Collect garbage and return the freed heap to the system (glibc's malloc_trim, where the C
    library has it): what a step freed is otherwise kept by the allocator, counted in this
    process's RSS while a child process (the FP8 quantizer) needs the memory."""
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)

"""The build's peak memory so far, for its log: which step of a real-size build raised the peak."""

from __future__ import annotations

import resource


def peak_rss() -> str:
    """The process's peak resident set size so far, as the build logs it (`peak RSS 12.3 GB`)."""
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.1f} GB"

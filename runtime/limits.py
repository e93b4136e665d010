"""The bounds every layer checks its inputs against (manifests, requests, knobs, threads), in a leaf
that imports only the error type, so each of them reads the same numbers without importing the others."""

from sencache.runtime.errors import BadInput

MAX_FRAMES = 1024
MAX_PIXELS = 8192
MAX_BATCH = 64
MAX_STEPS = 1000
"""The most denoising steps a request may ask for (published schedules use 20-100)."""
MAX_THREADS = 1024


def check_threads(threads: int) -> None:
    """`threads` host threads are a count in [0, MAX_THREADS] (0: all cores); BadInput otherwise."""
    if not 0 <= threads <= MAX_THREADS:
        raise BadInput(f"threads must be in [0, {MAX_THREADS}] (0: all cores), got {threads}", param="threads")

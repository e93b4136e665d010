"""The host syncs PyTorch sees while some GPU work runs (what a device-resident loop must keep few)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def counting_syncs(work: Callable[[], Any]) -> tuple[Any, int]:
    """`work()` and the number of synchronizing calls PyTorch saw during it."""
    import warnings

    import torch

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = work()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in seen)

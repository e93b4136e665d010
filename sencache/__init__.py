"""SenCache: sensitivity-aware caching for video diffusion transformers.

The Python API (`Engine`, `Job`, `Video`, `Progress`) loads on first use, so `import sencache`
stays cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Engine", "Job", "Progress", "Video", "__version__"]

if TYPE_CHECKING:
    from sencache.runtime.api import Engine, Job, Progress, Video


def __getattr__(name: str) -> Any:
    if name in ("Engine", "Job", "Progress", "Video"):
        from sencache.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'sencache' has no attribute {name!r}")

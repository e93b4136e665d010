"""The bounds every layer checks its inputs against (manifests, requests, knobs), in a leaf that
imports nothing, so each of them reads the same numbers without importing the others."""

MAX_FRAMES = 1024
MAX_PIXELS = 8192
MAX_BATCH = 64
MAX_STEPS = 1000
"""The most denoising steps a request may ask for (published schedules use 20-100)."""

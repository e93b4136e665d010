"""SenCache: sensitivity-aware caching for video diffusion transformers."""

__version__ = "0.1.0"

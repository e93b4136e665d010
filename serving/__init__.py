"""Serving the step-level engine: an OpenAI-style video API on Ray Serve.

Nothing in `sencache.runtime` imports this package; it needs the `serve` extra."""

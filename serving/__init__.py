"""Serving the step-level engine: an OpenAI-style video API on Ray Serve, and a decoupled Triton model.

Nothing in `sencache.runtime` imports this package; it needs the `serve` extra (and `triton` for
`sencache.serving.triton`)."""

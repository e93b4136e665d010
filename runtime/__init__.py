"""SenCache runtime: loads an engine bundle and runs the cached denoising loop."""

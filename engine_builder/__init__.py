"""Offline engine builder: splits a model into stages, exports, validates and bundles them."""

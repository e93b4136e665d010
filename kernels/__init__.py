"""Drift-norm reductions: the per-sample sum of squared differences to the anchor."""

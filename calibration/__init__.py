"""Calibration of the sensitivity tables (SPEC section 4)."""

"""The small sensitivity table and budget curves the cache-rule tests share: three calibrated
timesteps, and fractions of runs recorded at 10 and 20 steps over four eps."""

import numpy as np

from sencache.runtime.sensitivity import BudgetCurves, SensitivityTable

TABLE = SensitivityTable(np.array([0.0, 500.0, 1000.0]), np.array([1.0, 2.0, 4.0]), np.array([0.01, 0.02, 0.03]))


def curves(**changes) -> BudgetCurves:
    """The shared budget curves, with `changes` to their fields."""
    fields = dict(
        steps=(10, 20),
        eps_grid=(0.0, 0.1, 0.2, 0.4),
        fractions=((1.0, 0.8, 0.6, 0.5), (1.0, 0.6, 0.4, 0.3)),
        profiles=(tuple(np.linspace(0.1, 0.2, 10)), tuple(np.linspace(0.05, 0.1, 20))),
        eps_ratio=0.25,
        max_reuse=3,
        switch_frac=0.2,
        force_last=True,
    )
    return BudgetCurves(**{**fields, **changes})

"""UniPC multistep stepping (diffusers' UniPCMultistepScheduler, as Wan's pipeline configures it)
with the scalars of each step computed on the host.

diffusers' step copies its sigmas to the latents' device and solves the order system there, each
a host wait on a GPU. Here every scalar of a step depends only on the schedule, the step index
and the solver order: it is computed once, on the host, by the same float32 operations, and the
step on the latents is only tensor arithmetic with host scalars (no copy, no wait). Equal to
diffusers' step (tests/test_solvers.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sencache.runtime.errors import BadInput
from sencache.runtime.families.base import Sampler


@dataclass(frozen=True)
class _Update:
    """The scalars of one UniP (predictor) or UniC (corrector) update from s0 to t."""

    ratio: torch.Tensor
    """sigma_t / sigma_s0."""
    alpha_h_phi_1: torch.Tensor
    alpha_b_h: torch.Tensor
    rks: tuple[torch.Tensor, ...]
    """Log-SNR offsets of the older model outputs used (order - 1 of them)."""
    rhos: torch.Tensor | None
    """Weights of the differences (the predictor of order 1 has none)."""


class UniPCSampler(Sampler):
    """UniPC for x0-predicting flow models with the B(h) variants, no solver_p and the corrector
    on every step (Wan's configuration); anything else is refused when the bundle loads."""

    def __init__(self, scheduler, steps: int) -> None:
        config = scheduler.config
        supported = (
            config.prediction_type == "flow_prediction"
            and config.use_flow_sigmas
            and config.predict_x0
            and config.solver_type in ("bh1", "bh2")
            and not config.thresholding
            and scheduler.solver_p is None
            and not scheduler.disable_corrector
        )
        if not supported:
            raise BadInput(f"UniPC configuration {dict(config)} is not the flow-prediction one this engine steps")
        super().__init__(scheduler, steps)
        self.order = config.solver_order
        self._updates: dict[tuple[int, int, int, bool], _Update] = {}
        self.start_at(0)

    def start_at(self, index: int) -> None:
        self._first = index
        self._outputs: list[torch.Tensor] = []
        self._last_sample: torch.Tensor | None = None
        self._last_order = 0

    def step(
        self, index: int, noise: torch.Tensor, x: torch.Tensor, generators: list[torch.Generator] | None = None
    ) -> torch.Tensor:
        x0 = x - self.scheduler.sigmas[index] * noise
        if self._last_sample is not None:
            update = self._update(index - 1, index, self._last_order, corrector=True)
            x = self._corrected(update, x0, self._last_sample)
        self._outputs = (self._outputs + [x0])[-self.order :]
        order = self.order
        if self.scheduler.config.lower_order_final:
            order = min(order, len(self.timesteps) - index)
        order = min(order, min(index - self._first, self.order) + 1)
        self._last_sample, self._last_order = x, order
        return self._predicted(self._update(index, index + 1, order, corrector=False), x)

    def _differences(self, update: _Update) -> torch.Tensor | None:
        """sum_k rho_k * (m_k - m0) / r_k over the older outputs (diffusers' einsum)."""
        rhos = update.rhos
        if rhos is None:  # the predictor of order 1: no older outputs
            return None
        m0 = self._outputs[-1]
        total = None
        for k, rk in enumerate(update.rks):
            term = rhos[k] * ((self._outputs[-(k + 2)] - m0) / rk)
            total = term if total is None else total + term
        return total

    def _predicted(self, update: _Update, x: torch.Tensor) -> torch.Tensor:
        m0 = self._outputs[-1]
        x_t = update.ratio * x - update.alpha_h_phi_1 * m0
        residual = self._differences(update)
        return x_t if residual is None else x_t - update.alpha_b_h * residual

    def _corrected(self, update: _Update, model_t: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        m0 = self._outputs[-1]
        x_t = update.ratio * last - update.alpha_h_phi_1 * m0
        residual = self._differences(update)
        assert update.rhos is not None, "a corrector update has its weights"
        d1_t = update.rhos[-1] * (model_t - m0)
        return x_t - update.alpha_b_h * (d1_t if residual is None else residual + d1_t)

    def _update(self, s0: int, t: int, order: int, corrector: bool) -> _Update:
        key = (s0, t, order, corrector)
        if key not in self._updates:
            self._updates[key] = self._solve(s0, t, order, corrector)
        return self._updates[key]

    def _solve(self, s0: int, t: int, order: int, corrector: bool) -> _Update:
        """diffusers' multistep_uni_{p,c}_bh_update scalars, on the host."""
        scheduler, sigmas = self.scheduler, self.scheduler.sigmas

        def log_snr(index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            alpha, sigma = scheduler._sigma_to_alpha_sigma_t(sigmas[index])
            return alpha, sigma, torch.log(alpha) - torch.log(sigma)

        alpha_t, sigma_t, lambda_t = log_snr(t)
        _, sigma_s0, lambda_s0 = log_snr(s0)
        h = lambda_t - lambda_s0
        rks = [(log_snr(s0 - i)[2] - lambda_s0) / h for i in range(1, order)]
        stacked = torch.stack([*rks, torch.ones(())])
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if scheduler.config.solver_type == "bh1" else torch.expm1(hh)
        rows, terms, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append(torch.pow(stacked, i - 1))
            terms.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        matrix, b = torch.stack(rows), torch.stack(terms)
        if corrector:
            rhos = torch.ones(1) * 0.5 if order == 1 else torch.linalg.solve(matrix, b)
        else:
            rhos = (
                None
                if order == 1
                else torch.ones(1) * 0.5
                if order == 2
                else torch.linalg.solve(matrix[:-1, :-1], b[:-1])
            )
        return _Update(
            ratio=sigma_t / sigma_s0,
            alpha_h_phi_1=alpha_t * h_phi_1,
            alpha_b_h=alpha_t * b_h,
            rks=tuple(rks),
            rhos=rhos,
        )

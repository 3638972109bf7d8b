"""Samplers: pure functions of (denoiser, noise, times, cond).  Deterministic given their inputs.

Teacher ODE samplers integrate the probability-flow ODE of ``x_t = alpha x0 + sigma eps``,
``dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat``, from t = 1 to 0 on a uniform grid in t:

- ``euler``: first-order step in the schedule's own time t;
- ``ddim``: the exact step with x0_hat and eps_hat held fixed, ``x_s = alpha_s x0_hat + sigma_s eps_hat``
  (Song et al. 2021, eq. 12 with eta = 0);
- ``heun``: Heun's second-order correction (Karras et al. 2022, Alg. 1), Euler on the last step.

The last step of every solver returns x0_hat itself (the limit sigma -> 0 of any step), so ``steps`` network
evaluations are used by euler/ddim and ``2 * steps - 1`` by heun.

The few-step student sampler (DMD2 Sec. 4.5) predicts x0 at each conditioning time and re-noises it with fresh
noise to the next time; DMD2's backward simulation runs the same loop.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

from .denoiser import Cond
from .schedules import Schedule, _as_batch, _bcast

Tensor = torch.Tensor
DenoiseFn = Callable[..., Tensor]  # (x_t, t, cond) -> x0
SOLVERS = ("euler", "ddim", "heun")
Solver = Literal["euler", "ddim", "heun"]


def time_grid(steps: int, t_max: float = 1.0, t_min: float = 0.0) -> list[float]:
    """``steps + 1`` uniformly spaced times from t_max down to t_min."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [t_max + (t_min - t_max) * i / steps for i in range(steps + 1)]


def nfe(solver: str, steps: int) -> int:
    """Network evaluations per sample (CFG doubles the batch, not the count)."""
    check_solver(solver)
    return 2 * steps - 1 if solver == "heun" else steps


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    return solver


def _velocity(schedule: Schedule, x: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    a, s = schedule.alpha_sigma(t)
    eps = (x.double() - _bcast(a, x) * x0.double()) / _bcast(s, x)
    return _bcast(schedule.d_alpha(t), x) * x0.double() + _bcast(schedule.d_sigma(t), x) * eps


def ode_step(
    denoise: DenoiseFn, schedule: Schedule, x_t: Tensor, t, s, cond: Cond = None, solver: Solver = "ddim",
    x0: Tensor | None = None,
) -> Tensor:
    """One probability-flow ODE step from time t to time s < t.  ``x0`` may pass a precomputed prediction at t.

    Gradients flow through ``denoise`` and x_t (ADM differentiates the fake score's step).
    """
    check_solver(solver)
    tb, sb = _as_batch(t, x_t), _as_batch(s, x_t)
    if x0 is None:
        x0 = denoise(x_t, tb, cond)
    if solver == "ddim":
        a_t, s_t = schedule.alpha_sigma(tb)
        a_s, s_s = schedule.alpha_sigma(sb)
        eps = (x_t.double() - _bcast(a_t, x_t) * x0.double()) / _bcast(s_t, x_t)
        return (_bcast(a_s, x_t) * x0.double() + _bcast(s_s, x_t) * eps).to(x_t.dtype)
    d = _velocity(schedule, x_t, tb, x0)
    h = _bcast(sb - tb, x_t)
    x_e = x_t.double() + h * d
    if solver == "euler":
        return x_e.to(x_t.dtype)
    x_e = x_e.to(x_t.dtype)
    d2 = _velocity(schedule, x_e, sb, denoise(x_e, sb, cond))
    return (x_t.double() + h * 0.5 * (d + d2)).to(x_t.dtype)


@torch.no_grad()
def sample_ode(
    denoise: DenoiseFn, schedule: Schedule, noise: Tensor, steps: int, cond: Cond = None, solver: Solver = "heun",
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Integrate the PF-ODE from ``schedule.prior(noise)`` at t = 1 to t = 0 in ``steps`` steps; returns x0."""
    check_solver(solver)
    grid = time_grid(steps)
    x = schedule.prior(noise)
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        x0 = denoise(x, _as_batch(t, x), cond)
        if i == steps - 1:
            x = x0
        else:
            x = ode_step(denoise, schedule, x, t, s, cond, solver, x0=x0)
        if callback is not None:
            callback(i, x)
    return x


def student_sample(
    student: DenoiseFn, schedule: Schedule, noise: Tensor, times: Sequence[float], cond: Cond = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None, stop_at: int | None = None,
) -> Tensor:
    """Few-step student sampling: x0 = G(x, t_k); re-noise x0 to t_{k+1} with fresh noise; repeat.

    ``generator`` draws the fresh noise; a sequence of generators (one per sample) makes each sample depend on its
    own seed only, whatever the batch it is drawn in.

    The first input is ``schedule.prior(noise)`` fed at ``times[0]`` (which may be below 1, as DMD2's one-step
    SDXL student at 399/1000).  With ``stop_at = k`` the loop stops *before* evaluating step k and returns the
    input x_{t_k} of that step (DMD2's backward simulation); otherwise it returns the final x0.
    """
    if len(times) < 1:
        raise ValueError("student times must hold at least one time")
    x = schedule.prior(noise)
    x0 = x
    last = len(times) if stop_at is None else stop_at
    for k in range(last):
        x0 = student(x, _as_batch(times[k], x), cond)
        if k + 1 < len(times):
            if isinstance(generator, (list, tuple)):
                fresh = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generator])
                fresh = fresh.to(x.device)
            else:
                fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = schedule.add_noise(x0, fresh, times[k + 1])
    return x if stop_at is not None else x0

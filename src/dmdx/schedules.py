"""Noise schedules on continuous time ``t`` in [0, 1]: the only place where schedule maths lives.

Every schedule writes a noisy sample as ``x_t = alpha(t) * x0 + sigma(t) * eps`` with ``t = 1`` the noisiest
point.  It also says what the backbone wants as its time input (``model_time``) and how the backbone's input is
scaled (``c_in``, 1 except for EDM).  Derivatives ``d_alpha`` and ``d_sigma`` are analytic so that ODE samplers
can integrate ``dx/dt = alpha'(t) x0 + sigma'(t) eps`` in the schedule's own time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

import torch

Tensor = torch.Tensor

TIME_INPUTS = ("t", "t1000", "index", "sigma", "edm_log_sigma")


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector [B] so it broadcasts against x [B, ...]."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


@dataclass
class Schedule:
    """Base class; subclasses define ``alpha``, ``sigma`` and their derivatives on t in [0, 1]."""

    name: ClassVar[str] = "base"
    time_input: str = "t"

    def __post_init__(self):
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {self.time_input!r}; allowed: {', '.join(TIME_INPUTS)}")

    # --- to implement -------------------------------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.alpha(t), self.sigma(t)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps`` (t is a scalar or a per-sample vector)."""
        t = _as_batch(t, x0)
        a, s = self.alpha_sigma(t)
        return (_bcast(a, x0) * x0.double() + _bcast(s, x0) * eps.double()).to(x0.dtype)

    def prior(self, noise: Tensor) -> Tensor:
        """The sampler's starting point at t = 1 from unit Gaussian noise (``sigma(1) * noise``)."""
        s = self.sigma(torch.ones((), dtype=torch.float64))
        return (noise.double() * s).to(noise.dtype)

    def c_in(self, t: Tensor) -> Tensor:
        """Scale applied to x_t before the backbone (EDM preconditioning); 1 elsewhere."""
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def training_time(self, t: Tensor) -> Tensor:
        """Times drawn for a training loss (DM, fake-score, GAN, ADM, ADP terms), as the backbone was trained on
        them: continuous here; discrete-time schedules snap them to their step grid."""
        return t

    def model_time(self, t: Tensor) -> Tensor:
        """The backbone's time input for continuous t, as ``time_input`` says."""
        t = torch.as_tensor(t, dtype=torch.float64)
        kind = self.time_input
        if kind == "t":
            out = t
        elif kind == "t1000":
            out = t * 1000.0
        elif kind == "index":
            out = t * (getattr(self, "num_train_timesteps", 1000) - 1)
        elif kind == "sigma":
            out = self.sigma(t)
        else:  # edm_log_sigma, EDM's c_noise
            out = 0.25 * torch.log(self.sigma(t))
        return out.float()

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def _as_batch(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


@dataclass
class VPDiscrete(Schedule):
    """DDPM betas on ``num_train_timesteps`` steps (SD1.5/SDXL use scaled_linear 0.00085..0.012).

    Continuous t maps to the fractional step index ``u = t * (T - 1)``; log(alpha_bar) is interpolated linearly
    between integer steps, so integer t*(T-1) reproduce diffusers' ``alphas_cumprod`` exactly.

    CogVideoX's schedulers modify alpha_bar twice (``CogVideoXDDIMScheduler``): the SNR shift
    ``ab / (s + (1 - s) ab)`` (SNR divided by ``snr_shift_scale`` = s) and, with ``rescale_betas_zero_snr``, the
    zero-terminal-SNR rescaling of sqrt(alpha_bar) (Lin et al. 2024, Alg. 1), so that alpha(1) = 0: its last
    alpha_bar is floored at 1e-30 (alpha ~ 1e-15) to keep the log table finite.
    """

    name: ClassVar[str] = "vp"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["linear", "scaled_linear"] = "scaled_linear"
    num_train_timesteps: int = 1000
    time_input: str = "index"
    snr_shift_scale: float = 1.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; allowed: linear, scaled_linear")
        if self.snr_shift_scale <= 0:
            raise ValueError(f"snr_shift_scale must be > 0, got {self.snr_shift_scale}")
        if self.snr_shift_scale == 1.0 and not self.rescale_betas_zero_snr:
            self._log_ab = torch.cumsum(torch.log1p(-self._betas()), 0)
        else:
            self._log_ab = torch.log(self.alphas_cumprod().clamp(min=1e-30))

    def _betas(self) -> Tensor:
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float64) ** 2

    def alphas_cumprod(self) -> Tensor:
        """diffusers' ``alphas_cumprod`` table (float64), SNR-shifted and zero-SNR rescaled as configured."""
        ab = torch.cumprod(1 - self._betas(), 0)
        s = self.snr_shift_scale
        ab = ab / (s + (1 - s) * ab)
        if self.rescale_betas_zero_snr:
            r = ab.sqrt()
            r0, r_last = r[0].clone(), r[-1].clone()
            ab = ((r - r_last) * r0 / (r0 - r_last)) ** 2
        return ab

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor]:
        T = self.num_train_timesteps
        u = t.double().clamp(0, 1) * (T - 1)
        lo = u.floor().clamp(max=T - 2).long()
        table = self._log_ab.to(t.device)
        slope = table[lo + 1] - table[lo]
        return table[lo] + (u - lo) * slope, slope * (T - 1)

    def training_time(self, t):
        """Snapped to the integer steps ``round(t (T - 1)) / (T - 1)``: a discrete-time UNet was only trained on
        integer timesteps, and the DMD2 reference draws its training timesteps with ``randint``."""
        T1 = self.num_train_timesteps - 1
        return torch.round(torch.as_tensor(t, dtype=torch.float64) * T1) / T1

    def alpha(self, t):
        return torch.exp(0.5 * self._interp(t)[0])

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(self._interp(t)[0]))

    def d_alpha(self, t):
        log_ab, dlog = self._interp(t)
        return 0.5 * torch.exp(0.5 * log_ab) * dlog

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)


@dataclass
class VPCosine(Schedule):
    """Improved-DDPM cosine schedule: alpha_bar(t) = cos^2((t + s)/(1 + s) * pi/2) / cos^2(s/(1 + s) * pi/2).

    t is capped at ``t_max_clip`` inside so that alpha(1) stays positive.
    """

    name: ClassVar[str] = "cosine"
    s: float = 0.008
    t_max_clip: float = 0.9946
    time_input: str = "t"

    def _f(self, t):
        return (t.double().clamp(0, 1) * self.t_max_clip + self.s) / (1 + self.s) * math.pi / 2

    def alpha(self, t):
        return torch.cos(self._f(t)) / math.cos(self.s / (1 + self.s) * math.pi / 2)

    def sigma(self, t):
        return torch.sqrt((1 - self.alpha(t) ** 2).clamp(min=0))

    def d_alpha(self, t):
        df = self.t_max_clip / (1 + self.s) * math.pi / 2
        return -torch.sin(self._f(t)) * df / math.cos(self.s / (1 + self.s) * math.pi / 2)

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t).clamp(min=1e-12)


@dataclass
class FlowMatching(Schedule):
    """Rectified flow, SD3/Flux convention ``x_t = (1 - s) x0 + s eps`` with ``s = shift t / (1 + (shift - 1) t)``.

    With ``shift = 1``, s = t.  A shift > 1 spends more of [0, 1] at high noise, exactly as the SD3/Flux
    schedulers shift their sigmas; so uniform grids and uniform training times in t inherit the shift.
    """

    name: ClassVar[str] = "flow"
    shift: float = 1.0
    time_input: str = "t1000"

    def __post_init__(self):
        super().__post_init__()
        if self.shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {self.shift}")

    def _s(self, t):
        t = t.double().clamp(0, 1)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def _ds(self, t):
        t = t.double().clamp(0, 1)
        return self.shift / (1 + (self.shift - 1) * t) ** 2

    def alpha(self, t):
        return 1 - self._s(t)

    def sigma(self, t):
        return self._s(t)

    def d_alpha(self, t):
        return -self._ds(t)

    def d_sigma(self, t):
        return self._ds(t)

    def model_time(self, t):
        # SD3/Flux transformers take the *shifted* sigma (times 1000), not the unshifted t.
        if self.time_input in ("t1000", "t"):
            scale = 1000.0 if self.time_input == "t1000" else 1.0
            return (self._s(torch.as_tensor(t, dtype=torch.float64)) * scale).float()
        return super().model_time(t)


@dataclass
class EDM(Schedule):
    """Karras et al. (EDM) variance-exploding sigmas: sigma(t) = (smin^(1/rho) + t (smax^(1/rho) - smin^(1/rho)))^rho.

    alpha = 1; the backbone sees ``c_in x_t`` with ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` and time
    ``c_noise = log(sigma) / 4``.
    """

    name: ClassVar[str] = "edm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    time_input: str = "edm_log_sigma"

    def _ab(self):
        a = self.sigma_min ** (1 / self.rho)
        return a, self.sigma_max ** (1 / self.rho) - a

    def alpha(self, t):
        return torch.ones_like(t, dtype=torch.float64)

    def d_alpha(self, t):
        return torch.zeros_like(t, dtype=torch.float64)

    def sigma(self, t):
        a, b = self._ab()
        return (a + t.double().clamp(0, 1) * b) ** self.rho

    def d_sigma(self, t):
        a, b = self._ab()
        return self.rho * b * (a + t.double().clamp(0, 1) * b) ** (self.rho - 1)

    def c_in(self, t):
        return 1 / torch.sqrt(self.sigma(torch.as_tensor(t, dtype=torch.float64)) ** 2 + self.sigma_data**2)


SCHEDULES: dict[str, type[Schedule]] = {"vp": VPDiscrete, "cosine": VPCosine, "flow": FlowMatching, "edm": EDM}


def make_schedule(spec: dict | str) -> Schedule:
    """Build a schedule from ``{"name": ..., **params}`` (as written by ``Schedule.to_dict``) or a bare name."""
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    fields = set(cls.__dataclass_fields__)
    unknown = set(spec) - fields
    if unknown:
        raise ValueError(f"unknown parameters for schedule {name!r}: {sorted(unknown)}; allowed: {sorted(fields)}")
    return cls(**spec)

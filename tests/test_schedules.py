import pytest
import torch

from dmdx.param import PREDICTIONS, convert, from_x0_eps, to_x0, to_x0_eps
from dmdx.schedules import SCHEDULES, EDM, FlowMatching, VPDiscrete, make_schedule

ALL = [make_schedule(n) for n in SCHEDULES] + [FlowMatching(shift=3.0), VPDiscrete(beta_schedule="linear",
                                                                                   beta_start=1e-4, beta_end=0.02)]


@pytest.mark.parametrize("sched", ALL, ids=lambda s: f"{s.name}")
@pytest.mark.parametrize("src", PREDICTIONS)
@pytest.mark.parametrize("dst", PREDICTIONS)
def test_conversions_round_trip(sched, src, dst):
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    eps = torch.randn(5, 3, dtype=torch.float64)
    a, s = sched.alpha_sigma(t)
    x_t = sched.add_noise(x0, eps, t)
    pred = from_x0_eps(x0, eps, src, a, s)
    back = convert(convert(pred, src, dst, x_t, a, s), dst, src, x_t, a, s)
    torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9)
    x0_hat, eps_hat = to_x0_eps(pred, src, x_t, a, s)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(to_x0(convert(pred, src, dst, x_t, a, s), dst, x_t, a, s), x0, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("sched", ALL, ids=lambda s: s.name)
def test_derivatives_match_finite_differences(sched):
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    da = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)
    ds = (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(sched.d_alpha(t), da, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sched.d_sigma(t), ds, rtol=1e-4, atol=1e-6)


def test_vp_discrete_matches_diffusers_alphas_cumprod():
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.double()
    s = VPDiscrete()
    idx = torch.tensor([0, 1, 250, 500, 999])
    t = idx.double() / 999
    torch.testing.assert_close(s.alpha(t) ** 2, ref[idx], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.model_time(t), idx.float())


def test_flow_convention_and_shift():
    s = FlowMatching()
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.alpha(t), 1 - t)
    torch.testing.assert_close(s.sigma(t), t)
    s3 = FlowMatching(shift=3.0)
    # SD3: sigma' = shift * sigma / (1 + (shift - 1) * sigma)
    torch.testing.assert_close(s3.sigma(torch.tensor([0.5], dtype=torch.float64)), torch.tensor([0.75],
                                                                                               dtype=torch.float64))
    assert float(s3.model_time(torch.tensor(0.5))) == pytest.approx(750.0)


def test_edm_sigma_range_and_preconditioning():
    s = EDM()
    assert float(s.sigma(torch.tensor(0.0))) == pytest.approx(0.002)
    assert float(s.sigma(torch.tensor(1.0))) == pytest.approx(80.0)
    assert float(s.c_in(torch.tensor(1.0))) == pytest.approx(1 / (80**2 + 0.25) ** 0.5)


def test_bad_names_list_allowed_values():
    with pytest.raises(ValueError, match="allowed: vp, cosine, flow, edm"):
        make_schedule("ddpm")
    with pytest.raises(ValueError, match="allowed: epsilon, v, x0, flow"):
        to_x0(torch.zeros(1, 2), "score", torch.zeros(1, 2), 1.0, 1.0)
    with pytest.raises(ValueError, match="allowed"):
        make_schedule({"name": "flow", "shfit": 3})

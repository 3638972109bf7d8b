import json

import pytest
import torch

from dmdx.denoiser import Denoiser
from dmdx.sampling import SOLVERS, nfe, ode_step, sample_ode, student_sample, time_grid
from dmdx.schedules import SCHEDULES, FlowMatching, make_schedule
from dmdx.mixtures import AnalyticDenoiser, GaussianMixture, load_mixture


def test_exact_denoiser_matches_monte_carlo():
    """E[x0 | x_t] in closed form equals a Monte-Carlo posterior mean (importance weights over prior samples)."""
    gmm = load_mixture("unequal")
    sched = FlowMatching()
    den = AnalyticDenoiser(gmm, sched)
    g = torch.Generator().manual_seed(0)
    x0, _ = gmm.sample(400_000, g)
    x0 = x0.double()
    for t in (0.3, 0.6, 0.9):
        a, s = (float(v) for v in sched.alpha_sigma(torch.tensor(t)))
        x_t = torch.tensor([[1.0, 0.5], [-1.5, 0.2]], dtype=torch.float64)
        logw = -((x_t[:, None, :] - a * x0[None]) ** 2).sum(-1) / (2 * s**2)
        w = torch.softmax(logw, dim=1)
        mc = w @ x0
        exact = den(x_t.float(), t).double()
        torch.testing.assert_close(exact, mc, atol=0.02, rtol=0)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_euler_200_steps_recovers_mixture_weights(name):
    """A 200-step Euler sample of the exact teacher recovers the weights within 0.03 (total variation)."""
    gmm = load_mixture("unequal")
    sched = make_schedule(name)
    den = AnalyticDenoiser(gmm, sched)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    x = sample_ode(den, sched, noise, 200, solver="euler" if name != "edm" else "heun")
    k = torch.cdist(x.double(), gmm.means).argmin(1)
    w = torch.bincount(k, minlength=5).double() / len(k)
    tol = 0.06 if name == "vp" else 0.03  # SD's VP schedule keeps alpha(1) = 0.068: its prior is slightly off
    assert 0.5 * (w - gmm.weights).abs().sum() < tol


def test_solvers_agree_and_count_evaluations():
    gmm = load_mixture("ring8")
    sched = FlowMatching()
    calls = []

    def den(x, t, c=None):
        calls.append(1)
        return AnalyticDenoiser(gmm, sched)(x, t, c)

    noise = torch.randn(256, 2)
    outs = {}
    for solver in SOLVERS:
        calls.clear()
        outs[solver] = sample_ode(den, sched, noise, 50, solver=solver)
        assert len(calls) == nfe(solver, 50)
    torch.testing.assert_close(outs["euler"], outs["ddim"], atol=1e-5, rtol=0)  # identical for flow matching
    assert (outs["heun"] - outs["ddim"]).norm(dim=1).mean() < 0.05


def test_samplers_are_deterministic():
    den = AnalyticDenoiser(load_mixture("ring8"), FlowMatching())
    n = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    a = sample_ode(den, den.schedule, n, 8)
    b = sample_ode(den, den.schedule, n, 8)
    assert torch.equal(a, b)
    s1 = student_sample(den, den.schedule, n, [1.0, 0.5], generator=torch.Generator().manual_seed(0))
    s2 = student_sample(den, den.schedule, n, [1.0, 0.5], generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2)


def test_ddim_steps_converge_to_exact_ode_for_a_single_gaussian():
    """For one Gaussian the PF-ODE map is known in closed form; small DDIM steps converge to it (first order)."""
    gmm = GaussianMixture([[1.0, -1.0]], [1.0], 0.5)
    sched = FlowMatching()
    den = AnalyticDenoiser(gmm, sched)
    x = torch.randn(16, 2, dtype=torch.float64).float()
    # exact ODE map for a Gaussian: (x_s - a_s mu) / sqrt(v_s) = (x_t - a_t mu) / sqrt(v_t)
    t, s = 0.8, 0.3
    a_t, s_t = (float(v) for v in sched.alpha_sigma(torch.tensor(t)))
    a_s, s_s = (float(v) for v in sched.alpha_sigma(torch.tensor(s)))
    mu = gmm.means.float()
    v_t, v_s = a_t**2 * 0.25 + s_t**2, a_s**2 * 0.25 + s_s**2
    exact = a_s * mu + (x - a_t * mu) * (v_s / v_t) ** 0.5
    # many small DDIM steps converge to it
    errs = []
    for n in (50, 200):
        y = x
        grid = torch.linspace(t, s, n + 1)
        for i in range(n):
            y = ode_step(den, sched, y, float(grid[i]), float(grid[i + 1]))
        errs.append(float((y - exact).abs().max()))
    assert errs[1] < 3e-3
    assert errs[1] < errs[0] / 3  # error shrinks ~linearly with the step size


def test_cfg_formula_on_conditional_mixture():
    gmm = load_mixture("ring8")
    den = AnalyticDenoiser(gmm, FlowMatching())
    x = torch.randn(8, 2)
    cond = {"labels": torch.arange(8)}
    c = den(x, 0.7, cond)
    u = den(x, 0.7, None)
    torch.testing.assert_close(den(x, 0.7, cond, guidance=3.0), u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)
    # a label restricts the posterior to its component, even where x_t sits on another component:
    # E[x0 | x_t, k] = mu_k + (alpha s^2 / v)(x_t - alpha mu_k)
    lab = torch.roll(torch.arange(8), 3)
    mu = gmm.means.float()
    x_t = 0.9 * mu  # flow: alpha(0.1) = 0.9, sigma = 0.1
    gain = 0.9 * 0.01 / (0.81 * 0.01 + 0.01)
    want = mu[lab] + gain * (x_t - 0.9 * mu[lab])
    torch.testing.assert_close(den(x_t, 0.1, {"labels": lab}), want, atol=1e-5, rtol=0)


def test_student_sampler_backward_simulation_times():
    den = AnalyticDenoiser(load_mixture("ring8"), FlowMatching())
    noise = torch.randn(32, 2)
    times = [1.0, 0.75, 0.5, 0.25]
    seen = []

    def spy(x, t, c=None):
        seen.append(float(t[0]))
        return den(x, t, c)

    x_in = student_sample(spy, den.schedule, noise, times, stop_at=2)
    assert seen == [1.0, 0.75]  # k = 2 runs two student steps without the training one
    assert x_in.shape == noise.shape
    assert torch.equal(student_sample(spy, den.schedule, noise, times, stop_at=0), den.schedule.prior(noise))
    assert time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_mixture_files_and_errors(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"means": [[0, 0], [3, 3]], "weights": [1, 3], "std": 0.2}))
    gmm = load_mixture(str(p))
    torch.testing.assert_close(gmm.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="ring8"):
        load_mixture("ring9")
    with pytest.raises(FileNotFoundError):
        load_mixture(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"means": [[0, 0]], "weights": [1]}))
    with pytest.raises(ValueError, match="std"):
        load_mixture(str(bad))
    with pytest.raises(ValueError, match="entries"):
        GaussianMixture([[0, 0], [1, 1]], [1.0], 0.1)


def test_denoiser_wraps_epsilon_backbone():
    """A backbone predicting epsilon exactly gives the exact x0 through the Denoiser."""
    sched = make_schedule("vp")

    class Oracle(torch.nn.Module):
        feature_layers = ()

        def __init__(self, eps):
            super().__init__()
            self.eps = eps

        def forward(self, x, time, cond):
            return self.eps

    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, t)
    den = Denoiser(Oracle(eps), sched, "epsilon")
    torch.testing.assert_close(den(x_t, t), x0, atol=1e-4, rtol=1e-4)


def test_scatter7_is_a_valid_unequal_mixture_and_the_exact_sampler_recovers_it():
    """scatter7: 7 modes, weights summing to 1 with no two equal; exact samples and the exact teacher's 50-step
    Heun ODE recover the weights (max per-mode error 0.02), every sample within 3 std of a mode."""
    from dmdx.eval.vectors import mixture_metrics

    gmm = load_mixture("scatter7")
    assert gmm.num_components == 7 and float(gmm.weights.sum()) == pytest.approx(1.0)
    assert len(set(gmm.weights.tolist())) == 7
    assert torch.cdist(gmm.means, gmm.means).add(torch.eye(7) * 99).min() > 6 * gmm.std.max()  # separated
    exact, _ = gmm.sample(20000, generator=torch.Generator().manual_seed(0))
    m = mixture_metrics(exact, gmm)
    assert m["modes_covered"] == 7 and m["max_weight_error"] < 0.01
    sched = FlowMatching()
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    x = sample_ode(AnalyticDenoiser(gmm, sched), sched, noise, 50, solver="heun")
    m = mixture_metrics(x, gmm)
    assert m["quality"] > 0.97 and m["max_weight_error"] < 0.02


def test_class_conditional_vp_mixture_teacher_is_exact():
    """classes3: a class-conditional mixture on SD's VP schedule (integer times).  Its label restricts the exact
    posterior to the class's components (a Monte-Carlo posterior over exact class samples agrees), and the ODE
    started from the exact marginal at t = 1 (alpha(1) x0 + sigma(1) eps: on VP, alpha(1) = 0.068 > 0) recovers
    every class's own weights; CFG is the formula on those exact posteriors."""
    from dmdx.eval.vectors import class_metrics
    from dmdx.schedules import VPDiscrete
    from dmdx.teachers.analytic import gmm_model

    model = gmm_model("classes3")
    den, gmm, sched = model.denoiser, model.denoiser.backbone, model.denoiser.schedule
    assert isinstance(sched, VPDiscrete) and model.info.num_classes == 3 == gmm.num_classes
    g = torch.Generator().manual_seed(0)
    # the conditional posterior mean against Monte Carlo over exact samples of class 1
    x0, _ = gmm.sample(200_000, g, classes=torch.ones(200_000, dtype=torch.long))
    x0 = x0.double()
    t = 0.6
    a, s = (float(v) for v in sched.alpha_sigma(torch.tensor(t)))
    x_t = torch.tensor([[1.0, 0.5], [-1.5, 0.2]], dtype=torch.float64)
    w = torch.softmax(-((x_t[:, None, :] - a * x0[None]) ** 2).sum(-1) / (2 * s**2), dim=1)
    exact = den(x_t.float(), t, {"labels": torch.ones(2, dtype=torch.long)}).double()
    torch.testing.assert_close(exact, w @ x0, atol=0.02, rtol=0)
    # many ODE steps from the exact marginal at t = 1 give each class its own weights (0.7 / 0.3)
    n = 1500
    labels = torch.arange(n) % 3
    x0, _ = gmm.sample(n, g, classes=labels)
    a1, s1 = (float(v) for v in sched.alpha_sigma(torch.tensor(1.0)))
    x1 = a1 * x0 + s1 * torch.randn(x0.shape, generator=g)
    x = sample_ode(den, sched, x1 / s1, 100, {"labels": labels}, solver="ddim")  # prior(z) = sigma(1) z = x1
    m = class_metrics(x, labels, gmm)
    assert m["modes_covered"] == 6 and m["off_class"] == 0 and m["quality"] > 0.97
    assert m["max_weight_error"] < 0.04, m["class_mode_weights"]  # 500 samples a class: sd 0.02
    # CFG on the exact posteriors
    cond = {"labels": torch.tensor([0, 1, 2, 3])}  # 3: the null label
    xt = torch.randn(4, 2, generator=g)
    c, u = den(xt, 0.4, cond), den(xt, 0.4, None)
    torch.testing.assert_close(den(xt, 0.4, cond, guidance=5.0), u + 5.0 * (c - u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c[3], u[3])


def test_mixture_files_choose_schedule_classes_and_guidance(tmp_path):
    from dmdx.data import load_dataset
    from dmdx.teachers.analytic import fit_surrogate, gmm_model

    p = tmp_path / "m.json"
    p.write_text(json.dumps({"means": [[0, 0], [3, 3], [-3, 3]], "weights": [1, 1, 2], "std": 0.2,
                             "classes": [0, 1, 1], "schedule": {"name": "vp"}, "guidance": 4}))
    model = gmm_model(str(p))
    assert model.denoiser.schedule.name == "vp" and model.info.num_classes == 2 and model.info.guidance == 4
    assert gmm_model("ring8").info.num_classes == 0 and gmm_model("ring8").denoiser.schedule.name == "flow"
    ds = load_dataset(f"gmm:{p}")
    assert ds.num_classes == 2 and set(ds.labels.tolist()) == {0, 1}
    assert torch.equal(ds.mixture.classes[torch.cdist(ds.x.double(), ds.mixture.means).argmin(1)], ds.labels)
    sur = fit_surrogate(model, 20, batch_size=64, progress=False)  # a conditional MLP that takes the null label
    assert sur.backbone.config["num_classes"] == 2
    out = sur(torch.zeros(3, 2), 0.5, {"labels": torch.tensor([0, 1, 2])}, guidance=4.0)
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    bad = tmp_path / "bad.json"
    for extra, match in (({"classes": [0, 2, 2]}, "classes"), ({"sched": "vp"}, "unknown keys")):
        bad.write_text(json.dumps({"means": [[0, 0], [3, 3], [-3, 3]], "weights": [1, 1, 2], "std": 0.2, **extra}))
        with pytest.raises(ValueError, match=match):
            gmm_model(str(bad))

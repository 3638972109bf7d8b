
import pytest
import torch

from dmdx.methods import METHODS
from dmdx.methods.adm import dmd2_scale, hinge_d, hinge_g, smoothness_penalty
from dmdx.methods.adp import adp_input, adp_times
from dmdx.methods.dmd2 import DMD2, dm_loss
from dmdx.mixtures import AnalyticDenoiser, GaussianMixture
from dmdx.sampling import ode_step, student_sample
from dmdx.schedules import FlowMatching, VPDiscrete
from dmdx.train.setup import student_times

from helpers import make_trainer, state_of, tiny_config


def test_dm_gradient_is_zero_when_fake_equals_real(tmp_path):
    cfg = tiny_config("dmd2")
    cfg.method.gan = False
    tr = make_trainer(cfg, tmp_path)
    ctx = tr.ctx
    ctx.teacher = ctx.teacher_net  # real score == network the fake score is copied from
    cfg.method.real_guidance = 1.0
    method = DMD2(cfg.method, ctx)
    x, cond, _ = ctx.student_x0(32)
    loss, logs = method.dm_term(x, cond)
    loss.backward()
    assert logs["dm/grad_norm"] == 0.0
    for p in ctx.student.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_dm_gradient_points_from_fake_to_real_distribution():
    """Real N(mu_r, s^2), fake N(mu_f, s^2): the descent direction -grad is exactly parallel to mu_r - mu_f."""
    sched = FlowMatching()
    real = AnalyticDenoiser(GaussianMixture([[2.0, 0.0]], [1.0], 0.3), sched)
    fake = AnalyticDenoiser(GaussianMixture([[-1.0, 1.0]], [1.0], 0.3), sched)
    x = (torch.tensor([[-1.0, 1.0]]) + 0.3 * torch.randn(64, 2)).requires_grad_(True)
    t = torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    x_t = sched.add_noise(x.detach(), torch.randn(64, 2), t)
    loss, grad = dm_loss(x, real(x_t, t), fake(x_t, t))
    direction = torch.tensor([3.0, -1.0]) / 10**0.5
    cos = torch.nn.functional.cosine_similarity(-grad, direction[None], dim=1)
    torch.testing.assert_close(cos, torch.ones(64), atol=1e-4, rtol=0)
    loss.backward()
    # the surrogate's gradient w.r.t. x is grad / numel (mean reduction, factor 0.5 * 2)
    torch.testing.assert_close(x.grad, grad / grad.numel(), atol=1e-6, rtol=1e-5)


def test_dm_gradient_sharpens_a_smeared_ring_toward_the_modes():
    """A student spread evenly over the ring (64 modes) vs the 8-mode ring teacher, both scores exact: at low noise
    the DM update moves samples along the ring toward their nearest teacher mode; at high noise it vanishes."""
    import math

    from dmdx.mixtures import _ring, load_mixture

    torch.manual_seed(0)
    sched = FlowMatching()
    real = AnalyticDenoiser(load_mixture("ring8"), sched)
    fake_gmm = GaussianMixture(_ring(64, 2.0), [1 / 64] * 64, 0.1)
    fake = AnalyticDenoiser(fake_gmm, sched)
    x, _ = fake_gmm.sample(4000, generator=torch.Generator().manual_seed(0))
    angle = torch.atan2(x[:, 1], x[:, 0])
    offset = (angle + math.pi / 8) % (math.pi / 4) - math.pi / 8  # signed angle from the nearest teacher mode
    tangent = torch.stack([-torch.sin(angle), torch.cos(angle)], 1)
    for t, sharpens in ((0.05, True), (0.2, True), (0.9, False)):
        tt = torch.full((len(x),), t, dtype=torch.float64)
        x_t = sched.add_noise(x, torch.randn_like(x), tt)
        _, grad = dm_loss(x, real(x_t, tt).float(), fake(x_t, tt).float())
        toward = ((-grad * tangent).sum(1) * -offset.sign()).mean().item()
        if sharpens:
            assert toward > 0.5, (t, toward)
        else:
            assert abs(toward) < 0.01, (t, toward)


def test_hinge_losses():
    d_real = torch.tensor([2.0, 0.5, -1.0])
    d_fake = torch.tensor([-2.0, 0.0, 1.0])
    assert hinge_d(d_real, d_fake).item() == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_g(d_fake).item() == pytest.approx(1 / 3 * (2.0 - 0.0 - 1.0))


def test_adp_time_sampler_follows_cubic_law():
    torch.manual_seed(0)
    t = adp_times(200_000, True, "cpu")
    # P(t <= c) = P(1 - u^3 <= c) = 1 - (1 - c)^(1/3)
    for c in (0.1, 0.5, 0.9, 0.99):
        assert float((t <= c).double().mean()) == pytest.approx(1 - (1 - c) ** (1 / 3), abs=0.005)


@pytest.fixture(scope="module")
def adp_method(tmp_path_factory):
    """An ADP method of a tiny run (its student and pairs are replaced per test)."""
    tr = make_trainer(tiny_config("adp"), tmp_path_factory.mktemp("adp"))
    return tr.build_stage(0).method


class _InputSpy(torch.nn.Module):
    """A student that records what it is fed: (x_t, t) per call; returns x_t."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule, self.calls = schedule, []

    def forward(self, x, t, cond=None):
        self.calls.append((x.detach().clone(), torch.as_tensor(t).detach().clone()))
        return x


@pytest.mark.parametrize("first", [1.0, 0.399])
@pytest.mark.parametrize("schedule", [FlowMatching(), VPDiscrete()], ids=["flow", "vp"])
def test_adp_input_at_the_students_first_time_is_the_samplers(adp_method, monkeypatch, schedule, first):
    """ADP's training input at the student's first time is exactly what sampling feeds there (``prior(noise)``: no
    ``alpha(1) x0`` leak on VP, no image at t = 0.399); below it, the pair's path at that time."""
    import types

    import dmdx.methods.adp as adp_module

    ctx = adp_method.ctx
    times = student_times([first], schedule)  # VP: snapped to the integer step, as at set-up
    n = 101
    noise, x0 = torch.randn(n, 2), 3 + torch.randn(n, 2)
    monkeypatch.setattr(ctx, "student", _InputSpy(schedule))
    monkeypatch.setattr(ctx, "times", times)
    monkeypatch.setattr(ctx, "pairs", types.SimpleNamespace(batch=lambda k, device: (noise, x0, None)))
    monkeypatch.setattr(adp_module, "adp_times", lambda k, cubic, device: torch.linspace(1, 0, k, dtype=torch.float64))
    adp_method.predict(grad=False)
    (x_in, t), = ctx.student.calls
    ctx.student.calls.clear()
    student_sample(ctx.student, schedule, noise, times)
    (x_sample, t_sample), = ctx.student.calls
    at_first = t == times[0]
    assert int(at_first.sum()) >= 1 and torch.equal(t_sample, torch.full((n,), times[0], dtype=torch.float64))
    assert torch.equal(x_in[at_first], x_sample[at_first])
    assert torch.equal(x_in[at_first], schedule.prior(noise)[at_first])
    below = ~at_first
    assert (t[below] < times[0]).all() and int(below.sum()) >= 30
    torch.testing.assert_close(x_in[below], schedule.add_noise(x0, noise, t)[below])


def test_adp_cubic_law_puts_its_mass_above_the_first_time_on_it():
    """With the paper's t' = 1 - u^3, the share fed at the first time t1 is P(t' >= t1) = (1 - t1)^(1/3): 0.84 at
    0.399; at t1 = 1 the VP step grid gives it P(t' rounds to 999/999) = (0.5 / 999)^(1/3) = 0.079."""
    torch.manual_seed(0)
    n = 200_000
    x0, noise = torch.zeros(n, 1), torch.randn(n, 1)
    flow, vp = FlowMatching(), VPDiscrete()
    _, t = adp_input(flow, x0, noise, adp_times(n, True, "cpu"), 0.399)
    assert float((t == 0.399).double().mean()) == pytest.approx((1 - 0.399) ** (1 / 3), abs=0.005)
    _, t = adp_input(vp, x0, noise, vp.training_time(adp_times(n, True, "cpu")), 1.0)
    assert float((t == 1.0).double().mean()) == pytest.approx((0.5 / 999) ** (1 / 3), abs=0.003)


@pytest.mark.parametrize("method", ["dmd", "dmd2", "adm", "adp"])
def test_each_phase_trains_only_its_networks_and_teacher_stays_frozen(method, tmp_path):
    cfg = tiny_config(method, steps=2)
    tr = make_trainer(cfg, tmp_path)
    teacher_before = state_of(tr.ctx.teacher_net)
    stage = tr.build_stage(0)
    for phase in stage.method.phases():
        before = {n: state_of(net) for n, net in stage.trainables.items()}
        tr.run_phase(stage, phase, 0)
        for name, net in stage.trainables.items():
            changed = any(not torch.equal(v, before[name][k]) for k, v in net.state_dict().items())
            assert changed == (name in phase.trains), f"{method}/{phase.name}: {name} changed={changed}"
        for p in tr.ctx.teacher_net.parameters():
            assert p.grad is None
    after = state_of(tr.ctx.teacher_net)
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items())


def test_adm_student_gradient_goes_through_fake_step_and_discriminator(tmp_path):
    """Zeroing the fake score's ODE step cuts the student's gradient: no other path reaches it."""
    cfg = tiny_config("adm")
    tr = make_trainer(cfg, tmp_path)
    stage = tr.build_stage(0)
    adm = stage.method
    for name, net in stage.trainables.items():
        net.requires_grad_(name == "student")
    loss, _ = adm.student_loss()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.ctx.student.parameters())
    assert all(p.grad is None for p in adm.disc.heads.parameters())
    assert all(p.grad is None for p in adm.fake_score.parameters())
    tr.ctx.student.zero_grad(set_to_none=True)
    adm.fake_step = lambda x_t, t, s, cond: torch.zeros_like(x_t).detach()
    loss, _ = adm.student_loss()
    assert not loss.requires_grad


def test_adm_normalised_generator_gradient_reaches_only_the_student(tmp_path):
    """``grad_norm=dmd2`` (off by default: the paper's loss) changes the student's gradient, not its routing: the
    fake score and heads get none, and an unknown value (the removed ``sample`` included) is refused."""
    assert METHODS["adm"].Config().grad_norm == "none"
    cfg = tiny_config("adm")
    cfg.method.grad_norm = "dmd2"
    tr = make_trainer(cfg, tmp_path)
    stage = tr.build_stage(0)
    adm = stage.method
    for name, net in stage.trainables.items():
        net.requires_grad_(name == "student")
    loss, logs = adm.student_loss()
    assert "loss/gan_g" in logs and logs["adm/dmd2_scale"] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.ctx.student.parameters())
    assert all(p.grad is None for p in adm.disc.heads.parameters())
    assert all(p.grad is None for p in adm.fake_score.parameters())
    for bad in ("tensor", "sample"):
        with pytest.raises(ValueError, match="grad_norm.*allowed: none, dmd2"):
            METHODS["adm"].check(METHODS["adm"].Config(grad_norm=bad), (2,))


def _adm_at_a_score_equilibrium(tmp_path):
    """ADM whose fake score equals its real score exactly (the teacher network on both sides, guidance 1), and a fixed
    student sample x0 (a leaf with a gradient)."""
    cfg = tiny_config("adm")
    cfg.method.real_guidance = 1.0
    tr = make_trainer(cfg, tmp_path)
    ctx = tr.ctx
    ctx.teacher = ctx.teacher_net  # the fake score starts as a copy of this network
    adm = tr.build_stage(0).method
    adm.fake_score.requires_grad_(False)
    x0 = torch.randn(32, 2).requires_grad_(True)
    ctx.student_x0 = lambda n, grad=True: (x0, None, 1.0)
    return adm, x0


def _generator_gradient(adm, x0, grad_norm, seed=1):
    adm.cfg.grad_norm = grad_norm
    x0.grad = None
    torch.manual_seed(seed)  # the same times and noise for every call
    loss, _ = adm.student_loss()
    loss.backward()
    return x0.grad.clone()


@pytest.mark.parametrize("grad_norm", ["none", "dmd2"])
def test_adm_generator_gradient_is_zero_at_an_exact_equilibrium(tmp_path, grad_norm):
    """Fake score = real score (guidance 1): both ODE steps give the same latents, so no critic can tell them apart,
    and a critic at its equilibrium is constant (any constant in [-1, 1] minimises the hinge loss of two equal
    distributions).  Then the student's gradient is exactly 0 under every normalisation: none makes a push of its own.

    (The paper's generator loss ``-D(x_fake)`` never sees ``x_real``: with random, untrained heads its gradient at
    this equilibrium is the heads' noise, not 0, under any normalisation; see the next test for what a normalisation
    may do with that noise.)"""
    adm, x0 = _adm_at_a_score_equilibrium(tmp_path)
    torch.manual_seed(0)
    x_t, t, s = adm.noised(x0.detach())
    assert torch.equal(adm.real_step(x_t, t, s, None), adm.fake_step(x_t, t, s, None))
    with torch.no_grad():
        for head in adm.disc.heads.heads:
            last = [m for m in head.modules() if getattr(m, "weight", None) is not None][-1]
            last.weight.zero_()  # D(x) = its last bias, whatever x
    g = _generator_gradient(adm, x0, grad_norm)
    assert torch.count_nonzero(g) == 0 and torch.isfinite(g).all()


def test_adm_normalised_generator_gradient_does_not_amplify_an_uninformed_critic(tmp_path):
    """At the same exact equilibrium with random heads, the gradient is the heads' noise.  A normalisation must not
    turn a critic that knows less into the same push: the gradient of ``eps * D`` is ``eps`` times that of ``D``
    under every option (``sample``, removed in issue 33, divided each sample's gradient by its own rms and gave 1 per
    sample whatever eps), and ``dmd2`` is the raw gradient divided per sample by ``mean |x0 - x0_real(x_t)|``."""
    adm, x0 = _adm_at_a_score_equilibrium(tmp_path)
    disc = adm.disc
    grads = {}
    for eps in (1.0, 1e-3):
        adm.disc = lambda x, s, cond, eps=eps: eps * disc(x, s, cond)
        for norm in ("none", "dmd2"):
            grads[norm, eps] = _generator_gradient(adm, x0, norm)
    for norm in ("none", "dmd2"):
        assert grads[norm, 1.0].abs().sum() > 0
        torch.testing.assert_close(grads[norm, 1e-3], 1e-3 * grads[norm, 1.0], rtol=1e-4, atol=0)
    torch.manual_seed(1)
    x_t, t, _ = adm.noised(x0.detach())  # what student_loss drew
    scale = (x0.detach() - adm.ctx.teacher(x_t, t, None)).abs().mean(1)
    torch.testing.assert_close(scale, dmd2_scale(x0, adm.ctx.teacher(x_t, t, None)))
    torch.testing.assert_close(grads["dmd2", 1.0], grads["none", 1.0] / scale[:, None], rtol=1e-4, atol=0)


def test_adm_terms_at_weight_zero_cost_no_pass(tmp_path):
    """With the GAN terms at weight 0 (the DM-loss control of benchmarks/adm-study.md) ADM runs no ODE step and no
    discriminator pass, so its iteration costs what the DM loss and the fake score's denoising loss cost; a student
    with no loss at all is refused."""
    cfg = tiny_config("adm")
    cfg.method.dm_weight, cfg.method.gan_g_weight, cfg.method.gan_d_weight = 1.0, 0.0, 0.0
    stage = make_trainer(cfg, tmp_path).build_stage(0)
    adm = stage.method

    def refuse(*_):
        raise AssertionError("a pass at weight 0")

    adm.disc, adm.real_step, adm.fake_step = refuse, refuse, refuse
    loss, logs = adm.student_loss()
    assert loss.requires_grad and "loss/gan_g" not in logs and "dm/grad_norm" in logs
    loss, logs = adm.critic_loss()
    assert loss.requires_grad and set(logs) == {"loss/fake_dsm"}
    cfg.method.dm_weight = 0.0
    with pytest.raises(ValueError, match="no loss"):
        METHODS["adm"].check(cfg.method, (2,))


def test_adm_dm_term_is_zero_while_fake_equals_real_and_reaches_only_the_student(tmp_path):
    """``dm_weight`` (off by default: the paper's ADM) adds DMD2's DM loss to ADM's student loss: zero while the fake
    score equals the real one (no CFG), the student's alone once they differ; a negative weight is refused."""
    assert METHODS["adm"].Config().dm_weight == 0.0
    cfg = tiny_config("adm")
    cfg.method.dm_weight, cfg.method.gan_g_weight, cfg.method.real_guidance = 1.0, 0.0, 1.0
    tr = make_trainer(cfg, tmp_path)
    tr.ctx.teacher = tr.ctx.teacher_net  # the fake score starts as a copy of this network
    stage = tr.build_stage(0)
    adm = stage.method
    for name, net in stage.trainables.items():
        net.requires_grad_(name == "student")
    loss, logs = adm.student_loss()
    assert logs["dm/grad_norm"] == 0.0
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in tr.ctx.student.parameters())
    tr.ctx.student.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p in adm.fake_score.parameters():
            p.add_(0.1 * torch.randn_like(p))
    loss, logs = adm.student_loss()
    assert logs["dm/grad_norm"] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.ctx.student.parameters())
    assert all(p.grad is None for net in adm.networks().values() for p in net.parameters())
    with pytest.raises(ValueError, match="dm_weight"):
        METHODS["adm"].check(METHODS["adm"].Config(dm_weight=-1.0), (2,))

@pytest.mark.parametrize("grad_norm", ["none", "dmd2"])
@pytest.mark.parametrize("dt", [1.0, 0.25])
def test_adm_generator_gradient_points_from_fake_to_real_once_its_critic_has_learned(tmp_path, dt, grad_norm):
    """Exact scores of two shifted Gaussians (real N(mu_r, s^2), fake = the student's N(mu_f, s^2)) and a small
    critic trained on ADM's own inputs: the critic separates the two ODE steps, and ADM's generator loss, through
    ``student_loss`` and the fake score's step, moves the student's samples along mu_r - mu_f, as the DM loss would."""
    torch.manual_seed(0)
    cfg = tiny_config("adm")
    cfg.method.dt, cfg.method.grad_norm = dt, grad_norm
    tr = make_trainer(cfg, tmp_path)
    adm, ctx = tr.build_stage(0).method, tr.ctx
    mu_r, mu_f = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    real = AnalyticDenoiser(GaussianMixture([mu_r.tolist()], [1.0], 0.3), ctx.schedule)
    adm.fake_score = AnalyticDenoiser(GaussianMixture([mu_f.tolist()], [1.0], 0.3), ctx.schedule)
    ctx.teacher = lambda x, t, cond, guidance=None: real(x, t, cond)
    critic = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1))
    adm.disc = lambda x, s, cond: critic(torch.cat([x, s[:, None].float()], 1))
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for _ in range(200):
        with torch.no_grad():
            x_t, t, s = adm.noised(mu_f + 0.3 * torch.randn(256, 2))
            x_real, x_fake = adm.real_step(x_t, t, s, None), adm.fake_step(x_t, t, s, None)
        d_real, d_fake = adm.disc(x_real, s, None), adm.disc(x_fake, s, None)
        opt.zero_grad()
        hinge_d(d_real, d_fake).backward()
        opt.step()
    acc = 0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean())
    assert acc > 0.75, acc
    x0 = (mu_f + 0.3 * torch.randn(512, 2)).requires_grad_(True)
    ctx.student_x0 = lambda n, grad=True: (x0, None, 1.0)
    critic.requires_grad_(False)
    loss, _ = adm.student_loss()
    loss.backward()
    move = -x0.grad.mean(0)
    cos = torch.nn.functional.cosine_similarity(move, mu_r - mu_f, dim=0)
    assert cos > 0.9, cos


def test_adm_ode_step_is_the_samplers_step(tmp_path):
    cfg = tiny_config("adm")
    tr = make_trainer(cfg, tmp_path)
    adm = tr.build_stage(0).method
    x_t = torch.randn(8, 2)
    t = torch.full((8,), 0.6, dtype=torch.float64)
    s = t - cfg.method.dt
    want = ode_step(lambda a, b, c: tr.ctx.teacher(a, b, c, guidance=1.0), tr.ctx.schedule, x_t, t, s, None, "ddim")
    torch.testing.assert_close(adm.real_step(x_t, t, s, None), want)
    want_f = ode_step(adm.fake_score, tr.ctx.schedule, x_t, t, s, None, "ddim")
    torch.testing.assert_close(adm.fake_step(x_t, t, s, None), want_f)


def test_backward_simulation_feeds_the_chosen_time(tmp_path):
    cfg = tiny_config("dmd2")
    cfg.student.times = [1.0, 0.75, 0.5, 0.25]
    tr = make_trainer(cfg, tmp_path)
    ctx = tr.ctx
    real_student = ctx.student
    calls = []

    class Spy(torch.nn.Module):
        schedule = real_student.schedule

        def forward(self, x, t, cond=None):
            calls.append((float(torch.as_tensor(t).reshape(-1)[0]), torch.is_grad_enabled()))
            return real_student(x, t, cond)

    ctx.student = Spy()
    seen_k = set()
    for _ in range(40):
        calls.clear()
        _, _, t_k = ctx.student_x0(4)
        k = cfg.student.times.index(t_k)
        seen_k.add(k)
        assert [c[0] for c in calls] == cfg.student.times[: k + 1]
        assert [c[1] for c in calls] == [False] * k + [True]
    assert seen_k == {0, 1, 2, 3}


def test_registry_lists_methods_in_errors():
    from dmdx.methods import get_method

    with pytest.raises(ValueError, match="dmd, dmd2, adm, adp, dmdx, sid, vsd, gdd"):
        get_method("dmd3")
    assert set(METHODS) == {"dmd", "dmd2", "adm", "adp", "dmdx", "sid", "vsd", "gdd"}


def test_adp_regression_anchor_reaches_only_the_student(tmp_path):
    """ADP's optional regression term on the pairs trains the student, never the heads; off by default."""
    assert METHODS["adp"].Config().reg_weight == 0.0
    cfg = tiny_config("adp")
    cfg.method.reg_weight, cfg.method.latent_weight = 1.0, 0.0  # the regression term alone
    tr = make_trainer(cfg, tmp_path)
    adp = tr.build_stage(0).method
    loss, logs = adp.student_loss()
    assert logs["loss/reg"] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.ctx.student.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in adp.latent.heads.parameters())
    assert "loss/reg" not in adp.critic_loss()[1]
    cfg.method.reg_weight = -1.0
    with pytest.raises(ValueError, match="reg_weight"):
        make_trainer(cfg, tmp_path / "bad").build_stage(0)


def test_smoothness_penalty_matches_the_gradient_penalty_of_a_linear_critic():
    """For D(x) = w.x the approximate R1 is sigma^2 ||w||^2 in expectation: the exact R1 times sigma^2."""
    torch.manual_seed(0)
    w = torch.randn(8, requires_grad=True)

    def disc(x):
        return x @ w

    x = torch.randn(20000, 8)
    pen = smoothness_penalty(disc, x, disc(x), sigma=0.1)
    assert pen.item() == pytest.approx(0.01 * w.detach().pow(2).sum().item(), rel=0.05)
    pen.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0  # the critic's parameters are what it trains


@pytest.mark.parametrize("stage", [0, 1])
def test_critic_penalties_train_the_heads_only_and_are_logged(tmp_path, stage):
    """R1/R2 (off by default) enter the critic phase of ADP's latent critic and ADM's; a negative weight is refused."""
    assert METHODS["adm"].Config().r1_weight == 0.0 and METHODS["adp"].Config().r2_weight == 0.0
    cfg = tiny_config("dmdx", steps=2)
    sub = (cfg.method.adp, cfg.method.adm)[stage]
    sub.r1_weight, sub.r2_weight = 100.0, 100.0
    tr = make_trainer(cfg, tmp_path)
    method = tr.build_stage(stage).method
    loss, logs = method.critic_loss()
    assert logs["loss/r1"] > 0 and logs["loss/r2"] > 0
    loss.backward()
    heads = method.disc.heads if stage else method.latent.heads
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    assert all(p.grad is None for p in tr.ctx.student.parameters())
    assert "loss/r1" not in method.student_loss()[1]
    sub.r1_weight = -1.0
    with pytest.raises(ValueError, match="r1_weight"):
        make_trainer(cfg, tmp_path / "bad").build_stage(stage)


@pytest.mark.parametrize("key,value", [("adm.r1_weight", -1.0), ("adm.dt", 0.0), ("adm.reg_weight", -0.5),
                                       ("adm.solver", "rk45"), ("adm.t_min", 0.99), ("adp.d_t_max", 1.5),
                                       ("adp.pixel_weight", -1.0)])
def test_dmdx_refuses_a_bad_stage_config_before_the_slow_set_up(tmp_path, monkeypatch, key, value):
    """A bad ADM (second-stage) setting is refused at start-up, before pairs are collected or ADP trains."""
    import dmdx.pairs

    def no_pairs(*args, **kwargs):
        raise AssertionError("pairs were collected before the config was checked")

    monkeypatch.setattr(dmdx.pairs, "collect_pairs", no_pairs)
    cfg = tiny_config("dmdx", steps=2)
    stage, field = key.split(".")
    setattr(getattr(cfg.method, stage), field, value)
    with pytest.raises(ValueError, match=field):
        make_trainer(cfg, tmp_path)
    assert not (tmp_path / "pairs").exists()


def test_adp_with_nothing_to_train_is_refused():
    cfg = METHODS["adp"].Config(latent_weight=0.0, pixel_weight=0.0)
    with pytest.raises(ValueError, match="nothing to train"):
        METHODS["adp"].check(cfg, (2,))
    METHODS["adp"].check(METHODS["adp"].Config(latent_weight=0.0, pixel_weight=0.0, reg_weight=1.0), (2,))


def test_adm_regression_anchor_in_dmdx_reaches_only_the_student(tmp_path):
    """DMDX's ADM stage can keep a regression term on the pairs (off by default); it trains the student only.
    ADM alone gets pairs collected when it asks for the term."""
    assert METHODS["adm"].Config().reg_weight == 0.0
    cfg = tiny_config("dmdx", steps=2)
    cfg.method.adm.reg_weight, cfg.method.adm.gan_g_weight = 1.0, 0.0
    tr = make_trainer(cfg, tmp_path)
    adm = tr.build_stage(1).method
    assert adm.name == "adm"
    for net in adm.networks().values():
        net.requires_grad_(False)
    loss, logs = adm.student_loss()
    assert logs["loss/reg"] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.ctx.student.parameters())
    assert all(p.grad is None for net in adm.networks().values() for p in net.parameters())
    # ADM alone: the set-up collects pairs only when its anchor is on, and the anchor then reaches the student
    plain = make_trainer(tiny_config("adm"), tmp_path / "adm0")
    assert plain.ctx.pairs is None and not (tmp_path / "adm0" / "pairs").exists()
    anchored = tiny_config("adm")
    anchored.method.reg_weight = 1.0
    tr = make_trainer(anchored, tmp_path / "adm1")
    assert tr.ctx.pairs is not None and len(tr.ctx.pairs.x0) == 64
    _, logs = tr.build_stage(0).method.student_loss()
    assert logs["loss/reg"] > 0

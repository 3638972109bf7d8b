"""SiD, VSD and GDD (the distribution-matching family beside DMD / DMD2 / ADM): their losses at equilibrium and on
exact Gaussians, which networks each phase trains, GDD-I's frozen layers, one iteration at the defaults on every
teacher kind, and resume equivalence."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dmdx.methods import METHODS
from dmdx.methods.base import dsm_loss
from dmdx.methods.gdd import GDD, frozen_convolutions
from dmdx.methods.sid import sid_loss
from dmdx.methods.vsd import vsd_loss
from dmdx.schedules import FlowMatching, _bcast
from dmdx.mixtures import AnalyticDenoiser, GaussianMixture

from helpers import make_trainer, state_of, tiny_config

DIGITS = Path(__file__).resolve().parents[1] / "src" / "dmdx" / "assets" / "teacher_digits"
NEW = ("sid", "vsd", "gdd")


def digits_config(method: str, steps: int = 1, **train):
    """The built-in digits teacher, a small budget (batch 4, 16 pairs of 2 Euler steps, no health signals)."""
    cfg = tiny_config(method, teacher=str(DIGITS), steps=steps, **{"batch_size": 4, "health_n": 0, **train})
    cfg.pairs.n, cfg.pairs.steps, cfg.pairs.solver = 16, 2, "euler"
    return cfg


@pytest.fixture(scope="module")
def tiny_pixel_backbone(dmdx_home):
    """GDD's pixel critic on digits uses the cached pixel backbone, and a run's last-step quality figure the cached
    evaluation classifier: one-epoch ones (as tests/test_eval.py's), not the minutes of training a user's first run
    spends on them."""
    import os

    from dmdx.eval import get_classifier, get_pixel_backbone

    old = os.environ.get("DMDX_HOME")
    os.environ["DMDX_HOME"] = dmdx_home
    try:
        get_pixel_backbone("digits", epochs=1, max_train=96, batch_size=32, progress=False)
        get_classifier("digits", epochs=1, max_train=96, batch_size=32, progress=False)
    finally:
        if old is None:
            del os.environ["DMDX_HOME"]
        else:
            os.environ["DMDX_HOME"] = old


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory):
    """The ring8 surrogate MLP of ``tiny_config`` runs, fitted once for the module (RUN/surrogate is a cache)."""
    root = tmp_path_factory.mktemp("surrogate")
    make_trainer(tiny_config("sid", steps=1), root)
    return root / "surrogate"


def ring8(cfg, run_dir: Path, surrogate: Path):
    """``make_trainer`` for a ring8 config, its surrogate copied in (as a user re-running into a prepared folder)."""
    shutil.copytree(surrogate, Path(run_dir) / "surrogate")
    return make_trainer(cfg, run_dir)


def student_grads_are_zero(student) -> bool:
    return all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in student.parameters())


# -- the losses ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sid", "vsd"])
def test_student_gradient_vanishes_when_the_fake_score_equals_the_teacher(method, tmp_path, surrogate):
    """Both losses are built from the difference of the two scores' predictions at the same x_t: zero gradient at
    the exact equilibrium (fake score = real score, no CFG), a non-zero one as soon as they differ."""
    cfg = tiny_config(method)
    cfg.method.real_guidance = 1.0
    tr = ring8(cfg, tmp_path, surrogate)
    ctx = tr.ctx
    ctx.teacher = ctx.teacher_net  # the fake score starts as a copy of this network
    stage = tr.build_stage(0)
    m = stage.method
    stage.set_trainable("fake_score", False)
    loss, _ = m.student_loss()
    loss.backward()
    assert student_grads_are_zero(ctx.student)
    ctx.student.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p in m.fake_score.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, _ = m.student_loss()
    loss.backward()
    assert not student_grads_are_zero(ctx.student)
    assert all(p.grad is None for p in m.fake_score.parameters())
    assert all(p.grad is None for p in ctx.teacher_net.parameters())


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_and_vsd_move_samples_from_the_fake_toward_the_real_gaussian(alpha):
    """Real N(mu_r, s^2), fake N(mu_f, s^2), both exact: the scores' difference is the constant
    (1 - a^2 k)(mu_r - mu_f) (k = s^2 / (a^2 s^2 + sigma^2)), so SiD's descent direction is exactly along
    mu_r - mu_f for every alpha (through x_t and the scores' Jacobians), and so is VSD's."""
    sched = FlowMatching()
    mu_r, mu_f = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    real = AnalyticDenoiser(GaussianMixture([mu_r.tolist()], [1.0], 0.3), sched)
    fake = AnalyticDenoiser(GaussianMixture([mu_f.tolist()], [1.0], 0.3), sched)
    x = (mu_f + 0.3 * torch.randn(64, 2)).requires_grad_(True)
    t = torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    x_t = sched.add_noise(x, torch.randn(64, 2), t)
    sid_loss(x, real(x_t, t), fake(x_t, t), alpha).backward()
    direction = (mu_r - mu_f) / (mu_r - mu_f).norm()
    cos = torch.nn.functional.cosine_similarity(-x.grad, direction[None], dim=1)
    torch.testing.assert_close(cos, torch.ones(64), atol=1e-5, rtol=0)
    a, s = sched.alpha_sigma(t)
    x2 = x.detach().clone().requires_grad_(True)
    _, grad = vsd_loss(x2, real(x_t.detach(), t), fake(x_t.detach(), t), a, s)
    cos = torch.nn.functional.cosine_similarity(-grad, direction[None], dim=1)
    torch.testing.assert_close(cos, torch.ones(64), atol=1e-5, rtol=0)
    # VSD's step is SwiftBrush's sigma^2 (eps_real - eps_fake), written on x0 predictions
    eps_r = (x_t.detach().double() - _bcast(a, x_t) * real(x_t.detach(), t).double()) / _bcast(s, x_t)
    eps_f = (x_t.detach().double() - _bcast(a, x_t) * fake(x_t.detach(), t).double()) / _bcast(s, x_t)
    torch.testing.assert_close(grad.double(), _bcast(s, x_t) ** 2 * (eps_r - eps_f), atol=1e-5, rtol=1e-4)


def test_guided_denoising_loss_is_the_loss_of_the_guided_prediction():
    """SiD-LSG's fake-score loss: ``dsm_loss(..., guidance=g)`` is the mse of ``u + g (c - u)``; g = 1 is plain."""
    from dmdx.teachers import load_model
    from dmdx.param import from_x0_eps

    model = load_model(DIGITS)
    den = model.denoiser
    x0 = torch.randn(4, *model.info.shape)
    cond = {"labels": torch.tensor([1, 2, 3, 4])}
    for g in (1.0, 2.5):
        torch.manual_seed(1)
        loss = dsm_loss(den, x0, cond, guidance=g)
        torch.manual_seed(1)
        t = den.schedule.training_time(1e-3 + (1 - 1e-3) * torch.rand(4, dtype=torch.float64))
        eps = torch.randn_like(x0)
        x_t = den.schedule.add_noise(x0, eps, t)
        a, s = den.schedule.alpha_sigma(t)
        c, u = den.predict(x_t, t, cond), den.predict(x_t, t, den.backbone.null_cond(cond))
        target = from_x0_eps(x0, eps, den.prediction, a, s).float()
        torch.testing.assert_close(loss, torch.nn.functional.mse_loss(u + g * (c - u), target))


# -- GDD: equilibrium and the frozen layers ---------------------------------------------------------------------
def test_gdd_at_equilibrium_the_critic_is_at_chance_and_the_student_feels_nothing(tmp_path, surrogate):
    """GDD has no score: its equilibrium is the GAN's, p_student = p_real, where the best critic is constant
    (D = 0: probability 1/2 everywhere).  With the heads at D = 0 the critic's loss is 2 log 2 per critic (and the
    R1 penalty 0), and the student's gradient is exactly zero."""
    cfg = tiny_config("gdd")
    tr = ring8(cfg, tmp_path, surrogate)
    stage = tr.build_stage(0)
    gdd = stage.method
    with torch.no_grad():
        for p in gdd.latent.heads.parameters():
            p.zero_()
    stage.set_trainable("latent_heads", False)
    loss, logs = gdd.student_loss()
    assert logs["loss/gan_g"] == pytest.approx(math.log(2))
    loss.backward()
    assert student_grads_are_zero(tr.ctx.student)
    loss, logs = gdd.critic_loss()
    assert logs["loss/gan_d_latent"] == pytest.approx(2 * math.log(2))
    assert logs["loss/r1_latent"] == 0.0
    assert float(loss) == pytest.approx(2 * math.log(2))


def test_gdd_i_freezes_the_students_inner_convolutions(tmp_path, tiny_pixel_backbone, surrogate):
    """GDD-I on the digits UNet (freeze=auto): every spatial convolution but the first and last is frozen (most of
    the weights); those never change over training while the rest of the student does.  An MLP student has none:
    auto trains everything, freeze=conv is refused."""
    cfg = digits_config("gdd", steps=2)
    tr = make_trainer(cfg, tmp_path / "digits")
    student = tr.ctx.student
    stage = tr.build_stage(0)
    frozen = stage.method.frozen
    assert frozen == frozen_convolutions(student) and frozen
    n_frozen = sum(p.numel() for n, p in student.named_parameters() if n in frozen)
    assert n_frozen > 0.5 * sum(p.numel() for p in student.parameters())
    assert "backbone.conv_in.weight" not in frozen and "backbone.conv_out.weight" not in frozen
    assert stage.frozen["student"] == frozen and len(stage.optims["student"].param_groups[0]["params"]) == len(
        list(student.parameters())) - len(frozen)
    before = state_of(student)
    tr.run()
    after = state_of(student)
    for name, _ in student.named_parameters():
        assert torch.equal(before[name], after[name]) == (name in frozen), name

    tr = ring8(tiny_config("gdd", steps=1), tmp_path / "mlp", surrogate)
    assert tr.build_stage(0).method.frozen == set()
    cfg = tiny_config("gdd", steps=1)
    cfg.method.freeze = "conv"
    with pytest.raises(ValueError, match="freeze=conv.*MLPDenoiser.*freeze=none"):
        ring8(cfg, tmp_path / "mlp_conv", surrogate).build_stage(0)


def test_gdd_refuses_a_config_without_a_critic_or_real_samples(tmp_path, surrogate):
    with pytest.raises(ValueError, match="no critic"):
        GDD.check(METHODS["gdd"].Config(latent_weight=0.0, pixel_weight=0.0), (2,))
    cfg = tiny_config("gdd", steps=1)
    cfg.method.latent_weight = 0.0
    with pytest.raises(ValueError, match="no critic.*no pixel backbone"):
        ring8(cfg, tmp_path / "a", surrogate).build_stage(0)


# -- the loop's contract --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", NEW)
def test_each_phase_trains_only_its_networks_and_the_teacher_stays_frozen(method, tmp_path, surrogate):
    cfg = tiny_config(method, steps=2)
    tr = ring8(cfg, tmp_path, surrogate)
    teacher_before = state_of(tr.ctx.teacher_net)
    stage = tr.build_stage(0)
    assert set(stage.trainables) <= {"student", *METHODS[method].network_names}
    for phase in stage.method.phases():
        before = {n: state_of(net) for n, net in stage.trainables.items()}
        tr.run_phase(stage, phase, 0)
        for name, net in stage.trainables.items():
            changed = any(not torch.equal(v, before[name][k]) for k, v in net.state_dict().items())
            assert changed == (name in phase.trains), f"{method}/{phase.name}: {name} changed={changed}"
        assert all(p.grad is None for p in tr.ctx.teacher_net.parameters())
    after = state_of(tr.ctx.teacher_net)
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items())


def _resume_matches(cfg, root: Path, split: int, caches: dict[str, Path]):
    """An uninterrupted run of ``cfg`` and one stopped after ``split`` iterations then resumed (a fresh trainer, as
    a new process would build) end with the same student and EMA, bit for bit.  ``caches``: folders copied into
    both runs first (a surrogate, pairs)."""
    def final(run_dir: Path, stop):
        run_dir.mkdir()
        for name, src in caches.items():
            shutil.copytree(src, run_dir / name)
        tr = make_trainer(cfg, run_dir)
        if stop is not None:
            tr.run(stop_after=stop)
            tr = make_trainer(cfg, run_dir)
            tr.run(resume=True)
        else:
            tr.run()
        return state_of(tr.student), state_of(tr.ema)

    a, a_ema = final(root / "a", None)
    b, b_ema = final(root / "b", split)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a_ema[k], b_ema[k]), k


@pytest.mark.parametrize("method", NEW)
def test_resume_equals_uninterrupted(method, tmp_path, surrogate):
    _resume_matches(tiny_config(method, steps=4, ckpt_every=2), tmp_path, 2, {"surrogate": surrogate})


def test_resume_equals_uninterrupted_with_frozen_layers(tmp_path, tiny_pixel_backbone):
    """GDD-I's student optimiser holds only the unfrozen parameters: its state survives a checkpoint."""
    cfg = digits_config("gdd", steps=2, ckpt_every=1)
    make_trainer(cfg, tmp_path / "pairs_only")  # collects the pairs once
    _resume_matches(cfg, tmp_path, 1, {"pairs": tmp_path / "pairs_only" / "pairs"})


# -- one iteration at the defaults, every teacher kind ------------------------------------------------------------
def _check_row(run: Path, method: str) -> dict:
    row = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][-1]
    losses = {k: v for k, v in row.items() if k.startswith("loss/")}
    expected = {"sid": {"loss/sid", "loss/fake_dsm"}, "vsd": {"loss/vsd", "loss/fake_dsm"},
                "gdd": {"loss/gan_g", "loss/gan_d"}}[method]
    assert expected <= set(losses) and all(math.isfinite(v) for v in losses.values()), row
    assert (run / "model.json").is_file() and (run / "model.safetensors").is_file()  # the exported student
    return row


@pytest.mark.parametrize("method", NEW)
def test_one_iteration_at_the_defaults_on_mixtures_and_digits(method, tmp_path, tiny_pixel_backbone, surrogate):
    from dmdx.cli import main

    for teacher, extra in (("gmm:ring8", ["--set", "surrogate_steps=20"]),
                           (str(DIGITS), ["--set", "pairs.n=8", "--set", "pairs.steps=2"])):
        run = tmp_path / teacher.replace(":", "_").replace("/", "_")[-20:]
        if teacher.startswith("gmm:"):
            shutil.copytree(surrogate, run / "surrogate")
        rc = main(["distill", "--method", method, "--teacher", teacher, "--out", str(run), "--steps", "1", "--quiet",
                   "--set", "train.batch_size=4", "--set", "train.health_n=8", "--set", "train.health_quality_n=16",
                   *extra])  # the last step's quality figure: the teacher's 50-step reference on 16 samples, not 500
        assert rc == 0
        row = _check_row(run, method)
        if method in ("sid", "vsd"):
            assert "health/fake_lag" in row
        else:
            assert "critic/latent/acc" in row
            if teacher == str(DIGITS):
                assert "critic/pixel/acc" in row  # built-in image data: GDD's pixel critic too


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_one_iteration_at_the_defaults_on_bf16_pipelines(family, tmp_path):
    """The documented command on a tiny UNet (SD) and transformer (SD3) pipeline with the default bf16 teacher."""
    pytest.importorskip("diffusers")
    from dmdx.cli import main
    from dmdx.teachers.image.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline(family, tmp_path / "pipe")
    (tmp_path / "p.txt").write_text("a red cat\na blue dog\n")
    for method in NEW:
        run = tmp_path / method
        rc = main(["distill", "--method", method, "--teacher", str(pipe), "--prompts", str(tmp_path / "p.txt"),
                   "--out", str(run), "--steps", "1", "--quiet", "--set", "train.batch_size=2",
                   "--set", "pairs.steps=2"])
        assert rc == 0
        _check_row(run, method)
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["real"]["teacher_dtype"] == "bfloat16"
        if method == "vsd":
            assert cfg["real"]["fake_lora"]["rank"] == 64  # the recipe: SwiftBrush's LoRA fake score
            assert (cfg["method"]["real_guidance"] == 4.5) == (family == "sd")
        if method == "sid" and family == "sd":  # SiD-LSG's SD1.5 settings
            assert (cfg["method"]["alpha"], cfg["method"]["fake_guidance"], cfg["student"]["times"]) == (1.0, 2.0,
                                                                                                      [0.625])
        if method == "gdd":
            assert cfg["method"]["freeze"] == "auto"
    # what GDD-I freezes there: the UNet's inner convolutions (not conv_in / conv_out), nothing in the transformer
    from dmdx.pipelines.folder import load_component
    from dmdx.pipelines.image import denoiser_component

    model = load_component(pipe, denoiser_component(pipe)[0], torch.float32)
    frozen = frozen_convolutions(model)
    if family == "sd":
        assert frozen and not {"conv_in.weight", "conv_out.weight"} & frozen
        assert any(n.startswith("down_blocks.0.resnets.0.conv1") for n in frozen)
    else:
        assert frozen == set()


@pytest.mark.usefixtures("one_thread")
def test_one_iteration_at_the_defaults_on_a_video_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    from helpers import video_inputs

    from dmdx.cli import main
    from dmdx.teachers.video.tiny import make_tiny_video_pipeline

    pipe = make_tiny_video_pipeline("wan", tmp_path / "wan")
    inputs = video_inputs(tmp_path / "in", ["a red cat runs", "a blue bird flies"], 0)
    for method in NEW:
        run = tmp_path / method
        rc = main(["distill", "--method", method, "--teacher", str(pipe), "--prompts", str(inputs / "p.txt"),
                   "--out", str(run), "--steps", "1", "--quiet", "--set", "train.batch_size=2", "--set",
                   "pairs.steps=2", "--set", "video.frames=9", "--set", "video.height=16", "--set", "video.width=16"])
        assert rc == 0
        _check_row(run, method)


def test_registry_has_the_family_and_lists_it_in_errors():
    from dmdx.methods import get_method

    assert {"sid", "vsd", "gdd"} <= set(METHODS)
    with pytest.raises(ValueError, match="dmd, dmd2, adm, adp, dmdx, sid, vsd, gdd"):
        get_method("nope")

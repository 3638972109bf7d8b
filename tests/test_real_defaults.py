"""Every method on every diffusers family at the defaults a user gets, and the training-side details of real teachers.

``dmdx distill --method M --teacher PIPE --prompts p.txt --data IMGS --out RUN`` is run through the CLI with the
recipe applied and the default config; the only settings changed are the budget: ``--steps 1`` and
``train.batch_size=2`` (so one iteration with its teacher pairs takes seconds on a tiny pipeline).  Covered:

- every method (dmd, dmd2, adm, adp, dmdx) x every family (sd = SD1.5-style epsilon, sd_v = v-prediction, sdxl,
  sd3, flux) with the default bfloat16 teacher;
- a float32 teacher (``real.teacher_dtype=float32``) and ``train.bf16=true`` on a subset that reaches every kind of
  network (UNet and transformer teachers, DM / GAN / ADM / ADP terms): see ``VARIANTS``.

Runs of one family share prompt embeddings, VAE latents and (where the settings match) teacher pairs through the run
folder's caches, as a user re-running into a prepared folder would; each family's first pair-method run collects
its pairs.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from dmdx.cli import main  # noqa: E402
from dmdx.nets.pipeline import add_lora  # noqa: E402
from dmdx.pipelines.folder import load_component  # noqa: E402
from dmdx.pipelines.image import denoiser_component, encode_prompts, flux_mu, schedule_from_folder  # noqa: E402
from dmdx.teachers.image import load_teacher  # noqa: E402
from dmdx.teachers.image.tiny import make_tiny_pipeline  # noqa: E402

FAMILIES = ("sd", "sd_v", "sdxl", "sd3", "flux")
METHODS = ("dmd", "dmd2", "adm", "adp", "dmdx")
VARIANTS = {  # setting -> (family, method) pairs run with it, besides the bf16-teacher defaults
    "float32_teacher": [("sd", "adm"), ("sd3", "dmdx"), ("flux", "dmd2")],
    "train_bf16": [("sd_v", "dmd2"), ("sdxl", "adm"), ("sd3", "adp"), ("flux", "dmdx"), ("sd", "dmd")],
}
SETS = {"default": [], "float32_teacher": ["--set", "real.teacher_dtype=float32"],
        "train_bf16": ["--set", "train.bf16=true"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny pipelines run faster on one thread (conftest.py)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("real")
    (root / "p.txt").write_text("a red cat\na blue dog\nsunset over hills\n")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / "imgs" / f"{i}.png")
    (root / "cache").mkdir()
    return root


@pytest.fixture(scope="module")
def pipes(root):
    return {f: make_tiny_pipeline(f, root / "pipes" / f) for f in FAMILIES}


CACHES = ("prompts.safetensors", "latents.safetensors", "pairs")


def distill(root, pipes, family, method, setting="default", extra=()):
    """The documented command at the defaults (one iteration, batch 2); returns (rc, run folder)."""
    run = root / "runs" / f"{family}-{method}-{setting}"
    cache = root / "cache" / f"{family}-{setting if setting == 'float32_teacher' else 'bf16'}"
    run.mkdir(parents=True)
    for name in CACHES:
        if (cache / name).exists():
            (shutil.copytree if name == "pairs" else shutil.copy)(cache / name, run / name)
    rc = main(["distill", "--method", method, "--teacher", str(pipes[family]), "--prompts", str(root / "p.txt"),
               "--data", str(root / "imgs"), "--out", str(run), "--steps", "1", "--quiet",
               "--set", "train.batch_size=2", *SETS[setting], *extra])
    cache.mkdir(exist_ok=True)
    for name in CACHES:
        if (run / name).exists() and not (cache / name).exists():
            (shutil.copytree if name == "pairs" else shutil.copy)(run / name, cache / name)
    return rc, run


def check_run(run, method):
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    row = rows[-1]
    assert row["step"] == 1
    losses = {k: v for k, v in row.items() if k.startswith("loss/")}
    assert losses and all(math.isfinite(v) for v in losses.values()), row
    expected = {"dmd": {"loss/dm", "loss/reg", "loss/fake_dsm"}, "dmd2": {"loss/dm", "loss/gan_g", "loss/gan_d"},
                "adm": {"loss/gan_g", "loss/gan_d", "loss/fake_dsm"}, "adp": {"loss/gan_g", "loss/gan_d"},
                "dmdx": {"loss/gan_g", "loss/gan_d"}}[method]
    assert expected <= set(losses), (method, sorted(losses))
    assert (run / "model.json").is_file() and (run / "model.safetensors").is_file()
    return json.loads((run / "config.json").read_text())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_every_family_at_the_defaults(root, pipes, family, method, capsys):
    rc, run = distill(root, pipes, family, method)
    assert rc == 0, capsys.readouterr().err[-2000:]
    cfg = check_run(run, method)
    assert cfg["real"]["teacher_dtype"] == "bfloat16" and cfg["train"]["bf16"] is False
    assert cfg["train"]["warmup"] == 500  # the pipeline recipe was applied (docs/real-models.md, Recipes)
    assert "recipe for teacher kind" in capsys.readouterr().err


@pytest.mark.parametrize("setting,family,method", [(s, f, m) for s, pairs in VARIANTS.items() for f, m in pairs])
def test_dtype_variants(root, pipes, setting, family, method, capsys):
    rc, run = distill(root, pipes, family, method, setting)
    assert rc == 0, capsys.readouterr().err[-2000:]
    cfg = check_run(run, method)
    if setting == "float32_teacher":
        assert cfg["real"]["teacher_dtype"] == "float32"
    else:
        assert cfg["train"]["bf16"] is True and cfg["real"]["teacher_dtype"] == "bfloat16"


# -- the pieces, on the same tiny pipelines -------------------------------------------------------------------------
def trainer(root, pipes, family, method, name, data=True, **sets):
    """A run set up as the CLI would (recipe applied), one iteration, batch 2, without training it."""
    from helpers import make_trainer

    from dmdx.config import set_path
    from dmdx.teachers import apply_recipe
    from dmdx.train.run import default_run_config

    cfg = default_run_config(method)
    cfg.teacher, cfg.real.prompts = str(pipes[family]), str(root / "p.txt")
    cfg.data = str(data) if isinstance(data, (str, type(root))) else (str(root / "imgs") if data else None)
    cfg.train.steps, cfg.train.batch_size, cfg.train.progress = 1, 2, False
    cfg.pairs.steps, cfg.pairs.solver = 2, "euler"
    for k, v in sets.items():
        set_path(cfg, k.replace("__", "."), v)
    apply_recipe(cfg, {"train.steps", "train.batch_size", "pairs.steps", "pairs.solver", *(k.replace("__", ".")
                                                                                           for k in sets)})
    return make_trainer(cfg, root / "setup" / name)


def test_captions_reach_the_gan(root, pipes):
    """name.png + name.txt: the GAN's real term sees the image's own caption; uncaptioned images a random prompt."""
    import numpy as np
    from PIL import Image

    from dmdx.methods.dmd2 import DMD2

    caps = root / "caps"
    caps.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(caps / f"{name}.png")
    (caps / "a.txt").write_text("a green frog\n")
    (caps / "c.txt").write_text("an old bridge")
    tr = trainer(root, pipes, "sd", "dmd2", "caps", data=caps)
    method = tr.build_stage(0).method
    assert isinstance(method, DMD2)
    shape = tuple(method.ctx.shape)
    want, _ = encode_prompts(pipes["sd"], ["a green frog", "an old bridge"], shape)
    seen = []
    logits = method.logits

    def spy(x0, cond):
        seen.append((x0.detach().clone(), {k: v.clone() for k, v in cond.items()}))
        return logits(x0, cond)

    method.logits = spy
    data = method.ctx.data.x
    bank = method.ctx.cond_bank["text"]
    found = {0: 0, 1: 0, 2: 0}
    for _ in range(6):
        seen.clear()
        method.critic_loss()
        real_x, real_cond = seen[-1]  # critic: fake then real
        for x, text in zip(real_x, real_cond["text"]):
            i = int(((data - x).flatten(1).abs().amax(1)).argmin())
            found[i] += 1
            if i == 0:
                torch.testing.assert_close(text, want["text"][0])
            elif i == 2:
                torch.testing.assert_close(text, want["text"][1])
            else:  # uncaptioned: some prompt of --prompts
                assert any(torch.equal(text, row) for row in bank)
    assert found[0] and found[2], found


def test_pairs_progress_resume_and_checks(root, pipes, capsys):
    from dmdx.pairs import collect_pairs, load_pairs

    m = load_teacher(pipes["sd"])
    bank, _ = encode_prompts(pipes["sd"], ["a red cat", "a blue dog"], tuple(m.info.shape))
    out = root / "pairs-sd"
    kw = dict(steps=2, solver="euler", guidance=2.0, shard_size=2, batch_size=2, cond_bank=bank)
    collect_pairs(m, out, 3, **kw)
    err = capsys.readouterr().err
    assert "3/3" in err and "pair" in err  # progress counted in pairs
    first = load_pairs(out, bank)
    assert first.x0.shape[0] == 3 and first.labels.max() < 2 and first.cond_bank is bank
    (out / "pairs_00001.safetensors").unlink()  # an interrupted collection
    with pytest.raises(ValueError, match="interrupted"):
        load_pairs(out, bank)
    collect_pairs(m, out, 3, **kw, progress=False)  # continues with the missing shard only
    again = load_pairs(out, bank)
    torch.testing.assert_close(again.x0, first.x0)
    torch.testing.assert_close(again.noise, first.noise)
    with pytest.raises(ValueError, match=r"steps=2 \(now 3\)"):
        collect_pairs(m, out, 3, **{**kw, "steps": 3})
    with pytest.raises(ValueError, match=r"guidance=2.0 \(now 5.0\)"):
        collect_pairs(m, out, 3, **{**kw, "guidance": 5.0})


def test_pairs_follow_the_methods_real_guidance(root, pipes):
    from dmdx.config import TrainConfig
    from dmdx.pairs import pairs_meta
    from dmdx.train.run import PairsConfig

    assert PairsConfig().resolved_n(TrainConfig(steps=3, batch_size=64)) == 192  # a smoke run: what it draws
    assert PairsConfig().resolved_n(TrainConfig()) == 2000
    tr = trainer(root, pipes, "sd", "dmd", "dmd-g", data=False, method__real_guidance=2.5)
    assert pairs_meta(root / "setup" / "dmd-g" / "pairs")["guidance"] == 2.5
    assert tr.ctx.pairs.x0.shape[0] == 2  # pairs.n follows the budget: 1 step x batch 2
    with pytest.raises(ValueError, match="collected at guidance 2.5"):
        trainer(root, pipes, "sd", "dmd", "dmd-g3", data=False, method__real_guidance=3.0,
                pairs__path=str(root / "setup" / "dmd-g" / "pairs"))


def test_lpips_regression_refused_on_latents_and_small_images_upsampled(root, pipes):
    from dmdx.methods.dmd import lpips_input

    with pytest.raises(ValueError, match="4-channel latents"):
        trainer(root, pipes, "sd", "dmd", "lpips", data=False, method__reg_loss="lpips")
    assert not (root / "setup" / "lpips" / "pairs").exists()  # refused before collecting pairs
    assert lpips_input(torch.zeros(2, 1, 8, 8)).shape == (2, 3, 64, 64)
    assert lpips_input(torch.zeros(2, 3, 16, 32)).shape == (2, 3, 64, 128)
    x = torch.randn(1, 3, 64, 64)
    assert lpips_input(x) is x


def test_fake_score_dm_prediction_in_float32_under_bf16(root, pipes):
    """train.bf16: the fake score's DM prediction runs without autocast, the real score in the teacher's bf16."""
    tr = trainer(root, pipes, "sd", "dmd2", "f32", data=False, method__gan="false")
    method = tr.build_stage(0).method
    dtypes = {}

    def hook(name):
        def record(_m, _i, out):
            dtypes.setdefault(name, out.dtype)

        return record

    h1 = method.fake_score.backbone.model.conv_in.register_forward_hook(hook("fake"))
    h2 = method.ctx.teacher.backbone.model.conv_in.register_forward_hook(hook("real"))
    x, cond, _ = method.ctx.student_x0(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        method.dm_term(x, cond)
        probe = method.fake_score.backbone.model.conv_in(torch.zeros(1, 4, 8, 8))
    h1.remove()
    h2.remove()
    assert probe.dtype == torch.bfloat16  # autocast is on around the call...
    assert dtypes == {"fake": torch.float32, "real": torch.bfloat16}  # ...but not inside the fake score's


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_adm_steps_and_critic_run_in_float32_under_a_bf16_teacher(root, pipes, family):
    """ADM's two ODE steps and its discriminator's passes compute in float32 under the default bf16 teacher, inside
    train.bf16 autocast too; the teacher's own weights stay bf16 and unchanged, the student's gradient flows back
    through the float32 pass after the block, and ``float32_steps=false`` leaves the teacher in bf16."""
    from dmdx.methods import adm as adm_module

    tr = trainer(root, pipes, family, "adm", f"f32-adm-{family}", data=False)
    stage = tr.build_stage(0)
    adm, ctx = stage.method, tr.ctx
    teacher = ctx.teacher.backbone.model
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {"teacher": set(), "steps": set()}
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen["teacher"].add(out.dtype))
             for m in teacher.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ode_step = adm_module.ode_step

    def spy(den, sched, x_t, t, s, cond, solver, x0=None):
        x0 = den(x_t, t, cond) if x0 is None else x0
        seen["steps"].update({x0.dtype, "autocast" if torch.is_autocast_enabled("cpu") else "no autocast"})
        return ode_step(den, sched, x_t, t, s, cond, solver, x0=x0)

    adm_module.ode_step = spy
    try:
        for name, net in stage.trainables.items():
            net.requires_grad_(name == "student")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = adm.student_loss()
            adm.critic_loss()
        loss.backward()  # the float32 copies the graph kept, after the block put the bf16 weights back
        assert seen == {"teacher": {torch.float32}, "steps": {torch.float32, "no autocast"}}
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())
        assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
        assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
        seen["teacher"].clear()
        adm.cfg.float32_steps = False
        adm.critic_loss()
        assert seen["teacher"] == {torch.bfloat16}
    finally:
        adm_module.ode_step = ode_step
        adm.cfg.float32_steps = True
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("method", ["dmd2", "adm", "adp"])
def test_unet_teachers_see_integer_timesteps(root, pipes, method):
    """DM, fake-score, GAN, ADM and ADP terms draw their times on the VP schedule's integer steps."""
    from dmdx.schedules import VPDiscrete

    t = VPDiscrete().training_time(torch.rand(100, dtype=torch.float64))
    assert torch.equal(t * 999, torch.round(t * 999))
    tr = trainer(root, pipes, "sd", method, f"int-{method}")
    stage = tr.build_stage(0)
    times = []
    nets = [stage.method.ctx.teacher, stage.method.ctx.student, *stage.trainables.values()]
    hooks = [n.backbone.register_forward_pre_hook(lambda _m, args: times.append(args[1].detach().clone()))
             for n in nets if hasattr(n, "backbone")]
    for phase in stage.method.phases():
        phase.loss()
    for h in hooks:
        h.remove()
    t = torch.cat([x.flatten() for x in times]).double()
    assert len(t) > 4 and torch.equal(t, torch.round(t)), t


def _sched_folder(root, pipes, family, name, **keys):
    folder = root / "sched" / name
    (folder / "scheduler").mkdir(parents=True)
    shutil.copy(pipes[family] / "model_index.json", folder)
    cfg = json.loads((pipes[family] / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, **keys}))
    return folder


@pytest.mark.parametrize("key,value", [("shift_terminal", 0.1), ("use_karras_sigmas", True),
                                       ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
                                       ("invert_sigmas", True), ("time_shift_type", "cubic")])
def test_flow_scheduler_keys_refused(root, pipes, key, value):
    folder = _sched_folder(root, pipes, "sd3", f"{key}", **{key: value})
    with pytest.raises(ValueError, match=key):
        schedule_from_folder(folder, (4, 8, 8))


def test_scheduler_keys_supported_or_refused(root, pipes):
    folder = _sched_folder(root, pipes, "flux", "linear", time_shift_type="linear")
    sched, _ = schedule_from_folder(folder, (4, 8, 8))
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched.shift == pytest.approx(flux_mu(16, cfg))  # linear: mu / (mu + 1/t - 1), a shift of mu
    exp, _ = schedule_from_folder(pipes["flux"], (4, 8, 8))
    assert exp.shift == pytest.approx(math.exp(flux_mu(16, cfg)))
    same, _ = schedule_from_folder(_sched_folder(root, pipes, "sd3", "off", use_karras_sigmas=False,
                                                     shift_terminal=None), (4, 8, 8))
    assert same.shift == 3.0  # keys set to off are fine
    folder = _sched_folder(root, pipes, "sd", "betas", trained_betas=[0.001] * 1000)
    with pytest.raises(ValueError, match="trained_betas"):
        schedule_from_folder(folder, (4, 8, 8))


def test_recipes_resolve_as_documented(pipes):
    from dmdx.teachers import apply_recipe
    from dmdx.train.run import default_run_config

    def resolved(family, method, user=None):
        cfg = default_run_config(method)
        cfg.teacher = str(pipes[family])
        from dmdx.config import set_path

        for k, v in (user or {}).items():
            set_path(cfg, k, v)
        apply_recipe(cfg, set(user or {}))
        return cfg

    sd = resolved("sd", "dmd2")
    assert (sd.train.lr, sd.train.warmup, sd.method.real_guidance, sd.method.critic_every) == (1e-5, 500, 1.75, 10)
    assert "conv1" in sd.real.student_lora.targets and sd.real.student_lora.rank == 0  # LoRA stays off by default
    lora = resolved("sd_v", "dmd2", {"real.student_lora.rank": "64"})
    assert (lora.train.lr, lora.real.student_lora.alpha) == (5e-5, 8.0)
    xl = resolved("sdxl", "dmd2")
    assert (xl.train.lr, xl.real.guidance, xl.method.critic_every, xl.method.gan_g_weight) == (5e-7, 8.0, 5, 5e-3)
    assert resolved("sdxl", "adm").real.guidance == 8.0 and resolved("sd", "adm").method.real_guidance is None
    assert resolved("sd3", "dmdx").student.times == [1.0, 0.75, 0.5, 0.25]
    assert resolved("sd3", "dmd2", {"student.times": "1"}).student.times == [1.0]  # the user's --set wins
    assert resolved("flux", "adm").train.lr == 1e-5 and resolved("flux", "adm").student.times == [1.0]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_recipe_lora_targets_attach(pipes, family):
    from dmdx.recipes import FLUX_LORA_TARGETS, SD3_LORA_TARGETS, UNET_LORA_TARGETS

    targets = {"sd": UNET_LORA_TARGETS, "sdxl": UNET_LORA_TARGETS, "sd3": SD3_LORA_TARGETS,
               "flux": FLUX_LORA_TARGETS}[family]
    comp, _ = denoiser_component(pipes[family])
    model = load_component(pipes[family], comp)
    add_lora(model, 2, 8.0, targets)
    names = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    hit = {t for t in targets if any(n == t or n.endswith("." + t) for n in names)}
    assert hit == set(targets), sorted(set(targets) - hit)  # every target names layers of the family's model

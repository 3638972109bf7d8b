"""Diffusers pipeline teachers: tiny random SD / SD-v / SDXL / SD3 / Flux pipelines saved as local folders."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers import make_trainer, tiny_config  # noqa: E402

from dmdx.nets.pipeline import pack, unpack  # noqa: E402
from dmdx.pipelines.folder import check_folder, load_cond  # noqa: E402
from dmdx.teachers.image import load_teacher  # noqa: E402
from dmdx.teachers.image.tiny import make_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on shared CPUs
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {f: make_tiny_pipeline(f, root / f) for f in ("sd", "sd_v", "sdxl", "sd3", "flux")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    (root / "prompts.txt").write_text("a red cat\na blue dog\nsunset over hills\n")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / "imgs" / f"{i}.png")
    return root


def run_cfg(method, pipe, inputs, times=(1.0, 0.5), steps=2, **real):
    cfg = tiny_config(method, teacher=str(pipe), steps=steps, batch_size=2)
    cfg.real.prompts = str(inputs / "prompts.txt")
    cfg.real.teacher_dtype = "float32"
    for k, v in real.items():
        setattr(cfg.real, k, v)
    cfg.pairs.n, cfg.pairs.steps, cfg.pairs.solver = 4, 2, "euler"
    cfg.student.times = list(times)
    return cfg


def last_log(run):
    return json.loads((run / "log.jsonl").read_text().splitlines()[-1])


# -- the teacher's maths against the family's scheduler ------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd", "sd_v", "sd3", "flux"])
def test_x0_matches_scheduler(pipes, family):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    m = load_teacher(pipes[family])
    den, bb = m.denoiser, m.denoiser.backbone
    torch.manual_seed(0)
    x = torch.randn(2, *m.info.shape)
    cond = bb.null_cond(None)
    if family.startswith("sd") and family != "sd3":
        sched = DDIMScheduler.from_pretrained(str(pipes[family] / "scheduler"))
        sched.set_timesteps(10)
        step = 600
        t = step / 999
        assert float(den.schedule.model_time(torch.tensor(t))) == pytest.approx(step, abs=1e-3)
        out = bb(x, torch.tensor([float(step)]), cond)
        ref = sched.step(out, step, x).pred_original_sample
    else:
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(pipes[family] / "scheduler"))
        t = 0.6
        mu = math.log(den.schedule.shift) if family == "flux" else None
        sched.set_timesteps(sigmas=[t], mu=mu)
        sigma, timestep = float(sched.sigmas[0]), float(sched.timesteps[0])
        model_t = timestep if family == "sd3" else timestep / 1000  # what each pipeline feeds its transformer
        assert float(den.schedule.model_time(torch.tensor(t))) == pytest.approx(model_t, rel=1e-5)
        out = bb(x, torch.tensor([model_t]), cond)
        ref = x - sigma * out
    got = den(x, torch.tensor(t, dtype=torch.float64), cond)
    torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-4)


# -- distillation runs, export -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dmd2_runs(pipes, inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for family in ("sd", "sdxl", "sd3", "flux"):
        times = (1.0,) if family == "flux" else (1.0, 0.5)
        cfg = run_cfg("dmd2", pipes[family], inputs, times=times)
        cfg.data = str(inputs / "imgs")
        runs[family] = make_trainer(cfg, root / family).run()
    return runs


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_dmd2_finite(dmd2_runs, family):
    row = last_log(dmd2_runs[family])
    assert row["step"] == 2
    assert all(math.isfinite(v) for k, v in row.items() if k.startswith("loss/"))
    assert "loss/gan_d" in row  # real VAE latents reached the GAN term


@pytest.mark.parametrize("method", ["adm", "dmdx"])
def test_adm_dmdx_finite(pipes, inputs, tmp_path, method):
    run = make_trainer(run_cfg(method, pipes["sd"], inputs), tmp_path / method).run()
    row = last_log(run)
    assert all(math.isfinite(v) for k, v in row.items() if k.startswith("loss/"))


def _pipe_kwargs(family, info, cond, den, noise):
    from dmdx.teachers import sampling_args

    kw = dict(prompt_embeds=cond["text"], latents=den.schedule.prior(noise), output_type="latent",
              **sampling_args(info))
    if "pooled" in cond:
        kw["pooled_prompt_embeds"] = cond["pooled"]
    if family == "flux":
        kw["latents"] = pack(kw["latents"])
        kw["height"] = kw["width"] = 16
    return kw


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_export_reproduces_student(dmd2_runs, tmp_path, family):
    from diffusers import DiffusionPipeline

    from dmdx.teachers import export_run
    from dmdx.teachers import load_model
    from dmdx.sampling import student_sample

    run = dmd2_runs[family]
    out = export_run(run, tmp_path / "pipe")
    m = load_model(run)  # the run folder rebuilds the student from the teacher folder + its weights
    den, info = m.denoiser, m.info
    bank, _ = load_cond(run / "prompts.safetensors")
    cond = {k: v[:2] for k, v in bank.items()}
    noise = torch.randn(2, *info.shape, generator=torch.Generator().manual_seed(1))
    # VP pipelines pass their generator to the scheduler; SD3 / Flux re-noise from the global RNG
    torch.manual_seed(5)
    ref = student_sample(den, den.schedule, noise, info.times, cond, generator=torch.Generator().manual_seed(5)
                         if family in ("sd", "sdxl") else None)
    pipe = DiffusionPipeline.from_pretrained(str(out))
    torch.manual_seed(5)
    got = pipe(generator=torch.Generator().manual_seed(5), **_pipe_kwargs(family, info, cond, den, noise)).images
    if family == "flux":
        got = unpack(got, 8, 8)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_lora_export_loads_into_base(pipes, inputs, tmp_path):
    from diffusers import DiffusionPipeline

    from dmdx.teachers import export_run
    from dmdx.teachers import load_model

    lora = {"rank": 4, "alpha": 4.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}
    cfg = run_cfg("dmd2", pipes["sd"], inputs, steps=2)
    cfg.real.student_lora.rank = 4
    cfg.real.fake_lora.rank = 4
    cfg.method.gan = False
    run = make_trainer(cfg, tmp_path / "run").run()
    m = load_model(run)
    assert m.info.backbone["config"]["lora"] == lora
    trainable = [n for n, p in m.denoiser.backbone.named_parameters()]
    assert trainable and all("lora_" in n for n in trainable)
    full = export_run(run, tmp_path / "full")
    lora_dir = export_run(run, tmp_path / "lora", "lora")
    base = DiffusionPipeline.from_pretrained(str(pipes["sd"]))
    base.scheduler = DiffusionPipeline.from_pretrained(str(full)).scheduler
    base.load_lora_weights(str(lora_dir))
    merged = DiffusionPipeline.from_pretrained(str(full))
    bank, _ = load_cond(run / "prompts.safetensors")
    noise = torch.randn(1, *m.info.shape, generator=torch.Generator().manual_seed(0))
    kw = _pipe_kwargs("sd", m.info, {"text": bank["text"][:1]}, m.denoiser, noise)
    a = base(generator=torch.Generator().manual_seed(3), **kw).images
    b = merged(generator=torch.Generator().manual_seed(3), **kw).images
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


# -- errors --------------------------------------------------------------------------------------------------------
def test_errors(pipes, inputs, tmp_path):
    from dmdx.teachers import load_model

    with pytest.raises(FileNotFoundError, match="looks like a Hugging Face hub id: nothing is downloaded"):
        load_model("stabilityai/sdxl-turbo")
    with pytest.raises(FileNotFoundError, match="local diffusers pipeline folder"):
        check_folder(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(pipes["sd"], bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet3DConditionModel"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="supported: UNet2DConditionModel, SD3Transformer2DModel"):
        load_model(bad)
    cfg = run_cfg("dmd2", pipes["sd"], inputs, resolution=18)
    with pytest.raises(ValueError, match="not a multiple"):
        make_trainer(cfg, tmp_path / "r1")
    cfg = run_cfg("dmd2", pipes["flux"], inputs, times=(1.0,))
    cfg.method.real_guidance = 3.0
    with pytest.raises(ValueError, match="guidance-distilled"):
        make_trainer(cfg, tmp_path / "r2")

"""Video teachers: tiny random CogVideoX and Wan pipelines saved as local folders (9 frames of 16x16 pixels)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
av = pytest.importorskip("av")

from dmdx.cli import main  # noqa: E402
from dmdx.config import VideoConfig  # noqa: E402
from dmdx.nets.video import WanBackbone  # noqa: E402
from dmdx.pipelines.video import check_video_folder, geometry  # noqa: E402
from dmdx.teachers.video import load_teacher  # noqa: E402
from dmdx.pipelines.folder import load_cond  # noqa: E402
from dmdx.teachers.video.tiny import make_tiny_video_pipeline  # noqa: E402

WAN_SIZE = ["--set", "video.frames=9", "--set", "video.height=16", "--set", "video.width=16"]  # no native size


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny pipelines run faster on one thread (conftest.py)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vpipes")
    out = {f: make_tiny_video_pipeline(f, root / f) for f in ("cogvideox", "wan")}
    out["cogvideox_2b"] = make_tiny_video_pipeline("cogvideox", root / "cog2b", rotary=False)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from helpers import video_inputs

    root = video_inputs(tmp_path_factory.mktemp("vinputs"),
                        ["a red cat runs", "a blue bird flies over hills", "sunset over the sea"], 3)
    (root / "vids" / "v0.txt").write_text("a green dog in snow")
    return root


def distill(method, pipe, inputs, out, *extra):
    argv = ["distill", "--method", method, "--teacher", str(pipe), "--prompts", str(inputs / "p.txt"),
            "--out", str(out), "--steps", "1", "--quiet", "--set", "train.batch_size=2", *extra]
    assert main(argv) == 0
    return out


def last_log(run):
    return json.loads((run / "log.jsonl").read_text().splitlines()[-1])


# -- the teacher's maths against the pipeline's own scheduler ----------------------------------------------------
@pytest.mark.parametrize("family", ["cogvideox", "cogvideox_2b", "wan"])
def test_x0_matches_scheduler(pipes, family):
    from diffusers import CogVideoXDDIMScheduler, UniPCMultistepScheduler

    m = load_teacher(pipes[family], vc=VideoConfig(9, 16, 16))
    den, bb = m.denoiser, m.denoiser.backbone
    torch.manual_seed(0)
    x = torch.randn(2, *m.info.shape)
    cond = bb.null_cond(None)
    if family.startswith("cogvideox"):
        assert m.info.shape == [4, 3, 2, 2]
        sched = CogVideoXDDIMScheduler.from_pretrained(str(pipes[family] / "scheduler"))
        sched.set_timesteps(50)
        for step in (int(sched.timesteps[0]), int(sched.timesteps[20])):  # 999 (alpha = 0) and an inner step
            t = step / 999
            assert float(den.schedule.model_time(torch.tensor(t))) == pytest.approx(step, abs=1e-3)
            out = bb(x, torch.tensor([float(step)]), cond)
            ref = sched.step(out, step, x).pred_original_sample
            got = den(x, torch.tensor(t, dtype=torch.float64), cond)
            torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-4)
    else:
        assert m.info.shape == [16, 3, 2, 2]
        sched = UniPCMultistepScheduler.from_pretrained(str(pipes[family] / "scheduler"))
        sched.set_timesteps(10)
        i = 3
        sched._step_index = i
        sigma = float(sched.sigmas[i])
        shift = den.schedule.shift
        t = sigma / (shift - (shift - 1) * sigma)  # the unshifted time of the scheduler's sigma
        mt = den.schedule.model_time(torch.tensor([t]))
        assert abs(float(mt) - float(sched.timesteps[i])) < 1  # UniPC rounds its timesteps down to integers
        out = bb(x, mt, cond)
        ref = sched.convert_model_output(out, sample=x)
        got = den(x, torch.tensor(t, dtype=torch.float64), cond)
        torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_folder_is_a_working_pipeline(pipes, family):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipes[family]))
    kw = {"max_sequence_length": 16} if family == "cogvideox" else {}
    out = pipe("a red cat", height=16, width=16, num_frames=9, num_inference_steps=2, output_type="latent", **kw)
    assert out.frames.shape[1:3] == ((3, 4) if family == "cogvideox" else (16, 3))  # CogVideoX: frames first


def test_features_are_3d_maps(pipes):
    from dmdx.denoiser import FeatureTap

    m = load_teacher(pipes["cogvideox"])
    bb = m.denoiser.backbone
    with FeatureTap(bb, bb.feature_layers) as tap:
        bb(torch.randn(2, *m.info.shape), torch.tensor([500.0]), bb.null_cond(None))
    assert [tuple(f.shape) for f in tap.features] == [(2, 32, 3, 2, 2)] * 2  # [B, D, T, h, w] per tapped block


def test_grad_checkpointing_same_gradients(pipes):
    m = load_teacher(pipes["wan"], vc=VideoConfig(9, 16, 16))
    x = torch.randn(2, *m.info.shape)
    grads = []
    for gc in (False, True):
        bb = WanBackbone(**{**m.info.backbone["config"], "grad_checkpointing": gc}).train()
        assert bb.model.is_gradient_checkpointing == gc
        bb(x, torch.tensor([500.0]), None).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in bb.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


# -- errors --------------------------------------------------------------------------------------------------------
def test_errors(pipes, tmp_path):
    from dmdx.teachers import load_model

    with pytest.raises(FileNotFoundError, match="local diffusers pipeline folder"):
        check_video_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"frames must be 4k \+ 1"):
        geometry(pipes["cogvideox"], frames=8)
    with pytest.raises(ValueError, match="height=20 is not a multiple of 8 pixels"):
        geometry(pipes["cogvideox"], height=20)
    with pytest.raises(ValueError, match="width=24 is not a multiple of 16 pixels"):
        geometry(pipes["wan"], 9, 16, 24)
    bad = tmp_path / "bad"
    shutil.copytree(pipes["wan"], bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]  # Wan2.2's second expert, weights and all
    (bad / "model_index.json").write_text(json.dumps(index))
    shutil.copytree(bad / "transformer", bad / "transformer_2")
    with pytest.raises(ValueError, match="transformer_2"):
        load_model(bad)
    index["transformer_2"] = [None, None]
    index["transformer"] = ["diffusers", "LTXVideoTransformer3DModel"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unsupported transformer class 'LTXVideoTransformer3DModel'; supported: "
                       ".*CogVideoXTransformer3DModel, WanTransformer3DModel"):
        load_model(bad)
    assert geometry(pipes["cogvideox"]).shape == (4, 3, 2, 2)  # the transformer's native 9 x 16 x 16


def test_video_folder_errors(tmp_path):
    from dmdx.data.video import load_video_folder, write_video

    with pytest.raises(FileNotFoundError, match="video folder not found"):
        load_video_folder(tmp_path / "none", 9, 16, 16)
    (tmp_path / "v").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        load_video_folder(tmp_path / "v", 9, 16, 16)
    write_video(tmp_path / "v" / "a.mp4", torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match="has 5 frames; the teacher needs 9"):
        load_video_folder(tmp_path / "v", 9, 16, 16)


# -- runs at the defaults (bf16 teacher unless said), export, samples ----------------------------------------------
@pytest.fixture(scope="module")
def runs(pipes, inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("vruns")
    small_pairs = ["--set", "pairs.n=2", "--set", "pairs.steps=2"]
    return {
        "adm_cog": distill("adm", pipes["cogvideox"], inputs, root / "adm_cog"),
        "adm_wan": distill("adm", pipes["wan"], inputs, root / "adm_wan", *WAN_SIZE),
        "dmd2_wan": distill("dmd2", pipes["wan"], inputs, root / "dmd2_wan", "--data", str(inputs / "vids"),
                            *WAN_SIZE),
        "dmd2_cog32": distill("dmd2", pipes["cogvideox"], inputs, root / "dmd2_cog32", "--data",
                              str(inputs / "vids"), "--set", "real.teacher_dtype=float32", "--set",
                              "student.times=[1.0,0.5]"),
        # pairs.n left at its default (train.steps x train.batch_size = 4): one ADP iteration (3-D latent heads),
        # one ADM
        "dmdx_cog": distill("dmdx", pipes["cogvideox"], inputs, root / "dmdx_cog", "--set", "pairs.steps=2",
                            "--steps", "2", "--set", "train.log_every=1"),
        "dmdx_wan32": distill("dmdx", pipes["wan"], inputs, root / "dmdx_wan32", *small_pairs, *WAN_SIZE,
                              "--set", "real.teacher_dtype=float32", "--set", "student.times=[1.0,0.5]",
                              "--set", "method.adp_fraction=0"),
    }


@pytest.mark.parametrize("name", ["adm_cog", "adm_wan", "dmd2_wan", "dmd2_cog32", "dmdx_cog", "dmdx_wan32"])
def test_one_iteration_at_defaults(runs, name):
    run = runs[name]
    row = last_log(run)
    cfg = json.loads((run / "config.json").read_text())
    assert row["step"] == (2 if name == "dmdx_cog" else 1)
    assert all(math.isfinite(v) for k, v in row.items() if k.startswith("loss/"))
    assert cfg["real"]["teacher_dtype"] == ("float32" if name.endswith("32") else "bfloat16")
    assert cfg["real"]["grad_checkpointing"] is True  # the video recipes
    if name == "adm_cog":
        assert len(cfg["student"]["times"]) == 8  # the ADM paper's 8-step CogVideoX setting
        assert "loss/gan_g" in row and "loss/gan_d" in row
    if name == "dmdx_cog":
        pairs = json.loads((run / "pairs" / "pairs.json").read_text())  # the shared, resumable collector
        assert pairs["n"] == 4 and pairs["guidance"] == 6.0 and pairs["teacher_dtype"] == "bfloat16"
        first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
        assert first["stage"] == "adp" and row["stage"] == "adm"
        assert all(math.isfinite(v) for k, v in first.items() if k.startswith("loss/"))
    if name.startswith("dmd2"):
        assert "loss/gan_d" in row  # real video latents reached DMD2's GAN term
        lat = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(run / "latents.safetensors"))
        assert lat["x"].shape[0] == 3 and lat["has_caption"].tolist() == [True, False, False]
        assert lat["cond.text"][0].abs().sum() > 0 and lat["cond.text"][1:].abs().sum() == 0
    info = json.loads((run / "model.json").read_text())
    assert info["extra"]["family"] == ("wan" if "wan" in name else "cogvideox")


def test_backward_simulation_over_student_times(pipes, inputs, tmp_path):
    """student_x0 runs k no-grad student steps, re-noises to times[k] and predicts from there, for every k."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers import tiny_config

    from dmdx.sampling import student_sample
    from dmdx.teachers import build_run

    cfg = tiny_config("adm", teacher=str(pipes["cogvideox"]), steps=1, batch_size=1)
    cfg.real.prompts, cfg.real.teacher_dtype = str(inputs / "p.txt"), "float32"
    cfg.student.times = [1.0, 0.75, 0.5, 0.25]
    ctx, _ = build_run(cfg, tmp_path / "r")
    assert ctx.times == [round(t * 999) / 999 for t in cfg.student.times]
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x0, cond, t_k = ctx.student_x0(1, grad=False)
        k = ctx.times.index(t_k)
        seen.add(k)
        torch.manual_seed(seed)  # replay: the same cond, k and noise give the same k-step input
        cond2 = ctx.cond(1)
        int(torch.randint(len(ctx.times), ()))
        x_in = student_sample(ctx.student, ctx.schedule, ctx.noise(1), ctx.times, cond2, stop_at=k)
        torch.testing.assert_close(x0, ctx.student(x_in, t_k, cond2))
    assert len(seen) >= 3


def video_latents(run, pipe, args: dict, prompt: str):
    """(dmdx student sample, ``pipe(prompt, **args)``) as latents [1, C, T, H, W], from the same start latents and
    re-noise seed; the pipeline encodes the prompt string itself (the run's prompt bank holds its encoding)."""
    from dmdx.teachers import load_model
    from dmdx.sampling import student_sample

    m = load_model(run)
    den, info = m.denoiser, m.info
    bank, _ = load_cond(run / "prompts.safetensors")
    prompts = [line.strip() for line in open(json.loads((run / "config.json").read_text())["real"]["prompts"])
               if line.strip()]
    cond = {k: v[prompts.index(prompt)][None] for k, v in bank.items()}
    noise = torch.randn(1, *info.shape, generator=torch.Generator().manual_seed(1))
    lat = den.schedule.prior(noise)
    if info.extra["family"] == "cogvideox":  # LCM draws its re-noising noise in the pipeline's [B, T, C, H, W] layout
        g, x = torch.Generator().manual_seed(5), lat
        for k, t in enumerate(info.times):
            ref = den(x, t, cond)
            if k + 1 < len(info.times):
                eps = torch.randn(x.transpose(1, 2).shape, generator=g).transpose(1, 2)
                x = den.schedule.add_noise(ref, eps, info.times[k + 1])
        got = pipe(prompt, latents=lat.transpose(1, 2), output_type="latent",
                   generator=torch.Generator().manual_seed(5), **args).frames.transpose(1, 2)
    else:  # the flow scheduler re-noises from the global RNG
        torch.manual_seed(5)
        ref = student_sample(den, den.schedule, noise, info.times, cond)
        torch.manual_seed(5)
        got = pipe(prompt, latents=lat, output_type="latent", **args).frames
    return ref, got


@pytest.mark.parametrize("name", ["dmd2_cog32", "dmdx_wan32", "adm_wan"])
def test_export_reproduces_student(runs, inputs, name, tmp_path):
    from diffusers import DiffusionPipeline

    from dmdx.teachers import export_run

    run = runs[name]
    out = export_run(run, tmp_path / "pipe")
    meta = json.loads((out / "dmdx_student.json").read_text())
    times = json.loads((run / "model.json").read_text())["times"]
    pipe = DiffusionPipeline.from_pretrained(str(out))
    if "wan" in name:
        from dmdx.schedules import make_schedule

        assert meta["exact"]  # the recipe's 4 times too: the exported scheduler's own set_timesteps(4) gives them
        pipe.scheduler.set_timesteps(len(times))
        schedule = make_schedule(json.loads((run / "model.json").read_text())["schedule"])
        torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(),
                                   schedule.sigma(torch.tensor(times, dtype=torch.float64)), rtol=0, atol=1e-6)
    for prompt in (inputs / "p.txt").read_text().splitlines()[:2]:
        ref, got = video_latents(run, pipe, meta["call"], prompt)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# the recipe-style LoRA of the video tests: attention, feed-forward, output projection, time embedding and the
# patch-embedding conv, alpha != rank
VIDEO_LORA_TARGETS = {
    "cogvideox": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out",
                  "time_embedding.linear_1", "time_embedding.linear_2", "patch_embed.proj"],
    "wan": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out",
            "condition_embedder.time_embedder.linear_1", "condition_embedder.time_proj", "patch_embedding"],
}


@pytest.fixture(scope="module")
def lora_runs(pipes, inputs, tmp_path_factory):
    """One-step DMD2 LoRA students (rank 4, alpha 1: scale 1/4), LoRA weights then randomised (both factors, as in
    tests/test_export.py: a dropped or mis-scaled module moves the video far beyond the tolerance). CogVideoX at 2
    steps (999 and 500, off LCM's grid: the call passes timesteps=), Wan at the recipe's 4."""
    from helpers import randomise_lora

    root = tmp_path_factory.mktemp("vlora")
    out = {}
    for fam, extra in (("cogvideox", ["--set", "student.times=[1.0,0.5]"]), ("wan", WAN_SIZE)):
        lora = ["--set", "method.gan=false", "--set", "real.student_lora.rank=4", "--set", "real.student_lora.alpha=1",
                "--set", f"real.student_lora.targets={json.dumps(VIDEO_LORA_TARGETS[fam])}"]
        out[fam] = randomise_lora(distill("dmd2", pipes[fam], inputs, root / fam, *lora, *extra))
    return out


@pytest.mark.parametrize("family,fmt", [(f, x) for f in ("cogvideox", "wan") for x in ("diffusers", "lora")])
def test_printed_code_reproduces_lora_student(lora_runs, pipes, inputs, tmp_path, family, fmt):
    """The lines `dmdx export` prints (and writes into the model card), run as written, make a video; the same
    pipe and args from the student's start latents give the student's latents, and the base model is far away."""
    import re

    from diffusers import DiffusionPipeline

    from dmdx.teachers import export_run, usage
    from dmdx.models import read_info

    run = lora_runs[family]
    info = read_info(run)
    out = export_run(run, tmp_path / "out", fmt)
    code = usage(info, fmt, out)
    card = (out / "README.md").read_text()
    assert f"```python\n{code}\n```" in card
    ns: dict = {}
    exec(compile(re.search(r"```python\n(.*?)```", card, re.S).group(1), "<usage>", "exec"), ns)  # noqa: S102
    assert len(ns["video"]) == 9  # frames
    prompt = (inputs / "p.txt").read_text().splitlines()[0]
    ref, got = video_latents(run, ns["pipe"], ns["args"], prompt)
    if fmt == "diffusers":
        bare = DiffusionPipeline.from_pretrained(str(pipes[family]))
        bare.scheduler = ns["pipe"].scheduler
    else:
        bare = ns["pipe"]
        bare.unload_lora_weights()
    _, far = video_latents(run, bare, ns["args"], prompt)
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale)
    assert (far - ref).abs().max() > 1e-2 * scale


def test_wan_times_off_the_scheduler_grid(lora_runs, inputs, tmp_path):
    """Wan times no shift puts on the scheduler's own grid (WanPipeline passes only num_inference_steps): the printed
    lines point set_timesteps at them, and then reproduce the student."""
    from helpers import with_times

    from dmdx.teachers import export_run, usage
    from dmdx.models import read_info

    run = with_times(lora_runs["wan"], [1.0, 0.9, 0.5], tmp_path / "run")
    info = read_info(run)
    out = export_run(run, tmp_path / "out")
    assert json.loads((out / "dmdx_student.json").read_text())["exact"] is False
    ns: dict = {}
    exec(compile(usage(info, "diffusers", out), "<usage>", "exec"), ns)  # noqa: S102
    prompt = (inputs / "p.txt").read_text().splitlines()[0]
    ref, got = video_latents(run, ns["pipe"], ns["args"], prompt)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_video_comfyui_refused(lora_runs, tmp_path):
    from dmdx.teachers import export_run

    with pytest.raises(ValueError, match="use --format lora or --format diffusers"):
        export_run(lora_runs["wan"], tmp_path / "x.safetensors", "comfyui")
    assert not list(tmp_path.iterdir())


def test_sample_writes_mp4(runs, inputs, tmp_path):
    out = tmp_path / "vids"
    assert main(["sample", "--model", str(runs["dmdx_wan32"]), "--prompts", str(inputs / "p.txt"),
                 "--out", str(out), "--device", "cpu"]) == 0
    mp4s = sorted(out.glob("*.mp4"))
    assert len(mp4s) == 3 and len(list(out.glob("*.gif"))) == 3
    with av.open(str(mp4s[0])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (16, 16, 3)

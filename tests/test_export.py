"""Exports of pipeline students: the printed lines (and the model card's, the same), run as written, reproduce the
dmdx student; so does the shortest call on the pipeline export.

The students (conftest ``pipeline_students``) are trained one DMD2 step at the recipe's LoRA (rank 64, alpha 8, i.e.
a scale of 1/8; the UNets' targets include convs, projections, feed-forward and the resnets' time-embedding
projections), then every lora_A and lora_B is randomised (helpers.randomise_lora): each module's delta is then as
large as its base weights, so a LoRA loaded at alpha = rank (8x too large), a module dropped or one loaded onto the
wrong layer moves the latents far beyond the tolerance.  Each test also checks that the untouched base model lies
far outside it, so the check can fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from dmdx.nets.pipeline import lora_state_dict, pack, unpack  # noqa: E402
from dmdx.pipelines.image import encode_prompts  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "real-models.md"
FAMILIES = ("sd", "sd_v", "sdxl", "sd3", "flux")
UNETS = ("sd", "sd_v", "sdxl")
PROMPT = "a red cat"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny pipelines run faster on one thread (conftest.py)


@pytest.fixture(scope="module")
def students(pipeline_students):
    return {fam: pipeline_students(fam) for fam in FAMILIES}


def run_code(code: str) -> dict:
    """Execute printed / documented lines as written; returns their namespace (pipe, args, image)."""
    ns: dict = {}
    exec(compile(code, "<usage>", "exec"), ns)  # noqa: S102 - our own generated snippet
    return ns


def student_latents(run: Path, pipe, args: dict, prompt: str = PROMPT):
    """(dmdx student sample, ``pipe(prompt, **args)``) as latents, for the same start latents and re-noise seed."""
    from dmdx.teachers import load_model
    from dmdx.sampling import student_sample

    m = load_model(run)
    den, info = m.denoiser, m.info
    fam = info.extra["family"]
    bank, _ = encode_prompts(Path(info.extra["pipeline"]), [prompt], tuple(info.shape))
    noise = torch.randn(1, *info.shape, generator=torch.Generator().manual_seed(1))
    vp = fam == "unet"
    torch.manual_seed(5)  # SD3 / Flux pipelines re-noise from the global RNG
    ref = student_sample(den, den.schedule, noise, info.times, bank,
                         generator=torch.Generator().manual_seed(5) if vp else None)
    latents = den.schedule.prior(noise)
    torch.manual_seed(5)
    got = pipe(prompt, generator=torch.Generator().manual_seed(5), output_type="latent",
               latents=pack(latents) if fam == "flux" else latents, **args).images
    if fam == "flux":
        got = unpack(got, *info.shape[1:])
    return ref, got


def assert_student(got, ref, bare):
    """``got`` equals the student ``ref`` to 1e-4 of its range; the base model's ``bare`` is over 100x further."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale)
    assert (bare - ref).abs().max() > 1e-2 * scale


@pytest.mark.parametrize("family,fmt", [(f, "diffusers") for f in FAMILIES] + [(f, "lora") for f in FAMILIES]
                         + [(f, "comfyui") for f in UNETS])
def test_printed_code_reproduces_student(students, tmp_path, family, fmt):
    """`dmdx export` prints these lines and writes them into the model card; run as written they sample the
    student, at the recipe's LoRA settings."""
    from diffusers import DiffusionPipeline

    from dmdx.teachers import export_run, usage
    from dmdx.models import read_info
    from dmdx.teachers import load_model

    run = students[family]
    info = read_info(run)
    out = export_run(run, tmp_path / ("student.safetensors" if fmt == "comfyui" else "out"), fmt)
    folder = out.with_suffix("") if fmt == "comfyui" else out
    code = usage(info, fmt, out)
    card = (folder / "README.md").read_text()
    assert f"```python\n{code}\n```" in card  # the model card holds the printed lines
    ns = run_code(re.search(r"```python\n(.*?)```", card, re.S).group(1))  # run the card's code, as written
    assert ns["image"].size == (16, 16)
    assert json.loads((folder / "dmdx_student.json").read_text())["call"] == ns["args"]
    ref, got = student_latents(run, ns["pipe"], ns["args"])
    if fmt == "diffusers":
        bare = DiffusionPipeline.from_pretrained(info.extra["pipeline"])
        bare.scheduler = ns["pipe"].scheduler
    else:
        bare = ns["pipe"]
        bare.unload_lora_weights()
    assert_student(got, ref, student_latents(run, bare, ns["args"])[1])
    if fmt == "comfyui":
        from safetensors import safe_open

        with safe_open(str(out), "pt") as h:
            keys, meta = list(h.keys()), h.metadata()
        lora = lora_state_dict(load_model(run).denoiser.backbone.model)
        assert len(keys) == 3 * len(lora) // 2  # every module: down, up, alpha (convs and time embeddings too)
        assert all(k.startswith("lora_unet_") for k in keys) and meta["ss_network_alpha"] == "8.0"
        assert json.loads(meta["dmdx_student"]) == ns["args"]


@pytest.mark.parametrize("family", FAMILIES)
def test_shortest_call_on_pipeline_export(students, tmp_path, family):
    """The pipeline export's config carries what it can: a UNet export has CFG off (its default guidance 7.5 is
    in effect here) and its scheduler picks the student's timesteps from num_inference_steps when they are on its
    grid; more steps than the student has are refused."""
    from diffusers import DiffusionPipeline

    from dmdx.teachers import export_run, student_call
    from dmdx.models import read_info

    run = students[family]
    info = read_info(run)
    out = export_run(run, tmp_path / "out")
    call = student_call(info)
    plain = call.shortest("diffusers")
    expected = {"sd": {"num_inference_steps": 2, "timesteps": [999, 500]},  # LCM's 2-step grid has 499
                "sd_v": {"num_inference_steps": 1}, "sdxl": {"num_inference_steps": 2, "timesteps": [999, 500]},
                "sd3": {"num_inference_steps": 4, "guidance_scale": 1.0},
                "flux": {"num_inference_steps": 1, "height": 16, "width": 16}}  # FluxPipeline's default: 1024 px
    assert plain == expected[family]
    assert f"`pipe(prompt{''.join(f', {k}={v!r}' for k, v in plain.items())})`" in (out / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(str(out))
    ref, got = student_latents(run, pipe, plain)
    if family in UNETS:
        with pytest.raises(ValueError, match="num_inference_steps"):
            pipe(PROMPT, output_type="latent")  # the pipeline's default 50 steps: refused by the scheduler
        pipe.unet.register_to_config(time_cond_proj_dim=None)  # the same weights, CFG on (7.5 by default)
        bare = pipe
    else:
        bare = DiffusionPipeline.from_pretrained(info.extra["pipeline"])
        bare.scheduler = pipe.scheduler
    assert_student(got, ref, student_latents(run, bare, plain)[1])


def test_sd3_times_off_the_scheduler_grid(students, tmp_path):
    """Times whose sigmas no shift makes the scheduler's own grid: the call passes sigmas= (the printed lines)."""
    from helpers import with_times

    from dmdx.teachers import export_run, student_call, usage
    from dmdx.models import read_info

    run = with_times(students["sd3"], [1.0, 0.9, 0.5], tmp_path / "run")
    info = read_info(run)
    assert not student_call(info).exact
    ns = run_code(usage(info, "lora", export_run(run, tmp_path / "out", "lora")))
    assert ns["args"]["sigmas"] == [1.0, 0.9, 0.5]
    ref, got = student_latents(run, ns["pipe"], ns["args"])
    ns["pipe"].unload_lora_weights()
    assert_student(got, ref, student_latents(run, ns["pipe"], ns["args"])[1])


def test_lora_file_is_checked_against_the_student(students, tmp_path):
    """A LoRA file diffusers would load differently is refused by module: here one written without its adapter
    config (the loader then assumes alpha = rank: every module 8x too large)."""
    from diffusers import StableDiffusionPipeline

    from dmdx.export import check_lora_file
    from dmdx.teachers import load_model

    m = load_model(students["sd"])
    model = m.denoiser.backbone.model
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=lora_state_dict(model))
    with pytest.raises(ValueError, match=r"down_blocks\.0\.resnets\.0\.conv1 \(scale 1 instead of 0\.125"):
        check_lora_file(Path(m.info.extra["pipeline"]), "unet", tmp_path, model)


def test_base_scheduler_cannot_run_the_student(students):
    """Why the LoRA ships a scheduler: SD1.5's PNDM refuses the student's timesteps."""
    from diffusers import DiffusionPipeline

    from dmdx.teachers import sampling_args
    from dmdx.models import read_info

    info = read_info(students["sd"])
    pipe = DiffusionPipeline.from_pretrained(info.extra["pipeline"])
    with pytest.raises(ValueError, match="timestep"):
        pipe("a red cat", output_type="latent", **sampling_args(info))


def test_docs_show_the_printed_usage(tmp_path, monkeypatch):
    """docs/real-models.md holds the lines `dmdx export` prints for its example: a one-step SD1.5 student (the
    published configs of its folder ./sd15: PNDM scheduler, 64x64 latents, 8x VAE)."""
    from dmdx.teachers import usage
    from dmdx.models import ModelInfo

    monkeypatch.chdir(tmp_path)
    sd15 = Path("sd15")
    for sub, name, cfg in (("unet", "config.json", {"sample_size": 64, "in_channels": 4}),
                           ("vae", "config.json", {"block_out_channels": [128, 256, 512, 512]}),
                           ("scheduler", "scheduler_config.json",
                            {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True,
                             "steps_offset": 1, "set_alpha_to_one": False})):
        (sd15 / sub).mkdir(parents=True)
        (sd15 / sub / name).write_text(json.dumps(cfg))
    (sd15 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    text = re.sub(r"^  ", "", DOCS.read_text(), flags=re.M)  # code blocks inside list items are indented
    info = ModelInfo(kind="student", backbone={"name": "sd_unet", "config": {}}, schedule={}, prediction="epsilon",
                     shape=[4, 64, 64], times=[1.0], extra={"family": "unet", "pipeline": "./sd15"})
    code = re.findall(r"```python\n(.*?)\n```", text, re.S)
    for fmt, out in (("diffusers", "sd15-student"), ("lora", "sd15-lora")):
        assert usage(info, fmt, out) in code, fmt


def test_comfyui_refuses_other_families(students, tmp_path):
    from dmdx.teachers import export_run

    with pytest.raises(ValueError, match="supports SD1.5/SD2/SDXL"):
        export_run(students["sd3"], tmp_path / "x.safetensors", "comfyui")
    with pytest.raises(ValueError, match=r"one \.safetensors file"):
        export_run(students["sd"], tmp_path / "x", "comfyui")
    assert not list(tmp_path.iterdir())

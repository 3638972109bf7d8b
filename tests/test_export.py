"""Exports of pipeline students: the documented calls, run as written, reproduce the dmdx student.

The LoRA students are trained for one step, then their LoRA up-weights are set to random values (a fresh LoRA is
the identity, and one step barely moves it), so that a LoRA that is not loaded, or loaded onto the wrong
modules, changes the images far beyond the tolerance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from dmdx.teachers import diffusers as dfs  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "real-models.md"
FAMILIES = ("sd", "sdxl", "sd3", "flux")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny pipelines run faster on one thread (conftest.py)


@pytest.fixture(scope="module")
def students(pipeline_students):
    return {fam: pipeline_students(fam) for fam in FAMILIES}


def run_usage(code: str) -> dict:
    """Execute the printed / documented lines as written; returns their namespace (pipe, args, image)."""
    ns: dict = {}
    exec(compile(code, "<usage>", "exec"), ns)  # noqa: S102 - our own generated snippet
    return ns


def student_reference(run: Path, pipe, args: dict, prompt: str):
    """(dmdx student sample, the same call on the loaded pipeline) for the same start latents and re-noise seed."""
    from dmdx.models import load_model
    from dmdx.sampling import student_sample

    m = load_model(run)
    den, info = m.denoiser, m.info
    fam = info.extra["family"]
    bank, _ = dfs.encode_prompts(Path(info.extra["pipeline"]), [prompt], tuple(info.shape))
    noise = torch.randn(1, *info.shape, generator=torch.Generator().manual_seed(1))
    vp = fam == "unet"
    torch.manual_seed(5)  # SD3 / Flux pipelines re-noise from the global RNG
    ref = student_sample(den, den.schedule, noise, info.times, bank,
                         generator=torch.Generator().manual_seed(5) if vp else None)
    latents = den.schedule.prior(noise)
    kw = dict(latents=dfs.pack(latents) if fam == "flux" else latents, output_type="latent")
    if fam == "flux":
        kw["height"] = kw["width"] = 16
    torch.manual_seed(5)
    got = pipe(prompt, generator=torch.Generator().manual_seed(5), **kw, **args).images
    if fam == "flux":
        got = dfs.unpack(got, 8, 8)
    return ref, got


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_usage_reproduces_student(students, tmp_path, family):
    from dmdx.export import export_run, usage
    from dmdx.models import read_info

    run = students[family]
    info = read_info(run)
    out = export_run(run, tmp_path / "lora", "lora")
    assert (out / "scheduler_config.json").is_file()
    code = usage(info, "lora", out, prompt="a red cat")
    ns = run_usage(code)  # the lines as printed: base pipeline, load LoRA, swap scheduler, call with the args
    assert ns["image"].size[0] > 0  # a PIL image at the pipeline's default size
    ref, got = student_reference(run, ns["pipe"], ns["args"], "a red cat")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # without the LoRA the images differ by far more than the tolerance (so the check above can fail)
    ns["pipe"].unload_lora_weights()
    _, bare = student_reference(run, ns["pipe"], ns["args"], "a red cat")
    assert (bare - ref).abs().max() > 1e-2 * ref.abs().max()


def test_base_scheduler_cannot_run_the_student(students):
    """Why the LoRA ships a scheduler: SD1.5's PNDM refuses the student's timesteps."""
    from diffusers import DiffusionPipeline

    from dmdx.export import sampling_args
    from dmdx.models import read_info

    info = read_info(students["sd"])
    pipe = DiffusionPipeline.from_pretrained(info.extra["pipeline"])
    with pytest.raises(ValueError, match="timestep"):
        pipe("a red cat", output_type="latent", **sampling_args(info))


def test_docs_show_the_printed_usage():
    """docs/real-models.md holds the lines `dmdx export` prints (for its example paths)."""
    from dmdx.export import usage
    from dmdx.models import ModelInfo

    text = re.sub(r"^  ", "", DOCS.read_text(), flags=re.M)  # code blocks inside list items are indented
    info = ModelInfo(kind="student", backbone={"name": "sd_unet", "config": {}}, schedule={}, prediction="epsilon",
                     shape=[4, 64, 64], times=[1.0, 0.5], extra={"family": "unet", "pipeline": "./sd15"})
    for fmt, out in (("diffusers", "sd15-student"), ("lora", "sd15-lora")):
        assert usage(info, fmt, out) in text, fmt
    code = re.findall(r"```python\n(.*?)```", text, re.S)
    assert any(usage(info, "lora", "sd15-lora") in c for c in code)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_comfyui_file_loads_through_kohya_converter(students, tmp_path, family):
    from safetensors import safe_open

    from dmdx.export import export_run, usage
    from dmdx.models import read_info

    run = students[family]
    info = read_info(run)
    f = export_run(run, tmp_path / "student.safetensors", "comfyui")
    with safe_open(str(f), "pt") as h:
        keys, meta = list(h.keys()), h.metadata()
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                        for k in keys)
    assert meta["ss_network_dim"] == "4" and json.loads(meta["dmdx_student"])["num_inference_steps"] == 2
    # loaded through diffusers' kohya converter, it reproduces the student as the diffusers-format LoRA does
    # (test_lora_usage_reproduces_student), so both give the same images
    kohya = run_usage(usage(info, "comfyui", f, prompt="a red cat"))
    ref, got = student_reference(run, kohya["pipe"], kohya["args"], "a red cat")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_comfyui_refuses_flow_families(students, tmp_path):
    from dmdx.export import export_run

    with pytest.raises(ValueError, match="supports SD1.5/SD2/SDXL"):
        export_run(students["sd3"], tmp_path / "x.safetensors", "comfyui")
    with pytest.raises(ValueError, match=r"one \.safetensors file"):
        export_run(students["sd"], tmp_path / "x", "comfyui")

"""`dmdx sample` / `dmdx eval` on pipeline teachers and students, and the text-to-image metrics' maths.

Every scorer is a tiny stand-in built here (a random CLIPModel folder, a TorchScript "Inception" with the real
file's call signature, random LPIPS weights in the lpips layout); nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dmdx.eval import scorers  # noqa: E402
from dmdx.teachers.image import evaluate as image_eval  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- tiny stand-ins --------------------------------------------------------------------------------------------
class TinyInception(nn.Module):
    """The real TorchScript file's signature: uint8 [N, 3, H, W] in, ``return_features=True`` -> [N, D]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = torch.relu(self.conv(x.float() / 127.5 - 1))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


def tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dmdx.teachers.image.tiny import _tokenizer

    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                     vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(folder))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                            crop_size={"height": 16, "width": 16}), tokenizer=tok)
    proc.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("scorers")
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyInception().eval()), str(root / "inception.pt"))
    lp = scorers.LPIPS()
    state = {k: v for k, v in lp.state_dict().items()}
    state = {k: (v.abs() if "lin" in k else v) for k, v in state.items()}  # LPIPS's linear weights are >= 0
    save_file(state, str(root / "lpips_alex.safetensors"))
    (root / "prompts.txt").write_text("a red cat\na blue dog\n")
    return {"inception": root / "inception.pt", "lpips": root / "lpips_alex.safetensors",
            "clip": tiny_clip(root / "clip"), "prompts": root / "prompts.txt", "root": root}


@pytest.fixture(scope="module")
def student(pipeline_students):
    return pipeline_students("sd")


def cli(*argv) -> int:
    from dmdx.cli import main

    return main([str(a) for a in argv])


# -- the maths -------------------------------------------------------------------------------------------------
def test_clip_score_matched_beats_shuffled():
    g = torch.Generator().manual_seed(0)
    text = nn.functional.normalize(torch.randn(64, 16, generator=g), dim=-1)
    image = nn.functional.normalize(text + 0.1 * torch.randn(64, 16, generator=g), dim=-1)
    matched = scorers.clip_score(image, text)
    shuffled = scorers.clip_score(image, text[torch.randperm(64, generator=g)])
    cos = (image * text).sum(-1)
    assert matched == pytest.approx(float(100 * cos.clamp(min=0).mean()), rel=1e-5)
    assert matched > 80 and shuffled < 20
    assert scorers.pick_score(image, text, 100.0) == pytest.approx(float(100 * cos.mean()), rel=1e-5)


def test_fid_of_a_set_against_itself_and_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    assert abs(scorers.fid(x, x)) < 1e-6
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 0.0])
    assert scorers.fid(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-4)  # same covariance: |mu1 - mu2|^2


def test_kid_is_unbiased_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    n, d = 12, 4
    x, y = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 0.5
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    brute = sum(kxx[i, j] + kyy[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1)) - 2 * kxy.mean()
    mean, std = scorers.kid(x, y, subsets=3, subset_size=n)
    assert mean == pytest.approx(float(brute), rel=1e-6) and std < 1e-9  # one subset = the whole set
    # same distribution: the unbiased estimate averages to 0 (the biased V-statistic would stay > 0)
    vals, biased = [], []
    for _ in range(60):
        a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        vals.append(scorers.kid(a, b, subsets=1, subset_size=n)[0])
        biased.append(float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()))
    sem = np.std(vals) / math.sqrt(len(vals))
    assert abs(np.mean(vals)) < 3 * sem
    assert np.mean(biased) > 3 * np.std(biased) / math.sqrt(len(biased))


def test_lpips_and_diversity(files):
    lp = scorers.LPIPS.from_file(files["lpips"])
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    assert torch.allclose(lp(a, a), torch.zeros(3), atol=1e-6)
    torch.testing.assert_close(lp(a, b), lp(b, a))
    assert (lp(a, b) > 0).all()
    images = torch.stack([a[0], a[0], a[1], b[1], a[2]])  # prompt 0: two equal images; prompt 1: two different
    div = scorers.lpips_diversity(lp, images, [0, 0, 1, 1, 2])  # prompt 2 has one image: no pair, left out
    assert div == pytest.approx(float(lp(a[1:2], b[1:2])) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 images per prompt"):
        scorers.lpips_diversity(lp, images[:1], [0])
    with pytest.raises(ValueError, match="holds only the linear layers"):
        bad = files["root"] / "lin_only.pth"
        torch.save({k: v for k, v in lp.state_dict().items() if k.startswith("lin")}, bad)
        scorers.LPIPS.from_file(bad)


# -- sampling --------------------------------------------------------------------------------------------------
def test_student_images_are_its_sampler_decoded_and_reproducible(student, files):
    from dmdx.teachers import load_model
    from dmdx.sampling import student_sample
    from dmdx.pipelines.image import encode_prompts

    m = load_model(student)
    prompts = ["a red cat", "a blue dog"]
    s = image_eval.generate_images(m, prompts, per_prompt=2, seed=3, batch_size=3)
    assert s.seeds == [3, 4, 3, 4] and s.prompt_index == [0, 0, 1, 1] and s.nfe == 2
    one = image_eval.generate_images(m, prompts[1:], per_prompt=1, seed=4, batch_size=1)  # another batch, same (prompt, seed)
    torch.testing.assert_close(one.images[0], s.images[3], rtol=0, atol=1e-5)
    # image (p, s) = VAE decode of the student's own loop from seed s
    pipe = Path(m.info.extra["pipeline"])
    bank, _ = encode_prompts(pipe, prompts[1:], tuple(m.info.shape))
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(tuple(m.info.shape), generator=g)[None]
    z = student_sample(m.denoiser, m.denoiser.schedule, noise, m.info.times, bank, generator=[g])
    torch.testing.assert_close(s.images[3:], image_eval.decode_latents(pipe, z), rtol=0, atol=1e-5)


def test_sample_cli_student_and_teacher(student, files, tmp_path):
    from PIL import Image

    from dmdx.models import read_info

    out = tmp_path / "imgs"
    assert cli("sample", "--model", student, "--prompts", files["prompts"], "--out", out, "--per-prompt", 2) == 0
    meta = json.loads((out / "images.json").read_text())
    assert [i["file"] for i in meta["images"]] == ["p000_s0.png", "p000_s1.png", "p001_s0.png", "p001_s1.png"]
    assert (out / "grid.png").is_file()
    again = tmp_path / "again"
    assert cli("sample", "--model", student, "--prompts", files["prompts"], "--out", again, "--per-prompt", 2) == 0
    for i in meta["images"]:
        assert np.array_equal(np.asarray(Image.open(out / i["file"])), np.asarray(Image.open(again / i["file"])))
    assert not np.array_equal(np.asarray(Image.open(out / "p000_s0.png")), np.asarray(Image.open(out / "p000_s1.png")))
    teacher = read_info(student).extra["pipeline"]
    tout = tmp_path / "teacher"
    assert cli("sample", "--model", teacher, "--prompts", files["prompts"], "--out", tout, "--steps", 2,
               "--guidance", 3) == 0
    tmeta = json.loads((tout / "images.json").read_text())
    assert tmeta["steps"] == 2 and tmeta["nfe"] == 4 and tmeta["guidance"] == 3  # CFG: two passes a step
    assert cli("sample", "--model", student, "--out", tmp_path / "x") == 2  # no --prompts: a clear error
    assert cli("sample", "--model", student, "--prompts", files["prompts"], "--out", tmp_path / "x.png") == 2


# -- eval ------------------------------------------------------------------------------------------------------
def test_eval_cli_table(student, files, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    assert cli("sample", "--model", student, "--prompts", files["prompts"], "--out", imgs, "--per-prompt", 2) == 0
    (imgs / "grid.png").unlink()
    capsys.readouterr()
    js = tmp_path / "m.json"
    assert cli("eval", "--model", student, "--prompts", files["prompts"], "--per-prompt", 2, "--clip", files["clip"],
               "--pickscore", files["clip"], "--ref", imgs, "--inception", files["inception"], "--lpips",
               files["lpips"], "--kid-subset-size", 4, "--teacher-steps", 3, "--json", js) == 0
    table = capsys.readouterr().out
    assert "clip_score" in table and "speedup" in table
    rows = json.loads(js.read_text())
    stu, tea = rows
    assert stu["nfe"] == 2 and tea["nfe"] == 6 and tea["steps"] == 3  # teacher: 3 Euler steps with CFG
    assert 0 <= stu["clip_score"] <= 100 and math.isfinite(stu["pickscore"])
    assert abs(stu["fid"]) < 1e-3  # the reference folder holds these very images (same prompts and seeds)
    assert stu["lpips_diversity"] > 0 and math.isfinite(stu["kid"])
    assert stu["speedup"] == pytest.approx(tea["ms_per_image"] / stu["ms_per_image"], rel=1e-6)
    assert tea["speedup"] == pytest.approx(1.0)


def test_eval_errors(student, files, tmp_path, capsys):
    base = ["eval", "--model", student, "--prompts", files["prompts"], "--teacher-steps", 0]
    assert cli(*base, "--ref", tmp_path) == 2
    assert "--inception FILE" in capsys.readouterr().err
    assert cli(*base, "--ref", tmp_path, "--inception", tmp_path / "inception-2015-12-05.pt") == 2
    assert "inception-2015-12-05.pt" in capsys.readouterr().err
    assert cli(*base, "--hpsv2", tmp_path) == 2
    assert "not supported" in capsys.readouterr().err
    assert cli(*base, "--clip", tmp_path / "nope") == 2
    assert "CLIP model folder not found" in capsys.readouterr().err
    assert cli("eval", "--model", "gmm:ring8", "--clip", files["clip"], "--n", 10) == 2


def test_eval_cli_teacher(student, files, tmp_path):
    from dmdx.models import read_info

    js = tmp_path / "t.json"
    teacher = read_info(student).extra["pipeline"]
    assert cli("eval", "--model", teacher, "--prompts", files["prompts"], "--per-prompt", 1, "--steps", 2,
               "--clip", files["clip"], "--json", js) == 0
    row = json.loads(js.read_text())
    assert row["kind"] == "teacher" and row["nfe"] == 4 and row["speedup"] == 1.0 and row["images"] == 2
    assert 0 <= row["clip_score"] <= 100

"""The command line as a user runs it, on tiny settings."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dmdx.cli import main
from dmdx.config import to_dict
from dmdx.pairs import collect_pairs, load_pairs
from dmdx.teachers import load_model
from dmdx.train.run import default_run_config
from dmdx.train.run_folder import RunFolder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_data_list(capsys):
    code, out, _ = run(capsys, "data", "list")
    assert code == 0
    for name in ("ring8", "grid25", "unequal", "digits", "mnist", "mnist16"):
        assert name in out


def test_teacher_train_sample_eval_on_a_toy(tmp_path, capsys):
    t = tmp_path / "teacher"
    code, _, err = run(capsys, "teacher", "train", "--data", "ring8", "--out", t, "--steps", 30, "--quiet",
                       "--set", "train.sample_every=15", "--set", "train.ckpt_every=15")
    assert code == 0, err
    assert (t / "model.json").is_file() and (t / "samples" / "step_0000030.png").is_file()
    code, _, _ = run(capsys, "sample", "--model", t, "--steps", 4, "--n", 50, "--out", tmp_path / "s.npz")
    assert code == 0
    x = np.load(tmp_path / "s.npz")["x"]
    assert x.shape == (50, 2) and np.isfinite(x).all()
    code, _, _ = run(capsys, "sample", "--model", t, "--steps", 4, "--n", 50, "--out", tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 0
    code, out, _ = run(capsys, "eval", "--model", t, "--steps", 2, "--n", 100, "--json", tmp_path / "m.json")
    assert code == 0 and "quality" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["nfe"] == 3 and m["steps"] == 2 and 0 <= m["quality"] <= 1  # heun: 2 * steps - 1


def test_resume_teacher_training(tmp_path, capsys):
    t = tmp_path / "teacher"
    args = ["teacher", "train", "--data", "ring8", "--out", t, "--quiet", "--set", "train.ckpt_every=10",
            "--set", "train.sample_every=0"]
    assert run(capsys, *args, "--steps", 10)[0] == 0
    code, _, err = run(capsys, *args, "--steps", 10)
    assert code == 2 and "--resume" in err
    assert run(capsys, *args, "--steps", 20, "--resume")[0] == 0
    rows = [json.loads(line) for line in (t / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20


def test_distill_dry_run_eval_and_errors(tmp_path, capsys):
    out = tmp_path / "run"
    code, text, _ = run(capsys, "distill", "--method", "dmd2", "--teacher", "gmm:unequal", "--out", out,
                        "--dry-run", "--set", "method.critic_every=3")
    assert code == 0 and json.loads(text)["method"]["critic_every"] == 3
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", "gmm:unequal", "--out", out,
                       "--set", "method.critic_evry=3", "--dry-run")
    assert code == 2 and "critic_every" in err and "allowed" in err
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", "gmm:unequal", "--out", out,
                       "--set", "method.critic_every=often", "--dry-run")
    assert code == 2 and "integer" in err
    code, _, err = run(capsys, "distill", "--method", "dmdx", "--teacher", "gmm:unequal", "--out", out,
                       "--set", 'train.lr_scale={"disc_head": 10}')
    assert code == 2 and "['disc_head']" in err and "disc_heads" in err and "pixel_heads" in err
    assert not (out / "config.json").exists()
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", tmp_path / "nope", "--out", out)
    assert code == 2 and "not found" in err
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", "gmm:ring9", "--out", out)
    assert code == 2 and "ring8" in err
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", "gmm:ring8", "--data", "digitz",
                       "--out", out)
    assert code == 2 and "digits" in err
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", "gmm:ring8", "--data", "digits",
                       "--out", out)
    assert code == 2 and "shape" in err
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", "gmm:ring8", "--out", out,
                       "--set", "student.times=1,0.5,0.7")
    assert code == 2 and "decreasing" in err
    with pytest.raises(SystemExit):
        main(["distill", "--method", "dmd3", "--teacher", "gmm:ring8", "--out", str(out)])
    code, _, _ = run(capsys, "distill", "--method", "dmd2", "--teacher", "gmm:ring8", "--out", out, "--steps", 3,
                     "--quiet", "--set", "surrogate_steps=10", "--set", "train.batch_size=8")
    assert code == 0
    assert json.loads((out / "config.json").read_text())["method"]["name"] == "dmd2"
    code, text, _ = run(capsys, "eval", "--model", out, "--n", 64)
    assert code == 0 and "student" in text
    # --resume reads the run's own config.json; --steps extends it
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--out", out, "--resume", "--steps", 5, "--quiet")
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5 and json.loads((out / "config.json").read_text())["train"]["steps"] == 5


def test_pairs_are_resumable_and_a_larger_n_adds_to_them(tmp_path, capsys):
    out = tmp_path / "pairs"
    code, _, _ = run(capsys, "pairs", "--teacher", "gmm:ring8", "--n", 30, "--steps", 3, "--out", out)
    assert code == 0
    p = load_pairs(out)
    assert p.x0.shape == (30, 2) and p.noise.shape == (30, 2) and p.labels is None
    code, _, err = run(capsys, "pairs", "--teacher", "gmm:ring8", "--n", 30, "--steps", 5, "--out", out)
    assert code == 2 and "other settings" in err
    code, _, err = run(capsys, "pairs", "--teacher", "gmm:ring8", "--n", 20, "--steps", 3, "--out", out)
    assert code == 2 and "fewer than were collected" in err and "pairs.n=30" in err
    assert run(capsys, "pairs", "--teacher", "gmm:ring8", "--n", 45, "--steps", 3, "--out", out)[0] == 0
    assert load_pairs(out).x0.shape == (45, 2)
    # grown shard by shard (the short last shard drawn again), the pairs are those of a fresh collection of 45
    m = load_model("gmm:ring8")
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    for n in (12, 20, 45):
        collect_pairs(m, grown, n, steps=3, shard_size=8, progress=False)
    collect_pairs(m, fresh, 45, steps=3, shard_size=8, progress=False)
    a, b = load_pairs(grown), load_pairs(fresh)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.x0, b.x0)


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (what a refused command must leave as it was)."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


TINY = ["--quiet", "--set", "surrogate_steps=10", "--set", "train.batch_size=8", "--set", "pairs.steps=2",
        "--set", "train.log_every=1"]


@pytest.fixture
def finished_run(tmp_path, capsys):
    """A finished 3-step DMD2 run on the exact ring8 teacher, and what its folder holds."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", "gmm:ring8", "--out", out, "--steps", 3,
                       *TINY)
    assert code == 0, err
    return out, _snapshot(out)


def test_a_finished_run_is_safe_from_what_a_user_types(finished_run, tmp_path, capsys):
    out, before = finished_run
    # another method without --resume: refused before any pair is collected or config.json written
    code, _, err = run(capsys, "distill", "--method", "dmdx", "--teacher", "gmm:ring8", "--out", out, *TINY)
    assert code == 2 and f"{out} already holds a 'dmd2' run (finished: step 3 of 3)" in err and "--resume" in err
    assert _snapshot(out) == before
    code, _, err = run(capsys, "distill", "--method", "dmdx", "--out", out, "--resume")
    assert code == 2 and "is a 'dmd2' run; resume it with --method dmd2" in err
    code, _, err = run(capsys, "teacher", "train", "--data", "ring8", "--out", out)
    assert code == 2 and "already holds a 'dmd2' run" in err
    assert _snapshot(out) == before
    # a typo in --teacher or --data, a bad --set, into a fresh folder: refused, and no folder is left
    fresh = tmp_path / "fresh" / "run"
    for args, says in ((["--teacher", "gmm:ring9"], "ring8"),
                       (["--teacher", tmp_path / "teachr"], "not found: no such folder"),
                       (["--teacher", "gmm:ring8", "--data", "digitz"], "digits"),
                       (["--teacher", "gmm:ring8", "--set", "method.critic_evry=2"], "critic_every")):
        code, _, err = run(capsys, "distill", "--method", "dmd2", *args, "--out", fresh, *TINY)
        assert code == 2 and says in err, err
        assert not (tmp_path / "fresh").exists()
    # a start that fails in the set-up, after the surrogate was fitted (pairs at another guidance): nothing is left
    pairs = tmp_path / "pairs"
    assert run(capsys, "pairs", "--teacher", "gmm:ring8", "--n", 8, "--steps", 2, "--guidance", 3,
               "--out", pairs)[0] == 0
    code, _, err = run(capsys, "distill", "--method", "dmd", "--teacher", "gmm:ring8", "--pairs", pairs,
                       "--out", fresh, "--steps", 2, *TINY)
    assert code == 2 and "guidance 3" in err
    assert not (tmp_path / "fresh").exists()
    # --resume where there is no run
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--out", fresh, "--resume")
    assert code == 2 and f"no run to resume in {fresh} (the folder does not exist)" in err
    assert not (tmp_path / "fresh").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "teacher", "train", "--data", "ring8", "--out", empty, "--resume")
    assert code == 2 and f"no run to resume in {empty} (it holds no config.json)" in err
    assert list(empty.iterdir()) == []


def test_a_run_resumes_from_any_directory_with_absolute_paths(tmp_path, capsys, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "mix.json").write_text(json.dumps({"means": [[-2.0, 0.0], [2.0, 0.0]], "weights": [0.5, 0.5],
                                                         "std": 0.2}))
    monkeypatch.chdir(tmp_path / "a")
    code, _, err = run(capsys, "distill", "--method", "dmdx", "--teacher", "gmm:mix.json", "--data", "gmm:mix.json",
                       "--out", "run", "--steps", 2, *TINY)
    assert code == 0, err
    cfg = json.loads((tmp_path / "a" / "run" / "config.json").read_text())
    assert cfg["teacher"] == f"gmm:{tmp_path / 'a' / 'mix.json'}" and cfg["data"] == cfg["teacher"]
    assert json.loads((tmp_path / "a" / "run" / "pairs" / "pairs.json").read_text())["n"] == 16
    monkeypatch.chdir(tmp_path / "b")
    # --steps 4 needs 32 pairs (train.steps * batch_size): they are added to the 16 collected
    code, _, err = run(capsys, "distill", "--method", "dmdx", "--out", "../a/run", "--resume", "--steps", 4, "--quiet")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert load_pairs(tmp_path / "a" / "run" / "pairs").x0.shape == (32, 2)


def test_a_run_in_use_is_refused_naming_its_process_and_a_killed_one_does_not_block(finished_run, tmp_path,
                                                                                        capsys):
    out, _ = finished_run
    # a --resume started while the run trains: the second process is refused, naming the first
    proc = subprocess.Popen([sys.executable, "-m", "dmdx", "distill", "--method", "dmd2", "--out", str(out),
                             "--resume", "--steps", "100000", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len((out / "log.jsonl").read_text().splitlines()) < 5:  # it trains
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        before = _snapshot(out / "checkpoints")
        code, _, err = run(capsys, "distill", "--method", "dmd2", "--out", out, "--resume", "--steps", 200)
        assert code == 2 and f"{out} is in use by another dmdx process (pid {proc.pid} on " in err, err
        assert "dmdx distill --method dmd2" in err
        assert _snapshot(out / "checkpoints") == before and json.loads((out / "config.json").read_text())[
            "train"]["steps"] == 100000
        proc.kill()  # a killed process's lock goes with it
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--out", out, "--resume", "--steps", 8, "--quiet")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # no step twice
    assert not (out / ".lock").exists()


def test_an_unwritable_out_is_a_message(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through file modes: a place no process may write to
        out = Path("/sys/dmdx-test") / "run"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "run"
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", "gmm:ring8", "--out", out, *TINY)
    assert code == 2 and f"cannot write the run folder {out}" in err and "choose an --out you can write" in err
    assert not out.exists()
    code, _, err = run(capsys, "teacher", "train", "--data", "ring8", "--out", out)
    assert code == 2 and "cannot write the run folder" in err


def test_data_and_demo_errors_leave_no_folder(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16), np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")
    png = (tmp_path / "imgs" / "1.png").read_bytes()
    (tmp_path / "imgs" / "1.png").write_bytes(png[: len(png) // 2])  # cut short, as an interrupted copy leaves it
    out = tmp_path / "t"
    code, _, err = run(capsys, "teacher", "train", "--data", f"folder:{tmp_path / 'imgs'}", "--out", out)
    assert code == 2 and f"cannot read image {tmp_path / 'imgs' / '1.png'}: image file is truncated" in err, err
    assert not out.exists()
    demo = tmp_path / "demo"
    for args, says in ((["--data", "digitz"], "digits"), (["--teacher", tmp_path / "nope"], "not found"),
                       (["--set", "train.lrr=1"], "train.lr")):
        code, _, err = run(capsys, "demo", "--small", "--out", demo, *args)
        assert code == 2 and says in err, err
        assert not demo.exists()
    # a demo folder whose student was distilled with another method
    (demo / "student").mkdir(parents=True)
    (demo / "student" / "config.json").write_text(json.dumps(to_dict(default_run_config("dmd2"))))
    code, _, err = run(capsys, "demo", "--small", "--out", demo)
    assert code == 2 and "holds a 'dmd2' student: run the demo with --method dmd2" in err
    with RunFolder(tmp_path / "demo2"):  # a demo folder in use
        code, _, err = run(capsys, "demo", "--small", "--out", tmp_path / "demo2")
    assert code == 2 and f"{tmp_path / 'demo2'} is in use by another dmdx process (pid {os.getpid()}" in err


def test_a_truncated_image_in_data_is_named_and_the_run_is_untouched(finished_run, tmp_path, capsys):
    """Section 4: a truncated PNG given to a finished run's --resume (--set data=folder:...) names the file; the run
    folder keeps every byte."""
    from PIL import Image

    out, before = finished_run
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")
    png = (tmp_path / "imgs" / "1.png").read_bytes()
    (tmp_path / "imgs" / "1.png").write_bytes(png[: len(png) // 2])
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--out", out, "--resume", "--steps", 6,
                       "--set", f"data=folder:{tmp_path / 'imgs'}")
    assert code == 2 and f"cannot read image {tmp_path / 'imgs' / '1.png'}: image file is truncated" in err, err
    assert "Traceback" not in err and _snapshot(out) == before


def test_pipeline_messages_leave_the_run_untouched(pipeline_students, tmp_path, capsys, monkeypatch):
    """Section 4 on a tiny SD LoRA student and its pipeline folder: a corrupt --lpips file, several missing metric
    files (all named), a pipeline folder with its configs but no weights (each component named), a mistyped local
    --teacher path (not called a hub id), --teacher's help; every refusal leaves the run and the pipeline folder as
    they were, and a refused distill leaves no --out."""
    import shutil

    student = pipeline_students("sd")
    pipe = Path(json.loads((student / "model.json").read_text())["extra"]["pipeline"])
    before, pipe_before = _snapshot(student), _snapshot(pipe)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    bad = tmp_path / "lpips_alex.pth"
    bad.write_bytes(b"PK\x03\x04 not a whole file")
    code, _, err = run(capsys, "eval", "--model", student, "--prompts", prompts, "--lpips", bad)
    assert code == 2 and f"cannot read the LPIPS weights {bad}: not a whole torch.save" in err, err
    code, _, err = run(capsys, "eval", "--model", student, "--prompts", prompts, "--clip", tmp_path / "clip",
                       "--ref", tmp_path / "coco", "--inception", tmp_path / "inception.pt")
    assert code == 2 and "3 inputs are missing" in err, err
    assert all(f"--{k} {tmp_path / v}" in err for k, v in (("clip", "clip"), ("ref", "coco"),
                                                             ("inception", "inception.pt")))
    # a pipeline folder whose weight files were left out (a download filtered to the configs)
    configs_only = tmp_path / "sd-configs"
    shutil.copytree(pipe, configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    fresh = tmp_path / "runs" / "new"
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", configs_only, "--prompts", prompts,
                       "--out", fresh)
    assert code == 2 and f"the pipeline folder {configs_only} is incomplete" in err, err
    assert "unet/ has its config.json but no weights (expected diffusion_pytorch_model.safetensors" in err
    assert "text_encoder/ has its config.json but no weights" in err and "Traceback" not in err
    assert not fresh.exists()
    # a mistyped local path is not a hub id, even one shaped like org/name (here runs/ exists); a bare org/name is
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for typo in ("./sd-confgs", "runs/sd15", str(tmp_path / "sd15")):
        code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", typo, "--prompts", prompts,
                           "--out", fresh)
        assert code == 2 and f"{typo!r} not found: no such folder" in err and "hub id" not in err, err
        assert "a local diffusers pipeline folder (with model_index.json)" in err
        assert not fresh.exists()
    code, _, err = run(capsys, "distill", "--method", "dmd2", "--teacher", "stabilityai/sd15", "--prompts", prompts,
                       "--out", fresh)
    assert code == 2 and "looks like a Hugging Face hub id" in err and not fresh.exists()
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "local diffusers pipeline folder" in " ".join(capsys.readouterr().out.split())
    assert _snapshot(student) == before and _snapshot(pipe) == pipe_before


def test_sample_rejects_bad_output_and_corrupt_models(tmp_path, capsys):
    code, _, err = run(capsys, "sample", "--model", "gmm:ring8", "--out", tmp_path / "x.jpg")
    assert code == 2 and ".png" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    code, _, err = run(capsys, "sample", "--model", bad, "--out", tmp_path / "x.png")
    assert code == 2 and "model.json" in err
    t = tmp_path / "t"
    assert run(capsys, "teacher", "train", "--data", "ring8", "--out", t, "--steps", 2, "--quiet")[0] == 0
    (t / "model.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run(capsys, "sample", "--model", t, "--out", tmp_path / "x.png")
    assert code == 2 and "corrupt" in err

"""The command line as a user runs it, on tiny settings."""

import json

import numpy as np
import pytest

from dmdx.cli import main


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
        main(["distill", "--method", "sid", "--teacher", "gmm:ring8", "--out", str(out)])
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


def test_pairs_are_resumable(tmp_path, capsys):
    out = tmp_path / "pairs"
    code, _, _ = run(capsys, "pairs", "--teacher", "gmm:ring8", "--n", 30, "--steps", 3, "--out", out)
    assert code == 0
    from dmdx.pairs import load_pairs

    p = load_pairs(out)
    assert p.x0.shape == (30, 2) and p.noise.shape == (30, 2) and p.labels is None
    code, _, err = run(capsys, "pairs", "--teacher", "gmm:ring8", "--n", 30, "--steps", 5, "--out", out)
    assert code == 2 and "other settings" in err


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

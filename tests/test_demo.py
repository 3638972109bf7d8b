"""``dmdx demo`` end to end on its small setting (a 60-step teacher, an 8-iteration DMDX student)."""

import json

from dmdx.cli import main


def test_demo_small_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--small", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "student (dmdx) 1 step" in text and "teacher 1 step" in text
    res = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in res["rows"]}
    student = rows["student (dmdx) 1 step"]
    assert student["nfe"] == 1 and rows["teacher 4 steps"]["nfe"] == 2 * (2 * 4 - 1)  # heun with CFG
    for r in res["rows"]:
        assert r["fd"] >= 0 and 0 <= r["class_acc"] <= 1 and r["ms_per_sample"] > 0
        assert r["fd_contrastive"] >= 0 and 0 <= r["recall_contrastive"] <= 1  # the second judge, in every row
    assert "fd_contrastive" in text
    assert (out / "teacher_vs_student.png").stat().st_size > 0
    assert (out / "quality_vs_nfe.png").stat().st_size > 0
    # running it again reuses the finished teacher and student
    assert main(["demo", "--small", "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["distill_seconds"] < 1.0
    # the image recipe's settings are in the run's resolved config
    cfg = json.loads((out / "student" / "config.json").read_text())
    assert cfg["train"]["lr_scale"]["latent_heads"] == 10 and cfg["method"]["adm"]["dt"] == 1
    assert cfg["method"]["adm"]["grad_norm"] == "none" and cfg["method"]["adm"]["lr_scale"] == {"student": 0.5}


def test_demo_set_rejects_unknown_keys(tmp_path, capsys):
    code = main(["demo", "--small", "--out", str(tmp_path / "d"), "--quiet", "--set", "train.nosuchfield=1",
                 "--teacher", "gmm:ring8", "--data", "ring8"])
    assert code != 0
    err = capsys.readouterr().err
    assert "unknown key 'nosuchfield'" in err and "allowed:" in err

"""Training-health signals (dmdx.train.health): critic accuracy and margin, diversity against the teacher's, the
collapse alarm, the fake-score lag, ``dmdx inspect``; and that none of it touches training."""

import json

import pytest
import torch
from torch import nn

from dmdx.cli import main
from dmdx.denoiser import Denoiser
from dmdx.methods.base import critic_logs, fake_score_lag
from dmdx.sampling import time_grid
from dmdx.train.health import Health, diagnose, diversity, inspect_run

from helpers import state_of, tiny_config


def test_critic_logs_on_hand_made_logits():
    d_real = torch.tensor([2.0, 1.0, -1.0, 3.0])
    d_fake = torch.tensor([-1.0, -2.0, 0.5, -3.0])
    logs = critic_logs(d_real, d_fake, "gan")
    assert logs == {"critic/gan/acc": pytest.approx(0.75), "critic/gan/margin": pytest.approx(1.25 + 1.375)}
    # two heads: head 0 separates perfectly, head 1 is at chance and inverted on average
    d_real = torch.tensor([[1.0, -1.0], [2.0, -1.0]])
    d_fake = torch.tensor([[-1.0, 1.0], [-3.0, -1.0]])
    logs = critic_logs(d_real, d_fake, "adm")
    assert logs["critic/adm/h0/acc"] == 1.0 and logs["critic/adm/h1/acc"] == 0.25
    assert logs["critic/adm/h0/margin"] == pytest.approx(3.5) and logs["critic/adm/h1/margin"] == pytest.approx(-1.0)
    assert logs["critic/adm/acc"] == pytest.approx(0.625) and logs["critic/adm/margin"] == pytest.approx(1.25)


def test_fake_score_lag_against_exact_denoisers(tmp_path):
    """A fake score equal to the teacher lags by exactly 1; one that is the exact denoiser of the student's
    distribution (a point mass: x0 is that point whatever x_t) has zero error, lag 0."""
    from dmdx.teachers.analytic import gmm_model

    teacher = gmm_model("ring8").denoiser
    point = Denoiser(ConstantBackbone(2), teacher.schedule, "x0")
    x0 = torch.full((16, 2), 0.7)
    g = torch.Generator().manual_seed(0)
    assert fake_score_lag(teacher, teacher, x0, None, g) == pytest.approx(1.0)
    with torch.no_grad():
        assert fake_score_lag(point, teacher, x0, None, g) == 0.0


def test_diversity_and_class_spread():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [3.0, 4.0]])
    assert diversity(x)["diversity"] == pytest.approx(5 * 4 / 6)  # 4 of the 6 pairs are 5 apart
    # grouped so that each class holds one point twice: the spread within classes is 0 (per-class collapse)
    d = diversity(x, torch.tensor([0, 1, 0, 1]))
    assert d["class_spread"] == 0.0 and d["diversity"] > 3


class ConstantBackbone(nn.Module):
    """A student forced to a point: its x0 prediction is the same vector for every input."""

    feature_layers = ()

    def __init__(self, *shape: int):
        super().__init__()
        self.point = nn.Parameter(torch.full(shape, 0.7))

    def forward(self, x, time, cond):
        return self.point.expand_as(x)


def _ring8_context(student, times):
    from dmdx.data import load_dataset
    from dmdx.methods.base import Context
    from dmdx.teachers.analytic import gmm_model

    teacher = gmm_model("ring8").denoiser
    return Context(teacher=teacher, teacher_net=teacher, student=student or teacher, data=load_dataset("ring8", "train"),
                   num_classes=0, shape=(2,), batch_size=16, device=torch.device("cpu"), times=times)


def test_collapse_raises_the_alarm_once_and_a_healthy_sampler_does_not(tmp_path):
    from dmdx.config import TrainConfig
    from dmdx.methods.base import Method

    # healthy: the exact teacher itself as a 20-step stochastic student
    ctx = _ring8_context(None, time_grid(20)[:-1])
    method = Method(None, ctx)
    health = Health(tmp_path, TrainConfig(batch_size=16), ctx)
    rng = torch.get_rng_state()
    row = health(method, 1)
    assert torch.equal(rng, torch.get_rng_state())  # off the training RNG stream
    assert 0.8 < row["health/diversity_ratio"] < 1.25 and "health/alarm" not in row
    assert health.postfix(row)["div"].endswith("x")
    ref = json.loads((tmp_path / "health_ref.json").read_text())
    assert ref["diversity"] > 1 and ref["n"] == 32  # health_n 64, capped at two batches of 16
    # collapsed: every sample on one point
    ctx.student, ctx.times = Denoiser(ConstantBackbone(2), ctx.schedule, "x0"), [1.0]
    method.fake_score = ctx.teacher  # the generic diagnostics hook: a method with a fake score reports its lag
    row = health(method, 2)
    assert row["health/diversity"] < 1e-6 and row["health/diversity_ratio"] < 1e-6
    assert row["health/alarm"].startswith("collapse: diversity 0x the teacher's")
    assert row["health/fake_lag"] == pytest.approx(1.0)
    assert "health/alarm" not in health(method, 3)  # once per occurrence
    ctx.student, ctx.times = ctx.teacher, time_grid(20)[:-1]
    assert health(method, 4)["health/alarm"].startswith("recovered")


def test_image_quality_is_read_against_the_teachers_own_figure(tmp_path, monkeypatch):
    """On labelled built-in images the small-sample FD and class accuracy are read against the teacher's figure on
    the same noise and labels (written once into health_ref.json): the teacher as its own stochastic student is not
    flagged; a student forced to one grey image is far from the teacher and has lost its classes."""
    from pathlib import Path

    from dmdx.config import TrainConfig
    from dmdx.data import load_dataset
    from dmdx.eval import get_classifier
    from dmdx.methods.base import Context, Method
    from dmdx.teachers import load_model

    monkeypatch.setenv("DMDX_HOME", str(tmp_path / "home"))
    get_classifier("digits", epochs=10, max_train=300, batch_size=32, progress=False)  # small (test acc ~0.8), cached
    model = load_model(Path(__file__).resolve().parents[1] / "src" / "dmdx" / "assets" / "teacher_digits")
    teacher = model.denoiser
    ctx = Context(teacher=teacher, teacher_net=teacher, student=teacher, data=load_dataset("digits", "train"),
                  num_classes=10, shape=(1, 8, 8), batch_size=16, device=torch.device("cpu"),
                  times=time_grid(10)[:-1], guidance=model.info.guidance)
    tc = TrainConfig(batch_size=16, health_n=16, health_every=1, health_quality_n=40, progress=False)
    health, method = Health(tmp_path / "run", tc, ctx), Method(None, ctx)
    rows = [{"step": 1, **health(method, 1)}]
    ref = json.loads((tmp_path / "run" / "health_ref.json").read_text())
    tq = ref["teacher_quality"]
    assert set(tq) == {"fd", "class_acc"} and "quality" not in ref
    problems, _ = diagnose(rows, ref, 2, 0.3)
    assert not [p for p in problems if "teacher" in p or "class" in p], problems
    ctx.student, ctx.times = Denoiser(ConstantBackbone(1, 8, 8), ctx.schedule, "x0"), [1.0]
    rows.append({"step": 2, **health(method, 2)})
    assert json.loads((tmp_path / "run" / "health_ref.json").read_text())["teacher_quality"] == tq  # computed once
    problems, _ = diagnose(rows, ref, 2, 0.3)
    assert any(p.startswith("far from the teacher") for p in problems), (rows[-1], tq)
    assert any(p.startswith("samples lost their class") for p in problems), (rows[-1], tq)


def test_health_signals_leave_training_bit_identical(tmp_path):
    """A run with every health signal (quality figure included) trains exactly as one with none."""
    from dmdx.train.loop import Trainer
    from dmdx.teachers import build_run

    on = tiny_config("dmd2", steps=4, health_every=2, health_quality_n=64)
    off = tiny_config("dmd2", steps=4, health_n=0)
    ctx, info = build_run(on, tmp_path / "on")  # one set-up for both runs (the student is reset in between)
    start = state_of(ctx.student)
    a = Trainer(tmp_path / "on", on.method, on.train, ctx, info)
    a.run()
    trained = state_of(ctx.student)
    ctx.student.load_state_dict(start)
    Trainer(tmp_path / "off", off.method, off.train, ctx, info).run()
    for k, v in trained.items():
        assert torch.equal(v, ctx.student.state_dict()[k]), k
    rows = [json.loads(line) for line in (tmp_path / "on" / "log.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    assert {"health/diversity", "health/diversity_ratio", "health/fake_lag", "dm/grad_norm", "critic/gan/acc",
            "critic/gan/margin"} <= keys
    assert [("health/modes_covered" in r) for r in rows] == [False, True, False, True]
    assert rows[1]["health/max_weight_error"] >= 0 and 0 <= rows[1]["health/in_mode"] <= 1
    assert not any(k.startswith("health/") for r in
                   (json.loads(line) for line in (tmp_path / "off" / "log.jsonl").read_text().splitlines()) for k in r)
    ref = json.loads((tmp_path / "on" / "health_ref.json").read_text())
    assert ref["quality"]["modes_covered"] == 8  # the exact teacher covers ring8
    # inspect on this tiny run: a verdict and the PNG
    code = main(["inspect", str(tmp_path / "on")])
    assert code == 0 and (tmp_path / "on" / "health.png").stat().st_size > 1000


def test_inspect_reports_collapse_and_a_blind_critic(tmp_path, capsys):
    rows = [{"step": 10 * (i + 1), "stage": "adm", "loss/gan_d": 2.0, "critic/adm/acc": 0.5, "critic/adm/margin": 0.0,
             "health/diversity_ratio": max(1.0 - 0.2 * i, 0.05), "health/fake_lag": 0.9} for i in range(10)]
    rows[5]["health/alarm"] = "collapse: diversity 0.05x the teacher's"
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.json").write_text(json.dumps({"method": {"name": "adm"}, "train": {"steps": 100}}))
    text, healthy, png = inspect_run(tmp_path)
    assert not healthy and png.is_file()
    assert "UNHEALTHY" in text and "collapse: diversity 0.05x" in text and "'adm' never beat chance" in text
    assert "health/diversity_ratio" in text and "down" in text  # the table's trend column
    problems, _ = diagnose(rows[:2], None, 100, 0.3)
    assert not any("collapse" in p for p in problems)  # 1.0 -> 0.8: no collapse yet


def test_inspect_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a dmdx run folder" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2


def _write_run(folder, rows, ref=None, steps=100):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.json").write_text(json.dumps({"method": {"name": "dmdx"}, "train": {"steps": steps}}))
    if ref is not None:
        (folder / "health_ref.json").write_text(json.dumps(ref))
    return folder


def test_inspect_tells_a_blind_critic_from_one_at_equilibrium(tmp_path):
    """Three ADM critics at chance on constructed runs: one whose real and fake inputs are nearly the same while
    the student is off the data (blind: the quality problem is the verdict, the critic its explanation), one with
    the same tiny gap while the student matches (equilibrium: healthy), and one that has a signal it does not learn
    (too weak: a problem).  A critic that learns its signal is a note."""
    ref = {"steps": 10, "n": 64, "diversity": 2.0,
           "quality": {"modes_covered": 8, "max_weight_error": 0.02, "in_mode": 0.99, "sw": 0.1}}

    def rows(gap, in_mode, acc=0.5, modes=8):
        out = [{"step": 10 * (i + 1), "stage": "adm", "loss/gan_d": 2.0, "critic/adm/acc": acc,
                "critic/adm/margin": 0.0, "critic/adm/gap": gap, "health/diversity_ratio": 1.0} for i in range(10)]
        out[-1].update({"health/modes_covered": modes, "health/max_weight_error": 0.03, "health/in_mode": in_mode,
                        "health/sw": 0.2})
        return out

    text, healthy, _ = inspect_run(_write_run(tmp_path / "blind", rows(0.004, 0.46), ref))
    assert not healthy and "problem: samples off the data: 46%" in text
    assert "note: critic 'adm' is blind: there is no signal to learn" in text and "0.004 of the samples' spread" in text
    assert "problem: critic" not in text  # the critic explains the quality problem; it is not a second one
    text, healthy, _ = inspect_run(_write_run(tmp_path / "equilibrium", rows(0.004, 0.97), ref))
    assert healthy and "critic 'adm' at equilibrium" in text and "never beat chance" not in text
    text, healthy, _ = inspect_run(_write_run(tmp_path / "weak", rows(0.3, 0.6, modes=7), ref))
    assert not healthy and "critic 'adm' is too weak" in text and "mode coverage: 7 modes" in text
    text, healthy, _ = inspect_run(_write_run(tmp_path / "learns", rows(0.3, 0.97, acc=0.8), ref))
    assert healthy and "critic 'adm': accuracy 0.80 -> 0.80" in text and "differ by 0.3" in text
    # no quality figure to judge by: a blind critic is the problem itself
    unjudged = [{k: v for k, v in r.items() if not k.startswith("health/") or k == "health/diversity_ratio"}
                for r in rows(0.004, 0.5)]
    problems, _ = diagnose(unjudged, ref, 100, 0.3)
    assert len(problems) == 1 and problems[0].startswith("critic 'adm' is blind")


def test_adm_logs_the_gap_its_critic_has_to_see(tmp_path):
    """critic/adm/gap = rms(x_real - x_fake) / spread(x_fake) from the critic's own update: it grows with ADM's step
    (dt) on the same student and fake score, and the quality figure comes at the last step as well."""
    from dmdx.train.loop import Trainer
    from dmdx.teachers import build_run

    gaps = {}
    for dt in (1 / 64, 1.0):
        cfg = tiny_config("adm", steps=3, health_every=100, health_quality_n=64)
        cfg.method.dt = dt
        ctx, info = build_run(cfg, tmp_path / f"adm{dt}")
        Trainer(tmp_path / f"adm{dt}", cfg.method, cfg.train, ctx, info).run()
        rows = [json.loads(line) for line in (tmp_path / f"adm{dt}" / "log.jsonl").read_text().splitlines()]
        gaps[dt] = rows[-1]["critic/adm/gap"]
        assert "health/modes_covered" in rows[-1]  # step 3 = train.steps, although health_every is 100
    assert 0 < gaps[1 / 64] < gaps[1.0], gaps

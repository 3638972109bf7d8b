import json

import pytest
import torch

from dmdx.train.checkpoint import latest_checkpoint
from dmdx.train.loop import NonFiniteLossError

from helpers import make_trainer, state_of, tiny_config


def _final_student(cfg, run_dir, split=None):
    if split is None:
        tr = make_trainer(cfg, run_dir)
        tr.run()
        return state_of(tr.student), state_of(tr.ema)
    tr = make_trainer(cfg, run_dir)
    tr.run(stop_after=split)
    del tr
    tr = make_trainer(cfg, run_dir)  # a fresh process would rebuild everything from the config
    tr.run(resume=True)
    return state_of(tr.student), state_of(tr.ema)


@pytest.mark.parametrize("method,split,every", [("dmd2", 4, 2), ("dmdx", 2, 2), ("dmdx", 3, 3), ("dmdx", 4, 2)])
def test_resume_equals_uninterrupted(method, split, every, tmp_path):
    """dmd2: stop after 4 of 6; dmdx (3 ADP + 3 ADM): stop inside ADP and resume across the stage boundary, stop at
    the boundary itself (the last ADP checkpoint), and stop inside ADM."""
    cfg = tiny_config(method, steps=6, ckpt_every=every)
    a, a_ema = _final_student(cfg, tmp_path / "a")
    b, b_ema = _final_student(cfg, tmp_path / "b", split=split)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a_ema[k], b_ema[k]), k


def test_dmdx_adm_stage_starts_from_adps_ema(tmp_path):
    """At the ADP -> ADM boundary the student is set to ADP's EMA (what ADP would export) before ADM builds on it."""
    cfg = tiny_config("dmdx", steps=4, ckpt_every=2)
    tr = make_trainer(cfg, tmp_path)
    tr.run(stop_after=2)  # ADP's two iterations, and a checkpoint
    ema, raw = state_of(tr.ema), state_of(tr.student)
    assert any(not torch.equal(v, ema[k]) for k, v in raw.items())  # the raw student is not its EMA
    seen = {}
    build = tr.build_stage

    def spy(index):
        seen[index] = state_of(tr.student)
        return build(index)

    tr.build_stage = spy
    tr.run(resume=True, stop_after=1)  # restores ADP's stage from the checkpoint, then switches
    assert set(seen) == {0, 1} and all(torch.equal(v, raw[k]) for k, v in seen[0].items())
    assert all(torch.equal(v, ema[k]) for k, v in seen[1].items())


def test_checkpoint_contents_and_partial_write_is_ignored(tmp_path):
    cfg = tiny_config("dmd2", steps=4, ckpt_every=2, keep_ckpts=2)
    tr = make_trainer(cfg, tmp_path)
    tr.run()
    ck = latest_checkpoint(tmp_path)
    assert ck["step"] == 4 and set(ck["nets"]) == {"student", "ema", "fake_score", "gan_head"}
    # a run killed while writing leaves a .tmp folder and maybe a broken newer checkpoint: both are skipped
    (tmp_path / "checkpoints" / "step_0000006.tmp").mkdir()
    broken = tmp_path / "checkpoints" / "step_0000008"
    broken.mkdir()
    (broken / "state.json").write_text("{")
    with pytest.warns(UserWarning, match="corrupt"):
        ck = latest_checkpoint(tmp_path)
    assert ck["step"] == 4
    assert (tmp_path / "model.json").is_file()
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["kind"] == "student" and info["times"] == [1.0]


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path):
    cfg = tiny_config("dmd2", steps=6, ckpt_every=2)
    tr = make_trainer(cfg, tmp_path)
    tr.run(stop_after=2)
    tr = make_trainer(cfg, tmp_path)
    stage_loss = {}

    orig = tr.build_stage

    def poisoned(i):
        st = orig(i)
        m = st.method
        stage_loss["f"] = m.critic_loss
        m.critic_loss = lambda: (torch.tensor(float("nan")), {})
        return st

    tr.build_stage = poisoned
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*step_0000002"):
        tr.run(resume=True)
    assert latest_checkpoint(tmp_path)["step"] == 2


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    cfg = tiny_config("dmd2", steps=2, ckpt_every=2)
    make_trainer(cfg, tmp_path).run()
    with pytest.raises(ValueError, match="--resume"):
        make_trainer(cfg, tmp_path).run()


def test_logs_are_namespaced(tmp_path):
    cfg = tiny_config("dmd2", steps=4)
    make_trainer(cfg, tmp_path).run()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    assert {"loss/dm", "loss/fake_dsm", "loss/gan_g", "loss/gan_d", "grad/student", "grad/fake_score"} <= keys


def test_ema_warmup_decay():
    from dmdx.train.loop import ema_decay

    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 90) == pytest.approx(0.91)
    assert ema_decay(0.999, 100_000) == 0.999
    assert ema_decay(0.999, 0, warmup=False) == 0.999
    assert ema_decay(0.0, 5) == 0.0


def test_snapshots_are_loadable_ema_students(tmp_path):
    from dmdx.teachers import load_model

    cfg = tiny_config("dmd2", steps=4, snapshot_every=2)
    tr = make_trainer(cfg, tmp_path)
    tr.run()
    snaps = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert snaps == ["step_0000002", "step_0000004"]
    last = load_model(str(tmp_path / "snapshots" / "step_0000004"))
    for k, v in last.denoiser.state_dict().items():
        assert torch.equal(v, tr.ema.state_dict()[k]), k


def test_critic_warmup_delays_the_student_only(tmp_path):
    """ADM's critic_warmup: the critic (fake score + heads) trains from the first iteration, the student from the
    k-th on; the student's weights stay put until then."""
    cfg = tiny_config("adm", steps=5, ckpt_every=1)
    cfg.method.critic_every = 1
    cfg.method.critic_warmup = 3
    tr = make_trainer(cfg, tmp_path)
    student0 = state_of(tr.student)
    tr.run(stop_after=3)
    assert all(torch.equal(v, tr.student.state_dict()[k]) for k, v in student0.items())
    tr.run(resume=True)
    assert not all(torch.equal(v, tr.student.state_dict()[k]) for k, v in student0.items())
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [("loss/gan_g" in r, "loss/gan_d" in r) for r in rows] == [(False, True)] * 3 + [(True, True)] * 2


@pytest.mark.parametrize("method", ["dmd2", "dmd", "adm", "adp", "dmdx"])
def test_declared_network_names_cover_the_trained_networks(method, tmp_path):
    from dmdx.methods import get_method
    from dmdx.train.loop import trained_network_names

    cfg = tiny_config(method, steps=1)
    tr = make_trainer(cfg, tmp_path)
    declared = trained_network_names(cfg.method, cfg.train.steps)
    for i in range(len(tr.stages)):
        assert set(tr.build_stage(i).trainables) <= declared
    assert get_method(method).network_names or len(tr.stages) > 1


def test_unknown_lr_scale_name_is_an_error(tmp_path):
    cfg = tiny_config("adm", steps=1, lr_scale={"disc_head": 10})
    with pytest.raises(ValueError, match=r"unknown networks \['disc_head'\].*'disc_heads', 'fake_score', 'student'"):
        make_trainer(cfg, tmp_path)


def test_a_stage_lr_scale_sets_that_stages_rates_only(tmp_path):
    """DMDX: ``method.adm.lr_scale`` gives ADM's stage its own student rate; ADP's stage keeps train.lr_scale's."""
    cfg = tiny_config("dmdx", steps=4, lr_scale={"student": 0.5, "disc_heads": 10})
    cfg.method.adm.lr_scale = {"student": 0.1}
    tr = make_trainer(cfg, tmp_path)
    adp, adm = tr.build_stage(0), tr.build_stage(1)
    assert adp.optims["student"].param_groups[0]["lr"] == pytest.approx(0.5e-3)
    assert adm.optims["student"].param_groups[0]["lr"] == pytest.approx(0.1e-3)
    assert adm.optims["disc_heads"].param_groups[0]["lr"] == pytest.approx(1e-2)  # train.lr_scale still applies
    tr.run()  # both stages train with their rates (the per-update rate is set from the stage's own)


def test_unknown_name_in_a_stage_lr_scale_is_an_error(tmp_path):
    cfg = tiny_config("dmdx", steps=2)
    cfg.method.adm.lr_scale = {"latent_heads": 2}  # an ADP network: ADM's stage does not train it
    with pytest.raises(ValueError, match=r"adm's lr_scale names unknown networks \['latent_heads'\]"):
        make_trainer(cfg, tmp_path)

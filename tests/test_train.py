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


# -- life on a cluster: preemption signals and checkpoints that survive any kill (docs/scaling.md) -------------
def test_a_preemption_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path):
    """SIGUSR1 (a real signal, sent to this process during step 3 of 6) ends the run after that step with a
    checkpoint there marked preempted; the signal's previous handler is back; resuming gives the uninterrupted
    run's weights bit for bit."""
    import dataclasses
    import os
    import signal

    from dmdx.train.loop import Preempted, Trainer

    cfg = tiny_config("dmd2", steps=6, ckpt_every=4)
    a, a_ema = _final_student(cfg, tmp_path / "a")
    tr = make_trainer(cfg, tmp_path / "b")
    run_phase = tr.run_phase

    def signalled(stage, phase, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return run_phase(stage, phase, step)

    tr.run_phase = signalled
    bad = dataclasses.replace(cfg.train, preempt_signals=["SIGSTOP"])
    with pytest.raises(ValueError, match="SIGSTOP"):  # checked when the trainer is made, not at the first signal
        Trainer(tmp_path / "c", cfg.method, bad, tr.ctx, tr.export_info)
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted, match=r"preempted by SIGUSR1 at step 3 of 6: checkpoint .*step_0000003 written"):
        tr.run()
    assert signal.getsignal(signal.SIGUSR1) is before
    ck = latest_checkpoint(tmp_path / "b")
    assert ck["step"] == 3 and json.loads((ck["path"] / "state.json").read_text())["preempted"] == "SIGUSR1"
    assert not (tmp_path / "b" / "model.json").exists()  # a preemption checkpoint does not export, to stop sooner
    tr = make_trainer(cfg, tmp_path / "b")
    tr.run(resume=True)
    for k in a:
        assert torch.equal(a[k], tr.student.state_dict()[k]), k
        assert torch.equal(a_ema[k], tr.ema.state_dict()[k]), k


def test_preempt_signals_are_checked():
    from dmdx.train.loop import parse_signals

    assert [s.name for s in parse_signals(["term", "SIGUSR2", "USR1"])] == ["SIGTERM", "SIGUSR2", "SIGUSR1"]
    for bad in ("SIGKILL", "SIGFOO"):
        with pytest.raises(ValueError, match=rf"train.preempt_signals: '{bad}' is not a signal a process can catch; "
                                             r"allowed: .*SIGUSR1"):
            parse_signals(["SIGTERM", bad])


def test_a_checkpoint_is_fsynced_before_its_rename_and_replaces_an_old_one_only_when_complete(tmp_path, monkeypatch):
    """Every file and the folder are fsynced before the rename, the parent after; a checkpoint of the same step is
    moved aside (not deleted) before the rename and read if a kill comes between the two renames."""
    from pathlib import Path

    from dmdx.train import checkpoint as ckpt

    events = []
    real_fsync, real_rename = ckpt._fsync, Path.rename
    monkeypatch.setattr(ckpt, "_fsync", lambda p: (events.append(("fsync", Path(p).name)), real_fsync(p)))
    monkeypatch.setattr(Path, "rename", lambda self, t: (events.append(("rename", self.name, Path(t).name)),
                                                          real_rename(self, t))[1])
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    ckpt.save_checkpoint(tmp_path, 5, 0, {"student": net}, {"student": opt}, {"rng": torch.get_rng_state()})
    files = sorted(e[1] for e in events[:3])
    assert files == ["nets.safetensors", "optim.pt", "state.json"]
    assert events[3:] == [("fsync", "step_0000005.tmp"), ("rename", "step_0000005.tmp", "step_0000005"),
                          ("fsync", "checkpoints")]
    events.clear()
    with torch.no_grad():
        net.weight.fill_(1.0)
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)  # a kill right after the two renames
    ckpt.save_checkpoint(tmp_path, 5, 0, {"student": net}, {"student": opt}, {"rng": torch.get_rng_state()})
    assert [e for e in events if e[0] == "rename"] == [("rename", "step_0000005", "step_0000005.old"),
                                                       ("rename", "step_0000005.tmp", "step_0000005")]
    root = tmp_path / "checkpoints"
    assert torch.equal(latest_checkpoint(tmp_path)["nets"]["student"]["weight"], torch.ones(2, 3))
    # a kill between the renames: the old folder is moved aside, the new one not in place yet
    (root / "step_0000005").rename(root / "step_0000005.tmp")
    ck = latest_checkpoint(tmp_path)
    assert ck["path"].name == "step_0000005.old" and not torch.equal(ck["nets"]["student"]["weight"], torch.ones(2, 3))


def _save_forever(kind: str, run: str) -> None:
    """Write checkpoints as fast as possible (each step twice: the second replaces the first), each version's
    tensors filled with its number; 'ready' once the first is complete.  Runs until killed."""
    from pathlib import Path

    from dmdx.train.checkpoint import save_checkpoint, save_dcp_checkpoint
    from dmdx.train.dist import World

    nets = {name: torch.nn.Linear(64, 64) for name in ("student", "fake_score", "ema")}
    optims = {name: torch.optim.SGD(net.parameters(), lr=0.1) for name, net in nets.items()}
    world = World()
    for version in range(10**6):
        step = version // 2 + 1
        with torch.no_grad():
            for net in nets.values():
                for p in net.parameters():
                    p.fill_(float(version))
        if kind == "single":
            save_checkpoint(Path(run), step, 0, nets, optims, {"version": version}, info={"version": version})
        else:
            state = {"nets": {name: net.state_dict() for name, net in nets.items()}}
            save_dcp_checkpoint(Path(run), step, state, {"version": version}, world)
        if version == 0:
            (Path(run) / "ready").touch()


@pytest.mark.parametrize("kind", ["single", "dcp"])
def test_a_kill_at_any_moment_of_a_save_leaves_a_latest_checkpoint_that_loads(kind, tmp_path, monkeypatch):
    """20 processes saving checkpoints in a loop, each SIGKILLed at a random moment (0-60 ms after its first
    checkpoint): the latest checkpoint always loads whole, and its tensors are all from one save."""
    import multiprocessing as mp
    import os
    import random
    import signal
    import time
    import warnings
    from pathlib import Path

    from dmdx.train.checkpoint import load_dcp_state

    # forks of one clean server process that has imported what a saver needs: a child starts in milliseconds, and
    # without the threads of this process (the server finds this module through PYTHONPATH)
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed.checkpoint", "test_train"])
    rng = random.Random(0)
    mid_save = 0
    for trial in range(20):
        run = tmp_path / f"t{trial}"
        p = ctx.Process(target=_save_forever, args=(kind, str(run)), daemon=True)
        p.start()
        deadline = time.monotonic() + 60
        while not (run / "ready").exists():
            assert p.is_alive() and time.monotonic() < deadline, f"trial {trial}: the saver did not start"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.06))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        mid_save += any(d.name.endswith((".tmp", ".old")) for d in (run / "checkpoints").iterdir())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a latest checkpoint that does not load would warn and fall back
            ck = latest_checkpoint(run)
        assert ck is not None, trial
        if kind == "single":
            version = ck["extra"]["version"]
            tensors = [v for net in ck["nets"].values() for v in net.values()]
        else:
            version = ck["version"]
            state = {"nets": {n: torch.nn.Linear(64, 64).state_dict() for n in ("student", "fake_score", "ema")}}
            load_dcp_state(ck["path"], state)
            tensors = [v for net in state["nets"].values() for v in net.values()]
        assert ck["step"] == version // 2 + 1, (trial, ck["step"], version)
        assert len(tensors) == 6 and all(torch.equal(t, torch.full_like(t, float(version))) for t in tensors), trial
    assert mid_save >= 5, mid_save  # most kills landed inside a save (a .tmp or .old folder was left)

"""Distributed training on CPU with gloo, two processes (tests/dist_worker.py is one rank)."""

import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmdx.train.checkpoint import latest_checkpoint

from helpers import make_trainer, state_of, tiny_config

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker.py"


def _env(**extra) -> dict:
    src = str(HERE.parent / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, str(HERE)]), **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        if k not in extra:
            env.pop(k, None)
    return env


def _torchrun(*args, restarts: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", str(WORKER), *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _log_steps(run_dir: Path) -> list[int]:
    return [json.loads(r)["step"] for r in (run_dir / "log.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(*args, timeout: float = 400):
    """Two ranks of ``dist_worker.py ARGS`` started directly, with the environment torchrun would give them."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outs


def _seeded(run_dir: Path, surrogate: Path) -> Path:
    """A run folder holding the already fitted surrogate MLP (a per-run cache: saves fitting it again)."""
    shutil.copytree(surrogate, run_dir / "surrogate")
    return run_dir


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory) -> Path:
    fit = tmp_path_factory.mktemp("fit")
    make_trainer(tiny_config("dmd2"), fit)
    return fit / "surrogate"


@pytest.fixture(scope="module")
def job(tmp_path_factory, surrogate):
    """One two-rank job (two processes started directly, as torchrun would) for the gradient, ddp/fsdp,
    preemption, resume and NaN tests; a single-process run to step 3 first.  The preemption signal comes during a
    random step of 1-5 (printed by failing assertions)."""
    root = tmp_path_factory.mktemp("dist")
    shutil.copytree(surrogate, root / "surrogate")
    single = _seeded(root / "single", surrogate)
    cfg = tiny_config("dmd2", steps=6, ckpt_every=3)
    tr = make_trainer(cfg, single)
    tr.run(stop_after=3)
    at3 = {"student": state_of(tr.student), "ema": state_of(tr.ema)}
    out = root / "out"
    out.mkdir()
    preempt_at = random.randint(1, 5)
    procs, outs = _two_ranks("main", out, single, preempt_at)
    for p, (o, e) in zip(procs, outs):  # the job ends with the NaN test: the CLI's status 3
        assert (out / "resumed_1to2_final.pt").is_file() and p.returncode == 3, o[-2000:] + e[-6000:]
    return {"root": root, "out": out, "single": single, "single_at3": at3, "stderr": [e for _, e in outs],
            "surrogate": surrogate, "preempt_at": preempt_at}


def _reference_grads(tmp_path, surrogate) -> dict:
    """Single process, per-rank batch of 8: the gradient of each phase for seeds 100 and 101, averaged; for mean
    losses this is the gradient on the concatenated batch of 16."""
    from dist_worker import capture_grads

    cfg = tiny_config("dmd2", steps=4, grad_clip=0.0, batch_size=8)
    tr = make_trainer(cfg, _seeded(tmp_path, surrogate))
    torch.manual_seed(cfg.train.seed)
    stage = tr.build_stage(0)
    out = {}
    for phase in stage.method.phases():
        g = [capture_grads(tr, stage, phase, seed) for seed in (100, 101)]
        out[phase.name] = {k: (g[0][k] + g[1][k]) / 2 for k in g[0]}
    return out


def test_ddp_gradients_equal_the_single_process_gradient_on_the_concatenated_batch(job, tmp_path):
    g0 = torch.load(job["out"] / "grads_0.pt", weights_only=True)
    g1 = torch.load(job["out"] / "grads_1.pt", weights_only=True)
    ref = _reference_grads(tmp_path, job["surrogate"])
    assert set(g0) == {"student", "critic"}
    assert {k.split(".")[0] for k in g0["critic"]} == {"fake_score", "gan_head"}
    for phase in g0:
        assert set(g0[phase]) == set(ref[phase]) and ref[phase]
        for k, v in ref[phase].items():
            assert torch.equal(g0[phase][k], g1[phase][k]), (phase, k)  # every rank holds the same average
            assert torch.allclose(g0[phase][k], v, rtol=1e-4, atol=1e-6), (phase, k)
        nonzero = sum(float(v.abs().sum()) for v in ref[phase].values())
        assert nonzero > 0


def test_gradients_only_some_ranks_have_are_averaged_with_zeros_from_the_others(job):
    """A head that only rank 1's batch goes through (a branch taken by data): rank 0 has no gradient for it, the
    ranks agree which parameters got one anywhere, and every rank ends with the single-process gradient on the
    concatenated batch; a parameter no rank used keeps no gradient."""
    from dist_worker import branch_batch, branch_loss, branch_net

    got = [torch.load(job["out"] / f"uneven_{r}.pt", weights_only=True) for r in range(2)]
    assert got[0]["had"] == ["body.bias", "body.weight"]
    assert got[1]["had"] == ["body.bias", "body.weight", "head.bias", "head.weight"]
    net = branch_net()
    (x0, y0), (x1, y1) = branch_batch(0), branch_batch(1)
    branch_loss(net, torch.cat([x0, x1]), torch.cat([y0, y1])).backward()
    ref = {k: p.grad for k, p in net.named_parameters() if p.grad is not None}
    assert sorted(ref) == got[1]["had"]
    for g in got:
        assert sorted(g["grads"]) == sorted(ref)  # "unused" has no gradient on any rank, so none after averaging
        for k, v in ref.items():
            assert torch.allclose(g["grads"][k], v, rtol=1e-5, atol=1e-7), k
    assert float(ref["head.weight"].abs().sum()) > 0


def test_a_preempted_ddp_run_resumes_to_the_uninterrupted_weights(job):
    """SIGTERM reaches rank 1 only, during a random step K: both ranks finish step K, agree to stop, write a
    checkpoint at K (marked preempted) and raise Preempted with the same message; a fresh trainer resumed from it
    ends bit for bit where the uninterrupted ddp run of the same seed ended."""
    k = job["preempt_at"]
    runs = [torch.load(job["out"] / f"preempted_{r}.pt", weights_only=True) for r in range(2)]
    assert [r["stopped"]["step"] for r in runs] == [k, k], k
    msgs = [re.sub(r" [0-9.]+ s after the signal", "", r["stopped"]["message"]) for r in runs]
    assert msgs[0] == msgs[1]  # the time since the signal is known on the rank that received it
    msg = runs[1]["stopped"]["message"]
    assert f"preempted by SIGTERM (received by rank(s) [1] of 2) at step {k} of 6" in msg, msg
    assert re.search(r"written [0-9.]+ s after the signal", msg), msg
    assert runs[0]["stopped"]["path"] in msg
    state = json.loads(runs[0]["stopped"]["state"])
    assert state["step"] == k and state["preempted"] == "SIGTERM" and state["format"] == "dcp"
    assert _log_steps(job["out"] / "preempted") == list(range(1, 7))
    final = torch.load(job["out"] / "ddp_final.pt", weights_only=True)
    for r in runs:
        for net in ("student", "ema"):
            for key, v in final[net].items():
                assert torch.equal(r["final"][net][key], v), (k, net, key)


def test_fsdp_and_ddp_reach_the_same_weights(job, tmp_path):
    a = torch.load(job["out"] / "ddp_final.pt", weights_only=True)
    b = torch.load(job["out"] / "fsdp_final.pt", weights_only=True)
    init = make_trainer(tiny_config("dmd2"), _seeded(tmp_path, job["surrogate"])).student.state_dict()
    moved = 0.0
    for net in ("student", "ema"):
        for k, v in a[net].items():
            assert torch.allclose(v, b[net][k], rtol=1e-4, atol=1e-5), (net, k)
            moved += float((v - init[k]).abs().sum())
    assert moved > 0  # the runs trained


def test_the_exported_model_is_the_full_ema_from_rank_0(job):
    from dmdx.teachers import load_model

    final = torch.load(job["out"] / "fsdp_final.pt", weights_only=True)
    model = load_model(str(job["out"] / "fsdp"))
    for k, v in model.denoiser.state_dict().items():
        assert torch.equal(v, final["ema"][k]), k
    ck = latest_checkpoint(job["out"] / "fsdp")
    assert ck["format"] == "dcp" and ck["step"] == 6 and ck["world"] == 2
    assert sorted(p.name for p in ck["path"].iterdir() if p.name.startswith("rng_")) == ["rng_0.pt", "rng_1.pt"]


def test_two_ranks_to_one_restores_exactly_and_continues(job, tmp_path):
    src = job["out"] / "ddp"
    final = torch.load(job["out"] / "ddp_final.pt", weights_only=True)
    cfg = tiny_config("dmd2", steps=6, ckpt_every=3)
    # the step-6 DCP checkpoint of two ranks, loaded by one process, is the two-rank run's final state
    whole = tmp_path / "whole"
    shutil.copytree(src, whole)
    tr = make_trainer(cfg, whole)
    assert tr.world.size == 1 and not tr.world.distributed
    tr.run(resume=True)  # at step 6 already: restores, trains nothing
    for net in ("student", "ema"):
        for k, v in state_of(getattr(tr, net)).items():
            assert torch.equal(v, final[net][k]), (net, k)
    # from step 3 on one process: the log continues at step 4 and the losses stay where the two-rank run had them
    part = tmp_path / "part"
    shutil.copytree(src, part)
    shutil.rmtree(part / "checkpoints" / "step_0000006")
    make_trainer(cfg, part).run(resume=True)
    assert _log_steps(part) == [1, 2, 3, 4, 5, 6]
    assert latest_checkpoint(part)["format"] == "single"  # one process writes the single-process format
    rows = [json.loads(r) for r in (part / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(r) for r in (src / "log.jsonl").read_text().splitlines()]
    for key in ("loss/fake_dsm", "loss/gan_d"):
        before = ref[2][key]
        after = [r[key] for r in rows[3:] if key in r]
        assert after and all(abs(v - before) < 0.5 * abs(before) for v in after), (key, before, after)


def test_one_rank_to_two_restores_exactly_and_continues(job):
    start = torch.load(job["out"] / "resumed_1to2_start.pt", weights_only=True)
    for net in ("student", "ema"):
        for k, v in job["single_at3"][net].items():
            assert torch.equal(start[net][k], v), (net, k)  # old-format checkpoint sharded over two ranks
    single = job["single"]
    assert _log_steps(single) == [1, 2, 3, 4, 5, 6]
    ck = latest_checkpoint(single)
    assert ck["format"] == "dcp" and ck["step"] == 6 and ck["parallel"] == "fsdp"
    end = torch.load(job["out"] / "resumed_1to2_final.pt", weights_only=True)
    assert not torch.equal(end["student"]["backbone.inp.weight"], start["student"]["backbone.inp.weight"])


def test_nan_on_one_rank_stops_every_rank_with_the_same_message(job):
    """Rank 1's critic loss turns NaN at its third call (step 3): both ranks print the same message, exit with
    status 3 (the job's return codes, checked by the fixture), within seconds of the NaN."""
    msgs = []
    for err in job["stderr"]:
        line = [ln for ln in err.splitlines() if "non-finite loss" in ln]
        assert line, err[-3000:]
        msgs.append(line[-1])
    assert msgs[0] == msgs[1] and "on rank(s) [1] of 2 at step 2" in msgs[0], msgs
    nan_at = float((job["out"] / "nan_at").read_text())
    for r in range(2):
        assert float((job["out"] / f"exit_{r}").read_text()) - nan_at < 20
    assert latest_checkpoint(job["out"] / "nan")["step"] == 2  # the last good checkpoint stays


def test_a_killed_rank_restarts_the_group_and_the_run_finishes(tmp_path, surrogate):
    shutil.copytree(surrogate, tmp_path / "surrogate")
    run = tmp_path / "k" / "run"
    p = _torchrun("kill", run, restarts=1)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert (run.parent / "run.restarted_0").is_file() and (run.parent / "run.restarted_1").is_file()
    assert _log_steps(run) == list(range(1, 9))
    ck = latest_checkpoint(run)
    assert ck["step"] == 8 and ck["format"] == "dcp"
    assert (run / "model.json").is_file()


def test_nproc_launches_torchrun_without_the_flag():
    from dmdx.cli import torchrun_command

    cmd = torchrun_command(["distill", "--method", "dmd2", "--nproc", "4", "--out", "r", "--nproc=3"], 4)
    from dataclasses import fields

    from torch.distributed.launcher.api import LaunchConfig

    # where this torch's torchrun can pass SIGUSR1 on to its workers, it is told to
    signals = (["--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
               if "signals_to_handle" in {f.name for f in fields(LaunchConfig)} else [])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", *signals, "-m", "dmdx",
                       "distill", "--method", "dmd2", "--out", "r"]
    with pytest.raises(ValueError, match="--nproc"):
        torchrun_command([], 0)
    p = subprocess.run([sys.executable, "-m", "dmdx", "distill", "--help"], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "--nproc" in p.stdout


def test_global_batch_rule():
    from dmdx.train.dist import per_rank_batch, resolve_parallel

    assert per_rank_batch(64, 4, 2) == 8
    assert per_rank_batch(64, 1, 1) == 64
    with pytest.raises(ValueError, match="divisible by world size x grad_accum = 3 x 1"):
        per_rank_batch(64, 3, 1)
    assert resolve_parallel("auto", 1) == "none" and resolve_parallel("auto", 8) == "ddp"
    with pytest.raises(ValueError, match="allowed|one of"):
        resolve_parallel("zero3", 2)
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        resolve_parallel("none", 2)


def test_average_gradients_writes_into_contiguous_and_non_contiguous_gradients():
    """The bucketed average lands in every gradient, a contiguous one (through its flat view) and a transposed one
    (whose flat reshape is a copy), in one process over torch's fake process group of two ranks: its all-reduce
    leaves the values as they are, so the average is half of each gradient."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dmdx.train.dist import World

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        a, b, unused = (torch.nn.Parameter(torch.zeros(s)) for s in ((3, 4), (4, 3), (2,)))
        ga, gb = torch.randn(3, 4), torch.randn(3, 4).t()
        a.grad, b.grad = ga.clone(), gb.clone()
        assert not b.grad.is_contiguous()
        World(0, 2, 0, "ddp").average_gradients([a, b, unused])
    finally:
        torch.distributed.destroy_process_group()
    assert torch.equal(a.grad, ga / 2) and torch.equal(b.grad, gb / 2)
    assert unused.grad is None


@pytest.mark.parametrize("opts", [{"cpu_offload": True}, {"bf16": True}], ids=["cpu_offload", "bf16"])
def test_fsdp_in_one_process_sample_grids_and_snapshots(opts, tmp_path, surrogate):
    """FSDP2 without a launcher (a group of one), with CPU offload or the bf16 mixed-precision policy; sample grids
    and snapshots come from the gathered EMA."""
    from dmdx.teachers import load_model
    from dmdx.train import dist

    cfg = tiny_config("dmd2", steps=2, parallel="fsdp", ckpt_every=2, sample_every=2, snapshot_every=2, **opts)
    try:
        tr = make_trainer(cfg, _seeded(tmp_path, surrogate))
        assert tr.world.parallel == "fsdp" and tr.world.size == 1 and dist.is_sharded(tr.student)
        tr.run()
        assert (tmp_path / "samples" / "step_0000002.png").is_file()
        snap = load_model(str(tmp_path / "snapshots" / "step_0000002"))
        full = tr.ema_state()
        for k, v in snap.denoiser.backbone.state_dict().items():
            assert torch.equal(v, full[k]), k
        assert latest_checkpoint(tmp_path)["format"] == "dcp"
        rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items() if k.startswith("loss/"))
    finally:
        dist.teardown()


# -- video teachers (tiny random Wan pipeline) under FSDP2 --------------------------------------------------------
@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("av")
    from dmdx.teachers.video.tiny import make_tiny_video_pipeline

    from helpers import video_inputs

    root = video_inputs(tmp_path_factory.mktemp("wan"), ["a red cat runs", "sunset over the sea"], 2)
    return {"pipe": make_tiny_video_pipeline("wan", root / "pipe"), "prompts": root / "p.txt", "vids": root / "vids",
            "root": root}


def test_fsdp_video_two_ranks_resume_equals_the_uninterrupted_run(wan):
    """``dmdx distill --method dmd2`` of a Wan pipeline with ``train.parallel=fsdp`` on two ranks at the recipe
    (bf16 teacher, gradient checkpointing, 4 student times), each transformer block its own FSDP unit; resumed
    from its step-1 DCP checkpoint, it reaches the uninterrupted run's step 2 bit for bit."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = wan["root"] / "out"
    out.mkdir()
    procs, outs = _two_ranks("video", out, wan["pipe"], wan["prompts"], wan["vids"])
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-2000:] + e[-6000:]
    run = out / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["parallel"] == "fsdp" and cfg["real"]["teacher_dtype"] == "bfloat16"
    assert cfg["real"]["grad_checkpointing"] is True and len(cfg["student"]["times"]) == 4
    ck = latest_checkpoint(run)
    assert ck["format"] == "dcp" and ck["step"] == 2 and ck["world"] == 2
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(r) for r in (out / "uninterrupted.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for a, b in zip(rows, ref):
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}
    assert {"loss/dm", "loss/gan_g", "loss/fake_dsm", "loss/gan_d"} <= set(rows[1])  # both phases at step 2
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss/"))
    a, b = load_file(str(run / "model.safetensors")), load_file(str(out / "uninterrupted.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = {}
    for name, folder in (("resumed", ck["path"]), ("uninterrupted", out / "uninterrupted_step_0000002"),
                         ("step1", run / "checkpoints" / "step_0000001")):
        dcp_to_torch_save(folder, out / f"{name}.pt")
        states[name] = torch.load(out / f"{name}.pt", weights_only=False)
    flat = {n: _flat(s) for n, s in states.items()}
    assert flat["resumed"].keys() == flat["uninterrupted"].keys()
    for k, v in flat["resumed"].items():  # every network's shards and optimiser states
        assert torch.equal(v, flat["uninterrupted"][k]), k
    assert any(k.startswith("nets.fake_score.") for k in flat["resumed"])
    moved = [k for k, v in flat["step1"].items() if k.startswith("nets.student.") and not torch.equal(v, flat["resumed"][k])]
    assert moved  # step 2 trained the student


def _flat(state, prefix=""):
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def test_fsdp_video_lora_student_in_one_process(wan, tmp_path):
    """FSDP2 in one process (a group of one) with a LoRA student of a Wan pipeline: the LoRA weights are sharded and
    train, the frozen base weights stay whole buffers, and the LoRA export loads into the base pipeline."""
    from safetensors.torch import load_file

    from dmdx.cli import main

    run = tmp_path / "run"
    assert main(["distill", "--method", "dmd2", "--teacher", str(wan["pipe"]), "--prompts", str(wan["prompts"]),
                 "--data", str(wan["vids"]), "--out", str(run), "--steps", "1", "--quiet",
                 "--set", "train.parallel=fsdp", "--set", "real.student_lora.rank=4", "--set", "train.batch_size=2",
                 "--set", "train.health_n=0", "--set", "video.frames=9", "--set", "video.height=16",
                 "--set", "video.width=16"]) == 0
    assert latest_checkpoint(run)["format"] == "dcp"
    row = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert all(math.isfinite(v) for k, v in row.items() if k.startswith("loss/"))
    state = load_file(str(run / "model.safetensors"))
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # zero at init: the LoRA trained
    assert main(["export", "--run", str(run), "--format", "lora", "--out", str(tmp_path / "lora")]) == 0
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(wan["pipe"]))
    pipe.load_lora_weights(str(tmp_path / "lora"))


def test_fsdp_video_cogvideox_adm_in_one_process(tmp_path, monkeypatch):
    """ADM (3-D heads on the bf16 teacher's features) of a CogVideoX pipeline under FSDP2 in one process, each
    transformer block its own unit, gradient checkpointing on (the recipe)."""
    pytest.importorskip("diffusers")
    from dmdx.cli import main
    from dmdx.teachers.video.tiny import make_tiny_video_pipeline
    from dmdx.train import dist

    monkeypatch.setattr(dist, "UNIT_MIN_PARAMS", 1)
    pipe = make_tiny_video_pipeline("cogvideox", tmp_path / "pipe")
    (tmp_path / "p.txt").write_text("a red cat runs\nsunset over the sea\n")
    run = tmp_path / "run"
    assert main(["distill", "--method", "adm", "--teacher", str(pipe), "--prompts", str(tmp_path / "p.txt"),
                 "--out", str(run), "--steps", "1", "--quiet", "--set", "train.parallel=fsdp",
                 "--set", "train.batch_size=2", "--set", "train.health_n=0"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["real"]["grad_checkpointing"] is True and cfg["real"]["teacher_dtype"] == "bfloat16"
    row = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss/gan_g", "loss/gan_d"} <= set(row)
    assert all(math.isfinite(v) for k, v in row.items() if k.startswith("loss/"))
    assert latest_checkpoint(run)["format"] == "dcp"


def test_fsdp_units_are_the_outermost_large_blocks():
    """Blocks of a ModuleList get their own unit, the ModuleLists inside them (an attention's to_out) do not:
    wrapping those after their block would find its parameters already sharded."""
    from torch import nn

    from dmdx.train.dist import fsdp_units

    def block(width):
        b = nn.Module()
        b.attn = nn.Linear(width, width)
        b.to_out = nn.ModuleList([nn.Linear(width, width), nn.Dropout()])
        return b

    net = nn.Module()
    net.blocks = nn.ModuleList([block(64), block(64), block(4)])
    assert fsdp_units(net, min_params=64 * 64) == [net.blocks[0], net.blocks[1]]
    assert fsdp_units(net.blocks[0], min_params=64 * 64) == [net.blocks[0].to_out[0]]  # a block on its own
    assert fsdp_units(net) == []  # below UNIT_MIN_PARAMS: one unit for the whole network


# -- life on a cluster (docs/scaling.md, "On a cluster") ---------------------------------------------------------
def test_nproc_passes_signals_to_its_whole_process_group_and_returns_the_workers_status(tmp_path):
    """``launch`` (behind ``--nproc``) on a stand-in for torchrun that starts a child in its own process group:
    SIGINT sent to this process reaches both, and the status a worker reported (130) is returned, not the
    launcher's own (1, as torchrun's whenever a worker fails)."""
    import signal
    import threading
    import time

    from dmdx.cli import STATUS_DIR_ENV, launch

    child = (f"import os, signal, sys, time\n"
             f"signal.signal(signal.SIGINT, lambda *a: (open(sys.argv[1] + '/got_' + sys.argv[2], 'w').close(), "
             f"os._exit(0)))\n"
             f"open(sys.argv[1] + '/ready_' + sys.argv[2], 'w').close()\n"
             f"time.sleep(60)\n")
    fake_torchrun = (f"import os, signal, subprocess, sys\n"
                     f"p = subprocess.Popen([sys.executable, '-c', {child!r}, {str(tmp_path)!r}, 'worker'])\n"
                     f"signal.signal(signal.SIGINT, lambda *a: open({str(tmp_path)!r} + '/got_agent', 'w').close())\n"
                     f"open({str(tmp_path)!r} + '/ready_agent', 'w').close()\n"
                     f"p.wait()\n"
                     f"open(os.path.join(os.environ[{STATUS_DIR_ENV!r}], 'rank_0'), 'w').write('130')\n"
                     f"sys.exit(1)\n")

    def interrupt():
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready_{w}").exists() for w in ("agent", "worker")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, to the launcher only

    t = threading.Thread(target=interrupt)
    t.start()
    code = launch([sys.executable, "-c", fake_torchrun])
    t.join()
    assert code == 130
    assert (tmp_path / "got_agent").exists() and (tmp_path / "got_worker").exists()  # the whole group got it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # this process's handler is back


def _proc_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def _workers(run: Path) -> dict[int, int]:
    """Global rank -> pid of the training processes of ``run`` (torchrun's workers: RANK in their environment)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if str(run).encode() not in (d / "cmdline").read_bytes():
                continue
            env = _proc_env(int(d.name))
        except OSError:
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _rows(run: Path) -> list[int]:
    """The steps logged so far (complete lines only: the run may be writing)."""
    path = run / "log.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().split("\n")[:-1]:
        out.append(json.loads(line)["step"])
    return out


def _until(cond, timeout: float, what: str, procs=()) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        assert all(p.poll() is None for p in procs), f"{what}: a process ended first"
        time.sleep(0.05)


def _doc_block(lang: str, start: str) -> str:
    text = (HERE.parent / "docs" / "scaling.md").read_text()
    blocks = re.findall(rf"```{lang}\n(.*?)```", text, re.S)
    found = [b for b in blocks if b.startswith(start)]
    assert len(found) == 1, f"docs/scaling.md: one ```{lang} block starting {start!r}"
    return found[0]


def test_on_a_cluster(tmp_path):
    """docs/scaling.md's SLURM script as written, on two "nodes" of this machine (a stand-in srun that starts one
    torchrun per node, a stand-in scontrol), one process each: it trains; USR1 to the script (SLURM's notice before
    the time limit) stops every rank after the same step with a checkpoint there and requeues the job; the
    requeued job resumes on two nodes, where rank 1 is frozen (SIGSTOP): rank 0 names it and the step within
    train.dist_timeout, and when rank 1 wakes both have exited with status 4.  Then the Kubernetes manifest's
    container command on two "pods": killing the pod of rank 1 (its torchrun and its worker) makes rank 0 exit
    within the timeout, naming it.  Last, ``dmdx distill --resume --nproc 2`` continues the two nodes' run on one
    node until SIGTERM sent to it (the launcher only) stops its workers with status 75; every step was logged once
    (only global rank 0 writes)."""
    import signal
    import time

    import yaml

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f"#!{sys.executable}\n"
        "# a stand-in for srun: the command once per node (SLURM_NNODES) on this machine; signals passed on\n"
        "import os, signal, subprocess, sys\n"
        "args = [a for a in sys.argv[1:] if not a.startswith('--kill-on-bad-exit')]\n"
        "n = int(os.environ['SLURM_NNODES'])\n"
        "procs = [subprocess.Popen(args, env={**os.environ, 'SLURM_NODEID': str(k), 'SLURM_PROCID': str(k)},\n"
        "                          start_new_session=True) for k in range(n)]\n"
        "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):\n"
        "    signal.signal(s, lambda sig, f: [p.send_signal(sig) for p in procs if p.poll() is None])\n"
        "codes = [p.wait() for p in procs]\n"
        "sys.exit(max(c if c >= 0 else 128 - c for c in codes))\n")
    (bin_dir / "scontrol").write_text('#!/bin/sh\ncase "$1" in\n  show) echo 127.0.0.1 ;;\n'
                                      '  requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;\nesac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = tmp_path / "dmdx.sbatch"
    script.write_text(_doc_block("bash", "#!/bin/bash\n#SBATCH"))
    run = tmp_path / "run"
    steps, timeout = 1000, 8  # never reached: every launch is stopped
    args = (f"--method dmd2 --teacher gmm:ring8 --steps {steps} --quiet --set recipe=none --set surrogate_steps=20 "
            f"--set train.batch_size=16 --set train.sample_every=0 --set train.health_n=0 --set train.log_every=1 "
            f"--set train.ckpt_every=4 --set train.dist_timeout={timeout}")
    base = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(run), ARGS=args, GPUS="1",
                SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_ID="4242", FAKE_SLURM_LOG=str(tmp_path / "slurm.log"))
    started: list[subprocess.Popen] = []

    def start(cmd, name, **env):
        log = open(tmp_path / f"{name}.log", "w")
        p = subprocess.Popen(cmd, env={**base, "PORT": str(_free_port()), **env}, stdout=log,
                             stderr=subprocess.STDOUT, cwd=tmp_path)
        started.append(p)
        return p

    def output(name):
        return (tmp_path / f"{name}.log").read_text()

    try:
        # 1. the job trains on two nodes; USR1 to the batch script: preempted after one step, checkpoint, requeue
        job = start(["bash", str(script)], "slurm1", SLURM_NNODES="2")
        _until(lambda: len(_rows(run)) >= 3, 120, "the job did not start training", [job])
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=120) == 1, output("slurm1")  # torchrun's status when its workers end non-zero
        text = output("slurm1")
        stops = re.findall(r"preempted by SIGTERM \(received by rank\(s\) \[[01, ]+\] of 2\) at step (\d+) of 1000: "
                           r"checkpoint (\S+) written", text)
        assert len(stops) == 1, text[-5000:]  # printed once: by global rank 0 only
        assert "s after the signal; continue with the same command and --resume" in text
        k = int(stops[0][0])
        state = json.loads((Path(stops[0][1]) / "state.json").read_text())
        assert state["step"] == k and state["preempted"] == "SIGTERM" and state["world"] == 2
        assert latest_checkpoint(run)["step"] == k and _rows(run) == list(range(1, k + 1))
        assert (tmp_path / "slurm.log").read_text() == "requeue 4242\n"
        # 2. the requeued job resumes on two nodes; rank 1 is frozen: rank 0 names it, both exit with status 4
        job = start(["bash", str(script)], "slurm2", SLURM_NNODES="2")
        _until(lambda: len(_rows(run)) >= k + 3, 120, "the requeued job did not resume", [job])
        worker = _workers(run)[1]
        os.kill(worker, signal.SIGSTOP)
        frozen = time.monotonic()
        _until(lambda: "rank 0 of 2: a collective" in output("slurm2"), timeout + 30, "rank 0 did not report")
        assert time.monotonic() - frozen < timeout + 15
        time.sleep(1)
        os.kill(worker, signal.SIGCONT)  # it wakes, finds the others gone, exits too
        assert job.wait(timeout=120) != 0
        text = output("slurm2")
        at = re.search(r"rank 0 of 2: a collective in step (\d+) failed after [0-9.]+ s \(Timed out[^)]*\); "
                       r"rank\(s\) \[1\] did not answer within \d+ s", text)
        assert at and int(at.group(1)) in (_rows(run)[-1], _rows(run)[-1] + 1), text[-5000:]
        # rank 1's own report (its torchrun may end first: the rendezvous store lived with rank 0's torchrun)
        assert "rank 1 of 2: a collective in step" in text and "(exitcode: 4)" in text, text[-5000:]
        # 3. the Kubernetes manifest's command on two pods; the pod of rank 1 is killed
        manifest = yaml.safe_load(_doc_block("yaml", "apiVersion: batch/v1"))
        container = manifest["spec"]["template"]["spec"]["containers"][0]
        pod_env = {e["name"]: e["value"] for e in container["env"]}
        pod_env.update(OUT=str(run), ARGS=args, GPUS="1", HEAD="127.0.0.1", PORT=str(_free_port()))
        logged = len(_rows(run))  # the resumed run first drops the rows after its checkpoint, then goes past them
        pods = [start(container["command"] + container["args"], f"pod{i}", **pod_env) for i in range(2)]
        _until(lambda: len(_rows(run)) >= logged + 2, 120, "the pods did not resume", pods)
        worker = _workers(run)[1]
        agent = _parent(worker)
        survivor = next(p for p in pods if p.pid != agent)
        for pid in (worker, agent):
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        assert survivor.wait(timeout=120) != 0
        assert time.monotonic() - killed < timeout  # within the collective timeout: the peer's connection closed
        text = output(f"pod{pods.index(survivor)}")
        # named whether its wait ran out or its torchrun, finding the rendezvous gone with the killed pod, stopped it
        assert re.search(r"rank 0 of 2: a collective in step \d+ failed after [0-9.]+ s \(.*\); rank\(s\) \[1\] "
                         r"(did not answer|had not answered when a stop signal came)", text), text[-5000:]
        # 4. `dmdx distill --nproc 2` resumes on one node; SIGTERM to it reaches its workers: status 75
        logged = len(_rows(run))
        job = start([sys.executable, "-m", "dmdx", "distill", "--method", "dmd2", "--out", str(run), "--resume",
                     "--nproc", "2"], "nproc")
        _until(lambda: len(_rows(run)) >= logged + 2, 120, "--nproc did not resume", [job])
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 75, output("nproc")[-5000:]
        stop = int(re.findall(r"preempted by SIGTERM \(received by rank\(s\) \[[01, ]+\] of 2\) at step (\d+)",
                              output("nproc"))[0])
        assert latest_checkpoint(run)["step"] == stop and _rows(run)[-1] == stop
        assert not _workers(run)  # no process of the run is left
        assert _rows(run) == list(range(1, stop + 1))  # each step logged once, the steps redone after a failure too
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
        for pid in _workers(run).values():
            os.kill(pid, signal.SIGKILL)

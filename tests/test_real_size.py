"""Real size (issue 34): the published architectures on the meta device, one base for many adapters
(``real.shared_base``), ``dmdx plan`` against a measured run, the end of a run that does not multiply the weights."""

from __future__ import annotations

import contextlib
import gc as garbage
import json
from pathlib import Path

import pytest
import torch

from helpers import make_trainer, tiny_config

from dmdx.denoiser import FeatureTap
from dmdx.pipelines.folder import load_cond
from dmdx.teachers import apply_recipe
from dmdx.teachers.image import load_teacher
from dmdx.teachers.image.tiny import make_tiny_pipeline
from dmdx.train import dist
from dmdx.train.plan import _Tracker, format_plan, parse_memory, plan_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("real_size")
    pipe = make_tiny_pipeline("sd", root / "sd")
    (root / "prompts.txt").write_text("a red cat\na blue dog\n")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / "imgs" / f"{i}.png")
    return pipe, root


def config(sd, method="dmd2", shared=True, **train):
    pipe, root = sd
    cfg = tiny_config(method, teacher=str(pipe), **{"steps": 2, "batch_size": 2, **train})
    cfg.real.prompts, cfg.data = str(root / "prompts.txt"), str(root / "imgs")
    cfg.real.student_lora.rank = cfg.real.fake_lora.rank = 4
    cfg.real.shared_base = shared
    cfg.pairs.n, cfg.pairs.steps, cfg.pairs.solver = 4, 2, "euler"
    apply_recipe(cfg, {"train", "method", "pairs", "real.student_lora.rank", "real.fake_lora.rank",
                       "real.shared_base"})
    return cfg


def nets_of(trainer):
    stage = trainer.build_stage(0)
    ctx = trainer.ctx
    return stage, {"teacher": ctx.teacher, "student": ctx.student, "fake_score": stage.method.fake_score,
                   "ema": trainer.ema}


def randomise_lora(net, scale=0.3):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)


# -- the published architectures, built on the meta device (no allocation) ----------------------------------------
PUBLISHED = {"sd15": 859.52, "sdxl": 2567.46, "sd3-medium": 2028.33, "wan2.1-1.3b": 1419.00, "cogvideox-2b": 1693.78}


def test_published_architectures_on_meta(tmp_path):
    """Every full-size config builds on the meta device with its published size; the family's recipe LoRA targets
    all exist in it, its feature taps are sub-modules, and FSDP2 shards its units (bottom-up, no nesting) over 8
    ranks of a fake process group."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dmdx.nets import build_backbone
    from dmdx.nets.pipeline import FAMILY_BACKBONE as IMAGE
    from dmdx.nets.video import FAMILY_BACKBONE as VIDEO
    from dmdx.pipelines.image import denoiser_component
    from dmdx.pipelines.video import video_family
    from dmdx.recipes import recipe
    from dmdx.teachers import teacher_kind
    from dmdx.teachers.image import published as image
    from dmdx.teachers.video import published as video

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        world = dist.World(0, 8, 0, "fsdp")
        mesh = world.device_mesh("cpu")
        for name, millions in PUBLISHED.items():
            mod = image if name in image.PUBLISHED else video
            path = mod.write_published(name, tmp_path / name)
            family = video_family(path) or denoiser_component(path)[1]
            with torch.device("meta"):
                bb = build_backbone({**IMAGE, **VIDEO}[family], path=str(path), dtype="bfloat16", weights=False)
            n = sum(p.numel() for p in bb.model.parameters())
            assert abs(n / 1e6 - millions) < 0.01, (name, n)
            assert all(p.is_meta for p in bb.parameters())
            mods = dict(bb.named_modules())
            assert bb.feature_layers and all(layer in mods for layer in bb.feature_layers), name
            targets = next(s.value for s in recipe(teacher_kind(str(path)), "dmd2")
                           if s.key == "real.student_lora.targets") if family in ("unet", "sd3") else \
                ["to_q", "to_k", "to_v", "to_out.0"]
            names = [k for k, _ in bb.model.named_modules()]
            for t in targets:  # peft's rule: the module name is the target or ends with "." + target
                assert any(k == t or k.endswith("." + t) for k in names), (name, t)
            units = dist.fsdp_units(bb)
            ids = {id(u) for u in units}
            assert all(id(m) not in ids for u in units for m in list(u.modules())[1:]), name  # no nesting
            covered = sum(p.numel() for u in units for p in u.parameters())
            assert covered > 0.8 * n, (name, covered / n)
            for u in units:
                fully_shard(u, mesh=mesh)
            fully_shard(bb, mesh=mesh)
            assert all(isinstance(p, DTensor) for p in bb.parameters()), name
            local = sum(p.to_local().numel() for p in bb.parameters())
            assert local < 1.01 * n / 8, name  # one shard per rank (dim 0 padded to a multiple of 8)
    finally:
        torch.distributed.destroy_process_group()


# -- one base, many adapters --------------------------------------------------------------------------------------
def test_shared_base_holds_the_base_once(sd, tmp_path):
    trainer = make_trainer(config(sd), tmp_path / "run")
    _, nets = nets_of(trainer)
    teacher = nets["teacher"].backbone
    base = {id(t) for t in teacher.model.parameters()}
    for name in ("student", "fake_score", "ema"):
        bb = nets[name].backbone
        slots = bb.base_slots()
        assert slots and {id(m.__dict__[k]) for m, k in slots} <= base | {id(b) for b in teacher.model.buffers()}
        assert all("lora_" in k for k in bb.state_dict()), name  # checkpoints and the model folder: the LoRA only
        assert all(p.dtype == torch.float32 for p in bb.parameters())  # the adapters train in float32
    assert teacher.dtype == torch.bfloat16 and nets["student"].backbone.dtype == torch.bfloat16
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for net in nets.values()
            for m in net.modules() for t in [*m._parameters.values(), *m._buffers.values(), *m.__dict__.values()]
            if isinstance(t, torch.Tensor)}
    base_bytes = sum(t.untyped_storage().nbytes() for t in teacher.model.parameters())
    lora_bytes = sum(p.numel() * 4 for name in ("student", "fake_score", "ema") for p in nets[name].parameters())
    assert sum(held.values()) < 1.05 * (base_bytes + lora_bytes) + 2**16  # the base once (+ null conds, heads)


def test_shared_base_teacher_is_the_plain_teacher(sd, tmp_path):
    """The teacher of a shared-base run (the base with no adapter) gives the plain teacher's output bit for bit,
    before and after training moved its adapters."""
    pipe, _ = sd
    trainer = make_trainer(config(sd), tmp_path / "run")
    stage, nets = nets_of(trainer)
    plain = load_teacher(pipe, dtype="bfloat16", cond_file=str(tmp_path / "run" / "prompts.safetensors")).denoiser
    bank, _ = load_cond(tmp_path / "run" / "prompts.safetensors")
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.3], dtype=torch.float64), bank

    def same():
        with torch.no_grad():
            assert torch.equal(nets["teacher"](x, t, cond, guidance=3.0), plain(x, t, cond, guidance=3.0))

    same()
    for net in (nets["student"], nets["fake_score"]):
        randomise_lora(net)
    for phase in stage.method.phases():
        trainer.run_phase(stage, phase, 0)
    same()


def test_shared_base_gradients_reach_only_the_phase_adapters(sd, tmp_path):
    trainer = make_trainer(config(sd), tmp_path / "run")
    stage, nets = nets_of(trainer)
    randomise_lora(nets["fake_score"])
    student, critic = stage.method.phases()
    trainer.run_phase(stage, student, 0)
    got = {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
           for name, net in nets.items()}
    assert got == {"teacher": False, "student": True, "fake_score": False, "ema": False}
    for net in nets.values():
        net.zero_grad(set_to_none=True)
    trainer.run_phase(stage, critic, 0)
    got = {name: any(p.grad is not None for p in net.parameters()) for name, net in nets.items()}
    assert got == {"teacher": False, "student": False, "fake_score": True, "ema": False}
    assert all(p.grad is not None for p in stage.method.head.parameters())
    base = [m.__dict__[k] for m, k in nets["student"].backbone.base_slots()]
    assert all(t.grad is None and not t.requires_grad for t in base)


def test_shared_base_feature_taps_see_their_own_network(sd, tmp_path):
    """DMD2's GAN head taps the fake score (its adapter on), ADM's heads the teacher (no adapter): a tap sees only
    its own network's calls, and the teacher's features are the plain teacher's."""
    pipe, _ = sd
    trainer = make_trainer(config(sd), tmp_path / "run")
    _, nets = nets_of(trainer)
    randomise_lora(nets["fake_score"])
    plain = load_teacher(pipe, dtype="bfloat16", cond_file=str(tmp_path / "run" / "prompts.safetensors")).denoiser
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5], dtype=torch.float64)
    layers = list(nets["teacher"].backbone.feature_layers)

    def tap(net, other=None):
        with torch.no_grad(), FeatureTap(net.backbone, layers) as tp:
            if other is not None:
                other(x, t, None)
            else:
                net(x, t, None)
        return tp.features

    assert all(f is None for f in tap(nets["fake_score"], other=nets["teacher"]))  # the teacher's call: not seen
    teacher, fake, reference = tap(nets["teacher"]), tap(nets["fake_score"]), tap(plain)
    assert all(torch.equal(a, b) for a, b in zip(teacher, reference))
    assert not torch.equal(teacher[-1], fake[-1])


def test_shared_base_float32_block(sd, tmp_path):
    """ADM's float32 steps on a shared base: between layers the block holds float32 copies only of the few tensors
    outside the repeated blocks (the repeated blocks' base tensors are the bf16 ones), every network of the group
    computes in float32, and on exit each holds the base's own tensors."""
    from dmdx.nets.pipeline import _Float32Compute

    trainer = make_trainer(config(sd, "adm"), tmp_path / "run")
    _, nets = nets_of(trainer)
    slot = lambda m, k: m.__dict__[k] if k in m.__dict__ else getattr(m, k)  # noqa: E731
    originals = {id(slot(m, k)) for net in nets.values() for m, k in net.backbone.base_slots()}
    whole = {(id(m), k) for m, k in _Float32Compute(list(trainer.ctx.teacher.backbone.shared_base.members)).whole}
    x, t = torch.randn(2, *trainer.ctx.shape), torch.full((2,), 0.5)
    with trainer.ctx.float32(teacher=True):
        for name, net in nets.items():
            assert net.backbone.dtype == torch.float32
            assert net(x, t, None).dtype == torch.float32, name
            copied = {(id(m), k) for m, k in net.backbone.base_slots() if id(slot(m, k)) not in originals}
            assert copied and copied <= whole, name
    assert {id(slot(m, k)) for net in nets.values() for m, k in net.backbone.base_slots()} == originals
    assert all(net.backbone.dtype == torch.bfloat16 for net in nets.values())


@pytest.mark.parametrize("family", ["sd", "sd3", "wan"])
def test_float32_block_is_a_float32_teacher_without_its_copy(family, tmp_path):
    """Inside the float32 block a bfloat16 teacher computes exactly what a float32 copy of it computes (output and
    the gradient through it), while it holds the float32 copy of one layer at a time: the forward's peak exceeds the
    copy's own by at most the tensors outside the repeated blocks plus two layers, and a graph built inside holds
    no float32 weights (it saves the bf16 tensors and casts them again in the backward).  With a float32 copy of
    the whole network (the block before issue 34) both bounds fail by the network's float32 size."""
    import copy

    from dmdx.nets.pipeline import _Float32Compute, _slot, cast_module
    from dmdx.teachers.video.kind import VideoConfig
    from dmdx.teachers.video.kind import load_teacher as load_video
    from dmdx.teachers.video.tiny import make_tiny_video_pipeline

    if family == "wan":
        teacher = load_video(make_tiny_video_pipeline(family, tmp_path / family), dtype="bfloat16",
                             vc=VideoConfig(9, 16, 16)).denoiser
    else:
        teacher = load_teacher(make_tiny_pipeline(family, tmp_path / family), dtype="bfloat16").denoiser
    bb = teacher.backbone
    reference = copy.deepcopy(teacher)
    cast_module(reference.backbone.model, torch.float32)
    reference.backbone.config["dtype"] = "float32"
    x, t = torch.randn(2, *bb.shape), torch.tensor([0.7, 0.3])

    def run(net, block):
        tracker = _Tracker()
        tracker.add_live()
        xx = x.clone().requires_grad_(True)
        with tracker:
            tracker.phase = ("f", "f")
            start = tracker.total
            with block:
                y = net(xx, t, None)
            held = tracker.total - start  # the graph's saved tensors, after the block
            grad, = torch.autograd.grad((y.float() ** 2).sum(), xx)
        return y, grad, held, tracker.peaks[("f", "f")][0] - start

    y, grad, held, peak = run(teacher, bb.float32())
    y_ref, grad_ref, held_ref, peak_ref = run(reference, contextlib.nullcontext())
    assert y.dtype == torch.float32 and torch.equal(y, y_ref) and torch.equal(grad, grad_ref)
    compute = _Float32Compute([bb])
    f32 = lambda slots: sum(_slot(m, k).numel() * 4 for m, k in slots)  # noqa: E731
    layers = [f32([(m, k) for k in names]) for m, names in compute.layers.items()]
    whole = f32(compute.whole)
    model = sum(layers) + whole
    assert held <= held_ref, (held, held_ref, model)
    assert peak - peak_ref <= whole + 2 * max(layers) < model, (peak, peak_ref, whole, max(layers), model)


@pytest.mark.parametrize("family", ["sd", "wan"])
def test_float32_block_frees_a_graph_no_backward_uses(family, tmp_path):
    """A graph built inside the float32 block that no backward runs through (a pass whose output is dropped, the
    part of a pass after the features a discriminator reads) is freed with its last reference, and with it what it
    reaches (here the input).  The block's saved-tensor hook once kept a saved output itself, whose ``grad_fn``
    holds the saved tensor: a cycle through C++ that Python's garbage collector cannot free, which made a tiny plan
    count the graphs of the plans run before it in the same process."""
    import weakref

    from dmdx.teachers.video.kind import VideoConfig
    from dmdx.teachers.video.kind import load_teacher as load_video
    from dmdx.teachers.video.tiny import make_tiny_video_pipeline

    if family == "wan":
        teacher = load_video(make_tiny_video_pipeline(family, tmp_path / family), dtype="bfloat16",
                             vc=VideoConfig(9, 16, 16)).denoiser
    else:
        teacher = load_teacher(make_tiny_pipeline(family, tmp_path / family), dtype="bfloat16").denoiser
    x = torch.randn(2, *teacher.backbone.shape, requires_grad=True)
    alive = weakref.ref(x)
    with teacher.backbone.float32():
        y = teacher(x, torch.tensor([0.7, 0.3]), None)
    assert y.grad_fn is not None
    del x, y
    garbage.collect()
    assert alive() is None


def test_shared_base_float32_block_with_checkpointing(sd, tmp_path):
    """ADM on a shared base with gradient checkpointing: the backward, after the float32 block has ended, recomputes
    the block's passes on the float32 copies its forward used (it crashed on mixed dtypes), with the gradients of a
    run without checkpointing."""
    grads = {}
    for gc in (False, True):
        cfg = config(sd, "adm")
        cfg.real.grad_checkpointing = gc
        trainer = make_trainer(cfg, tmp_path / f"gc{gc}")
        stage = trainer.build_stage(0)
        randomise_lora(trainer.ctx.student)
        torch.manual_seed(3)
        for phase in stage.method.phases():
            trainer.run_phase(stage, phase, 0)
        grads[gc] = [p.grad.clone() for p in trainer.ctx.student.parameters() if p.grad is not None]
        assert all(bb._float32_compute is None for bb in trainer.ctx.teacher.backbone.shared_base.members)
    assert grads[True] and len(grads[True]) == len(grads[False])
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_shared_base_trains_and_exports_like_copies(sd, tmp_path):
    """With a float32 teacher a shared-base run computes what the copies compute: the same LoRA after two
    iterations and the same diffusers export (the shared run's model folder holds only its LoRA)."""
    from safetensors.torch import load_file

    from dmdx.teachers import export_run

    runs = {}
    for shared in (True, False):
        cfg = config(sd, shared=shared)
        cfg.real.teacher_dtype = "float32"
        cfg.method.gan = False
        runs[shared] = make_trainer(cfg, tmp_path / f"run{shared}").run()
    a, b = (load_file(str(runs[s] / "model.safetensors")) for s in (True, False))
    assert set(a) < set(b) and all("lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ea, eb = (load_file(str(export_run(runs[s], tmp_path / f"export{s}") / "unet" /
                             "diffusion_pytorch_model.safetensors")) for s in (True, False))
    assert set(ea) == set(eb)
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-5, atol=1e-6)


def test_shared_base_student_of_a_transformer_loads_back(sd, tmp_path):
    """A shared-base run's model folder holds only its LoRA; loading it rebuilds the base from the pipeline folder,
    buffers included (SD3's positional embedding, which the shared copy held as the teacher's and did not save: the
    load failed on the missing key), and gives the trained EMA's outputs (a float32 teacher: the same base)."""
    from dmdx.teachers import load_model

    _, root = sd
    cfg = config((make_tiny_pipeline("sd3", tmp_path / "sd3"), root))
    cfg.real.teacher_dtype = "float32"
    cfg.method.gan = False
    trainer = make_trainer(cfg, tmp_path / "run")
    loaded = load_model(trainer.run()).denoiser
    x, t = torch.randn(2, *trainer.ema.backbone.shape), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, None), trainer.ema(x, t, None), rtol=1e-5, atol=1e-5)


def test_shared_base_fsdp_and_checkpointing(sd, tmp_path):
    """FSDP2 (a process group of one) shards only the adapters, the base stays the teacher's; gradient
    checkpointing gives the gradients of a run without it."""
    grads = {}
    for gc in (False, True):
        cfg = config(sd)
        cfg.real.grad_checkpointing = gc
        trainer = make_trainer(cfg, tmp_path / f"gc{gc}")
        stage, nets = nets_of(trainer)
        randomise_lora(nets["fake_score"])
        torch.manual_seed(3)
        trainer.run_phase(stage, stage.method.phases()[0], 0)
        grads[gc] = [p.grad.clone() for p in nets["student"].parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    cfg = config(sd)
    cfg.train.parallel = "fsdp"
    cfg.real.grad_checkpointing = True
    try:
        trainer = make_trainer(cfg, tmp_path / "fsdp")
        stage, nets = nets_of(trainer)
        assert dist.is_sharded(nets["student"]) and dist.is_sharded(nets["fake_score"])
        teacher = {id(t) for t in nets["teacher"].backbone.model.parameters()}
        assert {id(m.__dict__[k]) for m, k in nets["student"].backbone.base_slots()} <= teacher
        for phase in stage.method.phases():
            logs = trainer.run_phase(stage, phase, 0)
            assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    finally:
        dist.teardown()


def test_shared_base_needs_a_lora_student(sd, tmp_path):
    cfg = config(sd)
    cfg.real.student_lora.rank = 0
    with pytest.raises(ValueError, match="shared_base needs a LoRA student"):
        make_trainer(cfg, tmp_path / "run")


# -- the end of a run -----------------------------------------------------------------------------------------------
def test_sample_grid_in_chunks_of_the_batch(sd, tmp_path):
    """The last step's sample grid (64 images) runs the EMA in chunks of the per-rank batch: at 512 px, one batch of
    64 took a full-size SD1.5 run that trained in 16-18 GB to 24 GB (issue 34)."""
    cfg = config(sd, sample_every=1, steps=1)
    trainer = make_trainer(cfg, tmp_path / "run")
    seen = []
    trainer.ema.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    trainer.run()
    assert (tmp_path / "run" / "samples" / "step_0000001.png").is_file()
    assert sum(seen) >= 64 and max(seen) <= trainer.ctx.batch_size


@pytest.mark.parametrize("shared", [True, False])
def test_end_of_run_holds_at_most_one_extra_copy(sd, tmp_path, shared):
    """The checkpoint, the export and the sample grid of the last step peak below a training step's peak plus one
    copy of the largest network: they write the tensors the run holds, and the grid runs in chunks of the batch (in
    one batch of 64 it took a full-size SD1.5 run from 16-18 GB to 24 GB, issue 34)."""
    trainer = make_trainer(config(sd, shared=shared), tmp_path / "run")
    stage = trainer.build_stage(0)
    for phase in stage.method.phases():  # the steady state: gradients and optimiser states exist
        trainer.run_phase(stage, phase, 0)
    nets = {"teacher": trainer.ctx.teacher, "student": trainer.ctx.student, "ema": trainer.ema, **stage.trainables}
    largest = max(sum(t.untyped_storage().nbytes() for t in net.state_dict().values()) for net in nets.values())
    noise = torch.randn(64, *trainer.ctx.shape)
    cond = {k: v[torch.arange(64) % len(v)] for k, v in trainer.ctx.cond_bank.items()}
    tracker = _Tracker()
    tracker.add_live()
    with tracker:
        for phase in stage.method.phases():
            tracker.phase = ("train", phase.name)
            trainer.run_phase(stage, phase, 0)
        tracker.phase = ("end", "end")
        trainer.checkpoint(stage, 1)
        trainer.save_sample_grid(1, noise, cond)
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "samples").is_dir()
    train = max(v for (kind, _), (v, _) in tracker.peaks.items() if kind == "train")
    assert tracker.peaks[("end", "end")][0] < train + largest, (tracker.peaks, largest)


# -- feature passes that stop at the last tapped layer -------------------------------------------------------------
def hooks_of(net):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def tiny_denoiser(family, root):
    from dmdx.teachers.video.kind import VideoConfig
    from dmdx.teachers.video.kind import load_teacher as load_video
    from dmdx.teachers.video.tiny import make_tiny_video_pipeline

    if family == "wan":
        return load_video(make_tiny_video_pipeline(family, root / family), dtype="bfloat16",
                          vc=VideoConfig(9, 16, 16)).denoiser
    return load_teacher(make_tiny_pipeline(family, root / family), dtype="bfloat16").denoiser


@pytest.mark.parametrize("family, case", [("sd", "lora"), ("sd", "shared-gc"), ("sd", "teacher-float32"),
                                          ("sd3", "shared-gc"), ("sd3", "teacher-float32"), ("wan", "lora-gc")])
def test_a_stopped_feature_pass_is_the_whole_pass_up_to_its_features(family, case, tmp_path):
    """``Denoiser.features`` (a ``FeatureTap`` with ``stop``) ends the pass at the last feature layer: the layers
    after it never run, and the features and their gradients with respect to the input and to the trainable (LoRA)
    parameters are those of a whole pass bit for bit, with gradient checkpointing (its recomputation in the backward),
    on a shared base, and in ADM's float32 block on a bfloat16 teacher; afterwards no hook is left registered and the
    float32 block has put every base tensor back."""
    from dmdx.methods.base import frozen_copy
    from dmdx.nets.pipeline import _slot

    teacher = tiny_denoiser(family, tmp_path)
    net, block = teacher, contextlib.nullcontext
    if case != "teacher-float32":
        if case.startswith("shared"):
            teacher.backbone.share_base()
        teacher.backbone.copy_options = {"lora": {"rank": 4, "alpha": 4.0, "targets": ["to_q", "to_k", "to_v"]},
                                         "grad_checkpointing": case.endswith("gc")}
        net = frozen_copy(teacher)
        randomise_lora(net)
    else:
        block = teacher.backbone.float32
    bb = net.backbone
    names = list(bb.feature_layers)
    last = bb.model.conv_out if family == "sd" else bb.model.proj_out  # runs only after every feature layer
    calls = []
    last.register_forward_hook(lambda *_: calls.append(1))
    hooks, slots, dtype = hooks_of(net), [(m, k, _slot(m, k)) for m, k in bb.base_slots()], bb.dtype
    params = [p for p in net.parameters() if p.requires_grad]
    assert bool(params) == (case != "teacher-float32")
    x, t = torch.randn(2, *bb.shape), torch.tensor([0.7, 0.3], dtype=torch.float64)

    def run(stop):
        calls.clear()
        xx = x.clone().requires_grad_(True)
        with block():
            if stop:
                feats = net.features(xx, t, None, names)
            else:
                with FeatureTap(bb, names) as tap:
                    net.predict(xx, t, None)
                feats = tap.features
        assert len(calls) == (0 if stop else 1)
        loss = sum((f.float() ** 2).mean() for f in feats)
        return feats, torch.autograd.grad(loss, [xx, *params], allow_unused=True)  # the up blocks' LoRA: None

    (whole, grads_whole), (stopped, grads_stopped) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(whole, stopped))
    assert len(grads_stopped) == 1 + len(params) and grads_stopped[0] is not None
    assert (case == "teacher-float32") == all(g is None for g in grads_stopped[1:])
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(grads_whole, grads_stopped))
    assert hooks_of(net) == hooks
    assert all(_slot(m, k) is v for m, k, v in slots) and bb._float32_compute is None
    assert all(p.dtype == torch.float32 for p in params) and bb.dtype == dtype


def test_feature_taps_stop_only_their_own_pass(tmp_path):
    """A stopping tap catches its own stop only: an outer tap on the same network keeps its features, an error of
    the network itself goes through, and a pass that never reaches every feature runs whole."""
    net = tiny_denoiser("sd", tmp_path)
    bb = net.backbone
    x, t = torch.randn(1, *bb.shape), torch.full((1,), 0.5)
    first, mid = bb.feature_layers[0], bb.feature_layers[-1]
    with torch.no_grad(), FeatureTap(bb, [first]) as outer:
        (f,) = net.features(x, t, None, [mid])
    assert outer.features[0] is not None and f is not None
    hooks = hooks_of(net)
    with pytest.raises(RuntimeError), FeatureTap(bb, [mid], stop=True):
        net.predict(torch.randn(1, 3, 8, 8), t, None)  # wrong channel count: fails before the mid block
    assert hooks_of(net) == hooks
    done = []
    with torch.no_grad(), FeatureTap(bb, [mid], stop=True) as tap:
        net.predict(x, t, None)
        done.append(True)
    assert tap.features[0] is not None and not done  # stopped: the rest of the block is skipped


@pytest.mark.parametrize("method", ["dmd2", "adm"])
def test_stopped_feature_passes_leave_the_losses_unchanged(sd, tmp_path, monkeypatch, method):
    """One seeded iteration of DMD2 (GAN on) and ADM on a tiny SD pipeline (shared base, gradient checkpointing):
    the losses and every gradient are the same whether the feature passes stop or run whole (as under FSDP2, where
    they run whole)."""
    import dmdx.denoiser

    runs = {}
    for stop in (True, False):
        if not stop:
            monkeypatch.setattr(dmdx.denoiser, "_sharded", lambda module: True)  # FeatureTap then never stops
        cfg = config(sd, method)
        cfg.real.grad_checkpointing = True
        trainer = make_trainer(cfg, tmp_path / f"run{stop}")
        stage, nets = nets_of(trainer)
        torch.manual_seed(3)
        randomise_lora(nets["fake_score"])
        logs, grads = {}, {}
        for phase in stage.method.phases():
            logs.update({f"{phase.name}/{k}": v for k, v in trainer.run_phase(stage, phase, 0).items()})
            grads[phase.name] = {n: p.grad.clone() for net in stage.method.networks().values()
                                 for n, p in net.named_parameters() if p.grad is not None}
        runs[stop] = logs, grads
    (logs, grads), (logs_whole, grads_whole) = runs[True], runs[False]
    assert {"student/loss/gan_g", "critic/loss/gan_d"} <= set(logs) and logs == logs_whole
    assert grads.keys() == grads_whole.keys() and all(grads[k].keys() == grads_whole[k].keys() for k in grads)
    assert all(torch.equal(grads[k][n], grads_whole[k][n]) for k in grads for n in grads[k])


# -- dmdx plan ------------------------------------------------------------------------------------------------------
def measured_peaks(cfg, run_dir, foreach=False):
    """Per phase, the peak bytes of every tensor alive during the phase's second execution (the first makes the
    optimiser states and gradients of the steady state), on the real tensors of a real run; ``foreach``: AdamW's
    multi-tensor step, as torch takes it on CUDA."""
    garbage.collect()
    alive = [o for o in garbage.get_objects() if isinstance(o, torch.Tensor)]  # held, so no run tensor reuses their storage
    earlier = {o.untyped_storage()._cdata for o in alive}
    trainer = make_trainer(cfg, run_dir)
    stage = trainer.build_stage(0)
    for opt in stage.optims.values():
        for group in opt.param_groups:
            group["foreach"] = foreach or None
    for phase in stage.method.phases():
        trainer.run_phase(stage, phase, 0)
    tracker = _Tracker()
    tracker.add_live()
    ctx = trainer.ctx
    theirs = {t.untyped_storage()._cdata for t in [*ctx.cond_bank.values(), ctx.data.x]}
    for key in (earlier | theirs) & set(tracker.index):  # earlier tests' tensors (caches, fixtures) are not the run's
        tracker._relabel(tracker.records[tracker.index[key]], "host")
    with tracker:
        for phase in stage.method.phases():
            tracker.phase = ("", phase.name)
            trainer.run_phase(stage, phase, 0)
    return {p: v for (_, p), (v, _) in tracker.peaks.items()}


@pytest.mark.parametrize("shared", [True, False])
def test_plan_matches_a_measured_run_from_configs_alone(sd, tmp_path, shared):
    """The plan of a folder with no weights file gives each phase's peak of a real run within 2%."""
    import shutil

    pipe, root = sd
    cfg_only = tmp_path / "configs"
    shutil.copytree(pipe, cfg_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    measured = measured_peaks(config(sd, shared=shared), tmp_path / "run")
    cfg = config(sd, shared=shared)
    cfg.teacher = str(cfg_only)
    plan = plan_run(cfg, device="cpu")
    planned = {p.phase: p.peak for p in plan.phases}
    assert set(planned) == set(measured) == {"student", "critic"}
    for phase, v in measured.items():
        assert abs(planned[phase] / v - 1) < 0.02, (phase, planned[phase], v)
    assert plan.flops["student"]["forward"] > 0 and plan.flops["fake_score"]["backward"] > 0
    text = format_plan(plan)
    assert "peak:" in text and "fits" in text and "pass floor" in text


def test_plan_counts_the_multi_tensor_optimiser_step_of_cuda(sd, tmp_path):
    """On CUDA, AdamW steps all parameters at once (torch's default there) with a temporary the size of the
    trained parameters; a plan for CUDA counts it.  Full fine-tuning, batch 1, checkpointing: that step is each
    phase's peak; the plan with the multi-tensor step equals a real run that takes it, within 2%, and exceeds the
    plan without."""
    def full():
        cfg = config(sd, shared=False, batch_size=1)
        cfg.real.student_lora.rank = cfg.real.fake_lora.rank = 0
        cfg.real.grad_checkpointing = True
        return cfg

    measured = measured_peaks(full(), tmp_path / "run", foreach=True)
    plan = {p.phase: p.peak for p in plan_run(full(), device="cpu", foreach=True).phases}
    loop = {p.phase: p.peak for p in plan_run(full(), device="cpu").phases}
    assert set(measured) == set(plan) == {"student", "critic"}
    for phase, v in measured.items():
        assert abs(plan[phase] / v - 1) < 0.02, (phase, plan[phase], v)
        assert plan[phase] > 1.03 * loop[phase], (phase, plan[phase], loop[phase])


def test_plan_counts_the_stopped_feature_passes(sd, monkeypatch):
    """DMD2's GAN passes stop at the fake score's bottleneck: the plan's forward FLOPs of the fake score drop, and
    every network's backward FLOPs stay where they were (the stopped pass's graph is still the fake score's, not the
    GAN head's that reads its features)."""
    import dmdx.denoiser

    stopped = plan_run(config(sd), device="cpu")
    monkeypatch.setattr(dmdx.denoiser, "_sharded", lambda module: True)  # FeatureTap never stops
    whole = plan_run(config(sd), device="cpu")
    assert stopped.flops["fake_score"]["forward"] < 0.8 * whole.flops["fake_score"]["forward"]
    for name, f in whole.flops.items():
        assert stopped.flops[name]["backward"] == f["backward"], name
        assert stopped.flops[name]["calls"] == f["calls"], name
    assert stopped.flops["student"]["forward"] == whole.flops["student"]["forward"]


def test_plan_shards_with_fsdp(sd):
    one = plan_run(config(sd, shared=False, parallel="fsdp"), device="cpu")
    cfg = config(sd, shared=False, parallel="fsdp", batch_size=4)
    two = plan_run(cfg, gpus=2, device="cpu")
    assert two.gpus == 2 and two.parallel == "fsdp" and two.batch_per_rank == 2
    for p in two.phases:  # the breakdown is of the peak's own storages (FSDP frees and gathers between operations)
        assert p.weights + p.grads + p.optim + p.activations == p.peak
    w1 = {n.name: n for n in one.networks["dmd2"]}
    w2 = {n.name: n for n in two.networks["dmd2"]}
    for name in ("student", "fake_score"):  # full weights (LoRA base as buffers are not sharded) and LoRA shards
        assert w2[name].optim < 0.6 * w1[name].optim and w2[name].trainable == w1[name].trainable
    assert not dist.current().distributed  # the fake group is gone


def test_plan_is_the_same_in_a_fresh_process_and_after_other_plans(sd):
    """A plan is a function of its inputs, not of the plans run before it in the process.  The first time DTensor
    (FSDP2's parameters) meets an operator, it finds the output's shape by running the operator on fake arguments,
    and caches what it found: the plan must not count those tensors (it did, in the first FSDP plan of a process
    only).  DTensor's caches are cleared first, as in a fresh process."""
    from torch.distributed.tensor import DTensor

    def plan():
        cfg = config(sd, "adm", shared=False, parallel="fsdp", batch_size=4)
        out = plan_run(cfg, gpus=2).to_dict()  # a CUDA plan: AdamW's multi-tensor step on DTensors
        out.pop("seconds")
        return out

    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()
    type(propagator)._propagate_tensor_meta_cached.cache_clear()
    fresh = plan()
    assert plan() == fresh


def test_plan_moves_cpu_offloaded_shards_to_host_memory(sd):
    """train.cpu_offload (FSDP2's CPUOffloadPolicy): the sharded weights, their gradients and optimiser states leave
    every phase's GPU peak for host memory; the activations and the unsharded teacher stay on the GPU."""
    def plan(offload):
        cfg = config(sd, shared=False, parallel="fsdp", batch_size=4, cpu_offload=offload)
        cfg.real.student_lora.rank = cfg.real.fake_lora.rank = 0  # full fine-tuning: every weight sharded
        return plan_run(cfg, gpus=2, device="cpu")

    on, off = plan(True), plan(False)
    teacher = next(n for n in off.networks["dmd2"] if n.name == "teacher")
    assert [p.phase for p in on.phases] == [p.phase for p in off.phases] == ["student", "critic"]
    for a, b in zip(off.phases, on.phases):
        assert a.optim > 0 and a.grads > 0 and b.optim == b.grads == 0
        assert teacher.weights <= b.weights < a.weights and b.activations == a.activations
        # the same operations; at every one of them the offloaded states (there all phase long) are off the GPU
        assert b.peak <= a.peak - a.optim - (a.weights - b.weights)
    assert on.host - off.host >= sum(n.optim for n in off.networks["dmd2"] if not n.frozen)
    assert any("cpu_offload" in n for n in on.notes) and "offloaded shards" in format_plan(on)


def test_parse_memory():
    assert parse_memory("24GB") == parse_memory("24GiB") == parse_memory("24") == 24 * 2**30
    assert parse_memory("512MB") == 512 * 2**20
    with pytest.raises(ValueError, match="24GB"):
        parse_memory("lots")


def test_plan_command(sd, tmp_path, capsys):
    from dmdx.cli import main

    pipe, _ = sd
    out = tmp_path / "plan.json"
    code = main(["plan", "--method", "dmd2", "--teacher", str(pipe), "--set", "train.batch_size=2",
                 "--set", "real.student_lora.rank=4", "--memory", "1MB", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 1 and "does NOT fit" in text  # a tiny pipeline still needs more than 1 MB
    data = json.loads(out.read_text())
    assert data["fits"] is False and data["peak"] > 2**20 and data["method"] == "dmd2"
    assert main(["plan", "--method", "dmd2", "--teacher", str(Path(pipe).parent / "nope")]) == 2

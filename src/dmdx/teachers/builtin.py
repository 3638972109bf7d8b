"""Built-in teacher kinds: dmdx model folders (``dmdx teacher train``) and exact Gaussian mixtures (``gmm:NAME``).

Both distil into a copy of a dmdx network (an MLP for vectors, a UNet for images) on a built-in or named dataset
(``dmdx data list``).  An exact mixture has no network of its own, so its adapter first fits an MLP to the exact
denoiser (the *surrogate*, cached in RUN/surrogate): it initialises the student and the fake score and gives the
discriminators their features, while the exact denoiser stays the real score.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .adapter import EvalRequest, SampleRequest
from .common import run_pairs, student_times


class ModelFolderAdapter:
    """dmdx model folders: the built-in teachers and every student distilled from them (or from a mixture)."""

    name = "builtin"

    def matches(self, spec: str) -> bool:
        return True  # the last adapter asked: a missing folder gets read_info's error

    def owns(self, info) -> bool:
        return True

    def kind(self, spec: str) -> str | None:
        f = Path(spec).expanduser() / "model.json"
        try:
            shape = json.loads(f.read_text()).get("shape", []) if f.is_file() else None
        except json.JSONDecodeError:
            return None
        if shape is None:
            return None
        return "vector" if len(shape) == 1 else "image"

    def load_teacher(self, spec: str, device="cpu"):
        from ..models import load_folder

        return load_folder(spec, device)

    # -- the run ---------------------------------------------------------------------------------------------
    def teacher_net(self, teacher, cfg, run_dir: Path, dev):
        """The network behind the teacher that student, fake score and discriminator features copy."""
        return teacher.denoiser

    def build_run(self, cfg, run_dir: Path):
        """Teacher, dataset (the teacher's unless ``--data``), student, pairs and the pixel backbone; checked."""
        from ..data import load_dataset
        from ..methods import get_method
        from ..methods.base import Context, frozen_copy
        from ..models import ModelInfo, device_of
        from ..nets import backbone_spec

        method = get_method(cfg.method.name)
        dev = device_of(cfg.train.device)
        teacher = self.load_teacher(cfg.teacher, dev)
        tinfo = teacher.info
        method.check(cfg.method, tuple(tinfo.shape))
        data_name = cfg.data or tinfo.data
        ds = load_dataset(data_name, "train") if data_name else None
        if ds is not None and list(ds.shape) != list(tinfo.shape):
            raise ValueError(f"data {data_name!r} has samples of shape {list(ds.shape)} but the teacher expects "
                             f"{tinfo.shape}")
        times = student_times(cfg.student.times, teacher.denoiser.schedule)  # before a surrogate is fitted
        teacher_net = self.teacher_net(teacher, cfg, Path(run_dir), dev)
        torch.manual_seed(cfg.train.seed)
        student = frozen_copy(teacher_net, trainable=True).train()
        pairs = run_pairs(cfg, teacher, Path(run_dir), dev) if method.pairs_needed(cfg.method) else None
        pixel = None
        if ds is not None and ds.kind == "image" and method.uses_pixel_backbone:
            from ..eval import get_pixel_backbone

            pixel = get_pixel_backbone(data_name, progress=cfg.train.progress).to(dev)
        ctx = Context(teacher=teacher.denoiser, teacher_net=teacher_net, student=student, data=ds,
                      num_classes=tinfo.num_classes, shape=tuple(tinfo.shape), batch_size=cfg.train.batch_size,
                      device=dev, times=times, pairs=pairs, pixel_backbone=pixel, guidance=tinfo.guidance)
        info = ModelInfo(kind="student", backbone=backbone_spec(teacher_net.backbone),
                         schedule=teacher_net.schedule.to_dict(), prediction=teacher_net.prediction,
                         shape=list(tinfo.shape), num_classes=tinfo.num_classes, data=data_name, guidance=1.0,
                         steps=len(times), times=times, extra={"method": cfg.method.name, "teacher": cfg.teacher})
        return ctx, info

    # -- after distilling ------------------------------------------------------------------------------------
    def export(self, run: Path, out: Path, fmt: str = "diffusers") -> Path:
        raise ValueError(f"{run} is not a student distilled from a diffusers pipeline; nothing to export (a dmdx "
                         "model folder is itself the student: dmdx sample / eval --model RUN)")

    def hint(self, run: Path) -> str:
        return f"dmdx eval --model {run}"

    def sample(self, req: SampleRequest) -> str:
        import numpy as np

        from ..models import generate, load_model
        from ..viz import save_samples

        if req.prompts:
            raise ValueError("--prompts is for text-to-image and text-to-video (diffusers pipeline) models")
        out = Path(req.out)
        if out.suffix.lower() not in (".png", ".npz"):
            raise ValueError(f"--out must end in .png (grid / scatter) or .npz (raw samples), got {out.name!r}")
        m = load_model(req.model, req.device)
        s = generate(m, req.n, req.steps, seed=req.seed, guidance=req.guidance, solver=req.solver, device=req.device)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".npz":
            arrays = {"x": s.x.numpy()}
            if s.labels is not None:
                arrays["labels"] = s.labels.numpy()
            np.savez(out, **arrays)
        else:
            save_samples(s.x, out, title=f"{m.info.kind}, {s.nfe} NFE")
        return (f"{req.n} samples ({s.nfe} network evaluations each, {1000 * s.seconds_per_sample:.2f} ms/sample) "
                f"-> {out}")

    def evaluate(self, req: EvalRequest) -> list[dict]:
        from ..evaluate import evaluate
        from ..models import load_model

        if req.prompts or req.clip or req.pickscore or req.ref or req.lpips:
            raise ValueError("--prompts/--clip/--pickscore/--ref/--lpips are for text-to-image (diffusers pipeline) "
                             "models")
        m = load_model(req.model, req.device)
        return [{"model": req.model, **evaluate(m, req.steps, req.n, req.seed, req.guidance, req.device)}]


class AnalyticAdapter(ModelFolderAdapter):
    """``gmm:NAME``: an exact Gaussian-mixture teacher (``gmm:ring8``, ``gmm:unequal``, ... or ``gmm:FILE.json``)."""

    name = "analytic"

    def matches(self, spec: str) -> bool:
        return str(spec).startswith("gmm:")

    def owns(self, info) -> bool:
        return False  # its students are MLP model folders (ModelFolderAdapter)

    def kind(self, spec: str) -> str:
        return "gmm"

    def load_teacher(self, spec: str, device="cpu"):
        from ..models import gmm_model

        m = gmm_model(str(spec)[4:])
        m.denoiser.to(device)
        return m

    def teacher_net(self, teacher, cfg, run_dir: Path, dev):
        """The surrogate MLP (fitted once, cached in RUN/surrogate)."""
        from ..models import MODEL_WEIGHTS, ModelInfo, build_denoiser, load_weights, read_info, save_model
        from ..nets import backbone_spec

        folder = run_dir / "surrogate"
        if (folder / MODEL_WEIGHTS).is_file():
            den = build_denoiser(read_info(folder))
            den.backbone.load_state_dict(load_weights(folder / MODEL_WEIGHTS))
            return den.to(dev).requires_grad_(False).eval()
        den = fit_surrogate(teacher, cfg.surrogate_steps, seed=cfg.train.seed, progress=cfg.train.progress)
        save_model(folder, den, ModelInfo(kind="teacher", backbone=backbone_spec(den.backbone),
                                          schedule=den.schedule.to_dict(), prediction="x0", shape=teacher.info.shape))
        return den.to(dev)


def fit_surrogate(model, steps: int, batch_size: int = 512, seed: int = 0, progress: bool = True):
    """An MLP regressed onto an analytic teacher's exact x0 (the network that initialises student and fake score,
    and whose features the discriminators use: an analytic teacher has no network of its own)."""
    from ..denoiser import Denoiser
    from ..nets import default_backbone

    gmm = model.denoiser.backbone
    sched = model.denoiser.schedule
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        bb = default_backbone([gmm.dim])
    den = Denoiser(bb, sched, "x0")
    opt = torch.optim.AdamW(bb.parameters(), lr=1e-3, weight_decay=0.0)
    rng = range(steps)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc="fit MLP to the exact teacher", mininterval=1.0)
    for _ in rng:
        x0, _ = gmm.sample(batch_size, g)
        t = torch.rand(batch_size, generator=g, dtype=torch.float64)
        x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            target = model.denoiser(x_t, t)
        loss = torch.nn.functional.mse_loss(den(x_t, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return den.requires_grad_(False).eval()

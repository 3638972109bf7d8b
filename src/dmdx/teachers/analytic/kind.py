"""The analytic teacher kind: ``gmm:NAME``, an exact Gaussian mixture (``gmm:ring8``, ``gmm:unequal``, ... or
``gmm:FILE.json``; :mod:`dmdx.mixtures`) whose denoiser is exact for every schedule.

A mixture has no network of its own, so a run first fits an MLP to the exact denoiser (the *surrogate*, cached in
RUN/surrogate): it initialises the student and the fake score and gives the discriminators their features, while the
exact denoiser stays the real score.  The student is an MLP model folder (:mod:`dmdx.teachers.folder` owns it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...config import EvalRequest, SampleRequest
from ...denoiser import Denoiser
from ...evaluate import evaluate_request, sample_to_file
from ...mixtures import AnalyticDenoiser, GaussianMixture, mixture_spec
from ...models import MODEL_WEIGHTS, Model, ModelInfo, build_denoiser, device_of, load_weights, read_info, save_model
from ...nets import backbone_spec, default_backbone
from ...schedules import FlowMatching, make_schedule
from ...train.setup import builtin_run

def gmm_model(spec: str, schedule: dict | str | None = None) -> Model:
    """The exact teacher of mixture ``spec`` (a built-in name or a JSON file) on ``schedule`` (default: the spec's
    own, else flow), class-conditional when the spec groups its components into ``classes``, with the spec's
    ``guidance`` as its default CFG scale."""
    d = mixture_spec(spec)
    gmm = GaussianMixture(d["means"], d["weights"], d["std"], d.get("classes"))
    schedule = schedule or d.get("schedule")
    sched = make_schedule(schedule) if schedule else FlowMatching()
    den = AnalyticDenoiser(gmm, sched)
    info = ModelInfo(kind="teacher", backbone={"name": "gmm", "config": {"spec": spec}}, schedule=sched.to_dict(),
                     prediction="x0", shape=[gmm.dim], num_classes=gmm.num_classes if gmm.conditional else 0,
                     data=spec if spec in ("ring8", "grid25", "unequal") else f"gmm:{spec}",
                     guidance=float(d.get("guidance", 1.0)), solver="heun", steps=50)
    return Model(den, info, analytic=True)


NULL_LABEL_RATE = 0.1  # a class-conditional surrogate sees the null label this often (its unconditional half of CFG)


def fit_surrogate(model, steps: int, batch_size: int = 512, seed: int = 0, progress: bool = True):
    """An MLP regressed onto an analytic teacher's exact x0 (the network that initialises student and fake score,
    and whose features the discriminators use: an analytic teacher has no network of its own).  For a
    class-conditional teacher the MLP takes the labels, and the null label a tenth of the time (the exact
    unconditional x0 is its target there), so CFG works on it as on a trained teacher."""
    gmm = model.denoiser.backbone
    sched = model.denoiser.schedule
    C = model.info.num_classes
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        bb = default_backbone([gmm.dim], num_classes=C)
    den = Denoiser(bb, sched, "x0")
    opt = torch.optim.AdamW(bb.parameters(), lr=1e-3, weight_decay=0.0)
    rng = range(steps)
    if progress:
        rng = tqdm(rng, desc="fit MLP to the exact teacher", mininterval=1.0)
    for _ in rng:
        x0, comp = gmm.sample(batch_size, g)
        cond = None
        if C > 0:
            labels = gmm.classes[comp].clone()
            labels[torch.rand(batch_size, generator=g) < NULL_LABEL_RATE] = C
            cond = {"labels": labels}
        t = sched.training_time(torch.rand(batch_size, generator=g, dtype=torch.float64))
        x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            target = model.denoiser(x_t, t, cond)
        loss = torch.nn.functional.mse_loss(den(x_t, t, cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return den.requires_grad_(False).eval()


class AnalyticKind:
    """``gmm:NAME``: an exact Gaussian-mixture teacher."""

    name = "analytic"

    def matches(self, spec: str) -> bool:
        return str(spec).startswith("gmm:")

    def owns(self, info) -> bool:
        return False  # its students are MLP model folders (the model-folder kind)

    def recipe_kind(self, spec: str) -> str:
        return "gmm"

    def load_teacher(self, spec: str, device="cpu") -> Model:
        m = gmm_model(str(spec)[4:])
        m.denoiser.to(device)
        return m

    def surrogate(self, teacher: Model, cfg, run_dir: Path, dev) -> Denoiser:
        """The surrogate MLP (fitted once, cached in RUN/surrogate)."""
        folder = run_dir / "surrogate"
        if (folder / MODEL_WEIGHTS).is_file():
            den = build_denoiser(read_info(folder))
            den.backbone.load_state_dict(load_weights(folder / MODEL_WEIGHTS))
            return den.to(dev).requires_grad_(False).eval()
        den = fit_surrogate(teacher, cfg.surrogate_steps, seed=cfg.train.seed, progress=cfg.train.progress)
        save_model(folder, den, ModelInfo(kind="teacher", backbone=backbone_spec(den.backbone),
                                          schedule=den.schedule.to_dict(), prediction="x0", shape=teacher.info.shape))
        return den.to(dev)

    def build_run(self, cfg, run_dir: Path):
        """The exact teacher, its surrogate (after the cheap checks), then as for a built-in network."""
        dev = device_of(cfg.train.device)
        teacher = self.load_teacher(cfg.teacher, dev)
        return builtin_run(cfg, run_dir, teacher, lambda: self.surrogate(teacher, cfg, Path(run_dir), dev))

    def export(self, run: Path, out: Path, fmt: str = "diffusers") -> Path:
        raise ValueError(f"{run} is not a student distilled from a diffusers pipeline; nothing to export")

    def hint(self, run: Path) -> str:
        return f"dmdx eval --model {run}"

    def sample(self, req: SampleRequest) -> str:
        return sample_to_file(req, lambda: self.load_teacher(req.model, req.device))

    def evaluate(self, req: EvalRequest) -> list[dict]:
        return evaluate_request(req, lambda: self.load_teacher(req.model, req.device))

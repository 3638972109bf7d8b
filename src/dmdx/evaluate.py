"""Sample and evaluate a built-in teacher or student (a dmdx model folder or an exact mixture): draw samples, then
the metrics that fit its data (mixture coverage and weights, sliced Wasserstein, or image FD / class accuracy /
precision / recall, and FD / recall in a second, contrastive feature space); ``dmdx sample`` and ``dmdx eval`` of the built-in teacher kinds."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .config import EvalRequest, SampleRequest
from .data import load_dataset
from .eval import class_metrics, contrastive_metrics, image_metrics, mixture_metrics, sliced_wasserstein
from .models import Model, default_steps, generate
from .viz import save_samples


def evaluate(model: Model, steps: int | None = None, n: int = 2000, seed: int = 0, guidance: float | None = None,
             device="cpu", samples=None) -> dict:
    """Metrics of ``n`` samples drawn with ``steps`` steps; includes network evaluations and seconds per sample."""
    info = model.info
    steps = steps or default_steps(info)
    s = samples or generate(model, n, steps, seed=seed, guidance=guidance, device=device)
    row = {"kind": info.kind, "steps": steps, "nfe": s.nfe, "n": int(s.x.shape[0]),
           "ms_per_sample": 1000 * s.seconds_per_sample,
           "guidance": info.guidance if guidance is None else guidance}
    if len(info.shape) == 1:
        if not info.data:
            raise ValueError("this model records no dataset to compare against")
        ds = load_dataset(info.data, "test")
        if ds.mixture is not None and s.labels is not None and ds.mixture.conditional:
            row.update(class_metrics(s.x, s.labels, ds.mixture))  # each class against its own modes
        elif ds.mixture is not None:
            m = mixture_metrics(s.x, ds.mixture)
            row.update({k: v for k, v in m.items()})
        else:
            row["sw"] = sliced_wasserstein(s.x, ds.x)
    else:
        row.update(image_metrics(s.x, s.labels, info.data))
        row.update(contrastive_metrics(s.x, info.data))  # the second judge (dmdx.eval.contrastive)
    return row


def sample_to_file(req: SampleRequest, load: Callable[[], Model]) -> str:
    """``dmdx sample`` of a built-in model (``load()``, after the request is checked): a PNG grid / scatter plot or an
    NPZ of raw samples; returns the line to print."""
    if req.prompts:
        raise ValueError("--prompts is for text-to-image and text-to-video (diffusers pipeline) models")
    out = Path(req.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise ValueError(f"--out must end in .png (grid / scatter) or .npz (raw samples), got {out.name!r}")
    model = load()
    s = generate(model, req.n, req.steps, seed=req.seed, guidance=req.guidance, solver=req.solver, device=req.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npz":
        arrays = {"x": s.x.numpy()}
        if s.labels is not None:
            arrays["labels"] = s.labels.numpy()
        np.savez(out, **arrays)
    else:
        save_samples(s.x, out, title=f"{model.info.kind}, {s.nfe} NFE")
    return (f"{req.n} samples ({s.nfe} network evaluations each, {1000 * s.seconds_per_sample:.2f} ms/sample) "
            f"-> {out}")


def evaluate_request(req: EvalRequest, load: Callable[[], Model]) -> list[dict]:
    """``dmdx eval`` of a built-in model (``load()``, after the request is checked): one metric row."""
    if req.prompts or req.clip or req.pickscore or req.ref or req.lpips:
        raise ValueError("--prompts/--clip/--pickscore/--ref/--lpips are for text-to-image (diffusers pipeline) "
                         "models")
    return [{"model": req.model, **evaluate(load(), req.steps, req.n, req.seed, req.guidance, req.device)}]

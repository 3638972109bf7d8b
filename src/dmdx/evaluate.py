"""Evaluate any teacher or student: sample, then the metrics that fit its data (mixture or image metrics)."""

from __future__ import annotations

from .models import Model, default_steps, generate


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
        from .data import load_dataset
        from .eval import mixture_metrics, sliced_wasserstein

        if not info.data:
            raise ValueError("this model records no dataset to compare against")
        ds = load_dataset(info.data, "test")
        if ds.mixture is not None:
            m = mixture_metrics(s.x, ds.mixture)
            row.update({k: v for k, v in m.items()})
        else:
            row["sw"] = sliced_wasserstein(s.x, ds.x)
    else:
        from .eval import image_metrics

        row.update(image_metrics(s.x, s.labels, info.data))
    return row

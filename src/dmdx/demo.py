"""``dmdx demo``: a digits teacher, a one-step DMDX student, and the comparison table, grid and plot.

Every stage is resumable: running the demo again with the same ``--out`` reuses what is finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import apply_overrides, save_json, to_dict
from .evaluate import evaluate
from .models import generate
from .recipes import format_settings
from .teachers import apply_recipe, build_run, load_model, teacher_kind
from .train.loop import Trainer
from .train.run import TeacherConfig, default_run_config, load_run_config, train_teacher
from .viz import format_table, image_grid

# The shipped digits teacher was made by (see docs/demo.md):
#   dmdx teacher train --data digits --out teacher_digits --steps 3000   (then copy model.json + model.safetensors)
SHIPPED = {"digits": "teacher_digits"}


@dataclass
class DemoBudget:
    teacher_steps: int
    distill_steps: int
    batch_size: int
    pairs: int
    pair_steps: int = 25
    surrogate_steps: int = 1500


BUDGETS = {
    "full": DemoBudget(teacher_steps=3000, distill_steps=600, batch_size=64, pairs=500),
    "small": DemoBudget(teacher_steps=60, distill_steps=8, batch_size=16, pairs=64, pair_steps=4),
}


# The config keys the demo's budget sets (a recipe does not override them).
BUDGET_KEYS = ("train.steps", "train.batch_size", "train.ckpt_every", "train.sample_every", "pairs.n", "pairs.steps",
               "surrogate_steps")


def shipped_teacher(data: str) -> Path | None:
    name = SHIPPED.get(data)
    if name is None:
        return None
    path = Path(str(resources.files("dmdx") / "assets" / name))
    return path if (path / "model.json").is_file() else None


def _log(msg: str) -> None:
    print(f"[dmdx demo] {msg}", flush=True)


def get_teacher(data: str, out: Path, budget: DemoBudget, teacher: str | None, small: bool, progress: bool) -> str:
    if teacher:
        return teacher
    shipped = None if small else shipped_teacher(data)
    if shipped is not None:
        _log(f"using the teacher shipped with dmdx: {shipped}")
        return str(shipped)
    folder = out / "teacher"
    if (folder / "model.json").is_file() and not (folder / "checkpoints").is_dir():
        return str(folder)
    cfg = TeacherConfig(data=data)
    cfg.train.steps = budget.teacher_steps
    cfg.train.batch_size = budget.batch_size
    cfg.train.progress = progress
    cfg.train.sample_every = 0
    cfg.train.ckpt_every = max(budget.teacher_steps // 4, 1)
    resume = (folder / "checkpoints").is_dir()
    _log(f"training a teacher on {data} ({budget.teacher_steps} steps) in {folder}")
    train_teacher(cfg, folder, resume=resume)
    return str(folder)


def run_demo(data: str = "digits", method: str = "dmdx", out: Path = Path("dmdx-demo"), steps: int | None = None,
             teacher: str | None = None, n: int = 1000, small: bool = False, progress: bool = True,
             overrides: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = BUDGETS["small" if small else "full"]
    teacher_path = get_teacher(data, out, budget, teacher, small, progress)

    run_dir = out / "student"
    resume = (run_dir / "config.json").is_file()
    cfg = load_run_config(run_dir) if resume else default_run_config(method)
    if not resume:
        cfg.teacher, cfg.data = teacher_path, data
        cfg.train.steps = steps or budget.distill_steps
        cfg.train.batch_size = budget.batch_size
        cfg.train.ckpt_every = max(cfg.train.steps // 4, 1)
        cfg.train.sample_every = 0
        cfg.pairs.n = budget.pairs
        cfg.pairs.steps = budget.pair_steps
        cfg.surrogate_steps = budget.surrogate_steps
        apply_overrides(cfg, list(overrides or []))
        # The method's defaults for this teacher kind, as ``dmdx distill`` resolves them; the demo's budget counts
        # as set by the user, and so does every ``--set``.
        user_keys = set(BUDGET_KEYS) | {item.split("=", 1)[0].strip() for item in overrides or []}
        applied = apply_recipe(cfg, user_keys)
        _log(format_settings(teacher_kind(cfg.teacher), cfg.method.name, applied))
    cfg.train.progress = progress
    done = (run_dir / "model.json").is_file() and _finished(run_dir, cfg.train.steps)
    t0 = time.perf_counter()
    if not done:
        _log(f"distilling a one-step student with {cfg.method.name} ({cfg.train.steps} iterations) in {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(to_dict(cfg), run_dir / "config.json")
        ctx, info = build_run(cfg, run_dir)
        Trainer(run_dir, cfg.method, cfg.train, ctx, info).run(resume=resume)
    train_seconds = time.perf_counter() - t0

    _log("evaluating: Frechet distance and recall in two feature spaces, the evaluation classifier's (fd, recall) "
         "and an independent contrastive encoder's (fd_contrastive, recall_contrastive), both trained on the same data")
    t_model = load_model(teacher_path)
    s_model = load_model(run_dir)
    n_eval = n if not small else min(n, 100)
    rows = []
    teacher_steps = (1, 4, 50) if not small else (1, 4)
    for k in teacher_steps:
        rows.append({"model": f"teacher {k} step{'s' if k > 1 else ''}", **evaluate(t_model, k, n_eval)})
    rows.append({"model": f"student ({cfg.method.name}) 1 step", **evaluate(s_model, 1, n_eval)})
    ref_ms = rows[len(teacher_steps) - 1]["ms_per_sample"]
    for r in rows:
        r["speedup"] = ref_ms / max(r["ms_per_sample"], 1e-9)
    cols = ["model", "nfe", "fd", "fd_contrastive", "class_acc", "recall", "recall_contrastive", "ms_per_sample",
            "speedup"]
    table = format_table(rows, [c for c in cols if c in rows[0]])
    print(table)

    _side_by_side(t_model, s_model, out / "teacher_vs_student.png", steps=teacher_steps[-1])
    _plot(rows, out / "quality_vs_nfe.png")
    result = {"data": data, "method": cfg.method.name, "teacher": teacher_path, "student": str(run_dir),
              "distill_iterations": cfg.train.steps, "distill_seconds": train_seconds,
              "total_seconds": time.perf_counter() - t_start, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text("```\n" + table + "\n```\n")
    _log(f"wrote {out / 'results.json'}, {out / 'teacher_vs_student.png'} and {out / 'quality_vs_nfe.png'} "
         f"({result['total_seconds']:.0f} s in all)")
    return result


def _finished(run_dir: Path, steps: int) -> bool:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return False
    lines = log.read_text().strip().splitlines()
    return bool(lines) and json.loads(lines[-1]).get("step", 0) >= steps


def _side_by_side(t_model, s_model, path: Path, steps: int) -> None:
    """Teacher at ``steps`` steps (left) next to the one-step student (right), same classes, 10 per class."""
    if len(t_model.info.shape) != 3:
        return
    k = max(t_model.info.num_classes, 1)
    labels = torch.arange(k).repeat_interleave(8) if t_model.info.num_classes else None
    n = 8 * k
    a = generate(t_model, n, steps, seed=1, labels=labels).x
    b = generate(s_model, n, 1, seed=1, labels=labels).x
    ga, gb = image_grid(a, nrow=8), image_grid(b, nrow=8)
    gap = np.full((ga.shape[0], 6, 3), 255, np.uint8)
    img = Image.fromarray(np.concatenate([ga, gap, gb], axis=1))
    img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    img.save(path)


def _plot(rows: list[dict], path: Path) -> None:
    """Quality against network evaluations: one panel per feature space (both FDs) or the sliced Wasserstein."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"fd": "FD, evaluation classifier", "fd_contrastive": "FD, contrastive encoder", "sw": "sliced Wasserstein"}
    keys = [k for k in ("fd", "fd_contrastive") if k in rows[0]] or ["sw"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), dpi=100, squeeze=False)
    teach = [r for r in rows if r["model"].startswith("teacher")]
    for ax, key in zip(axes[0], keys):
        ax.plot([r["nfe"] for r in teach], [r[key] for r in teach], "o-", label="teacher")
        for r in rows:
            if not r["model"].startswith("teacher"):
                ax.plot([r["nfe"]], [r[key]], "r*", markersize=12, label=r["model"])
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample")
        ax.set_ylabel(f"{labels[key]} (lower is better)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

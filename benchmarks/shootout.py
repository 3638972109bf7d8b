"""The shoot-out: every distribution-matching method at its defaults, one-step, same iterations, on ground truth.

    python benchmarks/shootout.py [--only dmd2 sid ...] [--data ring8 digits ...] [--seeds 0 1 2] [--iters N]
                                  [--out runs/shootout] [--write-md]

Protocol (benchmarks/shootout.md): each method (dmd, dmd2, adm, dmdx, sid, vsd, gdd) is run through
``dmdx distill`` exactly as a user runs it (the method's defaults and the teacher kind's recipe; one-step student),
with the same iterations and batch per dataset, for each training seed (``train.seed``).  Only the budget and the
bookkeeping are set: ``train.steps``, ``train.batch_size``, ``train.seed``, EMA snapshots every ``iters / 5``,
no sample grids, no health signals (they cost network passes that are not the method's).

- exact mixtures (``gmm:ring8``, ``gmm:unequal``, ``gmm:scatter7``, ``gmm:classes3``): modes covered, largest
  weight error, quality and sliced Wasserstein of ``--n`` one-step samples (``dmdx.evaluate``, as ``dmdx eval``;
  class by class for the class-conditional classes3), against the exact teacher at 50 Heun steps;
- ``digits`` (the shipped teacher) and ``mnist16`` (a teacher trained here first if ``--mnist16-teacher`` has none,
  with the command of benchmarks/RESULTS.md): FD, recall and class accuracy of the evaluation classifier (test
  split), and FD and recall in the independent contrastive encoder's space, beside the teacher's at 50 steps;
- cost: training seconds per iteration (wall-clock; CPU seconds too for a run done in one call), set-up seconds
  (teacher pairs, for the methods that need them; a mixture's surrogate MLP is fitted once, seed 0, and shared by
  every method and seed), and network forward passes per iteration in batch units (every call of a network or exact
  denoiser during training, counted by wrapping ``Denoiser.predict`` and the exact mixture's denoiser; a CFG call
  counts twice; backward passes are not counted).

Every run happens in this one process (one import of torch, not one per run); a run whose ``result.json`` exists is
skipped (a run that failed, e.g. on a non-finite loss, is recorded as failed), a killed one resumes from its last
checkpoint.  Writes ``OUT/results.json``, ``OUT/table.md`` and ``OUT/shootout.png`` (coverage and largest weight
error, FD for images, against training CPU seconds); ``--write-md`` also puts the table into benchmarks/shootout.md
between its ``<!-- table -->`` markers and the figure into benchmarks/shootout.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dmd", "dmd2", "adm", "dmdx", "sid", "vsd", "gdd")
MIXTURES = ("ring8", "unequal", "scatter7", "classes3")
IMAGES = ("digits", "mnist16")
DIGITS_TEACHER = ROOT / "src" / "dmdx" / "assets" / "teacher_digits"
DEFAULT_ITERS = {"mixture": 300, "image": 300}  # what fits ~50 min on a shared 2-core machine (shootout.md)
DEFAULT_BATCH = {"mixture": 256, "image": 64}
SNAPSHOTS = 5  # EMA snapshots per run (the curves)
MNIST16_TEACHER_CMD = ["teacher", "train", "--data", "mnist16", "--steps", "2000", "--set", "train.batch_size=64",
                       "--quiet"]


def kind_of(data: str) -> str:
    return "mixture" if data in MIXTURES else "image"


# -- one training run, in this process ----------------------------------------------------------------------------
COUNTS = {"samples": 0, "calls": 0}
MARKS: dict = {}


def install_counters() -> None:
    """Count network passes (every network denoiser's pass goes through ``Denoiser.predict``; the exact mixture's
    closed form through ``AnalyticDenoiser._x0``) and mark the loop's start and end.  Once per process."""
    from dmdx.denoiser import Denoiser
    from dmdx.mixtures import AnalyticDenoiser
    from dmdx.train import loop

    if getattr(loop.Trainer.run, "_shootout", False):
        return

    def counting(fn):
        def wrapped(self, x_t, *a, **k):
            COUNTS["samples"] += int(x_t.shape[0])
            COUNTS["calls"] += 1
            return fn(self, x_t, *a, **k)

        return wrapped

    Denoiser.predict = counting(Denoiser.predict)
    AnalyticDenoiser._x0 = counting(AnalyticDenoiser._x0)
    run = loop.Trainer.run

    def timed_run(self, *a, **k):
        MARKS["start"] = dict(COUNTS, time=time.perf_counter(), cpu=time.process_time(),
                              step=_resume_step(self.run_dir))
        try:
            return run(self, *a, **k)
        finally:
            MARKS["end"] = dict(COUNTS, time=time.perf_counter(), cpu=time.process_time())

    timed_run._shootout = True
    loop.Trainer.run = timed_run


def child(argv: list[str], out_json: Path) -> None:
    """Run ``dmdx ARGV`` (a distill command) in this process, counting network passes; write seconds and passes.
    (Run in-process rather than in a fresh interpreter: importing torch once per run costs more than a short run.)"""
    from dmdx.cli import main

    install_counters()
    MARKS.clear()
    c0, t0 = dict(COUNTS), time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"dmdx {' '.join(argv)} returned {rc}")
    total = time.perf_counter() - t0
    s, e = MARKS["start"], MARKS["end"]
    run_dir = Path(argv[argv.index("--out") + 1])
    cfg = json.loads((run_dir / "config.json").read_text())
    iters = cfg["train"]["steps"] - s["step"]
    batch = cfg["train"]["batch_size"]
    out = {"train_s": e["time"] - s["time"], "setup_s": total - (e["time"] - s["time"]), "iters": iters,
           "train_cpu_s": e["cpu"] - s["cpu"],
           "passes_per_iter": (e["samples"] - s["samples"]) / max(iters, 1) / batch,
           "setup_passes": (s["samples"] - c0["samples"]) / batch, "resumed_from": s["step"]}
    out["s_per_iter"] = out["train_s"] / max(iters, 1)
    out_json.write_text(json.dumps(out, indent=2))


def _resume_step(run_dir: Path) -> int:
    from dmdx.train.checkpoint import latest_checkpoint

    ck = latest_checkpoint(run_dir)
    return 0 if ck is None else int(ck["step"])


def train(data: str, teacher: str, method: str, seed: int, iters: int, batch: int, run_dir: Path,
          sets: list[str]) -> dict:
    """One run (resumed if it was killed); returns its cost record (training seconds add up over resumptions)."""
    argv = ["distill", "--method", method, "--teacher", teacher, "--out", str(run_dir), "--steps", str(iters),
            "--quiet", "--set", f"train.batch_size={batch}", "--set", f"train.seed={seed}",
            "--set", "train.sample_every=0", "--set", "train.health_n=0", "--set", "train.health_every=0",
            "--set", f"train.snapshot_every={max(iters // SNAPSHOTS, 1)}",
            "--set", f"train.ckpt_every={max(iters // 4, 1)}", "--set", f"train.log_every={max(iters // 20, 1)}",
            "--set", "student.times=[1.0]"]
    for kv in sets:
        argv += ["--set", kv]
    if (run_dir / "checkpoints").is_dir():
        argv.append("--resume")
    part = run_dir.parent / f"{run_dir.name}.cost{len(list(run_dir.parent.glob(run_dir.name + '.cost*')))}.json"
    print(f"+ [{data} {method} seed {seed}] dmdx " + " ".join(argv), flush=True)
    child(argv, part)
    parts = [json.loads(p.read_text()) for p in sorted(run_dir.parent.glob(run_dir.name + ".cost*.json"))]
    seconds = log_seconds(run_dir)
    done = sum(p["iters"] for p in parts)  # iterations the finished calls trained (a killed call left no record)
    cost = {"train_s": seconds[max(seconds)], "setup_s": sum(p["setup_s"] for p in parts),
            "train_cpu_s": parts[0]["train_cpu_s"] if len(parts) == 1 and done == max(seconds) else None,
            "iters": max(seconds), "setup_passes": sum(p["setup_passes"] for p in parts),
            "passes_per_iter": sum(p["passes_per_iter"] * p["iters"] for p in parts) / max(done, 1)}
    cost["s_per_iter"] = cost["train_s"] / max(cost["iters"], 1)
    return cost


def log_seconds(run_dir: Path) -> dict[int, float]:
    """Training seconds at each logged step (log.jsonl's ``time``, which restarts at a resumption: the seconds
    before it are added; the work a killed call did after its last checkpoint is not counted)."""
    times, offset, last = {}, 0.0, 0.0
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        t = row.get("time", 0.0)
        if t < last:  # resumed: the clock restarted
            offset += last
        last = t
        times[row["step"]] = offset + t
    return times


# -- evaluation (in this process) ----------------------------------------------------------------------------------
def metrics(model_path, steps: int | None, n: int) -> dict:
    from dmdx.evaluate import evaluate
    from dmdx.teachers import load_model

    return evaluate(load_model(model_path), steps, n, seed=0)


def curve(run_dir: Path, n: int) -> list[dict]:
    """Metrics of each EMA snapshot against the training seconds at its step (``log_seconds``)."""
    times = log_seconds(run_dir)
    pts = []
    for snap in sorted((run_dir / "snapshots").glob("step_*")):
        step = int(snap.name.split("_")[1])
        cache = snap / "metrics.json"
        m = json.loads(cache.read_text()) if cache.is_file() else metrics(snap, None, n)
        cache.write_text(json.dumps(m))
        near = min(times, key=lambda s: abs(s - step)) if times else None
        pts.append({"step": step, "seconds": times.get(step, times.get(near)), **m})
    return pts


def teacher_row(data: str, teacher: str, n: int, out: Path) -> dict:
    path = out / data / "teacher_50.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics(teacher, 50, n)))
    return json.loads(path.read_text())


def ensure_mnist16_teacher(path: Path) -> None:
    if (path / "model.json").is_file():
        return
    print(f"+ dmdx {' '.join(MNIST16_TEACHER_CMD)} --out {path}  (about 20 min on a shared 2-core CPU)", flush=True)
    resume = ["--resume"] if (path / "checkpoints").is_dir() else []
    subprocess.run([sys.executable, "-m", "dmdx.cli", *MNIST16_TEACHER_CMD, "--out", str(path), *resume], check=True,
                   cwd=ROOT)


def shared_surrogate(data: str, out: Path, run_dir: Path) -> None:
    """Fit a mixture's surrogate MLP once (seed 0; ``dmdx distill`` caches it in RUN/surrogate) and share it between
    methods and training seeds: it is the teacher's set-up, not part of a method's cost.  (The training seed still
    sets the student's noise, the fake score's and critics' training and the teacher pairs.)"""
    from dmdx.config import TrainConfig
    from dmdx.teachers.analytic import KIND
    from dmdx.train.run import default_run_config

    cache = out / data / "surrogate"
    if not (cache / "model.json").is_file():
        cfg = default_run_config("dmd2")
        cfg.teacher, cfg.train = f"gmm:{data}", TrainConfig(seed=0, progress=False)
        tmp = out / data / ".surrogate"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        KIND.surrogate(KIND.load_teacher(cfg.teacher), cfg, tmp, "cpu")
        shutil.rmtree(cache, ignore_errors=True)
        (tmp / "surrogate").rename(cache)
        shutil.rmtree(tmp)
    if not (run_dir / "surrogate").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(cache, run_dir / "surrogate")


# -- tables and figure ---------------------------------------------------------------------------------------------
MIX_COLS = [("modes_covered", "modes"), ("max_weight_error", "max w err"), ("quality", "quality"), ("sw", "SW")]
IMG_COLS = [("fd", "FD"), ("recall", "recall"), ("class_acc", "class acc"), ("fd_contrastive", "FD contrastive"),
            ("recall_contrastive", "recall contrastive")]
COST_COLS = [("s_per_iter", "s / iter"), ("passes_per_iter", "passes / iter"), ("train_s", "train s"),
             ("train_cpu_s", "train CPU s"), ("setup_s", "set-up s")]


def _stat(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return ""
    m = statistics.mean(vals)
    f = (lambda v: f"{v:.3f}") if abs(m) < 100 else (lambda v: f"{v:.0f}")
    return f(m) if len(vals) == 1 else f"{f(m)} +- {f(statistics.stdev(vals))}"


def table(results: dict) -> str:
    lines = []
    for data, rows in results.items():
        cols = MIX_COLS if kind_of(data) == "mixture" else IMG_COLS
        if "off_class" in rows["teacher"]:  # class-conditional mixture: samples near another class's modes
            cols = [*cols, ("off_class", "off-class")]
        head = ["method", "seeds", *(c[1] for c in cols), *(c[1] for c in COST_COLS)]
        lines += [f"\n**{data}** (one-step students, {rows['iters']} iterations, batch {rows['batch']}; mean +- sd "
                  "over training seeds)\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        t = rows["teacher"]
        lines.append("| teacher, 50 Heun steps | | " + " | ".join(_stat([t.get(c)]) for c, _ in cols)
                     + " |" + " |" * len(COST_COLS))
        for method, runs in rows["methods"].items():
            cells = [_stat([r["final"].get(c) for r in runs]) for c, _ in cols]
            cells += [_stat([r["cost"].get(c) for r in runs]) for c, _ in COST_COLS]
            failed = sum("failed" in r for r in runs)
            seeds = f"{len(runs) - failed} (+{failed} failed)" if failed else str(len(runs))
            lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(results: dict) -> str:
    """The one table: per method, each mixture's modes covered and largest weight error (means over seeds), the
    image sets' FD, and the cost (CPU seconds and network passes per iteration, means over every run)."""
    datas = list(results)
    methods = list(dict.fromkeys(m for rows in results.values() for m in rows["methods"]))
    head = ["method", *(f"{d}: {'modes, max w err' if kind_of(d) == 'mixture' else 'FD'}" for d in datas),
            "CPU s / iter", "passes / iter"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(rows, runs):
        ok = [r for r in runs if "failed" not in r]
        if not runs:
            return ""
        if kind_of(rows) == "mixture":
            modes = statistics.mean(r["final"]["modes_covered"] for r in ok) if ok else None
            err = statistics.mean(r["final"]["max_weight_error"] for r in ok) if ok else None
            text = "" if modes is None else f"{modes:.1f} / {results[rows]['teacher']['modes_covered']}, {err:.3f}"
        else:
            text = _stat([r["final"].get("fd") for r in ok])
        n_failed = len(runs) - len(ok)
        return f"{text} ({len(ok)} seed{'s' if len(ok) != 1 else ''}{f', {n_failed} failed' if n_failed else ''})"

    t = ["teacher, 50 Heun steps"]
    for d in datas:
        tr = results[d]["teacher"]
        t.append(f"{tr['modes_covered']} / {tr['modes_covered']}, {tr['max_weight_error']:.3f}" if kind_of(d) ==
                 "mixture" else _stat([tr.get("fd")]))
    lines.append("| " + " | ".join(t) + " | | |")
    for m in methods:
        every = [r for rows in results.values() for r in rows["methods"].get(m, []) if "failed" not in r]
        cpu = [r["cost"]["train_cpu_s"] / r["cost"]["iters"] for r in every if r["cost"].get("train_cpu_s")]
        cells = [cell(d, results[d]["methods"].get(m, [])) for d in datas]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_stat(cpu)} | "
                     f"{_stat([r['cost']['passes_per_iter'] for r in every])} |")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for data, rows in results.items():
        if kind_of(data) == "mixture":
            panels += [(data, "modes_covered", "modes covered"), (data, "max_weight_error", "largest weight error")]
        else:
            panels.append((data, "fd", "FD"))
    if not panels:
        return
    ncol = min(len(panels), 4)
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (data, key, label) in zip(axes.flat, panels):
        rows = results[data]
        for method, runs in rows["methods"].items():
            ok = [r for r in runs if r["curve"] and r["cost"].get("train_cpu_s")]
            if not ok:
                continue
            curves = [r["curve"] for r in ok]
            k = min(len(c) for c in curves)
            # CPU seconds (the step times the run's CPU seconds per iteration): wall-clock on a shared machine
            # depends on its load, CPU time much less
            xs = [statistics.mean(c[i]["step"] * r["cost"]["train_cpu_s"] / r["cost"]["iters"]
                                  for c, r in zip(curves, ok)) for i in range(k)]
            ys = [statistics.mean(c[i][key] for c in curves) for i in range(k)]
            ax.plot(xs, ys, marker="o", ms=3, label=method, color=colours.get(method))
        ref = rows["teacher"].get(key)
        if ref is not None:
            ax.axhline(ref, color="k", ls=":", lw=1, label="teacher (50 steps)")
        if key in ("max_weight_error", "fd"):
            ax.set_yscale("log")
        ax.set_title(f"{data}: {label}", fontsize=9)
        ax.set_xlabel("training CPU seconds", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_md(text: str, md: Path) -> None:
    doc = md.read_text()
    a, b = "<!-- table -->", "<!-- /table -->"
    if a not in doc or b not in doc:
        raise SystemExit(f"{md} has no {a} ... {b} markers")
    md.write_text(doc[: doc.index(a) + len(a)] + "\n" + text + doc[doc.index(b):])


# -- the protocol --------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=list(METHODS), choices=METHODS, help="methods to run")
    ap.add_argument("--data", nargs="*", default=[*MIXTURES, *IMAGES], choices=[*MIXTURES, *IMAGES])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="training seeds (train.seed)")
    ap.add_argument("--iters", type=int, help="iterations of every run (default: 300)")
    ap.add_argument("--batch", type=int, help="batch of every run (default: 256 mixtures, 64 images)")
    ap.add_argument("--n", type=int, default=2000, help="samples per evaluation (default 2000)")
    ap.add_argument("--out", default="runs/shootout")
    ap.add_argument("--mnist16-teacher", default="runs/teacher-mnist16")
    ap.add_argument("--set", nargs="*", default=[], dest="sets", help="extra --set k=v for every run (not the "
                    "protocol: for a quick look only)")
    ap.add_argument("--write-md", action="store_true", help="put the table into benchmarks/shootout.md")
    ap.add_argument("--report", action="store_true", help="train nothing: tabulate the finished runs only (a "
                    "cell's seed count says how many there are)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    t_start = time.perf_counter()
    for data in args.data:
        kind = kind_of(data)
        iters = args.iters or DEFAULT_ITERS[kind]
        batch = args.batch or DEFAULT_BATCH[kind]
        if data in MIXTURES:
            teacher = f"gmm:{data}"
        elif data == "digits":
            teacher = str(DIGITS_TEACHER)
        else:
            teacher = str(Path(args.mnist16_teacher).resolve())
            ensure_mnist16_teacher(Path(teacher))
        if kind == "image":  # trained once per dataset and cached (DMDX_HOME): not a method's cost
            from dmdx.eval import get_pixel_backbone
            from dmdx.eval.images import get_classifier

            get_pixel_backbone(data)
            get_classifier(data)
        rows = {"iters": iters, "batch": batch, "teacher": teacher_row(data, teacher, args.n, out), "methods": {}}
        for method in args.only:
            runs = []
            for seed in args.seeds:
                run_dir = out / data / method / f"seed{seed}"
                done = run_dir / "result.json"
                if done.is_file():
                    r = json.loads(done.read_text())
                    if r["iters"] == iters and r["batch"] == batch:
                        runs.append(r)
                        continue
                    raise SystemExit(f"{run_dir} holds a run of {r['iters']} iterations, batch {r['batch']}; "
                                     f"not {iters} / {batch}: choose another --out")
                if args.report:
                    continue
                if kind == "mixture":
                    shared_surrogate(data, out, run_dir)
                r = {"data": data, "method": method, "seed": seed, "iters": iters, "batch": batch}
                try:
                    r["cost"] = train(data, teacher, method, seed, iters, batch, run_dir, args.sets)
                    r.update(final=metrics(run_dir, 1, args.n), curve=curve(run_dir, min(args.n, 1000)))
                except Exception as e:  # a run that stops (a non-finite loss, ...) is a result: recorded, not retried
                    print(f"! [{data} {method} seed {seed}] failed: {e}", flush=True)
                    r.update(failed=f"{type(e).__name__}: {e}", cost={}, final={}, curve=[])
                done.write_text(json.dumps(r, indent=2))
                runs.append(r)
            if runs:
                rows["methods"][method] = runs
        results[data] = rows
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = summary(results) + table(results)
    (out / "table.md").write_text(text)
    figure(results, out / "shootout.png")
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'shootout.png'} "
          f"({time.perf_counter() - t_start:.0f} s this call)")
    if args.write_md:
        write_md(text, ROOT / "benchmarks" / "shootout.md")
        if (out / "shootout.png").is_file():
            shutil.copy(out / "shootout.png", ROOT / "benchmarks" / "shootout.png")


if __name__ == "__main__":
    main()

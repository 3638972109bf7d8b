"""Training-health signals: what a run logs about itself besides its losses, and ``dmdx inspect RUN``.

At every log step of a distillation run (``train.log_every``), :class:`Health` adds to the log row:

- ``health/diversity``: mean pairwise L2 distance of ``n`` student samples drawn from fixed noise (and fixed labels
  ``0, 1, ..., C-1, 0, ...`` for class-conditional models); ``health/class_spread``: the same distance within each
  class, averaged over classes (a class-conditional student that collapses to one image per class keeps a high
  overall diversity, not a high spread).  Each comes with ``..._ratio``: the student's value over the teacher's on
  the same noise and labels (the teacher sampled once with ``REF_STEPS`` Heun steps and its default guidance,
  cached in ``RUN/health_ref.json``);
- ``health/fake_lag`` (methods with a fake score, see ``Method.diagnostics``): the fake score's x0 denoising error
  on these student samples over the teacher's error on the same noised samples (``methods.base.fake_score_lag``);
- every ``train.health_every`` steps, a small-sample quality figure on built-in data: mixture coverage and weight
  error (``health/modes_covered``, ``health/max_weight_error``, ``health/in_mode``: the fraction within 3 std of a
  mode, ``health/sw``) for vector mixtures, and Frechet
  distance and class accuracy of the evaluation classifier's features (``health/fd``, ``health/class_acc``) for
  labelled image sets; ``health_ref.json`` holds the figure of as many real samples (vector data) or the
  teacher's figure on the same noise and labels (images);
- ``health/alarm``, a message, on the row where the diversity ratio (the class spread's when the model is
  class-conditional) first falls below ``train.health_alarm`` (collapse), and where it recovers above 1.5 times
  that; the progress bar prints the same line.

The critics' accuracy and margin (``critic/*``) come from the methods' own critic updates
(``methods.base.critic_logs``), the DM gradient norm (``dm/grad_norm``) from DMD / DMD2.  Everything here runs
under ``no_grad``, with the networks in eval mode, and draws its noise from its own generators inside
``fork_rng``: a run with these signals trains bit-identically to one without them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import DATASETS, load_dataset
from ..eval.images import _batched, frechet_distance, get_classifier
from ..eval.vectors import class_metrics, mixture_metrics, sliced_wasserstein
from ..methods.base import Context, Method
from ..sampling import sample_ode, student_sample

Tensor = torch.Tensor

REF_FILE = "health_ref.json"
PLOT_FILE = "health.png"
REF_STEPS = 10  # the teacher's diversity reference: Heun, 10 steps (19 network evaluations)
SEED_OFFSET = 2  # health noise: seeds train.seed + 2 and + 3 (the sample grid uses + 1)
RECOVER = 1.5  # the alarm re-arms when the ratio is back above RECOVER * health_alarm
REF_VERSION = 2


# -- the measures ----------------------------------------------------------------------------------------------
def pairwise_distance(x: Tensor) -> float:
    """Mean L2 distance over all pairs of samples of ``x`` [N, ...] (NaN when the samples are not finite)."""
    x = x.detach().float().flatten(1)
    if x.shape[0] < 2:
        return float("nan")
    if not torch.isfinite(x).all():
        return float("nan")
    return float(torch.pdist(x).mean())


def diversity(x: Tensor, groups: Tensor | None = None) -> dict[str, float]:
    """``diversity``: mean pairwise distance of all samples; ``class_spread``: its mean within each group (classes)."""
    out = {"diversity": pairwise_distance(x)}
    if groups is not None:
        groups = groups.cpu()
        within = [pairwise_distance(x[(groups == g).to(x.device)]) for g in groups.unique()
                  if int((groups == g).sum()) >= 2]
        if within:
            out["class_spread"] = sum(within) / len(within)
    return out


class _EvalMode:
    """Every sub-module of the given networks in eval mode inside the block; each one's own flag restored after."""

    def __init__(self, *nets):
        self.modules = [m for net in nets if net is not None for m in net.modules()]

    def __enter__(self):
        self.flags = [m.training for m in self.modules]
        for m in self.modules:
            m.training = False
        return self

    def __exit__(self, *exc):
        for m, flag in zip(self.modules, self.flags):
            m.training = flag
        return False


def _fork_rng(device: torch.device):
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


# -- the monitor the loop calls --------------------------------------------------------------------------------
class Health:
    """Health signals of a distillation run; ``health(method, step, pbar)`` returns the keys to add to a log row.

    Off (returns ``{}``) when ``train.health_n`` is 0 or the run has no teacher (teacher training).
    """

    def __init__(self, run_dir: Path, tc: TrainConfig, ctx: Context, main: bool = True):
        self.run_dir = Path(run_dir)
        self.main = main  # only the main rank writes the reference file
        self.tc = tc
        self.ctx = ctx
        self.n = max(0, min(tc.health_n, 2 * tc.batch_size))
        self.enabled = self.n >= 2 and ctx.teacher is not None
        if tc.health_alarm < 0:
            raise ValueError(f"train.health_alarm must be >= 0, got {tc.health_alarm}")
        self.ref: dict | None = None
        self.collapsed = False
        self._quality = None  # (kind, reference) once prepared

    # -- inputs ----------------------------------------------------------------------------------------------
    def _generators(self, offset: int = 0) -> tuple[torch.Generator, torch.Generator]:
        seed = self.tc.seed + SEED_OFFSET + offset
        return torch.Generator().manual_seed(seed), torch.Generator(device=self.ctx.device).manual_seed(seed)

    def _cond(self, n: int):
        """Fixed conditioning for n samples and the group of each sample (None when groups would be singletons)."""
        ctx = self.ctx
        if ctx.cond_bank is not None:
            k = len(next(iter(ctx.cond_bank.values())))
            rows = torch.arange(n) % k
            return {key: v[rows].to(ctx.device) for key, v in ctx.cond_bank.items()}, (rows if n >= 2 * k else None)
        if ctx.num_classes > 0:
            labels = torch.arange(n) % ctx.num_classes
            return {"labels": labels.to(ctx.device)}, (labels if n >= 2 * ctx.num_classes else None)
        return None, None

    def _noise(self, n: int, gen: torch.Generator) -> Tensor:
        return torch.randn((n, *self.ctx.shape), generator=gen).to(self.ctx.device)

    def _student(self, n: int, offset: int = 0):
        ctx = self.ctx
        g_cpu, g_dev = self._generators(offset)
        cond, groups = self._cond(n)
        x = student_sample(ctx.student, ctx.schedule, self._noise(n, g_cpu), ctx.times, cond, generator=g_dev)
        return x, cond, groups, g_dev

    def _teacher(self, n: int, offset: int = 0):
        ctx = self.ctx
        g_cpu, _ = self._generators(offset)
        cond, groups = self._cond(n)
        teacher, g = ctx.teacher, ctx.guidance

        def fn(x, t, c):
            return teacher(x, t, c, guidance=g)

        outs = []
        noise = self._noise(n, g_cpu)
        bs = max(self.tc.batch_size, 1)
        for i in range(0, n, bs):
            c = None if cond is None else {k: v[i:i + bs] for k, v in cond.items()}
            outs.append(sample_ode(fn, teacher.schedule, noise[i:i + bs], REF_STEPS, c, solver="heun"))
        return torch.cat(outs), groups

    # -- the teacher's reference, once per run ---------------------------------------------------------------
    def _ref_key(self) -> dict:
        q = self.tc.health_quality_n if self.tc.health_every > 0 else 0
        return {"version": REF_VERSION, "n": self.n, "steps": REF_STEPS, "seed": self.tc.seed, "quality_n": q,
                "guidance": self.ctx.guidance, "times": list(self.ctx.times)}

    def reference(self) -> dict:
        """The teacher's diversity (and quality figure) on the health noise, read from or written to the run."""
        if self.ref is not None:
            return self.ref
        path = self.run_dir / REF_FILE
        key = self._ref_key()
        if path.is_file():
            try:
                ref = json.loads(path.read_text())
                if all(ref.get(k) == v for k, v in key.items()):
                    self.ref = ref
                    return ref
            except json.JSONDecodeError:
                pass
        t0 = time.perf_counter()
        x, groups = self._teacher(self.n)
        self.ref = {**key, **diversity(x, groups), "seconds": round(time.perf_counter() - t0, 2)}
        self._save_ref()
        return self.ref

    def reference_quality(self) -> dict:
        """The figure a student's small-sample quality is read against (computed once, at the first quality step).

        Vector data: ``quality``, the figure of ``health_quality_n`` real training samples, what a perfect generator's
        sample of that size scores.  Images: ``teacher_quality``, the teacher's own figure on the student's quality
        noise and labels (``REF_STEPS`` Heun steps, its default guidance); real images are no floor there, as the
        evaluation classifier was fitted on the training images."""
        ref = self.reference()
        if self._quality[0] == "fd":
            if "teacher_quality" not in ref:
                x, _ = self._teacher(self.tc.health_quality_n, offset=1)
                ref["teacher_quality"] = self._quality_of(x)
                self._save_ref()
            return ref["teacher_quality"]
        if "quality" not in ref:
            ds, n = self.ctx.data, self.tc.health_quality_n
            idx = torch.randperm(len(ds.x), generator=self._generators(offset=1)[0])[:n]
            labels = None if ds.labels is None or self.ctx.num_classes <= 0 else ds.labels[idx]
            ref["quality"] = self._quality_of(ds.x[idx], labels)
            self._save_ref()
        return ref.get("quality")

    def _save_ref(self) -> None:
        if not self.main:
            return
        path = self.run_dir / REF_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.ref, indent=2) + "\n")
        tmp.replace(path)

    # -- quality on built-in data ----------------------------------------------------------------------------
    def _quality_setup(self):
        if self._quality is not None:
            return self._quality if self._quality[0] else None
        ctx, ds = self.ctx, self.ctx.data
        self._quality = (None, None)
        if ds is None or ctx.cond_bank is not None:
            return None
        if ds.kind == "vector":
            if ds.mixture is not None:
                self._quality = ("mixture", ds.mixture)
            else:
                self._quality = ("sw", ds.x[:2000].cpu())
        elif ds.kind == "image" and ds.num_classes >= 2:
            if ds.name not in DATASETS:  # user data sets have no cached evaluation classifier
                return None
            with torch.enable_grad():  # trained (once, then cached) when missing
                model, _ = get_classifier(ds.name, progress=self.tc.progress)
            test = load_dataset(ds.name, "test")
            self._quality = ("fd", (model.cpu(), _batched(model.features, test.x)))
        return self._quality if self._quality[0] else None

    def _quality_of(self, x: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        kind, ref = self._quality
        x = x.detach().float().cpu()
        if kind == "mixture":
            if ref.conditional and self.ctx.num_classes > 0:  # each class against its own modes
                labels = torch.arange(len(x)) % self.ctx.num_classes if labels is None else labels.cpu()
                m = class_metrics(x, labels, ref)
            else:
                m = mixture_metrics(x, ref)
            return {"modes_covered": float(m["modes_covered"]), "max_weight_error": m["max_weight_error"],
                    "in_mode": m["quality"], "sw": m["sw"]}
        if kind == "sw":
            finite = torch.isfinite(x).all(1)
            return {"sw": sliced_wasserstein(x[finite], ref) if finite.any() else math.inf}
        model, real = ref
        x = x.nan_to_num(0.0).clamp(-1, 1)
        out = {"fd": frechet_distance(real, _batched(model.features, x))}
        if self.ctx.num_classes > 0:
            labels = torch.arange(len(x)) % self.ctx.num_classes if labels is None else labels.cpu()
            out["class_acc"] = float((_batched(model, x).argmax(1) == labels).double().mean())
        return out

    def _student_quality(self) -> dict[str, float]:
        n, bs = self.tc.health_quality_n, max(self.tc.batch_size, 1)
        ctx = self.ctx
        g_cpu, g_dev = self._generators(offset=1)
        cond, _ = self._cond(n)
        noise = self._noise(n, g_cpu)
        outs = []
        for i in range(0, n, bs):
            c = None if cond is None else {k: v[i:i + bs] for k, v in cond.items()}
            outs.append(student_sample(ctx.student, ctx.schedule, noise[i:i + bs], ctx.times, c, generator=g_dev))
        return self._quality_of(torch.cat(outs))

    # -- one log step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, method: Method, step: int, pbar=None) -> dict:
        if not self.enabled:
            return {}
        t0 = time.perf_counter()
        with _fork_rng(self.ctx.device), _EvalMode(self.ctx.student, *method.networks().values()):
            ref = self.reference()
            x, cond, groups, g_dev = self._student(self.n)
            out = {f"health/{k}": v for k, v in diversity(x, groups).items()}
            for k in ("diversity", "class_spread"):
                if f"health/{k}" in out and ref.get(k):
                    out[f"health/{k}_ratio"] = out[f"health/{k}"] / ref[k]
            if torch.isfinite(x).all():
                out.update(method.diagnostics(x, cond, g_dev))
            tc = self.tc
            due = tc.health_every > 0 and (step % tc.health_every == 0 or step == tc.steps)  # and at the end
            if due and self._quality_setup() is not None:
                self.reference_quality()
                out.update({f"health/{k}": v for k, v in self._student_quality().items()})
        msg = self._alarm(out)
        if msg:
            out["health/alarm"] = msg
            if pbar is not None:
                pbar.write(f"step {step}: {msg}")
        out["health/seconds"] = time.perf_counter() - t0
        return out

    def _alarm(self, out: dict) -> str | None:
        ratio = out.get("health/class_spread_ratio", out.get("health/diversity_ratio"))
        if ratio is None:
            return None
        what = "within-class spread" if "health/class_spread_ratio" in out else "diversity"
        limit = self.tc.health_alarm
        if not math.isfinite(ratio):
            if not self.collapsed:
                self.collapsed = True
                return "non-finite student samples"
            return None
        if not self.collapsed and ratio < limit:
            self.collapsed = True
            return f"collapse: {what} {ratio:.2g}x the teacher's (alarm below {limit:g}x)"
        if self.collapsed and ratio >= RECOVER * limit:
            self.collapsed = False
            return f"recovered: {what} {ratio:.2g}x the teacher's"
        return None

    @staticmethod
    def postfix(row: dict) -> dict[str, str]:
        """Progress-bar entries: the diversity ratio the alarm watches."""
        ratio = row.get("health/class_spread_ratio", row.get("health/diversity_ratio"))
        return {} if ratio is None else {"div": f"{ratio:.2g}x"}


# -- dmdx inspect RUN ------------------------------------------------------------------------------------------
CHANCE_ACC = 0.6  # a critic whose smoothed accuracy never reaches this never beat chance (0.5)
LAG_LIMIT = 1.1  # fake score lagging: median fake_lag over the last third of the run above this
FD_WORSE = 1.5  # quality degraded: the last small-sample FD above this multiple of the first one
# images, against the teacher's figure on the same noise and labels: far from the teacher above this multiple of its
# small-sample FD; samples that lost their class below this fraction of its class accuracy (judgements: a diverged
# MNIST16 DMDX student, FD 43.6 at n = 1,000, scored 77x and 0.17 / 0.99; students near the teacher 1-2x)
FD_FAR = 3.0
CLASS_ACC_FRACTION = 0.5
IN_MODE_FRACTION = 0.5  # mixtures: samples off the modes when the in-mode fraction is below half the real data's
# near the teacher (a critic at chance is then at equilibrium, not blind): images within FD_NEAR x the teacher's
# small-sample FD and CLASS_ACC_NEAR of its class accuracy; mixtures every mode and IN_MODE_NEAR of the real in-mode
# fraction (judgements, like the limits above)
FD_NEAR = 1.5
CLASS_ACC_NEAR = 0.9
IN_MODE_NEAR = 0.8
# a critic whose real and fake inputs differ by less than this fraction of the samples' spread has nothing to learn
# (digits, guidance 1.5: 0.003-0.005 at ADM's dt = 1/64 with its critic at chance; benchmarks/adm-study.md)
GAP_BLIND = 0.02


def read_log(run_dir: Path) -> list[dict]:
    """The rows of ``RUN/log.jsonl``; a clear error for a folder that is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    path = run_dir / "log.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a dmdx run folder (no log.jsonl); expected the --out folder of "
                         "'dmdx distill' or 'dmdx teacher train'")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == 0:
                raise ValueError(f"{path} is not a dmdx log (line 1 is not JSON)") from None
            break  # a run killed while writing its last line
    if not rows:
        raise ValueError(f"{path} holds no log rows yet (the first is written after train.log_every steps)")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, vals = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(int(r["step"]))
            vals.append(float(v))
    return steps, vals


def _window_mean(vals: list[float], where: str) -> float:
    """Mean of the first / middle / last tenth of the values (at least one value)."""
    n = len(vals)
    w = max(1, n // 10)
    if where == "start":
        part = vals[:w]
    elif where == "end":
        part = vals[-w:]
    else:
        mid = n // 2
        part = vals[max(0, mid - w // 2): max(0, mid - w // 2) + w]
    finite = [v for v in part if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _smooth_max(vals: list[float], w: int = 5) -> float:
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return float("nan")
    w = min(w, len(finite))
    return max(sum(finite[i:i + w]) / w for i in range(len(finite) - w + 1))


def _trend(start: float, end: float) -> str:
    if not (math.isfinite(start) and math.isfinite(end)):
        return "-"
    if abs(start) < 1e-12:
        return "flat" if abs(end) < 1e-12 else "from 0"
    r = end / start
    if r < 0:
        return "sign flip"
    if 0.9 <= r <= 1.1:
        return "flat"
    return f"{'up' if r > 1 else 'down'} {r:.2g}x"


def summary_keys(rows: list[dict]) -> list[str]:
    """The signals of the table: losses, pooled critic accuracy and margin, the DM gradient norm, health/*."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k in keys or not isinstance(v, (int, float)) or isinstance(v, bool) or k in ("step", "time"):
                continue
            pooled_critic = k.startswith("critic/") and k.count("/") == 2
            if k.startswith("loss/") or pooled_critic or k == "dm/grad_norm" or (
                    k.startswith("health/") and k != "health/seconds"):
                keys.append(k)
    order = ("loss/", "critic/", "dm/", "health/")
    return sorted(keys, key=lambda k: (next(i for i, p in enumerate(order) if k.startswith(p)), k))


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _quality(rows: list[dict], ref: dict | None) -> tuple[list[str], bool]:
    """(problems, near) of the run's small-sample quality figures on built-in data: ``near`` when the last figure
    is close to what the reference scores (mixtures: every mode of as many real samples, at least ``IN_MODE_NEAR``
    of their in-mode fraction; images: FD within ``FD_NEAR`` x and class accuracy within ``CLASS_ACC_NEAR`` of the
    teacher's on the same noise and labels) and nothing is wrong with it."""
    problems, near = [], False
    q = (ref or {}).get("quality") or {}
    s, v = _series(rows, "health/modes_covered")
    if v:
        t_modes = q.get("modes_covered")
        if t_modes is not None and v[-1] < t_modes:
            problems.append(f"mode coverage: {v[-1]:.0f} modes at step {s[-1]}, real data {t_modes:.0f} "
                            "(as many samples)")
        _, hq = _series(rows, "health/in_mode")
        t_hq = q.get("in_mode")
        if hq and t_hq and hq[-1] < IN_MODE_FRACTION * t_hq:
            problems.append(f"samples off the data: {hq[-1]:.0%} of the last small sample lie within 3 std of a mode, "
                            f"real data {t_hq:.0%}")
        near = bool(t_modes is not None and v[-1] >= t_modes and hq and t_hq and hq[-1] >= IN_MODE_NEAR * t_hq)
    tq = (ref or {}).get("teacher_quality") or {}
    s, v = _series(rows, "health/fd")
    _, acc = _series(rows, "health/class_acc")
    if v:
        t_fd, t_acc = tq.get("fd"), tq.get("class_acc")
        if len(v) > 1 and v[-1] > FD_WORSE * v[0]:
            problems.append(f"quality got worse: small-sample FD {v[0]:.3g} at step {s[0]} -> {v[-1]:.3g} at "
                            f"step {s[-1]}")
        if t_fd and v[-1] > FD_FAR * t_fd:
            problems.append(f"far from the teacher: small-sample FD {v[-1]:.3g} at step {s[-1]}, {v[-1] / t_fd:.1f}x "
                            f"the teacher's {t_fd:.3g} on the same noise and labels")
        if acc and t_acc and acc[-1] < CLASS_ACC_FRACTION * t_acc:
            problems.append(f"samples lost their class: class accuracy {acc[-1]:.2f} at step {s[-1]}, the teacher's "
                            f"{t_acc:.2f}")
        near = bool(t_fd and v[-1] <= FD_NEAR * t_fd and (not t_acc or (acc and acc[-1] >= CLASS_ACC_NEAR * t_acc)))
    return problems, near and not problems


def _quality_notes(rows: list[dict], ref: dict | None) -> list[str]:
    """What the small-sample quality figures read, first to last, against their reference."""
    notes = []
    q = (ref or {}).get("quality") or {}
    s, v = _series(rows, "health/modes_covered")
    if v:
        _, w = _series(rows, "health/max_weight_error")
        _, hq = _series(rows, "health/in_mode")
        notes.append(f"modes covered {v[0]:.0f} -> {v[-1]:.0f} (real data {_fmt(q.get('modes_covered'))}); largest "
                     f"weight error {w[0]:.3f} -> {w[-1]:.3f} (real data {_fmt(q.get('max_weight_error'))}); within 3 "
                     f"std of a mode {hq[0]:.0%} -> {hq[-1]:.0%}" + (f" (real data {q['in_mode']:.0%})"
                                                                      if q.get("in_mode") else ""))
    tq = (ref or {}).get("teacher_quality") or {}
    s, v = _series(rows, "health/fd")
    if v:
        t_fd = tq.get("fd")
        notes.append(f"small-sample FD {v[0]:.3g} -> {v[-1]:.3g} at steps {s[0]}-{s[-1]}"
                     + (f", the teacher's {t_fd:.3g}" if t_fd else "")
                     + " (small samples inflate FD: compare it along the run, and 'dmdx eval' numbers with each other)")
    return notes


def diagnose(rows: list[dict], ref: dict | None, steps_total: int | None, alarm: float) -> tuple[list[str], list[str]]:
    """(problems, notes) of a run's log: a run is healthy when there are no problems."""
    problems, notes = [], []
    last = rows[-1]["step"]
    if steps_total and last < steps_total:
        notes.append(f"the log ends at step {last} of {steps_total}: the run is still going, was interrupted, or "
                     "stopped on a non-finite loss (see its output)")
    bad = [(k, r["step"]) for r in rows for k, v in r.items()
           if (k.startswith("loss/") or k in ("health/diversity", "dm/grad_norm")) and isinstance(v, float)
           and not math.isfinite(v)]
    if bad:
        k, s = bad[0]
        problems.append(f"non-finite values: {k} at step {s}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
    # collapse
    key = "health/class_spread_ratio" if any("health/class_spread_ratio" in r for r in rows) else "health/diversity_ratio"
    what = "within-class spread" if key == "health/class_spread_ratio" else "diversity"
    s, v = _series(rows, key)
    if v:
        end = _window_mean(v, "end")
        below = [st for st, x in zip(s, v) if not x >= alarm]
        if not end >= alarm:
            problems.append(f"collapse: {what} {end:.2g}x the teacher's at the end (alarm below {alarm:g}x; first "
                            f"below at step {below[0] if below else s[-1]})")
        elif below:
            notes.append(f"{what} fell below {alarm:g}x the teacher's at step {below[0]} and recovered "
                         f"({end:.2g}x at the end)")
        else:
            notes.append(f"{what}: {min(v):.2g}x to {max(v):.2g}x the teacher's (ends at {end:.2g}x)")
    quality_problems, near = _quality(rows, ref)
    # critics: a critic at chance is blind (nothing tells its inputs apart), at equilibrium (the student matches the
    # teacher, so nothing is left to tell apart) or too weak (the signal is there and it does not learn it)
    for k in [k for k in summary_keys(rows) if k.startswith("critic/") and k.endswith("/acc")]:
        s, v = _series(rows, k)
        best = _smooth_max(v)
        name = k.split("/")[1]
        _, g = _series(rows, f"critic/{name}/gap")
        gap = _window_mean(g, "end") if g else None
        seen = f"best accuracy {best:.2f}, chance 0.5, over {len(v)} logs from step {s[0]} to {s[-1]}"
        signal = "" if gap is None else f"; its real and fake inputs differ by {gap:.2g} of the samples' spread"
        if best >= CHANCE_ACC:
            notes.append(f"critic {name!r}: accuracy {_window_mean(v, 'start'):.2f} -> {_window_mean(v, 'end'):.2f} "
                         f"(best {best:.2f}; 0.5 is chance, and also the equilibrium once the student matches)"
                         + signal)
        elif near:
            notes.append(f"critic {name!r} at equilibrium: at chance ({seen}){signal}, and the student's quality is "
                         "near the teacher's: nothing is left to tell apart")
        else:
            if gap is not None and gap < GAP_BLIND:
                msg = (f"critic {name!r} is blind: there is no signal to learn ({seen}{signal}, below "
                       f"{GAP_BLIND:g}); what it passes to the student is noise (ADM: the gap grows like "
                       "(guidance - 1) dt / t, docs/methods.md)")
            elif gap is not None:
                msg = (f"critic {name!r} is too weak: it never beat chance ({seen}{signal}, a signal it could "
                       "learn): its heads' rate or capacity")
            else:
                msg = f"critic {name!r} never beat chance ({seen}): blind to its input, or far too weak"
            # with a quality figure that says what is wrong, the critic is its explanation, not a second problem
            (notes if quality_problems else problems).append(msg)
    # fake score lag
    s, v = _series(rows, "health/fake_lag")
    if v:
        tail = sorted(x for x in v[-max(1, len(v) // 3):] if math.isfinite(x))
        med = tail[len(tail) // 2] if tail else float("nan")
        if med > LAG_LIMIT:
            problems.append(f"fake score lagging: over the last third its denoising error on student samples is "
                            f"{med:.2f}x the teacher's (median; below 1 is healthy)")
        else:
            notes.append(f"fake score lag: median {med:.2f} over the last third (below 1: it tracks the student)")
    s, v = _series(rows, "dm/grad_norm")
    if len(v) > 1:
        notes.append(f"DM gradient norm {_trend(_window_mean(v, 'start'), _window_mean(v, 'end'))} "
                     f"({_window_mean(v, 'start'):.3g} -> {_window_mean(v, 'end'):.3g})")
    problems += quality_problems
    notes += _quality_notes(rows, ref)
    alarms = [(r["step"], r["health/alarm"]) for r in rows if isinstance(r.get("health/alarm"), str)]
    for st, msg in alarms:
        notes.append(f"alarm at step {st}: {msg}")
    return problems, notes


def plot_health(rows: list[dict], path: Path, ref: dict | None = None, alarm: float = 0.3) -> Path:
    """Curves of the signals into a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = summary_keys(rows)
    panels = [
        ("losses", [k for k in keys if k.startswith("loss/")], None),
        ("critic accuracy (0.5 = chance)", [k for k in keys if k.startswith("critic/") and k.endswith("/acc")], 0.5),
        ("critic margin  mean(d_real) - mean(d_fake)", [k for k in keys if k.startswith("critic/")
                                                         and k.endswith("/margin")], 0.0),
        ("diversity / teacher's", [k for k in keys if k.endswith("_ratio")], alarm),
        ("fake-score lag (fake / teacher error)", [k for k in keys if k == "health/fake_lag"], 1.0),
        ("DM gradient norm", [k for k in keys if k == "dm/grad_norm"], None),
        ("modes covered (small sample)", [k for k in keys if k == "health/modes_covered"], None),
        ("small-sample quality", [k for k in keys if k in ("health/fd", "health/max_weight_error", "health/sw",
                                                           "health/in_mode", "health/class_acc")], None),
    ]
    panels = [p for p in panels if p[1]]
    cols = 2 if len(panels) > 1 else 1
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.0 * nrows), squeeze=False)
    bounds = [r["step"] for a, r in zip(rows, rows[1:]) if a.get("stage") != r.get("stage")]
    alarm_steps = [r["step"] for r in rows if isinstance(r.get("health/alarm"), str)
                   and r["health/alarm"].startswith(("collapse", "non-finite"))]
    for ax, (title, ks, hline) in zip(axes.flat, panels):
        for k in ks:
            s, v = _series(rows, k)
            ax.plot(s, v, label=k, lw=1.2, marker="." if len(s) < 30 else None)
        if hline is not None:
            ax.axhline(hline, color="grey", ls=":", lw=1)
        for b in bounds:
            ax.axvline(b, color="black", ls="--", lw=0.8)
        for a in alarm_steps:
            ax.axvline(a, color="red", ls="-", lw=0.8, alpha=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def inspect_run(run_dir: Path) -> tuple[str, bool, Path]:
    """Summarise a run's health signals: (report text, healthy?, path of the PNG written into the run)."""
    run_dir = Path(run_dir)
    rows = read_log(run_dir)
    cfg = {}
    if (run_dir / "config.json").is_file():
        try:
            cfg = json.loads((run_dir / "config.json").read_text())
        except json.JSONDecodeError:
            cfg = {}
    train = cfg.get("train", {}) if isinstance(cfg.get("train"), dict) else {}
    steps_total = train.get("steps")
    alarm = float(train.get("health_alarm", TrainConfig.health_alarm))
    ref = None
    if (run_dir / REF_FILE).is_file():
        try:
            ref = json.loads((run_dir / REF_FILE).read_text())
        except json.JSONDecodeError:
            ref = None
    method = (cfg.get("method") or {}).get("name") if isinstance(cfg.get("method"), dict) else None
    if not method:  # no config.json: the stages named in the log
        method = " then ".join(dict.fromkeys(str(r.get("stage", "?")) for r in rows))
    lines = [f"run {run_dir}: method {method}, teacher {cfg.get('teacher', '?')}, {len(rows)} log rows to step "
             f"{rows[-1]['step']}" + (f" of {steps_total}" if steps_total else "")]
    if ref is not None:
        extra = ", ".join(f"{k} {_fmt(v)}" for k, v in (ref.get("quality") or {}).items())
        lines.append(f"teacher reference ({ref.get('steps')} Heun steps, {ref.get('n')} samples): diversity "
                     f"{_fmt(ref.get('diversity'))}" + (f", class spread {_fmt(ref['class_spread'])}"
                                                        if "class_spread" in ref else "")
                     + (f"; quality of {ref.get('quality_n')} real samples: {extra}" if extra else ""))
        if ref.get("teacher_quality"):
            tq = ", ".join(f"{k} {_fmt(v)}" for k, v in ref["teacher_quality"].items())
            lines.append(f"teacher's quality on the student's {ref.get('quality_n')} quality draws "
                         f"({ref.get('steps')} Heun steps): {tq}")
    table = [("signal", "start", "middle", "end", "min", "max", "trend")]
    for k in summary_keys(rows):
        _, v = _series(rows, k)
        finite = [x for x in v if math.isfinite(x)]
        a, m, e = (_window_mean(v, w) for w in ("start", "middle", "end"))
        table.append((k, _fmt(a), _fmt(m), _fmt(e), _fmt(min(finite)) if finite else "-",
                      _fmt(max(finite)) if finite else "-", _trend(a, e)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in table]
    lines.append("(start / middle / end: means over the first, middle and last tenth of the logged values)")
    problems, notes = diagnose(rows, ref, steps_total, alarm)
    lines.append("")
    if not any(k.startswith(("health/", "critic/")) for r in rows for k in r):
        notes.insert(0, "this log has no health signals (teacher training, or train.health_n=0)")
    lines.append("verdict: " + ("looks healthy" if not problems else "UNHEALTHY"))
    lines += [f"  problem: {p}" for p in problems]
    lines += [f"  note: {n}" for n in notes]
    png = plot_health(rows, run_dir / PLOT_FILE, ref, alarm)
    lines.append(f"curves written to {png}")
    return "\n".join(lines), not problems, png

"""What every method shares: the context it sees, phases, the denoising loss and backward simulation.

A method is a set of losses and *phases*.  A :class:`Phase` names the networks it trains and how often it runs
(``every=5`` on the critic-to-student ratio is DMD2's two time-scale rule).  The training loop owns optimisers,
``requires_grad``, accumulation, clipping, EMA, checkpoints and logging; a method only builds its networks and
returns ``(loss, logs)`` from each phase's loss function.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..denoiser import Cond, Denoiser, cond_cat
from ..param import from_x0_eps
from ..sampling import student_sample
from ..schedules import _bcast

Tensor = torch.Tensor
LossFn = Callable[[], tuple[Tensor, dict[str, float]]]


@dataclass
class Phase:
    """One update: ``loss()`` is minimised w.r.t. the networks in ``trains``, on every ``every``-th iteration of
    its stage, from the stage's iteration ``start`` on (a critic warm-up delays the student's phase)."""

    name: str
    trains: tuple[str, ...]
    loss: LossFn
    every: int = 1
    start: int = 0

    def runs_at(self, local_step: int) -> bool:
        return local_step >= self.start and local_step % self.every == 0


@dataclass
class Pairs:
    """Teacher ODE pairs: the noise each sample started from, the teacher's x0, the labels (or None)."""

    noise: Tensor
    x0: Tensor
    labels: Tensor | None
    cond_bank: dict[str, Tensor] | None = None  # text models: ``labels`` index rows of these prompt embeddings

    def batch(self, n: int, device) -> tuple[Tensor, Tensor, Cond]:
        idx = torch.randint(len(self.x0), (n,))
        if self.cond_bank is not None:
            rows = self.labels[idx]
            cond = {k: v[rows].to(device) for k, v in self.cond_bank.items()}
        else:
            cond = None if self.labels is None else {"labels": self.labels[idx].to(device)}
        return self.noise[idx].to(device), self.x0[idx].to(device), cond


@dataclass
class Context:
    """What a method sees.  ``teacher`` is the frozen real score (maybe analytic); ``teacher_net`` is a frozen
    network copy of it (the teacher itself unless the teacher is analytic) used to initialise trainable copies and
    as the feature backbone of discriminators."""

    teacher: Denoiser | None
    teacher_net: Denoiser | None
    student: Denoiser
    data: object | None  # dmdx.data.Dataset
    num_classes: int
    shape: tuple[int, ...]
    batch_size: int
    device: torch.device
    times: list[float] = field(default_factory=lambda: [1.0])
    pairs: Pairs | None = None
    pixel_backbone: nn.Module | None = None
    guidance: float = 1.0  # the teacher's default CFG scale, used when a method's real_guidance is None
    cond_bank: dict[str, Tensor] | None = None  # cached prompt embeddings [N, ...] of text-to-image teachers
    # captioned real images (name.png + name.txt): row of each image's caption in caption_bank, -1 if uncaptioned
    caption_rows: Tensor | None = None
    caption_bank: dict[str, Tensor] | None = None
    # random choices every process of a distributed run must share (set by the training loop); default: local
    shared_randint: Callable[[int], int] | None = None

    # the region in which methods run predictions in float32 under train.bf16 autocast (DMD2's fake score in the DM
    # loss); the loop replaces it where the parameters themselves are bf16 in forward (FSDP2's bf16 policy)
    full_precision: Callable[[], contextlib.AbstractContextManager] | None = None

    @contextlib.contextmanager
    def float32(self, teacher: bool = False):
        """A block whose network calls run in float32 even under train.bf16 autocast (where the loop allows it).

        With ``teacher`` the frozen teacher network computes in float32 inside it too, whatever its weights' dtype
        (``real.teacher_dtype``): a backbone that stores lower-precision weights offers ``float32()``, a block in which
        it runs in float32 layer by layer (``nets.pipeline.PipelineBackbone.float32``).
        """
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.full_precision() if self.full_precision is not None
                                else torch.autocast(self.device.type, enabled=False))
            if teacher:
                for net in {id(n): n for n in (self.teacher, self.teacher_net) if n is not None}.values():
                    up = getattr(getattr(net, "backbone", None), "float32", None)
                    if up is not None:
                        stack.enter_context(up())
            yield

    def randint_shared(self, high: int) -> int:
        """A random integer in [0, high), the same on every rank of a distributed run."""
        if self.shared_randint is not None:
            return self.shared_randint(high)
        return int(torch.randint(high, ()))

    def real_guidance(self, value: float | None) -> float:
        return self.guidance if value is None else value

    @property
    def schedule(self):
        return self.student.schedule

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def noise(self, n: int) -> Tensor:
        return torch.randn((n, *self.shape), device=self.device)

    def cond(self, n: int) -> Cond:
        """Random class labels for conditional models, random rows of the prompt bank for text models, else None."""
        if self.cond_bank is not None:
            return self._bank_rows(n)
        if self.num_classes <= 0:
            return None
        return {"labels": torch.randint(self.num_classes, (n,), device=self.device)}

    def _bank_rows(self, n: int) -> Cond:
        idx = torch.randint(len(next(iter(self.cond_bank.values()))), (n,))
        return {k: v[idx].to(self.device) for k, v in self.cond_bank.items()}

    def real_batch(self, n: int) -> tuple[Tensor, Cond]:
        ds = self.data
        if ds is None:
            raise ValueError("this method needs real data (--data)")
        idx = torch.randint(len(ds.x), (n,))
        x = ds.x[idx].to(self.device)
        cond = None
        if self.num_classes > 0:
            if ds.labels is None:
                raise ValueError(f"the teacher is class-conditional but dataset {ds.name!r} has no labels")
            cond = {"labels": ds.labels[idx].to(self.device)}
        elif self.cond_bank is not None:  # uncaptioned images: paired with random prompts
            cond = self._bank_rows(n)
            if self.caption_rows is not None:  # captioned images: their own caption
                rows = self.caption_rows[idx]
                has = (rows >= 0).to(self.device)
                cap = {k: v[rows.clamp(min=0)].to(self.device) for k, v in self.caption_bank.items()}
                cond = {k: torch.where(_bcast(has, v), cap[k], v) for k, v in cond.items()}
        return x, cond

    def student_x0(self, n: int, grad: bool = True) -> tuple[Tensor, Cond, float]:
        """A student sample for training, with DMD2's backward simulation for multi-step students.

        One index k is drawn per call (shared by all ranks, as in the reference); the student runs k steps without gradients from fresh noise, the k-th x0
        is re-noised to ``times[k]`` (pure noise for k = 0) and the student's prediction from there is returned
        (with gradients when ``grad``).  Returns (x0, cond, t_k).
        """
        cond = self.cond(n)
        k = self.randint_shared(len(self.times)) if len(self.times) > 1 else 0
        with torch.no_grad():
            x_in = student_sample(self.student, self.schedule, self.noise(n), self.times, cond, stop_at=k)
        with torch.set_grad_enabled(grad):
            x0 = self.student(x_in, self.times[k], cond)
        return x0, cond, self.times[k]


def uniform_t(n: int, lo: float, hi: float, device, schedule=None) -> Tensor:
    """``n`` training times uniform in [lo, hi] (float64), through ``schedule.training_time`` when given (every
    loss passes its schedule: discrete-time schedules snap the times to their steps there)."""
    t = lo + (hi - lo) * torch.rand(n, device=device, dtype=torch.float64)
    return t if schedule is None else schedule.training_time(t)


def dsm_loss(den: Denoiser, x0: Tensor, cond: Cond, t_min: float = 1e-3, t_max: float = 1.0,
             guidance: float = 1.0) -> Tensor:
    """Denoising score matching in the backbone's own prediction kind: ``|pred(x_t, t) - target|^2``, t ~ U.

    With ``guidance != 1`` (and a condition) ``pred`` is the classifier-free guided output
    ``pred(x_t, t, null) + guidance * (pred(x_t, t, cond) - pred(x_t, t, null))`` (SiD-LSG's fake-score loss)."""
    t = uniform_t(x0.shape[0], t_min, t_max, x0.device, den.schedule)
    eps = torch.randn_like(x0)
    x_t = den.schedule.add_noise(x0, eps, t)
    a, s = den.schedule.alpha_sigma(t)
    target = from_x0_eps(x0.float(), eps.float(), den.prediction, a, s).float()
    if guidance == 1.0 or cond is None:
        return F.mse_loss(den.predict(x_t, t, cond), target)
    both = den.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), cond_cat(cond, den.backbone.null_cond(cond)))
    pred_c, pred_u = both.chunk(2)
    return F.mse_loss(pred_u + guidance * (pred_c - pred_u), target)


def critic_gap(difference: Tensor, x_fake: Tensor, prefix: str) -> dict[str, float]:
    """``critic/{prefix}/gap``: how much a critic has to see, ``rms(difference) / spread(x_fake)``.

    ``difference`` is what separates a real input from its fake counterpart (ADM: ``x_real - x_fake``, the two ODE
    steps from one x_t), the spread the rms distance of the fake inputs from their batch mean.  Near 0 the two inputs
    are the same to any critic: it has no signal to learn (issue 33: 0.003-0.005 at ADM's dt = 1/64 on digits at
    guidance 1.5, where its critic stays at chance)."""
    f = x_fake.detach().float()
    spread = (f - f.mean(0, keepdim=True)).pow(2).mean().sqrt()
    gap = difference.detach().float().pow(2).mean().sqrt() / spread.clamp_min(1e-12)
    return {f"critic/{prefix}/gap": gap.item()}


def critic_logs(d_real: Tensor, d_fake: Tensor, prefix: str) -> dict[str, float]:
    """Health signals of a critic from the logits of one update (real high, fake low; the decision threshold is 0).

    ``critic/{prefix}/acc``: balanced sign accuracy ``0.5 * (P[d_real > 0] + P[d_fake < 0])`` (0.5 is chance);
    ``critic/{prefix}/margin``: ``mean(d_real) - mean(d_fake)``.  Logits ``[B]`` or ``[B, heads]``; with several
    heads, every head also gets its own pair (``critic/{prefix}/h{i}/acc``, ...).
    """
    r = d_real.detach().float().reshape(d_real.shape[0], -1)
    f = d_fake.detach().float().reshape(d_fake.shape[0], -1)
    acc = 0.5 * ((r > 0).float().mean(0) + (f < 0).float().mean(0))  # per head
    margin = r.mean(0) - f.mean(0)
    out = {f"critic/{prefix}/acc": acc.mean().item(), f"critic/{prefix}/margin": margin.mean().item()}
    if r.shape[1] > 1:
        for i in range(r.shape[1]):
            out[f"critic/{prefix}/h{i}/acc"] = acc[i].item()
            out[f"critic/{prefix}/h{i}/margin"] = margin[i].item()
    return out


@torch.no_grad()
def fake_score_lag(fake_score: Denoiser, teacher: Denoiser, x0: Tensor, cond: Cond, generator: torch.Generator,
                   t_min: float = 0.02, t_max: float = 0.98) -> float:
    """The fake score's denoising loss on student samples over the teacher's on the same noised samples.

    ``x0`` (student samples) is noised at ``t ~ U[t_min, t_max]`` with noise from ``generator`` (never the training
    RNG); both networks predict x0 (no guidance) and the ratio of their mean squared errors in x0 is returned.
    Below 1: the fake score knows the student's distribution better than the teacher does, as it should. About 1:
    the student matches the teacher, or the fake score has learnt nothing about it. Above 1: the fake score is
    worse at its one job than a network that never saw a student sample (it lags behind the student).
    """
    t = t_min + (t_max - t_min) * torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = fake_score.schedule.add_noise(x0, eps, t)
    err_fake = F.mse_loss(fake_score(x_t, t, cond).float(), x0.float())
    err_teacher = F.mse_loss(teacher(x_t, t, cond).float(), x0.float())
    return float(err_fake / err_teacher.clamp_min(1e-12))


def drop_labels(den: Denoiser, cond: Cond, p: float) -> Cond:
    """Replace each sample's condition (class label, prompt embedding) by the null one with probability p
    (classifier-free guidance training)."""
    if cond is None or p <= 0:
        return cond
    null = den.backbone.null_cond(cond)
    first = next(iter(cond.values()))
    keep = torch.rand(first.shape[0], device=first.device) >= p
    return {k: torch.where(_bcast(keep, v), v, null[k].to(v)) for k, v in cond.items()}


def frozen_copy(den: Denoiser, trainable: bool = True) -> Denoiser:
    """A deep copy of a network denoiser (the fake score, the student), trainable or not."""
    import copy

    out = copy.deepcopy(den)
    if trainable and hasattr(out.backbone, "make_trainable"):  # e.g. float32 + LoRA for a bf16 pipeline teacher
        out.backbone.make_trainable()
    out.requires_grad_(trainable)
    return out


class Method:
    """Base class: subclasses set ``name``/``Config``, build networks in ``__init__`` and return phases."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type]
    needs_pairs: ClassVar[bool] = False
    uses_pixel_backbone: ClassVar[bool] = False  # ADP's pixel-space discriminator (image data only)
    network_names: ClassVar[tuple[str, ...]] = ()  # every name ``networks()`` may return (checked by a test)
    needs_teacher: ClassVar[bool] = True

    def __init__(self, cfg, ctx: Context):
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def pairs_needed(cls, cfg) -> bool:
        """Does a run of ``cfg`` need teacher ODE pairs (the set-up then collects or loads them)."""
        return cls.needs_pairs

    @classmethod
    def check(cls, cfg, shape: tuple[int, ...]) -> None:
        """Refuse a config that cannot work on samples of ``shape``, before the slow set-up (pairs, networks)."""
        for sub, c, _ in cls.stages(cfg, 2):
            if sub is not cls:
                sub.check(c, shape)

    def networks(self) -> dict[str, nn.Module]:
        """Trainable networks other than the student, by name (checkpointed and optimised by the loop)."""
        return {}

    def trainable(self, name: str) -> Callable[[str, nn.Parameter], bool] | None:
        """Which parameters of the network ``name`` (``"student"`` or a name of ``networks()``) this method trains,
        as a test on ``(parameter name, parameter)``; None (the default): all of them.

        The loop builds that network's optimiser over the parameters that pass and, in a phase that trains the
        network, gives only those gradients; the others never change (GDD-I freezes the student's convolutions)."""
        return None

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def diagnostics(self, x0: Tensor, cond: Cond, generator: torch.Generator) -> dict[str, float]:
        """Extra health signals on ``x0``, a small batch of fresh student samples (called under no_grad, networks in
        eval mode, RNG only from ``generator``).  Default: the fake score's lag when the method has one."""
        fake = getattr(self, "fake_score", None)
        if fake is None or self.ctx.teacher is None:
            return {}
        return {"health/fake_lag": fake_score_lag(fake, self.ctx.teacher, x0, cond, generator)}

    @classmethod
    def stages(cls, cfg, steps: int) -> list[tuple[type["Method"], object, int]]:
        """(method class, its config, iterations) for each stage; one stage unless a pipeline (DMDX)."""
        return [(cls, cfg, steps)]

"""The one contract of dmdx: ``denoiser(x_t, t, cond) -> x0`` on continuous t in [0, 1], float32.

A :class:`Denoiser` wraps any backbone.  A backbone is an ``nn.Module`` with

- ``forward(x, time, cond) -> prediction`` where ``x`` is ``c_in(t) * x_t``, ``time`` is
  ``schedule.model_time(t)`` and ``cond`` a dict of per-sample tensors (``{"labels": LongTensor[B]}`` for class
  conditional models, text embeddings for text-to-image models) or ``None``;
- ``null_cond(cond) -> cond``: the unconditional input of the same batch size (the null class for
  class-conditional models, the empty-prompt embedding for text models);
- ``feature_layers``: names of sub-modules whose outputs are intermediate features, the last one being the
  bottleneck used by DMD2's GAN head (see :class:`FeatureTap`).

Classifier-free guidance is applied to the x0 predictions: ``x0 = uncond + s * (cond - uncond)``.  Because x0 is
affine in the network output at fixed x_t, this equals guidance on epsilon, v or flow predictions.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .param import check_prediction, to_x0
from .schedules import Schedule, _as_batch, _bcast

Tensor = torch.Tensor
Cond = dict[str, Tensor] | None


def cond_cat(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditioning dicts along the batch dimension."""
    if a is None:
        return None
    return {k: torch.cat([a[k], b[k]]) for k in a}


def cond_index(cond: Cond, idx) -> Cond:
    """Select samples ``idx`` of every tensor in a conditioning dict."""
    if cond is None:
        return None
    return {k: v[idx] for k, v in cond.items()}


class Denoiser(nn.Module):
    """Wrap ``backbone`` so that calling it returns x0 in float32 whatever the backbone predicts."""

    def __init__(self, backbone: nn.Module, schedule: Schedule, prediction: str):
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.prediction = check_prediction(prediction)

    def forward(self, x_t: Tensor, t, cond: Cond = None, guidance: float = 1.0) -> Tensor:
        if guidance == 1.0 or cond is None:
            return self._x0(x_t, t, cond)
        tb = _as_batch(t, x_t)
        both = self._x0(torch.cat([x_t, x_t]), torch.cat([tb, tb]), cond_cat(cond, self.backbone.null_cond(cond)))
        x0_c, x0_u = both.chunk(2)
        return x0_u + guidance * (x0_c - x0_u)

    def predict(self, x_t: Tensor, t, cond: Cond) -> Tensor:
        """The backbone's raw output (in its own prediction kind) at (x_t, t), float32."""
        sched = self.schedule
        tb = _as_batch(t, x_t)
        x_in = (x_t.double() * _bcast(sched.c_in(tb), x_t)).float()
        return self.backbone(x_in, sched.model_time(tb).to(x_t.device), cond).float()

    def features(self, x_t: Tensor, t, cond: Cond, names) -> list[Tensor]:
        """The outputs of the backbone's sub-modules ``names`` at (x_t, t), from a pass that stops once it has them
        all (:class:`FeatureTap` with ``stop``): the discriminators' features, whose network output is not used."""
        with FeatureTap(self.backbone, names, stop=True) as tap:
            self.predict(x_t, t, cond)
        return tap.features

    def _x0(self, x_t: Tensor, t, cond: Cond) -> Tensor:
        tb = _as_batch(t, x_t)
        alpha, sigma = self.schedule.alpha_sigma(tb)
        return to_x0(self.predict(x_t, tb, cond), self.prediction, x_t.float(), alpha, sigma).float()

    def eps(self, x_t: Tensor, t, x0: Tensor) -> Tensor:
        """The noise implied by an x0 prediction at (x_t, t)."""
        tb = _as_batch(t, x_t)
        a, s = self.schedule.alpha_sigma(tb)
        return ((x_t.double() - _bcast(a, x_t) * x0.double()) / _bcast(s, x_t)).float()


class FeaturePassStop(Exception):
    """Raised by a stopping :class:`FeatureTap` once it holds every feature (``features``); its ``__exit__`` catches
    it.  A module forward hook registered with ``always_call`` sees it in ``sys.exc_info()`` (``dmdx plan`` takes the
    stopped pass's graph from its features)."""

    def __init__(self, tap: FeatureTap):
        super().__init__("feature pass stopped after its last feature")
        self.tap = tap
        self.features = tap.features


def _sharded(module: nn.Module) -> bool:
    """Whether ``module`` or a sub-module is an FSDP2 unit (``fully_shard``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule  # torch's own: a no-op import after the first

    return any(isinstance(m, FSDPModule) for m in module.modules())


class FeatureTap(contextlib.AbstractContextManager):
    """Collect the outputs of named sub-modules during forward passes inside the ``with`` block.

    ``with FeatureTap(backbone, names) as tap: net(...); tap.features`` gives the tensors in ``names`` order.
    Gradients flow through the captured tensors as through the forward pass itself.

    ``stop=True``: a pass whose output is not needed ends as soon as every feature is captured (the forward hook of
    the last one raises, ``__exit__`` catches it): DMD2's GAN head reads a UNet's mid block, so the up blocks, about
    half the network, are skipped.  The rest of the ``with`` block is skipped too, so it should hold the network's
    call alone (``Denoiser.features``).  Layers after the last feature never run; every hook a layer registers with
    ``always_call`` (the float32 block's casts) and every ``finally`` still run, so nothing is left half-done.  The
    features and their gradients are those of a whole pass, bit for bit.  After the stop the tap captures and raises
    nothing more, so a recomputation by gradient checkpointing (which runs the forward hooks again) keeps the
    forward's tensors.  A network sharded with FSDP2 (``train.parallel=fsdp``) runs whole: an exception inside an
    FSDP2 unit's forward skips its post-forward hook and leaves FSDP's state mid-forward until the next backward (on a
    GPU the next pass would skip the root unit's stream synchronisation).
    """

    def __init__(self, module: nn.Module, names, stop: bool = False):
        self.module = module
        self.names = list(names)
        self.stop = stop
        self.features: list[Tensor | None] = [None] * len(self.names)
        self._handles = []
        self._stopped = False

    def __enter__(self):
        mods = dict(self.module.named_modules())
        missing = [name for name in self.names if name not in mods]
        if missing:
            raise ValueError(f"no sub-module {missing[0]!r} in {type(self.module).__name__}")
        self.stop = self.stop and not _sharded(self.module)
        self._stopped = False
        self._handles = [mods[name].register_forward_hook(self._hook(i)) for i, name in enumerate(self.names)]
        return self

    def _hook(self, i):
        def hook(_mod, _inp, out):
            if self._stopped:  # a recomputation in the backward (gradient checkpointing): keep the forward's
                return
            self.features[i] = out[0] if isinstance(out, tuple) else out
            if self.stop and all(f is not None for f in self.features):
                self._stopped = True
                raise FeaturePassStop(self)

        return hook

    def __exit__(self, exc_type, exc, tb):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return isinstance(exc, FeaturePassStop) and exc.tap is self

"""torch.distributed plumbing for the training loop: the process group, replication and sharding of trainable
networks, gradient averaging, shared random draws and the agreement on non-finite losses.

Methods never import this module: the loop wraps their networks and gives the :class:`~dmdx.methods.base.Context`
a ``shared_randint`` hook for the random choices all ranks must share (DMD2's backward-simulation index).

``train.parallel``:

- ``none``: one process (the single-process code path, unchanged).
- ``ddp``: every rank holds the full trainable networks (rank 0's initial weights broadcast to all); after each
  phase's backward (after all its accumulation micro-steps) the gradients of the phase's networks are averaged
  over ranks by bucketed all-reduce, exactly what ``DistributedDataParallel`` computes.  The loop does this
  itself rather than through the ``DistributedDataParallel`` wrapper because a phase may call one network several
  times (DMD2's GAN critic scores real and fake samples with the fake score) and may run a network whose
  parameters are frozen for the phase with gradients flowing through it to the input (the generator loss through
  the fake score); the wrapper's reducer supports neither without ``find_unused_parameters`` and the
  ``requires_grad`` toggling the loop does per phase.
- ``fsdp``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) on each trainable network (on a denoiser's
  backbone, the module every call goes through, plus its large repeated blocks); parameters, gradients and
  optimiser states are sharded, gradients reduce-scattered by FSDP itself.  ``train.bf16`` uses FSDP's
  ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: float32 master weights and reductions.
  ``train.cpu_offload`` adds ``CPUOffloadPolicy``.
- ``auto`` (the default): ``ddp`` when ``WORLD_SIZE > 1`` (torchrun), else ``none``.

The frozen teacher is never wrapped: every rank holds a replica, so feature taps on it work unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass

import torch
from torch import nn

PARALLEL_MODES = ("none", "ddp", "fsdp", "auto")
BUCKET_ELEMENTS = 25 * 2**20 // 4  # ~25 MB of float32 per all-reduce, DDP's default bucket size
# collectives wait this long for a slow rank (rank 0 may collect teacher pairs while the others wait at a barrier)
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass
class World:
    """Where this process sits: its rank, the world size and the resolved parallel mode."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp (resolved)

    @property
    def comm_device(self) -> torch.device:
        """Where small collective tensors live (NCCL only moves CUDA tensors)."""
        if self.distributed and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device_mesh(self, device_type: str):
        """The 1-D device mesh of this world (made once: ``dmdx plan`` makes it before its tensors turn fake)."""
        meshes = self.__dict__.setdefault("_meshes", {})
        if device_type not in meshes:
            from torch.distributed.device_mesh import init_device_mesh

            meshes[device_type] = init_device_mesh(device_type, (self.size,))
        return meshes[device_type]

    @property
    def distributed(self) -> bool:
        """A process group is in use (even of one process, for FSDP2 on one device)."""
        return self.parallel != "none"

    # -- collectives (no-ops in one process) -----------------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed and self.size > 1:
            torch.distributed.barrier()

    def shared_randint(self, high: int) -> int:
        """``int(torch.randint(high, ()))`` drawn on every rank (so every rank's RNG advances alike) and rank 0's
        value broadcast: one draw shared by all ranks."""
        k = torch.randint(high, ())
        if self.size > 1:
            k = self._broadcast_object(int(k))
        return int(k)

    def _broadcast_object(self, obj):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def ranks_where(self, flag: bool) -> list[int]:
        """The ranks on which ``flag`` is true (the same list on every rank)."""
        if self.size == 1:
            return [0] if flag else []
        t = torch.zeros(self.size, dtype=torch.float64)
        t[self.rank] = float(flag)
        t = t.to(self.comm_device)
        torch.distributed.all_reduce(t)
        return [i for i, v in enumerate(t.tolist()) if v > 0]

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over ranks (a key missing on some ranks is averaged over those that have it)."""
        if self.size == 1:
            return values
        every: list[dict] = [{} for _ in range(self.size)]
        torch.distributed.all_gather_object(every, values)
        keys = list(dict.fromkeys(k for d in every for k in d))
        return {k: sum(d[k] for d in every if k in d) / sum(k in d for d in every) for k in keys}

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank (replication of freshly initialised networks)."""
        if self.size == 1:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(t.data, src=0)

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """DDP's gradient sync: every gradient replaced by its mean over ranks (bucketed, flat all-reduces)."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        bucket: list[torch.Tensor] = []
        n = 0
        for g in grads + [None]:
            if g is not None and (not bucket or (g.dtype == bucket[0].dtype and g.device == bucket[0].device
                                                 and n + g.numel() <= BUCKET_ELEMENTS)):
                bucket.append(g)
                n += g.numel()
                continue
            if bucket:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                torch.distributed.all_reduce(flat)
                flat /= self.size
                off = 0
                for b in bucket:
                    b.copy_(flat[off:off + b.numel()].view_as(b))
                    off += b.numel()
            bucket, n = ([g], g.numel()) if g is not None else ([], 0)


_WORLD: World | None = None


def resolve_parallel(parallel: str, world_size: int) -> str:
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if parallel == "none" and world_size > 1:
        raise ValueError(f"train.parallel='none' but WORLD_SIZE={world_size}: this process was launched as one of "
                         f"{world_size} ranks; use train.parallel=ddp, fsdp or auto")
    return parallel


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def elastic_restart() -> bool:
    """True when torchrun restarted this worker group after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def setup(parallel: str = "auto", device: torch.device | None = None) -> World:
    """Join (or create) the process group for ``parallel``; idempotent.  torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT) defines the group; ``fsdp``/``ddp`` without it make a group of one process."""
    global _WORLD
    dist = torch.distributed
    if _WORLD is not None:
        mode = resolve_parallel(parallel, _WORLD.size)
        if mode == _WORLD.parallel:
            return _WORLD
        if dist.is_initialized():  # the group exists: another mode on it (or the plain path in a group of one)
            _WORLD = World(_WORLD.rank, _WORLD.size, _WORLD.local_rank, mode) if mode != "none" else World()
            return _WORLD
    size = dist.get_world_size() if dist.is_initialized() else env_world_size()
    mode = resolve_parallel(parallel, size)
    if mode == "none":
        _WORLD = World()
        return _WORLD
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        timeout = TIMEOUT
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's store outlives a restart of the workers: a prefix per attempt keeps a restarted group from
            # reading the addresses the previous attempt's (dead) workers published there
            base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
                                 timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"dmdx/attempt_{attempt}", base),
                                    rank=int(os.environ["RANK"]), world_size=size, timeout=timeout)
        elif "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # one process, no launcher: a group of one (FSDP2 on a single device)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local, mode)
    return _WORLD


def current() -> World:
    return _WORLD if _WORLD is not None else World()


def teardown() -> None:
    """Leave the process group (at the end of a run, or after an error that every rank agreed on)."""
    global _WORLD
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # networks wrapped by DDP/FSDP that only reference cycles still hold (a finished Trainer) hold the group: free
        # them now, while the group and the interpreter are alive; freed at interpreter exit instead, gloo's threads
        # sometimes abort the process ("terminate called without an active exception", exit status 134)
        gc.collect()
        torch.distributed.destroy_process_group()
    _WORLD = None


@contextlib.contextmanager
def rank_zero_first(world: World):
    """Rank 0 runs the block first (filling caches: surrogate, pairs, prompt embeddings), then the other ranks
    (which find the caches and read them)."""
    if not world.main:
        world.barrier()
    yield
    if world.main:
        world.barrier()


def per_rank_batch(batch_size: int, world: int, grad_accum: int) -> int:
    """``train.batch_size`` is the global batch of one optimiser update: each of ``world`` ranks runs
    ``grad_accum`` micro-batches of ``batch_size / (world * grad_accum)`` samples."""
    if grad_accum < 1:
        raise ValueError(f"train.grad_accum must be >= 1, got {grad_accum}")
    parts = world * grad_accum
    if batch_size % parts:
        raise ValueError(f"train.batch_size={batch_size} (the global batch) must be divisible by world size x "
                         f"grad_accum = {world} x {grad_accum} = {parts}; e.g. train.batch_size="
                         f"{max(parts, batch_size // parts * parts)}")
    return batch_size // parts


# -- FSDP2 ----------------------------------------------------------------------------------------------------
UNIT_MIN_PARAMS = 2**20  # a ModuleList element this large gets its own FSDP unit


def fsdp_units(module: nn.Module, min_params: int | None = None) -> list[nn.Module]:
    """Sub-modules that get their own FSDP unit (gathered one at a time): the outermost elements of ModuleLists
    (UNet and transformer blocks) with at least ``min_params`` (default ``UNIT_MIN_PARAMS``) parameters.  Small
    networks form one unit.  Outermost only: a ModuleList inside a chosen block (an attention's ``to_out``) would
    be wrapped after its block, whose parameters are then already sharded (FSDP2 units nest bottom-up only)."""
    min_params = UNIT_MIN_PARAMS if min_params is None else min_params
    units: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(m, nn.ModuleList) and sum(p.numel() for p in child.parameters()) >= min_params:
                units.append(child)
            else:
                visit(child)

    visit(module)
    return units


def shard(net: nn.Module, world: World, bf16: bool, cpu_offload: bool, device: torch.device) -> nn.Module:
    """``fully_shard`` a trainable network in place (names and sub-module objects are kept, so feature taps still
    find their layers).  A denoiser is sharded at its backbone, the module its ``forward``/``predict`` call."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = world.device_mesh(device.type)
    kw = {"mesh": mesh}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")  # pinning needs an accelerator
    root = net.backbone if hasattr(net, "backbone") and isinstance(net.backbone, nn.Module) else net
    for unit in fsdp_units(root):
        fully_shard(unit, **kw)
    fully_shard(root, **kw)
    # FSDP2 fixes each unit's gradient dtypes (mixed precision) at its first forward, from the parameters that
    # require grad then; a network's first forward may come in a phase that freezes it (the fake score in the
    # student phase), which would leave bf16 gradients un-cast.  Initialise now, while it is trainable.
    root._get_fsdp_state()._lazy_init()
    from torch.distributed.tensor import DTensor

    loose = [n for n, p in net.named_parameters() if not isinstance(p, DTensor)]
    assert not loose, f"parameters outside the FSDP units: {loose}"
    return net


def reshard(net: nn.Module) -> None:
    """Free the gathered parameters of a sharded network.  FSDP2 keeps the root unit's parameters gathered after
    a forward (expecting the backward), so a forward without backward (the student's samples for the critic)
    would otherwise leave the full network on every rank until its next backward."""
    root = net.backbone if hasattr(net, "backbone") and isinstance(net.backbone, nn.Module) else net
    if hasattr(root, "reshard"):
        root.reshard()


def is_sharded(net: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in net.parameters())


def full_tensor(x):
    """A plain tensor from a (maybe) DTensor, e.g. FSDP2's gradient norm."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors`` (the local shard of DTensors)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        loc = t.to_local() if hasattr(t, "to_local") else t
        total += loc.numel() * loc.element_size()
    return total


__all__ = ["World", "PARALLEL_MODES", "setup", "current", "teardown", "rank_zero_first", "per_rank_batch",
           "resolve_parallel", "elastic_restart", "shard", "is_sharded", "full_tensor", "local_bytes"]

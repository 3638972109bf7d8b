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

Life on a cluster (docs/scaling.md, "On a cluster"): collectives time out after ``train.dist_timeout`` seconds; a
collective that fails (a timeout, or a peer whose connection closed) is reported by :func:`describe_failure`, which
asks the other ranks through the process group's store (the group itself is unusable after a gloo timeout) which of
them are still there, and names those that are not.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import TrainConfig

PARALLEL_MODES = ("none", "ddp", "fsdp", "auto")
BUCKET_ELEMENTS = 25 * 2**20 // 4  # ~25 MB of float32 per all-reduce, DDP's default bucket size
# after a failed collective, how long a rank waits for the others to say (through the store) that they are still
# there: a quarter of the collective timeout, at most 10 s (ranks that timed out in one collective do so within
# moments of each other; the neighbours of a rank that died learn it at once, the others when those give up)
REPORT_WAIT_MAX = 10.0


@dataclass
class World:
    """Where this process sits: its rank, the world size and the resolved parallel mode."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp (resolved)
    timeout: float = TrainConfig.dist_timeout  # seconds a collective waits (the group's timeout)
    store: object | None = field(default=None, repr=False, compare=False)  # the group's store (failure reports)

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

    def per_rank(self, value: float) -> list[float]:
        """Every rank's ``value``, indexed by rank (the same list on every rank): one all-reduce of ``size``
        floats."""
        if self.size == 1:
            return [float(value)]
        t = torch.zeros(self.size, dtype=torch.float64)
        t[self.rank] = float(value)
        t = t.to(self.comm_device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def ranks_where(self, flag: bool) -> list[int]:
        """The ranks on which ``flag`` is true (the same list on every rank)."""
        return [i for i, v in enumerate(self.per_rank(float(flag))) if v > 0]

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
        """DDP's gradient sync: every gradient replaced by its mean over ranks (bucketed, flat all-reduces).

        ``params`` is the same list on every rank (a network's ``parameters()``); each rank may have gradients for
        any subset of them (a branch taken by some samples only).  The ranks first agree which parameters got a
        gradient anywhere (one all-reduce of one byte per parameter, as DDP's "locally used" map); a rank without
        one contributes zeros, so the mean is the gradient on the ranks' concatenated batch.  A parameter no rank
        gave a gradient keeps ``grad=None`` (the optimiser skips it, as in one process)."""
        if self.size == 1:
            return
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=self.comm_device)
        torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
        flags = used.tolist()
        for p, u in zip(params, flags):
            if u and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p, u in zip(params, flags) if u]
        bucket: list[torch.Tensor] = []
        n = 0
        for g in grads + [None]:
            if g is not None and (not bucket or (g.dtype == bucket[0].dtype and g.device == bucket[0].device
                                                 and n + g.numel() <= BUCKET_ELEMENTS)):
                bucket.append(g)
                n += g.numel()
                continue
            if bucket:
                flats = [b.reshape(-1) for b in bucket]
                flat = torch.cat(flats)
                # back into the gradients, one kernel a bucket: a contiguous one through its flat view (reshape
                # made a view: no view per gradient to make again), another through a view of its part (reshape
                # made a copy, not kept)
                same = [b.is_contiguous() for b in bucket]
                flats = [f if c else b for f, b, c in zip(flats, bucket, same)]
                torch.distributed.all_reduce(flat)
                flat /= self.size
                parts = flat.split([b.numel() for b in bucket])
                torch._foreach_copy_(flats, [v if c else v.view_as(b) for v, b, c in zip(parts, bucket, same)])
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


def setup(parallel: str = "auto", device: torch.device | None = None, timeout: float | None = None) -> World:
    """Join (or create) the process group for ``parallel``; idempotent.  torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT) defines the group; ``fsdp``/``ddp`` without it make a group of one process.
    ``timeout``: seconds a collective waits (``train.dist_timeout``; fixed when the group is created).  The device
    is ``cuda:LOCAL_RANK`` (the process's index on its own node), never the global rank."""
    global _WORLD
    dist = torch.distributed
    if _WORLD is not None:
        mode = resolve_parallel(parallel, _WORLD.size)
        if mode == _WORLD.parallel:
            return _WORLD
        if dist.is_initialized():  # the group exists: another mode on it (or the plain path in a group of one)
            w = _WORLD
            _WORLD = (World(w.rank, w.size, w.local_rank, mode, w.timeout, w.store) if mode != "none" else World())
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
    seconds = float(TrainConfig.dist_timeout if timeout is None else timeout)
    if seconds <= 0:
        raise ValueError(f"train.dist_timeout must be > 0 seconds, got {timeout}")
    store = None
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        delta = datetime.timedelta(seconds=seconds)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if "MASTER_ADDR" in os.environ:
            rank = int(os.environ["RANK"])
            agent = attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            # under torchrun the agent (of global rank 0's node) holds the store, so it outlives a stuck or lost
            # worker; launched without an agent, rank 0 holds it (as init_process_group's env:// would)
            base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                                 is_master=not agent and rank == 0, timeout=delta, multi_tenant=True)
            # torchrun's store outlives a restart of the workers: a prefix per attempt keeps a restarted group from
            # reading the addresses the previous attempt's (dead) workers published there
            store = dist.PrefixStore(f"dmdx/attempt_{attempt or 0}", base)
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=delta)
        else:  # one process, no launcher: a group of one (FSDP2 on a single device)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=delta)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local, mode, seconds, store)
    return _WORLD


# -- failed collectives ---------------------------------------------------------------------------------------
_COLLECTIVE_ERRORS = re.compile(r"gloo|NCCL|Connection closed by peer|Connection reset by peer|Timed out waiting|"
                                r"pair closure|Socket Timeout|Broken pipe", re.IGNORECASE)


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` came from a collective that could not complete (a timeout, a lost peer), as opposed to an
    error of this rank's own computation.  gloo raises plain RuntimeErrors: they are told apart by their text."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and bool(_COLLECTIVE_ERRORS.search(str(error)))


def _short(error: BaseException) -> str:
    """gloo's message without its source path and advice: 'Timed out waiting 10000ms for recv operation ...'."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0][:200]


def describe_failure(world: World, step: int, error: BaseException, waited: float, stop=None) -> str:
    """One line for a collective that failed on this rank at ``step`` after ``waited`` seconds: which ranks did not
    answer.  Every rank that sees its collective fail posts ``failed/RANK`` in the group's store and watches for the
    others' posts for up to ``min(REPORT_WAIT_MAX, timeout / 4)`` seconds, or until ``stop()`` is true (a stop
    signal: torchrun ends the other workers when one died); ranks that never post are stopped, hung or gone.  (torch's ``monitored_barrier`` cannot help here: after a gloo timeout the group's connections are
    closed, "Application timeout caused pair closure".)  A store that does not answer either is said so: under
    torchrun it lives in the torchrun of global rank 0's node."""
    head = (f"rank {world.rank} of {world.size}: a collective in step {step} failed after {waited:.1f} s "
            f"({_short(error)})")
    if world.store is None:
        return head
    budget = min(REPORT_WAIT_MAX, world.timeout / 4)
    result: dict = {}

    def ask() -> None:  # in a thread: a store whose host is frozen may not answer at all
        try:
            world.store.set(f"failed/{world.rank}", str(step))
            others = [r for r in range(world.size) if r != world.rank]
            deadline = time.monotonic() + budget
            seen: dict[int, int] = {}
            while True:
                for r in others:
                    if r not in seen and world.store.check([f"failed/{r}"]):
                        seen[r] = int(world.store.get(f"failed/{r}"))
                if len(seen) == len(others) or time.monotonic() > deadline:
                    break
                if stop is not None and stop():
                    result["cut"] = True
                    break
                time.sleep(0.1)
            result["seen"] = seen
        except Exception as e:  # noqa: BLE001 - the store's host is gone too
            result["error"] = e

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(budget + 5)
    if "seen" in result:
        seen = result["seen"]
        silent = [r for r in range(world.size) if r != world.rank and r not in seen]
        if silent and result.get("cut"):
            return f"{head}; rank(s) {silent} had not answered when a stop signal came (stopped, hung or gone?)"
        if silent:
            return (f"{head}; rank(s) {silent} did not answer within {budget:.0f} s (stopped, hung or gone: see "
                    "their logs)")
        gave_up = ", ".join(f"rank {r} at step {s}" for r, s in sorted(seen.items()))
        return (f"{head}; every other rank had given up on a collective too ({gave_up}): this rank is the one that "
                "did not answer in time (stopped or hung)")
    why = _short(result["error"]) if "error" in result else f"no answer in {budget + 5:.0f} s"
    return (f"{head}; the store did not answer either ({why}): the node holding it (under torchrun, that of global "
            "rank 0) is stopped or gone")


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
           "resolve_parallel", "elastic_restart", "shard", "is_sharded", "full_tensor", "local_bytes",
           "is_collective_failure", "describe_failure"]

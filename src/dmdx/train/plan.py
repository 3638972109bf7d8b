"""``dmdx plan``: the memory and compute of one training iteration, before the run, without a GPU and without weights.

The run is set up as ``dmdx distill`` sets it up (the teacher, the student, every stage's networks, the loop's EMA,
optimisers, DDP or FSDP2 over a fake process group of ``gpus`` ranks) from the pipeline folder's configs alone, on
fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no storage).  Then every phase of
every stage runs once through the training loop's own ``Trainer.run_phase`` (forward, backward, clipping, optimiser
step, EMA update) while one dispatch mode follows every tensor storage this rank holds and counts the FLOPs of every
operation (``torch.utils.flop_counter``'s formulas), each attributed to the network whose forward or backward
issued it.  What the steady state holds is in place before a phase runs: every network's gradients (a network's
survive until its next phase) and the optimisers' states.

Not PyTorch's ``MemTracker`` / ``FSDPMemTracker`` (``torch.distributed._tools``): they refuse a module that runs
twice while tracked, and every method calls its fake score several times per phase.  The storages are tracked
the same way (weak references to untyped storages, ``UntypedStorage.resize_`` followed for FSDP2's gathered
parameters).

What it counts is the device memory of the loop's tensors.  Not counted: the CUDA context and kernels' workspaces
(cuBLAS, cuDNN: a few hundred MB), the caching allocator's fragmentation, and the set-up before training (the text
encoders run once, before the networks load).  Host tensors (the prompt bank, teacher pairs, real-data latents)
are reported apart.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConverter, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, shape_wrapper

from ..data import Dataset
from ..denoiser import Denoiser
from ..methods import get_method
from ..methods.base import Context, Pairs
from ..models import ModelInfo
from ..nets.pipeline import BACKBONES as IMAGE_BACKBONES
from ..nets.pipeline import FAMILY_BACKBONE as IMAGE_FAMILY
from ..nets.video import BACKBONES as VIDEO_BACKBONES
from ..nets.video import FAMILY_BACKBONE as VIDEO_FAMILY
from ..pipelines import image as pimage
from ..pipelines import video as pvideo
from ..pipelines.folder import check_folder
from . import dist
from .loop import Trainer
from .setup import student_times, trainable_student

Tensor = torch.Tensor
GiB = 2**30
H100_BF16_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor cores (NVIDIA's data sheet; 1979 is with sparsity)
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to 512 bytes


# -- fake tensors ---------------------------------------------------------------------------------------------
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


class _FakeMode(FakeTensorMode):
    """``FakeTensorMode`` with a cheaper key for its dispatch cache (the cache answers 93% of the plan's fake
    operations; building torch's key took a third of the profiled plan).

    ``FakeTensorMode`` keys an operation by every argument, a fake tensor by all its metadata
    (``extract_tensor_metadata``: dtype, shape, strides, device, layout, memory format, storage offset and size,
    requires_grad, conj / neg / inference / quantized / sparse flags), built field by field in Python.  Here a
    strided fake tensor of this mode is one tuple of the same metadata but its memory format (a function of its
    shape and strides) and its sparse fields (constant for a strided tensor); any other argument is keyed as
    ``FakeTensorMode`` keys it.  Same operations and arguments, same key: the cache answers what it answered.
    Without symbolic shapes only (the plan has none): otherwise ``FakeTensorMode``'s own key.

    Its ``__torch_dispatch__`` goes straight to ``FakeTensorMode.dispatch``: not through
    ``torch._dynamo.disable`` (the plan never compiles) and the call counter around ``FakeTensorMode``'s."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.dispatch(func, types, args, kwargs or {})

    def _prep_args_for_hash(self, result, args, state, id_hashed_objects):
        if self.shape_env is not None:
            return super()._prep_args_for_hash(result, args, state, id_hashed_objects)
        if isinstance(args, (list, tuple, dict)):
            result.append(type(args))
            result.append(len(args))
            if isinstance(args, dict):
                self._prep_args_for_hash(result, tuple(args.keys()), state, id_hashed_objects)
                self._prep_args_for_hash(result, tuple(args.values()), state, id_hashed_objects)
                return
        for arg in args:
            if isinstance(arg, FakeTensor) and arg.fake_mode is self and arg.constant is None \
                    and arg.layout is torch.strided:
                result.append((arg.dtype, arg.shape, arg.stride(), arg.fake_device, arg.storage_offset(),
                               arg.untyped_storage().nbytes(), arg.requires_grad, arg.is_conj(), arg.is_neg(),
                               arg.is_inference(), arg.is_quantized))
            elif isinstance(arg, (list, tuple, dict)):
                self._prep_args_for_hash(result, arg, state, id_hashed_objects)
            elif isinstance(arg, _PLAIN):
                result.append(type(arg))
                result.append(arg)
            else:  # FakeTensorMode's key, or its reason not to cache
                super()._prep_args_for_hash(result, (arg,), state, id_hashed_objects)


def _fast_key_fits() -> bool:
    """Whether this torch's ``FakeTensorMode`` keys its cache as :class:`_FakeMode` expects."""
    f = getattr(FakeTensorMode, "_prep_args_for_hash", None)
    try:
        names = list(inspect.signature(f).parameters) if f is not None else []
    except (TypeError, ValueError):
        return False
    return names == ["self", "result", "args", "state", "id_hashed_objects"] and callable(
        getattr(FakeTensorMode, "dispatch", None))


def _fake_mode():
    """A ``FakeTensorMode`` (:class:`_FakeMode` where this torch allows it) whose parameters ``Module.to`` /
    ``.float()`` can swap.

    ``Module._apply`` swaps fake parameters in place (``torch.utils.swap_tensors``), which refuses a tensor with a
    weak reference, and the fake-tensor converter memoises every output it wraps in a weak-value dict.  Here every
    tensor is born fake (nothing real is converted), so that memo is not needed.
    """
    class _Converter(FakeTensorConverter):
        def set_tensor_memo(self, t, v):
            pass

    mode = _FakeMode() if _fast_key_fits() else FakeTensorMode()
    mode.fake_tensor_converter = _Converter()
    return mode


def _fake_copy(t: Tensor, memo: dict) -> Tensor:
    if id(t) not in memo:
        with torch.no_grad():
            out = t.clone()
        memo[id(t)] = nn.Parameter(out, t.requires_grad) if isinstance(t, nn.Parameter) \
            else out.requires_grad_(t.requires_grad)
    return memo[id(t)]


_FAKE_METHODS = {"item": lambda t: 1.0, "__float__": lambda t: 1.0, "__int__": lambda t: 1, "__index__": lambda t: 1,
                 "__bool__": lambda t: True, "__deepcopy__": _fake_copy}


@contextlib.contextmanager
def _fake_methods():
    """What fake tensors cannot do by themselves, done for the plan: Python numbers out of them (``loss.item()``
    for the logs, Adam's step count: 1; ``bool(isfinite(loss))``: True), which nothing the plan measures depends on;
    and ``copy.deepcopy`` (the trainable copies, the EMA) into this fake mode, not a new one.

    Set on ``FakeTensor`` for the plan's duration (a fake parameter is a ``FakeTensor`` too), not as a
    ``TorchFunctionMode``: a function mode puts a Python call around every torch function the run makes (about a
    tenth of the plan's time)."""
    saved = {k: FakeTensor.__dict__[k] for k in _FAKE_METHODS if k in FakeTensor.__dict__}
    for k, f in _FAKE_METHODS.items():
        setattr(FakeTensor, k, f)
    try:
        yield
    finally:
        for k in _FAKE_METHODS:
            if k in saved:
                setattr(FakeTensor, k, saved[k])
            else:
                delattr(FakeTensor, k)


class _PlanMode(TorchDispatchMode):
    """A dispatch mode of the plan.  Most dispatches of a fake run are ``prim.device`` (C++ asking a fake tensor
    its device: two of three in an SDXL forward + backward); each mode answers them at once instead of passing them
    down the stack.  Not wrapped in ``torch._dynamo.disable`` (the plan never compiles; the wrapper costs a few
    microseconds per dispatch and mode)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


_PRIM_DEVICE = torch.ops.prim.device.default


def _fake_device(t: FakeTensor) -> torch.device:
    """What ``FakeTensorMode`` answers to ``prim.device`` (``fake_tensor._device_handler``)."""
    return torch.device("meta") if t.fake_mode.in_kernel_invocation else t.fake_device


_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
# ``_unsafe_view`` (a matmul's reshape of its result) is ``view`` for everything but autograd, which has run when a
# dispatch mode sees it; ``FakeTensorMode`` does not cache it (4,000 full fake dispatches an SDXL DMD2 iteration)
_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default
_VIEW = torch.ops.aten.view.default


def _zero(t: Tensor):
    """The number a fake tensor stands for where C++ asks for one (a 0-dim index, ``schedules``' table look-ups):
    zero of its dtype."""
    return False if t.dtype == torch.bool else (0 if not t.is_floating_point() else 0.0)


# -- FLOPs ----------------------------------------------------------------------------------------------------
_SHAPE_WRAPPER = shape_wrapper(lambda: 0).__code__


def _shapes(x):
    """``x`` with every tensor replaced by its shape, in lists, tuples and dicts at any depth (what
    ``flop_counter.shape_wrapper`` passes a formula, without its ``tree_map``)."""
    if isinstance(x, torch.Tensor):
        return x.shape
    if type(x) in (list, tuple):
        return type(x)(_shapes(v) for v in x)
    if type(x) is dict:
        return {k: _shapes(v) for k, v in x.items()}
    return x


def _formula(f):
    """A ``flop_registry`` formula as ``f(*args, out_val=..., **kwargs)``; one registered through
    ``shape_wrapper`` gets the shapes from :func:`_shapes`."""
    raw = getattr(f, "__wrapped__", None)
    if raw is None or getattr(f, "__code__", None) is not _SHAPE_WRAPPER:
        return f

    def shaped(*args, out_val=None, **kwargs):
        return raw(*_shapes(args), out_shape=_shapes(out_val), **_shapes(kwargs))

    return shaped


# -- the tracker ----------------------------------------------------------------------------------------------
def is_host(label: str) -> bool:
    return label == "host" or label.startswith("host:")


@dataclass
class _Storage:
    nbytes: int
    born: int
    label: str  # "weights:NET", "grads:NET", "optim:NET", "host" or "host:KIND:NET" (host memory: the prompt
    # bank, pairs, real latents; train.cpu_offload's shards), or "" (activations and temporaries)
    died: int | None = None


class _Tracker(_PlanMode):
    """Every storage created under it (and every one registered with :meth:`add`), with its lifetime in operation
    counts; the running total and its peak per phase; FLOPs per (network, forward / backward).

    ``fake_scalars``: C++'s requests for the number of a fake tensor get zero (:func:`_zero`), here rather than in
    a mode of their own (one Python call fewer on every dispatch).  ``tracking`` off: nothing is tracked (the plan
    enters the tracker before it builds the run; :meth:`tracked` turns tracking on)."""

    def __init__(self, round_to: int = 1, fake_scalars: bool = False):
        super().__init__()
        self.round_to = round_to
        self.fake_scalars = fake_scalars
        self.tracking = True
        self.records: list[_Storage] = []
        self.index: dict[int, int] = {}  # storage _cdata -> record
        self.refs: dict[int, weakref.ref] = {}
        self.seq = 0
        self.total = 0
        self.host = 0
        self.phase: tuple[str, str] | None = None
        self.peaks: dict[tuple[str, str], tuple[int, int]] = {}  # phase -> (device bytes, seq)
        self.flops: dict[tuple[str, str], int] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self.labels: list[str] = []  # the networks whose forward runs, innermost last
        self.new_label = ""  # the label of storages created from now on ("host": an offloaded optimiser step's)
        self._resize = None
        aten = torch.ops.aten
        self.formulas = {k: _formula(f) for k, f in flop_registry.items()}
        # the CPU flash-attention kernels a fake CPU run dispatches to cost what the CUDA ones do
        self.formulas[aten._scaled_dot_product_flash_attention_for_cpu] = \
            self.formulas[aten._scaled_dot_product_flash_attention]
        self.formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            self.formulas[aten._scaled_dot_product_flash_attention_backward]

    # storages
    def _size(self, st) -> int:
        n = st.nbytes()
        return int(math.ceil(n / self.round_to) * self.round_to) if n else 0

    def add(self, t: Tensor, label: str = "") -> None:
        """Track the storage of ``t`` (created before the tracker or outside it) under ``label``."""
        if not isinstance(t, FakeTensor):
            if isinstance(t, torch.Tensor) and hasattr(t, "to_local"):  # DTensor: this rank's shard
                t = t.to_local()
            if not isinstance(t, torch.Tensor):
                return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.index:
            rec = self.records[self.index[key]]
            if label and not rec.label:
                self._relabel(rec, label)
            return
        self.seq += 1  # every event its own number: a peak's breakdown (``alive_at``) sees exactly its storages
        rec = _Storage(self._size(st), self.seq, label or self.new_label)
        self.index[key] = len(self.records)
        self.records.append(rec)
        self._count(rec, +1)
        self.refs[key] = weakref.ref(st, lambda _, k=key: self._free(k))

    def add_live(self, fake: bool = False) -> None:
        """Track every tensor alive in the process (what ``add`` was not given: schedules' tables, caches); with
        ``fake``, every fake one."""
        gc.collect()  # not the garbage of earlier runs in this process
        for obj in gc.get_objects():
            if isinstance(obj, FakeTensor if fake else torch.Tensor) and obj.device.type != "meta":
                self.add(obj)

    def _relabel(self, rec: _Storage, label: str) -> None:
        self._count(rec, -1)
        rec.label = label
        self._count(rec, +1)

    def label(self, t: Tensor, label: str) -> None:
        self.add(t, label)

    def to_host(self, t: Tensor) -> None:
        """Count ``t``'s storage (this rank's shard of a DTensor) in host memory from now on, under its label."""
        self.add(t)
        rec = self.records[self.index[_local(t).untyped_storage()._cdata]]
        if not is_host(rec.label):
            self._relabel(rec, f"host:{rec.label}")

    def _count(self, rec: _Storage, sign: int) -> None:
        if is_host(rec.label):
            self.host += sign * rec.nbytes
        else:
            self.total += sign * rec.nbytes

    def _free(self, key: int) -> None:
        i = self.index.pop(key, None)
        self.refs.pop(key, None)
        if i is None:
            return
        rec = self.records[i]
        self.seq += 1
        rec.died = self.seq
        self._count(rec, -1)

    def _resized(self, st, size) -> None:
        i = self.index.get(st._cdata) if self.tracking else None
        if i is None:
            return
        rec = self.records[i]
        self._count(rec, -1)
        self.seq += 1
        rec.died = self.seq  # a resize ends one lifetime and starts another (FSDP2 frees / gathers in place)
        new = _Storage(self._size(st), self.seq, rec.label)
        self.index[st._cdata] = len(self.records)
        self.records.append(new)
        self._count(new, +1)
        self._peak()

    def _peak(self) -> None:
        if self.phase is not None and self.total > self.peaks.get(self.phase, (-1, 0))[0]:
            self.peaks[self.phase] = (self.total, self.seq)

    def __enter__(self):
        orig = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st, size):
            orig(st, size)
            tracker._resized(st, size)

        self._resize = orig
        torch.UntypedStorage.resize_ = resize_
        self._propagator = _sharding_propagator()
        if self._propagator is not None:
            self._lock = self._propagator._fake_mode_lock
            self._propagator._fake_mode_lock = _Unseen(self, self._lock)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        if self._propagator is not None:
            self._propagator._fake_mode_lock = self._lock
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def tracked(self):
        self.tracking = True
        try:
            yield self
        finally:
            self.tracking = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _PRIM_DEVICE and isinstance(args[0], FakeTensor):  # no storage, no FLOPs
            return _fake_device(args[0])
        if func is _LOCAL_SCALAR and self.fake_scalars and isinstance(args[0], FakeTensor):
            return _zero(args[0])
        if func is _UNSAFE_VIEW:
            func = _VIEW
        if not self.tracking:
            return func(*args, **(kwargs or {}))
        if any(hasattr(t, "to_local") and t is not torch.Tensor for t in types):  # DTensor: see its local ops
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        self.seq += 1
        if isinstance(out, FakeTensor):
            self.add(out)
        else:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.add(t)
        self._peak()
        formula = self.formulas.get(func._overloadpacket) if self.phase is not None else None
        if formula is not None:
            node = torch._C._current_autograd_node()
            if node is not None:
                key = (node.metadata.get("dmdx_net", "other"), "backward")
            else:
                key = (self.labels[-1] if self.labels else "other", "forward")
            self.flops[key] = self.flops.get(key, 0) + int(formula(*args, **(kwargs or {}), out_val=out))
        return out

    # networks
    def watch(self, name: str, net: nn.Module) -> list:
        """Attribute ``net``'s forward (and, through its autograd nodes, its backward) FLOPs to ``name``; a
        denoiser's calls (``forward``, ``predict``) all go through its backbone."""
        net = net.backbone if isinstance(getattr(net, "backbone", None), nn.Module) else net

        def pre(_mod, _args):
            self.labels.append(name)
            key = (name, "forward")
            self.calls[key] = self.calls.get(key, 0) + 1

        def post(_mod, _args, out):
            self.labels.pop()
            if out is None:  # an exception left the call (``always_call``): a pass a FeatureTap stopped has its graph
                out = getattr(sys.exc_info()[1], "features", None)  # in the features
            todo = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            while todo:  # the nodes of this call's graph, up to those of earlier networks
                node = todo.pop()
                if node is None or "dmdx_net" in node.metadata:
                    continue
                node.metadata["dmdx_net"] = name
                todo.extend(n for n, _ in node.next_functions)

        return [net.register_forward_pre_hook(pre), net.register_forward_hook(post, always_call=True)]

    def alive_at(self, seq: int) -> dict[str, int]:
        """Bytes by label of the storages alive after operation ``seq``."""
        out: dict[str, int] = {}
        for r in self.records:
            if r.born <= seq and (r.died is None or r.died > seq):
                out[r.label] = out.get(r.label, 0) + r.nbytes
        return out


def _sharding_propagator():
    """DTensor's ``ShardingPropagator`` class, or None (a torch without it, or without ``torch.distributed``)."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor._sharding_prop import ShardingPropagator
    except ImportError:
        return None
    return ShardingPropagator if hasattr(ShardingPropagator, "_fake_mode_lock") else None


class _Unseen:
    """What the tracker does not see: DTensor's sharding propagation.

    The first time a DTensor operation (FSDP2's parameters, their optimiser step, clipping, EMA) meets a new
    operator and argument layout, DTensor finds its output's shape by running the operator on fake arguments
    (``ShardingPropagator._propagate_tensor_meta_non_cached``), in the fake mode it finds active: the plan's.  On a
    GPU those tensors are fake too (no device memory); in the plan they would be counted as the run's, and only in
    the first plan of a process (DTensor caches what it found), so that a plan would depend on the plans run before
    it.  DTensor enters ``ShardingPropagator._fake_mode_lock`` (a lock for multi-threaded tests, a no-op by default)
    around exactly that run; the tracker puts this in its place, which stops tracking inside (and enters the lock
    it replaced)."""

    def __init__(self, tracker: _Tracker, lock):
        self.tracker = tracker
        self.lock = lock
        self.saved: list[bool] = []

    def __enter__(self):
        self.lock.__enter__()
        self.saved.append(self.tracker.tracking)
        self.tracker.tracking = False
        return self

    def __exit__(self, *exc):
        self.tracker.tracking = self.saved.pop()
        return self.lock.__exit__(*exc)


# -- the report -----------------------------------------------------------------------------------------------
@dataclass
class NetworkMemory:
    """What one network holds on this rank (bytes): its own weights (a shared base is counted once, with the
    teacher), gradients and optimiser states; ``trainable``: its trainable parameters (all ranks)."""

    name: str
    weights: int
    grads: int
    optim: int
    trainable: int
    frozen: bool


@dataclass
class PhasePeak:
    stage: str
    phase: str
    peak: int  # this rank's device bytes at the phase's peak
    weights: int
    grads: int
    optim: int
    activations: int  # everything else alive then: activations, temporaries, gathered FSDP units, fp32 copies


@dataclass
class Plan:
    teacher: str
    family: str
    method: str
    gpus: int
    parallel: str
    batch_per_rank: int
    shape: list[int]
    memory: int
    tflops: float
    networks: dict[str, list[NetworkMemory]]  # per stage
    phases: list[PhasePeak]
    flops: dict[str, dict[str, float]]  # network -> {"forward", "backward", "calls"}, one iteration, this rank
    iteration_flops: float  # every phase once, this rank
    average_flops: float  # per iteration averaged over the run's phase ratios and stages, this rank
    steps: int
    host: int  # bytes held in host memory (prompt bank, pairs, real latents; train.cpu_offload's shards)
    seconds: float  # how long the plan took
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    @property
    def fits(self) -> bool:
        return self.peak <= self.memory

    def floor_seconds(self, flops: float) -> float:
        return flops / (self.tflops * 1e12)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "peak": self.peak, "fits": self.fits,
                "iteration_floor_s": self.floor_seconds(self.iteration_flops)}


def parse_memory(text: str | int | float) -> int:
    """``24GB`` / ``24GiB`` / ``80`` (GiB; what nvidia-smi and torch.cuda report as 80GB) -> bytes."""
    if isinstance(text, (int, float)):
        return int(text * GiB)
    s = str(text).strip().upper().replace("IB", "B")
    units = {"TB": 1024 * GiB, "GB": GiB, "MB": 2**20, "KB": 2**10, "B": 1}
    for u, f in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * f)
            except ValueError:
                break
    try:
        return int(float(s) * GiB)
    except ValueError:
        raise ValueError(f"memory {text!r}: expected a size such as 24GB, 80GiB or 80 (GiB)") from None


def _gb(n: float) -> str:
    return f"{n / GiB:.2f}"


def format_plan(plan: Plan) -> str:
    per = "" if plan.gpus == 1 else " per rank"
    unit, div = next((u, d) for u, d in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)) if plan.peak >= d or d == 2**10)

    def m(n: float, w: int = 9) -> str:
        return f"{n / div:>{w}.2f}"

    lines = [f"dmdx plan: {plan.method} on {plan.teacher} ({plan.family}), {plan.gpus} GPU(s), parallel "
             f"{plan.parallel}, {plan.batch_per_rank} sample(s) per rank, latents {plan.shape}", ""]
    for stage, nets in plan.networks.items():
        lines.append(f"memory{per} ({unit}), stage {stage}:")
        lines.append(f"  {'network':<14}{'weights':>9}{'grads':>9}{'optim':>9}  trainable parameters")
        for n in nets:
            what = "frozen" if n.frozen else f"{n.trainable / 1e6:.2f} M"
            lines.append(f"  {n.name:<14}{m(n.weights)}{m(n.grads)}{m(n.optim)}  {what}")
    lines += ["", f"peaks{per} ({unit}):",
              f"  {'stage':<8}{'phase':<10}{'peak':>9}{'weights':>9}{'grads':>9}{'optim':>9}{'activations':>13}"]
    for p in plan.phases:
        lines.append(f"  {p.stage:<8}{p.phase:<10}{m(p.peak)}{m(p.weights)}{m(p.grads)}{m(p.optim)}"
                     f"{m(p.activations, 13)}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines += ["", f"peak{per}: {_gb(plan.peak)} GiB of {_gb(plan.memory)} GiB: {verdict} "
              f"({_gb(abs(plan.memory - plan.peak))} GiB {'left' if plan.fits else 'short'}; the CUDA context and "
              "kernel workspaces take a few hundred MB more)"]
    if plan.host:
        offloaded = " and the offloaded shards" if any("cpu_offload" in n for n in plan.notes) else ""
        lines.append(f"host memory{per}: {_gb(plan.host)} GiB (prompt bank, pairs, real latents{offloaded})")
    lines += ["", f"compute{per}, one iteration with every phase (TFLOP):",
              f"  {'network':<14}{'forward':>10}{'backward':>10}{'calls':>7}"]
    for name, f in plan.flops.items():
        if not (f["forward"] or f["backward"] or f["calls"]):
            continue
        lines.append(f"  {name:<14}{f['forward'] / 1e12:>10.3f}{f['backward'] / 1e12:>10.3f}{int(f['calls']):>7}")
    it, avg = plan.iteration_flops, plan.average_flops
    lines += [f"  {'total':<14}{it / 1e12:>20.3f}",
              "",
              f"pass floor at {plan.tflops:g} TFLOP/s per GPU (H100 SXM bf16 dense: {H100_BF16_TFLOPS:g}; the floor "
              "assumes every FLOP at that rate):",
              f"  iteration with every phase: {plan.floor_seconds(it):.3f} s; average iteration (phase ratios, "
              f"stages): {plan.floor_seconds(avg):.3f} s",
              f"  {plan.steps} iterations: {plan.floor_seconds(avg) * plan.steps / 3600:.3g} h on {plan.gpus} GPU(s) "
              f"= {plan.floor_seconds(avg) * plan.steps * plan.gpus / 3600:.3g} GPU-hours at the floor"]
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"(planned in {plan.seconds:.1f} s on fake tensors)")
    return "\n".join(lines)


# -- building the run on fake tensors -------------------------------------------------------------------------
def _teacher(cfg, path: Path):
    """(family, teacher Denoiser, latent shape, guidance) of a pipeline folder, from its configs alone."""
    rc = cfg.real
    family = pvideo.video_family(path)
    if family is not None:
        vc = cfg.video
        geo = pvideo.geometry(path, vc.frames, vc.height, vc.width)
        sched, pred = pvideo.schedule_from_folder(path)
        bb = VIDEO_BACKBONES[VIDEO_FAMILY[family]](
            path=str(path), dtype=rc.teacher_dtype, shape=list(geo.shape),
            max_sequence_length=pvideo.text_length(path, family, vc), weights=False)
        return family, Denoiser(bb, sched, pred), tuple(geo.shape), pvideo.DEFAULT_GUIDANCE[family]
    _, family = pimage.denoiser_component(path)
    shape = pimage.latent_shape(path, rc.resolution)
    pimage.check_shape(path, shape)
    sched, pred = pimage.schedule_from_folder(path, shape)
    bb = IMAGE_BACKBONES[IMAGE_FAMILY[family]](path=str(path), dtype=rc.teacher_dtype, shape=list(shape),
                                               guidance=rc.flux_guidance, weights=False)
    guidance = pimage.DEFAULT_GUIDANCE[family] if rc.guidance is None else rc.guidance
    return pimage.pipeline_kind(path), Denoiser(bb, sched, pred), tuple(shape), guidance


def _init_adamw(opt: torch.optim.Optimizer, foreach: bool) -> None:
    """AdamW's per-parameter state as its first step makes it (the steady state holds it; the values do not
    matter: ``empty``, one operation each, not ``zeros``).  ``foreach``: the step as on CUDA, where torch's AdamW
    defaults to its multi-tensor implementation for parameters and DTensors (``_default_to_fused_or_foreach``;
    on fake CPU tensors it would take the per-parameter loop): a few operations for all parameters, and a
    temporary the size of the optimiser's parameters (``sqrt`` of the second moments) during the step."""
    for group in opt.param_groups:
        if foreach and group.get("foreach") is None:
            group["foreach"] = True
        for p in group["params"]:
            if p not in opt.state or not opt.state[p]:
                opt.state[p] = {"step": torch.empty(()), "exp_avg": torch.empty_like(p),
                                "exp_avg_sq": torch.empty_like(p)}


def _tensors(module: nn.Module):
    """Every tensor a module holds: parameters, buffers and plain tensor attributes (a shared base)."""
    for mod in module.modules():
        yield from (v for v in mod._parameters.values() if v is not None)
        yield from (v for v in mod._buffers.values() if v is not None)
        yield from (v for v in mod.__dict__.values() if isinstance(v, torch.Tensor))


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(tensors, seen: set, tracker: _Tracker) -> int:
    total = 0
    for t in tensors:
        st = _local(t).untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            total += tracker._size(st)
    return total


@contextlib.contextmanager
def _fake_world(gpus: int, parallel: str):
    """A ``dist.World`` of ``gpus`` ranks seen from rank 0, over a fake process group when ``gpus > 1`` or FSDP."""
    mode = dist.resolve_parallel(parallel, gpus)
    if mode == "none":
        yield dist.World()
        return
    if torch.distributed.is_initialized():
        raise RuntimeError("dmdx plan makes its own (fake) process group: run it outside torchrun")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        world = dist.World(0, gpus, 0, mode)
        world.device_mesh("cpu")  # real tensors: a mesh is not made of fake ones
        world.ranks_where = lambda flag: []  # every rank's loss is finite (fake losses have no value)
        world.broadcast_module = lambda module: None  # in-place copies of values fake tensors do not have
        yield world
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _no_cyclic_gc():
    """Python's cyclic garbage collector off while the plan builds and runs the networks: its full collections,
    over the millions of objects a fake run makes (modules, fake tensors, autograd nodes, the tracker's records),
    were an eighth of the plan's time.  Storages are freed by their reference counts (what the tracker follows);
    ``add_live`` collects once, before tracking starts."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def plan_run(cfg, gpus: int = 1, memory: int | str = "80GB", tflops: float = H100_BF16_TFLOPS,
             device: str = "cuda", foreach: bool | None = None) -> Plan:
    """Plan one iteration of the distillation run ``cfg`` (a :class:`dmdx.train.run.RunConfig` with its recipe
    applied) on ``gpus`` GPUs of ``memory`` each; ``device="cpu"`` plans a CPU run (no allocator rounding).
    ``foreach``: AdamW's multi-tensor step (None: as torch chooses on ``device``: on CUDA, not on the CPU)."""
    t0 = time.perf_counter()
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    path = Path(str(cfg.teacher)).expanduser()
    if not (path / "model_index.json").is_file():
        raise ValueError(f"dmdx plan reads a diffusers pipeline folder (model_index.json and each component's "
                         f"config.json; weights are not needed), got {cfg.teacher!r}")
    path = check_folder(path, weights=False).resolve()  # configs are enough to plan
    memory = parse_memory(memory)
    method_cls = get_method(cfg.method.name)
    tracker = _Tracker(round_to=CUDA_BLOCK if device == "cuda" else 1, fake_scalars=True)
    tracker.tracking = False  # on from the first stage; the set-up before it is not the run's steady state
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, _fake_world(gpus, cfg.train.parallel) as world, _fake_mode(), \
            tracker, _fake_methods(), _no_cyclic_gc():
        torch.manual_seed(cfg.train.seed)
        family, teacher, shape, guidance = _teacher(cfg, path)
        teacher.eval().requires_grad_(False)
        method_cls.check(cfg.method, shape)
        times = student_times(cfg.student.times, teacher.schedule)
        student = trainable_student(teacher, cfg.real, cfg.train.seed)
        batch = dist.per_rank_batch(cfg.train.batch_size, world.size, cfg.train.grad_accum)
        null = teacher.backbone.null_cond(None)
        rows = 4  # the prompt bank (host memory; its size does not change the device peak)
        bank = {k: torch.zeros(rows, *v.shape[1:]) for k, v in null.items()}
        n = max(2, batch)
        data = Dataset(name="plan", kind="image", x=torch.zeros(n, *shape))
        pairs = None
        if method_cls.pairs_needed(cfg.method):
            pairs = Pairs(noise=torch.zeros(n, *shape), x0=torch.zeros(n, *shape),
                          labels=torch.zeros(n, dtype=torch.long), cond_bank=bank)
        ctx = Context(teacher=teacher, teacher_net=teacher, student=student, data=data, num_classes=0,
                      shape=shape, batch_size=cfg.train.batch_size, device=torch.device("cpu"), times=times,
                      pairs=pairs, guidance=guidance, cond_bank=bank)
        info = ModelInfo(kind="student", backbone={}, schedule={}, prediction=teacher.prediction, shape=list(shape))
        trainer = Trainer(Path(tmp), cfg.method, cfg.train, ctx, info, world=world)
        # multi-step students: every rank simulates the deepest backward simulation (k = n - 1)
        ctx.shared_randint = lambda high: high - 1
        for t in [*bank.values(), data.x, *([] if pairs is None else [pairs.noise, pairs.x0, pairs.labels])]:
            tracker.add(t, "host")
        networks: dict[str, list[NetworkMemory]] = {}
        host = 0
        phases: list[PhasePeak] = []
        flops_by_phase: list[tuple[float, float]] = []  # (flops, weight per iteration)
        stage_iters = [n for _, _, n in trainer.stages]
        total_iters = max(1, sum(stage_iters))
        tracker.add_live(fake=True)
        offload = cfg.train.cpu_offload and world.parallel == "fsdp"
        with tracker.tracked():
            for index, (cls, _, iters) in enumerate(trainer.stages):
                stage = trainer.build_stage(index)
                nets = {"teacher": teacher, **stage.trainables, "ema": trainer.ema}
                # after the stage's copies are made: a deep copy would carry the hooks along
                hooks = [h for name, net in nets.items() for h in tracker.watch(name, net)]
                for name, opt in stage.optims.items():
                    # offloaded, the step runs on the CPU, where torch takes the per-parameter loop
                    _init_adamw(opt, foreach=(device == "cuda" if foreach is None else foreach) and not offload)
                    for p in stage.trainables[name].parameters():
                        p.grad = torch.empty_like(p)  # a network's gradients outlive its phase
                    if offload:
                        hooks += _host_step(opt, tracker)
                networks[cls.name] = _footprint(nets, stage, tracker)
                if offload:
                    _offload(nets, stage, tracker)
                for phase in stage.method.phases():
                    before = sum(tracker.flops.values())
                    tracker.phase = (cls.name, phase.name)
                    trainer.run_phase(stage, phase, stage.start)
                    tracker.phase = None
                    for name in phase.trains:
                        for p in stage.trainables[name].parameters():
                            if p.grad is not None:
                                tracker.label(p.grad, f"grads:{name}")
                        for state in stage.optims[name].state.values():
                            for v in state.values():
                                tracker.label(v, f"optim:{name}")
                    if offload:
                        _offload({name: stage.trainables[name] for name in phase.trains}, stage, tracker)
                    flops = sum(tracker.flops.values()) - before
                    flops_by_phase.append((flops, iters / total_iters / max(1, phase.every)))
                    phases.append(_phase_peak(tracker, cls.name, phase.name, cfg.train.cpu_offload))
                    host = max(host, tracker.host)  # at a phase's end, the stage's states are all alive
                for h in hooks:
                    h.remove()
                del stage
        if offload:
            notes.append("train.cpu_offload: the sharded weights, gradients and optimiser states and the optimiser "
                         "step are in host memory; a phase's new gradient shards count on the GPU until the phase "
                         "ends (an upper bound: on the GPU each unit's shard is copied out after its backward)")
    flops = {}
    for (name, kind), v in sorted(tracker.flops.items()):
        f = flops.setdefault(name, {"forward": 0.0, "backward": 0.0, "calls": 0})
        f[kind] += float(v)
    for (name, kind), c in tracker.calls.items():
        if name in flops:
            flops[name]["calls"] = c
    return Plan(teacher=str(path), family=family, method=cfg.method.name, gpus=gpus, parallel=world.parallel,
                batch_per_rank=batch, shape=list(shape), memory=memory, tflops=tflops, networks=networks,
                phases=phases, flops=flops, iteration_flops=float(sum(f for f, _ in flops_by_phase)),
                average_flops=float(sum(f * w for f, w in flops_by_phase)), steps=cfg.train.steps, host=host,
                seconds=time.perf_counter() - t0, notes=notes)


def _footprint(nets: dict[str, nn.Module], stage, tracker: _Tracker) -> list[NetworkMemory]:
    """Per network: weights (each storage counted once, with the first network that holds it: a shared base with
    the teacher), gradients, optimiser states; labels their storages in ``tracker``."""
    seen: set = set()
    out = []
    for name, net in nets.items():
        tensors = list(_tensors(net))
        for t in tensors:
            tracker.label(t, f"weights:{name}")
        weights = _nbytes(tensors, seen, tracker)
        params = list(net.parameters()) if name in stage.trainables else []
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            tracker.label(g, f"grads:{name}")
        opt = stage.optims.get(name)
        states = [v for s in (opt.state.values() if opt is not None else []) for v in s.values()
                  if isinstance(v, torch.Tensor)]
        for v in states:
            tracker.label(v, f"optim:{name}")
        out.append(NetworkMemory(name=name, weights=weights, grads=_nbytes(grads, seen, tracker),
                                 optim=_nbytes(states, seen, tracker),
                                 trainable=sum(p.numel() for p in params), frozen=name not in stage.trainables))
    return out


def _offload(nets: dict[str, nn.Module], stage, tracker: _Tracker) -> None:
    """``train.cpu_offload`` (FSDP2's ``CPUOffloadPolicy``): the sharded parameters of ``nets`` (DTensors; the frozen
    teacher is not sharded), their gradients and optimiser states are in host memory."""
    for name, net in nets.items():
        opt = stage.optims.get(name)
        for t in _tensors(net):
            if not hasattr(t, "to_local"):
                continue
            tracker.to_host(t)
            if t.grad is not None:
                tracker.to_host(t.grad)
            for v in (opt.state.get(t, {}) if opt is not None else {}).values():
                if isinstance(v, torch.Tensor):
                    tracker.to_host(v)


def _host_step(opt: torch.optim.Optimizer, tracker: _Tracker) -> list:
    """Label what ``opt.step`` creates as host memory (an offloaded optimiser steps on the CPU); the hook handles."""
    def pre(*_):
        tracker.new_label = "host"

    def post(*_):
        tracker.new_label = ""

    return [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]


def _phase_peak(tracker: _Tracker, stage: str, phase: str, offload: bool) -> PhasePeak:
    peak, seq = tracker.peaks.get((stage, phase), (tracker.total, tracker.seq))
    alive = tracker.alive_at(seq)
    kinds = {"weights": 0, "grads": 0, "optim": 0}
    other = 0
    for label, n in alive.items():
        kind = label.split(":")[0]
        if kind in kinds:
            kinds[kind] += n
        elif kind != "host":
            other += n
    return PhasePeak(stage=stage, phase=phase, peak=peak, activations=other, **kinds)


__all__ = ["Plan", "PhasePeak", "NetworkMemory", "plan_run", "format_plan", "parse_memory", "H100_BF16_TFLOPS"]

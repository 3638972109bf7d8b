"""Atomic, resumable checkpoints: ``run/checkpoints/step_0000500/`` written as ``.tmp`` then renamed.

Two formats, told apart by ``state.json``'s ``format``:

- single-process runs (``train.parallel`` none) write ``nets.safetensors`` (all trainable networks and the EMA,
  keys prefixed by network name), ``optim.pt`` (optimiser states and RNG states: tensors and plain containers
  only, loaded with ``weights_only=True``) and ``state.json`` (step, stage): the format of every checkpoint
  written before distributed training existed;
- distributed runs (ddp, fsdp) write a ``torch.distributed.checkpoint`` (DCP) folder: every rank saves its shards
  of the networks, the EMA and the optimiser states (``__R_0.distcp`` + ``.metadata``), its own RNG state
  (``rng_R.pt``), and rank 0 writes ``state.json`` (``"format": "dcp"``, step, stage, update counts, world size).

Either format resumes at any world size (DCP reshards on load; a single-process checkpoint is read whole by every
rank).  All ranks write into ``step_X.tmp``; rank 0 renames it after a barrier, so a run killed mid-write leaves
a ``.tmp`` folder that is ignored and the previous checkpoint stays usable.  Every file and the folder are fsynced
before the rename (and the parent folder after it), so a renamed checkpoint is on disk even after a power cut or a
lost node; older checkpoints are pruned (``keep``) only after the new one is in place, and a checkpoint folder of the
same step is replaced only after the new one is complete (moved aside to ``step_X.old``, which is read if a kill
comes between the two renames).  A preemption checkpoint's ``state.json`` says ``"preempted": "SIGTERM"``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_DIR = "checkpoints"


def _step_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first: ``step_X``, or ``step_X.old`` where a kill came between the two renames of
    a replacement (``step_X`` moved aside, the new one not yet in place)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    names = {p.name for p in dirs}
    dirs += [p for p in root.iterdir() if p.is_dir() and p.name.endswith(".old") and p.name[5:-4].isdigit()
             and p.name[:-4] not in names]
    return sorted(dirs, key=lambda p: int(p.name[5:].split(".")[0]))


def _fsync(path: Path) -> None:
    """Flush a file's data (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path, keep: int) -> None:
    """Make the complete folder ``tmp`` the checkpoint ``final``: its files and itself fsynced, renamed, the parent
    fsynced (the rename on disk); then the checkpoints beyond the newest ``keep`` removed."""
    for f in tmp.iterdir():
        if f.is_file():
            _fsync(f)
    _fsync(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():  # the same step again (after a resume from an older checkpoint): replace, never delete first
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    for stale in _step_dirs(final.parent.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, stage: int, nets: dict[str, torch.nn.Module],
                    optims: dict[str, torch.optim.Optimizer], extra: dict, keep: int = 2,
                    info: dict | None = None) -> Path:
    """Write a single-process checkpoint; ``info`` adds keys to its ``state.json`` (``preempted``)."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu() for name, net in nets.items()
               for k, v in net.state_dict().items()}
    save_file(tensors, str(tmp / "nets.safetensors"))
    torch.save({"optim": {k: o.state_dict() for k, o in optims.items()}, "extra": extra}, tmp / "optim.pt")
    state = {"step": step, "stage": stage, "nets": sorted(nets), **(info or {})}
    (tmp / "state.json").write_text(json.dumps(state) + "\n")
    _publish(tmp, final, keep)
    return final


def save_dcp_checkpoint(run_dir: Path, step: int, state_dict: dict, meta: dict, world, keep: int = 2) -> Path:
    """Write a DCP checkpoint collectively (every rank calls this with its own ``state_dict`` shards)."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / CKPT_DIR
    final = root / f"step_{step:07d}"
    tmp = root / (final.name + ".tmp")
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    world.barrier()
    dcp.save(state_dict, checkpoint_id=str(tmp))  # its FileSystemWriter fsyncs each rank's files
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_{world.rank}.pt")
    _fsync(tmp / f"rng_{world.rank}.pt")
    world.barrier()  # every rank's shards and RNG are on disk
    if world.main:
        (tmp / "state.json").write_text(json.dumps({"format": "dcp", "step": step, **meta}) + "\n")
        _publish(tmp, final, keep)
    world.barrier()  # nobody reads or writes checkpoints before the rename
    return final


def load_dcp_state(path: Path, state_dict: dict) -> None:
    """Fill ``state_dict`` (this rank's tensors, any sharding) in place from a DCP checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state_dict, checkpoint_id=str(path))


def read_rng(path: Path, rank: int) -> dict | None:
    """The RNG states rank ``rank`` saved in a DCP checkpoint, or None (a rank that did not exist then)."""
    f = Path(path) / f"rng_{rank}.pt"
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def read_checkpoint(path: Path) -> dict:
    """Load one checkpoint folder; raises ValueError if it is incomplete or corrupt.  A DCP checkpoint is only
    checked and described (``format: dcp``); its tensors are loaded by the trainer into its own shards."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        if state.get("format") == "dcp":
            if not (path / ".metadata").is_file():
                raise ValueError("no .metadata")
            return {**state, "path": path}
        tensors = load_file(str(path / "nets.safetensors"))
        rest = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # any read failure means this checkpoint is unusable
        raise ValueError(f"checkpoint {path} is incomplete or corrupt: {e}") from None
    nets: dict[str, dict] = {}
    for key, v in tensors.items():
        name, sub = key.split(".", 1)
        nets.setdefault(name, {})[sub] = v
    return {"format": "single", "step": state["step"], "stage": state["stage"], "nets": nets, "optim": rest["optim"],
            "extra": rest["extra"], "path": path}


def latest_checkpoint(run_dir: Path) -> dict | None:
    """The newest readable checkpoint of a run (skipping corrupt ones with a warning), or None."""
    for path in reversed(_step_dirs(run_dir)):
        try:
            return read_checkpoint(path)
        except ValueError as e:
            warnings.warn(f"{e}; trying an older checkpoint")
    return None

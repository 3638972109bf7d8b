"""Atomic, resumable checkpoints: ``run/checkpoints/step_0000500/`` written as ``.tmp`` then renamed.

Each holds ``nets.safetensors`` (all trainable networks and the EMA, keys prefixed by network name),
``optim.pt`` (optimiser states and RNG states: tensors and plain containers only, loaded with
``weights_only=True``) and ``state.json`` (step, stage).  A run killed mid-write leaves a ``.tmp`` folder that is
ignored; the previous checkpoint stays usable.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_DIR = "checkpoints"


def _step_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def save_checkpoint(run_dir: Path, step: int, stage: int, nets: dict[str, torch.nn.Module],
                    optims: dict[str, torch.optim.Optimizer], extra: dict, keep: int = 2) -> Path:
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
    (tmp / "state.json").write_text(json.dumps({"step": step, "stage": stage, "nets": sorted(nets)}) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in _step_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> dict:
    """Load one checkpoint folder; raises ValueError if it is incomplete or corrupt."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "nets.safetensors"))
        rest = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # any read failure means this checkpoint is unusable
        raise ValueError(f"checkpoint {path} is incomplete or corrupt: {e}") from None
    nets: dict[str, dict] = {}
    for key, v in tensors.items():
        name, sub = key.split(".", 1)
        nets.setdefault(name, {})[sub] = v
    return {"step": state["step"], "stage": state["stage"], "nets": nets, "optim": rest["optim"],
            "extra": rest["extra"], "path": path}


def latest_checkpoint(run_dir: Path) -> dict | None:
    """The newest readable checkpoint of a run (skipping corrupt ones with a warning), or None."""
    for path in reversed(_step_dirs(run_dir)):
        try:
            return read_checkpoint(path)
        except ValueError as e:
            warnings.warn(f"{e}; trying an older checkpoint")
    return None

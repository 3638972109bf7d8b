"""Teacher ODE pairs (noise, teacher sample, label or prompt row) in safetensors shards, collected resumably.

Used by DMD's regression loss and by ADP.  ``dmdx pairs --teacher PATH --n K --steps N --out DIR`` writes
``DIR/pairs_00000.safetensors``... and ``DIR/pairs.json``; a distillation run collects into ``RUN/pairs``.  An
interrupted collection continues with the missing shards (each shard's noise and labels come from its own seed,
so the result does not depend on interruptions).  ``pairs.json`` records what the pairs were collected with
(guidance, steps, solver, n, seed, shape, and for text-to-image teachers the prompts and the teacher); collecting
into a folder that holds pairs made with other settings, or training on a folder whose guidance differs from the
run's, is refused naming the differences.  A larger ``n`` with the same settings adds pairs: the pairs of a folder
grown from ``n`` to ``m`` are those a fresh collection of ``m`` gives.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .methods.base import Pairs
from .models import Model, load_weights
from .sampling import nfe, sample_ode

META = "pairs.json"
Tensor = torch.Tensor


def prompts_fingerprint(prompts: list[str]) -> str:
    """A short hash of a prompt list (recorded with pairs collected on those prompts)."""
    return hashlib.sha1("\n".join(prompts).encode()).hexdigest()[:16]


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}={old.get(k)!r} (now {new[k]!r})" for k in new if old.get(k) != new[k]]


def collect_pairs(model: Model, out: Path, n: int, steps: int = 50, solver: str = "heun",
                  guidance: float | None = None, seed: int = 0, shard_size: int = 1000, device="cpu",
                  progress: bool = True, batch_size: int | None = None, cond_bank: dict[str, Tensor] | None = None,
                  meta_extra: dict | None = None) -> Path:
    """Collect ``n`` pairs into ``out``: shards of ``shard_size`` pairs, integrated ``batch_size`` at a time.

    ``cond_bank`` (text-to-image teachers): each pair gets a random row of these prompt embeddings, stored as its
    label.  The progress bar counts pairs (with tqdm's rate and ETA); stopping loses at most the shard in progress.
    """
    if n < 1:
        raise ValueError(f"pairs.n must be >= 1, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = model.info
    guidance = info.guidance if guidance is None else guidance
    batch_size = batch_size or shard_size
    meta = {"n": n, "steps": steps, "solver": solver, "guidance": guidance, "seed": seed, "shard_size": shard_size,
            "shape": list(info.shape), "num_classes": info.num_classes, **(meta_extra or {})}
    meta_path = out / META
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = _differences(old, {k: v for k, v in meta.items() if k != "n"})
        if not diff and n < old.get("n", n):
            diff = [f"n={old['n']} (now {n}: fewer than were collected; set pairs.n={old['n']} to use them)"]
        if diff:
            raise ValueError(f"{out} holds teacher pairs collected with other settings: {', '.join(diff)}; delete "
                             "that folder to collect them again, or point the run elsewhere")
        if n > old.get("n", n) and old["n"] % shard_size:
            # more pairs: the last shard, short, is drawn again at full size (from its own seed, as a fresh
            # collection of n would draw it), then the new shards are added
            (out / f"pairs_{old['n'] // shard_size:05d}.safetensors").unlink(missing_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    n_shards = (n + shard_size - 1) // shard_size
    den = model.denoiser
    todo = [i for i in range(n_shards) if not (out / f"pairs_{i:05d}.safetensors").exists()]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        done = n - sum(min(shard_size, n - i * shard_size) for i in todo)
        bar = tqdm(total=n, initial=done, unit="pair", dynamic_ncols=True, mininterval=1.0,
                   desc=f"teacher pairs ({nfe(solver, steps)} NFE each, guidance {guidance:g}; "
                        "stop and rerun to resume)")
    for i in todo:
        m = min(shard_size, n - i * shard_size)
        g = torch.Generator().manual_seed(seed * 100003 + i)
        noise = torch.randn([m, *info.shape], generator=g)
        if cond_bank is not None:
            labels = torch.randint(len(next(iter(cond_bank.values()))), (m,), generator=g)
        elif info.conditional:
            labels = torch.randint(info.num_classes, (m,), generator=g)
        else:
            labels = None
        outs = []
        for j in range(0, m, batch_size):
            sl = slice(j, j + batch_size)
            if cond_bank is not None:
                cond = {k: v[labels[sl]].to(device) for k, v in cond_bank.items()}
            else:
                cond = None if labels is None else {"labels": labels[sl].to(device)}
            outs.append(sample_ode(lambda x, t, c: den(x, t, c, guidance=guidance), den.schedule,
                                   noise[sl].to(device), steps, cond, solver=solver).float().cpu())
            if bar is not None:
                bar.update(len(outs[-1]))
        tensors = {"noise": noise, "x0": torch.cat(outs).contiguous()}
        if labels is not None:
            tensors["labels"] = labels
        tmp = out / f"pairs_{i:05d}.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(out / f"pairs_{i:05d}.safetensors")
    if bar is not None:
        bar.close()
    return out


def pairs_meta(folder: Path) -> dict:
    """What ``pairs.json`` says the pairs in ``folder`` were collected with ({} for a folder without it)."""
    path = Path(folder) / META
    return json.loads(path.read_text()) if path.is_file() else {}


def check_pairs(folder: Path, guidance: float, shape) -> None:
    """Refuse pairs collected at another guidance scale or for another shape than the run's."""
    meta = pairs_meta(folder)
    if "guidance" in meta and meta["guidance"] is not None and float(meta["guidance"]) != float(guidance):
        raise ValueError(f"the teacher pairs in {folder} were collected at guidance {meta['guidance']:g} but this "
                         f"run's real guidance is {guidance:g}; collect pairs at that guidance (dmdx pairs "
                         f"--guidance {guidance:g}) or set pairs.guidance={meta['guidance']:g} to use them anyway")
    if "shape" in meta and list(meta["shape"]) != list(shape):
        raise ValueError(f"the teacher pairs in {folder} have shape {meta['shape']}, the teacher {list(shape)}")


def load_pairs(folder: Path, cond_bank: dict[str, Tensor] | None = None) -> Pairs:
    folder = Path(folder)
    shards = sorted(folder.glob("pairs_*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no teacher pairs in {folder} (expected pairs_*.safetensors from 'dmdx pairs')")
    meta = pairs_meta(folder)
    if "n" in meta and "shard_size" in meta:
        expected = (meta["n"] + meta["shard_size"] - 1) // meta["shard_size"]
        if len(shards) != expected:
            raise ValueError(f"{folder} holds {len(shards)} of the {expected} shards of its {meta['n']} pairs: the "
                             "collection was interrupted; run it again (same settings) to finish it")
    parts = [load_weights(p) for p in shards]
    labels = torch.cat([p["labels"] for p in parts]) if "labels" in parts[0] else None
    if cond_bank is not None and labels is None:
        raise ValueError(f"the teacher pairs in {folder} have no prompt rows: they were not collected from this "
                         "text-to-image teacher")
    return Pairs(torch.cat([p["noise"] for p in parts]), torch.cat([p["x0"] for p in parts]), labels,
                 cond_bank=cond_bank)

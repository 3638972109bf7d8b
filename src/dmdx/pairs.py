"""Teacher ODE pairs (noise, teacher sample, label) in safetensors shards, collected resumably.

Used by DMD's regression loss and by ADP.  ``dmdx pairs --teacher PATH --n K --steps N --out DIR`` writes
``DIR/pairs_00000.safetensors``... and ``DIR/pairs.json``; an interrupted collection continues with the missing
shards (each shard's noise comes from its own seed, so the result does not depend on interruptions).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .methods.base import Pairs
from .models import Model, load_weights
from .sampling import sample_ode

META = "pairs.json"


def collect_pairs(model: Model, out: Path, n: int, steps: int = 50, solver: str = "heun",
                  guidance: float | None = None, seed: int = 0, shard_size: int = 1000, device="cpu",
                  progress: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = model.info
    guidance = info.guidance if guidance is None else guidance
    meta = {"n": n, "steps": steps, "solver": solver, "guidance": guidance, "seed": seed, "shard_size": shard_size,
            "shape": info.shape, "num_classes": info.num_classes}
    meta_path = out / META
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"{out} holds pairs collected with other settings ({old}); use another --out")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    n_shards = (n + shard_size - 1) // shard_size
    den = model.denoiser
    todo = [i for i in range(n_shards) if not (out / f"pairs_{i:05d}.safetensors").exists()]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"teacher pairs ({steps} {solver} steps)", unit="shard")
    for i in todo:
        m = min(shard_size, n - i * shard_size)
        g = torch.Generator().manual_seed(seed * 100003 + i)
        noise = torch.randn([m, *info.shape], generator=g)
        labels = torch.randint(info.num_classes, (m,), generator=g) if info.conditional else None
        cond = None if labels is None else {"labels": labels.to(device)}
        x0 = sample_ode(lambda x, t, c: den(x, t, c, guidance=guidance), den.schedule, noise.to(device), steps, cond,
                        solver=solver).cpu()
        tensors = {"noise": noise, "x0": x0}
        if labels is not None:
            tensors["labels"] = labels
        tmp = out / f"pairs_{i:05d}.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(out / f"pairs_{i:05d}.safetensors")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def load_pairs(folder: Path) -> Pairs:
    folder = Path(folder)
    shards = sorted(folder.glob("pairs_*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no teacher pairs in {folder} (expected pairs_*.safetensors from 'dmdx pairs')")
    parts = [load_weights(p) for p in shards]
    labels = torch.cat([p["labels"] for p in parts]) if "labels" in parts[0] else None
    return Pairs(torch.cat([p["noise"] for p in parts]), torch.cat([p["x0"] for p in parts]), labels)

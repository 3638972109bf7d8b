"""Any local diffusers pipeline folder: ``model_index.json``, component configs and weights, prompts files and
cached prompt embeddings, DDPM-style scheduler configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..schedules import VPDiscrete

Tensor = torch.Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_pipeline_folder(spec: str | Path) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "model_index.json").is_file()


def looks_like_hub_id(spec: str) -> bool:
    """``org/name`` with no such local path: a hub id, which dmdx never downloads."""
    parts = str(spec).split("/")
    return len(parts) == 2 and all(parts) and not Path(spec).exists() and not str(spec).startswith((".", "~"))


def check_folder(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        hint = " (it looks like a Hugging Face hub id)" if looks_like_hub_id(str(path)) else ""
        raise FileNotFoundError(f"teacher {str(path)!r} not found{hint}: dmdx needs a local diffusers pipeline folder "
                                "(with model_index.json), e.g. from `huggingface-cli download ORG/NAME --local-dir "
                                "DIR`; nothing is downloaded at run time")
    if not is_pipeline_folder(path):
        raise ValueError(f"{path} has no model_index.json: not a diffusers pipeline folder")
    return path


def model_index(path: Path) -> dict:
    return json.loads((Path(path) / "model_index.json").read_text())


def component_config(path: Path, component: str) -> dict:
    """A component's ``config.json`` (``scheduler_config.json`` for the scheduler)."""
    f = Path(path) / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    if not f.is_file():
        raise ValueError(f"{path}: missing {f.relative_to(path)}")
    return json.loads(f.read_text())


def vp_schedule(path: Path, sched: dict, defaults: dict, **extra) -> tuple[VPDiscrete, str]:
    """(VPDiscrete, prediction kind) from a DDPM-style scheduler config; ``defaults`` fill the keys it leaves out
    (each scheduler class has its own), ``extra`` are further VPDiscrete arguments."""
    sched = {**defaults, **{k: v for k, v in sched.items() if v is not None}}
    kind = sched["prediction_type"]
    pred = {"epsilon": "epsilon", "v_prediction": "v"}.get(kind)
    if pred is None:
        raise ValueError(f"{path}: unsupported prediction_type {kind!r}; supported: epsilon, v_prediction")
    bs = sched["beta_schedule"]
    if bs not in ("linear", "scaled_linear"):
        raise ValueError(f"{path}: unsupported beta_schedule {bs!r}; supported: linear, scaled_linear")
    return VPDiscrete(beta_start=sched["beta_start"], beta_end=sched["beta_end"], beta_schedule=bs,
                      num_train_timesteps=sched.get("num_train_timesteps", 1000), **extra), pred


def load_component(path: Path, component: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    import diffusers  # optional, heavy: imported on use (pip install -e ".[diffusers]")

    cls_name = model_index(path)[component][-1]
    cls = getattr(diffusers, cls_name)
    return cls.from_pretrained(str(Path(path) / component), torch_dtype=dtype, local_files_only=True)


def load_pipeline(path: Path, skip: tuple[str, ...] = (), dtype: torch.dtype = torch.float32):
    """The pipeline with the named components left out (None)."""
    from diffusers import DiffusionPipeline  # optional, heavy: imported on use

    return DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True,
                                             **{c: None for c in skip})


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one prompt a line)")
    return prompts


def save_cond(path: Path, bank: dict[str, Tensor], null: dict[str, Tensor]) -> None:
    save_file({**{f"bank.{k}": v.contiguous() for k, v in bank.items()},
               **{f"null.{k}": v.contiguous() for k, v in null.items()}}, str(path))


def load_cond(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    d = load_file(str(path))
    return ({k[5:]: v for k, v in d.items() if k.startswith("bank.")},
            {k[5:]: v for k, v in d.items() if k.startswith("null.")})

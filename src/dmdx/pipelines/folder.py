"""Any local diffusers pipeline folder: ``model_index.json``, component configs and weights, prompts files and
cached prompt embeddings, DDPM-style scheduler configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..schedules import VPDiscrete

Tensor = torch.Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_pipeline_folder(spec: str | Path) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "model_index.json").is_file()


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
TEACHER_FORMS = ("a dmdx model or run folder, a local diffusers pipeline folder (with model_index.json) or "
                 "gmm:NAME")


def looks_like_hub_id(spec: str) -> bool:
    """A bare ``org/name`` that is no local path (neither it nor its ``org`` exists here): a hub id, which dmdx never
    downloads.  Anything path-like (``./x``, ``~/x``, ``/x``, ``a/b/c``, a folder that exists) is a path."""
    s = str(spec)
    return bool(HUB_ID.fullmatch(s)) and not Path(s).exists() and not Path(s.split("/")[0]).exists()


def check_folder(path: str | Path) -> Path:
    """A local diffusers pipeline folder, checked: it exists, has ``model_index.json``, and each of its model
    components has its weights (:func:`check_weights`)."""
    spec = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        if looks_like_hub_id(spec):
            raise FileNotFoundError(f"teacher {spec!r} is no local folder but looks like a Hugging Face hub id: "
                                    "nothing is downloaded at run time; fetch it first (`huggingface-cli download "
                                    f"{spec} --local-dir DIR`) and pass DIR")
        raise FileNotFoundError(f"teacher {spec!r} not found: no such folder (expected {TEACHER_FORMS})")
    if not is_pipeline_folder(path):
        raise ValueError(f"{path} has no model_index.json: not a diffusers pipeline folder")
    check_weights(path)
    return path


WEIGHT_FILES = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


def check_weights(path: Path) -> None:
    """Every component ``model_index.json`` names from diffusers or transformers has its folder, and every model
    component (a folder with a ``config.json``) its weights, all the shards a ``*.index.json`` lists included:
    otherwise a ``FileNotFoundError`` naming each component and the files it lacks (a download filtered to the
    configs, or interrupted), before anything tries to load it."""
    problems = []
    for comp, entry in model_index(path).items():
        if comp.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        folder = Path(path) / comp
        if not folder.is_dir():
            if entry[0] in WEIGHT_FILES:
                problems.append(f"{comp}/ is missing ({entry[1]})")
            continue
        if not (folder / "config.json").is_file():  # a scheduler, tokenizer or processor: configs only
            continue
        files = {f.name for f in folder.iterdir() if f.is_file()}
        indexes = sorted(f for f in files if f.endswith(".index.json"))
        shards = set()
        for name in indexes:
            try:
                shards |= set(json.loads((folder / name).read_text()).get("weight_map", {}).values())
            except (json.JSONDecodeError, AttributeError):
                problems.append(f"{comp}/{name} is not a readable shard index")
        lacking = sorted(shards - files)
        if lacking:
            more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
            problems.append(f"{comp}/ lacks the shards {', '.join(lacking[:3])}{more} that {indexes[0]} lists")
        elif not shards and not any(f.endswith((".safetensors", ".bin")) for f in files):
            want = WEIGHT_FILES.get(entry[0], "*.safetensors or *.bin")
            problems.append(f"{comp}/ has its config.json but no weights (expected {want}, or .bin)")
    if problems:
        raise FileNotFoundError(f"the pipeline folder {path} is incomplete: {'; '.join(problems)}. Download the "
                                "missing files (a download filtered to the configs leaves them out); nothing is "
                                "downloaded at run time")


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

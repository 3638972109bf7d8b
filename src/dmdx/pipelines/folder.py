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


def load_component(path: Path, component: str, dtype: torch.dtype = torch.float32, weights: bool = True
                   ) -> nn.Module:
    """A diffusers component of the folder in ``dtype``.  ``weights=False`` builds it from its ``config.json`` alone
    (a folder that holds only configs is enough) with uninitialised tensors on the default device: under
    ``torch.device("meta")`` nothing is allocated; under a ``FakeTensorMode`` (``dmdx plan``) the tensors are fake."""
    import diffusers  # optional, heavy: imported on use (pip install -e ".[diffusers]")

    cls_name = model_index(path)[component][-1]
    cls = getattr(diffusers, cls_name)
    if weights:
        return cls.from_pretrained(str(Path(path) / component), torch_dtype=dtype, local_files_only=True)
    device = torch.get_default_device()
    with torch.device("meta"):
        model = cls.from_config(component_config(path, component))
    return empty_like_module(model, dtype, device)


def empty_like_module(model: nn.Module, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """``model`` (on the meta device) with every floating parameter and buffer replaced, in place, by an
    uninitialised tensor of ``dtype`` on ``device`` (a tied weight stays tied).  Tensors are swapped in the modules'
    dictionaries, not through ``Module.to``, so that fake tensors work too."""
    new: dict[int, Tensor] = {}
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for name, v in list(table.items()):
                if v is None:
                    continue
                if id(v) not in new:
                    t = torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype, device=device)
                    new[id(v)] = nn.Parameter(t, v.requires_grad) if isinstance(v, nn.Parameter) else t
                table[name] = new[id(v)]
    return model


def write_pipeline(folder: Path, pipeline: str, components: dict, weights: bool = False,
                   dtype: torch.dtype = torch.float16) -> Path:
    """Write a diffusers pipeline folder: ``model_index.json`` naming ``pipeline`` and, per component, its config
    (``weights=False``: a folder that holds only configs, what ``dmdx plan`` reads) or its config and weights in
    ``dtype``.

    ``components`` maps a name to a tokenizer or scheduler object, or to a function ``make(device)`` that builds a
    diffusers / transformers model on ``device`` (``meta`` for a config-only folder, else CPU with random
    initial weights); models are built and written one at a time, so that only the largest is in memory.
    """
    import diffusers  # optional, heavy: imported on use

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    for name, comp in components.items():
        out = folder / name
        if callable(comp) and not hasattr(comp, "save_pretrained"):
            comp = comp("cpu" if weights else "meta")
            if weights:
                comp.to(dtype).save_pretrained(str(out), safe_serialization=True)
            elif hasattr(comp, "save_config"):  # diffusers
                comp.save_config(str(out))
            else:  # transformers
                comp.config.save_pretrained(str(out))
        else:
            comp.save_pretrained(str(out))
        library = "diffusers" if type(comp).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(comp).__name__]
        del comp
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


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

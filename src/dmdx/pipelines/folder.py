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


def check_folder(path: str | Path, weights: bool = True) -> Path:
    """A local diffusers pipeline folder, checked: it exists, has ``model_index.json``, and (``weights``) each of its
    model components has its weights (:func:`check_weights`; ``weights=False``: a folder of configs is enough, what
    a network built from its configs alone needs)."""
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
    if weights:
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

"""Defaults that fit what is being distilled: recipes keyed by the teacher's kind and the method.

A discriminator head trained from scratch and a student that starts as a copy of the teacher do not want the same
learning rate, and a 2-D MLP and an SDXL UNet do not want the same either.  A *recipe* is a list of config values
(``--set`` paths) for one (teacher kind, method) pair, each with the source it comes from (a paper, the reference
code, or one of our measurements in ``benchmarks/``).

Resolution, for a new run: the method's config defaults (the papers' values), then the recipe, then the user's
``--config`` / ``--set`` (which always win: a recipe only fills keys the user did not set).  ``--set recipe=none``
turns the recipe off and leaves the papers' defaults.  The values applied are printed at start and written into
the run's ``config.json`` (a resumed run reads them from there and resolves nothing again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The teacher kinds a recipe can be keyed by.
TEACHER_KINDS = ("gmm", "vector", "image", "sd", "sdxl", "sd3", "flux", "cogvideox", "wan")


@dataclass(frozen=True)
class Setting:
    key: str  # a --set path, e.g. "method.critic_every"
    value: Any  # a JSON value (parsed with the field's type, like --set)
    source: str  # where the value comes from: "DMD2 reference (SD1.5)", "ours: benchmarks/RESULTS.md, ..."


# (teacher kind, method name) -> settings.  The method "*" applies to every method (listed before the method's own).
RECIPES: dict[tuple[str, str], list[Setting]] = {}


def teacher_kind(spec: str | Path | None) -> str | None:
    """The kind of a ``--teacher`` value, or None when it cannot be told (missing folder: set-up reports it)."""
    if spec is None:
        return None
    spec = str(spec)
    if spec.startswith("gmm:"):
        return "gmm"
    path = Path(spec).expanduser()
    from .teachers.adapter import adapter_for

    adapter = adapter_for(path)
    if adapter is not None:
        return adapter.kind(path)
    if (path / "model_index.json").is_file():
        from .teachers.diffusers import pipeline_kind

        return pipeline_kind(path)
    info = path / "model.json"
    if info.is_file():
        try:
            shape = json.loads(info.read_text()).get("shape", [])
        except json.JSONDecodeError:
            return None
        return "vector" if len(shape) == 1 else "image"
    return None


def recipe(kind: str | None, method: str) -> list[Setting]:
    """The settings of ``kind`` for ``method``: the kind's ``*`` entries, then the method's own (later wins)."""
    if kind is None:
        return []
    return [*RECIPES.get((kind, "*"), []), *RECIPES.get((kind, method), [])]


def _covered(key: str, user_keys: set[str]) -> bool:
    """True when the user set ``key`` or a section above it (``method.adm`` covers ``method.adm.dt``)."""
    return any(key == k or key.startswith(k + ".") for k in user_keys)


def apply_recipe(cfg, user_keys: set[str] = frozenset()) -> list[Setting]:
    """Apply the recipe of ``cfg``'s teacher kind and method to ``cfg`` (a RunConfig), skipping keys the user set.

    Returns the settings applied (empty when ``cfg.recipe == "none"``).
    """
    from .config import set_path

    if getattr(cfg, "recipe", "auto") == "none":
        return []
    applied = []
    for s in recipe(teacher_kind(cfg.teacher), cfg.method.name):
        if _covered(s.key, set(user_keys)):
            continue
        value = json.dumps(s.value) if isinstance(s.value, (list, dict)) else s.value
        set_path(cfg, s.key, value)
        applied.append(s)
    return applied


def format_settings(kind: str | None, method: str, settings: list[Setting]) -> str:
    if not settings:
        return f"recipe: none for teacher kind {kind!r} and method {method!r} (the method's defaults)"
    lines = [f"recipe for teacher kind {kind!r}, method {method!r} (--set recipe=none for the method's defaults):"]
    lines += [f"  {s.key} = {json.dumps(s.value)}    # {s.source}" for s in settings]
    return "\n".join(lines)


# -- video teachers (dmdx.teachers.video) ------------------------------------------------------------------------
_ADM = "ADM paper (arXiv 2507.18569), Tables 2-3: CogVideoX-2b / -5b distilled to 8 steps by multi-step ADM"
_SFP = "Self-Forcing-Plus configs/self_forcing_14b_dmd.yaml (4-step DMD of Wan2.1-T2V-14B)"
_COG8 = [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
RECIPES.update({
    ("cogvideox", "*"): [
        Setting("real.grad_checkpointing", True, "ours, unmeasured: a 2b transformer on 13x60x90 latents needs it"),
    ],
    ("cogvideox", "adm"): [
        Setting("student.times", _COG8, f"{_ADM}; the uniform spacing is ours, unmeasured"),
        Setting("method.critic_every", 1, "ADM paper: a 1:1 critic:student ratio after ADP"),
    ],
    ("cogvideox", "dmdx"): [
        Setting("student.times", _COG8, f"{_ADM}; the uniform spacing is ours, unmeasured"),
    ],
    ("wan", "*"): [
        Setting("student.times", [1.0, 0.75, 0.5, 0.25],
                f"{_SFP}: denoising_step_list 1000/750/500/250 warped through the shifted schedule"),
        Setting("real.grad_checkpointing", True, f"{_SFP}: gradient_checkpointing true"),
    ],
    ("wan", "dmd2"): [
        Setting("method.real_guidance", 3.0, f"{_SFP}: guidance_scale 3.0"),
        Setting("train.lr", 2e-6, f"{_SFP}: lr 2e-6"),
        Setting("train.lr_scale", {"fake_score": 0.2}, f"{_SFP}: lr_critic 4e-7 = 0.2 x lr"),
        Setting("train.betas", [0.0, 0.999], f"{_SFP}: beta1 0, beta2 0.999 (generator and critic)"),
        Setting("train.ema_decay", 0.99, f"{_SFP}: ema_weight 0.99"),
    ],
})

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
from dataclasses import dataclass, replace
from typing import Any, Callable

from .config import set_path

# The teacher kinds a recipe can be keyed by.
TEACHER_KINDS = ("gmm", "vector", "image", "sd", "sdxl", "sd3", "flux", "cogvideox", "wan")


@dataclass(frozen=True)
class Setting:
    key: str  # a --set path, e.g. "method.critic_every"
    value: Any  # a JSON value (parsed with the field's type, like --set)
    source: str  # where the value comes from: "DMD2 reference (SD1.5)", "ours: benchmarks/RESULTS.md, ..."
    # applies only when this holds for the config after the user's --config / --set (e.g. LoRA on or off)
    when: Callable[[Any], bool] | None = None


# (teacher kind, method name) -> settings.  The method "*" applies to every method (listed before the method's own).
RECIPES: dict[tuple[str, str], list[Setting]] = {}

# -- exact Gaussian-mixture teachers (gmm:NAME; the student, fake score and feature backbone are a 2-D MLP) ------
_TOY = "ours: benchmarks/adm-study.md, 'Exact mixtures'"
RECIPES[("gmm", "*")] = [
    Setting("train.lr", 2e-3, "ours: benchmarks/RESULTS.md, 'Distillation on exact teachers' (every toy row: lr 2e-3)"),
]
# DMDX on mixtures: at the paper's form ADM undoes what ADP built (unequal: 5 of 5 modes after ADP, then the
# student drifts off every mode).  A regression term on the teacher's ODE pairs in both stages keeps it on them.
# The 2-D MLP student trains at the shared rate (not the image recipe's x0.2) and both anchors weigh 10 (as for
# images): over five training seeds on ring8 / scatter7 / unequal the largest weight error is 0.007-0.010 /
# 0.005-0.006 / 0.007-0.009 against 0.011-0.089 / 0.005-0.011 / 0.014-0.015 (ring8 over three seeds) before.
_TOY5 = f"{_TOY}, 'Five training seeds, the student's rate, the anchor's weight'"
RECIPES[("gmm", "dmdx")] = [
    Setting("train.lr_scale", {"student": 1, "latent_heads": 10, "disc_heads": 10},
            f"{_TOY5} (fresh heads x10; the MLP student at x0.2 underfits the pairs: ring8 0.048-0.089 at 1,000 "
            "iterations)"),
    Setting("method.adp.d_t_max", 0.5, f"{_TOY} (as for images)"),
    Setting("method.adm.dt", 0.25, f"{_TOY} (the image recipe's value until 2026-12-04)"),
    Setting("method.adp.reg_weight", 10.0, f"{_TOY5} (unequal at weight 1: ADP ends with 5/5 modes, max weight "
                                           "error 0.029; at 10 the GAN noise of a critic at chance moves less mass)"),
    Setting("method.adm.reg_weight", 10.0, f"{_TOY5} (unequal: the pure-GAN ADM stage ends with no sample on a mode)"),
]

# -- built-in vector teachers (MLPs trained by `dmdx teacher train` on 2-D data) ----------------------------------
# Student, fake score and feature network are the same MLP as an exact mixture's surrogate, so they get the mixtures'
# settings.  Checked on one: a teacher trained on scatter7, one-step DMDX in 1,000 iterations covers 7 / 7 modes,
# largest weight error 0.011; at the paper's defaults 2 / 7, 0.75 (benchmarks/adm-study.md, 'Trained vector teacher').
_VECTOR = "; also measured on a trained vector teacher: benchmarks/adm-study.md, 'Trained vector teacher'"
for (_kind, _method), _settings in list(RECIPES.items()):
    if _kind == "gmm":
        RECIPES[("vector", _method)] = [replace(x, source=x.source + _VECTOR) for x in _settings]

# DMD, SiD and VSD update their fake score once per student step (DMD2 five times): at the mixtures' rate of 2e-3 all
# three lose every mode of every mixture (three seeds); at 2e-4 DMD keeps every mode of all four mixtures and SiD /
# VSD most of them.  DMD2 at 2e-4 is better on three mixtures and worse on classes3 (0.257 against 0.068): unchanged.
_TOY_RATE = ("ours: benchmarks/shootout.md, 'Checks of the failures' (three seeds, 300 iterations: modes kept at 2e-4 "
             "against none at 2e-3)")
for _method in ("dmd", "sid", "vsd"):
    RECIPES[("gmm", _method)] = [Setting("train.lr", 2e-4, _TOY_RATE)]
    RECIPES[("vector", _method)] = [Setting("train.lr", 2e-4, _TOY_RATE + "; as for exact mixtures, not measured on a "
                                                                          "trained vector teacher")]

# -- built-in image teachers (digits, MNIST: small class-conditional UNets trained by dmdx) ----------------------
# The GAN methods' discriminator heads start from scratch while the student starts as a copy of the teacher: at one
# shared learning rate (the paper's setting, as far as we know) the heads stay near chance and the student follows
# their uninformative gradients (digits DMDX FD 14.5 / 48 / 9.4 at 200 / 400 / 600 iterations).
_IMAGE_DIGITS = "ours: benchmarks/RESULTS.md, 'Distillation on digits', after the head fix"
_IMAGE_GAN_LR = Setting("train.lr_scale", {"student": 0.2, "disc_heads": 10, "latent_heads": 10, "pixel_heads": 10},
                        f"{_IMAGE_DIGITS} (one-step DMDX: FD 0.854 vs 14.5 / 48 / 9.4 at one shared rate)")
# The paper's heads (appendix B.1, 256 wide) are 7.8 M parameters on the 0.55 M-parameter digits UNet and cost 16x
# the small heads' time per pass; they learn faster per step in the critic probe, but the measured DMDX and ADM
# results on digits are with the small heads (nets/heads.ConvHead arch "dmd2").
_IMAGE_HEADS = ("ours: benchmarks/adm-study.md, 'Discriminator heads' (7.8 M vs 0.31 M parameters on digits, 16x "
                "the time per pass)")
_IMAGE_STUDY = "ours: benchmarks/adm-study.md, 'Digits'"
_IMAGE_MNIST = "ours: benchmarks/adm-study.md, 'MNIST 16x16: the ADM stage's plateau, a new image recipe'"
_HYB_MNIST = "0.732 over three training seeds vs 1.001 at the previous recipe"
_HYB_DIGITS = "teacher's FD at iteration 150 vs 200"


def _draws_over(n: int) -> Callable[[Any], bool]:
    """True when the run draws more than ``n`` samples (train.steps x train.batch_size): a cap on pairs.n."""
    return lambda cfg: cfg.train.steps * cfg.train.batch_size > n


RECIPES[("image", "dmdx")] = [
    _IMAGE_GAN_LR,
    Setting("method.adp.head_arch", "dmd2", _IMAGE_HEADS),
    Setting("method.adm.head_arch", "dmd2", _IMAGE_HEADS),
    Setting("method.adp.d_t_max", 0.5, f"{_IMAGE_DIGITS} (latent-D times in [0, 0.5]; the paper: uniform, no range)"),
    # ADM's two ODE steps go to t = 0 (the two scores' x0 predictions): at dt = 0.25 ADM's critic stays near chance on
    # MNIST16 (accuracy 0.54-0.65), at dt = 1 it rises to 0.93; at dt = 1/64 it stays at chance (hinge 1.97, digits)
    Setting("method.adm.dt", 1.0, "ours: benchmarks/adm-study.md, 'MNIST 16x16: ADM's step to t = 0' (critic accuracy "
                                  "0.61 -> 0.93 at dt = 1, 0.54-0.65 at 0.25)"),
    # the regression anchor on the teacher's ODE pairs, as for mixtures (at 1 on digits: ADP alone reaches the
    # teacher's 50-step FD in 200 iterations, 1.054 without it); at 10 it holds MNIST16's ADM stage nearer the data
    # (ADM's anchor at 1 / 3 / 10 / 30 on cand-gn, the study's setting: FD 0.792 / 0.757 / 0.727 / 0.726)
    Setting("method.adp.reg_weight", 10.0, f"{_IMAGE_MNIST} (digits at 10: teacher's FD at iteration 150, not 200)"),
    Setting("method.adm.reg_weight", 10.0, f"{_IMAGE_MNIST} (ADM's anchor at 1 / 3 / 10 / 30 on cand-gn: FD 0.792 "
                                           "/ 0.757 / 0.727 / 0.726)"),
    # ADM's generator gradient stays the paper's (method.adm.grad_norm=none).  Until issue 33 the recipe set "sample"
    # for one-step students (each sample's gradient over its own rms: a unit push from a critic that knows nothing);
    # at this recipe ADM's GAN term with it changed nothing measured (MNIST16 FD 0.753, 0.751 with the term off:
    # benchmarks/adm-study.md, 'What the GAN terms add at the image recipe').  "dmd2" is not measured here yet.
    # the student x0.5 in ADM's stage (x0.2 in ADP's): x0.5 in ADP too slows digits (teacher's FD at 400, not 150)
    Setting("method.adm.lr_scale", {"student": 0.5}, f"{_IMAGE_MNIST} (MNIST16 FD {_HYB_MNIST}; digits {_HYB_DIGITS})",
            when=lambda cfg: cfg.train.lr_scale == _IMAGE_GAN_LR.value),  # only over the recipe's own rates
    # far fewer, cheaper pairs than the method's default for a 600-iteration run (2,000 at 50 Heun steps); the
    # teacher at 16 Heun steps is within 0.004 FD of its 50-step samples.  With the anchor the one-step student
    # crosses the teacher's 50-step FD at iteration 200 with 500, 1,000 or 1,500 pairs; 500 collect in a third of the
    # time, which makes DMDX reach it no later than DMD2 (104 s vs 110 s), and end with the best recall (0.778 vs
    # 0.759 / 0.700; FD 0.852 vs 0.832 / 0.789, all below the teacher's 0.866)
    Setting("pairs.n", 500, f"{_IMAGE_STUDY}, 'Wall-clock at equal load' (500 vs 1,000 / 1,500 pairs at 25 steps: "
                            "teacher's FD at 104 s vs 122 / 143 s, DMD2 110 s; a run drawing fewer keeps the "
                            "method's default)", when=_draws_over(500)),
    Setting("pairs.steps", 25, f"{_IMAGE_STUDY} (as the demo's pairs; 2,000 at 50 steps: not measured)"),
]
# ADP alone has no ADM heads (disc_heads): the same rates without them (with them ``dmdx distill --method adp``
# stopped at "train.lr_scale names unknown networks")
RECIPES[("image", "adp")] = [Setting("train.lr_scale", {"student": 0.2, "latent_heads": 10, "pixel_heads": 10},
                                     _IMAGE_GAN_LR.source),
                             Setting("method.d_t_max", 0.5, _IMAGE_DIGITS),
                             Setting("method.head_arch", "dmd2", _IMAGE_HEADS),
                             Setting("method.reg_weight", 1.0, f"{_IMAGE_STUDY} (DMDX's ADP stage: FD 0.843 / 0.835 "
                                                               "at iteration 200 / 300; 1.054 / 0.931 without it)"),
                             *RECIPES[("image", "dmdx")][-2:]]  # the pairs
RECIPES[("image", "adm")] = [
    Setting("method.head_arch", "dmd2", _IMAGE_HEADS),
    Setting("train.lr_scale", {"student": 0.2, "disc_heads": 10}, f"{_IMAGE_DIGITS} (ADM alone: FD 1.45 -> 1.08)"),
    Setting("method.dt", 0.25, f"{_IMAGE_DIGITS} (with dt = 1/64 ADM's critic stays at chance, hinge 1.97)"),
    # the same anchor as DMDX's ADM stage (ADM alone then collects the pairs): four-step ADM reaches the teacher's
    # 50-step FD (0.824 at 600 iterations, recall 0.778; 0.912 / 0.556 without it)
    Setting("method.reg_weight", 1.0, f"{_IMAGE_STUDY}, 'Four-step ADM with the anchor' (FD 0.824, recall 0.778 at "
                                      "600 iterations; 0.912 / 0.556 without it)"),
    *RECIPES[("image", "dmdx")][-2:],  # the pairs
]


def recipe(kind: str | None, method: str) -> list[Setting]:
    """The settings of ``kind`` for ``method``: the kind's ``*`` entries, then the method's own; a method's own
    setting of a key replaces the ``*`` one (only the value that applies is listed and printed)."""
    if kind is None:
        return []
    own = RECIPES.get((kind, method), [])
    keys = {s.key for s in own}
    return [*(s for s in RECIPES.get((kind, "*"), []) if s.key not in keys), *own]


def _covered(key: str, user_keys: set[str]) -> bool:
    """True when the user set ``key`` or a section above it (``method.adm`` covers ``method.adm.dt``)."""
    return any(key == k or key.startswith(k + ".") for k in user_keys)


def apply_recipe(cfg, kind: str | None, user_keys: set[str] = frozenset()) -> list[Setting]:
    """Apply the recipe of teacher kind ``kind`` (:func:`dmdx.teachers.teacher_kind` of ``cfg.teacher``) and
    ``cfg``'s method to ``cfg`` (a RunConfig), skipping keys the user set.

    Returns the settings applied (empty when ``cfg.recipe == "none"``).
    """
    if getattr(cfg, "recipe", "auto") == "none":
        return []
    applied = []
    for s in recipe(kind, cfg.method.name):
        if _covered(s.key, set(user_keys)) or (s.when is not None and not s.when(cfg)):
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


# -- diffusers pipeline teachers (docs/real-models.md, "Recipes", has every value with its source) ---------------
REF = "DMD2 reference"
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
# attention (image and text streams) and feed-forward layers of the MMDiT blocks (diffusers' SD3 / Flux LoRA
# training scripts target the attention projections; the feed-forward layers follow the UNet list's choice)
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
FLUX_LORA_TARGETS = [*SD3_LORA_TARGETS, "proj_mlp"]  # + the single-stream blocks' MLP input


def _lora_on(cfg) -> bool:
    return cfg.real.student_lora.rank > 0


def _lora_off(cfg) -> bool:
    return cfg.real.student_lora.rank <= 0


# a LoRA student (and fake score, and EMA) on the teacher's own frozen tensors instead of float32 copies of them
SHARED_BASE = Setting(
    "real.shared_base", True,
    "ours: benchmarks/real-size.md, 'Shared base as the default' (SD1.5 at 256 px: 5.70 against 15.44 GiB and 145 "
    "against 202 CPU-s an iteration; its trained LoRA differs from the copies' about as much as train.bf16 moves them)",
    when=_lora_on)


def _pipeline_common(full_lr: float, full_src: str, targets: list[str], targets_src: str) -> list[Setting]:
    """What every method gets on a pipeline teacher: learning rate (full fine-tuning or LoRA), warm-up, LoRA shape,
    one shared base under LoRA copies."""
    return [
        SHARED_BASE,
        Setting("train.lr", full_lr, full_src, when=_lora_off),
        Setting("train.lr", 5e-5, f"{REF} (SDXL LoRA: 5e-5; student LoRA on)", when=_lora_on),
        Setting("train.warmup", 500, f"{REF} (500-step constant-with-warm-up schedule)"),
        Setting("real.student_lora.alpha", 8.0, f"{REF} (LoRA rank 64, alpha 8; used when real.student_lora.rank > 0)"),
        Setting("real.student_lora.targets", targets, targets_src),
        Setting("real.fake_lora.targets", targets, targets_src + " (fake score, when real.fake_lora.rank > 0)"),
    ]


RECIPES.update({
    ("sd", "*"): _pipeline_common(1e-5, f"{REF} (SD1.5 full fine-tuning, first stage: 1e-5)", UNET_LORA_TARGETS,
                                  f"{REF} (LoRA on convs, attention, feed-forward, projections, time embedding)"),
    ("sd", "dmd2"): [
        Setting("method.real_guidance", 1.75, f"{REF} (SD1.5: real guidance 1.75)"),
        Setting("method.critic_every", 10, f"{REF} (SD1.5: critic ratio 10)"),
        Setting("method.gan_g_weight", 1e-3, f"{REF} (SD1.5: GAN generator weight 1e-3)"),
    ],
    ("sdxl", "*"): [
        *_pipeline_common(5e-7, f"{REF} (SDXL full fine-tuning: 5e-7)", UNET_LORA_TARGETS,
                          f"{REF} (LoRA on convs, attention, feed-forward, projections, time embedding)"),
        Setting("real.guidance", 8.0, f"{REF} (SDXL: real guidance 8)"),
    ],
    ("sdxl", "dmd2"): [
        Setting("method.critic_every", 5, f"{REF} (SDXL: critic ratio 5)"),
        Setting("method.gan_g_weight", 5e-3, f"{REF} (SDXL: GAN generator weight 5e-3)"),
        Setting("method.gan_d_weight", 1e-2, f"{REF} (SDXL: GAN critic weight 1e-2)"),
    ],
    ("sd3", "*"): [
        *_pipeline_common(1e-5, f"{REF}'s full fine-tuning range 5e-7..1e-5 (no SD3 recipe there): its top",
                          SD3_LORA_TARGETS, "attention + feed-forward of the MMDiT blocks (ours)"),
        Setting("student.times", [1.0, 0.75, 0.5, 0.25],
                "ADM paper (SD3 students are 4-step); times in t, shifted to sigmas 1, .9, .75, .5 by the "
                "schedule's shift 3 (DMD2 issue #62)"),
    ],
    ("flux", "*"): _pipeline_common(1e-5, f"{REF}'s full fine-tuning range 5e-7..1e-5 (no Flux recipe there): its top",
                                    FLUX_LORA_TARGETS, "attention + feed-forward of the MMDiT blocks (ours)"),
})


# -- the wider distribution-matching family on pipelines: the papers' own settings -----------------------------
# SwiftBrush (VSD) trains SD2.1-base with a LoRA fake score ("LoRA teacher"); its README's command and
# train_swiftbrush.py's defaults.  The LoRA fake score is what makes VSD SwiftBrush on every UNet / MMDiT pipeline;
# the rest was set for SD only.
_SB = "SwiftBrush README (SD2.1-base)"
_VSD_LORA = [
    Setting("real.fake_lora.rank", 64, f"{_SB}: --lora_rank 64 (the fake score is a LoRA on the teacher)"),
    Setting("real.fake_lora.alpha", 108.0, f"{_SB}: --lora_alpha 108"),
    Setting("real.fake_lora.targets", ["to_q", "to_v"], "SwiftBrush train_swiftbrush.py: LoraConfig target_modules"),
]


def _fake_lora_on(cfg) -> bool:
    return cfg.real.fake_lora.rank > 0


RECIPES.update({
    ("sd", "vsd"): [
        *_VSD_LORA,
        Setting("method.real_guidance", 4.5, f"{_SB}: --guidance_scale 4.5 (teacher and LoRA teacher)"),
        Setting("train.lr", 1e-6, f"{_SB}: --learning_rate 1e-6 (student)", when=_lora_off),
        Setting("train.lr_scale", {"fake_score": 1000}, f"{_SB}: --learning_rate_lora 1e-3 = 1000 x the student's",
                when=_fake_lora_on),
        Setting("train.warmup", 0, f"{_SB}: --lr_warmup_steps 0"),
        Setting("train.weight_decay", 0.0, "SwiftBrush train_swiftbrush.py: --adam_weight_decay 0"),
        Setting("train.grad_clip", 1.0, "SwiftBrush train_swiftbrush.py: --max_grad_norm 1"),
    ],
    ("sdxl", "vsd"): list(_VSD_LORA),
    ("sd3", "vsd"): list(_VSD_LORA),
    ("flux", "vsd"): list(_VSD_LORA),
    # SiD-LSG's Stable Diffusion 1.5 run (run_sid.sh 'sd1.5'; SD2.1-base the same)
    ("sd", "sid"): [
        Setting("method.alpha", 1.0, "SiD-LSG run_sid.sh (SD1.5): --alpha 1"),
        Setting("method.real_guidance", 2.0, "SiD-LSG run_sid.sh: --cfg_eval_real 2 (kappa_4)"),
        Setting("method.fake_guidance", 2.0, "SiD-LSG run_sid.sh: --cfg_eval_fake 2 (kappa_2 = kappa_3)"),
        Setting("method.fake_train_guidance", 2.0, "SiD-LSG run_sid.sh: --cfg_train_fake 2 (kappa_1)"),
        Setting("student.times", [0.625], "SiD-LSG run_sid.sh: --init_timestep 625 (the one-step generator's time)"),
        Setting("train.lr", 1e-6, "SiD-LSG run_sid.sh: --lr 1e-6 --glr 1e-6", when=_lora_off),
        Setting("train.betas", [0.0, 0.999], "SiD-LSG sid_train.py: Adam betas (0, 0.999) for both networks"),
        Setting("train.weight_decay", 0.0, "SiD-LSG run_sid.sh: --optimizer adam (no weight decay)"),
        Setting("train.warmup", 0, "SiD-LSG: constant learning rate"),
    ],
})

# -- video teachers (dmdx.teachers.video) ------------------------------------------------------------------------
_ADM = "ADM paper (arXiv 2507.18569), Tables 2-3: CogVideoX-2b / -5b distilled to 8 steps by multi-step ADM"
_SFP = "Self-Forcing-Plus configs/self_forcing_14b_dmd.yaml (4-step DMD of Wan2.1-T2V-14B)"
_COG8 = [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
RECIPES.update({
    ("cogvideox", "*"): [
        SHARED_BASE,
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
                f"{_SFP} and Self-Forcing's configs (4-step Wan2.1): denoising_step_list 1000/750/500/250 with "
                "warp_denoising_step, i.e. these times before the schedule's shift (timestep_shift 5 there: sigmas "
                "1, .9375, .833, .625; here the teacher folder's shift). The exported scheduler's plain 4-step call "
                "gives them (docs/video.md, Export)"),
        Setting("real.grad_checkpointing", True, f"{_SFP}: gradient_checkpointing true"),
        SHARED_BASE,
    ],
    ("wan", "dmd2"): [
        Setting("method.real_guidance", 3.0, f"{_SFP}: guidance_scale 3.0"),
        Setting("train.lr", 2e-6, f"{_SFP}: lr 2e-6"),
        Setting("train.lr_scale", {"fake_score": 0.2}, f"{_SFP}: lr_critic 4e-7 = 0.2 x lr"),
        Setting("train.betas", [0.0, 0.999], f"{_SFP}: beta1 0, beta2 0.999 (generator and critic)"),
        Setting("train.ema_decay", 0.99, f"{_SFP}: ema_weight 0.99"),
    ],
})

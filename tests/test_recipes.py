"""Recipes: which defaults a teacher kind gets, and that the user's --set still wins."""

import json

from dmdx import recipes
from dmdx.cli import main
from dmdx.recipes import Setting, recipe
from dmdx.teachers import apply_recipe, teacher_kind
from dmdx.train.run import default_run_config


def test_teacher_kinds(tmp_path):
    assert teacher_kind("gmm:ring8") == "gmm"
    assert teacher_kind(tmp_path / "missing") is None
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.json").write_text(json.dumps({"shape": [1, 8, 8]}))
    assert teacher_kind(tmp_path / "m") == "image"
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "model.json").write_text(json.dumps({"shape": [2]}))
    assert teacher_kind(tmp_path / "v") == "vector"


def test_vector_teachers_get_the_mixtures_settings():
    vec = {s.key: s.value for s in recipe("vector", "dmdx")}
    assert vec == {s.key: s.value for s in recipe("gmm", "dmdx")}
    assert vec["method.adp.reg_weight"] == 10.0 and vec["method.adm.reg_weight"] == 10.0
    assert vec["train.lr_scale"]["student"] == 1  # the MLP student at the shared rate, unlike the image recipe's 0.2
    assert all("Trained vector teacher" in s.source for s in recipe("vector", "dmd2"))


def test_recipe_fills_only_what_the_user_did_not_set(monkeypatch):
    table = {("gmm", "*"): [Setting("train.lr", 3e-3, "test")],
             ("gmm", "dmd2"): [Setting("method.critic_every", 7, "test"), Setting("train.lr", 2e-3, "test")]}
    monkeypatch.setattr(recipes, "RECIPES", table)
    assert [s.value for s in recipe("gmm", "dmd2")] == [7, 2e-3]  # the method's entry replaces the kind's "*" one
    cfg = default_run_config("dmd2")
    cfg.teacher = "gmm:ring8"
    applied = apply_recipe(cfg, {"method.critic_every"})
    assert cfg.method.critic_every == 5 and cfg.train.lr == 2e-3
    assert {s.key for s in applied} == {"train.lr"}
    cfg = default_run_config("dmd2")
    cfg.teacher, cfg.recipe = "gmm:ring8", "none"
    assert apply_recipe(cfg) == [] and cfg.method.critic_every == 5


def test_dry_run_prints_the_recipe_and_set_wins(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(recipes, "RECIPES", {("gmm", "dmd2"): [Setting("method.critic_every", 7, "src")]})
    base = ["distill", "--method", "dmd2", "--teacher", "gmm:ring8", "--out", str(tmp_path / "r"), "--dry-run"]
    assert main(base) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["method"]["critic_every"] == 7 and "method.critic_every = 7" in out.err
    assert main([*base, "--set", "method.critic_every=3"]) == 0
    assert json.loads(capsys.readouterr().out)["method"]["critic_every"] == 3
    assert main([*base, "--set", "recipe=none"]) == 0
    assert json.loads(capsys.readouterr().out)["method"]["critic_every"] == 5


def _dry_run(capsys, tmp_path, teacher, method, *sets):
    argv = ["distill", "--method", method, "--teacher", str(teacher), "--out", str(tmp_path / "r"), "--dry-run"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def test_builtin_image_teacher_gets_the_small_scale_gan_recipe(tmp_path, capsys):
    """The shipped digits teacher is kind "image": DMDX gets the settings measured on digits, --set still wins,
    and recipe=none gives the paper's defaults."""
    from dmdx.demo import shipped_teacher

    teacher = shipped_teacher("digits")
    assert teacher_kind(teacher) == "image"
    cfg, err = _dry_run(capsys, tmp_path, teacher, "dmdx")
    assert cfg["train"]["lr_scale"] == {"student": 0.2, "disc_heads": 10, "latent_heads": 10, "pixel_heads": 10}
    assert cfg["method"]["adm"]["dt"] == 1 and cfg["method"]["adp"]["d_t_max"] == 0.5
    assert cfg["method"]["adp"]["reg_weight"] == 10 and cfg["method"]["adm"]["reg_weight"] == 10
    assert cfg["method"]["adm"]["grad_norm"] == "none" and cfg["method"]["adm"]["lr_scale"] == {"student": 0.5}
    assert cfg["method"]["adp"]["lr_scale"] == {}  # ADP's stage keeps train.lr_scale's student x0.2
    assert cfg["pairs"]["n"] == 500 and cfg["pairs"]["steps"] == 25
    assert "method.adm.dt = 1.0" in err and "benchmarks/" in err
    cfg, _ = _dry_run(capsys, tmp_path, teacher, "dmdx", "method.adm.dt=0.1", 'train.lr_scale={"student": 1}')
    assert cfg["method"]["adm"]["dt"] == 0.1 and cfg["train"]["lr_scale"] == {"student": 1}
    assert cfg["method"]["adp"]["d_t_max"] == 0.5  # the rest of the recipe still applies
    assert cfg["method"]["adm"]["lr_scale"] == {}  # the user's own rates: ADM's stage is not given the recipe's x0.5
    cfg, _ = _dry_run(capsys, tmp_path, teacher, "dmdx", "student.times=1,0.75,0.5,0.25")
    assert cfg["method"]["adm"]["dt"] == 1 and cfg["method"]["adm"]["reg_weight"] == 10  # four-step: the same recipe
    cfg, _ = _dry_run(capsys, tmp_path, teacher, "dmdx", 'method.adm.lr_scale={"student": 0.1}')
    assert cfg["method"]["adm"]["lr_scale"] == {"student": 0.1} and cfg["train"]["lr_scale"]["student"] == 0.2
    cfg, _ = _dry_run(capsys, tmp_path, teacher, "dmdx", "recipe=none")
    assert cfg["method"]["adm"]["dt"] == 1 / 64 and cfg["train"]["lr_scale"] == {}
    assert cfg["method"]["adp"]["reg_weight"] == 0 and cfg["pairs"]["n"] is None and cfg["pairs"]["steps"] == 50
    assert cfg["method"]["adm"]["grad_norm"] == "none" and cfg["method"]["adm"]["lr_scale"] == {}
    cfg, _ = _dry_run(capsys, tmp_path, teacher, "adp")
    assert cfg["method"]["reg_weight"] == 1 and cfg["pairs"]["steps"] == 25
    cfg, _ = _dry_run(capsys, tmp_path, teacher, "adm")
    assert cfg["method"]["dt"] == 0.25 and cfg["train"]["lr_scale"]["disc_heads"] == 10
    cfg, _ = _dry_run(capsys, tmp_path, teacher, "dmd2")
    assert cfg["train"]["lr_scale"] == {} and cfg["method"]["critic_every"] == 5  # DMD2 keeps its paper defaults


def test_every_builtin_recipe_names_real_config_keys_and_sources():
    """Each Setting of the built-in kinds resolves against the method's config and cites where it comes from."""
    from dmdx.config import set_path

    for (kind, method), settings in recipes.RECIPES.items():
        if kind not in ("gmm", "vector", "image"):
            continue
        assert settings, (kind, method)
        for s in settings:
            cfg = default_run_config(method if method != "*" else "dmd2")
            set_path(cfg, s.key, json.dumps(s.value) if isinstance(s.value, (list, dict)) else s.value)
            assert s.source, (kind, method, s.key)


def test_pipeline_recipes_share_the_base_under_a_lora_student():
    """Every pipeline kind puts a LoRA student (and fake score, EMA) on the teacher's frozen tensors by default; a
    fully fine-tuned student owns its weights, and the user's ``real.shared_base=false`` wins."""
    for kind in ("sd", "sdxl", "sd3", "flux", "wan", "cogvideox"):
        for method in ("dmd2", "adm", "dmdx", "vsd"):
            for rank, user, expect in ((64, set(), True), (0, set(), False), (64, {"real.shared_base"}, False)):
                cfg = default_run_config(method)
                cfg.real.student_lora.rank = rank
                recipes.apply_recipe(cfg, kind, user | {"real.student_lora.rank"})
                assert cfg.real.shared_base is expect, (kind, method, rank, user)

"""Recipes: which defaults a teacher kind gets, and that the user's --set still wins."""

import json

from dmdx import recipes
from dmdx.cli import main
from dmdx.recipes import Setting, apply_recipe, recipe, teacher_kind
from dmdx.train.run import default_run_config


def test_teacher_kinds(tmp_path):
    assert teacher_kind("gmm:ring8") == "gmm"
    assert teacher_kind(tmp_path / "missing") is None
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.json").write_text(json.dumps({"shape": [1, 8, 8]}))
    assert teacher_kind(tmp_path / "m") == "image"


def test_recipe_fills_only_what_the_user_did_not_set(monkeypatch):
    table = {("gmm", "*"): [Setting("train.lr", 3e-3, "test")],
             ("gmm", "dmd2"): [Setting("method.critic_every", 7, "test"), Setting("train.lr", 2e-3, "test")]}
    monkeypatch.setattr(recipes, "RECIPES", table)
    assert [s.value for s in recipe("gmm", "dmd2")] == [3e-3, 7, 2e-3]  # the method's entry comes last and wins
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

"""Which teacher kind claims which --teacher / --model value, and what the callers get through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmdx.teachers import kind_for, teacher_kind
from dmdx.config import EvalRequest, SampleRequest


DIGITS = Path(__file__).resolve().parents[1] / "src" / "dmdx" / "assets" / "teacher_digits"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from dmdx.teachers.image.tiny import make_tiny_pipeline
    from dmdx.teachers.video.tiny import make_tiny_video_pipeline

    root = tmp_path_factory.mktemp("adapters")
    sd = make_tiny_pipeline("sd", root / "sd")
    wan = make_tiny_video_pipeline("wan", root / "wan")
    students = {}
    for name, family, pipe in [("sd_student", "unet", sd), ("wan_student", "wan", wan), ("mlp_student", None, None)]:
        f = root / name
        f.mkdir()
        extra = {"method": "dmd2"} if pipe is None else {"method": "dmd2", "pipeline": str(pipe), "family": family}
        info = {"kind": "student", "backbone": {"name": "mlp", "config": {}}, "schedule": {"name": "flow"},
                "prediction": "x0", "shape": [2], "extra": extra}
        (f / "model.json").write_text(json.dumps(info))
        students[name] = f
    return {"sd": sd, "wan": wan, **students, "root": root}


def test_each_kind_has_its_adapter(folders):
    cases = {"gmm:ring8": "analytic", str(DIGITS): "builtin", str(folders["sd"]): "image",
             str(folders["wan"]): "video", "org/some-model": "image",  # a hub id: refused when loaded
             str(folders["root"] / "missing"): "builtin",  # reported by the model-folder loader
             # a student belongs to the adapter of the teacher it was distilled from
             str(folders["sd_student"]): "image", str(folders["wan_student"]): "video",
             str(folders["mlp_student"]): "builtin"}
    assert {spec: kind_for(spec).name for spec in cases} == cases


def test_teacher_kinds_come_from_the_adapters(folders):
    assert teacher_kind("gmm:unequal") == "gmm"
    assert teacher_kind(DIGITS) == "image"
    assert teacher_kind(folders["sd"]) == "sd"
    assert teacher_kind(folders["wan"]) == "wan"
    assert teacher_kind(folders["root"] / "missing") is None


def test_loading_through_the_adapters_keeps_the_clear_errors(folders):
    from dmdx.teachers import load_model

    assert load_model("gmm:ring8").analytic
    assert load_model(DIGITS).info.kind == "teacher"
    assert load_model(folders["sd"]).info.extra["family"] == "unet"
    with pytest.raises(FileNotFoundError, match="hub id.*nothing is downloaded"):
        load_model("org/some-model")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(folders["root"] / "missing")
    bad = folders["root"] / "corrupt"
    bad.mkdir()
    (bad / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(bad)


def test_requests_refuse_what_the_kind_cannot_use(folders, tmp_path):
    with pytest.raises(ValueError, match="--prompts is for text-to-image and text-to-video"):
        kind_for(DIGITS).sample(SampleRequest(str(DIGITS), tmp_path / "s.png", prompts="p.txt"))
    with pytest.raises(ValueError, match="is a text-to-image model: pass --prompts"):
        kind_for(folders["sd"]).sample(SampleRequest(str(folders["sd"]), tmp_path / "imgs"))
    with pytest.raises(ValueError, match="no metric for video models"):
        kind_for(folders["wan"]).evaluate(EvalRequest(str(folders["wan"])))
    with pytest.raises(ValueError, match="nothing to export"):
        kind_for(folders["mlp_student"]).export(folders["mlp_student"], tmp_path / "out")


def test_reused_pairs_must_come_from_the_same_prompts(tmp_path):
    from types import SimpleNamespace

    from dmdx.train.setup import run_pairs
    from dmdx.train.run import PairsConfig

    (tmp_path / "pairs.json").write_text(json.dumps({"guidance": 4.0, "shape": [4, 8, 8], "prompts": "aaaa",
                                                     "teacher": "/p/sd"}))
    cfg = SimpleNamespace(pairs=PairsConfig(path=str(tmp_path)), method=SimpleNamespace(real_guidance=None))
    teacher = SimpleNamespace(info=SimpleNamespace(guidance=4.0, shape=[4, 8, 8]))
    with pytest.raises(ValueError, match=r"other prompts or another teacher: prompts='aaaa' \(this run: 'bbbb'\)"):
        run_pairs(cfg, teacher, tmp_path, "cpu", meta_extra={"prompts": "bbbb", "teacher": "/p/sd"})
